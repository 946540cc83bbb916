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

    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        let status = pthread_key_create(&key) { pointer in
            guard let pointer else { return }
            Unmanaged<TierBatch>.fromOpaque(pointer).release()
        }
        precondition(status == 0, "pthread_key_create failed: \(status)")
        return key
    }()

    /// The calling thread's batch, emptied. Callers must finish with it before calling anything
    /// else that uses it (store operations are sequential per thread).
    @inline(__always)
    static func current() -> TierBatch {
        if let pointer = pthread_getspecific(key) {
            let batch = Unmanaged<TierBatch>.fromOpaque(pointer).takeUnretainedValue()
            batch.reset()
            return batch
        }
        let batch = TierBatch(capacity: capacity)
        pthread_setspecific(key, Unmanaged.passRetained(batch).toOpaque())
        return batch
    }
}

/// A joinable OS thread running one closure (the store's background worker). A dedicated
/// thread rather than a Swift task: it blocks on tier I/O and must not starve the cooperative
/// pool of an engine that links Spillway.
final class BackgroundThread: Sendable {
    private final class Box {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }

    private let thread: pthread_t

    init(_ body: @escaping @Sendable () -> Void) {
        var thread = pthread_t()
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        let status = pthread_create(&thread, nil, { argument in
            let box = Unmanaged<Box>.fromOpaque(argument!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        precondition(status == 0, "pthread_create failed: \(status)")
        self.thread = thread
    }

    /// Waits for the thread to finish; from the thread itself (a store whose last reference
    /// was dropped by its own worker) it detaches instead, since a thread cannot join itself.
    func join() {
        if pthread_equal(thread, pthread_self()) != 0 {
            pthread_detach(thread)
        } else {
            pthread_join(thread, nil)
        }
    }
}
