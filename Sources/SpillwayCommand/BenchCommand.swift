import ArgumentParser
import Logging
import Spillway
import SpillwayBench
import SpillwayCommandSupport

extension BenchPattern: ExpressibleByArgument {}

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure one tier, or (no tier) every available tier on the embedded default configuration.",
        discussion: """
        Tiers: device, dram, nvme (O_DIRECT through io_uring on --file), remote and ec (spillwayd
        daemons at --servers, else in-process daemons on loopback; ec = RS(--k, --r)), tiered (the whole
        configured hierarchy as one store, with a working set larger than its top tier). Without a tier, runs randread and randwrite on each and
        prints one summary table (with --json: {"results": [...]}).

        The working set (--size) is prefilled before timing starts; the tier is sized to hold it.
        Latency percentiles come from an HdrHistogram of sampled operations: one batch in 16 is
        timed, because reading the clock around every 4 KiB DRAM copy costs measurable
        throughput. After the run, up to 4096 pages are read back and checked byte for byte.

        Options may also come from --config FILE (TOML, keys = long option names; [[tier]]
        tables define the store used by 'tiered'); the command line wins over the file.
        """)

    @Argument(help: "device | dram | nvme | remote | ec | tiered | weights | ec-encode | compression | kv-trace | kv; omit to run every available tier.")
    var tier: String?

    @Option(help: "randread | randwrite | read | write (default randread).")
    var pattern: BenchPattern?

    @Option(name: .customLong("block-size"), help: "Bytes per operation; also the slot size (default 4k).")
    var blockSize: SizeArgument?

    @Option(name: .customLong("queue-depth"), help: "Operations submitted per batch (default 1).")
    var queueDepth: Int?

    @Option(help: "Seconds to run each measurement (default 5; 2 per row without a tier).")
    var duration: Double?

    @Option(help: "Working set in bytes (default 64m; 32m per row without a tier).")
    var size: SizeArgument?

    @Option(help: "Seed of the access pattern and page contents (default 42).")
    var seed: UInt64?

    @Option(help: "NVMe: scratch file or block device (created or overwritten without asking; default: in $SPILLWAY_TMPDIR or /tmp).")
    var file: String?

    @Option(help: "NVMe: process | power (default process): whether an acknowledged write survives a power loss too.")
    var durability: String?

    @Option(help: "Remote: daemons as HOST:PORT[,HOST:PORT…] (default: in-process daemons on loopback).")
    var servers: String?

    @Option(name: .customLong("token-file"), help: "Remote: the client's token file (line 'NAME TOKEN'; with --tenants, the first T lines).")
    var tokenFile: String?

    @OptionGroup var registry: ClusterOptions

    @Option(help: "Remote: page transport auto | rma | tcp (default auto: RMA on an RDMA/EFA provider or a named one, else TCP).")
    var transport: String?

    @Option(name: .customLong("fabric-provider"), help: "Remote: libfabric provider for RMA, e.g. verbs, efa, tcp.")
    var fabricProvider: String?

    @Option(help: "Remote with --servers: this many connections in all, each with one 4 KiB random read outstanding, driven by at most one thread per core (iops is the total).")
    var clients: Int?

    @Option(help: "Remote with --clients: the connections belong to the first T tenants of --token-file, which share --size (default 1).")
    var tenants: Int?

    @Option(help: "Erasure-coded: data splits per page (default 4).")
    var k: Int?

    @Option(help: "Erasure-coded: parity splits per page (default 2).")
    var r: Int?

    @Option(name: .customLong("late-binding-delta"), help: "Erasure-coded: extra splits read per page, first k win (default 1; 0 = off).")
    var lateBindingDelta: Int?

    @Option(name: .customLong("kill-daemons"), help: "ec, in-process daemons: stop this many (≤ r) after the prefill.")
    var killDaemons: Int?

    @Option(name: .customLong("slow-daemon-us"), help: "ec, in-process daemons: one daemon answers this many µs late after the prefill.")
    var slowDaemonMicroseconds: Int?

    @Option(help: "weights: a .safetensors model (default: a synthetic 12-layer fp16 model in the scratch directory).")
    var model: String?

    @Option(help: "weights: layers loaded ahead of the one in use (default 2).")
    var prefetch: Int?

    @Option(name: .customLong("compute-us"), help: "weights: simulated compute per layer in µs (default 0).")
    var computeMicroseconds: Int?

    @Option(help: "kv-trace: a Mooncake-format trace (default $SPILLWAY_TRACE).")
    var trace: String?

    @Option(help: "kv-trace: replay only the first N requests.")
    var limit: Int?

    @Option(help: "kv: llama-3-8b | llama-3-70b | qwen2.5-7b | custom (default llama-3-8b).")
    var geometry: String?

    @Option(name: .customLong("tokens-per-block"), help: "kv, --geometry custom: tokens per KV block (1…4096).")
    var tokensPerBlock: Int?

    @Option(help: "kv, --geometry custom: transformer layers (1…1024).")
    var layers: Int?

    @Option(name: .customLong("kv-heads"), help: "kv, --geometry custom: KV heads (1…1024).")
    var kvHeads: Int?

    @Option(name: .customLong("head-dim"), help: "kv, --geometry custom: head dimension (1…1024).")
    var headDim: Int?

    @Option(help: "kv, --geometry custom: fp16 | bf16 (default bf16).")
    var dtype: String?

    @Option(name: .customLong("tier"), help: "kv: the store tier to run the pool on (a tier name of the store, a tier kind, or tiered; default: every tier and the tiered store).")
    var kvTier: String?

    @Option(name: .customLong("working-set"), help: "kv: bytes of KV blocks stored and loaded at random (default 256m).")
    var workingSet: SizeArgument?

    @Option(name: .customLong("blocks-per-call"), help: "kv: blocks per layer call (default 1).")
    var blocksPerCall: Int?

    @Flag(help: "Print exactly one JSON object on stdout.")
    var json = false

    @Option(help: "Policy of the benchmark's store (StorePolicy.names; default prefix-lru).")
    var policy: String?

    @Option(help: "TOML file with defaults for these options and optional [[tier]] tables.")
    var config: String?

    @Option(name: .customLong("log-level"), help: "Log level on stderr (default warning).")
    var logLevel: LogLevelArgument?

    /// Keys a --config file may set for this command (`tier` is the store's [[tier]] array).
    static let optionKeys: Set<String> = ["file", "durability", "servers", "token-file", "transport", "fabric-provider", "k", "r", "late-binding-delta", "pattern", "block-size", "queue-depth", "duration", "size", "seed", "json", "log-level"]

    func run() throws {
        let file = try CommandConfigFile(path: config, optionKeys: Self.optionKeys)
        let level = try logLevel?.level ?? file.string("log-level").flatMap(Logger.Level.init(rawValue:)) ?? .warning
        bootstrapLogging(level)
        let json = try self.json || (file.bool("json") ?? false)
        let target = tier
        let patternName = try file.string("pattern")
        guard patternName == nil || BenchPattern(rawValue: patternName!) != nil else {
            throw SpillwayError.invalidConfiguration("pattern '\(patternName!)' (one of randread, randwrite, read, write)")
        }
        var options = BenchOptions(target: target ?? "summary")
        options.pattern = try pattern ?? file.string("pattern").flatMap(BenchPattern.init(rawValue:)) ?? .randread
        options.blockSize = try blockSize?.bytes ?? file.size("block-size") ?? 4096
        options.queueDepth = try queueDepth ?? file.int("queue-depth") ?? 1
        let durationGiven = try duration ?? file.double("duration")
        let sizeGiven = try size?.bytes ?? file.size("size")
        options.seed = try seed ?? file.int("seed").map { UInt64(bitPattern: Int64($0)) } ?? 42
        options.file = try self.file ?? file.string("file")
        if let name = try durability ?? file.string("durability") {
            guard let mode = NVMeDurability(rawValue: name) else {
                throw SpillwayError.invalidConfiguration("durability '\(name)' (process or power)")
            }
            options.durability = mode
        }
        let serverList = try servers ?? file.string("servers")
        if let target = try registry.target {
            guard serverList == nil else { throw SpillwayError.invalidArgument("give --servers or --etcd/--cluster, not both") }
            options.etcd = target.etcd
            options.cluster = target.cluster
        } else {
            options.servers = serverList.map { $0.split(separator: ",").map(String.init) } ?? []
        }
        options.tokenFile = try tokenFile ?? file.string("token-file")
        options.transport = try TransportMode.parse(transport ?? file.string("transport") ?? "auto")
        options.fabricProvider = try fabricProvider ?? file.string("fabric-provider")
        options.k = try k ?? file.int("k") ?? 4
        options.r = try r ?? file.int("r") ?? 2
        options.lateBindingDelta = try lateBindingDelta ?? file.int("late-binding-delta") ?? 1
        options.killDaemons = killDaemons ?? 0
        options.slowDaemonMicroseconds = slowDaemonMicroseconds ?? 0
        // The command line wins over the file's `policy`; an unknown name fails here, listing the names.
        options.policy = try policy ?? file.string("policy") ?? StorePolicy.defaultName
        _ = try StorePolicy.named(options.policy)

        var storeConfiguration = file.store ?? SpillwayConfiguration.embeddedDefault
        storeConfiguration.policy = options.policy
        storeConfiguration.slotSize = options.blockSize
        storeConfiguration.maxPageSize = options.blockSize
        // Benchmark files are scratch: never recover a previous run's pages, and never the
        // default store's file (a library user would otherwise recover the benchmark's pages).
        try storeConfiguration.useBenchmarkScratchFiles()

        if target == "kv" {
            try runKV(base: file.store ?? SpillwayConfiguration.embeddedDefault, options: options, duration: durationGiven,
                      sizeGiven: sizeGiven != nil, json: json)
            return
        }
        let kvOnly: [(String, Bool)] = [
            ("--geometry", geometry != nil), ("--tokens-per-block", tokensPerBlock != nil), ("--layers", layers != nil),
            ("--kv-heads", kvHeads != nil), ("--head-dim", headDim != nil), ("--dtype", dtype != nil), ("--tier", kvTier != nil),
            ("--working-set", workingSet != nil), ("--blocks-per-call", blocksPerCall != nil),
        ]
        if let given = kvOnly.first(where: { $0.1 }) {
            throw SpillwayError.invalidArgument("\(given.0) goes with 'bench kv' only")
        }

        if target == "weights" {
            var weights = WeightsBench.Options()
            weights.model = model
            weights.prefetch = prefetch ?? 2
            weights.durationSeconds = durationGiven ?? 3
            weights.computeMicroseconds = computeMicroseconds ?? 0
            weights.nvmeFile = options.file
            let object = try WeightsBench.run(weights)
            printLine(json ? object.serialized() : "weights: \(object.serialized())")
            return
        }
        if target == "kv-trace" {
            guard let path = trace ?? TraceReplay.configuredTrace() else {
                throw SpillwayError.invalidArgument("kv-trace \(TraceReplay.missingTraceReason)")
            }
            var replay = TraceReplay.Options(trace: path)
            replay.limit = limit
            var storeConfiguration = file.store ?? SpillwayConfiguration.embeddedDefault
            try storeConfiguration.useBenchmarkScratchFiles()
            let object = try TraceReplay.run(replay, configuration: storeConfiguration)
            printLine(json ? object.serialized() : "kv-trace: \(object.serialized())")
            return
        }
        if target == "compression" {
            let object = CompressionBench.run(pageBytes: options.blockSize, seconds: durationGiven ?? 1)
            printLine(json ? object.serialized() : "compression: \(object.serialized())")
            return
        }
        if target == "ec-encode" {
            // The encoder alone (no daemons): compared with Bench/isal_encode_reference.c.
            let object = try CodecBench.run(k: options.k, r: options.r, blockSize: options.blockSize,
                                            durationSeconds: durationGiven ?? 2)
            printLine(json ? object.serialized() : "ec-encode RS(\(options.k),\(options.r)) \(options.blockSize) B: \(object.serialized())")
            return
        }
        if target == "remote", clients != nil || tenants != nil {
            guard let tokenFile = options.tokenFile else { throw SpillwayError.invalidArgument("--clients needs --servers and --token-file") }
            // Connections to the daemons registered now (this bench does not follow the registry).
            let servers = try registry.target?.daemons(logger: Logger(label: "spillway.bench")).servers ?? options.servers
            var many = RemoteClientsBench.Options(servers: servers, tokenFile: tokenFile, clients: clients ?? 1, tenants: tenants ?? 1,
                                                  size: sizeGiven ?? 64 << 20, durationSeconds: durationGiven ?? 5)
            many.seed = options.seed
            guard options.blockSize == 4096, options.pattern == .randread, options.queueDepth == 1 else {
                throw SpillwayError.invalidArgument("--clients measures 4 KiB random reads, one outstanding per connection (no --block-size, --pattern or --queue-depth)")
            }
            let object = try RemoteClientsBench.run(many)
            printLine(json ? object.serialized() : "remote clients: \(object.serialized())")
            return
        }
        var results: [BenchResult] = []
        switch target {
        case nil:
            options.durationSeconds = durationGiven ?? 2
            options.size = sizeGiven ?? 32 << 20
            for tier in storeConfiguration.tiers.map(\.kind.rawValue) {
                for pattern in [BenchPattern.randread, .randwrite] {
                    var row = options
                    row.target = tier
                    row.pattern = pattern
                    results.append(try BenchRunner.run(row, progress: ProgressBar(label: "bench")))
                }
            }
            if storeConfiguration.tiers.count > 1 {
                var row = options
                row.target = "tiered"
                row.pattern = .randread
                // The tiered row always overflows the top tier: it exists to show the hierarchy at work.
                row.size = Self.tieredWorkingSet(storeConfiguration)
                results.append(try BenchRunner.run(row, configuration: storeConfiguration, progress: ProgressBar(label: "bench")))
            }
        case "tiered":
            options.durationSeconds = durationGiven ?? 5
            options.size = sizeGiven ?? Self.tieredWorkingSet(storeConfiguration)
            results.append(try BenchRunner.run(options, configuration: storeConfiguration, progress: ProgressBar(label: "bench")))
        case let tier?:
            options.target = tier
            options.durationSeconds = durationGiven ?? 5
            options.size = sizeGiven ?? 64 << 20
            results.append(try BenchRunner.run(options, progress: ProgressBar(label: "bench")))
        }
        for result in results where result.errors > 0 {
            throw SpillwayError.invalidArgument("\(result.errors) operations failed during the \(result.tier) \(result.pattern.rawValue) run")
        }
        if json {
            let object = target == nil ? JSONValue.object([("results", .array(results.map(\.json)))]) : results[0].json
            printLine(object.serialized())
        } else {
            printLine(BenchTable.render(results))
        }
    }

    /// `bench kv`: the pool over one tier (`--tier`), or over each of the store's tiers and the
    /// tiered store (a table, or with --json {"results": [...]}).
    private func runKV(base given: SpillwayConfiguration, options: BenchOptions, duration: Double?, sizeGiven: Bool, json: Bool) throws {
        guard !sizeGiven else { throw SpillwayError.invalidArgument("bench kv takes --working-set, not --size") }
        let shape = try KVBenchGeometry.resolve(geometry ?? "llama-3-8b", tokensPerBlock: tokensPerBlock, layers: layers,
                                                kvHeads: kvHeads, headDim: headDim, dtype: dtype)
        var kv = KVBench.Options(geometry: shape)
        kv.workingSet = try workingSet?.bytes ?? 256 << 20
        kv.durationSeconds = duration ?? (kvTier == nil ? 2 : 3)
        kv.seed = options.seed
        kv.blocksPerCall = blocksPerCall ?? 1
        try kv.validate()
        var base = given
        base.policy = options.policy
        try base.useBenchmarkScratchFiles()
        let names = kvTier.map { [$0] } ?? base.tiers.map(\.name) + (base.tiers.count > 1 ? ["tiered"] : [])
        var results: [KVBenchResult] = []
        for name in names {
            let configuration: SpillwayConfiguration
            if name == "tiered" {
                configuration = try KVBench.tieredConfiguration(base, options: kv)
            } else {
                var tier: TierConfiguration
                if let configured = base.tiers.first(where: { $0.name == name }) {
                    tier = configured
                } else if TierKind(rawValue: name) != nil {
                    var single = options
                    single.target = name
                    single.blockSize = shape.slotSize
                    single.size = shape.slotSize
                    tier = try BenchRunner.configuration(for: single).tiers[0]
                } else {
                    let known = base.tiers.map(\.name) + TierKind.allCases.map(\.rawValue).filter { kind in !base.tiers.contains { $0.name == kind } }
                    throw SpillwayError.invalidArgument("--tier '\(name)' (one of: \((known + ["tiered"]).joined(separator: ", ")))")
                }
                if tier.kind == .nvme {
                    tier.reformat = true
                    if let path = options.file { tier.path = path }
                    if tier.path == nil { tier.path = try ScratchDirectory.file("spillway-bench-kv.nvme") }
                }
                configuration = KVBench.singleTierConfiguration(tier, options: kv, policy: options.policy)
            }
            let result = try KVBench.run(kv, tier: name, configuration: configuration, progress: ProgressBar(label: "bench kv"))
            if result.errors > 0 {
                throw SpillwayError.invalidArgument("\(result.errors) KV layer calls failed on \(name) (first: \(result.firstError ?? "?"))")
            }
            results.append(result)
        }
        if json {
            printLine((kvTier == nil ? JSONValue.object([("results", .array(results.map(\.json)))]) : results[0].json).serialized())
        } else {
            printLine(KVBenchResult.table(results))
        }
    }

    /// A working set that overflows every tier but the last (1.5× the top tier for two tiers,
    /// 1.2× the tiers above the last for more), so the run exercises promotion, demotion and
    /// the bottom tier; capped at 80% of the whole hierarchy.
    static func tieredWorkingSet(_ configuration: SpillwayConfiguration) -> Int {
        let capacities = configuration.tiers.map(\.capacity)
        let total = capacities.reduce(0, +)
        let upper = capacities.count > 2 ? capacities.dropLast().reduce(0, +) * 6 / 5 : (capacities.first ?? 0) * 3 / 2
        return max(configuration.slotSize, min(upper, total * 4 / 5))
    }
}

