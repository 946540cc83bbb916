import CSpillwayFabric
import SpillwayCore

/// A peer endpoint inserted into one local endpoint's address vector (`fi_av_insert`).
///
/// Why a type: an `fi_addr_t` means something only to the endpoint that inserted it; the
/// endpoint's identity travels with it, and a transfer naming a peer of another endpoint is
/// refused instead of reaching whoever sits at that index.
public struct FabricPeer: Sendable, Hashable {
    let address: fi_addr_t
    let owner: ObjectIdentifier
}

/// What a daemon hands a client for one registered region (over its control protocol, after
/// authentication): the base to address it by, its length and its key.
///
/// Why: the remote side of every transfer. `base` is the region's virtual address when the
/// provider uses FI_MR_VIRT_ADDR and 0 otherwise, so a client computes `base + offset` without
/// knowing the provider's rules. Keys are per region: a daemon registers one region per tenant
/// per slab and revokes it by closing that region, after which the key reads nothing.
public struct FabricRegionGrant: Sendable, Hashable, CustomStringConvertible {
    public var base: UInt64
    public var length: Int
    public var key: UInt64

    public init(base: UInt64, length: Int, key: UInt64) {
        self.base = base
        self.length = length
        self.key = key
    }

    public var description: String {
        "region(base 0x\(String(base, radix: 16)), \(length) bytes, key 0x\(String(key, radix: 16)))"
    }
}

/// A region of a peer, as the client addresses it: the peer and the grant it received.
///
/// Why: a transfer's remote half. Transfers are bounds-checked against `grant.length` before
/// anything is posted; the provider checks again at the target, against the registration.
public struct FabricRemoteRegion: Sendable, Hashable {
    public var peer: FabricPeer
    public var grant: FabricRegionGrant

    public init(peer: FabricPeer, grant: FabricRegionGrant) {
        self.peer = peer
        self.grant = grant
    }
}

/// One one-sided transfer of a batch: `length` bytes between `localOffset` in the batch's
/// local region and `remoteOffset` in `remote`.
///
/// Why: a daemon's pages live in many slabs (many grants), so each item names its own remote
/// region; the local side of a batch is one registered page buffer.
public struct FabricTransfer: Sendable, Hashable {
    public var localOffset: Int
    public var remote: FabricRemoteRegion
    public var remoteOffset: Int
    public var length: Int

    public init(localOffset: Int, remote: FabricRemoteRegion, remoteOffset: Int, length: Int) {
        self.localOffset = localOffset
        self.remote = remote
        self.remoteOffset = remoteOffset
        self.length = length
    }
}

/// How a batch ended: items that completed, and each failed item with its typed error (from
/// the posting call or from `fi_cq_readerr`).
///
/// Why per item: one revoked key or one bad offset fails its own transfers, not the batch; the
/// caller decides (e.g. fetch that page elsewhere). A failed read item never reports bytes:
/// its local bytes are undefined and must not be used.
public struct FabricBatchResult: Sendable {
    /// One failed transfer: its index in the batch and why.
    public struct Failure: Sendable, Equatable {
        public let index: Int
        public let error: SpillwayError
    }

    /// Transfers that completed successfully.
    public let completed: Int
    /// Failed transfers, in completion order (empty on success; allocates only when non-empty).
    public let failures: [Failure]

    public var succeeded: Bool { failures.isEmpty }

    /// Throws the first failure, if any.
    public func check() throws(SpillwayError) {
        if let first = failures.first { throw first.error }
    }
}

/// Which operations a registered region allows.
///
/// Why: a daemon's slabs are targets (`remote`: peers read and write them); a client's page
/// buffers are sources and sinks of its own transfers (`local`). Registering no more access
/// than needed keeps a leaked key from writing where only reads were meant.
public struct FabricAccess: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// FI_READ: the buffer receives the data of this endpoint's reads.
    public static let read = FabricAccess(rawValue: UInt64(FI_READ))
    /// FI_WRITE: the buffer is the source of this endpoint's writes.
    public static let write = FabricAccess(rawValue: UInt64(FI_WRITE))
    /// FI_REMOTE_READ: peers may read the buffer.
    public static let remoteRead = FabricAccess(rawValue: UInt64(FI_REMOTE_READ))
    /// FI_REMOTE_WRITE: peers may write the buffer.
    public static let remoteWrite = FabricAccess(rawValue: UInt64(FI_REMOTE_WRITE))

    /// A client's page buffer.
    public static let local: FabricAccess = [.read, .write]
    /// A daemon's slab.
    public static let remote: FabricAccess = [.remoteRead, .remoteWrite]
}
