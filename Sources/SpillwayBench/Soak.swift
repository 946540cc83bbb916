import Histogram
import Spillway
import SpillwayServer

#if canImport(Glibc)
import Glibc
#endif

/// Options of `spillway pool soak`.
public struct SoakOptions: Sendable {
    public var servers: [String] = []
    /// Each server's failure domain, or empty.
    public var failureDomains: [String] = []
    /// Instead of `servers`: a cluster's etcd registry, followed while the soak runs (daemons
    /// that register join the pool, those that leave are lost and repaired around).
    public var etcd: String?
    public var cluster: String?
    public var tokenFile: String?
    public var k = 4
    public var r = 2
    public var lateBindingDelta = 1
    public var durationSeconds: Double = 10
    public var size = 16 << 20
    public var blockSize = 4096
    public var seed: UInt64 = 42

    public init() {}
}

/// What a soak run saw. `lost` counts acknowledged pages that could not be read back at the
/// end; `corrupt` counts reads that returned other bytes than written (impossible by
/// construction: every page is verified against its CRC32C and content on every read).
public struct SoakResult: Sendable {
    public var writes = 0
    public var reads = 0
    public var verified = 0
    public var lost = 0
    public var corrupt = 0
    public var errors = 0
    /// Reads that reconstructed data splits, including when late binding let a parity split
    /// that answered first stand in for a data split (normal on a healthy pool).
    public var decodedReads = 0
    /// Reads that found a member unavailable (dead, retired, rebuilding) or a split stale or
    /// failing: the pool was short of full redundancy for that page.
    public var degradedReads = 0
    public var healthy = (p50: 0, p99: 0)
    public var degraded = (p50: 0, p99: 0)

    public var passed: Bool { lost == 0 && corrupt == 0 }

    public var json: JSONValue {
        .object([
            ("writes", .int(writes)), ("reads", .int(reads)), ("verified", .int(verified)), ("lost", .int(lost)),
            ("corrupt", .int(corrupt)), ("errors", .int(errors)), ("decoded_reads", .int(decodedReads)),
            ("degraded_reads", .int(degradedReads)),
            ("latency_ns", .object([
                ("healthy", .object([("p50", .int(healthy.p50)), ("p99", .int(healthy.p99))])),
                ("degraded", .object([("p50", .int(degraded.p50)), ("p99", .int(degraded.p99))])),
            ])),
        ])
    }
}

/// `spillway pool soak`: writes pages whose bytes derive from (key, seed), so any process can
/// verify them, then reads (and now and then rewrites) random pages until the duration is up,
/// verifying every read, while daemons may be killed underneath. A final pass reads every
/// acknowledged page back. Reads that found a member unavailable are timed separately
/// ("degraded"); reads that merely decoded (a parity split won the race) count as healthy.
public enum PoolSoak {
    /// The bytes of page `key` under `seed`.
    public static func fill(_ buffer: UnsafeMutableRawPointer, count: Int, key: UInt64, seed: UInt64) {
        var generator = SplitMix64(seed: seed ^ (key &* 0x9E37_79B9_7F4A_7C15))
        var offset = 0
        while offset + 8 <= count {
            buffer.storeBytes(of: generator.next(), toByteOffset: offset, as: UInt64.self)
            offset += 8
        }
        while offset < count {
            buffer.storeBytes(of: UInt8(truncatingIfNeeded: generator.next()), toByteOffset: offset, as: UInt8.self)
            offset += 1
        }
    }

