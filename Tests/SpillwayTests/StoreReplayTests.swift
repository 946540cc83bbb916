import Foundation
import SpillwayBench
import SpillwayTestSupport
import Testing
@testable import Spillway

/// Random prefix-chained requests over a small tree with one-off suffixes (ids encode the
/// path — a child is `parent × 8 + 1…3`, roots 1…6 — so equal ids mean equal prefixes, as in a
/// real trace).
func chainedTrace(seed: UInt64, requests: Int) throws -> BlockTrace {
    var random = SplitMix64(seed: seed)
    var nextUnique: UInt64 = 1_000_000
    var lines: [String] = []
    for _ in 0..<requests {
        var ids: [UInt64] = []
        var node = random.next() % 6 + 1
        for _ in 0..<Int(random.next() % 6 + 1) {
            ids.append(node)
            node = node &* 8 &+ 1 &+ random.next() % 3
        }
        for _ in 0..<Int(random.next() % 3) {
            ids.append(nextUnique)
            nextUnique += 1
        }
        lines.append("{\"hash_ids\": [\(ids.map(String.init).joined(separator: ", "))]}")
    }
    return try BlockTrace.parse(lines.joined(separator: "\n"))
}

/// Replay on a real store runs the simulator's policy code: the hits must agree, exactly for
/// every policy whose decisions depend only on the order of references; TinyLFU's count-min
/// sketch hashes the ids, which differ (trace ids in the simulator, key hashes in the store),
/// so its collisions differ: within 0.5 % of the references.
@Suite struct StoreReplayTests {
    @Test(arguments: ["lru", "class-aware-lru", "prefix-lru", "s3fifo", "s3fifo-prefix", "tinylfu"])
    func storeReplayMatchesTheSimulation(policy: String) throws {
        let seed = TestSeed.derive(1300)
        let trace = try chainedTrace(seed: seed, requests: 600)
        for capacity in [8, 40, 150] {
            let result = try StoreReplay.run(trace, options: StoreReplay.Options(policy: try StorePolicy.named(policy), capacityBlocks: capacity))
            let simulated = try #require(result.simulated)
            #expect(result.corrupt == 0 && result.putErrors == 0)
            #expect(result.blockReferences == simulated.blockReferences)
            let tolerance = policy == "tinylfu" ? result.blockReferences / 200 : 0
            #expect(abs(result.hits - simulated.hits) <= tolerance,
                    "\(policy) at \(capacity): store \(result.hits), simulated \(simulated.hits) \(TestSeed.note(seed))")
            #expect(abs(result.prefixHits - simulated.prefixHits) <= tolerance, "\(policy) at \(capacity) \(TestSeed.note(seed))")
        }
    }
}
