import SpillwayCore

/// The decisions a `TieredStore` asks of its policy, by name (`policy = "…"` in configuration).
///
/// - **Eviction and admission**: which page leaves a tier next, and whether a new page is worth
///   a tier at all — one `BlockCachePolicy` per tier (`makeEviction`), the very code
///   `spillway replay --simulate` runs, driven by `PolicyEngine`.
/// - **Placement**: the tier a new page enters (`initialTier`).
/// - **Promotion**: whether a hit below the top tier copies the page up (`shouldPromote`).
/// - **Demotion target**: where a page leaving a tier goes (`DemotionPlanner`).
/// - **Prefetch**: what to bring up before it is asked for (`PrefetchPolicy`, fed by the store).
///
/// Class rules (`classAware`, on for every name but `lru`), for weights streaming, which reads
/// every chunk once per forward pass: a `weights` page is placed on the second tier, never
/// promoted on a read (copying it into tier 0 would push out KV blocks later requests reuse),
/// and expires right after it is read (first to leave its tier), unless pinned.
public struct StorePolicy: Sendable, Equatable, CustomStringConvertible {
    /// The eviction/admission algorithm of every tier.
    public var eviction: PolicyKind
    public var classAware: Bool
    public var demotion: DemotionRule

    public init(eviction: PolicyKind, classAware: Bool = true, demotion: DemotionRule = .costAware) throws(SpillwayError) {
        guard eviction.runsInStore else {
            throw .invalidConfiguration("policy '\(eviction.rawValue)' needs the future and only runs in `spillway replay --simulate`")
        }
        self.eviction = eviction
        self.classAware = classAware
        self.demotion = demotion
    }

    /// The configuration name: the eviction algorithm's (`class-aware-lru` for LRU with the
    /// class rules, to tell it from plain `lru`).
    public var name: String {
        eviction == .lru && classAware ? "class-aware-lru" : eviction.rawValue
    }

    public var description: String { "\(name) (demotion \(demotion.rawValue))" }

    /// The policy used when none is named: the one measured never below LRU, in hit ratio or
    /// prefix hit ratio, on both Mooncake traces tried (docs/policies.md); the others that
    /// beat it on one trace lose badly on the other.
    public static let defaultName = PolicyKind.prefixLRU.rawValue

    /// Every configurable name, default first.
    public static var names: [String] {
        [defaultName] + ["class-aware-lru"] + PolicyKind.allCases.filter(\.runsInStore).map(\.rawValue).filter { $0 != defaultName }
    }

    public static var `default`: StorePolicy { try! named(defaultName) }

    /// The policy called `name` (and `demotion`, default cost-aware); `invalidConfiguration`
    /// listing the available names otherwise.
    public static func named(_ name: String, demotion: DemotionRule = .costAware) throws(SpillwayError) -> StorePolicy {
        if name == "class-aware-lru" { return try StorePolicy(eviction: .lru, classAware: true, demotion: demotion) }
        guard let kind = PolicyKind(rawValue: name) else {
            throw .invalidConfiguration("unknown policy '\(name)' (available: \(names.joined(separator: ", ")))")
        }
        return try StorePolicy(eviction: kind, classAware: kind != .lru, demotion: demotion)
    }

    /// A fresh eviction policy for a tier of `capacity` pages.
    public func makeEviction(capacity: Int) -> any BlockCachePolicy {
        eviction.make(capacityBlocks: capacity, trace: BlockTrace())
    }

    /// The tier a new page with `hints` enters first.
    @inline(__always)
    public func initialTier(for hints: PageHints, tierCount: Int) -> Int {
        classAware && hints.pageClass == .weights && tierCount > 1 ? 1 : 0
    }

    /// Whether a hit on `tier` (> 0) copies the page up to the top tier.
    @inline(__always)
    public func shouldPromote(_ hints: PageHints, fromTier tier: Int) -> Bool {
        !(classAware && hints.pageClass == .weights)
    }

    /// The prefetcher for a stream of `pageClass` pages read in order, keeping at most `depth`
    /// positions ahead. With the class rules, a `weights` stream is known to go forward in
    /// layer order (its hints say so), so it gets layer-ahead readahead at once (next-N);
    /// any other stream (per-layer KV, generic pages, or weights without class rules) must show
    /// its trend first: Leap's majority vote, its window adapting to how many prefetches are used.
    public func makePrefetcher(for pageClass: PageClass, depth: Int) -> any PrefetchPolicy {
        if classAware && pageClass == .weights { return NextNPrefetcher(depth: max(1, depth), streamSlots: 4) }
        return LeapPrefetcher(streamSlots: 16, maxWindow: max(1, depth))
    }

    /// Whether a page becomes its tier's first eviction candidate once read.
    @inline(__always)
    public func expiresAfterRead(_ hints: PageHints) -> Bool {
        classAware && hints.pageClass == .weights
    }
}

/// Where a page leaving a tier goes.
public enum DemotionRule: String, Sendable, CaseIterable {
    /// Always the next tier down (the last tier drops).
    case nextTier = "next-tier"
    /// The lower tier with the lowest expected cost for the page, from measured latencies
    /// (`DemotionPlanner`).
    case costAware = "cost-aware"
}

/// Cost-aware demotion: a page leaving tier `source` goes to the lower tier `t` that minimises
///
///     write(t) + p · read(t) + (t is full ? write(t + 1) : 0)
///
/// where `write`/`read` are the tier's measured per-page costs (moving the page there now,
/// reading it back later), `p` the measured probability that a page demoted from `source` is
/// read again before it leaves the lower tiers, and the last term the cascade a full tier pays
/// (its own victim moves on). So pages that are rarely read again skip a tier that is costly
/// to write (an erasure-coded remote tier encodes and fans out) for one that is cheap to write;
/// pages that come back go where reading them is cheapest. Ties go to the nearer tier, which
/// is also what happens before anything is measured (every tier starts at its descriptor's
/// nominal latency for both).
public struct DemotionPlanner: Sendable {
    public struct TierCost: Sendable, Equatable {
        public var readNanoseconds: Double
        public var writeNanoseconds: Double
        /// At or above its high watermark: a demotion into it pushes one of its pages further.
        public var isFull: Bool

        public init(readNanoseconds: Double, writeNanoseconds: Double, isFull: Bool) {
            self.readNanoseconds = readNanoseconds
            self.writeNanoseconds = writeNanoseconds
            self.isFull = isFull
        }
    }

    /// The target tier for a page leaving `source` (> source), or nil when `source` is last.
    public static func target(from source: Int, costs: [TierCost], reuseProbability p: Double) -> Int? {
        guard source + 1 < costs.count else { return nil }
        let p = min(1, max(0, p.isFinite ? p : 0))
        var best = source + 1
        var bestCost = Double.infinity
        for tier in (source + 1)..<costs.count {
            var cost = costs[tier].writeNanoseconds + p * costs[tier].readNanoseconds
            if costs[tier].isFull, tier + 1 < costs.count { cost += costs[tier + 1].writeNanoseconds }
            // Strictly better only: ties (and near-ties within 5 %, measurement noise) keep the nearer tier.
            if cost < bestCost * 0.95 {
                best = tier
                bestCost = cost
            }
        }
        return best
    }
}
