import Testing
@testable import SpillwayCore
@testable import SpillwayMemoryTiers
@testable import SpillwayStore
import SpillwayPolicy

@Suite struct PageClassStoreTests {
    func twoTierStore(policy: StorePolicy, device: Int = 8, dram: Int = 32) throws -> TieredStore {
        let tiers: [any Tier] = [
            try DeviceTier(slotSize: 4096, capacitySlots: device, memory: HostDeviceMemory(prefault: false)),
            try DRAMTier(slotSize: 4096, capacitySlots: dram, prefault: false),
        ]
        return try TieredStore(tiers: tiers, policy: policy,
                               options: StoreOptions(maxPageSize: 4096, backgroundWorker: false))
    }

    @Test func defaultPolicyIsReported() throws {
        let store = try makeStore(device: 4, dram: 8)
        defer { store.close() }
        #expect(store.policy.name == StorePolicy.defaultName)
        #expect(store.stats().policy == StorePolicy.defaultName)
        let lru = try twoTierStore(policy: try StorePolicy.named("lru"))
        defer { lru.close() }
        #expect(lru.stats().policy == "lru")
    }

    @Test func putKeepsHintsSingleAndBatched() throws {
        let store = try twoTierStore(policy: try StorePolicy.named("class-aware-lru"))
        defer { store.close() }
        let parent = PageKey(100)
        try store.put(PageKey(1), bytes: [1, 2, 3], hints: .kvBlock(depth: 3, parent: parent))
        try store.put(PageKey(2), bytes: [4])
        #expect(store.hints(of: PageKey(1)) == .kvBlock(depth: 3, parent: parent))
        #expect(store.hints(of: PageKey(2)) == .generic)
        #expect(store.hints(of: PageKey(3)) == nil)
        let bytes: [UInt8] = [9, 9]
        let stored = bytes.withUnsafeBytes { raw in
            var writes = [
                PageWrite(key: PageKey(10), bytes: raw, hints: .weights(layerOrder: 4)),
                PageWrite(key: PageKey(11), bytes: raw),
            ]
            return writes.withUnsafeMutableBufferPointer { store.put(batch: $0) }
        }
        #expect(stored == 2)
        #expect(try store.get(PageKey(10)) == bytes)
        #expect(store.hints(of: PageKey(10)) == .weights(layerOrder: 4))
        #expect(store.hints(of: PageKey(11)) == .generic)
        // Class-aware placement: new weights start below the top tier, everything else on top.
        #expect(store.location(of: PageKey(10))?.tier == 1)
        #expect(store.location(of: PageKey(11))?.tier == 0)
        #expect(store.location(of: PageKey(1))?.tier == 0)
    }

    @Test func classAwareStoreDoesNotPromoteWeightsButPromotesKV() throws {
        let store = try twoTierStore(policy: try StorePolicy.named("class-aware-lru"))
        defer { store.close() }
        try store.put(PageKey(1), bytes: [1], tier: 1, hints: .weights(layerOrder: 0))
        try store.put(PageKey(2), bytes: [2], tier: 1, hints: .kvBlock(depth: 0, parent: nil))
        #expect(try store.get(PageKey(1)) == [1])
        #expect(try store.get(PageKey(2)) == [2])
        #expect(store.location(of: PageKey(1))?.tier == 1, "weights are read where they are")
        #expect(store.location(of: PageKey(2))?.tier == 0, "KV blocks are promoted as under LRU")
        #expect(store.stats().tiers[0].promotionsIn == 1)
    }

    @Test func lruPolicyStillPromotesWeights() throws {
        let store = try twoTierStore(policy: try StorePolicy.named("lru"))
        defer { store.close() }
        try store.put(PageKey(1), bytes: [1], tier: 1, hints: .weights(layerOrder: 0))
        #expect(try store.get(PageKey(1)) == [1])
        #expect(store.location(of: PageKey(1))?.tier == 0)
    }

    @Test func reclaimDemotesUsedWeightsBeforeOlderKVBlocks() throws {
        // Tier 0 holds 8 pages: 6 KV blocks stored first, then 2 weights pages placed there
        // explicitly and read (the most recent use). Filling it demotes the weights first.
        let store = try twoTierStore(policy: try StorePolicy.named("class-aware-lru"))
        defer { store.close() }
        for index in 0..<6 { try store.put(PageKey(UInt64(index)), bytes: [UInt8(index)], hints: .kvBlock(depth: index, parent: nil)) }
        try store.put(PageKey(20), bytes: [20], tier: 0, hints: .weights(layerOrder: 0))
        try store.put(PageKey(21), bytes: [21], tier: 0, hints: .weights(layerOrder: 1))
        #expect(try store.get(PageKey(20)) == [20])
        #expect(try store.get(PageKey(21)) == [21])
        try store.put(PageKey(7), bytes: [7])
        try store.put(PageKey(8), bytes: [8])
        #expect(store.location(of: PageKey(20))?.tier == 1 && store.location(of: PageKey(21))?.tier == 1)
        for index in 0..<6 { #expect(store.location(of: PageKey(UInt64(index)))?.tier == 0, "KV block \(index)") }
        #expect(accountingHolds(store))
    }

    @Test func pinnedWeightsAreNotDemoted() throws {
        let store = try twoTierStore(policy: try StorePolicy.named("class-aware-lru"), device: 4)
        defer { store.close() }
        try store.put(PageKey(20), bytes: [20], tier: 0, hints: .weights(layerOrder: 0))
        try store.pin(PageKey(20))
        for index in 0..<6 { try store.put(PageKey(UInt64(index)), bytes: [UInt8(index)]) }
        #expect(store.location(of: PageKey(20))?.tier == 0)
        try store.unpin(PageKey(20))
    }
}
