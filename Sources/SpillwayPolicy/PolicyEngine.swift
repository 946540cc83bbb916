import Atomics
import SpillwayCore

/// The store's policy at run time: one `BlockCachePolicy` per tier (the candidate index —
/// which pages a tier holds, in the order they should leave), the reads recorded for them, and
/// the measured tier costs behind cost-aware demotion. The store reports what happened to
/// pages (`recordRead`, `inserted`, `removed`) and asks what to do (`admits`, `victims`,
/// `demotionTarget`); it never ranks pages itself.
///
/// Memory is bounded and allocated at init: per tier, a policy of the tier's capacity in pages
/// plus a key table of the same size (≈ 100 bytes per slot in all), and 16 × 256 read events.
/// A read takes no lock and allocates nothing (`AccessBuffer`); decisions take the tier's
/// policy lock, which also applies the pending reads first, so the policy sees one thread's
/// reads in order, before that thread's next put.
public final class PolicyEngine: Sendable {
    public let policy: StorePolicy
    private let states: [Locked<TierPolicyState>]
    private let buffers: [AccessBuffer]
    private let costs: [TierCostCell]
    /// Called (from a reader) when a read ring is half full: the owner's worker should
    /// `drainReads()` soon, so readers never pay for applying events.
    private let onBacklog: (@Sendable () -> Void)?
    /// Per tier: whether its policy admits every page (no admission question to lock for).
    private let admitsEverything: [Bool]
    private static let expireFlag: UInt64 = 1 << 63

    /// - Parameter tiers: per tier, its capacity in pages (its slots) and its nominal per-page
    ///   latency (the cost model's starting point).
    public init(policy: StorePolicy, tiers: [(capacity: Int, nominalNanoseconds: Int)], onBacklog: (@Sendable () -> Void)? = nil) {
        self.policy = policy
        self.onBacklog = onBacklog
        let policies = tiers.map { policy.makeEviction(capacity: max(1, $0.capacity)) }
        admitsEverything = policies.map(\.admitsEverything)
        states = zip(policies, tiers).map { Locked(TierPolicyState(policy: $0, capacity: max(1, $1.capacity))) }
        buffers = tiers.map { _ in AccessBuffer() }
        costs = tiers.map { TierCostCell(nominal: Double(max(1, $0.nominalNanoseconds))) }
    }

    public var tierCount: Int { states.count }

    // MARK: Reads (lock-free)

    /// A page was read from `tier`. Lock-free: the event waits in a ring until the next
    /// decision on that tier applies it (or the ring fills and the reader drains it, if the
    /// lock is free; otherwise the event is dropped and counted).
    @inline(__always)
    public func recordRead(_ key: PageKey, tier: Int, hints: PageHints) {
        record(key.policyID | (policy.expiresAfterRead(hints) ? Self.expireFlag : 0), tier: tier)
    }

    /// A page stored again on the tier that holds it: a reference, recorded like a read.
    @inline(__always)
    public func recordRewrite(_ key: PageKey, tier: Int) {
        record(key.policyID, tier: tier)
    }

    @inline(__always)
    private func record(_ event: UInt64, tier: Int) {
        let ring = AccessBuffer.ringForCurrentThread()
        switch buffers[tier].tryAppend(event, ring: ring) {
        case .appended: return
        case .halfFull: onBacklog?()
        case .full: recordReadSlow(event, ring: ring, tier: tier)
        }
    }

    @inline(never)
    private func recordReadSlow(_ event: UInt64, ring: Int, tier: Int) {
        if states[tier].withTryLock({ drain(&$0, tier: tier) }) != nil, buffers[tier].tryAppend(event, ring: ring) != .full { return }
        buffers[tier].dropped.wrappingIncrement(ordering: .relaxed)
    }

    /// Applies every tier's pending read events now (the store's background worker, when a
    /// ring reports a backlog, and every maintenance round).
    public func drainReads() {
        for tier in states.indices { states[tier].withLock { drain(&$0, tier: tier) } }
    }

    private func drain(_ state: inout TierPolicyState, tier: Int) {
        buffers[tier].drain { event in state.apply(event & ~Self.expireFlag, expire: event & Self.expireFlag != 0) }
    }

    // MARK: Decisions and bookkeeping (under the tier's policy lock)

    /// Whether `tier`'s policy admits a new page (a page already on the tier is admitted).
    /// No lock for policies that admit everything (the insert then takes the reference's tick).
    public func admits(_ key: PageKey, hints: PageHints, tier: Int) -> Bool {
        if admitsEverything[tier] { return true }
        return states[tier].withLock { state in
            drain(&state, tier: tier)
            return state.admits(key.policyID, hints: hints)
        }
    }

    /// A page now lives on `tier` (a put committed there, or a move arrived). A page the tier
    /// already tracks counts as referenced again.
    public func inserted(_ key: PageKey, hints: PageHints, tier: Int) {
        states[tier].withLock { state in
            drain(&state, tier: tier)
            state.insert(key, hints: hints)
        }
    }

