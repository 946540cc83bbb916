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

    private let tierCounters: [TierCounters]
    private let counters = StoreCounters()
    private let closedFlag = ManagedAtomic<Bool>(false)
    private let reclaimLocks: [Locked<Void>]
    /// Orders the changes of one key that a persistent tier must see in order (see `KeyLocks`).
    private let keyLocks = KeyLocks()
    /// Indices of tiers that record pages persistently (`recordsPageMetadata`).
    private let persistentTiers: [Int]
    private let prefetchQueue: Locked<Deque<PageKey>>
    private let wake = DispatchSemaphore(value: 0)
    private let worker = Locked<BackgroundThread?>(nil)
    private let metrics: MetricsPublisher
    private let publishLock = Locked<Void>(())
    private let staging: StagingPool
    private let highSlots: [Int]
    private let topTierVerifies: Bool
    /// Per tier: `descriptor.completesInline`, cached (reading a descriptor through the
    /// existential copies it, strings and all).
    private let inlineTiers: [Bool]
    /// Per tier: the base of its host arena (`Tier.hostMemory`, fixed for the tier's lifetime),
    /// so memory-tier hits and stores are a plain `memcpy` with no batch round trip.
    /// (Stored as addresses: raw pointers are not `Sendable`; 0 = not host memory.)
    private let hostBases: [UInt]
    /// Per tier: `descriptor.recordsPageMetadata` (writes must carry key and checksum).
    private let recordsMetadata: [Bool]
    private let lowSlots: [Int]
    /// When the store opened (goodput's denominator).
    private let openedAt = monotonicNanoseconds()

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
        policyEngine = PolicyEngine(policy: policy, tiers: tiers.map { ($0.descriptor.capacitySlots, $0.descriptor.performance.nominalLatencyNanoseconds) })
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
        recordsMetadata = tiers.map(\.descriptor.recordsPageMetadata)
        persistentTiers = tiers.indices.filter { tiers[$0].descriptor.recordsPageMetadata }
        tierCounters = tiers.map { _ in TierCounters() }
        reclaimLocks = tiers.map { _ in Locked(()) }
        prefetchQueue = Locked(Deque(minimumCapacity: options.prefetchQueueLimit))
        metrics = MetricsPublisher(prefix: options.metricsPrefix, tierNames: tiers.map(\.descriptor.name))
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
            let thread = BackgroundThread { [weak self] in
                while true {
                    _ = wake.wait(timeout: .now() + interval)
                    guard !closed.load(ordering: .relaxed), let store = self else { return }
                    store.runMaintenance()
                    store.publishMetrics()
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
        if !closedFlag.load(ordering: .relaxed) { shutdown() }
    }

    // MARK: Public API

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

    private func putLocked(_ key: PageKey, _ bytes: UnsafeRawBufferPointer, tier: Int?, hints: PageHints) throws(SpillwayError) {
        let length = bytes.count
        guard length <= options.maxPageSize else { throw .pageTooLarge(length: length, limit: options.maxPageSize) }
        let location: PageLocation
        if let tier {
            guard tiers.indices.contains(tier) else { throw .invalidArgument("tier \(tier) does not exist (\(tiers.count) tiers)") }
            guard let extent = makeRoom(onTier: tier, slots: slotsNeeded(length)) else {
                throw .tierFull(tier: tiers[tier].descriptor.name)
            }
            location = PageLocation(tier: tier, extent: extent)
        } else {
            guard let placed = try allocateForPut(key, slots: slotsNeeded(length), hints: hints) else {
                try dropDeclined(key)
                return
            }
            location = placed
        }
        let stallStart = location.tier > 0 ? monotonicNanoseconds() : 0
        defer { if location.tier > 0 { tierCounters[location.tier].stallNanoseconds.add(Int(monotonicNanoseconds() &- stallStart)) } }
        if let base = UnsafeMutableRawPointer(bitPattern: hostBases[location.tier]) {
            // Host-memory tier: copy, then checksum the source while the stores drain.
            if length > 0 { memcpy(base + Int(location.extent.firstSlot) * slotSize, bytes.baseAddress!, length) }
            try commitPut(key, location: location, length: length, checksum: CRC32C.checksum(bytes), hints: hints)
            return
        }
        let tier = tiers[location.tier]
        let batch = ThreadBatch.current()
        retireSupersededCopy(of: key, onTier: location.tier)
        // A persistent tier records the checksum with the page, so it is needed up front;
        // otherwise it is computed while the write is in flight.
        let early: UInt32? = recordsMetadata[location.tier] ? CRC32C.checksum(bytes) : nil
        batch.append(TierIO(operation: .write, extent: location.extent, buffer: bytes.baseAddress, length: length,
                            key: key, checksum: early ?? 0))
        batch.beginSubmission(inline: inlineTiers[location.tier])
        tier.submit(batch)
        let checksum = early ?? CRC32C.checksum(bytes)
        batch.wait()
        if let failure = batch.firstFailure {
            tier.release(location.extent)
            tierCounters[location.tier].ioErrors.add(1)
            throw .tierIO(tier: tier.descriptor.name, operation: "write", errno: failure.status)
        }
        try commitPut(key, location: location, length: length, checksum: checksum, hints: hints)
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
        defer {
            if tierIndex > 0 {
                let elapsed = monotonicNanoseconds() &- stallStart
                tierCounters[tierIndex].stallNanoseconds.add(Int(elapsed))
                policyEngine.observe(tier: tierIndex, write: false, nanoseconds: elapsed, pages: 1)
                policyEngine.noteLowerTierHit(below: tierIndex - 1)
            }
        }
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
        guard !closedFlag.exchange(true, ordering: .acquiringAndReleasing) else { return }
        shutdown()
    }

    public var isClosed: Bool { closedFlag.load(ordering: .relaxed) }

    // MARK: Put internals

    private func slotsNeeded(_ length: Int) -> Int { max(1, (length + slotSize - 1) / slotSize) }

    @inline(__always)
    private func checkOpen() throws(SpillwayError) {
        if closedFlag.load(ordering: .relaxed) { throw .closed }
    }

    /// An extent for a new page: the policy's placement tier, or the first tier below it whose
    /// policy admits the page (the last tier takes it regardless, unless
    /// `declinedPutsAreDropped`: then nil), making room there if it is full, else the first
    /// lower tier that has or can make room. `storeFull` only when pinned pages leave no way to
    /// free enough contiguous slots.
    func allocateForPut(_ key: PageKey, slots: Int, hints: PageHints) throws(SpillwayError) -> PageLocation? {
        var first = min(policy.initialTier(for: hints, tierCount: tiers.count), tiers.count - 1)
        while !policyEngine.admits(key, hints: hints, tier: first) {
            if first + 1 < tiers.count {
                first += 1
            } else if options.declinedPutsAreDropped {
                return nil
            } else {
                break
            }
        }
        if let extent = tiers[first].allocate(slotCount: slots) {
            if tiers[first].usedSlots > highSlots[first] && first + 1 < tiers.count { wake.signal() }
            return PageLocation(tier: first, extent: extent)
        }
        for index in first..<tiers.count {
            if let extent = makeRoom(onTier: index, slots: slots) {
                return PageLocation(tier: index, extent: extent)
            }
        }
        throw .storeFull(requiredSlots: slots)
    }

    /// A put no tier admitted (`declinedPutsAreDropped`): counted, and an older version of the
    /// key is removed, so the put never leaves stale bytes visible. (Caller holds the key's stripe.)
    func dropDeclined(_ key: PageKey) throws(SpillwayError) {
        counters.declinedPuts.add(1)
        guard directory.contains(key) else { return }
        let (old, release) = try directory.removeEntry(key)
        if let old { policyEngine.removed(key, tier: old.tier) }
        if let old, recordsMetadata[old.tier] { tiers[old.tier].retire(old.extent) }
        if let release { self.release(release) }
        try persistInvalidations(of: key)
    }

    /// Reclaims `tier` until `slots` contiguous slots can be allocated, and allocates them.
    /// Starts with a watermark-sized batch (amortizing the scan over many puts), then keeps
    /// freeing in steps, since fragmentation can hide a contiguous run; gives up when a round
    /// frees nothing (everything left is pinned or being moved).
    private func makeRoom(onTier index: Int, slots: Int) -> Extent? {
        let tier = tiers[index]
        let capacity = tier.descriptor.capacitySlots
        guard slots <= capacity else { return nil }
        var target = index + 1 < tiers.count ? min(lowSlots[index], capacity - slots) : capacity - slots
        for round in 0..<64 {
            if let extent = tier.allocate(slotCount: slots) { return extent }
            let before = tier.usedSlots
            target = max(0, round == 0 ? min(target, before - slots) : min(target, before - max(slots, 8)))
            reclaim(tier: index, toUsedSlots: target)
            if let extent = tier.allocate(slotCount: slots) { return extent }
            if tier.usedSlots >= before { return nil }
        }
        return nil
    }

    /// Makes a written page visible, retires the copy it replaced on a persistent tier, and
    /// makes every superseded persistent copy of the key durably invalid before returning (the
    /// caller holds the key's stripe).
    private func commitPut(_ key: PageKey, location: PageLocation, length: Int, checksum: UInt32, hints: PageHints)
        throws(SpillwayError)
    {
        let replaced: (old: PageLocation?, release: PageLocation?)
        do {
            replaced = try directory.replace(key, location: location, length: length, checksum: checksum, hints: hints)
        } catch {
            tiers[location.tier].release(location.extent)
            throw error
        }
        if let old = replaced.old, recordsMetadata[old.tier] { tiers[old.tier].retire(old.extent) }
        if let vacated = replaced.release { release(vacated) }
        if let old = replaced.old, old.tier != location.tier { policyEngine.removed(key, tier: old.tier) }
        policyEngine.inserted(key, hints: hints, tier: location.tier)
        counters.puts.add(1)
        tierCounters[location.tier].bytesWritten.add(length)
        try persistInvalidations(of: key)
    }

    /// Before a put writes `key` to persistent tier `tier`: retires the current copy if it is on
    /// that tier too, so its release record goes into the same journal append as the new
    /// page's record. (Caller holds the key's stripe; a pinned page is left alone: the put will
    /// fail on it.)
    private func retireSupersededCopy(of key: PageKey, onTier tier: Int) {
        guard recordsMetadata[tier], let current = directory.snapshot(of: key), current.location.tier == tier,
              current.pinCount == 0
        else { return }
        tiers[tier].retire(current.location.extent, supersededByNextRecordOf: key)
    }

    /// Makes every persistent tier's invalidations of `key` durable; a failure fails the
    /// operation (it cannot promise that a restart will not bring back an older version).
    private func persistInvalidations(of key: PageKey) throws(SpillwayError) {
        for index in persistentTiers {
            let status = tiers[index].persistInvalidations(of: key)
            if status != 0 {
                tierCounters[index].ioErrors.add(1)
                throw .tierIO(tier: tiers[index].descriptor.name, operation: "journal invalidation", errno: status)
            }
        }
    }

    private func putChunk(_ requests: UnsafeMutableBufferPointer<PageWrite>, queueDepth: Int) -> Int {
        guard !closedFlag.load(ordering: .relaxed) else {
            for index in requests.indices { requests[index].error = .closed }
            return 0
        }
        let stripes = keyLocks.lock(requests.lazy.map(\.key))
        defer { keyLocks.unlock(stripes: stripes) }
        return withUnsafeTemporaryAllocation(of: (location: PageLocation, checksum: UInt32)?.self, capacity: requests.count) { plans in
            for index in requests.indices {
                plans.initializeElement(at: index, to: nil)
                requests[index].error = nil
                requests[index].declined = false
                let bytes = requests[index].bytes
                guard bytes.count <= options.maxPageSize else {
                    requests[index].error = .pageTooLarge(length: bytes.count, limit: options.maxPageSize)
                    continue
                }
                do throws(SpillwayError) {
                    guard let location = try allocateForPut(requests[index].key, slots: slotsNeeded(bytes.count), hints: requests[index].hints)
                    else {
                        try dropDeclined(requests[index].key)
                        requests[index].declined = true
                        continue
                    }
                    plans[index] = (location, CRC32C.checksum(bytes))
                    retireSupersededCopy(of: requests[index].key, onTier: location.tier)
                } catch {
                    requests[index].error = error
                }
            }
            let batch = ThreadBatch.current()
            for tierIndex in tiers.indices {
                batch.reset()
                for index in requests.indices {
                    guard let plan = plans[index], plan.location.tier == tierIndex else { continue }
                    batch.append(TierIO(operation: .write, extent: plan.location.extent,
                                        buffer: requests[index].bytes.baseAddress, length: requests[index].bytes.count,
                                        key: requests[index].key, checksum: plan.checksum))
                }
                guard batch.count > 0 else { continue }
                batch.maxInFlight = queueDepth
                let stallStart = tierIndex > 0 ? monotonicNanoseconds() : 0
                batch.run(on: tiers[tierIndex], inline: inlineTiers[tierIndex])
                if tierIndex > 0 {
                    let elapsed = monotonicNanoseconds() &- stallStart
                    tierCounters[tierIndex].stallNanoseconds.add(Int(elapsed))
                    policyEngine.observe(tier: tierIndex, write: true, nanoseconds: elapsed, pages: batch.count)
                }
                var entry = 0
                for index in requests.indices {
                    guard let plan = plans[index], plan.location.tier == tierIndex else { continue }
                    let status = batch[entry].status
                    requests[index].latencyNanoseconds = batch[entry].latencyNanoseconds
                    entry += 1
                    if status != 0 {
                        tiers[tierIndex].release(plan.location.extent)
                        tierCounters[tierIndex].ioErrors.add(1)
                        requests[index].error = .tierIO(tier: tiers[tierIndex].descriptor.name, operation: "write", errno: status)
                        plans[index] = nil
                    }
                }
            }
            var succeeded = 0
            for index in requests.indices {
                guard let plan = plans[index] else {
                    if requests[index].declined { succeeded += 1 }
                    continue
                }
                do throws(SpillwayError) {
                    try commitPut(requests[index].key, location: plan.location, length: requests[index].bytes.count, checksum: plan.checksum,
                                  hints: requests[index].hints)
                    succeeded += 1
                } catch {
                    requests[index].error = error
                }
            }
            plans.deinitialize()
            return succeeded
        }
    }

    // MARK: Get internals

    /// Everything after the read of a page that is not a plain top-tier hit: status, checksum,
    /// counters, promotion, and ending the read.
    private func finishRead(_ snapshot: PageSnapshot, buffer: UnsafeRawBufferPointer, status: Int32) throws(SpillwayError) {
        let tierIndex = snapshot.location.tier
        let tier = tiers[tierIndex]
        guard status == 0 else {
            endRead(snapshot)
            tierCounters[tierIndex].ioErrors.add(1)
            throw .tierIO(tier: tier.descriptor.name, operation: "read", errno: status)
        }
        let promoting = tierIndex > 0 && policy.shouldPromote(snapshot.hints, fromTier: tierIndex)
        if tier.descriptor.verifiesReads || promoting {
            let actual = CRC32C.checksum(buffer)
            if actual != snapshot.checksum {
                endRead(snapshot)
                quarantine(snapshot)
                throw .checksumMismatch(key: snapshot.key, tier: tier.descriptor.name, expected: snapshot.checksum, actual: actual)
            }
        }
        // End our read first: the verified bytes are in `buffer`, and a promotion that finds no
        // other readers of the old location releases it at once.
        endRead(snapshot)
        if promoting { promote(snapshot, from: buffer) }
    }

    /// Copies a verified page (already in `buffer`) to the top tier and repoints the directory,
    /// if it is still the same version and unpinned.
    private func promote(_ snapshot: PageSnapshot, from buffer: UnsafeRawBufferPointer) {
        // A key being put or removed is not promoted (never waited for on the read path).
        let stripe = KeyLocks.stripe(snapshot.key)
        guard keyLocks.tryLock(stripe: stripe) else {
            counters.promotionsSkipped.add(1)
            return
        }
        defer { keyLocks.unlock(stripe: stripe) }
        guard let claim = directory.beginMove(snapshot.key, fromTier: snapshot.location.tier) else { return }
        guard claim.version == snapshot.version, let extent = tiers[0].allocate(slotCount: Int(claim.location.extent.slotCount)) else {
            abortMove(claim)
            counters.promotionsSkipped.add(1)
            wake.signal()
            return
        }
        let batch = ThreadBatch.current()
        batch.append(TierIO(operation: .write, extent: extent, buffer: buffer.baseAddress, length: snapshot.length,
                            key: snapshot.key, checksum: snapshot.checksum))
        batch.run(on: tiers[0], inline: inlineTiers[0])
        let destination = PageLocation(tier: 0, extent: extent)
        guard batch[0].status == 0 else {
            tierCounters[0].ioErrors.add(1)
            tiers[0].release(extent)
            abortMove(claim)
            return
        }
        let (committed, vacated) = directory.commitMove(claim, to: destination)
        if committed && recordsMetadata[claim.location.tier] { tiers[claim.location.tier].retire(claim.location.extent) }
        if let vacated { release(vacated) }
        guard committed else {
            tiers[0].release(extent)
            return
        }
        policyEngine.removed(snapshot.key, tier: claim.location.tier)
        policyEngine.inserted(snapshot.key, hints: claim.hints, tier: 0)
        tierCounters[0].promotionsIn.add(1)
        tierCounters[0].bytesWritten.add(snapshot.length)
        if tiers[0].usedSlots > highSlots[0] { wake.signal() }
    }

    private func getChunk(_ requests: UnsafeMutableBufferPointer<PageRead>, queueDepth: Int) -> Int {
        guard !closedFlag.load(ordering: .relaxed) else {
            for index in requests.indices { requests[index].error = .closed }
            return 0
        }
        return withUnsafeTemporaryAllocation(of: PageSnapshot?.self, capacity: requests.count) { snapshots in
            for index in requests.indices {
                requests[index].error = nil
                requests[index].length = 0
                requests[index].latencyNanoseconds = 0
                let snapshot: PageSnapshot?
                do throws(SpillwayError) {
                    snapshot = try directory.beginRead(requests[index].key)
                } catch {
                    snapshots.initializeElement(at: index, to: nil)
                    requests[index].error = error
                    continue
                }
                snapshots.initializeElement(at: index, to: snapshot)
                guard let snapshot else {
                    counters.misses.add(1)
                    requests[index].error = .unknownKey(requests[index].key)
                    continue
                }
                policyEngine.recordRead(snapshot.key, tier: snapshot.location.tier, hints: snapshot.hints)
                if snapshot.isCorrupt {
                    endRead(snapshot)
                    snapshots[index] = nil
                    requests[index].error = .checksumMismatch(key: snapshot.key, tier: tiers[snapshot.location.tier].descriptor.name,
                                                              expected: snapshot.checksum, actual: 0)
                } else if requests[index].buffer.count < snapshot.length {
                    endRead(snapshot)
                    snapshots[index] = nil
                    requests[index].error = .bufferTooSmall(required: snapshot.length, available: requests[index].buffer.count)
                }
            }
            let batch = ThreadBatch.current()
            var succeeded = 0
            for tierIndex in tiers.indices {
                batch.reset()
                for index in requests.indices {
                    guard let snapshot = snapshots[index], snapshot.location.tier == tierIndex else { continue }
                    batch.append(TierIO(operation: .read, extent: snapshot.location.extent,
                                        buffer: requests[index].buffer.baseAddress, length: snapshot.length))
                }
                guard batch.count > 0 else { continue }
                batch.maxInFlight = queueDepth
                let stallStart = tierIndex > 0 ? monotonicNanoseconds() : 0
                batch.run(on: tiers[tierIndex], inline: inlineTiers[tierIndex])
                if tierIndex > 0 {
                    let elapsed = monotonicNanoseconds() &- stallStart
                    tierCounters[tierIndex].stallNanoseconds.add(Int(elapsed))
                    policyEngine.observe(tier: tierIndex, write: false, nanoseconds: elapsed, pages: batch.count)
                    for _ in 0..<batch.count { policyEngine.noteLowerTierHit(below: tierIndex - 1) }
                }
                // Copy statuses out before finishRead reuses the thread's batch for promotions.
                withUnsafeTemporaryAllocation(of: Int32.self, capacity: batch.count) { statuses in
                    for entry in 0..<batch.count { statuses.initializeElement(at: entry, to: batch[entry].status) }
                    var timed = 0
                    for index in requests.indices {
                        guard let snapshot = snapshots[index], snapshot.location.tier == tierIndex else { continue }
                        requests[index].latencyNanoseconds = batch[timed].latencyNanoseconds
                        timed += 1
                    }
                    var entry = 0
                    for index in requests.indices {
                        guard let snapshot = snapshots[index], snapshot.location.tier == tierIndex else { continue }
                        let status = statuses[entry]
                        entry += 1
                        do throws(SpillwayError) {
                            try finishRead(snapshot, buffer: UnsafeRawBufferPointer(start: requests[index].buffer.baseAddress, count: snapshot.length), status: status)
                            requests[index].length = snapshot.length
                            succeeded += 1
                        } catch {
                            requests[index].error = error
                        }
                    }
                }
            }
            snapshots.deinitialize()
            return succeeded
        }
    }

    // MARK: Moving pages

    /// Returns a vacated extent (one the directory no longer points at and nobody reads) to its tier.
    @inline(__always)
    private func release(_ location: PageLocation) {
        tiers[location.tier].release(location.extent)
    }

    @inline(__always)
    private func endRead(_ snapshot: PageSnapshot) {
        if let vacated = directory.endRead(snapshot) { release(vacated) }
    }

    private func abortMove(_ claim: PageSnapshot) {
        if let vacated = directory.abortMove(claim) { release(vacated) }
    }

    /// Drops a page whose bytes failed their checksum: counted, logged, never served.
    /// `keyLocked`: the caller holds the key's stripe (a mover); otherwise it is taken here.
    private func quarantine(_ snapshot: PageSnapshot, keyLocked: Bool = false) {
        let tier = tiers[snapshot.location.tier].descriptor.name
        tierCounters[snapshot.location.tier].checksumFailures.add(1)
        logger.error("checksum mismatch: page dropped", metadata: [
            "key": "\(snapshot.key)", "tier": "\(tier)", "location": "\(snapshot.location)",
        ])
        // A pinned page is marked corrupt instead (never served, removed at its last unpin).
        let drop = {
            let (removed, vacated) = self.directory.removeIfCurrent(snapshot, quarantine: true)
            self.policyEngine.removed(snapshot.key, tier: snapshot.location.tier)
            if removed && self.recordsMetadata[snapshot.location.tier] { self.tiers[snapshot.location.tier].retire(snapshot.location.extent) }
            if let vacated { self.release(vacated) }
        }
        if keyLocked { drop() } else { keyLocks.withLock(snapshot.key, drop) }
    }

    /// Frees slots on `tier` until at most `target` are used: demotes the coldest movable pages
    /// one tier down (making room there first, recursively), or evicts them from the last tier
    /// (or from this one, when nothing below can take them).
    /// Serialized per tier; cascades lock tiers top-down, so they cannot deadlock.
    func reclaim(tier index: Int, toUsedSlots target: Int) {
        guard tiers[index].usedSlots > target else { return }
        let started = DispatchTime.now().uptimeNanoseconds
        defer { metrics.recordReclaim(tier: index, nanoseconds: Int64(DispatchTime.now().uptimeNanoseconds - started)) }
        reclaimLocks[index].withLock { _ in
            var offeredInVain = 0
            var resynchronized = false
            while tiers[index].usedSlots > target, !closedFlag.load(ordering: .relaxed) {
                let excess = tiers[index].usedSlots - target
                let count = min(excess, 4096)
                var victims = policyEngine.victims(tier: index, count: count)
                if victims.isEmpty {
                    // The tier holds pages its policy does not track (it never loses one, but a
                    // bug must cost a scan, not a full tier): hand them to it and try again.
                    guard !resynchronized else { break }
                    resynchronized = true
                    resynchronizePolicy(tier: index)
                    victims = policyEngine.victims(tier: index, count: count)
                    if victims.isEmpty { break }
                }
                var progressed = 0
                var start = 0
                while start < victims.count {
                    let end = min(victims.count, start + ThreadBatch.moveChunk)
                    let chunk = Array(victims[start..<end])
                    start = end
                    guard tiers[index].usedSlots > target else {
                        // Taken but not needed after all: back to the policy.
                        retrack(chunk, tier: index)
                        continue
                    }
                    if let destination = policyEngine.demotionTarget(from: index, isFull: { self.tiers[$0].usedSlots >= self.highSlots[$0] }) {
                        let moved = movePages(chunk, from: index, to: destination)
                        // Nothing below could take them (full of pinned pages): a cache drops
                        // its coldest pages rather than refuse new ones.
                        progressed += moved > 0 ? moved : evict(chunk, tier: index)
                    } else {
                        progressed += evict(chunk, tier: index)
                    }
                }
                // Victims that could not leave (pinned, busy) went back to the policy's
                // protected end, so asking again offers others; give up once every page the
                // policy tracks was offered without any leaving.
                if progressed == 0 {
                    offeredInVain += victims.count
                    if offeredInVain > policyEngine.trackedCount(tier: index) { break }
                } else {
                    offeredInVain = 0
                }
            }
        }
    }

    /// Moves every page whose extent overlaps `slots` on `tier` to the tier below (else the one
    /// above), making room there as usual. Returns how many pages are still in the range
    /// (pinned or failed moves); the tier must not give the range up unless this is 0.
    func evacuate(tier index: Int, slots: Range<Int>) -> Int {
        func pagesInRange() -> [PageKey] {
            directory.allPages().filter { page in
                page.location.tier == index && Int(page.location.extent.firstSlot) < slots.upperBound
                    && Int(page.location.extent.endSlot) > slots.lowerBound
            }.map(\.key)
        }
        let targets = (index + 1 < tiers.count ? [index + 1] : []) + (index > 0 ? [index - 1] : [])
        var moved = 0
        for _ in 0..<3 {
            let keys = pagesInRange()
            if keys.isEmpty { break }
            for target in targets {
                var start = 0
                while start < keys.count {
                    let end = min(keys.count, start + ThreadBatch.moveChunk)
                    moved += movePages(Array(keys[start..<end]), from: index, to: target)
                    start = end
                }
            }
        }
        let left = pagesInRange().count
        logger.notice("tier gave up space: pages moved off it", metadata: [
            "tier": "\(tiers[index].descriptor.name)", "slots": "\(slots)", "moved": "\(moved)", "left": "\(left)",
        ])
        return left
    }

    /// Hands back to `tier`'s policy the pages among `keys` still there that it does not track
    /// (victims that could not leave: busy, pinned, a failed move).
    func retrack(_ keys: some Sequence<PageKey>, tier: Int) {
        for key in keys {
            guard let snapshot = directory.snapshot(of: key), snapshot.location.tier == tier else { continue }
            policyEngine.track(key, hints: snapshot.hints, tier: tier)
        }
    }

    /// Hands every page on `tier` its policy does not track to the policy (a full scan of the
    /// directory; logged, since it means some path lost track of a page).
    func resynchronizePolicy(tier: Int) {
        let pages = directory.allPages().filter { $0.location.tier == tier && !$0.isCorrupt }
        var added = 0
        for page in pages where policyEngine.track(page.key, hints: page.hints, tier: tier) { added += 1 }
        if added > 0 {
            logger.warning("policy resynchronized with the directory", metadata: ["tier": "\(tiers[tier].descriptor.name)", "pages": "\(added)"])
        }
    }

    private func evict(_ keys: [PageKey], tier index: Int) -> Int {
        var evicted = 0
        for key in keys {
            // A busy key (being put or removed) is skipped, never waited for.
            // A put making room may hold the victim's stripe itself: then it may evict it, but
            // not from a persistent tier (a batch put may already have retired that copy).
            let stripe = KeyLocks.stripe(key)
            guard let lock = keyLocks.tryLockUnlessOwned(stripe: stripe), lock.locked || !recordsMetadata[index] else {
                retrack([key], tier: index)
                continue
            }
            defer { if lock.locked { keyLocks.unlock(stripe: stripe) } }
            guard let snapshot = directory.snapshot(of: key), snapshot.location.tier == index else { continue }
            guard snapshot.pinCount == 0 else {
                policyEngine.track(key, hints: snapshot.hints, tier: index)
                continue
            }
            let (removed, vacated) = directory.removeIfCurrent(snapshot)
            if removed && recordsMetadata[index] { tiers[index].retire(snapshot.location.extent) }
            if let vacated { release(vacated) }
            guard removed else {
                retrack([key], tier: index)
                continue
            }
            policyEngine.removed(key, tier: index)
            tierCounters[index].evictions.add(1)
            evicted += 1
        }
        return evicted
    }

    /// Moves pages from tier `source` to tier `target` (one batch of reads, one of writes),
    /// verifying each page's CRC32C on the way. Returns how many moved.
    func movePages(_ keys: [PageKey], from source: Int, to target: Int) -> Int {
        precondition(source != target && keys.count <= ThreadBatch.moveChunk)
        // Make room first, before claiming anything (claims hold reader counts).
        var needed = 0
        for key in keys {
            if let snapshot = directory.snapshot(of: key), snapshot.location.tier == source {
                needed += Int(snapshot.location.extent.slotCount)
            }
        }
        guard needed > 0 else { return 0 }
        let targetTier = tiers[target]
        if targetTier.freeSlots < needed {
            let capacity = targetTier.descriptor.capacitySlots
            let goal = target + 1 < tiers.count && target > source ? min(lowSlots[target], capacity - needed) : capacity - needed
            reclaim(tier: target, toUsedSlots: max(0, goal))
        }
        var moves: [(claim: PageSnapshot, destination: Extent)] = []
        moves.reserveCapacity(keys.count)
        // Held from the claim to the commit, so a put or remove of the key cannot interleave
        // with the move's journal record; busy keys are skipped (the caller may hold stripes).
        var held = HeldStripes()
        defer { held.releaseAll(in: keyLocks) }
        for key in keys {
            guard held.tryAcquire(key, in: keyLocks), let claim = directory.beginMove(key, fromTier: source) else {
                retrack([key], tier: source)
                continue
            }
            guard let extent = targetTier.allocate(slotCount: Int(claim.location.extent.slotCount)) else {
                abortMove(claim)
                retrack([key], tier: source)
                continue
            }
            moves.append((claim, extent))
        }
        guard !moves.isEmpty else { return 0 }
        let copyStart = monotonicNanoseconds()
        let statuses = copy(moves, from: source, to: target)
        policyEngine.observe(tier: target, write: true, nanoseconds: monotonicNanoseconds() &- copyStart, pages: moves.count)
        var moved = 0
        for (index, move) in moves.enumerated() {
            let destination = PageLocation(tier: target, extent: move.destination)
            switch statuses[index] {
            case .copied:
                let (committed, vacated) = directory.commitMove(move.claim, to: destination)
                if committed && recordsMetadata[source] { tiers[source].retire(move.claim.location.extent) }
                if let vacated { release(vacated) }
                if committed {
                    policyEngine.removed(move.claim.key, tier: source)
                    policyEngine.inserted(move.claim.key, hints: move.claim.hints, tier: target)
                    if target > source {
                        tierCounters[source].demotionsOut.add(1)
                    } else {
                        tierCounters[target].promotionsIn.add(1)
                    }
                    tierCounters[target].bytesWritten.add(move.claim.length)
                    moved += 1
                } else {
                    targetTier.release(move.destination)
                    retrack([move.claim.key], tier: source)
                }
            case .failed(let errno, let tierIndex):
                tierCounters[tierIndex].ioErrors.add(1)
                logger.warning("tier move failed", metadata: [
                    "key": "\(move.claim.key)", "tier": "\(tiers[tierIndex].descriptor.name)", "errno": "\(errno)",
                ])
                targetTier.release(move.destination)
                abortMove(move.claim)
                retrack([move.claim.key], tier: source)
            case .corrupt(let actual):
                targetTier.release(move.destination)
                abortMove(move.claim)
                logger.error("checksum mismatch during move", metadata: [
                    "expected": "\(move.claim.checksum)", "actual": "\(actual)",
                ])
                quarantine(move.claim, keyLocked: true)
            }
        }
        return moved
    }

    private enum CopyStatus {
        case copied
        case failed(errno: Int32, tier: Int)
        case corrupt(actual: UInt32)
    }

    /// The data movement of `movePages`: straight into the target's host arena, straight out of
    /// the source's, or (neither is host memory) one page at a time through a staging buffer.
    private func copy(_ moves: [(claim: PageSnapshot, destination: Extent)], from source: Int, to target: Int) -> [CopyStatus] {
        let batch = ThreadBatch.current()
        let sourceTier = tiers[source]
        let targetTier = tiers[target]
        func verify(_ base: UnsafeMutableRawPointer, _ move: (claim: PageSnapshot, destination: Extent)) -> CopyStatus {
            let actual = CRC32C.checksum(UnsafeRawBufferPointer(start: base, count: move.claim.length))
            return actual == move.claim.checksum ? .copied : .corrupt(actual: actual)
        }
        if let arena = targetTier.hostMemory {
            for move in moves {
                batch.append(TierIO(operation: .read, extent: move.claim.location.extent,
                                    buffer: arena.baseAddress! + Int(move.destination.firstSlot) * slotSize, length: move.claim.length))
            }
            batch.run(on: sourceTier, inline: inlineTiers[source])
            return moves.indices.map { index in
                let status = batch[index].status
                guard status == 0 else { return .failed(errno: status, tier: source) }
                return verify(arena.baseAddress! + Int(moves[index].destination.firstSlot) * slotSize, moves[index])
            }
        }
        if let arena = sourceTier.hostMemory {
            var statuses = [CopyStatus](repeating: .copied, count: moves.count)
            var entries: [Int] = []
            for (index, move) in moves.enumerated() {
                let bytes = arena.baseAddress! + Int(move.claim.location.extent.firstSlot) * slotSize
                statuses[index] = verify(bytes, move)
                guard case .copied = statuses[index] else { continue }
                batch.append(TierIO(operation: .write, extent: move.destination, buffer: bytes, length: move.claim.length,
                                    key: move.claim.key, checksum: move.claim.checksum))
                entries.append(index)
            }
            guard batch.count > 0 else { return statuses }
            batch.run(on: targetTier, inline: inlineTiers[target])
            for (entry, index) in entries.enumerated() where batch[entry].status != 0 {
                statuses[index] = .failed(errno: batch[entry].status, tier: target)
            }
            return statuses
        }
        return moves.map { move in
            staging.withBuffer { buffer -> CopyStatus in
                batch.reset()
                batch.append(TierIO(operation: .read, extent: move.claim.location.extent, buffer: buffer, length: move.claim.length))
                batch.run(on: sourceTier, inline: inlineTiers[source])
                guard batch[0].status == 0 else { return .failed(errno: batch[0].status, tier: source) }
                let verdict = verify(buffer, move)
                guard case .copied = verdict else { return verdict }
                batch.reset()
                batch.append(TierIO(operation: .write, extent: move.destination, buffer: buffer, length: move.claim.length,
                                    key: move.claim.key, checksum: move.claim.checksum))
                batch.run(on: targetTier, inline: inlineTiers[target])
                return batch[0].status == 0 ? .copied : .failed(errno: batch[0].status, tier: target)
            }
        }
    }

    // MARK: Background worker

    private func drainPrefetchQueue() {
        while true {
            let keys: [PageKey] = prefetchQueue.withLock { queue in
                let count = min(queue.count, ThreadBatch.moveChunk)
                defer { queue.removeFirst(count) }
                return Array(queue.prefix(count))
            }
            if keys.isEmpty { return }
            var byTier: [Int: [PageKey]] = [:]
            for key in keys {
                if let snapshot = directory.snapshot(of: key), snapshot.location.tier > 0 {
                    byTier[snapshot.location.tier, default: []].append(key)
                }
            }
            for (tier, keys) in byTier.sorted(by: { $0.key < $1.key }) {
                _ = movePages(keys, from: tier, to: 0)
            }
        }
    }

    private func shutdown() {
        closedFlag.store(true, ordering: .releasing)
        wake.signal()
        let thread = worker.withLock { thread -> BackgroundThread? in
            defer { thread = nil }
            return thread
        }
        thread?.join()
        publishMetrics()
        for tier in tiers { tier.close() }
        logger.info("store closed")
    }
}

/// Staging buffers for moves between two tiers that are not host memory (e.g. device ↔ NVMe).
/// At most `limit` exist, each `bufferBytes` long, allocated on first need and reused; a
/// mover that finds none free yields until one is.
final class StagingPool: Sendable {
    private let bufferBytes: Int
    private let limit = 2
    private let state = Locked<(free: [UInt], created: Int)>(([], 0))

    init(bufferBytes: Int) { self.bufferBytes = bufferBytes }

    deinit {
        state.withLock { state in
            for address in state.free { UnsafeMutableRawPointer(bitPattern: address)?.deallocate() }
        }
    }

    func withBuffer<R>(_ body: (UnsafeMutableRawPointer) -> R) -> R {
        var address: UInt = 0
        while address == 0 {
            address = state.withLock { state -> UInt in
                if let free = state.free.popLast() { return free }
                guard state.created < limit else { return 0 }
                state.created += 1
                return UInt(bitPattern: UnsafeMutableRawPointer.allocate(byteCount: bufferBytes, alignment: 4096))
            }
            if address == 0 { sched_yield() }
        }
        defer { state.withLock { $0.free.append(address) } }
        return body(UnsafeMutableRawPointer(bitPattern: address)!)
    }
}
