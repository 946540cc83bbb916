import Atomics
import DequeModule
import Dispatch
import Logging
import SpillwayCore
import SpillwayPolicy

#if canImport(Glibc)
import Glibc
#endif

/// One page of a batched `get`: the caller's buffer in, the page's length or an error out.
public struct PageRead {
    public var key: PageKey
    public var buffer: UnsafeMutableRawBufferPointer
    public var length: Int = 0
    public var error: SpillwayError?
    /// Submission-to-completion time of the read on its tier, when the tier times I/Os (NVMe); 0 otherwise.
    public var latencyNanoseconds: UInt64 = 0

    public init(key: PageKey, buffer: UnsafeMutableRawBufferPointer) {
        self.key = key
        self.buffer = buffer
    }
}

/// One page of a batched `put`.
public struct PageWrite {
    public var key: PageKey
    public var bytes: UnsafeRawBufferPointer
    /// The page's class and hints, for the store's policy.
    public var hints: PageHints
    public var error: SpillwayError?
    /// No tier's policy admitted the page and the store drops such puts
    /// (`StoreOptions.declinedPutsAreDropped`): it succeeded without storing anything.
    public var declined = false
    /// Submission-to-completion time of the write on its tier, when the tier times I/Os (NVMe); 0 otherwise.
    public var latencyNanoseconds: UInt64 = 0

    public init(key: PageKey, bytes: UnsafeRawBufferPointer, hints: PageHints = .generic) {
        self.key = key
        self.bytes = bytes
        self.hints = hints
    }
}

/// The tiered page store: pages live in the fastest tier with room and move down as they cool.
///
/// - `put` writes the page to its placement tier (by default the top), and only after the
///   write completed makes it visible in the directory, replacing any older version.
/// - `get` copies a page into the caller's buffer from whichever tier holds it; a hit below the
///   top tier is verified (CRC32C) and promoted when the policy says so.
/// - A background thread demotes the coldest unpinned pages of a tier past its high watermark
///   down to its low watermark; when the last tier is full, the coldest unpinned page is evicted
///   (the store is a cache). A `put` that finds its tier full reclaims synchronously.
/// - Every tier crossing verifies the CRC32C; a mismatch drops the page and surfaces as
///   `SpillwayError.checksumMismatch`, never as wrong bytes.
///
/// All operations are synchronous and thread-safe; none allocates or hops actors per page.
public final class TieredStore: Sendable {
    public let tiers: [any Tier]
    public let directory: PageDirectory
    /// The decisions: placement, admission, promotion, eviction order, demotion target.
    public let policy: StorePolicy
    /// The policy's run-time state (candidate index per tier, recorded reads, tier costs).
    public let policyEngine: PolicyEngine
    public let options: StoreOptions
    public let slotSize: Int
    let logger: Logger

    let tierCounters: [TierCounters]
    let counters = StoreCounters()
    let closedFlag = ManagedAtomic<Bool>(false)
    let reclaimLocks: [Locked<Void>]
    /// Movers (demotion, promotion, prefetch, evacuation) holding keys right now.
    let activeMovers = ManagedAtomic<Int>(0)
    /// Orders the changes of one key that a persistent tier must see in order (see `KeyLocks`).
    let keyLocks = KeyLocks()
    /// Indices of tiers that record pages persistently (`recordsPageMetadata`).
    let persistentTiers: [Int]
    let prefetchQueue: Locked<Deque<PageKey>>
    let wake = DispatchSemaphore(value: 0)
    let worker = Locked<BackgroundThread?>(nil)
    /// Submitted batches (`submitGet`/`submitPut`) and their workers.
    let asyncBatches: AsyncBatches
    let metrics: MetricsPublisher
    let publishLock = Locked<Void>(())
    let staging: StagingPool
    let highSlots: [Int]
    let topTierVerifies: Bool
    /// Per tier: `descriptor.completesInline`, cached (reading a descriptor through the
    /// existential copies it, strings and all).
    let inlineTiers: [Bool]
    /// Per tier: the base of its host arena (`Tier.hostMemory`, fixed for the tier's lifetime),
    /// so memory-tier hits and stores are a plain `memcpy` with no batch round trip.
    /// (Stored as addresses: raw pointers are not `Sendable`; 0 = not host memory.)
    let hostBases: [UInt]
    /// Whether top-tier hits take `get`'s lock-free path: they need no checksum and the tier
    /// copies inline (host memory, or the device tier's own copy).
    let topTierOptimistic: Bool
    /// Per tier: `descriptor.recordsPageMetadata` (writes must carry key and checksum).
    let recordsMetadata: [Bool]
    let lowSlots: [Int]
    /// When the store opened (goodput's denominator).
    let openedAt = monotonicNanoseconds()

