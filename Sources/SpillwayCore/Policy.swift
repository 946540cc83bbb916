/// What kind of data a page holds, as told by the caller on `put`. Policies use it to treat
/// pages differently (weights streamed once per forward pass vs. KV blocks reused by later
/// requests); the store itself never interprets it.
public enum PageClass: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// No information (the default): ordinary LRU treatment.
    case generic = 0
    /// A KV-cache block; `PageHints.order` is its depth in the prefix chain and
    /// `PageHints.parent` a digest of its parent block's key.
    case kvBlock = 1
    /// A chunk of model weights, streamed in layer order (`PageHints.order`).
    case weights = 2

    public var description: String {
        switch self {
        case .generic: "generic"
        case .kvBlock: "kvBlock"
        case .weights: "weights"
        }
    }
}

/// A page's class and class-specific hints, stored in its directory entry.
///
/// The directory entry is one cache line with six spare bytes, so the hints are deliberately
/// small: the class (8 bits), a 16-bit `order` (saturating) and a 24-bit `parent` digest. A KV
/// block's parent is stored as a digest of its key rather than the 128-bit key itself because
/// the full key does not fit; a policy can still recognise parent/child pairs
/// (`child.parent == PageHints.digest(of: parentKey)`), with a 1-in-2²⁴ chance of a false
/// match, harmless for a placement hint.
public struct PageHints: Sendable, Equatable, CustomStringConvertible {
    public var pageClass: PageClass
    /// `kvBlock`: depth in the prefix chain (0 = first block); `weights`: layer order
    /// (0 = first streamed). Values past 65,535 saturate.
    public var order: UInt16
    /// `kvBlock`: `digest(of:)` of the parent block's key (24 bits), 0 for a chain's first
    /// block. Otherwise 0.
    public var parent: UInt32

    /// The bits of `parent` the directory keeps.
    public static let parentMask: UInt32 = 0xFF_FFFF

    /// `parent` is truncated to its low 24 bits (what the directory stores), so hints read back
    /// from the store equal the ones given.
    public init(pageClass: PageClass = .generic, order: UInt16 = 0, parent: UInt32 = 0) {
        self.pageClass = pageClass
        self.order = order
        self.parent = parent & Self.parentMask
    }

    public static let generic = PageHints()

    /// A KV block at `depth` in its prefix chain whose parent block is stored under `parent`
    /// (nil for the first block). Depth saturates at 65,535; a negative depth is clamped to 0.
    public static func kvBlock(depth: Int, parent: PageKey?) -> PageHints {
        PageHints(pageClass: .kvBlock, order: saturated(depth), parent: parent.map(digest(of:)) ?? 0)
    }

    /// A weights chunk of the layer streamed `layerOrder`-th (saturating; negative clamps to 0).
    public static func weights(layerOrder: Int) -> PageHints {
        PageHints(pageClass: .weights, order: saturated(layerOrder))
    }

    /// The 24-bit digest stored for a parent key: the top bits of its mixed hash, never 0
    /// (0 means "no parent").
    public static func digest(of key: PageKey) -> UInt32 {
        let value = UInt32(truncatingIfNeeded: key.mixedHash >> 40)
        return value == 0 ? 1 : value
    }

    static func saturated(_ value: Int) -> UInt16 { UInt16(clamping: max(0, value)) }

    public var description: String {
        switch pageClass {
        case .generic: "generic"
        case .kvBlock: "kvBlock(depth \(order), parent \(parent))"
        case .weights: "weights(layer order \(order))"
        }
    }
}

/// What the directory knows about a page's use; the input of every policy decision.
public struct PageAccessStats: Sendable, Equatable {
    /// Logical time of the last access or store (the directory's access clock, not wall time).
    public var lastAccessTick: UInt64
    /// Number of accesses since the current version was stored (saturating).
    public var accessCount: UInt32
    public var length: Int
    /// The class and hints the page was stored with.
    public var hints: PageHints

    public init(lastAccessTick: UInt64, accessCount: UInt32, length: Int, hints: PageHints = .generic) {
        self.lastAccessTick = lastAccessTick
        self.accessCount = accessCount
        self.length = length
        self.hints = hints
    }
}

