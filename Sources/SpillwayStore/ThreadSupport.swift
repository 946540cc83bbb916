#if canImport(Glibc)
import Glibc
#endif
import SpillwayCore

/// One reusable `TierBatch` per thread, so a synchronous store call never allocates or locks
/// to get one. Batches are released by the thread-exit destructor.
enum ThreadBatch {
    /// I/Os per tier submission for batched gets and puts (a sliding window of
    /// `queueDepth` runs inside it on queueing tiers).
    static let capacity = 1024
    /// Pages per move round (demotion, promotion, prefetch).
    static let moveChunk = 64

    private static let batches = PerThread { TierBatch(capacity: capacity) }

    /// The calling thread's batch, emptied. Callers must finish with it before calling anything
    /// else that uses it (store operations are sequential per thread).
    @inline(__always)
    static func current() -> TierBatch {
        let batch = batches.value
        batch.reset()
        return batch
    }
}
