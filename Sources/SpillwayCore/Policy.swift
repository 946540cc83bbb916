/// What the directory knows about a page's use; the input of every policy decision.
public struct PageAccessStats: Sendable, Equatable {
    /// Logical time of the last access or store (the directory's access clock, not wall time).
    public var lastAccessTick: UInt64
    /// Number of accesses since the current version was stored (saturating).
    public var accessCount: UInt32
    public var length: Int

    public init(lastAccessTick: UInt64, accessCount: UInt32, length: Int) {
        self.lastAccessTick = lastAccessTick
        self.accessCount = accessCount
        self.length = length
    }
}

/// Placement, promotion and eviction decisions, pluggable per store.
///
/// The store does the mechanics (scanning a tier for candidates, moving bytes, keeping pinned
/// pages in place); a policy only ranks pages and answers yes/no questions, so a new policy
/// (LFU, ARC-like, prefix-aware for KV caches) is a small value type. Calls happen off the
/// per-page fast path: ranking during background reclaim, promotion only on lower-tier hits.
public protocol PlacementPolicy: Sendable {
    /// Short name for logs, metrics and configuration (`policy = "lru"`).
    var name: String { get }

    /// Lower scores are colder: demoted (or, on the last tier, evicted) first.
    func retentionScore(_ stats: PageAccessStats, now: UInt64) -> UInt64

    /// Whether a hit on `tier` (> 0) should copy the page up to the top tier right away.
    func shouldPromote(_ stats: PageAccessStats, fromTier tier: Int) -> Bool

    /// The tier index where a newly stored page of `length` bytes goes first.
    func initialTier(forLength length: Int, tierCount: Int) -> Int
}

/// Least recently used: the page untouched for longest goes first; every lower-tier hit is
/// promoted; new pages start at the top.
public struct LRUPolicy: PlacementPolicy {
    public init() {}
    public var name: String { "lru" }
    public func retentionScore(_ stats: PageAccessStats, now: UInt64) -> UInt64 { stats.lastAccessTick }
    public func shouldPromote(_ stats: PageAccessStats, fromTier tier: Int) -> Bool { true }
    public func initialTier(forLength length: Int, tierCount: Int) -> Int { 0 }
}
