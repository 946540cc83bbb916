import Atomics
import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// Recorded reads waiting for the policy: a fixed set of bounded multi-producer rings, one
/// chosen per thread, drained in batches by whoever holds the tier's policy lock (Caffeine's
/// read buffer).
///
/// Why: a hit must not take a lock or allocate, yet the policy is a single-threaded structure.
/// A reader claims a ring position with one compare-and-swap on its ring's tail and stores the
/// page id there; the policy applies the ids later, in order per thread. Applying is the
/// expensive part (a few cache misses per event in the policy's structures), so it is kept off
/// the reader: a ring half full asks its owner's background worker to drain it; only a ring that
/// fills anyway is drained by the reader that finds it full (a try-lock, never a wait); if the
/// policy lock is busy then, the event is dropped and counted — recency is a hint, and a lost
/// touch costs a little hit ratio, never correctness.
///
/// `@unchecked Sendable`: `slots`, `tails` and `heads` are atomics in memory allocated at
/// init and freed at deinit; heads only move under the owner's policy lock (single consumer).
final class AccessBuffer: @unchecked Sendable {
    static let ringCount = 16
    static let ringCapacity = 4096
    private static let mask = ringCapacity - 1

    /// `ringCount × ringCapacity` entries; 0 = empty (ids are never 0).
    private let slots: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    /// Per ring: next position to claim (producers), next to consume (the drainer). Each on its
    /// own cache line so producers of different rings do not share one.
    private let tails: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>
    private let heads: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>
    private static let lineStride = 8
    let dropped = ManagedAtomic<Int>(0)

    init() {
        slots = .allocate(capacity: Self.ringCount * Self.ringCapacity)
        slots.initialize(repeating: .init(0), count: Self.ringCount * Self.ringCapacity)
        tails = .allocate(capacity: Self.ringCount * Self.lineStride)
        tails.initialize(repeating: .init(0), count: Self.ringCount * Self.lineStride)
        heads = .allocate(capacity: Self.ringCount * Self.lineStride)
        heads.initialize(repeating: .init(0), count: Self.ringCount * Self.lineStride)
    }

    deinit {
        slots.deallocate()
        tails.deallocate()
        heads.deallocate()
    }

    /// The calling thread's ring: threads are numbered on first use, round robin, so one
    /// thread's events stay in order and different threads rarely share a tail.
    @inline(__always)
    static func ringForCurrentThread() -> Int {
        if let value = pthread_getspecific(threadRingKey) { return (Int(bitPattern: value) - 1) & (ringCount - 1) }
        let ring = nextThreadRing.loadThenWrappingIncrement(ordering: .relaxed)
        pthread_setspecific(threadRingKey, UnsafeRawPointer(bitPattern: ring + 1))
        return ring & (ringCount - 1)
    }

    private static let threadRingKey: pthread_key_t = {
        var key = pthread_key_t()
        let status = pthread_key_create(&key, nil)
        precondition(status == 0, "pthread_key_create failed: \(status)")
        return key
    }()
    private static let nextThreadRing = ManagedAtomic<Int>(0)

    /// Appends `event` (nonzero) to `ring`: `.full` if the ring is full, `.halfFull` when this
    /// event is the one that filled it to half (once per half-ring of events: time to drain).
    enum AppendOutcome { case appended, halfFull, full }

    @inline(__always)
    func tryAppend(_ event: UInt64, ring: Int) -> AppendOutcome {
        let tail = UnsafeAtomic<Int>(at: tails + ring * Self.lineStride)
        let head = UnsafeAtomic<Int>(at: heads + ring * Self.lineStride)
        var position = tail.load(ordering: .relaxed)
        while true {
            guard position - head.load(ordering: .acquiring) < Self.ringCapacity else { return .full }
            let (exchanged, original) = tail.weakCompareExchange(expected: position, desired: position + 1, ordering: .relaxed)
            if exchanged { break }
            position = original
        }
        UnsafeAtomic<UInt64>(at: slots + ring * Self.ringCapacity + (position & Self.mask)).store(event, ordering: .releasing)
        return position - head.load(ordering: .relaxed) == Self.ringCapacity / 2 ? .halfFull : .appended
    }

    /// Hands every published event to `apply`, ring by ring, in order within a ring. Only one
    /// drainer at a time (the caller holds the policy lock). An event whose producer claimed
    /// its position but has not stored it yet ends that ring's drain; it is taken next time.
    func drain(_ apply: (UInt64) -> Void) {
        for ring in 0..<Self.ringCount {
            let tail = UnsafeAtomic<Int>(at: tails + ring * Self.lineStride).load(ordering: .acquiring)
            let headAtomic = UnsafeAtomic<Int>(at: heads + ring * Self.lineStride)
            var head = headAtomic.load(ordering: .relaxed)
            guard head != tail else { continue }
            while head != tail {
                let slot = UnsafeAtomic<UInt64>(at: slots + ring * Self.ringCapacity + (head & Self.mask))
                let event = slot.exchange(0, ordering: .acquiring)
                if event == 0 { break }
                apply(event)
                head += 1
            }
            headAtomic.store(head, ordering: .releasing)
        }
    }
}