    public init(tiers: [any Tier], policy: StorePolicy = .default, options: StoreOptions = StoreOptions(),
                logger: Logger = Logger(label: "spillway.store")) throws(SpillwayError)
    {
        guard !tiers.isEmpty, tiers.count <= 255 else { throw .invalidConfiguration("a store needs 1…255 tiers, got \(tiers.count)") }
        let slotSize = tiers[0].descriptor.slotSize
        guard slotSize >= 4096, slotSize <= 2 << 20, slotSize & (slotSize - 1) == 0 else {
            throw .invalidConfiguration("slot size \(slotSize) must be a power of two between 4KiB and 2MiB")
        }
        var names = Set<String>()
        for (index, tier) in tiers.enumerated() {
            let descriptor = tier.descriptor
            guard descriptor.slotSize == slotSize else {
                throw .invalidConfiguration("tier '\(descriptor.name)' has slot size \(descriptor.slotSize), the pool uses \(slotSize)")
            }
            guard names.insert(descriptor.name).inserted else { throw .invalidConfiguration("duplicate tier name '\(descriptor.name)'") }
            guard options.maxPageSize <= descriptor.capacityBytes else {
                throw .invalidConfiguration("max page size \(options.maxPageSize) exceeds tier '\(descriptor.name)' (\(descriptor.capacityBytes) bytes)")
            }
            try options.watermarks(forTier: index).validate(tier: descriptor.name)
        }
        guard options.maxPageSize > 0, options.maxPageSize <= Int(UInt32.max) else {
            throw .invalidConfiguration("max page size must be between 1 byte and 4GiB - 1")
        }
        guard options.prefetchQueueLimit > 0, options.backgroundIntervalMilliseconds > 0 else {
            throw .invalidConfiguration("prefetch queue limit and background interval must be positive")
        }
        self.tiers = tiers
        self.policy = policy
        // Read events are applied by the background worker (woken when a ring is half full),
        // never by the reader unless a ring fills; without a worker, decisions apply them.
        let wakeWorker = wake
        var onBacklog: (@Sendable () -> Void)? = nil
        if options.backgroundWorker {
            onBacklog = { @Sendable in _ = wakeWorker.signal() }
        }
        let tierShapes: [(capacity: Int, nominalNanoseconds: Int)] = tiers.map {
            (capacity: $0.descriptor.capacitySlots, nominalNanoseconds: $0.descriptor.performance.nominalLatencyNanoseconds)
        }
        policyEngine = PolicyEngine(policy: policy, tiers: tierShapes, onBacklog: onBacklog)
        self.options = options
        self.slotSize = slotSize
        self.logger = logger
        do {
            directory = try PageDirectory(tierCapacities: tiers.map(\.descriptor.capacitySlots))
        } catch {
            throw .tierIO(tier: "directory", operation: error.call, errno: error.errno)
        }
        topTierVerifies = tiers[0].descriptor.verifiesReads
        inlineTiers = tiers.map(\.descriptor.completesInline)
        hostBases = tiers.map { UInt(bitPattern: $0.hostMemory?.baseAddress) }
        topTierOptimistic = !topTierVerifies && inlineTiers[0]
        recordsMetadata = tiers.map(\.descriptor.recordsPageMetadata)
        persistentTiers = tiers.indices.filter { tiers[$0].descriptor.recordsPageMetadata }
        tierCounters = tiers.map { _ in TierCounters() }
        reclaimLocks = tiers.map { _ in Locked(()) }
        prefetchQueue = Locked(Deque(minimumCapacity: options.prefetchQueueLimit))
        metrics = MetricsPublisher(prefix: options.metricsPrefix, tierNames: tiers.map(\.descriptor.name))
        asyncBatches = AsyncBatches(limit: max(1, options.asyncBatchLimit), workers: max(1, options.asyncWorkers))
        staging = StagingPool(bufferBytes: (options.maxPageSize + slotSize - 1) / slotSize * slotSize)
        highSlots = tiers.indices.map { Int(Double(tiers[$0].descriptor.capacitySlots) * options.watermarks(forTier: $0).high) }
        lowSlots = tiers.indices.map { Int(Double(tiers[$0].descriptor.capacitySlots) * options.watermarks(forTier: $0).low) }
        // Pages persistent tiers recovered (warm restart) become visible again.
        for (index, tier) in tiers.enumerated() {
            for page in tier.recoveredPages {
                do {
                    if let vacated = try directory.insert(page.key, location: PageLocation(tier: index, extent: page.extent),
                                                          length: page.length, checksum: page.checksum) {
                        release(vacated)
                    }
                    policyEngine.inserted(page.key, hints: .generic, tier: index)
                } catch {
                    logger.warning("recovered page not restored", metadata: ["key": "\(page.key)", "error": "\(error)"])
                    tier.release(page.extent)
                }
            }
        }
        if options.backgroundWorker {
            // The thread holds the store weakly: a store dropped without `close()` still deinits
            // (and shuts the thread down) instead of living forever.
            let wake = self.wake
            let closed = self.closedFlag
            let interval = DispatchTimeInterval.milliseconds(options.backgroundIntervalMilliseconds)
            let intervalNanoseconds = UInt64(options.backgroundIntervalMilliseconds) * 1_000_000
            let thread = BackgroundThread { [weak self] in
                var published: UInt64 = 0
                while true {
                    _ = wake.wait(timeout: .now() + interval)
                    guard !closed.load(ordering: .relaxed), let store = self else { return }
                    store.runMaintenance()
                    // Woken often (read backlogs, full tiers): metrics once per interval only.
                    let now = monotonicNanoseconds()
                    if now &- published >= intervalNanoseconds {
                        store.publishMetrics()
                        published = now
                    }
                }
            }
            worker.withLock { $0 = thread }
        }
        // A tier that must give up space (a reclaimed remote slab) hands its pages to us to move.
        for (index, tier) in tiers.enumerated() {
            guard let evacuating = tier as? any EvacuatingTier else { continue }
            evacuating.setEvacuationHandler { [weak self] slots in self?.evacuate(tier: index, slots: slots) ?? -1 }
        }
        logger.info("store open", metadata: [
            "tiers": "\(tiers.map { "\($0.descriptor.name)(\($0.descriptor.kind.rawValue), \($0.descriptor.capacitySlots) slots)" })",
            "slotSize": "\(slotSize)", "policy": "\(policy.name)",
        ])
    }

