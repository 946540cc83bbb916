import Atomics
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
/// A stripe also records its holder's thread, so a put that must evict to make room can
/// evict a page whose key shares its own stripe (it already excludes everyone else from that
/// stripe) instead of skipping it: skipping would let one key in 4,096 change which page the
/// policy evicts.
///
/// `@unchecked Sendable`: the mutexes and owner words live in memory allocated in init and
/// freed in deinit; an owner word is written only by the thread holding its stripe.
final class KeyLocks: @unchecked Sendable {
    static let stripeCount = 4096
    private let mutexes: UnsafeMutablePointer<pthread_mutex_t>
    private let owners: UnsafeMutablePointer<UnsafeAtomic<UInt>.Storage>
    /// Per stripe: the key a single put holds it for (`withLock`), valid only while the stripe's
    /// owner is the reading thread (only the owner writes it, so only the owner may read it).
    private let heldKeys: UnsafeMutablePointer<(key: PageKey, valid: Bool)>

    init() {
        mutexes = .allocate(capacity: Self.stripeCount)
        owners = .allocate(capacity: Self.stripeCount)
        owners.initialize(repeating: .init(0), count: Self.stripeCount)
        heldKeys = .allocate(capacity: Self.stripeCount)
        heldKeys.initialize(repeating: (PageKey(0), false), count: Self.stripeCount)
        for index in 0..<Self.stripeCount {
            (mutexes + index).initialize(to: pthread_mutex_t())
            pthread_mutex_init(mutexes + index, nil)
        }
    }

    deinit {
        for index in 0..<Self.stripeCount { pthread_mutex_destroy(mutexes + index) }
        mutexes.deallocate()
        owners.deallocate()
        heldKeys.deallocate()
    }

    @inline(__always)
    private static var currentThread: UInt { UInt(bitPattern: Int(bitPattern: UInt(pthread_self()))) }

    @inline(__always)
    private func owner(_ stripe: Int) -> UnsafeAtomic<UInt> { UnsafeAtomic(at: owners + stripe) }

    /// Whether the calling thread holds `stripe` (a racy read by others can never show their
    /// own thread: only the holder writes its id, and clears it before unlocking).
    @inline(__always)
    func isHeldByCurrentThread(stripe: Int) -> Bool { owner(stripe).load(ordering: .relaxed) == Self.currentThread }

    @inline(__always)
    static func stripe(_ key: PageKey) -> Int { Int(truncatingIfNeeded: key.mixedHash) & (stripeCount - 1) }

    func lock(stripe: Int) {
        pthread_mutex_lock(mutexes + stripe)
        owner(stripe).store(Self.currentThread, ordering: .relaxed)
    }

    func tryLock(stripe: Int) -> Bool {
        guard pthread_mutex_trylock(mutexes + stripe) == 0 else { return false }
        owner(stripe).store(Self.currentThread, ordering: .relaxed)
        return true
    }

    func unlock(stripe: Int) {
        owner(stripe).store(0, ordering: .relaxed)
        pthread_mutex_unlock(mutexes + stripe)
    }

    /// For a mover that never waits: locks `stripe` if it is free (true: the caller unlocks),
    /// or reports that the calling thread already holds it (`owned`: proceed, do not unlock);
    /// nil if another thread holds it.
    @inline(__always)
    func tryLockUnlessOwned(stripe: Int) -> (locked: Bool, owned: Bool)? {
        if isHeldByCurrentThread(stripe: stripe) { return (false, true) }
        return tryLock(stripe: stripe) ? (true, false) : nil
    }

    @inline(__always)
    func withLock<R, Failure: Error>(_ key: PageKey, _ body: () throws(Failure) -> R) throws(Failure) -> R {
        let stripe = Self.stripe(key)
        lock(stripe: stripe)
        heldKeys[stripe] = (key, true)
        defer {
            heldKeys[stripe].valid = false
            unlock(stripe: stripe)
        }
        return try body()
    }

    /// Whether the calling thread holds `key`'s stripe for a change of `key` itself (a single
    /// put or remove): then it may move that key's current copy out of the way (a put making
    /// room can demote its own old version instead of failing for want of space).
    @inline(__always)
    func isHeldByCurrentThread(for key: PageKey) -> Bool {
        let stripe = Self.stripe(key)
        return isHeldByCurrentThread(stripe: stripe) && heldKeys[stripe].valid && heldKeys[stripe].key == key
    }

    /// Locks the stripes of `keys` in ascending order (no deadlock between batches); returns
    /// them for `unlock(stripes:)`.
    /// Runs `body` holding the stripes of `count` keys, each once, taken in ascending order
    /// (so two batches never deadlock), without allocating: the stripes are marked in a
    /// bitmap on the stack (4096 bits) and walked in order.
    func withLocked<R>(count: Int, key: (Int) -> PageKey, _ body: () -> R) -> R {
        withUnsafeTemporaryAllocation(of: UInt64.self, capacity: Self.stripeCount / 64) { words in
            words.initialize(repeating: 0)
            for index in 0..<count {
                let stripe = Self.stripe(key(index))
                words[stripe >> 6] |= 1 << UInt64(stripe & 63)
            }
            func each(_ action: (Int) -> Void) {
                for word in 0..<words.count {
                    var bits = words[word]
                    while bits != 0 {
                        action(word << 6 | bits.trailingZeroBitCount)
                        bits &= bits &- 1
                    }
                }
            }
            each { lock(stripe: $0) }
            defer { each { unlock(stripe: $0) } }
            return body()
        }
    }
}

/// The stripes one mover holds (tried, never waited for).
struct HeldStripes {
    private(set) var stripes: [Int] = []

    /// True if `key`'s stripe is now held by this mover (newly or already).
    mutating func tryAcquire(_ key: PageKey, in locks: KeyLocks) -> Bool {
        let stripe = KeyLocks.stripe(key)
        if stripes.contains(stripe) { return true }
        // A single put making room may move its own key's current copy (it holds the stripe for
        // exactly that key, and commits after the move). Any other stripe this thread holds is
        // not taken: a batch put may have retired the key's persistent copy already.
        if locks.isHeldByCurrentThread(for: key) { return true }
        guard locks.tryLock(stripe: stripe) else { return false }
        stripes.append(stripe)
        return true
    }

    mutating func releaseAll(in locks: KeyLocks) {
        for stripe in stripes { locks.unlock(stripe: stripe) }
        stripes.removeAll(keepingCapacity: true)
    }
}
