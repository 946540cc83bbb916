#if canImport(Glibc)
import Glibc
#endif

/// A value behind a pthread mutex; the lock every Spillway structure uses.
///
/// Why not `Synchronization.Mutex`: on Linux its contended path goes through PI futexes inside
/// the (uninstrumented) standard library, so ThreadSanitizer cannot see the ordering and
/// reports every contended critical section as a race. pthread mutexes are intercepted by
/// TSan, so `swift test --sanitize=thread` checks Spillway's locking for real. The uncontended
/// cost is the same single compare-and-swap.
///
/// `@unchecked Sendable`: `value` is only reached through `withLock`, under `mutex`. The value
/// lives behind a pointer, not in a stored `var`, so access needs no dynamic exclusivity check.
public final class Locked<Value: ~Copyable>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let value: UnsafeMutablePointer<Value>

    public init(_ initial: consuming Value) {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        let status = pthread_mutex_init(mutex, nil)
        precondition(status == 0, "pthread_mutex_init failed: \(status)")
        value = .allocate(capacity: 1)
        value.initialize(to: initial)
    }

    deinit {
        value.deinitialize(count: 1)
        value.deallocate()
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    @inline(__always)
    public func withLock<Result: ~Copyable, Failure: Error>(
        _ body: (inout Value) throws(Failure) -> Result
    ) throws(Failure) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value.pointee)
    }
}
