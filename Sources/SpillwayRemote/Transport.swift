import CSpillwayVerbs
import SpillwayCore
import SpillwayFabric
import Logging
import Metrics

/// Which transport the remote tiers use, decided once per process from the hardware.
///
/// RDMA needs a verbs device: `ibv_get_device_list` (libibverbs) is asked at first use. With
/// no device, or with devices but no verbs transport in this build, the choice is TCP, and
/// the fallback is logged (with the reason) and counted
/// (`spillway_transport_fallbacks_total{reason}`), never silent.
public enum TransportSelection {
    /// RDMA device names libibverbs reports (empty when there is none or libibverbs finds no
    /// provider).
    public static func rdmaDevices() -> [String] {
        var count: Int32 = 0
        guard let list = ibv_get_device_list(&count) else { return [] }
        defer { ibv_free_device_list(list) }
        var names: [String] = []
        for index in 0..<Int(max(0, count)) {
            if let device = list[index], let name = ibv_get_device_name(device) { names.append(String(cString: name)) }
        }
        return names
    }

    /// The probe's outcome, computed once.
    public static let probe: (devices: [String], reason: String) = {
        let devices = rdmaDevices()
        return (devices, fallbackReason(devices: devices))
    }()

    /// Why TCP is used, given the devices found (the label of the fallback counter).
    public static func fallbackReason(devices: [String]) -> String {
        devices.isEmpty ? "no-rdma-device" : "verbs-transport-not-built"
    }

    /// A local libfabric provider `auto` may use without being named (`verbs`, then `efa`),
    /// probed once (`fi_getinfo`).
    public static let localRDMAProvider: String? = ["verbs", "efa"].first { FabricProvider.isAvailable($0) }

    /// Why `auto` without a named provider stays on TCP on this host.
    public static var noRDMAReason: String {
        probe.devices.isEmpty
            ? "no RDMA device (libibverbs found none) and no libfabric verbs/efa provider; name one with --fabric-provider (e.g. tcp)"
            : "RDMA devices \(probe.devices.joined(separator: ",")) present but libfabric's verbs/efa providers refused them (fi_info)"
    }

    /// Chooses the transport for `component` and logs and counts the fallback to TCP.
    /// Returns "tcp" (the only transport this build carries).
    @discardableResult
    public static func choose(for component: String, logger: Logger) -> String {
        let (devices, reason) = probe
        if devices.isEmpty {
            logger.notice("no RDMA device (libibverbs found none); using TCP", metadata: ["component": "\(component)", "fallback": "\(reason)"])
        } else {
            logger.warning("RDMA devices present but this build has no verbs transport; using TCP", metadata: [
                "component": "\(component)", "devices": "\(devices.joined(separator: ","))", "fallback": "\(reason)",
            ])
        }
        Counter(label: "spillway_transport_fallbacks_total", dimensions: [("component", component), ("reason", reason)]).increment()
        return "tcp"
    }
}

/// Which data path a remote tier or a daemon uses for pages (`--transport`, TOML `transport`).
///
/// - `auto`: one-sided RMA through libfabric when both sides support it and the provider is
///   an RDMA/EFA one (`verbs`, `efa`) or was named explicitly (`--fabric-provider`); else
///   Spillway's TCP protocol, with the reason logged.
/// - `rma`: RMA or a clear error (no usable provider, a TCP-only daemon).
/// - `tcp`: Spillway's TCP protocol only.
public enum TransportMode: String, Sendable, CaseIterable, CustomStringConvertible {
    case auto, rma, tcp

    public var description: String { rawValue }

    /// Parses a `--transport` / TOML value.
    public static func parse(_ text: String) throws(SpillwayError) -> TransportMode {
        guard let mode = TransportMode(rawValue: text.lowercased()) else {
            throw .invalidConfiguration("transport must be auto, rma or tcp, not '\(text)'")
        }
        return mode
    }

    /// libfabric providers `auto` uses without being told: the ones that drive RDMA NICs and EFA.
    public static let rdmaProviders: Set<String> = ["verbs", "efa"]
}
