#if canImport(Glibc)
import Glibc
#endif
import CSpillwayFabric
import SpillwayCore

/// The memory-registration rules a provider imposes (`fi_domain_attr.mr_mode`), as Spillway
/// handles them.
///
/// Why it matters: the same RMA code must run over `tcp` (which requires none of these), `verbs`
/// (local registration, virtual addresses, provider keys) and `efa`. Spillway offers the
/// provider the bits in `FabricMRMode.supported`; `FabricProvider.mrMode` is the subset the
/// chosen provider actually requires, and registration and addressing follow it.
public struct FabricMRMode: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    /// FI_MR_LOCAL: local buffers of a transfer must be registered and their descriptor passed
    /// (Spillway always registers local buffers and always passes the descriptor).
    public static let local = FabricMRMode(rawValue: Int32(FI_MR_LOCAL))
    /// FI_MR_VIRT_ADDR: a remote address is the target's virtual address; without it, an offset
    /// from the start of the registered region. `FabricRegionGrant.base` carries the difference.
    public static let virtualAddress = FabricMRMode(rawValue: Int32(FI_MR_VIRT_ADDR))
    /// FI_MR_PROV_KEY: the provider picks the key; without it Spillway requests a random one.
    public static let providerKey = FabricMRMode(rawValue: Int32(FI_MR_PROV_KEY))
    /// FI_MR_ALLOCATED: registered memory must be backed by allocated pages (always true here).
    public static let allocated = FabricMRMode(rawValue: Int32(FI_MR_ALLOCATED))
    /// FI_MR_ENDPOINT: a region is bound to an endpoint and enabled before use.
    public static let endpoint = FabricMRMode(rawValue: Int32(FI_MR_ENDPOINT))

    /// The bits Spillway handles; offered in the `fi_getinfo` hints, so a provider needing
    /// anything else (FI_MR_RAW, FI_MR_HMEM, ...) is not selected.
    public static let supported: FabricMRMode = [.local, .virtualAddress, .providerKey, .allocated, .endpoint]

    public var description: String {
        let names: [(FabricMRMode, String)] = [
            (.local, "FI_MR_LOCAL"), (.virtualAddress, "FI_MR_VIRT_ADDR"), (.providerKey, "FI_MR_PROV_KEY"),
            (.allocated, "FI_MR_ALLOCATED"), (.endpoint, "FI_MR_ENDPOINT"),
        ]
        let set = names.filter { contains($0.0) }.map(\.1)
        return set.isEmpty ? "none" : set.joined(separator: "|")
    }
}

/// A libfabric provider (and one of its domains) able to do one-sided RMA on reliable
/// datagram endpoints: what `fi_getinfo` returned for Spillway's requirements.
///
/// Why: the provider decides everything below it — `tcp` (ofi_rxm over TCP sockets, any
/// machine), `verbs` (RDMA NICs, SoftRoCE), `efa` — while Spillway's code stays one path.
/// Discovery asks for `FI_RMA` (read, write, remote read, remote write) on `FI_EP_RDM` with
/// thread-safe domains and the memory-registration modes of `FabricMRMode.supported`; nothing
/// matching is a typed error carrying libfabric's text.
///
/// Owns one `fi_info` (freed in deinit). `@unchecked Sendable`: the `fi_info` is written only
/// by `discover` and is read-only afterwards (endpoints copy from it when they open).
public final class FabricProvider: @unchecked Sendable, CustomStringConvertible {
    let info: UnsafeMutablePointer<fi_info>
    /// The provider as libfabric names it, e.g. `tcp;ofi_rxm` or `verbs;ofi_rxm`.
    public let name: String
    /// The fabric (for IP providers, the subnet, e.g. `127.0.0.1/32`).
    public let fabricName: String
    /// The domain (for IP providers, the interface, e.g. `lo`; for verbs, the device).
    public let domainName: String
    /// The registration rules the provider requires (a subset of `FabricMRMode.supported`).
    public let mrMode: FabricMRMode
    /// The bytes of a memory key (requested keys are masked to this).
    public let keySize: Int
    /// The transmit queue depth: a bound on operations in flight per endpoint.
    public let transmitQueueSize: Int
    /// The largest single transfer.
    public let maxMessageSize: Int
    /// `FI_PROGRESS_MANUAL` data progress: an endpoint that only serves RMA (a daemon's) must
    /// still be driven (`FabricProgressThread`), or peers' operations stall. `tcp` needs it.
    public let requiresManualProgress: Bool
    /// Whether a completed write is in the target's memory (FI_DELIVERY_COMPLETE). Without it
    /// a completed write is only handed to the transport; a reader over another connection
    /// may briefly see the old bytes.
    public let writesCompleteOnDelivery: Bool

    private init(info: UnsafeMutablePointer<fi_info>) {
        self.info = info
        name = info.pointee.fabric_attr.pointee.prov_name.map { String(cString: $0) } ?? "?"
        fabricName = info.pointee.fabric_attr.pointee.name.map { String(cString: $0) } ?? "?"
        domainName = info.pointee.domain_attr.pointee.name.map { String(cString: $0) } ?? "?"
        mrMode = FabricMRMode(rawValue: info.pointee.domain_attr.pointee.mr_mode)
        let reportedKeySize = Int(info.pointee.domain_attr.pointee.mr_key_size)
        keySize = reportedKeySize == 0 ? 8 : min(reportedKeySize, 8)
        transmitQueueSize = max(1, Int(info.pointee.tx_attr.pointee.size))
        // size_t imports as Int: SIZE_MAX ("unlimited") would read as -1.
        maxMessageSize = Int(clamping: UInt(bitPattern: info.pointee.ep_attr.pointee.max_msg_size))
        requiresManualProgress = info.pointee.domain_attr.pointee.data_progress == FI_PROGRESS_MANUAL
        writesCompleteOnDelivery = info.pointee.tx_attr.pointee.op_flags & UInt64(FI_DELIVERY_COMPLETE) != 0
    }