    deinit {
        asyncBatches.stop(join: false)
        if !closedFlag.load(ordering: .relaxed) { shutdown() }
    }

    /// Stores `bytes` under `key`, replacing any earlier version once the new one is complete.
    ///
    /// - Parameter tier: place the page on exactly this tier (e.g. the device tier for a layer
    ///   about to be used), making room there if needed; `tierFull` if it cannot. Nil lets the
    ///   policy choose and falls back to lower tiers.
    /// - Parameter hints: the page's class and hints (kept with it; the policy decides
    ///   placement, promotion and eviction with them). Default `generic`.
    public func put(_ key: PageKey, _ bytes: UnsafeRawBufferPointer, tier: Int? = nil, hints: PageHints = .generic)
        throws(SpillwayError)
    {
        try checkOpen()
        // One change of a key at a time: its journal records and directory commits stay in order.
        try keyLocks.withLock(key) { () throws(SpillwayError) in try putLocked(key, bytes, tier: tier, hints: hints) }
    }

    /// Convenience: stores the contents of an array.
    public func put(_ key: PageKey, bytes: [UInt8], tier: Int? = nil, hints: PageHints = .generic) throws(SpillwayError) {
        let result: Result<Void, SpillwayError> = bytes.withUnsafeBytes { raw in
            do throws(SpillwayError) { try put(key, raw, tier: tier, hints: hints); return .success(()) } catch { return .failure(error) }
        }
        try result.get()
    }

