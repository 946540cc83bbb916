import Glibc
import Testing
@testable import SpillwayCore
@testable import SpillwayMemoryTiers
@testable import SpillwayNVMe
@testable import SpillwayStore

func openStore(nvmePath: String, dramSlots: Int = 4, nvmeSlots: Int = 64, reformat: Bool = false) throws -> (TieredStore, NVMeTier) {
    let nvme = try NVMeTier(NVMeTierConfiguration(path: nvmePath, slotSize: 4096, capacitySlots: nvmeSlots, reformat: reformat))
    var tiers: [any Tier] = []
    if dramSlots > 0 { tiers.append(try DRAMTier(slotSize: 4096, capacitySlots: dramSlots, prefault: false)) }
    tiers.append(nvme)
    let store = try TieredStore(tiers: tiers, options: StoreOptions(maxPageSize: 3 * 4096, backgroundWorker: false))
    return (store, nvme)
}

@Suite(.serialized) struct WarmRestartTests {
    @Test func pagesOnNVMeSurviveARestart() throws {
        let path = scratchPath("restart")
        defer { unlink(path) }
        var expected: [PageKey: [UInt8]] = [:]
        do {
            let (store, _) = try openStore(nvmePath: path)
            for value in 0..<20 {
                let page = bytes(UInt64(value), 1000 + value * 500)
                try store.put(PageKey(UInt64(value)), bytes: page)
                expected[PageKey(UInt64(value))] = page
            }
            // Everything but what fits in DRAM went down to NVMe; push the rest down too.
            for value in 0..<20 { _ = store.demote(PageKey(UInt64(value))) }
            for value in 0..<20 { #expect(store.location(of: PageKey(UInt64(value)))?.tier == 1) }
            // Remove one and overwrite another: neither old version may come back.
            try store.remove(PageKey(3))
            expected[PageKey(3)] = nil
            let newer = bytes(999, 700)
            try store.put(PageKey(4), bytes: newer)
            #expect(store.demote(PageKey(4)))
            expected[PageKey(4)] = newer
            store.close()
        }
        let (store, nvme) = try openStore(nvmePath: path)
        defer { store.close() }
        #expect(!nvme.recovery.formatted)
        #expect(nvme.recovery.recovered == 19)
        #expect(nvme.recovery.discarded == 0)
        #expect(!store.contains(PageKey(3)))
        for (key, page) in expected { #expect(try store.get(key) == page) }
    }

    @Test func pagesThatDoNotVerifyAreDiscardedAndCounted() throws {
        let path = scratchPath("discard")
        defer { unlink(path) }
        var geometry: NVMeFormat.Geometry!
        var locations: [PageKey: PageLocation] = [:]
        do {
            let (store, nvme) = try openStore(nvmePath: path, dramSlots: 0)
            geometry = nvme.geometry
            for value in 0..<6 {
                try store.put(PageKey(UInt64(value)), bytes: bytes(UInt64(value), 4096))
                locations[PageKey(UInt64(value))] = store.location(of: PageKey(UInt64(value)))
            }
            store.close()
        }
        // Corrupt page 1's data and tear page 2's index record, behind the tier's back.
        let descriptor = open(path, O_RDWR)
        #expect(descriptor >= 0)
        var garbage = [UInt8](repeating: 0xEE, count: 16)
        let page1 = try #require(locations[PageKey(1)])
        #expect(pwrite(descriptor, &garbage, 16, off_t(geometry.dataOffset(ofSlot: page1.extent.firstSlot) + 100)) == 16)
        let page2 = try #require(locations[PageKey(2)])
        #expect(pwrite(descriptor, &garbage, 8, off_t(geometry.indexOffset + Int(page2.extent.firstSlot) * NVMeFormat.recordSize + 20)) == 8)
        close(descriptor)

        let (store, nvme) = try openStore(nvmePath: path, dramSlots: 0)
        #expect(nvme.recovery.recovered == 4)
        #expect(nvme.recovery.discarded == 2)
        #expect(!store.contains(PageKey(1)) && !store.contains(PageKey(2)))
        for value in [0, 3, 4, 5] { #expect(try store.get(PageKey(UInt64(value))) == bytes(UInt64(value), 4096)) }
        #expect(nvme.usedSlots == 4, "discarded pages' slots are free again")
        store.close()  // gives up the file's lock: the reopen below is another store
        // The discard is persistent: a second restart finds the same four and nothing to discard.
        let (again, nvmeAgain) = try openStore(nvmePath: path, dramSlots: 0)
        defer { again.close() }
        #expect(nvmeAgain.recovery.recovered == 4 && nvmeAgain.recovery.discarded == 0)
    }

    @Test func differentGeometryReformats() throws {
        let path = scratchPath("geometry")
        defer { unlink(path) }
        do {
            let (store, _) = try openStore(nvmePath: path, dramSlots: 0)
            try store.put(PageKey(1), bytes: [1, 2, 3])
            store.close()
        }
        let (store, nvme) = try openStore(nvmePath: path, dramSlots: 0, nvmeSlots: 128)
        defer { store.close() }
        #expect(nvme.recovery.formatted)
        #expect(!store.contains(PageKey(1)))
    }

    @Test func demoteToNVMeAndPromoteBack() throws {
        let path = scratchPath("promote")
        defer { unlink(path) }
        let (store, _) = try openStore(nvmePath: path, dramSlots: 8)
        defer { store.close() }
        for value in 0..<12 { try store.put(PageKey(UInt64(value)), bytes: bytes(UInt64(value), 3000)) }
        #expect(store.stats().tiers[0].demotionsOut >= 4)
        // Free some DRAM so promotions have room.
        for value in 8..<12 { try store.remove(PageKey(UInt64(value))) }
        for value in 0..<8 {
            #expect(try store.get(PageKey(UInt64(value))) == bytes(UInt64(value), 3000))
        }
        #expect(store.stats().tiers[0].promotionsIn > 0)
        #expect(store.stats().tiers[1].hits > 0)
        #expect(store.stats().checksumFailures == 0)
    }
}