    deinit { fi_freeinfo(info) }

    public var description: String {
        "\(name) fabric \(fabricName) domain \(domainName) mr_mode \(mrMode) tx \(transmitQueueSize)"
            + (requiresManualProgress ? " manual-progress" : "") + (writesCompleteOnDelivery ? " delivery-complete" : "")
    }

    /// Finds a provider for one-sided RMA.
    ///
    /// - Parameters:
    ///   - provider: a libfabric provider name (`tcp`, `verbs`, `efa`, ...); a core name also
    ///     matches its layered form (`tcp` finds `tcp;ofi_rxm`). `nil` takes libfabric's first.
    ///   - node: the local address to bind (`FI_SOURCE`), e.g. `127.0.0.1` for loopback; `nil`
    ///     lets the provider pick its first interface.
    ///   - domain: a domain (interface or device name, e.g. `lo`, `mlx5_0`, `rxe0`), or `nil`.
    /// - Throws: `SpillwayError.transport` (operation `fi_getinfo`) with libfabric's text when
    ///   no provider here matches, e.g. `verbs` without an RDMA device.
    public static func discover(provider: String?, node: String? = nil, domain: String? = nil) throws(SpillwayError) -> FabricProvider {
        guard let hints = fi_allocinfo() else {
            throw .transport(provider: provider ?? "any", operation: "fi_allocinfo", errno: ENOMEM, reason: "out of memory")
        }
        defer { fi_freeinfo(hints) }  // frees the strdup'ed names too
        hints.pointee.caps = UInt64(FI_RMA) | UInt64(FI_READ) | UInt64(FI_WRITE) | UInt64(FI_REMOTE_READ) | UInt64(FI_REMOTE_WRITE)
        // Spillway passes an fi_context2 it owns as every operation's context.
        hints.pointee.mode = UInt64(FI_CONTEXT) | UInt64(FI_CONTEXT2)
        hints.pointee.ep_attr.pointee.type = FI_EP_RDM
        hints.pointee.domain_attr.pointee.mr_mode = FabricMRMode.supported.rawValue
        hints.pointee.domain_attr.pointee.threading = FI_THREAD_SAFE
        if let provider { hints.pointee.fabric_attr.pointee.prov_name = strdup(provider) }
        if let domain { hints.pointee.domain_attr.pointee.name = strdup(domain) }
        // A write completes when its bytes are in the target's memory (FI_DELIVERY_COMPLETE),
        // not merely handed to the transport: a page acknowledged to the store must be readable
        // from the daemon by anyone. Providers that cannot are taken without it (see
        // `writesCompleteOnDelivery`).
        hints.pointee.tx_attr.pointee.op_flags = UInt64(FI_DELIVERY_COMPLETE)
        var found: UnsafeMutablePointer<fi_info>?
        let flags: UInt64 = node == nil ? 0 : UInt64(FI_SOURCE)
        var status = fi_getinfo(spillway_fi_version(), node, nil, flags, hints, &found)
        if status == -Int32(FI_ENODATA) {
            hints.pointee.tx_attr.pointee.op_flags = 0
            status = fi_getinfo(spillway_fi_version(), node, nil, flags, hints, &found)
        }
        guard status == 0, let found else {
            let code = status == 0 ? FI_ENODATA : -status
            var reason = String(cString: fi_strerror(code))
            reason += ": no provider \(provider.map { "'\($0)'" } ?? "") offers FI_RMA on FI_EP_RDM"
            if let domain { reason += " in domain '\(domain)'" }
            if let node { reason += " at \(node)" }
            if provider == "verbs" || provider == "efa" { reason += " (no RDMA device, or its provider is not installed)" }
            throw .transport(provider: provider ?? "any", operation: "fi_getinfo", errno: code, reason: reason)
        }
        defer { fi_freeinfo(found) }
        // The first entry is libfabric's preferred match; keep a copy of it alone.
        guard let first = fi_dupinfo(found) else {
            throw .transport(provider: provider ?? "any", operation: "fi_dupinfo", errno: ENOMEM, reason: "out of memory")
        }
        return FabricProvider(info: first)
    }

    /// Whether `discover(provider:)` would find `provider` here (for device-gated tests and the
    /// transport's `auto` choice).
    public static func isAvailable(_ provider: String, node: String? = nil) -> Bool {
        (try? discover(provider: provider, node: node)) != nil
    }
}

/// The typed error for a failed libfabric call: `code` is libfabric's return (negative) or
/// error number (positive); the reason is `fi_strerror`'s text plus `detail`.
func fabricError(_ provider: String, _ operation: String, _ code: some BinaryInteger, detail: String? = nil) -> SpillwayError {
    let number = Int32(clamping: code < 0 ? -Int64(code) : Int64(code))
    var reason = String(cString: fi_strerror(number))
    if let detail, !detail.isEmpty { reason += ": " + detail }
    return .transport(provider: provider, operation: operation, errno: number, reason: reason)
}
