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
    /// Time API calls spent waiting on this tier's I/O (tiers below the top only).
    let stallNanoseconds = ManagedAtomic<Int>(0)
}

final class StoreCounters: Sendable {
    let puts = ManagedAtomic<Int>(0)
    let misses = ManagedAtomic<Int>(0)
    let removes = ManagedAtomic<Int>(0)
    let prefetchRequests = ManagedAtomic<Int>(0)
    let prefetchDropped = ManagedAtomic<Int>(0)
    let promotionsSkipped = ManagedAtomic<Int>(0)
    let declinedPuts = ManagedAtomic<Int>(0)
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
    /// Nanoseconds API calls (get, put, batches) spent waiting on this tier's I/O; always 0
    /// for the top tier, whose accesses are the work itself, not a stall.
    public var stallNanoseconds: Int = 0
}

/// A point-in-time view of the store (`TieredStore.stats()`).
public struct StoreStats: Sendable, Equatable, Codable {
    /// Name of the policy in use (`StorePolicy.name`).
    public var policy: String
    public var tiers: [TierStats]
    public var puts: Int
    public var gets: Int
    public var misses: Int
    public var removes: Int
    public var prefetchRequests: Int
    public var prefetchDropped: Int
    public var promotionsSkipped: Int
    /// Puts no tier's policy admitted, dropped (`StoreOptions.declinedPutsAreDropped`).
    public var declinedPuts: Int = 0
    /// Recorded reads the policy never saw (a ring full while its tier's policy was busy).
    public var policyReadsDropped: Int = 0
    /// Nanoseconds since the store opened.
    public var uptimeNanoseconds: Int = 0

    /// Stall time on lower tiers, all tiers together.
    public var stallNanoseconds: Int { tiers.reduce(0) { $0 + $1.stallNanoseconds } }
    /// Goodput: the fraction of the store's lifetime not spent stalled on memory below the
    /// top tier, 1 − stall / uptime (clamped to 0…1; with many threads stalling at once the
    /// stall sum can exceed wall time, which reads as 0).
    public var goodput: Double {
        guard uptimeNanoseconds > 0 else { return 1 }
        return max(0, min(1, 1 - Double(stallNanoseconds) / Double(uptimeNanoseconds)))
    }

    public var checksumFailures: Int { tiers.reduce(0) { $0 + $1.checksumFailures } }
    public var evictions: Int { tiers.reduce(0) { $0 + $1.evictions } }
}

/// swift-metrics handles created once per store; `publish` pushes counter deltas and gauges.
final class MetricsPublisher: @unchecked Sendable {
    // `@unchecked Sendable`: `published` is only touched by `publish`, which the store calls
    // from its background thread or under `publishLock`.
    private struct TierHandles {
        let hits, promotions, demotions, evictions, bytesRead, bytesWritten, checksumFailures, ioErrors, stall: Counter
        let usedSlots, pages: Gauge
        let reclaimDuration: Timer
    }

    private let tiers: [TierHandles]
    private let puts, gets, misses, prefetchDropped, declinedPuts, policyReadsDropped: Counter
    private let goodput: Gauge
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
                stall: Counter(label: "\(prefix)_tier_stall_nanoseconds_total", dimensions: dimensions),
                usedSlots: Gauge(label: "\(prefix)_tier_used_slots", dimensions: dimensions),
                pages: Gauge(label: "\(prefix)_tier_pages", dimensions: dimensions),
                reclaimDuration: Timer(label: "\(prefix)_tier_reclaim_duration", dimensions: dimensions))
        }
        puts = Counter(label: "\(prefix)_puts_total")
        gets = Counter(label: "\(prefix)_gets_total")
        misses = Counter(label: "\(prefix)_misses_total")
        prefetchDropped = Counter(label: "\(prefix)_prefetch_dropped_total")
        declinedPuts = Counter(label: "\(prefix)_declined_puts_total")
        policyReadsDropped = Counter(label: "\(prefix)_policy_reads_dropped_total")
        goodput = Gauge(label: "\(prefix)_goodput_ratio")
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
            delta(handles.stall, prefix + "stall", tier.stallNanoseconds)
            handles.usedSlots.record(tier.usedSlots)
            handles.pages.record(tier.pages)
        }
        delta(puts, "puts", stats.puts)
        delta(gets, "gets", stats.gets)
        delta(misses, "misses", stats.misses)
        delta(prefetchDropped, "prefetchDropped", stats.prefetchDropped)
        delta(declinedPuts, "declinedPuts", stats.declinedPuts)
        delta(policyReadsDropped, "policyReadsDropped", stats.policyReadsDropped)
        goodput.record(stats.goodput)
    }
}
