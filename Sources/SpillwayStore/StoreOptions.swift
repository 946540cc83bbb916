import SpillwayCore

/// When a tier starts and stops shedding pages to the tier below.
public struct Watermarks: Sendable, Equatable {
    /// Fraction of capacity above which background demotion starts.
    public var high: Double
    /// Fraction of capacity demotion brings usage back down to.
    public var low: Double

    public init(high: Double = 0.90, low: Double = 0.80) {
        self.high = high
        self.low = low
    }

    public func validate(tier: String) throws(SpillwayError) {
        guard low > 0, low < high, high <= 1 else {
            throw .invalidConfiguration("tier '\(tier)': watermarks need 0 < low (\(low)) < high (\(high)) <= 1")
        }
    }
}

/// Store-wide settings. Tiers themselves are built by the caller (or by `Spillway`'s
/// configuration loader) and handed to `TieredStore`.
public struct StoreOptions: Sendable {
    /// Largest page `put` accepts; also sizes the staging buffers for tier moves.
    public var maxPageSize: Int
    /// Per-tier watermarks, in tier order; missing entries use `Watermarks()`.
    public var watermarks: [Watermarks]
    /// Prefetch requests queued beyond this are dropped (and counted), never blocking.
    public var prefetchQueueLimit: Int
    /// What a put that no tier's policy admits does: false (the default) stores it on the last
    /// tier anyway, so a put is always kept; true drops it (a cache that may decline, as
    /// `spillway replay` models: counted in `StoreStats.declinedPuts`, and an older version of
    /// the key is removed, never left visible).
    public var declinedPutsAreDropped: Bool
    /// How often the background worker checks watermarks and publishes metrics.
    public var backgroundIntervalMilliseconds: Int
    /// Run the background worker (tests turn it off to make moves deterministic).
    public var backgroundWorker: Bool
    /// Prefix of the swift-metrics labels (`spillway_tier_hits_total`, …).
    public var metricsPrefix: String
    /// Batches `submitGet`/`submitPut` keep in flight at most (queued or running); a submit
    /// past that waits for one to finish.
    public var asyncBatchLimit: Int = 8
    /// Threads that run submitted batches (started at the first submit).
    public var asyncWorkers: Int = 2

    public init(maxPageSize: Int = 16 << 20, watermarks: [Watermarks] = [], prefetchQueueLimit: Int = 4096,
                declinedPutsAreDropped: Bool = false, backgroundIntervalMilliseconds: Int = 20, backgroundWorker: Bool = true,
                metricsPrefix: String = "spillway")
    {
        self.maxPageSize = maxPageSize
        self.watermarks = watermarks
        self.prefetchQueueLimit = prefetchQueueLimit
        self.declinedPutsAreDropped = declinedPutsAreDropped
        self.backgroundIntervalMilliseconds = backgroundIntervalMilliseconds
        self.backgroundWorker = backgroundWorker
        self.metricsPrefix = metricsPrefix
    }

    func watermarks(forTier index: Int) -> Watermarks {
        index < watermarks.count ? watermarks[index] : Watermarks()
    }
}
