import Histogram
import Spillway
import SpillwayServer

#if canImport(Glibc)
import Glibc
#endif

/// The access pattern of a benchmark run (fio's names).
public enum BenchPattern: String, CaseIterable, Sendable {
    case randread, randwrite, read, write

    public var isRead: Bool { self == .randread || self == .read }
    public var isRandom: Bool { self == .randread || self == .randwrite }
}

/// What `spillway bench <tier>` measures.
public struct BenchOptions: Sendable, Equatable {
    /// `device`, `dram`, or `tiered` (the configured hierarchy as one store).
    public var target: String
    public var pattern: BenchPattern
    public var blockSize: Int
    public var queueDepth: Int
    public var durationSeconds: Double
    /// Working set in bytes; the tier is sized to hold it.
    public var size: Int
    public var seed: UInt64
    /// Time one operation (or batch) in this many; 1 = every one.
    public var latencySampleEvery: Int
    /// NVMe: the scratch file (created or overwritten); nil = one in the scratch directory.
    public var file: String?
    /// NVMe: what an acknowledged write survives (`power` adds RWF_DSYNC).
    public var durability: NVMeDurability = .process
    /// Remote: daemons (HOST:PORT); empty = in-process daemons on loopback.
    public var servers: [String] = []
    /// Each server's failure domain (erasure-coded), or empty.
    public var failureDomains: [String] = []
    /// Instead of `servers`: a cluster's etcd registry, followed while the bench runs.
    public var etcd: String?
    public var cluster: String?
    /// Remote: the client's token file.
    public var tokenFile: String?
    /// Remote: page transport and libfabric provider (`--transport`, `--fabric-provider`).
    public var transport: TransportMode = .auto
    public var fabricProvider: String?
    /// Erasure-coded: RS(k, r) and the late-binding Δ (0 = off).
    public var k = 4
    public var r = 2
    public var lateBindingDelta = 1
    /// Erasure-coded with in-process daemons: after the prefill, stop this many daemons
    /// (the first holds data split 0 of the first page) — degraded reads.
    public var killDaemons = 0
    /// Erasure-coded with in-process daemons: after the prefill, the daemon holding data
    /// split 0 of the first page answers every page request this late — a slow daemon.
    public var slowDaemonMicroseconds = 0
    /// The placement policy of the store a single-tier run builds (`StorePolicy.names`).
    public var policy = StorePolicy.defaultName

    public init(target: String, pattern: BenchPattern = .randread, blockSize: Int = 4096, queueDepth: Int = 1,
                durationSeconds: Double = 5, size: Int = 64 << 20, seed: UInt64 = 42, latencySampleEvery: Int = 16)
    {
        self.target = target
        self.pattern = pattern
        self.blockSize = blockSize
        self.queueDepth = queueDepth
        self.durationSeconds = durationSeconds
        self.size = size
        self.seed = seed
        self.latencySampleEvery = latencySampleEvery
        file = nil
    }

    public func validate() throws(SpillwayError) {
        guard blockSize >= 4096, blockSize <= 2 << 20, blockSize & (blockSize - 1) == 0 else {
            throw .invalidArgument("--block-size \(blockSize) must be a power of two between 4KiB and 2MiB (it is the slot size)")
        }
        guard queueDepth >= 1, queueDepth <= 1024 else { throw .invalidArgument("--queue-depth must be between 1 and 1024") }
        guard durationSeconds > 0, durationSeconds <= 86_400 else { throw .invalidArgument("--duration must be between 0 and 86400 seconds") }
        guard size >= blockSize else { throw .invalidArgument("--size \(size) must hold at least one block of \(blockSize)") }
        guard latencySampleEvery >= 1 else { throw .invalidArgument("latency sampling interval must be at least 1") }
    }
}

/// One run's numbers; `json` is the schema every `spillway bench` prints.
public struct BenchResult: Sendable {
    public var tier: String
    public var pattern: BenchPattern
    public var blockSize: Int
    public var queueDepth: Int
    public var ops: Int
    public var seconds: Double
    public var p50: UInt64
    public var p99: UInt64
    public var p999: UInt64
    public var max: UInt64
    public var workingSetBytes: Int
    public var seed: UInt64
    public var latencySampleEvery: Int
    public var errors: Int
    public var verifiedPages: Int
    /// Operations per store call (queue depth, or a multiple of it with the depth as the
    /// in-flight window on queueing tiers).
    public var batchSize: Int = 0
    public var stats: StoreStats?
    /// NVMe runs: the file, where its data region starts, and how the ring drives it.
    public var nvme: (file: String, dataOffset: Int, mode: String, directIO: Bool)?
    /// Remote runs: the page transport in use ("rma" | "tcp") and why it was chosen.
    public var transport: (name: String, reason: String)?