    /// Hands `tier`'s policy a page it does not track (a victim that could not leave); false
    /// (and no change: not a reference) if it already does.
    @discardableResult
    public func track(_ key: PageKey, hints: PageHints, tier: Int) -> Bool {
        states[tier].withLock { state in
            guard !state.isTracked(key.policyID) else { return false }
            state.insert(key, hints: hints)
            return true
        }
    }

    /// A page left `tier` other than as one of its `victims` (removed, moved, overwritten).
    public func removed(_ key: PageKey, tier: Int) {
        states[tier].withLock { state in state.remove(key.policyID) }
    }

    /// Up to `count` pages that should leave `tier` next, taken out of its policy (the store
    /// moves or drops them, and hands back with `inserted` any it could not).
    public func victims(tier: Int, count: Int) -> [PageKey] {
        states[tier].withLock { state in
            drain(&state, tier: tier)
            return state.takeVictims(count)
        }
    }

    /// The policy clock of `tier` after applying pending reads (tests: one tick per reference).
    func clock(tier: Int) -> Int { states[tier].withLock { state in drain(&state, tier: tier); return state.clock } }

    /// Pages `tier`'s policy tracks (tests, diagnostics).
    public func trackedCount(tier: Int) -> Int { states[tier].withLock { $0.tracked } }

    /// Read events dropped because a ring was full and its tier busy.
    public func droppedReads(tier: Int) -> Int { buffers[tier].dropped.load(ordering: .relaxed) }

    // MARK: Cost-aware demotion

    /// Records what moving or reading `pages` pages on `tier` cost in all.
    @inline(__always)
    public func observe(tier: Int, write: Bool, nanoseconds: UInt64, pages: Int) {
        guard pages > 0 else { return }
        costs[tier].observe(write: write, perPage: Double(nanoseconds) / Double(pages))
    }

    /// `count` pages demoted out of `tier` were read again below it (the reuse estimate's numerator).
    @inline(__always)
    public func noteLowerTierHit(below tier: Int, count: Int = 1) {
        costs[tier].reusedAfterDemotion.wrappingIncrement(by: count, ordering: .relaxed)
    }

    /// Where pages leaving `tier` go: by the configured rule; nil = the last tier (drop).
    /// `isFull(t)`: tier `t` is at or above its high watermark.
    public func demotionTarget(from tier: Int, isFull: (Int) -> Bool) -> Int? {
        guard tier + 1 < costs.count else { return nil }
        costs[tier].demoted.wrappingIncrement(ordering: .relaxed)
        guard policy.demotion == .costAware, tier + 2 < costs.count else { return tier + 1 }
        var tierCosts: [DemotionPlanner.TierCost] = []
        tierCosts.reserveCapacity(costs.count)
        for index in costs.indices {
            tierCosts.append(DemotionPlanner.TierCost(readNanoseconds: costs[index].read, writeNanoseconds: costs[index].write,
                                                      isFull: index > tier && isFull(index)))
        }
        return DemotionPlanner.target(from: tier, costs: tierCosts, reuseProbability: costs[tier].reuseProbability)
    }

    /// The cost model's current view of `tier` (diagnostics, tests).
    public func cost(tier: Int) -> (readNanoseconds: Double, writeNanoseconds: Double, reuseProbability: Double) {
        (costs[tier].read, costs[tier].write, costs[tier].reuseProbability)
    }
}

/// One tier's measured costs: exponentially weighted per-page read and write times, and how
/// often pages demoted out of it were read again. Relaxed atomics: racing updates may lose
/// one sample, harmless for an average.
final class TierCostCell: Sendable {
    private let readBits: ManagedAtomic<UInt64>
    private let writeBits: ManagedAtomic<UInt64>
    let demoted = ManagedAtomic<Int>(0)
    let reusedAfterDemotion = ManagedAtomic<Int>(0)
    private static let weight = 0.05

    init(nominal: Double) {
        readBits = ManagedAtomic(nominal.bitPattern)
        writeBits = ManagedAtomic(nominal.bitPattern)
    }

    var read: Double { Double(bitPattern: readBits.load(ordering: .relaxed)) }
    var write: Double { Double(bitPattern: writeBits.load(ordering: .relaxed)) }

    /// Reads per demotion, with a prior of one read in two demotions until there are data.
    var reuseProbability: Double {
        let demoted = Double(self.demoted.load(ordering: .relaxed))
        let reused = Double(reusedAfterDemotion.load(ordering: .relaxed))
        return min(1, (reused + 8) / (demoted + 16))
    }

    func observe(write: Bool, perPage: Double) {
        guard perPage.isFinite, perPage >= 0 else { return }
        let cell = write ? writeBits : readBits
        let old = Double(bitPattern: cell.load(ordering: .relaxed))
        cell.store((old + Self.weight * (perPage - old)).bitPattern, ordering: .relaxed)
    }
}

