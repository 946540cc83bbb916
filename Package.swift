// swift-tools-version: 6.1
//
// Spillway: a tiered page store (device → DRAM → remote → NVMe) for LLM serving.
// One module per concern; C libraries sit behind tiny system-library modules.

import PackageDescription

let package = Package(
    name: "Spillway",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "Spillway", targets: ["Spillway"]),
        .executable(name: "spillway", targets: ["SpillwayCommand"]),
        .executable(name: "spillwayd", targets: ["SpillwayDaemon"]),
        // The C ABI (include/spillway.h) as libSpillwayC.so; tools/install-c-library.sh
        // installs it as libspillway.so.
        .library(name: "SpillwayC", type: .dynamic, targets: ["SpillwayC"]),
        // The daemon engine, for in-process daemons in Bench/'s allocation benchmarks (the
        // library and the C ABI never link it).
        .library(name: "SpillwayServer", targets: ["SpillwayServer"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        // etcd's v3 JSON gateway for cluster mode (SpillwayCluster).
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
    ],
    targets: [
        // ISA-L (Debian libisal-dev): CRC32C, and Reed-Solomon for the erasure-coded tier.
        .systemLibrary(
            name: "CSpillwayISAL",
            pkgConfig: "libisal",
            providers: [.apt(["libisal-dev"])]
        ),
        // liburing (Debian liburing-dev) for the NVMe tier.
        .systemLibrary(
            name: "CSpillwayURing",
            pkgConfig: "liburing",
            providers: [.apt(["liburing-dev"])]
        ),
        // Keys, errors, checksums, the tier protocol, slot allocation, the page directory, policies.
        .target(
            name: "SpillwayCore",
            dependencies: [
                "CSpillwayISAL",
                "CSpillwayCopy",
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
        // Cache policies over block ids (LRU, OPT, prefix-aware, S3-FIFO) and the trace-driven
        // simulator behind `spillway replay --simulate`; Mooncake trace parsing.
        .target(name: "SpillwayPolicy", dependencies: ["SpillwayCore", .product(name: "Atomics", package: "swift-atomics")]),
        // Host DRAM tier and the HBM-like device tier (with its DeviceMemory backend protocol).
        .target(
            name: "SpillwayMemoryTiers",
            dependencies: [
                "CSpillwayCopy",
                "SpillwayCore",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The NVMe tier: O_DIRECT through io_uring, on-disk index, warm restart.
        .target(
            name: "SpillwayNVMe",
            dependencies: [
                "SpillwayCore",
                "CSpillwayURing",
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ]
        ),
        // libibverbs (Debian libibverbs-dev): RDMA device discovery; without a device (or a
        // verbs transport) the remote tiers fall back to TCP, logged and counted.
        .systemLibrary(
            name: "CSpillwayVerbs",
            pkgConfig: "libibverbs",
            providers: [.apt(["libibverbs-dev"])]
        ),
        // libfabric (Debian libfabric-dev): one-sided RMA over the `tcp` provider here, `verbs`
        // on RDMA NICs, `efa` on AWS.
        .systemLibrary(
            name: "CSpillwayFabric",
            pkgConfig: "libfabric",
            providers: [.apt(["libfabric-dev"])]
        ),
        // One-sided RMA through libfabric: provider discovery, endpoints, memory registration
        // (keys a daemon hands out per slab), batched fi_read/fi_write with bounded completions.
        .target(name: "SpillwayFabric", dependencies: ["SpillwayCore", "CSpillwayFabric"]),
        // `swift run -c release SpillwayFabricBench`: 4 KiB fi_read latency and throughput over
        // a provider (tcp on loopback by default); measured by hand, not part of the tests.
        .executableTarget(name: "SpillwayFabricBench", dependencies: ["SpillwayFabric", "SpillwayCore"]),
        // epoll and eventfd for the daemon's event loop (glibc; not in Swift's Glibc module).
        .systemLibrary(name: "CSpillwayEpoll", path: "Sources/CSpillwayEpoll"),
        // The remote-memory wire protocol: frame header, opcodes, fields, bounds-checked decoding.
        // Depends on ISA-L (CRC32C) and the header-only CSpillwayCopy (its vector-state reset)
        // alone, so tools/fuzz-protocol.sh can build it with swiftc.
        .target(name: "SpillwayProtocol", dependencies: ["CSpillwayISAL", "CSpillwayCopy"]),
        // Remote memory: the daemon's engine (slabs, tenants, auth, reclaim), the TCP transport,
        // the client and the remote tier.
        .target(
            name: "SpillwayRemote",
            dependencies: [
                "SpillwayCore",
                "SpillwayProtocol",
                "SpillwayFabric",
                "CSpillwayVerbs",
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ]
        ),
        // The daemon engine (what spillwayd runs, and the CLI's in-process demonstration
        // daemons): slab table, epoll workers, sessions, janitor. Only the CLI, spillwayd and
        // tests depend on it — never the tiers or the C library.
        .target(
            name: "SpillwayServer",
            dependencies: [
                "SpillwayCore",
                "CSpillwayEpoll",
                "SpillwayProtocol",
                "SpillwayRemote",
                "SpillwayFabric",
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Erasure-coded remote memory: ISA-L Reed-Solomon, the erasure-coded tier over
        // spillwayd daemons (late-binding reads, CodingSets placement, repair).
        .target(
            name: "SpillwayErasure",
            dependencies: [
                "SpillwayCore",
                "SpillwayRemote",
                "CSpillwayISAL",
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ]
        ),
        // xxHash (Debian libxxhash-dev): XXH3-128 for stable KV prefix-block keys.
        // Streaming-store page copy (one header-only intrinsic loop; see its why-comment).
        .systemLibrary(name: "CSpillwayCopy", path: "Sources/CSpillwayCopy"),
        .systemLibrary(
            name: "CSpillwayXXHash",
            pkgConfig: "libxxhash",
            providers: [.apt(["libxxhash-dev"])]
        ),
        // The serving-engine KV-cache API: block geometry, chained prefix hashes, a KV pool
        // over a tiered store (lookup, store, load per layer, prefetch, pin).
        .target(
            name: "SpillwayKV",
            dependencies: [
                "SpillwayCore",
                "SpillwayStore",
                "CSpillwayXXHash",
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Model weights: safetensors parsing, registration into a store, layer streaming
        // into a device-memory budget with a layer-ahead prefetcher.
        .target(
            name: "SpillwayWeights",
            dependencies: [
                "SpillwayCore",
                "SpillwayPolicy",
                "SpillwayStore",
                "SpillwayMemoryTiers",
                "CSpillwayXXHash",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // LZ4 (Debian liblz4-dev) for opt-in compression of spilled pages.
        .systemLibrary(
            name: "CSpillwayLZ4",
            pkgConfig: "liblz4",
            providers: [.apt(["liblz4-dev"])]
        ),
        // A compressing wrapper for volatile tiers.
        .target(
            name: "SpillwayCompression",
            dependencies: [
                "SpillwayCore",
                "CSpillwayLZ4",
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
        // The tiered store: put/get/pin/prefetch, promotion, background demotion, eviction, stats.
        .target(
            name: "SpillwayStore",
            dependencies: [
                "SpillwayCore",
                "SpillwayPolicy",
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ]
        ),
        // The library engines link: re-exports the layers and builds stores from configuration (TOML).
        .target(
            name: "Spillway",
            dependencies: [
                "SpillwayCore",
                "SpillwayPolicy",
                "SpillwayMemoryTiers",
                "SpillwayNVMe",
                "SpillwayStore",
                "SpillwayRemote",
                "SpillwayErasure",
                "SpillwayKV",
                "SpillwayWeights",
                "SpillwayCompression",
                "SpillwayCluster",
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Benchmark engine shared by the CLI and Bench/: workloads, histograms, JSON and table output.
        .target(
            name: "SpillwayBench",
            dependencies: [
                "Spillway",
                "SpillwayServer",
                "SpillwayPolicy",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),
        // Conventions shared by both executables: sizes, logging, one-line errors, --config.
        .target(
            name: "SpillwayCommandSupport",
            dependencies: [
                "Spillway",
                "SpillwayCluster",
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "TOMLKit", package: "TOMLKit"),
            ]
        ),
        .executableTarget(
            name: "SpillwayCommand",
            dependencies: [
                "Spillway",
                "SpillwayCluster",
                "SpillwayBench",
                "SpillwayPolicy",
                "SpillwayCommandSupport",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The C ABI: @_cdecl exports over the Swift API, integer handles, status codes.
        .target(
            name: "SpillwayC",
            dependencies: [
                "Spillway",
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
        .executableTarget(
            name: "SpillwayDaemon",
            dependencies: [
                "Spillway",
                "SpillwayCluster",
                "SpillwayServer",
                "SpillwayRemote",
                "SpillwayCommandSupport",
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Cluster mode: an etcd v3 client over its JSON gateway, daemon registration under a
        // lease, and client-side membership (snapshot + watch). Nothing else depends on it yet.
        .target(
            name: "SpillwayCluster",
            dependencies: [
                "SpillwayCore",
                "SpillwayRemote",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Helpers for tests that run the built executables (spillwayd on loopback).
        .target(name: "SpillwayTestSupport", dependencies: ["SpillwayCore", "SpillwayRemote"], path: "Tests/SpillwayTestSupport"),
        .testTarget(name: "SpillwayPolicyTests", dependencies: ["SpillwayPolicy", "SpillwayCore", "SpillwayTestSupport"]),
        .testTarget(name: "SpillwayCoreTests", dependencies: ["SpillwayCore", "SpillwayTestSupport"]),
        .testTarget(name: "SpillwayCompressionTests", dependencies: ["SpillwayCompression", "SpillwayStore", "SpillwayMemoryTiers"]),
        .testTarget(name: "SpillwayKVTests", dependencies: ["SpillwayKV", "SpillwayStore", "SpillwayMemoryTiers"]),
        .testTarget(name: "SpillwayWeightsTests", dependencies: ["SpillwayPolicy", "SpillwayWeights", "SpillwayKV", "SpillwayStore", "SpillwayMemoryTiers", "SpillwayNVMe"]),
        .testTarget(name: "SpillwayErasureTests", dependencies: ["SpillwayErasure", "SpillwayRemote", "SpillwayServer", "SpillwayStore", "SpillwayMemoryTiers", "SpillwayTestSupport"]),
        .testTarget(name: "SpillwayMemoryTiersTests", dependencies: ["SpillwayMemoryTiers", .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "SpillwayStoreTests", dependencies: ["SpillwayPolicy", "SpillwayStore", "SpillwayMemoryTiers", "SpillwayNVMe", "SpillwayTestSupport"]),
        .testTarget(name: "SpillwayNVMeTests", dependencies: ["SpillwayNVMe", "SpillwayStore", "SpillwayMemoryTiers", "SpillwayTestSupport"]),
        .testTarget(name: "SpillwayTests", dependencies: [
            "SpillwayServer",
            "Spillway", "SpillwayBench", "SpillwayTestSupport",
            .product(name: "Atomics", package: "swift-atomics"), .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "SpillwayClusterTests", dependencies: [
            "SpillwayCluster", "SpillwayCore", "SpillwayTestSupport", "Spillway",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "SpillwayFabricTests", dependencies: ["SpillwayFabric", "SpillwayCore"]),
        .testTarget(name: "SpillwayRemoteTests", dependencies: [
            "SpillwayServer",
            "SpillwayPolicy",
            "SpillwayRemote", "SpillwayProtocol", "SpillwayStore", "SpillwayMemoryTiers", "SpillwayNVMe", "SpillwayTestSupport",
            .product(name: "Logging", package: "swift-log"),
        ]),
    ],
    swiftLanguageModes: [.v6]
)
