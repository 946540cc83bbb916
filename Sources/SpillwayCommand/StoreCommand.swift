import ArgumentParser
import Spillway
import SpillwayBench
import SpillwayCommandSupport

/// `spillway store …`: crash testing of a configured store with real processes.
struct StoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "store",
        abstract: "Crash-test a configured store: soak it (kill it at any moment), then verify the warm restart.",
        subcommands: [StoreSoakCommand.self, StoreVerifyCommand.self])
}

struct StoreSoakCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "soak",
        abstract: "Put, overwrite, remove and get self-verifying pages, logging every acknowledged put and remove.",
        discussion: """
        Formats the configured store (every NVMe tier is reformatted), then runs puts (new \
        versions of existing keys too), removes and gets of pages whose bytes derive from \
        (key, version). After each put or remove returns, appends 'put KEY VERSION' or \
        'remove KEY' to the ack log (one write per line, nothing buffered). Versions only \
        increase per key. Prints {"puts", "removes", "gets", "errors", "stale", "corrupt"} \
        (errors: refused or failed operations, never acknowledged; stale/corrupt: gets that \
        returned an older version or bytes of no version). Exit 0 iff stale = 0 and corrupt \
        = 0. Meant to be killed (SIGKILL) at any moment and followed by 'spillway store verify'.
        """)

    @Option(help: "The store's TOML configuration.")
    var config: String

    @Option(help: "Seconds to run (default 10).")
    var duration: Double = 10

    @Option(help: "Number of keys (default 1000).")
    var keys: Int = 1000

    @Option(help: "Worker threads; each owns a disjoint set of keys (default 2).")
    var threads: Int = 2

    @Option(help: "Seed of the operation mix (default 1).")
    var seed: UInt64 = 1

    @Option(name: .customLong("ack-log"), help: "File to (re)create with one line per acknowledged put or remove.")
    var ackLog: String

    @Flag(help: "Print exactly one JSON object on stdout.")
    var json = false

    @Option(name: .customLong("log-level"), help: "Log level on stderr (default error).")
    var logLevel: LogLevelArgument?

    func run() throws {
        bootstrapLogging(logLevel?.level ?? .error)
        let configuration = try SpillwayConfiguration(contentsOfFile: config)
        var options = StoreSoak.Options()
        options.durationSeconds = duration
        options.keys = keys
        options.threads = threads
        options.seed = seed
        options.ackLog = ackLog
        let result = try StoreSoak.run(options, configuration: configuration)
        printLine(json ? result.json.serialized() : """
            puts \(result.puts)  removes \(result.removes)  gets \(result.gets)  errors \(result.errors)  \
            stale \(result.stale)  corrupt \(result.corrupt)
            """)
        if result.stale != 0 || result.corrupt != 0 { throw ExitCode(1) }
    }
}

struct StoreVerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Reopen the store (warm restart) and check every key of an ack log.",
        discussion: """
        Counts per key of the log, against its last acknowledged operation: present (last \
        put v: v or a newer version is read; last remove: missing or a newer put), absent \
        (last put, key missing), stale (an older version; after a remove, the removed version \
        or an older one), corrupt (bytes of no version, or a read that failed other than with \
        a missing key; the latter also counted in errors). Prints {"checked", "present", \
        "absent", "stale", "corrupt", "errors"}. An incomplete last line of the log is \
        ignored. Exit 0 iff stale and corrupt are 0 (and, with --expect-all, absent too); 1 \
        otherwise; errors (e.g. a malformed log) go to stderr.
        """)

    @Option(help: "The store's TOML configuration (the one soak used).")
    var config: String

    @Option(name: .customLong("ack-log"), help: "The ack log soak wrote.")
    var ackLog: String

    @Flag(name: .customLong("expect-all"), help: "Also fail if an acknowledged put is missing (a store without volatile tiers or eviction).")
    var expectAll = false

    @Flag(help: "Print exactly one JSON object on stdout.")
    var json = false

    @Option(name: .customLong("log-level"), help: "Log level on stderr (default error).")
    var logLevel: LogLevelArgument?

    func run() throws {
        bootstrapLogging(logLevel?.level ?? .error)
        let configuration = try SpillwayConfiguration(contentsOfFile: config)
        let result = try StoreSoak.verify(ackLog: ackLog, configuration: configuration)
        printLine(json ? result.json.serialized() : """
            checked \(result.checked)  present \(result.present)  absent \(result.absent)  stale \(result.stale)  \
            corrupt \(result.corrupt)  errors \(result.errors)
            """)
        if !result.passed(expectAll: expectAll) { throw ExitCode(1) }
    }
}
