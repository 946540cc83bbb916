import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// Striped per-key locks that order everything that changes which version of a key a
/// persistent tier would recover: puts and removes take their keys' stripes (blocking, in
/// stripe order for a batch), moves, promotions and evictions only try them (and skip a key
/// that is busy), so the order of a key's journal records equals the order of its directory
/// commits, and a superseded copy's invalidation is made durable before the put or remove
/// that superseded it returns.
///
/// Why not finer: a stripe is a pthread mutex (TSan sees it); 4096 of them make two busy
/// keys collide rarely, and a holder that only tries other stripes can never deadlock.
///
/// `@unchecked Sendable`: the mutexes live in memory allocated in init and freed in deinit.
final class KeyLocks: @unchecked Sendable {
    static let stripeCount = 4096
    private let mutexes: UnsafeMutablePointer<pthread_mutex_t>

    init() {
        mutexes = .allocate(capacity: Self.stripeCount)
        for index in 0..<Self.stripeCount {
            (mutexes + index).initialize(to: pthread_mutex_t())
            pthread_mutex_init(mutexes + index, nil)
        }
    }

    deinit {
        for index in 0..<Self.stripeCount { pthread_mutex_destroy(mutexes + index) }
        mutexes.deallocate()
    }

    @inline(__always)
    static func stripe(_ key: PageKey) -> Int { Int(truncatingIfNeeded: key.mixedHash) & (stripeCount - 1) }

    func lock(stripe: Int) { pthread_mutex_lock(mutexes + stripe) }

    func tryLock(stripe: Int) -> Bool { pthread_mutex_trylock(mutexes + stripe) == 0 }

    func unlock(stripe: Int) { pthread_mutex_unlock(mutexes + stripe) }

    @inline(__always)
    func withLock<R, Failure: Error>(_ key: PageKey, _ body: () throws(Failure) -> R) throws(Failure) -> R {
        let stripe = Self.stripe(key)
        lock(stripe: stripe)
        defer { unlock(stripe: stripe) }
        return try body()
    }

    /// Locks the stripes of `keys` in ascending order (no deadlock between batches); returns
    /// them for `unlock(stripes:)`.
    func lock(_ keys: some Sequence<PageKey>) -> [Int] {
        let stripes = Array(Set(keys.map(Self.stripe))).sorted()
        for stripe in stripes { lock(stripe: stripe) }
        return stripes
    }

    func unlock(stripes: [Int]) {
        for stripe in stripes { unlock(stripe: stripe) }
    }
}

/// The stripes one mover holds (tried, never waited for).
struct HeldStripes {
    private(set) var stripes: [Int] = []

    /// True if `key`'s stripe is now held by this mover (newly or already).
    mutating func tryAcquire(_ key: PageKey, in locks: KeyLocks) -> Bool {
        let stripe = KeyLocks.stripe(key)
        if stripes.contains(stripe) { return true }
        guard locks.tryLock(stripe: stripe) else { return false }
        stripes.append(stripe)
        return true
    }

    mutating func releaseAll(in locks: KeyLocks) {
        locks.unlock(stripes: stripes)
        stripes.removeAll()
    }
}
