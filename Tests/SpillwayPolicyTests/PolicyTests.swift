import Foundation
import SpillwayCore
import SpillwayTestSupport
import Testing
@testable import SpillwayPolicy

/// Four requests, capacity 2 (stream 1 2 | 3 | 1 2 | 4 2). By hand:
/// LRU: 1m 2m 3m(evicts 1) 1m(evicts 2) 2m(evicts 3) 4m(evicts 1) 2h → 1 hit, after a miss in
///      its request, so no prefix hit.
/// OPT: 1m 2m 3m(evicts 2: next use 4, farther than 1's 3) 1h 2m(1 and 3 are never used
///      again) 4m(evicts whichever of 1/3 stayed) 2h → 2 hits, 1 of them a prefix hit (ref 3).
let handmadeTrace = """
{"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [1, 2]}
{"timestamp": 1, "input_length": 512, "output_length": 1, "hash_ids": [3]}
{"timestamp": 2, "input_length": 1000, "output_length": 1, "hash_ids": [1, 2]}
{"timestamp": 3, "input_length": 1024, "output_length": 1, "hash_ids": [4, 2]}

"""

/// A trace from a list of requests (each a list of block ids).
func makeTrace(_ requests: [[UInt64]]) throws -> BlockTrace {
    try BlockTrace.parse(requests.map { "{\"hash_ids\": [\($0.map(String.init).joined(separator: ", "))]}" }.joined(separator: "\n"))
}

/// Random prefix-chained requests: a few roots, each request walks a random path down a small
/// tree (ids encode the path, so equal ids mean equal prefixes), plus one-time suffixes.
func randomTrace(seed: UInt64, requests: Int) throws -> BlockTrace {
    var random = SplitMix64(seed: seed)
    var nextUnique: UInt64 = 1_000_000
    var list: [[UInt64]] = []
    for _ in 0..<requests {
        var ids: [UInt64] = []
        var node = random.next() % 6 + 1
        for _ in 0..<Int(random.next() % 6 + 1) {
            ids.append(node)
            node = node &* 4 &+ random.next() % 3
        }
        for _ in 0..<Int(random.next() % 3) {
            ids.append(nextUnique)
            nextUnique += 1
        }
        list.append(ids)
    }
    return try makeTrace(list)
}

@Suite struct TraceParsingTests {
    @Test func parsesRecordsAndSkipsBlankLines() throws {
        let trace = try BlockTrace.parse(handmadeTrace)
        #expect(trace.requests.count == 4)
        #expect(trace.references == [1, 2, 3, 1, 2, 4, 2])
        #expect(trace.uniqueBlocks == 4)
        #expect(trace.requests[2].inputLength == 1000 && trace.requests[2].timestamp == 2)
        #expect(Array(trace.hashIDs(of: trace.requests[3])) == [4, 2])
    }

    @Test(arguments: [
        ("{\"hash_ids\": [1]}\n\n{\"timestamp\": 0}\n", ":3: not a trace record (needs hash_ids)"),
        ("{\"hash_ids\": [1]}\nnot json\n", ":2: not a trace record"),
        ("{\"hash_ids\": [1.5]}\n", ":1: not a trace record"),
        ("{\"hash_ids\": [-1]}\n", ":1: not a trace record"),
        ("{\"hash_ids\": \"1\"}\n", ":1: not a trace record"),
        ("{\"hash_ids\": [1], \"input_length\": -3}\n", ":1: negative input_length"),
    ])
    func malformedLinesNameTheLine(text: String, expected: String) throws {
        let error = #expect(throws: SpillwayError.self) { _ = try BlockTrace.parse(text, source: "t.jsonl") }
        guard case .invalidArgument(let reason) = error else {
            Issue.record("expected invalidArgument, got \(String(describing: error))")
            return
        }
        #expect(reason.hasPrefix("t.jsonl"), "\(reason)")
        #expect(reason.contains(expected), "\(reason)")
    }

