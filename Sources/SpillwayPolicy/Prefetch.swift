/// Prefetching for page streams: what a prefetcher is told about each access, what it answers,
/// and the two baselines (none, next-N readahead). `LeapPrefetcher` is the trend-detecting one.
///
/// A stream is a sequence of integer positions under one id (the pages of one model's weights
/// in layer order, one layer's KV blocks, one file); the caller maps pages to (stream,
/// position) and positions back to pages. Prefetchers are single-threaded objects with every
/// structure allocated at init: the store calls them under its own lock on each access, so an
/// access costs a few comparisons and no allocation.

/// What an access found, as the caller saw it. The caller knows whether a page came in through
/// a prefetch (it fetched it because a plan asked); only the first access to such a page counts
/// as `prefetchHit`, later ones are plain hits.
public enum PrefetchOutcome: UInt8, Sendable, CaseIterable {
    /// Not resident: a demand fetch (what prefetching is meant to avoid).
    case miss
    /// Resident, and not because of a prefetch (or already counted as a prefetch hit).
    case hit
    /// The first access to a page a prefetch brought in: the prefetch was useful.
    case prefetchHit
}

/// The positions a prefetcher asks for after one access, all in the accessed `stream`, nearest
/// first. Fixed capacity, storage allocated once at init: the caller keeps one plan and passes
/// it to every `recordAccess` (which empties it first), so producing a plan allocates nothing.
public struct PrefetchPlan: RandomAccessCollection {
    public let capacity: Int
    /// The stream the positions belong to (the one just accessed).
    public internal(set) var stream: UInt64 = 0
    private var storage: [Int64]
    public private(set) var count = 0

    public init(capacity: Int = 16) {
        self.capacity = Swift.max(1, capacity)
        storage = Array(repeating: 0, count: self.capacity)
    }

    public var startIndex: Int { 0 }
    public var endIndex: Int { count }
    public subscript(index: Int) -> Int64 {
        precondition(index >= 0 && index < count, "plan index \(index) out of 0..<\(count)")
        return storage[index]
    }

    public var isFull: Bool { count == capacity }

    /// Empties the plan (keeping its storage) and sets the stream it will hold positions of.
    public mutating func reset(stream: UInt64) {
        self.stream = stream
        count = 0
    }

    /// Adds a position; false (and nothing added) when the plan is full.
    @discardableResult
    public mutating func append(_ position: Int64) -> Bool {
        guard count < capacity else { return false }
        storage[count] = position
        count += 1
        return true
    }
}

/// A prefetcher's own tally, from what the caller reported and what it asked for.
public struct PrefetchCounters: Sendable, Equatable {
    public var accesses = 0
    /// Positions put into plans. The caller may skip some (already resident, past the end of
    /// the data); `PrefetchEvaluation` counts the fetches it actually made separately.
    public var issued = 0
    /// Accesses reported as `prefetchHit`.
    public var useful = 0
    /// Accesses reported as `miss`.
    public var demandMisses = 0

    public init() {}

    /// useful / issued (0 when nothing was issued).
    public var accuracy: Double { issued == 0 ? 0 : Double(useful) / Double(issued) }
    /// useful / (useful + demand misses): the share of would-be misses a prefetch served.
    public var coverage: Double { useful + demandMisses == 0 ? 0 : Double(useful) / Double(useful + demandMisses) }

    mutating func count(_ outcome: PrefetchOutcome) {
        accesses += 1
        switch outcome {
        case .miss: demandMisses += 1
        case .prefetchHit: useful += 1
        case .hit: break
        }
    }
}

/// A prefetch policy: told every access of every stream, answers with positions to fetch.
/// Single-threaded (the caller serialises calls); `recordAccess` must not allocate.
public protocol PrefetchPolicy: AnyObject {
    /// The name used in reports (`none`, `next-n`, `leap`, …).
    var name: String { get }
    var counters: PrefetchCounters { get }
    /// Records an access to `position` of `stream` and replaces `plan`'s contents with the
    /// positions (of the same stream) worth fetching now; an empty plan means none.
    func recordAccess(stream: UInt64, position: Int64, outcome: PrefetchOutcome, into plan: inout PrefetchPlan)
}

