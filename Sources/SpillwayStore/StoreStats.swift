import Atomics
import Metrics
import SpillwayCore

/// Counters of one tier, as plain atomics: the hot path pays a relaxed add, and the background
/// worker publishes deltas to swift-metrics (so no metrics-backend call happens per page).
final class TierCounters: Sendable {
    let promotionsIn = ManagedAtomic<Int>(0)
    let demotionsOut = ManagedAtomic<Int>(0)
    let evictions = ManagedAtomic<Int>(0)
    let bytesWritten = ManagedAtomic<Int>(0)
    let checksumFailures = ManagedAtomic<Int>(0)
    let ioErrors = ManagedAtomic<Int>(0)
}

final class StoreCounters: Sendable {
    let puts = ManagedAtomic<Int>(0)
    let misses = ManagedAtomic<Int>(0)
    let removes = ManagedAtomic<Int>(0)
    let prefetchRequests = ManagedAtomic<Int>(0)
    let prefetchDropped = ManagedAtomic<Int>(0)
    let promotionsSkipped = ManagedAtomic<Int>(0)
}

extension ManagedAtomic where Value == Int {
    @inline(__always) func add(_ value: Int) { wrappingIncrement(by: value, ordering: .relaxed) }
    @inline(__always) var value: Int { load(ordering: .relaxed) }
}

/// A point-in-time view of one tier.
public struct TierStats: Sendable, Equatable, Codable {
    public var name: String
    public var kind: String
    public var slotSize: Int
    public var capacitySlots: Int
    public var usedSlots: Int
    public var pages: Int
    /// Lookups served from this tier (including reads that then failed verification or I/O).
    public var hits: Int
    public var promotionsIn: Int
    public var demotionsOut: Int
    public var evictions: Int
    public var bytesRead: Int
    public var bytesWritten: Int
    public var checksumFailures: Int
    public var ioErrors: Int
}

/// A point-in-time view of the store (`TieredStore.stats()`).
public struct StoreStats: Sendable, Equatable, Codable {
    public var tiers: [TierStats]
    public var puts: Int
    public var gets: Int
    public var misses: Int
    public var removes: Int
    public var prefetchRequests: Int
    public var prefetchDropped: Int
    public var promotionsSkipped: Int

    public var checksumFailures: Int { tiers.reduce(0) { $0 + $1.checksumFailures } }
    public var evictions: Int { tiers.reduce(0) { $0 + $1.evictions } }
}

/// swift-metrics handles created once per store; `publish` pushes counter deltas and gauges.
final class MetricsPublisher: @unchecked Sendable {
    // `@unchecked Sendable`: `published` is only touched by `publish`, which the store calls
    // from its background thread or under `publishLock`.
    private struct TierHandles {
        let hits, promotions, demotions, evictions, bytesRead, bytesWritten, checksumFailures, ioErrors: Counter
        let usedSlots, pages: Gauge
        let reclaimDuration: Timer
    }

    private let tiers: [TierHandles]
    private let puts, gets, misses, prefetchDropped: Counter
    private var published: [String: Int] = [:]

    init(prefix: String, tierNames: [String]) {
        tiers = tierNames.map { name in
            let dimensions = [("tier", name)]
            return TierHandles(
                hits: Counter(label: "\(prefix)_tier_hits_total", dimensions: dimensions),
                promotions: Counter(label: "\(prefix)_tier_promotions_total", dimensions: dimensions),
                demotions: Counter(label: "\(prefix)_tier_demotions_total", dimensions: dimensions),
                evictions: Counter(label: "\(prefix)_tier_evictions_total", dimensions: dimensions),
                bytesRead: Counter(label: "\(prefix)_tier_read_bytes_total", dimensions: dimensions),
                bytesWritten: Counter(label: "\(prefix)_tier_written_bytes_total", dimensions: dimensions),
                checksumFailures: Counter(label: "\(prefix)_tier_checksum_failures_total", dimensions: dimensions),
                ioErrors: Counter(label: "\(prefix)_tier_io_errors_total", dimensions: dimensions),
                usedSlots: Gauge(label: "\(prefix)_tier_used_slots", dimensions: dimensions),
                pages: Gauge(label: "\(prefix)_tier_pages", dimensions: dimensions),
                reclaimDuration: Timer(label: "\(prefix)_tier_reclaim_duration", dimensions: dimensions))
        }
        puts = Counter(label: "\(prefix)_puts_total")
        gets = Counter(label: "\(prefix)_gets_total")
        misses = Counter(label: "\(prefix)_misses_total")
        prefetchDropped = Counter(label: "\(prefix)_prefetch_dropped_total")
    }

    /// One reclaim round of `tier` (demotion batch or eviction) took this long.
    func recordReclaim(tier: Int, nanoseconds: Int64) {
        tiers[tier].reclaimDuration.recordNanoseconds(nanoseconds)
    }

    func publish(_ stats: StoreStats) {
        func delta(_ counter: Counter, _ name: String, _ value: Int) {
            let change = value - published[name, default: 0]
            if change > 0 { counter.increment(by: change) }
            published[name] = value
        }
        for (index, tier) in stats.tiers.enumerated() {
            let handles = tiers[index]
            let prefix = "\(index)."
            delta(handles.hits, prefix + "hits", tier.hits)
            delta(handles.promotions, prefix + "promotions", tier.promotionsIn)
            delta(handles.demotions, prefix + "demotions", tier.demotionsOut)
            delta(handles.evictions, prefix + "evictions", tier.evictions)
            delta(handles.bytesRead, prefix + "bytesRead", tier.bytesRead)
            delta(handles.bytesWritten, prefix + "bytesWritten", tier.bytesWritten)
            delta(handles.checksumFailures, prefix + "checksumFailures", tier.checksumFailures)
            delta(handles.ioErrors, prefix + "ioErrors", tier.ioErrors)
            handles.usedSlots.record(tier.usedSlots)
            handles.pages.record(tier.pages)
        }
        delta(puts, "puts", stats.puts)
        delta(gets, "gets", stats.gets)
        delta(misses, "misses", stats.misses)
        delta(prefetchDropped, "prefetchDropped", stats.prefetchDropped)
    }
}