/// One tier's policy state; only touched under its `Locked` in `PolicyEngine`.
///
/// `policy` ranks page ids; the key table maps an id back to its key (victims are keys) and
/// keeps each page's parent and depth, which prefix-aware policies want on every touch.
struct TierPolicyState {
    let policy: any BlockCachePolicy
    let capacity: Int
    private var index: BlockIndex
    private var keys: [PageKey]
    private var parents: [UInt64]
    private var depths: [Int32]
    private var free: FreeSlots
    /// The policy's logical clock: one tick per reference (a touch, or an admission question
    /// and the insert that follows it), as in the simulator.
    private(set) var clock = 0
    private var lastAdmission: (id: UInt64, now: Int) = (0, 0)
    /// Pages read with an expire hint (weights): offered as victims before the policy's own.
    private var expired: [UInt64]
    private var expiredHead = 0
    private var expiredCount = 0
    /// Pages the policy gave up while making room for an insert (the table was full of ids
    /// the store no longer has here): offered as victims first, so none is lost track of.
    private var displaced: [PageKey]

    init(policy: any BlockCachePolicy, capacity: Int) {
        self.policy = policy
        self.capacity = capacity
        index = BlockIndex(capacity: capacity)
        keys = Array(repeating: PageKey(0), count: capacity)
        parents = Array(repeating: 0, count: capacity)
        depths = Array(repeating: 0, count: capacity)
        free = FreeSlots(count: capacity)
        expired = Array(repeating: 0, count: 256)
        displaced = []
        displaced.reserveCapacity(16)
    }

    var tracked: Int { capacity - free.count }

    func isTracked(_ id: UInt64) -> Bool { index.find(id) != nil }

    @inline(__always)
    private static func parent(_ hints: PageHints) -> UInt64? { hints.parent == 0 ? nil : hints.parent }

    @inline(__always)
    private static func depth(_ hints: PageHints) -> Int { hints.pageClass == .kvBlock ? Int(hints.order) : 0 }

    mutating func apply(_ id: UInt64, expire: Bool) {
        guard let slot = index.find(id) else { return }
        if expire {
            guard expiredCount < expired.count else { return }
            expired[(expiredHead + expiredCount) % expired.count] = id
            expiredCount += 1
            return
        }
        let now = clock
        clock += 1
        _ = policy.touch(id, parent: parents[slot] == 0 ? nil : parents[slot], depth: Int(depths[slot]), now: now)
    }

    mutating func admits(_ id: UInt64, hints: PageHints) -> Bool {
        if index.find(id) != nil { return true }
        let now = clock
        clock += 1
        lastAdmission = (id, now)
        return policy.admits(id, parent: Self.parent(hints), depth: Self.depth(hints), now: now)
    }

    mutating func insert(_ key: PageKey, hints: PageHints) {
        let id = key.policyID
        if let slot = index.find(id) {
            parents[slot] = hints.parent
            depths[slot] = Int32(Self.depth(hints))
            let now = clock
            clock += 1
            _ = policy.touch(id, parent: Self.parent(hints), depth: Self.depth(hints), now: now)
            return
        }
        let now: Int
        if lastAdmission.id == id {
            now = lastAdmission.now
            lastAdmission = (0, 0)
        } else {
            now = clock
            clock += 1
        }
        if free.isEmpty || policy.residentCount >= policy.capacityBlocks, let gone = policy.evict(), let key = forget(gone) {
            // Only ids of pages that already left without being reported can fill the table
            // (the tier holds at most `capacity` pages): hand it back as a victim anyway.
            displaced.append(key)
        }
        guard let slot = free.take() else { return }
        keys[slot] = key
        parents[slot] = hints.parent
        depths[slot] = Int32(Self.depth(hints))
        index.set(id, slot)
        policy.insert(id, parent: Self.parent(hints), depth: Self.depth(hints), now: now)
    }

    mutating func remove(_ id: UInt64) {
        guard let slot = index.find(id) else { return }
        policy.remove(id)
        index.remove(id)
        free.give(slot)
    }

    /// Removes a tracked id from the table (the policy already dropped it); its key.
    private mutating func forget(_ id: UInt64) -> PageKey? {
        guard let slot = index.find(id) else { return nil }
        index.remove(id)
        free.give(slot)
        return keys[slot]
    }

    mutating func takeVictims(_ count: Int) -> [PageKey] {
        var victims: [PageKey] = []
        victims.reserveCapacity(min(count, 4096))
        while victims.count < count, let key = displaced.popLast() { victims.append(key) }
        while victims.count < count, expiredCount > 0 {
            let id = expired[expiredHead]
            expiredHead = (expiredHead + 1) % expired.count
            expiredCount -= 1
            guard index.find(id) != nil else { continue }
            policy.remove(id)
            if let key = forget(id) { victims.append(key) }
        }
        while victims.count < count, let id = policy.evict() {
            if let key = forget(id) { victims.append(key) }
        }
        return victims
    }
}
