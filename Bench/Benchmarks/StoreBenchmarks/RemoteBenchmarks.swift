import Benchmark
import Spillway
import SpillwayServer

/// A single-tier store on in-process daemons (loopback): a remote tier on one daemon, or an
/// RS(4,2) erasure-coded tier on six, prefilled, with one batch of `batch` page requests.
/// `@unchecked Sendable`: benchmarks run one at a time; the buffers are only touched by the
/// running benchmark.
final class RemoteFixture: @unchecked Sendable {
    static let batch = 32
    static let blockSize = 4096
    let store: TieredStore
    let daemons: [RemoteMemoryServer]
    let pages: Int
    let reads: UnsafeMutableBufferPointer<PageRead>
    let writes: UnsafeMutableBufferPointer<PageWrite>
    let buffers: UnsafeMutableRawPointer

    init(erasureCoded: Bool, pages: Int = 4096) {
        self.pages = pages
        let tokens = TokenFile.random(tenant: "bench")
        daemons = (0..<(erasureCoded ? 6 : 1)).map { _ in
            let server = try! RemoteMemoryServer(DaemonConfiguration(listen: Endpoint(host: "127.0.0.1", port: 0), capacity: 64 << 20,
                                                                     slabSize: 16 << 20, tokens: tokens))
            try! server.start()
            return server
        }
        let endpoints = daemons.map { Endpoint(host: "127.0.0.1", port: $0.port) }
        let credentials = ClientCredentials(tokenFile: tokens)
        let capacity = (pages + 256) * Self.blockSize
        let tier: any Tier
        if erasureCoded {
            var configuration = ErasureCodedTierConfiguration(servers: endpoints, credentials: credentials, capacity: capacity,
                                                              slotSize: Self.blockSize)
            configuration.heartbeatInterval = 0
            tier = try! ErasureCodedTier(configuration)
        } else {
            tier = try! RemoteTier(RemoteTierConfiguration(servers: endpoints, credentials: credentials, capacity: capacity,
                                                           slotSize: Self.blockSize, heartbeatInterval: 0))
        }
        store = try! TieredStore(tiers: [tier], options: StoreOptions(maxPageSize: Self.blockSize, backgroundWorker: false))
        buffers = .allocate(byteCount: Self.batch * Self.blockSize, alignment: 4096)
        buffers.initializeMemory(as: UInt8.self, repeating: 0x5A, count: Self.batch * Self.blockSize)
        reads = .allocate(capacity: Self.batch)
        writes = .allocate(capacity: Self.batch)
        for index in 0..<Self.batch {
            let buffer = UnsafeMutableRawBufferPointer(start: buffers + index * Self.blockSize, count: Self.blockSize)
            reads.initializeElement(at: index, to: PageRead(key: PageKey(0), buffer: buffer))
            writes.initializeElement(at: index, to: PageWrite(key: PageKey(0), bytes: UnsafeRawBufferPointer(buffer)))
        }
        var keys = KeySequence()
        for page in 0..<pages { try! store.put(PageKey(UInt64(page)), UnsafeRawBufferPointer(start: buffers, count: Self.blockSize)) }
        // Warm up: every scratch (per-thread batch, exchange, erasure) grows to its size.
        for _ in 0..<8 { _ = getBatch(&keys) }
    }

    /// One batch of random gets; how many succeeded.
    func getBatch(_ keys: inout KeySequence) -> Int {
        for index in 0..<Self.batch { reads[index].key = keys.next(below: pages) }
        return store.get(batch: reads, queueDepth: Self.batch)
    }

    /// One batch of random puts (overwrites); how many succeeded.
    func putBatch(_ keys: inout KeySequence) -> Int {
        for index in 0..<Self.batch { writes[index].key = keys.next(below: pages) }
        return store.put(batch: writes, queueDepth: Self.batch)
    }
}

let remoteFixture = RemoteFixture(erasureCoded: false)
let erasureFixture = RemoteFixture(erasureCoded: true)

/// Batches of 32 4 KiB pages on the remote and RS(4,2) tiers: allocations per batch.
func remoteBenchmarks() {
    // Bench/Thresholds says 0 at p90 with no tolerance, checked by `swift package benchmark
    // thresholds check`: 90 % of warm batches allocate nothing (the rest see the in-process
    // daemons' janitor and the first decode of a pattern, which share the malloc count).
    let configuration = Benchmark.Configuration(metrics: [.wallClock, .throughput, .mallocCountTotal], scalingFactor: .one,
                                                maxDuration: .seconds(2), maxIterations: 2_000,
                                                thresholds: [.mallocCountTotal: BenchmarkThresholds(absolute: [.p90: 0])])
    for (name, fixture) in [("remote", remoteFixture), ("EC_RS(4,2)", erasureFixture)] {
        Benchmark("\(name)_get_batch_32x4KiB", configuration: configuration) { benchmark in
            var keys = KeySequence()
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations { blackHole(fixture.getBatch(&keys)) }
        }
        Benchmark("\(name)_put_batch_32x4KiB", configuration: configuration) { benchmark in
            var keys = KeySequence()
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations { blackHole(fixture.putBatch(&keys)) }
        }
    }
}