    @Test func aMissingFileIsAnError() {
        #expect(throws: SpillwayError.self) { _ = try BlockTrace.load("/nonexistent/trace.jsonl") }
    }

    @Test func limitStopsAfterThatManyRequests() throws {
        let trace = try BlockTrace.parse(handmadeTrace, limit: 2)
        #expect(trace.requests.count == 2 && trace.references == [1, 2, 3])
    }
}

@Suite struct SimulationTests {
    @Test func handmadeTraceLRU() throws {
        let result = try PolicySimulator.run(.lru, capacityBlocks: 2, trace: try BlockTrace.parse(handmadeTrace))
        #expect(result.blockReferences == 7 && result.requests == 4)
        #expect(result.hits == 1 && result.prefixHits == 0)
        #expect(result.hitRatio == 1.0 / 7 && result.prefixHitRatio == 0)
    }

    @Test func handmadeTraceOPT() throws {
        let result = try PolicySimulator.run(.opt, capacityBlocks: 2, trace: try BlockTrace.parse(handmadeTrace))
        #expect(result.hits == 2 && result.prefixHits == 1)
        #expect(result.hitRatio == 2.0 / 7 && result.prefixHitRatio == 1.0 / 7)
    }

    @Test func capacityIsValidated() throws {
        let trace = try BlockTrace.parse(handmadeTrace)
        #expect(throws: SpillwayError.self) { _ = try PolicySimulator.run(.lru, capacityBlocks: 0, trace: trace) }
        #expect(throws: SpillwayError.self) { _ = try PolicySimulator.capacity(fraction: 0, of: trace) }
        #expect(throws: SpillwayError.self) { _ = try PolicySimulator.capacity(fraction: .nan, of: trace) }
        #expect(throws: SpillwayError.self) { _ = try PolicyKind(name: "mru") }
        #expect(try PolicySimulator.capacity(fraction: 0.5, of: trace) == 2)
    }

    @Test func optNeverLosesToLRUOnRandomTraces() throws {
        for round in 0..<20 {
            let seed = TestSeed.derive(UInt64(round))
            let trace = try randomTrace(seed: seed, requests: 300)
            for capacity in [1, 4, 16, 64] {
                let lru = try PolicySimulator.run(.lru, capacityBlocks: capacity, trace: trace)
                let opt = try PolicySimulator.run(.opt, capacityBlocks: capacity, trace: trace)
                let prefix = try PolicySimulator.run(.prefixLRU, capacityBlocks: capacity, trace: trace)
                #expect(opt.hits >= lru.hits, "capacity \(capacity): opt \(opt.hits) < lru \(lru.hits); \(TestSeed.note(seed))")
                #expect(opt.hits >= prefix.hits, "capacity \(capacity): opt \(opt.hits) < prefix-lru \(prefix.hits); \(TestSeed.note(seed))")
            }
        }
    }

    /// Every policy reports a hit exactly when the block was cached, and never holds more than
    /// its capacity.
    @Test(arguments: PolicyKind.allCases)
    func hitsMatchResidencyAndCapacityHolds(kind: PolicyKind) throws {
        for round in 0..<5 {
            let seed = TestSeed.derive(100 + UInt64(round))
            let trace = try randomTrace(seed: seed, requests: 400)
            for capacity in [1, 3, 10, 40] {
                let policy = kind.make(capacityBlocks: capacity, trace: trace)
                for request in trace.requests {
                    var parent: UInt64? = nil
                    for now in request.blocks {
                        let block = trace.references[now]
                        let cached = policy.contains(block)
                        let hit = policy.access(block: block, parent: parent, depth: now - request.blocks.lowerBound, now: now)
                        #expect(hit == cached, "\(kind.rawValue) capacity \(capacity) at \(now); \(TestSeed.note(seed))")
                        #expect(policy.residentCount <= capacity, "\(kind.rawValue); \(TestSeed.note(seed))")
                        parent = block
                    }
                }
            }
        }
    }