    public static func run(_ options: SoakOptions, progress: ProgressBar? = nil) throws(SpillwayError) -> SoakResult {
        guard options.blockSize >= 4096, options.blockSize <= 2 << 20, options.blockSize & (options.blockSize - 1) == 0 else {
            throw .invalidArgument("--block-size must be a power of two between 4KiB and 2MiB")
        }
        guard options.size >= options.blockSize, options.durationSeconds > 0 else {
            throw .invalidArgument("--size must hold a block and --duration must be positive")
        }
        let pages = options.size / options.blockSize
        var tier = TierConfiguration(kind: .erasureCoded, capacity: (pages + 64) * options.blockSize)
        tier.servers = options.servers
        tier.failureDomains = options.failureDomains
        tier.etcd = options.etcd
        tier.cluster = options.cluster
        tier.tokenFile = options.tokenFile
        tier.k = options.k
        tier.r = options.r
        tier.lateBindingDelta = options.lateBindingDelta
        var configuration = SpillwayConfiguration(slotSize: options.blockSize, maxPageSize: options.blockSize, tiers: [tier])
        configuration.backgroundIntervalMilliseconds = 100
        let store = try TieredStore.open(configuration, daemons: InProcessDaemons())
        defer { store.close() }
        guard let coded = store.tiers.first as? ErasureCodedTier else { throw .invalidConfiguration("soak needs an erasure-coded tier") }
        let blockSize = options.blockSize
        let expected = UnsafeMutableRawPointer.allocate(byteCount: blockSize, alignment: 64)
        let actual = UnsafeMutableRawPointer.allocate(byteCount: blockSize, alignment: 64)
        defer {
            expected.deallocate()
            actual.deallocate()
        }
        var acknowledged = [Bool](repeating: false, count: pages)
        var result = SoakResult()
        var healthy = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var degraded = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)

        func write(_ key: Int) {
            fill(expected, count: blockSize, key: UInt64(key), seed: options.seed)
            do {
                try store.put(PageKey(UInt64(key)), UnsafeRawBufferPointer(start: expected, count: blockSize))
                acknowledged[key] = true
                result.writes += 1
            } catch {
                result.errors += 1
            }
        }

        /// Reads and verifies `key`; false if the read failed.
        func read(_ key: Int, timed: Bool) -> Bool {
            fill(expected, count: blockSize, key: UInt64(key), seed: options.seed)
            let decodedBefore = coded.counters.decodedReads.load(ordering: .relaxed)
            let degradedBefore = coded.counters.degradedReads.load(ordering: .relaxed)
            let started = monotonicNanoseconds()
            do {
                let got = try store.get(PageKey(UInt64(key)), into: UnsafeMutableRawBufferPointer(start: actual, count: blockSize))
                let elapsed = monotonicNanoseconds() &- started
                result.reads += 1
                if got == blockSize && memcmp(expected, actual, blockSize) == 0 {
                    result.verified += 1
                } else {
                    result.corrupt += 1
                }
                if coded.counters.decodedReads.load(ordering: .relaxed) != decodedBefore { result.decodedReads += 1 }
                if coded.counters.degradedReads.load(ordering: .relaxed) != degradedBefore {
                    result.degradedReads += 1
                    if timed { _ = degraded.record(elapsed) }
                } else if timed {
                    _ = healthy.record(elapsed)
                }
                return true
            } catch {
                result.errors += 1
                return false
            }
        }

        for key in 0..<pages { write(key) }
        var random = SplitMix64(seed: options.seed &+ 1)
        let deadline = monotonicNanoseconds() &+ UInt64(options.durationSeconds * 1e9)
        var operations = 0
        while monotonicNanoseconds() < deadline {
            let key = Int(random.next() % UInt64(pages))
            if random.next() % 10 < 8 || !acknowledged[key] {
                if acknowledged[key] { _ = read(key, timed: true) } else { write(key) }
            } else {
                write(key)
            }
            operations += 1
            if operations % 1024 == 0 {
                let left = Double(deadline &- min(deadline, monotonicNanoseconds())) / 1e9
                progress?.update(fraction: 1 - left / options.durationSeconds, detail: "\(result.reads) reads, \(result.errors) errors")
            }
        }
        // Final pass: every acknowledged page must still read back (a few retries ride out a
        // daemon death being noticed).
        for key in 0..<pages where acknowledged[key] {
            var ok = false
            for attempt in 0..<5 {
                if read(key, timed: false) {
                    ok = true
                    break
                }
                usleep(UInt32(20_000 * (attempt + 1)))
            }
            if !ok { result.lost += 1 }
        }
        progress?.finish()
        func percentiles(_ histogram: Histogram<UInt64>) -> (p50: Int, p99: Int) {
            histogram.totalCount == 0 ? (0, 0) : (Int(histogram.valueAtPercentile(50)), Int(histogram.valueAtPercentile(99)))
        }
        result.healthy = percentiles(healthy)
        result.degraded = percentiles(degraded)
        return result
    }
}