/// Never prefetches: the baseline for miss counts.
public final class NoPrefetcher: PrefetchPolicy {
    public let name = "none"
    public private(set) var counters = PrefetchCounters()

    public init() {}

    public func recordAccess(stream: UInt64, position: Int64, outcome: PrefetchOutcome, into plan: inout PrefetchPlan) {
        plan.reset(stream: stream)
        counters.count(outcome)
    }
}

/// Sequential readahead, the simplest useful prefetcher and the baseline Leap is measured
/// against: after every access keeps the next `depth` positions (upwards) asked for. Per
/// stream it remembers how far it has asked (the frontier), so a stream read in order asks for
/// one new position per access rather than `depth`; a jump starts a new run. Positions asked
/// for are never negative. It assumes
/// forward, dense access: strided, reverse or noisy streams make it fetch the wrong pages.
public final class NextNPrefetcher: PrefetchPolicy {
    public let name: String
    public let depth: Int
    public private(set) var counters = PrefetchCounters()
    private var table: StreamTable
    /// Per slot: the furthest position asked for in the current run.
    private var frontier: [Int64]

    public init(depth: Int = 8, streamSlots: Int = 16) {
        self.depth = max(1, depth)
        name = "next-\(self.depth)"
        table = StreamTable(slots: streamSlots)
        frontier = Array(repeating: 0, count: table.capacity)
    }

    public func recordAccess(stream: UInt64, position: Int64, outcome: PrefetchOutcome, into plan: inout PrefetchPlan) {
        plan.reset(stream: stream)
        counters.count(outcome)
        let (slot, fresh) = table.slot(for: stream)
        let depth = Int64(depth)
        // Within the run asked for so far (frontier - depth, frontier]: extend it; else restart.
        let (gap, overflow) = frontier[slot].subtractingReportingOverflow(position)
        if fresh || overflow || gap < 0 || gap >= depth { frontier[slot] = position }
        frontier[slot] = Swift.max(frontier[slot], -1)  // never ask for negative positions
        let end = position.addingReportingOverflow(depth)
        guard !end.overflow else { return }
        while frontier[slot] < end.partialValue, !plan.isFull {
            frontier[slot] += 1
            plan.append(frontier[slot])
        }
        counters.issued += plan.count
    }
}

/// A fixed number of per-stream slots keyed by stream id, the least recently used reclaimed
/// for a new stream. A linear scan: slot counts are small (16 by default), and a scan of 16
/// ids in one array beats hashing at that size.
struct StreamTable {
    let capacity: Int
    private var ids: [UInt64]
    private var lastUse: [UInt64]
    private var used = 0
    private var clock: UInt64 = 0

    init(slots: Int) {
        capacity = max(1, slots)
        ids = Array(repeating: 0, count: capacity)
        lastUse = Array(repeating: 0, count: capacity)
    }

    /// The stream's slot, and whether it was just claimed for it (its state must be reset).
    @inline(__always)
    mutating func slot(for id: UInt64) -> (slot: Int, fresh: Bool) {
        clock &+= 1
        for slot in 0..<used where ids[slot] == id {
            lastUse[slot] = clock
            return (slot, false)
        }
        var slot = used
        if used < capacity {
            used += 1
        } else {
            slot = 0
            for candidate in 1..<capacity where lastUse[candidate] < lastUse[slot] { slot = candidate }
        }
        ids[slot] = id
        lastUse[slot] = clock
        return (slot, true)
    }

    /// The stream's slot if it has one (no reclaim, no refresh).
    func find(_ id: UInt64) -> Int? {
        for slot in 0..<used where ids[slot] == id { return slot }
        return nil
    }
}