    public var iops: Double { seconds > 0 ? Double(ops) / seconds : 0 }
    public var bytesPerSecond: Double { iops * Double(blockSize) }

    public var json: JSONValue {
        var members: [(String, JSONValue)] = [
            ("tier", .string(tier)), ("pattern", .string(pattern.rawValue)), ("block_size", .int(blockSize)),
            ("queue_depth", .int(queueDepth)), ("ops", .int(ops)), ("iops", .double(iops)),
            ("bytes_per_s", .double(bytesPerSecond)),
            ("latency_ns", .object([
                ("p50", .int(Int(p50))), ("p99", .int(Int(p99))), ("p999", .int(Int(p999))), ("max", .int(Int(max))),
            ])),
            ("duration_s", .double(seconds)), ("working_set_bytes", .int(workingSetBytes)), ("seed", .int(Int(bitPattern: UInt(seed)))),
            ("latency_sample_every", .int(latencySampleEvery)), ("errors", .int(errors)), ("verified_pages", .int(verifiedPages)),
            ("batch_size", .int(batchSize)),
        ]
        if let nvme {
            members.append(("file", .string(nvme.file)))
            members.append(("data_offset", .int(nvme.dataOffset)))
            members.append(("io_mode", .string(nvme.mode)))
            members.append(("direct_io", .bool(nvme.directIO)))
        }
        if let transport {
            members.append(("transport", .string(transport.name)))
            members.append(("transport_reason", .string(transport.reason)))
        }
        if let stats {
            members.append(("policy", .string(stats.policy)))
            members.append(("policy_reads_dropped", .int(stats.policyReadsDropped)))
            members.append(("tiers", .array(stats.tiers.map { tier in
                .object([
                    ("name", .string(tier.name)), ("kind", .string(tier.kind)), ("hits", .int(tier.hits)),
                    ("used_slots", .int(tier.usedSlots)), ("capacity_slots", .int(tier.capacitySlots)),
                    ("promotions", .int(tier.promotionsIn)), ("demotions", .int(tier.demotionsOut)),
                    ("evictions", .int(tier.evictions)), ("checksum_failures", .int(tier.checksumFailures)),
                    ("stall_ns", .int(tier.stallNanoseconds)),
                ])
            })))
            members.append(("goodput", .double(stats.goodput)))
        }
        return .object(members)
    }
}

/// Runs benchmarks against a store built for the purpose: the tier under test alone, sized to
/// hold the working set, or (`tiered`) a given multi-tier configuration.
public enum BenchRunner {
    /// The store a single-tier run uses: exactly the working set plus slack for copy-on-write
    /// overwrites (a `put` writes the new version before freeing the old one).
    public static func configuration(for options: BenchOptions) throws(SpillwayError) -> SpillwayConfiguration {
        guard let kind = TierKind(rawValue: options.target) else {
            throw .invalidArgument("unknown tier '\(options.target)' (available: device, dram, nvme, remote, ec, tiered)")
        }
        let pages = options.size / options.blockSize
        // Room for one batch of new versions before the old ones are released (copy-on-write),
        // so a write benchmark never evicts its own working set.
        let slack = max(64, 2 * batchSize(for: options, windowed: kind == .nvme && options.queueDepth > 1))
        var tier = TierConfiguration(kind: kind, capacity: (pages + slack) * options.blockSize)
        if kind == .nvme {
            // A scratch file: overwritten without asking, never recovered.
            tier.path = if let file = options.file { file } else { try ScratchDirectory.file("spillway-bench.nvme") }
            tier.reformat = true
            tier.durability = options.durability
        }
        if kind == .remote || kind == .erasureCoded {
            tier.servers = options.servers
            tier.failureDomains = options.failureDomains
            tier.etcd = options.etcd
            tier.cluster = options.cluster
            tier.tokenFile = options.tokenFile
            if kind == .remote {
                tier.transport = options.transport
                tier.fabricProvider = options.fabricProvider
            }
            tier.k = options.k
            tier.r = options.r
            tier.lateBindingDelta = options.lateBindingDelta
        }
        return SpillwayConfiguration(slotSize: options.blockSize, maxPageSize: options.blockSize, policy: options.policy, tiers: [tier])
    }