    /// Copies the page into `buffer` and returns its length.
    @discardableResult
    public func get(_ key: PageKey, into buffer: UnsafeMutableRawBufferPointer) throws(SpillwayError) -> Int {
        try checkOpen()
        if let buffer = buffer.baseAddress.map({ UnsafeMutableRawBufferPointer(start: $0, count: buffer.count) }),
           let length = optimisticHit(key, into: buffer, deviceCopies: true)
        {
            return length
        }
        guard let snapshot = try directory.beginRead(key) else {
            counters.misses.add(1)
            throw .unknownKey(key)
        }
        guard !snapshot.isCorrupt else {
            endRead(snapshot)
            throw .checksumMismatch(key: key, tier: tiers[snapshot.location.tier].descriptor.name, expected: snapshot.checksum, actual: 0)
        }
        guard buffer.count >= snapshot.length else {
            endRead(snapshot)
            throw .bufferTooSmall(required: snapshot.length, available: buffer.count)
        }
        let tierIndex = snapshot.location.tier
        policyEngine.recordRead(key, tier: tierIndex, hints: snapshot.hints)
        let status: Int32
        // A read below the top tier is a stall on memory (goodput accounting).
        let stallStart = tierIndex > 0 ? monotonicNanoseconds() : 0
        defer { if tierIndex > 0 { accountLowerTier(tierIndex, write: false, nanoseconds: monotonicNanoseconds() &- stallStart, pages: 1) } }
        if let base = UnsafeMutableRawPointer(bitPattern: hostBases[tierIndex]) {
            if snapshot.length > 0 {
                memcpy(buffer.baseAddress!, base + Int(snapshot.location.extent.firstSlot) * slotSize, snapshot.length)
            }
            status = 0
        } else {
            let batch = ThreadBatch.current()
            batch.append(TierIO(operation: .read, extent: snapshot.location.extent, buffer: buffer.baseAddress, length: snapshot.length))
            batch.run(on: tiers[tierIndex], inline: inlineTiers[tierIndex])
            status = batch[0].status
        }
        if status == 0 && tierIndex == 0 && !topTierVerifies {
            // Top-tier hit: the fast path, no checksum (the bytes never left this process).
            endRead(snapshot)
            return snapshot.length
        }
        try finishRead(snapshot, buffer: UnsafeRawBufferPointer(start: buffer.baseAddress, count: snapshot.length), status: status)
        return snapshot.length
    }

    /// A hit on a top tier that needs no checksum and copies inline: one optimistic lookup and
    /// one copy, no lock (the directory's seqlock proves the extent was the entry's throughout
    /// the copy). Nil for anything else, or a race: the caller takes the locked path.
    /// `deviceCopies`: a top tier without host memory (the device tier) copies through the
    /// thread's batch, so callers already using that batch pass false.
    @inline(__always)
    func optimisticHit(_ key: PageKey, into buffer: UnsafeMutableRawBufferPointer, deviceCopies: Bool) -> Int? {
        guard topTierOptimistic, let start = buffer.baseAddress else { return nil }
        let base = UnsafeMutableRawPointer(bitPattern: hostBases[0])
        guard base != nil || deviceCopies else { return nil }
        let slotSize = self.slotSize
        let hit = directory.optimisticRead(key) { snapshot -> Bool in
            let extent = snapshot.location.extent
            guard snapshot.location.tier == 0, snapshot.length <= buffer.count,
                  snapshot.length <= Int(extent.slotCount) * slotSize
            else { return false }
            guard snapshot.length > 0 else { return true }
            if let base {
                memcpy(start, base + Int(extent.firstSlot) * slotSize, snapshot.length)
            } else {
                // The device tier: its own copy, completed inline on this thread.
                let batch = ThreadBatch.current()
                batch.append(TierIO(operation: .read, extent: extent, buffer: start, length: snapshot.length))
                batch.run(on: tiers[0], inline: true)
                guard batch[0].status == 0 else { return false }
            }
            return true
        }
        guard let hit else { return nil }
        policyEngine.recordRead(key, tier: 0, hints: hit.hints)
        return hit.length
    }