    @Test func sweepCoversEveryPolicyAndFraction() throws {
        let trace = try randomTrace(seed: TestSeed.derive(7), requests: 200)
        let table = try PolicySimulator.sweep(trace: trace)
        #expect(table.map { $0.first?.policy } == PolicyKind.allCases.map(\.rawValue))
        #expect(table.allSatisfy { $0.count == PolicySimulator.sweepFractions.count })
        let svg = HitRatioPlot.svg(table: table, fractions: PolicySimulator.sweepFractions, title: "t <&>")
        #expect(svg.hasPrefix("<svg") && svg.hasSuffix("</svg>\n"))
        #expect(svg.contains("t &lt;&amp;&gt;"))
        for kind in PolicyKind.allCases { #expect(svg.contains(">\(kind.rawValue)</text>"), "legend names \(kind.rawValue)") }
        #expect(svg.components(separatedBy: "<polyline").count - 1 == PolicyKind.allCases.count)
    }
}

@Suite struct PolicyBehaviourTests {
    @Test func lruEvictsTheLeastRecentlyUsed() {
        let lru = LRUBlockPolicy(capacityBlocks: 2)
        #expect(!lru.access(block: 1, parent: nil, depth: 0, now: 0))
        #expect(!lru.access(block: 2, parent: nil, depth: 0, now: 1))
        #expect(lru.access(block: 1, parent: nil, depth: 0, now: 2))
        #expect(!lru.access(block: 3, parent: nil, depth: 0, now: 3))
        #expect(lru.contains(1) && !lru.contains(2) && lru.contains(3))
    }

    @Test func optEvictsTheBlockUsedFarthestInTheFuture() {
        // Stream 1 2 3 2 1: at 3, block 1 is next used at 4 and block 2 at 3, so 1 goes.
        let opt = OptimalBlockPolicy(capacityBlocks: 2, stream: [1, 2, 3, 2, 1])
        #expect(!opt.access(block: 1, parent: nil, depth: 0, now: 0))
        #expect(!opt.access(block: 2, parent: nil, depth: 0, now: 1))
        #expect(!opt.access(block: 3, parent: nil, depth: 0, now: 2))
        #expect(!opt.contains(1) && opt.contains(2) && opt.contains(3))
        #expect(opt.access(block: 2, parent: nil, depth: 0, now: 3))
    }

    /// Request [1, 2] then a new chain [3], capacity 2: LRU evicts the root 1 (least recent),
    /// which leaves 2 unusable for prefix hits; the prefix-aware policy evicts the leaf 2.
    @Test(arguments: [PolicyKind.prefixLRU, .s3fifoPrefix])
    func prefixAwareKeepsTheParentOverItsLeaf(kind: PolicyKind) throws {
        let trace = try makeTrace([[1, 2], [3]])
        let policy = kind.make(capacityBlocks: 2, trace: trace)
        _ = policy.access(block: 1, parent: nil, depth: 0, now: 0)
        _ = policy.access(block: 2, parent: 1, depth: 1, now: 1)
        _ = policy.access(block: 3, parent: nil, depth: 0, now: 2)
        #expect(policy.contains(1) && !policy.contains(2), "\(kind.rawValue) keeps the parent")
        let lru = LRUBlockPolicy(capacityBlocks: 2)
        _ = lru.access(block: 1, parent: nil, depth: 0, now: 0)
        _ = lru.access(block: 2, parent: 1, depth: 1, now: 1)
        _ = lru.access(block: 3, parent: nil, depth: 0, now: 2)
        #expect(!lru.contains(1) && lru.contains(2), "LRU, for contrast, loses the parent")
    }

    /// The prefix-aware LRU also prefers a leaf when the chain was refreshed by a later request.
    @Test func prefixLRUEvictsLeavesOfAColdChainFirst() {
        let policy = PrefixLRUBlockPolicy(capacityBlocks: 4)
        var now = 0
        for (block, parent) in [(UInt64(1), UInt64?.none), (2, 1), (3, 2)] {
            _ = policy.access(block: block, parent: parent, depth: now, now: now)
            now += 1
        }
        _ = policy.access(block: 9, parent: nil, depth: 0, now: now)
        now += 1
        _ = policy.access(block: 10, parent: nil, depth: 0, now: now)  // full: evicts 3, the deepest
        #expect(policy.contains(1) && policy.contains(2) && !policy.contains(3))
    }

