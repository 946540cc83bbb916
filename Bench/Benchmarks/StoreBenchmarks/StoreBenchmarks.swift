import Benchmark
import Spillway

/// A DRAM-only store holding `pages` pages of `blockSize` bytes, prefilled.
/// `@unchecked Sendable`: benchmarks run one at a time on one thread; the buffers are only
/// touched by the running benchmark.
final class Fixture: @unchecked Sendable {
    let store: TieredStore
    let pages: Int
    let blockSize: Int
    let buffer: UnsafeMutableRawBufferPointer
    let source: UnsafeMutableRawBufferPointer

    init(blockSize: Int, pages: Int) {
        self.blockSize = blockSize
        self.pages = pages
        store = try! TieredStore.open(SpillwayConfiguration(
            slotSize: blockSize, maxPageSize: blockSize,
            tiers: [TierConfiguration(kind: .dram, capacity: (pages + 64) * blockSize)]))
        buffer = .allocate(byteCount: blockSize, alignment: 4096)
        source = .allocate(byteCount: blockSize, alignment: 4096)
        source.initializeMemory(as: UInt8.self, repeating: 0x5A)
        for page in 0..<pages { try! store.put(PageKey(UInt64(page)), UnsafeRawBufferPointer(source)) }
    }
}

// Process-wide fixtures, built on first use (outside any measurement).
let fixture4K = Fixture(blockSize: 4096, pages: 16384)
let fixture64K = Fixture(blockSize: 65536, pages: 1024)

struct KeySequence {
    var state: UInt64 = 42
    mutating func next(below bound: Int) -> PageKey {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return PageKey((z ^ (z >> 31)) % UInt64(bound))
    }
}

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal, .instructions],
        scalingFactor: .kilo,
        maxDuration: .seconds(2),
        maxIterations: 10_000,
        // Bench/Thresholds holds each row's p90 malloc count per 1000 operations (the harness
        // itself makes ~16–22 per sample, as the pure-computation CRC32C row shows); a check
        // tolerates 50 more, far below the 1000 that one allocation per operation would add.
        thresholds: [.mallocCountTotal: BenchmarkThresholds(absolute: [.p90: 50])])

    for fixture in [fixture4K, fixture64K] {
        let size = fixture.blockSize == 4096 ? "4KiB" : "64KiB"
        Benchmark("DRAM_get_\(size)_random") { benchmark in
            var keys = KeySequence()
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations {
                blackHole(try! fixture.store.get(keys.next(below: fixture.pages), into: fixture.buffer))
            }
        }
        Benchmark("DRAM_put_\(size)_random") { benchmark in
            var keys = KeySequence()
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations {
                try! fixture.store.put(keys.next(below: fixture.pages), UnsafeRawBufferPointer(fixture.source))
            }
        }
    }

    Benchmark("directory_contains_(16k_pages)") { benchmark in
        var keys = KeySequence()
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            blackHole(fixture4K.store.contains(keys.next(below: fixture4K.pages)))
        }
    }

    remoteBenchmarks()

    Benchmark("CRC32C_4KiB_(ISA-L)") { benchmark in
        let bytes = UnsafeRawBufferPointer(fixture4K.source)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            blackHole(CRC32C.checksum(bytes))
        }
    }
}