    /// Convenience: returns the page as a new array.
    public func get(_ key: PageKey) throws(SpillwayError) -> [UInt8] {
        try checkOpen()
        guard let snapshot = directory.snapshot(of: key) else {
            counters.misses.add(1)
            throw .unknownKey(key)
        }
        var result = [UInt8](repeating: 0, count: snapshot.length)
        // The page may be replaced by a longer one in between; retry with its new length.
        while true {
            let outcome: Result<Int, SpillwayError> = result.withUnsafeMutableBytes { raw in
                do throws(SpillwayError) { return .success(try get(key, into: raw)) } catch { return .failure(error) }
            }
            switch outcome {
            case .success(let length):
                result.removeLast(result.count - length)
                return result
            case .failure(.bufferTooSmall(let required, _)):
                result = [UInt8](repeating: 0, count: required)
            case .failure(let error):
                throw error
            }
        }
    }

    /// Reads many pages with one submission per tier. Each request gets its length or error;
    /// returns how many succeeded.
    ///
    /// - Parameter queueDepth: keep at most this many reads in flight per tier (0: the tier's
    ///   limit); queueing tiers refill the window as reads complete.
    @discardableResult
    public func get(batch requests: UnsafeMutableBufferPointer<PageRead>, queueDepth: Int = 0) -> Int {
        var succeeded = 0
        var start = 0
        while start < requests.count {
            let end = min(requests.count, start + ThreadBatch.capacity)
            succeeded += getChunk(UnsafeMutableBufferPointer(rebasing: requests[start..<end]), queueDepth: queueDepth)
            start = end
        }
        return succeeded
    }

    /// Writes many pages with one submission per tier; returns how many succeeded.
    /// `queueDepth` as for `get(batch:queueDepth:)`.
    @discardableResult
    public func put(batch requests: UnsafeMutableBufferPointer<PageWrite>, queueDepth: Int = 0) -> Int {
        var succeeded = 0
        var start = 0
        while start < requests.count {
            let end = min(requests.count, start + ThreadBatch.capacity)
            succeeded += putChunk(UnsafeMutableBufferPointer(rebasing: requests[start..<end]), queueDepth: queueDepth)
            start = end
        }
        return succeeded
    }

    /// Whether a complete page is stored under `key`.
    public func contains(_ key: PageKey) -> Bool {
        directory.contains(key)
    }

    /// The page's length, if present.
    public func length(of key: PageKey) -> Int? {
        directory.snapshot(of: key)?.length
    }

    /// Where the page lives now (tier index and slots), if present.
    /// The class and hints `key` was stored with (nil if absent). Pages a persistent tier
    /// recovered on a warm restart come back as `generic`: hints are not persisted.
    public func hints(of key: PageKey) -> PageHints? {
        directory.snapshot(of: key)?.hints
    }

    /// Sets the hints of the page stored under `key` without rewriting it (a registration that
    /// finds its pages already stored, e.g. after a warm restart, tags them). False if absent.
    @discardableResult
    public func setHints(_ hints: PageHints, of key: PageKey) -> Bool {
        directory.setHints(hints, of: key)
    }

    public func location(of key: PageKey) -> PageLocation? {
        directory.snapshot(of: key)?.location
    }

    /// Removes the page; returns false if there was none. Pinned pages cannot be removed.
    @discardableResult
    public func remove(_ key: PageKey) throws(SpillwayError) -> Bool {
        try checkOpen()
        return try keyLocks.withLock(key) { () throws(SpillwayError) -> Bool in
            let (old, release) = try directory.removeEntry(key)
            if let old { policyEngine.removed(key, tier: old.tier) }
            if let old, recordsMetadata[old.tier] { tiers[old.tier].retire(old.extent) }
            if let release { self.release(release) }
            // A removal is a promise: no persistent tier may bring the key back after a crash,
            // including copies the directory no longer points at (promoted or superseded ones).
            try persistInvalidations(of: key)
            if old != nil { counters.removes.add(1) }
            return old != nil
        }
    }

    /// Pins the page where it is: it is not moved, evicted, overwritten or removed until a
    /// matching `unpin`. Pins nest.
    public func pin(_ key: PageKey) throws(SpillwayError) {
        try checkOpen()
        try directory.pin(key)
    }