    /// Operations per store call: the queue depth, or for windowed (queueing) tiers 16× it,
    /// capped at 1024 operations and 64 MiB of buffers.
    static func batchSize(for options: BenchOptions, windowed: Bool) -> Int {
        guard windowed else { return options.queueDepth }
        return max(options.queueDepth, min(options.queueDepth * 16, 1024, (64 << 20) / options.blockSize))
    }

    public static func run(_ options: BenchOptions, configuration given: SpillwayConfiguration? = nil,
                           progress: ProgressBar? = nil) throws(SpillwayError) -> BenchResult
    {
        try options.validate()
        let configuration: SpillwayConfiguration
        if let given { configuration = given } else { configuration = try Self.configuration(for: options) }
        guard configuration.slotSize == options.blockSize else {
            throw .invalidArgument("--block-size \(options.blockSize) must equal the configuration's slot-size \(configuration.slotSize)")
        }
        let daemons = InProcessDaemons()
        let store = try TieredStore.open(configuration, daemons: daemons)
        defer { store.close() }
        let pages = options.size / options.blockSize
        let blockSize = options.blockSize
        let queueDepth = options.queueDepth
        // Tiers that queue I/O (NVMe) get batches several times the queue depth with the depth
        // as their in-flight window, so the device sees a sustained queue depth (as fio keeps
        // it), and report each I/O's own latency. Memory tiers run one batch of `queueDepth`.
        let windowed = queueDepth > 1 && configuration.tiers.count == 1 && configuration.tiers[0].kind == .nvme
        let batchSize = Self.batchSize(for: options, windowed: windowed)
        // Reads on a queueing tier keep two submitted batches in flight (`submitGet`), each
        // with half the queue depth as its window: while one batch finishes (checksums,
        // directory) the other keeps the device queue full, so the depth holds across calls as
        // fio's does. Writes stay one batch at a time: two concurrent put batches measured
        // slower here (4K QD32: 66–69k IOPS against 72–75k on this 2-core VM), reads faster
        // (91–99k against 73–90k).
        let lanes = windowed && options.pattern.isRead ? 2 : 1
        let laneDepth = lanes == 2 ? max(1, queueDepth / 2) : queueDepth

        // Buffers and request arrays allocated once; the timed loop allocates nothing.
        let buffers = UnsafeMutableRawPointer.allocate(byteCount: blockSize * batchSize * lanes, alignment: 4096)
        defer { buffers.deallocate() }
        let reads = UnsafeMutableBufferPointer<PageRead>.allocate(capacity: batchSize * lanes)
        let writes = UnsafeMutableBufferPointer<PageWrite>.allocate(capacity: batchSize * lanes)
        defer { reads.deallocate(); writes.deallocate() }
        for index in 0..<(batchSize * lanes) {
            let buffer = UnsafeMutableRawBufferPointer(start: buffers + index * blockSize, count: blockSize)
            reads.initializeElement(at: index, to: PageRead(key: PageKey(0), buffer: buffer))
            writes.initializeElement(at: index, to: PageWrite(key: PageKey(0), bytes: UnsafeRawBufferPointer(buffer)))
        }

        // Prefill (untimed): every page gets content derived from its key and the seed.
        // Batched (64 pages per submission), so a large NVMe working set fills quickly.
        let prefillBatch = 64
        let prefillBuffers = UnsafeMutableRawPointer.allocate(byteCount: blockSize * prefillBatch, alignment: 4096)
        defer { prefillBuffers.deallocate() }
        let prefillWrites = UnsafeMutableBufferPointer<PageWrite>.allocate(capacity: prefillBatch)
        defer { prefillWrites.deallocate() }
        var page = 0
        while page < pages {
            let count = min(prefillBatch, pages - page)
            for index in 0..<count {
                let buffer = UnsafeMutableRawBufferPointer(start: prefillBuffers + index * blockSize, count: blockSize)
                Self.fillPage(buffer, key: UInt64(page + index), seed: options.seed)
                prefillWrites.initializeElement(at: index, to: PageWrite(key: PageKey(UInt64(page + index)), bytes: UnsafeRawBufferPointer(buffer)))
            }
            let chunk = UnsafeMutableBufferPointer(rebasing: prefillWrites[0..<count])
            if store.put(batch: chunk) != count {
                let error = chunk.first(where: { $0.error != nil })?.error ?? .storeFull(requiredSlots: 1)
                throw error
            }
            page += count
            if page & 1023 == 0 { progress?.update(fraction: 0, detail: "prefill \(page)/\(pages)") }
        }
        if options.killDaemons > 0 || options.slowDaemonMicroseconds > 0 {
            let embedded = (store.tiers.first as? ErasureCodedTier).map { daemons.servers(ofTier: $0.descriptor.name) } ?? []
            guard let coded = store.tiers.first as? ErasureCodedTier, embedded.count == coded.clients.count,
                  options.killDaemons <= coded.configuration.r
            else {
                throw .invalidArgument("--kill-daemons (≤ r) and --slow-daemon-us need the ec tier on in-process daemons (no --servers)")
            }
            guard let first = coded.daemonOf(slot: 0, split: 0) else { throw .invalidArgument("the ec tier has no mapped stripe to fault") }
            if options.slowDaemonMicroseconds > 0 {
                embedded[first].testDelayMicroseconds.store(options.slowDaemonMicroseconds, ordering: .relaxed)
            }
            if options.killDaemons > 0 {
                let victims = [first] + embedded.indices.filter { $0 != first }.prefix(options.killDaemons - 1)
                for victim in victims { embedded[victim].shutdown(drain: 0) }
            }
        }
        // Written blocks carry one recognizable pattern (checked after the run).
        Self.fillPage(UnsafeMutableRawBufferPointer(start: buffers, count: blockSize), key: .max, seed: options.seed)
        for index in 1..<max(1, batchSize * lanes) {
            memcpy(buffers + index * blockSize, buffers, blockSize)
        }

        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var random = SplitMix64(seed: options.seed)
        var cursor = 0
        var ops = 0
        var errors = 0
        var iteration = 0
        let sampleEvery = options.latencySampleEvery
        let durationNanos = UInt64(options.durationSeconds * 1e9)
        let start = monotonicNanoseconds()
        var now = start
        let isRead = options.pattern.isRead
        let isRandom = options.pattern.isRandom

        var tickets: [StoreTicket?] = [nil, nil]
        var ticketsTimed = [false, false]
        /// Waits for lane `lane`'s submitted batch, counting its errors and (if sampled) each
        /// request's latency.
        func finishLane(_ lane: Int) {
            guard let ticket = tickets[lane] else { return }
            errors += batchSize - ticket.wait()
            tickets[lane] = nil
            guard ticketsTimed[lane] else { return }
            for index in (lane * batchSize)..<((lane + 1) * batchSize) {
                let latency = isRead ? reads[index].latencyNanoseconds : writes[index].latencyNanoseconds
                if latency > 0 { _ = histogram.record(latency) }
            }
        }
        while true {
            let lane = iteration % lanes
            finishLane(lane)
            for slot in 0..<batchSize {
                let index = lane * batchSize + slot
                let page: Int
                if isRandom {
                    page = Int(random.next() % UInt64(pages))
                } else {
                    page = cursor
                    cursor += 1
                    if cursor == pages { cursor = 0 }
                }
                if isRead { reads[index].key = PageKey(UInt64(page)) } else { writes[index].key = PageKey(UInt64(page)) }
            }
            let timed = iteration % sampleEvery == 0
            let before = timed ? monotonicNanoseconds() : 0
            if windowed {
                let first = lane * batchSize
                ticketsTimed[lane] = timed
                tickets[lane] = isRead
                    ? store.submitGet(batch: UnsafeMutableBufferPointer(rebasing: reads[first..<(first + batchSize)]), queueDepth: laneDepth)
                    : store.submitPut(batch: UnsafeMutableBufferPointer(rebasing: writes[first..<(first + batchSize)]), queueDepth: laneDepth)
            } else if queueDepth == 1 {
                do throws(SpillwayError) {
                    if isRead {
                        try store.get(reads[0].key, into: reads[0].buffer)
                    } else {
                        try store.put(writes[0].key, writes[0].bytes)
                    }
                } catch {
                    errors += 1
                }
            } else {
                let succeeded = isRead ? store.get(batch: reads, queueDepth: queueDepth) : store.put(batch: writes, queueDepth: queueDepth)
                errors += batchSize - succeeded
            }
            if timed && windowed {
                now = monotonicNanoseconds()  // its latencies are recorded when the lane is waited for
            } else if timed {
                now = monotonicNanoseconds()
                if queueDepth > 1 {
                    // Each request's own latency (submission to its completion), which every
                    // tier reports for batch calls; never the batch's time spread evenly.
                    for index in 0..<batchSize {
                        let latency = isRead ? reads[index].latencyNanoseconds : writes[index].latencyNanoseconds
                        if latency > 0 { _ = histogram.record(latency) }
                    }
                } else {
                    _ = histogram.record(now - before)
                }
            }
            ops += batchSize
            iteration += 1
            if iteration & 63 == 0 {
                if !timed { now = monotonicNanoseconds() }
                let elapsed = now - start
                if elapsed >= durationNanos { break }
                progress?.update(fraction: Double(elapsed) / Double(durationNanos),
                                 detail: "\(options.target) \(options.pattern.rawValue) \(ops) ops")
            }
        }
        for lane in 0..<lanes { finishLane(lane) }
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        progress?.finish()

        // Check what the run left behind: every sampled page holds its prefill or the written pattern.
        let verified = try verifySample(store: store, pages: pages, options: options, written: buffers)
        let empty = histogram.totalCount == 0
        var nvme: (file: String, dataOffset: Int, mode: String, directIO: Bool)?
        if configuration.tiers.count == 1, let tier = store.tiers[0] as? NVMeTier {
            nvme = (tier.path, tier.dataOffset, tier.mode.rawValue, tier.directIO)
        }
        return BenchResult(
            tier: options.target, pattern: options.pattern, blockSize: blockSize, queueDepth: queueDepth, ops: ops,
            seconds: seconds, p50: empty ? 0 : histogram.valueAtPercentile(50), p99: empty ? 0 : histogram.valueAtPercentile(99),
            p999: empty ? 0 : histogram.valueAtPercentile(99.9), max: empty ? 0 : histogram.max,
            workingSetBytes: pages * blockSize, seed: options.seed, latencySampleEvery: sampleEvery, errors: errors,
            verifiedPages: verified, batchSize: batchSize, stats: store.stats(), nvme: nvme,
            transport: (store.tiers.first as? RemoteTier).map { ($0.transport, $0.transportReason) })
    }