    /// A block reused every 12 references among one-time blocks, capacity 10: its reuse
    /// distance exceeds LRU's capacity, so LRU never hits it; the admission policies keep the
    /// scan out of their protected part and hit it every time once it is known.
    @Test(arguments: ["s3fifo", "s3fifo-prefix", "tinylfu"])
    func aScanOfOneTimeBlocksDoesNotFlushAReusedBlock(name: String) {
        let hot: UInt64 = 7
        func run(_ policy: any BlockCachePolicy) -> [Bool] {
            var hotHits: [Bool] = []
            var next: UInt64 = 1000
            for now in 0..<1200 {
                if now % 12 == 0 {
                    hotHits.append(policy.access(block: hot, parent: nil, depth: 0, now: now))
                } else {
                    _ = policy.access(block: next, parent: nil, depth: 0, now: now)
                    next += 1
                }
            }
            return hotHits
        }
        let policy: any BlockCachePolicy = switch name {
        case "s3fifo": S3FIFOBlockPolicy(capacityBlocks: 10, ghostMultiple: 4)
        case "s3fifo-prefix": S3FIFOBlockPolicy(capacityBlocks: 10, prefixAware: true, smallFraction: 0.3, ghostMultiple: 4)
        default: TinyLFUBlockPolicy(capacityBlocks: 10)
        }
        let hits = run(policy)
        #expect(hits.dropFirst(5).allSatisfy { $0 }, "\(name): hot block hits after warm-up: \(hits.map { $0 ? 1 : 0 })")
        #expect(run(LRUBlockPolicy(capacityBlocks: 10)).allSatisfy { !$0 }, "LRU never keeps it")
    }

    /// The prefix-aware S3-FIFO remembers a new suffix after a hit instead of admitting it,
    /// and admits it when it comes back.
    @Test func s3fifoPrefixAdmitsASuffixAfterAHitOnItsSecondSighting() {
        let policy = S3FIFOBlockPolicy(capacityBlocks: 8, prefixAware: true)
        _ = policy.access(block: 1, parent: nil, depth: 0, now: 0)
        #expect(policy.access(block: 1, parent: nil, depth: 0, now: 1))
        #expect(!policy.access(block: 50, parent: 1, depth: 1, now: 2))
        #expect(!policy.contains(50), "declined after a hit in the same request")
        #expect(policy.access(block: 1, parent: nil, depth: 0, now: 3))
        #expect(!policy.access(block: 50, parent: 1, depth: 1, now: 4))
        #expect(policy.contains(50), "admitted on its second sighting")
    }
}

@Suite struct SlotStructureTests {
    @Test func blockIndexMatchesADictionaryUnderRandomOperations() {
        let seed = TestSeed.derive(42)
        var random = SplitMix64(seed: seed)
        var index = BlockIndex(capacity: 64)
        var model: [UInt64: Int] = [:]
        for step in 0..<20_000 {
            let key = random.next() % 200
            if model[key] != nil, random.next() % 2 == 0 {
                index.remove(key)
                model[key] = nil
            } else if model[key] != nil || model.count < 64 {
                index.set(key, step % 1000)
                model[key] = step % 1000
            }
            let probe = random.next() % 200
            #expect(index.find(probe) == model[probe], "step \(step); \(TestSeed.note(seed))")
        }
    }

    @Test func ghostRingForgetsTheOldestBeyondItsCapacity() {
        var ghosts = GhostRing(capacity: 3)
        for block in UInt64(1)...4 { ghosts.push(block) }
        #expect(!ghosts.contains(1) && ghosts.contains(2) && ghosts.contains(4))
        ghosts.remove(3)
        #expect(!ghosts.contains(3))
    }
}