    public func unpin(_ key: PageKey) throws(SpillwayError) {
        try checkOpen()
        if let vacated = try directory.unpin(key) {
            // The last unpin of a quarantined page removed it.
            policyEngine.removed(key, tier: vacated.tier)
            release(vacated)
        }
    }

    /// Asks the background worker to bring these pages to the top tier. Never blocks; requests
    /// beyond the queue bound are dropped and counted. Unknown keys are ignored.
    public func prefetch(_ keys: some Sequence<PageKey>) {
        guard !closedFlag.load(ordering: .relaxed) else { return }
        var accepted = 0
        var dropped = 0
        prefetchQueue.withLock { queue in
            for key in keys {
                if queue.count < options.prefetchQueueLimit {
                    queue.append(key)
                    accepted += 1
                } else {
                    dropped += 1
                }
            }
        }
        counters.prefetchRequests.add(accepted)
        if dropped > 0 { counters.prefetchDropped.add(dropped) }
        if accepted > 0 { wake.signal() }
    }

    /// Runs pending prefetches and watermark demotion now, on the calling thread (tests and
    /// tools; the background worker does the same periodically).
    public func runMaintenance() {
        guard !closedFlag.load(ordering: .relaxed) else { return }
        policyEngine.drainReads()
        drainPrefetchQueue()
        for index in 0..<(tiers.count - 1) where tiers[index].usedSlots > highSlots[index] {
            reclaim(tier: index, toUsedSlots: lowSlots[index])
        }
    }

    /// Moves the page one tier down now (tests, tools). Returns false if it could not move.
    @discardableResult
    public func demote(_ key: PageKey) -> Bool {
        guard let snapshot = directory.snapshot(of: key), snapshot.location.tier + 1 < tiers.count else { return false }
        return movePages([key], from: snapshot.location.tier, to: snapshot.location.tier + 1) == 1
    }

    public func stats() -> StoreStats {
        let served = directory.readCounters()
        return StoreStats(
            policy: policy.name,
            tiers: tiers.indices.map { index in
                let descriptor = tiers[index].descriptor
                let counter = tierCounters[index]
                let reads = served[index]
                return TierStats(
                    name: descriptor.name, kind: descriptor.kind.rawValue, slotSize: descriptor.slotSize,
                    capacitySlots: descriptor.capacitySlots, usedSlots: tiers[index].usedSlots,
                    pages: directory.pageCount(tier: index), hits: reads.reads,
                    promotionsIn: counter.promotionsIn.value, demotionsOut: counter.demotionsOut.value,
                    evictions: counter.evictions.value, bytesRead: reads.bytes,
                    bytesWritten: counter.bytesWritten.value, checksumFailures: counter.checksumFailures.value,
                    ioErrors: counter.ioErrors.value, stallNanoseconds: counter.stallNanoseconds.value)
            },
            puts: counters.puts.value, gets: served.reduce(counters.misses.value) { $0 + $1.reads },
            misses: counters.misses.value, removes: counters.removes.value,
            prefetchRequests: counters.prefetchRequests.value, prefetchDropped: counters.prefetchDropped.value,
            promotionsSkipped: counters.promotionsSkipped.value, declinedPuts: counters.declinedPuts.value,
            policyReadsDropped: tiers.indices.reduce(0) { $0 + policyEngine.droppedReads(tier: $1) },
            uptimeNanoseconds: Int(monotonicNanoseconds() &- openedAt))
    }

    /// Publishes the current counters to swift-metrics (the worker does this periodically).
    public func publishMetrics() {
        let snapshot = stats()
        publishLock.withLock { _ in metrics.publish(snapshot) }
    }

    /// Stops the background worker and closes the tiers. Later calls fail with `.closed`.
    /// Callers must not have operations in flight on other threads.
    public func close() {
        // Submitted batches finish first (they were accepted while open); new ones are refused.
        asyncBatches.stop()
        guard !closedFlag.exchange(true, ordering: .acquiringAndReleasing) else { return }
        shutdown()
    }

    public var isClosed: Bool { closedFlag.load(ordering: .relaxed) }
}