/// Placement, promotion and eviction decisions, pluggable per store.
///
/// The store does the mechanics (scanning a tier for candidates, moving bytes, keeping pinned
/// pages in place); a policy only ranks pages and answers yes/no questions, so a new policy
/// (LFU, ARC-like, prefix-aware for KV caches) is a small value type. Calls happen off the
/// per-page fast path: ranking during background reclaim, promotion only on lower-tier hits,
/// placement once per put (a switch on a few integers, no allocation).
public protocol PlacementPolicy: Sendable {
    /// Short name for logs, metrics and configuration (`policy = "lru"`).
    var name: String { get }

    /// Lower scores are colder: demoted (or, on the last tier, evicted) first.
    func retentionScore(_ stats: PageAccessStats, now: UInt64) -> UInt64

    /// Whether a hit on `tier` (> 0) should copy the page up to the top tier right away.
    func shouldPromote(_ stats: PageAccessStats, fromTier tier: Int) -> Bool

    /// The tier index where a newly stored page of `length` bytes goes first.
    func initialTier(forLength length: Int, tierCount: Int) -> Int

    /// The tier index where a newly stored page of `length` bytes with `hints` goes first.
    /// Defaults to `initialTier(forLength:tierCount:)` (policies that ignore classes).
    func initialTier(for hints: PageHints, length: Int, tierCount: Int) -> Int
}

extension PlacementPolicy {
    public func initialTier(for hints: PageHints, length: Int, tierCount: Int) -> Int {
        initialTier(forLength: length, tierCount: tierCount)
    }
}

/// Least recently used: the page untouched for longest goes first; every lower-tier hit is
/// promoted; new pages start at the top. Ignores page classes.
public struct LRUPolicy: PlacementPolicy {
    public init() {}
    public var name: String { "lru" }
    public func retentionScore(_ stats: PageAccessStats, now: UInt64) -> UInt64 { stats.lastAccessTick }
    public func shouldPromote(_ stats: PageAccessStats, fromTier tier: Int) -> Bool { true }
    public func initialTier(forLength length: Int, tierCount: Int) -> Int { 0 }
}

/// LRU for `generic` and `kvBlock` pages, with the rules weights streaming needs so it does not
/// flush the KV cache out of the top tier:
///
/// - `weights` pages are never promoted on a read. A streamer reads every chunk once per pass
///   into its own buffer; copying each into tier 0 as well would push out KV blocks that later
///   requests reuse, for bytes that will not be read again until the next pass.
/// - `weights` pages rank below every other page (the score's top bit is clear for them and
///   set for everything else), so right after use they are the first to be demoted or evicted;
///   LRU order holds within each group. Pinned pages are never candidates (the store skips them).
/// - New `weights` pages start on the second tier when there is one, for the same reason.
///
/// For `generic` pages it decides exactly as `LRUPolicy`.
public struct ClassAwareLRUPolicy: PlacementPolicy {
    public init() {}
    public var name: String { "class-aware-lru" }

    static let retainedBit: UInt64 = 1 << 63

    public func retentionScore(_ stats: PageAccessStats, now: UInt64) -> UInt64 {
        // The access clock counts one tick per operation, so it never reaches bit 63.
        stats.hints.pageClass == .weights ? stats.lastAccessTick : stats.lastAccessTick | Self.retainedBit
    }

    public func shouldPromote(_ stats: PageAccessStats, fromTier tier: Int) -> Bool {
        stats.hints.pageClass != .weights
    }

    public func initialTier(forLength length: Int, tierCount: Int) -> Int { 0 }

    public func initialTier(for hints: PageHints, length: Int, tierCount: Int) -> Int {
        hints.pageClass == .weights && tierCount > 1 ? 1 : 0
    }
}

/// The policies a store can be configured with by name (`policy = "…"`).
public enum PlacementPolicies {
    /// The policy used when none is named.
    public static let defaultName = "class-aware-lru"

    /// Every configurable name, default first.
    public static let names = ["class-aware-lru", "lru"]

    /// The policy called `name`; `invalidConfiguration` listing the available names otherwise.
    public static func named(_ name: String) throws(SpillwayError) -> any PlacementPolicy {
        switch name {
        case "class-aware-lru": return ClassAwareLRUPolicy()
        case "lru": return LRUPolicy()
        default:
            throw .invalidConfiguration("unknown policy '\(name)' (available: \(names.joined(separator: ", ")))")
        }
    }
}