    /// Deterministic page content from (key, seed): any process can regenerate and check it.
    public static func fillPage(_ buffer: UnsafeMutableRawBufferPointer, key: UInt64, seed: UInt64) {
        var generator = SplitMix64(seed: seed ^ key &* 0x9E37_79B9_7F4A_7C15)
        let words = buffer.count / 8
        let base = buffer.baseAddress!
        for index in 0..<words {
            base.storeBytes(of: generator.next(), toByteOffset: index * 8, as: UInt64.self)
        }
        for index in (words * 8)..<buffer.count {
            base.storeBytes(of: UInt8(truncatingIfNeeded: generator.next()), toByteOffset: index, as: UInt8.self)
        }
    }

    private static func verifySample(store: TieredStore, pages: Int, options: BenchOptions,
                                     written: UnsafeMutableRawPointer) throws(SpillwayError) -> Int
    {
        let blockSize = options.blockSize
        let readBack = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 4096)
        let expected = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 4096)
        defer { readBack.deallocate(); expected.deallocate() }
        var random = SplitMix64(seed: options.seed &+ 1)
        let samples = min(pages, 4096)
        for sample in 0..<samples {
            let page = pages <= 4096 ? sample : Int(random.next() % UInt64(pages))
            let length = try store.get(PageKey(UInt64(page)), into: readBack)
            fillPage(expected, key: UInt64(page), seed: options.seed)
            let matchesPrefill = length == blockSize && memcmp(readBack.baseAddress!, expected.baseAddress!, blockSize) == 0
            let matchesWrite = length == blockSize && memcmp(readBack.baseAddress!, written, blockSize) == 0
            guard matchesPrefill || (!options.pattern.isRead && matchesWrite) else {
                throw .invalidArgument("verification failed: page \(page) holds bytes that were never written to it")
            }
        }
        return samples
    }
}

extension SpillwayConfiguration {
    /// NVMe tiers without an explicit path get a benchmark scratch file of their own
    /// (`spillway-bench-<tier>.nvme` in the scratch directory), and every NVMe tier is
    /// reformatted at open.
    public mutating func useBenchmarkScratchFiles() throws(SpillwayError) {
        for index in tiers.indices where tiers[index].kind == .nvme {
            tiers[index].reformat = true
            if tiers[index].path == nil { tiers[index].path = try ScratchDirectory.file("spillway-bench-\(tiers[index].name).nvme") }
        }
    }
}