enum BenchTable {
    static func render(_ results: [BenchResult]) -> String {
        let header = ["tier", "pattern", "block", "qd", "ops", "IOPS", "MiB/s", "p50", "p99", "p99.9", "max"]
        var rows = [header]
        for result in results {
            rows.append([
                result.tier, result.pattern.rawValue, ByteCount.format(result.blockSize), "\(result.queueDepth)",
                "\(result.ops)", formatCount(result.iops), String(format2: result.bytesPerSecond / 1_048_576),
                formatNanos(result.p50), formatNanos(result.p99), formatNanos(result.p999), formatNanos(result.max),
            ])
        }
        let widths = header.indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
        var lines = rows.map { row in
            row.enumerated().map { column, cell in
                column < 2 ? cell.padding(widths[column]) : String(repeating: " ", count: widths[column] - cell.count) + cell
            }.joined(separator: "  ")
        }
        lines.insert(String(repeating: "-", count: lines[0].count), at: 1)
        for result in results {
            if let stats = result.stats, stats.tiers.count > 1 {
                let tiers = stats.tiers.map { "\($0.name): \($0.hits) hits, \($0.promotionsIn) promoted in, \($0.demotionsOut) demoted out, \($0.evictions) evicted" }
                lines.append("\(result.tier): " + tiers.joined(separator: "; "))
                let stalls = stats.tiers.dropFirst().map { "\($0.name) \(String(format2: Double($0.stallNanoseconds) / 1e6)) ms" }
                lines.append("\(result.tier): goodput \(String(format2: stats.goodput * 100))% (stalled on " + stalls.joined(separator: ", ") + ")")
            }
        }
        // Which placement policy the runs' stores used (a --config file's `policy` key).
        var policies: [String] = []
        for policy in results.compactMap(\.stats?.policy) where !policies.contains(policy) { policies.append(policy) }
        if !policies.isEmpty { lines.append("policy: " + policies.joined(separator: ", ")) }
        lines.append("latency: one batch in \(results.first?.latencySampleEvery ?? 16) timed; every run verified \(results.map(\.verifiedPages).reduce(0, +)) pages after timing")
        return lines.joined(separator: "\n")
    }

    static func formatCount(_ value: Double) -> String {
        value >= 1e6 ? String(format2: value / 1e6) + "M" : value >= 1e3 ? String(format2: value / 1e3) + "k" : String(format2: value)
    }

    static func formatNanos(_ value: UInt64) -> String {
        value >= 1_000_000 ? String(format2: Double(value) / 1e6) + "ms" : value >= 1000 ? String(format2: Double(value) / 1e3) + "µs" : "\(value)ns"
    }
}

extension String {
    init(format2 value: Double) {
        let scaled = (value * 100).rounded()
        let whole = Int(scaled) / 100
        let fraction = abs(Int(scaled)) % 100
        self = "\(whole).\(fraction < 10 ? "0" : "")\(fraction)"
    }

    func padding(_ width: Int) -> String { self + String(repeating: " ", count: max(0, width - count)) }
}
