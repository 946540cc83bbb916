import Foundation
import SpillwayCore
import SpillwayTestSupport
import Testing
@testable import SpillwayPolicy

@Suite struct PolicyEngineTests {
    func engine(_ name: String, capacities: [Int] = [4, 16]) throws -> PolicyEngine {
        PolicyEngine(policy: try StorePolicy.named(name), tiers: capacities.map { ($0, 1_000) })
    }

    @Test func victimsFollowThePolicyAndSeeRecordedReads() throws {
        let engine = try engine("lru")
        for value in 0..<4 { engine.inserted(PageKey(UInt64(value)), hints: .generic, tier: 0) }
        // Reads of 0 and 1 (lock-free) are applied before the next decision: 2 and 3 are coldest.
        engine.recordRead(PageKey(0), tier: 0, hints: .generic)
        engine.recordRead(PageKey(1), tier: 0, hints: .generic)
        #expect(engine.victims(tier: 0, count: 2) == [PageKey(2), PageKey(3)])
        #expect(engine.trackedCount(tier: 0) == 2)
        // A victim that could not leave is handed back once; tracking twice is refused.
        #expect(engine.track(PageKey(2), hints: .generic, tier: 0))
        #expect(!engine.track(PageKey(2), hints: .generic, tier: 0))
        #expect(engine.victims(tier: 0, count: 1) == [PageKey(0)])
        engine.removed(PageKey(1), tier: 0)
        #expect(engine.victims(tier: 0, count: 4) == [PageKey(2)])
        #expect(engine.victims(tier: 0, count: 4).isEmpty)
    }

    @Test func readWeightsExpireFirstUnderClassRulesOnly() throws {
        for (name, expected) in [("class-aware-lru", [PageKey(9), PageKey(0)]), ("lru", [PageKey(0), PageKey(1)])] {
            let engine = try engine(name)
            for value in 0..<3 { engine.inserted(PageKey(UInt64(value)), hints: .kvBlock(depth: value, parent: nil), tier: 0) }
            engine.inserted(PageKey(9), hints: .weights(layerOrder: 0), tier: 0)
            engine.recordRead(PageKey(9), tier: 0, hints: .weights(layerOrder: 0))
            #expect(engine.victims(tier: 0, count: 2) == expected, "\(name)")
        }
    }

    @Test func admissionIsThePolicys() throws {
        // s3fifo-prefix declines a new block that follows a hit in the same request.
        let engine = try engine("s3fifo-prefix", capacities: [8])
        let root = PageKey(1)
        #expect(engine.admits(root, hints: .kvBlock(depth: 0, parent: nil), tier: 0))
        engine.inserted(root, hints: .kvBlock(depth: 0, parent: nil), tier: 0)
        engine.recordRead(root, tier: 0, hints: .kvBlock(depth: 0, parent: nil))
        #expect(!engine.admits(PageKey(2), hints: .kvBlock(depth: 1, parent: root), tier: 0))
        #expect(engine.admits(root, hints: .generic, tier: 0), "a tracked page is admitted")
    }

