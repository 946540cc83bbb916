import Testing
@testable import SpillwayCore
@testable import SpillwayMemoryTiers
@testable import SpillwayStore

@Suite struct GoodputTests {
    @Test func readsBelowTheTopTierCountAsStallAndLowerGoodput() throws {
        let store = try TieredStore(tiers: [try DRAMTier(name: "top", slotSize: 4096, capacitySlots: 8, prefault: false),
                                            try DRAMTier(name: "below", slotSize: 4096, capacitySlots: 256, prefault: false)],
                                    options: StoreOptions(maxPageSize: 4096, backgroundWorker: false))
        defer { store.close() }
        let page = [UInt8](repeating: 9, count: 4096)
        try store.put(PageKey(1), bytes: page, tier: 0)
        for _ in 0..<1000 { _ = try store.get(PageKey(1)) }
        #expect(store.stats().stallNanoseconds == 0, "top-tier hits are work, not stall")
        for value in 2..<100 { try store.put(PageKey(UInt64(value)), bytes: page, tier: 1) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        for value in 2..<100 {
            _ = try buffer.withUnsafeMutableBytes { try store.get(PageKey(UInt64(value)), into: $0) }
        }
        let stats = store.stats()
        #expect(stats.tiers[0].stallNanoseconds == 0)
        #expect(stats.tiers[1].stallNanoseconds > 0)
        #expect(stats.uptimeNanoseconds > stats.stallNanoseconds)
        #expect(stats.goodput < 1 && stats.goodput > 0)
    }
}
