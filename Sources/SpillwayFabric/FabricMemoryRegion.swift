import CSpillwayFabric
import SpillwayCore
import Synchronization

/// A buffer registered with a fabric endpoint's domain (`fi_mr_reg`): its key, its local
/// descriptor and the grant a peer addresses it by.
///
/// Why: one-sided RMA touches only registered memory. A daemon registers each slab it maps to
/// a tenant (`FabricAccess.remote`) and hands that tenant `grant`; closing the region revokes
/// the key, after which peers' transfers naming it fail (the target refuses them) and read no
/// bytes. A client registers its page buffers once (`FabricAccess.local`) and names them as the
/// local side of every batch.
///
/// The buffer is the caller's: it must stay allocated until `close()` (or deinit). The region
/// keeps its endpoint alive. `@unchecked Sendable`: the libfabric region pointer is guarded by
/// `state`'s mutex, which a batch using the region as its local side holds for the batch, so
/// `close()` waits for that batch; the other fields are immutable.
public final class FabricMemoryRegion: @unchecked Sendable {
    /// The endpoint whose domain holds the registration.
    public let endpoint: FabricEndpoint
    /// The registered bytes.
    public let buffer: UnsafeMutableRawBufferPointer
    /// The access registered.
    public let access: FabricAccess
    /// What a peer needs to address this region: base (virtual address or 0), length, key.
    public let grant: FabricRegionGrant

    /// `@unchecked Sendable`: the region pointer is read and cleared only under `state`'s mutex.
    private struct State: @unchecked Sendable {
        var region: UnsafeMutablePointer<fid_mr>?
        let descriptor: UnsafeMutableRawPointer?
    }
    private let state: Mutex<State>

    init(endpoint: FabricEndpoint, region: UnsafeMutablePointer<fid_mr>, buffer: UnsafeMutableRawBufferPointer,
         access: FabricAccess, grant: FabricRegionGrant) {
        self.endpoint = endpoint
        self.buffer = buffer
        self.access = access
        self.grant = grant
        self.state = Mutex(State(region: region, descriptor: fi_mr_desc(region)))
    }

    deinit { close() }

    /// The key peers present (also in `grant`).
    public var key: UInt64 { grant.key }

    /// Whether `close()` has run.
    public var isClosed: Bool { state.withLock { $0.region == nil } }

    /// Closes the registration (`fi_close`): the key is revoked. Idempotent; waits for a batch
    /// that uses this region as its local side.
    public func close() {
        state.withLock { state in
            if let region = state.region {
                fi_close(spillway_fid_mr(region))
                state.region = nil
            }
        }
    }

    /// Runs `body` with the local descriptor while the registration stays open.
    func whileOpen<R: Sendable>(_ body: (UnsafeMutableRawPointer?) throws(SpillwayError) -> R) throws(SpillwayError) -> R {
        try state.withLock { (state) throws(SpillwayError) -> R in
            guard state.region != nil else { throw .invalidArgument("the local fabric memory region is closed") }
            return try body(state.descriptor)
        }
    }
}
