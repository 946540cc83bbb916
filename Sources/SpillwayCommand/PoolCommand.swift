import ArgumentParser
import Logging
import Spillway
import SpillwayBench
import SpillwayCommandSupport

/// `spillway pool …`: tools that exercise a pool of daemons.
struct PoolCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pool",
        abstract: "Exercise a pool of spillwayd daemons through the erasure-coded tier.",
        subcommands: [SoakCommand.self])
}

struct SoakCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "soak",
        abstract: "Write verifiable pages, read them back continuously, keep going while daemons die.",
        discussion: """
        Pages hold bytes derived from (key, --seed), so any process can verify them. Prints \
        {"writes", "reads", "verified", "lost", "corrupt", "errors", "decoded_reads", \
        "degraded_reads", "latency_ns": {"healthy": {"p50", "p99"}, "degraded": {"p50", "p99"}}}. \
        decoded_reads = reads that reconstructed data splits (late binding does this on a \
        healthy pool when a parity split answers first); degraded_reads = reads that found a \
        member unavailable or a split stale, timed as "degraded". lost = \
        acknowledged pages that can no longer be read back; errors = refused or failed \
        operations (e.g. writes while fewer than k+1 daemons live). Exit status 0 if and only \
        if lost = 0 and corrupt = 0. Survives kill -9 of up to r daemons at any moment.
        """)

    @Option(help: "Daemons as HOST:PORT[,…] (default: k+r in-process daemons on loopback).")
    var servers: String?

    @Option(name: .customLong("token-file"), help: "The client's token file (line 'NAME TOKEN').")
    var tokenFile: String?

    @OptionGroup var registry: ClusterOptions

    @Option(help: "Data splits per page (default 4).")
    var k: Int = 4

    @Option(help: "Parity splits per page (default 2).")
    var r: Int = 2

    @Option(name: .customLong("late-binding-delta"), help: "Extra splits read per page (default 1; 0 = off).")
    var lateBindingDelta: Int = 1

    @Option(help: "Seconds to run (default 10).")
    var duration: Double = 10

    @Option(help: "Bytes of pages (default 16m).")
    var size: SizeArgument = SizeArgument(bytes: 16 << 20)

    @Option(name: .customLong("block-size"), help: "Page size (default 4k).")
    var blockSize: SizeArgument = SizeArgument(bytes: 4096)

    @Option(help: "Seed of the page contents and access pattern (default 42).")
    var seed: UInt64 = 42

    @Flag(help: "Print exactly one JSON object on stdout.")
    var json = false

    @Option(name: .customLong("log-level"), help: "Log level on stderr (default error).")
    var logLevel: LogLevelArgument?

    func run() throws {
        bootstrapLogging(logLevel?.level ?? .error)
        var options = SoakOptions()
        if let target = try registry.target {
            guard servers == nil else { throw SpillwayError.invalidArgument("give --servers or --etcd/--cluster, not both") }
            options.etcd = target.etcd
            options.cluster = target.cluster
        } else {
            options.servers = servers.map { $0.split(separator: ",").map(String.init) } ?? []
        }
        options.tokenFile = tokenFile
        options.k = k
        options.r = r
        options.lateBindingDelta = lateBindingDelta
        options.durationSeconds = duration
        options.size = size.bytes
        options.blockSize = blockSize.bytes
        options.seed = seed
        let result = try PoolSoak.run(options, progress: json ? nil : ProgressBar(label: "soak"))
        if json {
            printLine(result.json.serialized())
        } else {
            printLine("""
                writes \(result.writes)  reads \(result.reads)  verified \(result.verified)  lost \(result.lost)  \
                corrupt \(result.corrupt)  errors \(result.errors)  decoded reads \(result.decodedReads)  \
                degraded reads \(result.degradedReads)
                latency p50/p99: healthy \(result.healthy.p50)/\(result.healthy.p99) ns, degraded \(result.degraded.p50)/\(result.degraded.p99) ns
                """)
        }
        if !result.passed { throw ExitCode(1) }
    }
}
