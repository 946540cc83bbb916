import ArgumentParser
import Foundation
import Spillway
import SpillwayBench
import SpillwayCommandSupport
import SpillwayPolicy

/// `spillway replay`: a KV trace through a cache policy, simulated over block ids or on a real store.
struct ReplayCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replay",
        abstract: "Replay a Mooncake-format KV trace through a cache policy (simulated, or on a real store).",
        discussion: """
        --simulate replays the trace's block ids through one policy of a fixed capacity in blocks:
        per request, each hash id in order; a hit refreshes it, a miss evicts one block if full and
        inserts (lru and opt always insert; the others may decline). hit_ratio = references found
        cached / all references; prefix_hit_ratio counts a request's hits only up to its first miss
        (what a prefix cache can serve), also over all references.

        --sweep runs every policy at 1, 5, 10, 25 and 50 % of the trace's unique blocks; --plot
        FILE.svg also writes hit ratio vs capacity per policy as an SVG.

        Without --simulate or --sweep, the trace runs on a real TieredStore under the same rules and
        the same policy code: by default one DRAM tier of --capacity-blocks slots of --block-bytes
        (declined puts dropped), whose hits equal --simulate's; with --config FILE, the store that
        file describes (its [[tier]] capacities), reporting hits per tier. Every hit's bytes are
        checked. Reports hit ratios, bytes written per tier, demotions, stall time and goodput.

        --prefetch-eval (no trace) evaluates the stream prefetchers (none, next-n, last-delta, leap)
        on synthetic page streams (sequential, strided, reverse, interleaved, weights passes,
        per-layer KV, random, 20 %-noisy) over a 256-page LRU cache: accuracy (used / issued)
        and coverage (prefetch hits / (prefetch hits + demand misses)).

        Policies: \(PolicyKind.names) (opt only with --simulate).
        """)

    @Option(help: "A Mooncake-format trace (.jsonl; default $SPILLWAY_TRACE).")
    var trace: String?

    @Flag(help: "Simulate a policy over block ids (no store).")
    var simulate = false

    @Option(name: .customLong("block-bytes"), help: "Store mode: bytes per block (default 4k).")
    var blockBytes: SizeArgument?

    @Option(help: "Store mode: a TOML store configuration ([[tier]] tables) to replay on.")
    var config: String?

    @Flag(help: "Every policy at 1/5/10/25/50 % of the unique blocks.")
    var sweep = false

    @Flag(name: .customLong("prefetch-eval"), help: "Evaluate the stream prefetchers on synthetic streams (no trace).")
    var prefetchEval = false

    @Option(help: "\(PolicyKind.names) (store mode: default \(StorePolicy.defaultName)).")
    var policy: String?

    @Option(name: .customLong("capacity-blocks"), help: "Cache capacity in blocks.")
    var capacityBlocks: Int?

    @Option(name: .customLong("capacity-fraction"), help: "Cache capacity as a fraction (0, 1] of the trace's unique blocks.")
    var capacityFraction: Double?

    @Option(help: "With --sweep: write hit ratio vs capacity per policy to this SVG file.")
    var plot: String?

    @Option(help: "Replay only the first N requests.")
    var limit: Int?

    @Flag(help: "Print one JSON object.")
    var json = false

    func run() throws {
        if prefetchEval {
            guard !simulate, !sweep, trace == nil, policy == nil, capacityBlocks == nil, capacityFraction == nil else {
                throw SpillwayError.invalidArgument("--prefetch-eval takes no trace, policy or capacity")
            }
            let results = PrefetchEvaluation.report()
            if json {
                printLine(JSONValue.array(results.map(\.json)).serialized())
            } else {
                printLine(PrefetchEvaluation.table(results))
            }
            return
        }
        guard !(simulate && sweep) else { throw SpillwayError.invalidArgument("--simulate and --sweep are exclusive") }
        if let limit, limit < 1 { throw SpillwayError.invalidArgument("--limit must be at least 1") }
        guard let path = trace ?? TraceReplay.configuredTrace() else {
            throw SpillwayError.invalidArgument("replay \(TraceReplay.missingTraceReason)")
        }
        let blockTrace = try BlockTrace.load(path, limit: limit)
        if sweep {
            guard policy == nil, capacityBlocks == nil, capacityFraction == nil else {
                throw SpillwayError.invalidArgument("--sweep runs every policy at every capacity; drop --policy and --capacity-*")
            }
            try runSweep(blockTrace, path: path)
            return
        }
        guard plot == nil else { throw SpillwayError.invalidArgument("--plot goes with --sweep") }
        let capacity: Int
        switch (capacityBlocks, capacityFraction) {
        case (let blocks?, nil): capacity = blocks
        case (nil, let fraction?): capacity = try PolicySimulator.capacity(fraction: fraction, of: blockTrace)
        default: throw SpillwayError.invalidArgument("replay needs exactly one of --capacity-blocks N and --capacity-fraction F")
        }
        guard simulate else {
            try runOnStore(blockTrace, capacity: capacity)
            return
        }
        guard blockBytes == nil, config == nil else { throw SpillwayError.invalidArgument("--block-bytes and --config are for store mode (no --simulate)") }
        guard let policyName = policy else { throw SpillwayError.invalidArgument("--simulate needs --policy (\(PolicyKind.names))") }
        let kind = try PolicyKind(name: policyName)
        let result = try PolicySimulator.run(kind, capacityBlocks: capacity, trace: blockTrace)
        if json {
            printLine(result.json.serialized())
        } else {
            printLine(String(format: "%@: %d blocks, %d requests, %d block refs: hit ratio %.4f, prefix hit ratio %.4f",
                             result.policy, result.capacityBlocks, result.requests, result.blockReferences,
                             result.hitRatio, result.prefixHitRatio))
        }
    }

    private func runOnStore(_ blockTrace: BlockTrace, capacity: Int) throws {
        let storePolicy = try StorePolicy.named(policy ?? StorePolicy.defaultName)
        var options = StoreReplay.Options(policy: storePolicy, capacityBlocks: capacity, blockBytes: blockBytes?.bytes ?? 4096)
        if let config {
            guard let store = try CommandConfigFile(path: config, optionKeys: []).store else {
                throw SpillwayError.invalidConfiguration("\(config): no [[tier]] tables")
            }
            options.configuration = store
        }
        let result = try StoreReplay.run(blockTrace, options: options)
        if json {
            printLine(result.json.serialized())
        } else {
            printLine(String(format: "%@ on a real store: %d blocks of %d bytes, %d requests, %d block refs: hit ratio %.4f, prefix hit ratio %.4f",
                             result.policy, result.capacityBlocks, result.blockBytes, result.requests, result.blockReferences,
                             result.hitRatio, result.prefixHitRatio))
            if let simulated = result.simulated {
                printLine(String(format: "simulated: hit ratio %.4f, prefix hit ratio %.4f (difference %+.4f)",
                                 simulated.hitRatio, simulated.prefixHitRatio, result.hitRatio - simulated.hitRatio))
            }
            for tier in result.tiers {
                printLine(String(format: "  %@: hits %d (%.4f), written %@, demoted %d, promoted in %d, evicted %d, stall %.3f s",
                                 tier.name, tier.hits, Double(tier.hits) / Double(max(1, result.blockReferences)),
                                 ByteCount.format(tier.bytesWritten), tier.demotionsOut, tier.promotionsIn, tier.evictions,
                                 Double(tier.stallNanoseconds) / 1e9))
            }
            printLine(String(format: "corrupt hits %d, put errors %d, declined puts %d, goodput %.4f, %.2f s",
                             result.corrupt, result.putErrors, result.declinedPuts, result.goodput, result.seconds))
        }
        guard result.corrupt == 0, result.putErrors == 0 else {
            throw SpillwayError.invalidArgument("replay on the store saw \(result.corrupt) wrong or failed reads and \(result.putErrors) failed puts")
        }
    }

    private func runSweep(_ blockTrace: BlockTrace, path: String) throws {
        let fractions = PolicySimulator.sweepFractions
        let table = try PolicySimulator.sweep(trace: blockTrace)
        if let plot {
            let name = URL(fileURLWithPath: path).lastPathComponent
            let svg = HitRatioPlot.svg(table: table, fractions: fractions, title: "Block hit ratio vs capacity: \(name)")
            do {
                try svg.write(toFile: plot, atomically: true, encoding: .utf8)
            } catch {
                throw SpillwayError.invalidArgument("cannot write \(plot): \(error.localizedDescription)")
            }
        }
        if json {
            printLine(JSONValue.object([
                ("trace", .string(path)), ("requests", .int(blockTrace.requests.count)),
                ("block_refs", .int(blockTrace.references.count)), ("unique_blocks", .int(blockTrace.uniqueBlocks)),
                ("capacity_fractions", .array(fractions.map { .double($0) })),
                ("results", .array(table.flatMap { $0.map(\.json) })),
            ]).serialized())
            return
        }
        printLine("\(blockTrace.requests.count) requests, \(blockTrace.references.count) block refs, \(blockTrace.uniqueBlocks) unique blocks; hit ratio (prefix hit ratio)")
        let capacities = table.first?.map(\.capacityBlocks) ?? []
        var header = "policy".padding(toLength: 14, withPad: " ", startingAt: 0)
        for (fraction, blocks) in zip(fractions, capacities) {
            header += "  " + "\(HitRatioPlot.percent(fraction)) (\(blocks))".padding(toLength: 15, withPad: " ", startingAt: 0)
        }
        printLine(header)
        for row in table {
            var line = (row.first?.policy ?? "?").padding(toLength: 14, withPad: " ", startingAt: 0)
            for result in row {
                line += "  " + String(format: "%.3f (%.3f)", result.hitRatio, result.prefixHitRatio).padding(toLength: 15, withPad: " ", startingAt: 0)
            }
            printLine(line)
        }
    }
}
