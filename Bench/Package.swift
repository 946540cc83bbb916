// swift-tools-version: 6.1
//
// Micro-benchmarks of Spillway's hot paths with ordo-one/benchmark (the model: swift-nio's
// Benchmarks/). Separate from the main package so its build stays out of CI's test run.
//
//   cd Bench && swift package benchmark        # run and print (≈1.5 min first build)
//   cd Bench && swift package benchmark thresholds check   # fail if a row allocates more than
//                                                          # Bench/Thresholds (in git) allows
//
// Throughput comparisons against references live in Bench/run (same-run memcpy); this package
// shows what must never regress silently: allocations per operation. Every DRAM get/put row
// must read "Malloc (total) 0" per 1000 operations, the same as the pure-computation CRC32C
// row (the harness's own per-sample allocations round to zero at this scale). The remote and
// erasure-coded rows run batches of 32 pages against in-process daemons on loopback and count
// the whole process (client and daemons): they must read 0 per batch once warm.
import PackageDescription

let package = Package(
    name: "SpillwayBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "StoreBenchmarks",
            dependencies: [
                .product(name: "Spillway", package: "main"),
                .product(name: "SpillwayServer", package: "main"),
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/StoreBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
