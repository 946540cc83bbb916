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

    /// Runs `body` under the lock if it is free now; nil (without running it) if another
    /// thread holds it. For callers that must never wait (a daemon's janitor).
    @inline(__always)
    public func withTryLock<Result>(_ body: (inout Value) -> Result) -> Result? {
        guard pthread_mutex_trylock(mutex) == 0 else { return nil }
        defer { pthread_mutex_unlock(mutex) }
        return body(&value.pointee)
    }
}

/// A pthread reader–writer lock that prefers writers (a steady stream of readers cannot starve
/// a writer). Readers are I/O batches, the rare writer is a structural change under them (the
/// remote tier moving a slab to another daemon); the uncontended read path is one atomic.
///
/// `@unchecked Sendable`: the lock lives behind a pointer allocated once, and pthread makes
/// it safe to use from any thread.
public final class ReadWriteLock: @unchecked Sendable {
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    public init() {
        lock = .allocate(capacity: 1)
        lock.initialize(to: pthread_rwlock_t())
        var attributes = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attributes)
        // Readers never nest, so the non-recursive writer preference cannot deadlock.
        pthread_rwlockattr_setkind_np(&attributes, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        let status = pthread_rwlock_init(lock, &attributes)
        pthread_rwlockattr_destroy(&attributes)
        precondition(status == 0, "pthread_rwlock_init failed: \(status)")
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    @inline(__always)
    public func withReadLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    @inline(__always)
    public func withWriteLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }
}