    @Test func readsRecordedFromManyThreadsAreAppliedOrCounted() throws {
        let engine = try engine("lru", capacities: [64])
        for value in 0..<64 { engine.inserted(PageKey(UInt64(value)), hints: .generic, tier: 0) }
        let threads = 4, reads = 20_000
        DispatchQueue.concurrentPerform(iterations: threads) { thread in
            for index in 0..<reads { engine.recordRead(PageKey(UInt64((index + thread) % 32)), tier: 0, hints: .generic) }
        }
        // Pages 0…31 were read, 32…63 never: the coldest 32 are exactly the unread ones,
        // whatever was dropped (a drop only loses recency).
        let victims = engine.victims(tier: 0, count: 32)
        #expect(Set(victims) == Set((32..<64).map { PageKey(UInt64($0)) }))
        #expect(engine.droppedReads(tier: 0) >= 0 && engine.droppedReads(tier: 0) < threads * reads)
        #expect(engine.clock(tier: 0) + engine.droppedReads(tier: 0) == 64 + threads * reads,
                "every read is applied once or counted as dropped")
    }

    @Test func costAwareDemotionSkipsATierThatIsDearToWriteForPagesRarelyReadAgain() {
        let costs = [
            DemotionPlanner.TierCost(readNanoseconds: 300, writeNanoseconds: 300, isFull: false),   // DRAM
            DemotionPlanner.TierCost(readNanoseconds: 50_000, writeNanoseconds: 50_000, isFull: false),  // EC remote
            DemotionPlanner.TierCost(readNanoseconds: 90_000, writeNanoseconds: 20_000, isFull: false),   // NVMe
        ]
        #expect(DemotionPlanner.target(from: 0, costs: costs, reuseProbability: 0.05) == 2, "rarely read again: cheap to write wins")
        #expect(DemotionPlanner.target(from: 0, costs: costs, reuseProbability: 1) == 1, "read again: cheap to read wins")
        #expect(DemotionPlanner.target(from: 1, costs: costs, reuseProbability: 0.5) == 2)
        #expect(DemotionPlanner.target(from: 2, costs: costs, reuseProbability: 0.5) == nil, "the last tier drops")
        // Ties and near-ties keep the nearer tier; a full tier pays the cascade.
        let flat = Array(repeating: DemotionPlanner.TierCost(readNanoseconds: 1_000, writeNanoseconds: 1_000, isFull: false), count: 3)
        #expect(DemotionPlanner.target(from: 0, costs: flat, reuseProbability: 0.5) == 1)
        var full = flat
        full[1].isFull = true
        full[2].writeNanoseconds = 800
        #expect(DemotionPlanner.target(from: 0, costs: full, reuseProbability: 0.5) == 2)
        #expect(DemotionPlanner.target(from: 0, costs: costs, reuseProbability: .nan) == 2, "no estimate counts as no reuse")
    }

    @Test func theEngineMeasuresCostsAndReuse() throws {
        let engine = PolicyEngine(policy: try StorePolicy.named("lru"), tiers: [(4, 300), (4, 20_000), (4, 80_000)])
        #expect(engine.cost(tier: 1).readNanoseconds == 20_000, "starts at the nominal latency")
        for _ in 0..<200 { engine.observe(tier: 1, write: true, nanoseconds: 400_000, pages: 2) }
        #expect(abs(engine.cost(tier: 1).writeNanoseconds - 200_000) < 1_000, "converges on the measured per-page cost")
        // Demotions with no later reads drive the reuse estimate down, and the planner then
        // skips tier 1 (now dear to write) for tier 2.
        for _ in 0..<200 { _ = engine.demotionTarget(from: 0, isFull: { _ in false }) }
        #expect(engine.cost(tier: 0).reuseProbability < 0.05)
        #expect(engine.demotionTarget(from: 0, isFull: { _ in false }) == 2)
        let nextTier = PolicyEngine(policy: try StorePolicy.named("lru", demotion: .nextTier), tiers: [(4, 300), (4, 20_000), (4, 80_000)])
        for _ in 0..<200 { nextTier.observe(tier: 1, write: true, nanoseconds: 400_000, pages: 2) }
        #expect(nextTier.demotionTarget(from: 0, isFull: { _ in false }) == 1)
    }

    @Test func policiesByName() throws {
        #expect(StorePolicy.names.first == StorePolicy.defaultName)
        #expect(try StorePolicy.named("lru").classAware == false)
        #expect(try StorePolicy.named("class-aware-lru").name == "class-aware-lru")
        #expect(try StorePolicy.named("s3fifo").classAware)
        #expect(throws: SpillwayError.invalidConfiguration("policy 'opt' needs the future and only runs in `spillway replay --simulate`")) {
            _ = try StorePolicy.named("opt")
        }
        #expect(throws: SpillwayError.self) { _ = try StorePolicy.named("mru") }
    }
}
