import Foundation
import SpillwayCore
import SpillwayTestSupport
import SpillwayPolicy
import Testing

let mooncakeTrace = "../shared/traces/mooncake_synthetic_trace.jsonl"

@Suite(.serialized) struct ReplayCommandTests {
    func writeTrace(_ text: String, name: String) throws -> String {
        let path = NSTemporaryDirectory() + "spillway-replay-\(name)-\(getpid()).jsonl"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test func simulatePrintsTheJSONSchemaWithHandComputedRatios() throws {
        let path = try writeTrace(handmadeTrace, name: "hand")
        defer { unlink(path) }
        for (policy, hits, prefixHits) in [("lru", 1, 0), ("opt", 2, 1)] {
            let result = try runSpillway(["replay", "--trace", path, "--simulate", "--policy", policy, "--capacity-blocks", "2", "--json"])
            #expect(result.status == 0, "\(result.stderr)")
            #expect(result.stdout.hasSuffix("}\n") && result.stdout.filter { $0 == "\n" }.count == 1)
            let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
            #expect(object["policy"] as? String == policy)
            #expect(object["capacity_blocks"] as? Int == 2)
            #expect(object["requests"] as? Int == 4)
            #expect(object["block_refs"] as? Int == 7)
            #expect(object["hits"] as? Int == hits && object["prefix_hits"] as? Int == prefixHits)
            #expect(object["hit_ratio"] as? Double == Double(hits) / 7, "\(policy)")
            #expect(object["prefix_hit_ratio"] as? Double == Double(prefixHits) / 7, "\(policy)")
        }
    }

    @Test func capacityFractionIsOfTheUniqueBlocks() throws {
        let path = try writeTrace(handmadeTrace, name: "fraction")
        defer { unlink(path) }
        let result = try runSpillway(["replay", "--trace", path, "--simulate", "--policy", "s3fifo-prefix", "--capacity-fraction", "0.5", "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        #expect(object["capacity_blocks"] as? Int == 2, "half of 4 unique blocks")
    }

    @Test(arguments: [
        (["replay", "--policy", "opt", "--capacity-blocks", "2"], "needs the future"),
        (["replay", "--simulate", "--policy", "lru", "--capacity-blocks", "2", "--block-bytes", "8k"], "store mode"),
        (["replay", "--policy", "lru"], "exactly one of --capacity-blocks"),
        (["replay", "--simulate", "--policy", "mru", "--capacity-blocks", "2"], "unknown policy 'mru'"),
        (["replay", "--simulate", "--policy", "lru"], "exactly one of --capacity-blocks"),
        (["replay", "--simulate", "--policy", "lru", "--capacity-blocks", "0"], "capacity 0 blocks"),
        (["replay", "--simulate", "--policy", "lru", "--capacity-fraction", "1.5"], "must be in (0, 1]"),
        (["replay", "--simulate", "--policy", "opt", "--capacity-blocks", "100000000000"], "blocks must be in 1..."),
        (["replay", "--sweep", "--policy", "lru"], "drop --policy"),
        (["replay", "--simulate", "--sweep"], "exclusive"),
    ])
    func badArgumentsAreOneLineErrors(arguments: [String], expected: String) throws {
        let path = try writeTrace(handmadeTrace, name: "bad")
        defer { unlink(path) }
        let result = try runSpillway(arguments + ["--trace", path])
        #expect(result.status != 0)
        #expect(result.stderr.contains(expected), "\(result.stderr)")
        #expect(result.stdout.isEmpty)
    }

    /// Without --simulate the trace runs on a real store: same hand-computed LRU result, every
    /// hit's bytes checked, per-tier counts in the JSON.
    @Test func storeModeMatchesTheHandComputedLRU() throws {
        let path = try writeTrace(handmadeTrace, name: "store")
        defer { unlink(path) }
        let result = try runSpillway(["replay", "--trace", path, "--policy", "lru", "--capacity-blocks", "2", "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        #expect(object["mode"] as? String == "store" && object["policy"] as? String == "lru")
        #expect(object["hits"] as? Int == 1 && object["prefix_hits"] as? Int == 0 && object["block_refs"] as? Int == 7)
        #expect(object["simulated_hit_ratio"] as? Double == 1.0 / 7)
        #expect(object["corrupt"] as? Int == 0 && object["put_errors"] as? Int == 0)
        let tiers = try #require(object["tiers"] as? [[String: Any]])
        #expect(tiers.count == 1 && tiers[0]["hits"] as? Int == 1 && tiers[0]["evictions"] as? Int == 4)
        for key in ["stall_ns", "goodput", "duration_s", "hit_ratio", "prefix_hit_ratio"] { #expect(object[key] != nil, "\(key)") }
    }

    @Test func prefetchEvalReportsEveryStreamAndPrefetcher() throws {
        let result = try runSpillway(["replay", "--prefetch-eval", "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        let rows = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [[String: Any]])
        #expect(rows.count == SyntheticStream.allCases.count * PrefetcherKind.allCases.count)
        let leapOnNoise = try #require(rows.first { $0["stream"] as? String == "noisy-sequential" && $0["prefetcher"] as? String == "leap" })
        #expect((leapOnNoise["accuracy"] as? Double ?? 0) > 0.9)
        let bad = try runSpillway(["replay", "--prefetch-eval", "--policy", "lru"])
        #expect(bad.status != 0 && bad.stderr.contains("takes no trace"))
    }

    @Test func aMalformedTraceNamesTheLine() throws {
        let path = try writeTrace("{\"hash_ids\": [1]}\n{\"hash_ids\": [oops]}\n", name: "malformed")
        defer { unlink(path) }
        let result = try runSpillway(["replay", "--trace", path, "--simulate", "--policy", "lru", "--capacity-blocks", "2"])
        #expect(result.status != 0)
        #expect(result.stderr.contains("\(path):2: not a trace record"), "\(result.stderr)")
    }

    @Test func sweepPrintsEveryPolicyAndWritesThePlot() throws {
        let path = try writeTrace(handmadeTrace, name: "sweep")
        let svg = NSTemporaryDirectory() + "spillway-replay-\(getpid()).svg"
        defer { unlink(path); unlink(svg) }
        let result = try runSpillway(["replay", "--trace", path, "--sweep", "--json", "--plot", svg])
        #expect(result.status == 0, "\(result.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        let results = try #require(object["results"] as? [[String: Any]])
        #expect(results.count == 6 * 5)
        for row in results {
            for key in ["policy"] { #expect(row[key] is String) }
            for key in ["capacity_blocks", "requests", "block_refs"] { #expect(row[key] is Int, "\(key)") }
            for key in ["hit_ratio", "prefix_hit_ratio"] { #expect(row[key] is Double || row[key] is Int, "\(key)") }
        }
        let text = try String(contentsOfFile: svg, encoding: .utf8)
        #expect(text.hasPrefix("<svg") && text.contains("s3fifo-prefix"))
    }

    @Test(.enabled(if: FileManager.default.fileExists(atPath: mooncakeTrace), "needs the Mooncake trace at ../shared/traces"))
    func mooncakeTraceLRUMatchesItsCounts() throws {
        let result = try runSpillway(["replay", "--trace", mooncakeTrace, "--simulate", "--policy", "lru", "--capacity-fraction", "0.05", "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        #expect(object["requests"] as? Int == 3993)
        #expect(object["block_refs"] as? Int == 121_877)
        #expect(object["capacity_blocks"] as? Int == 2196, "5 % of 43,924 unique blocks")
    }
}
