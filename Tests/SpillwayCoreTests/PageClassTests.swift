import Testing
import SpillwayTestSupport
@testable import SpillwayCore

@Suite struct PageClassTests {
    func location(_ tier: Int, _ slot: UInt32) -> PageLocation {
        PageLocation(tier: tier, extent: Extent(firstSlot: slot, slotCount: 1))
    }

    @Test func entryStaysOneCacheLine() {
        // The hints live in the entry's spare bytes; a lookup must still touch one line.
        #expect(MemoryLayout<PageEntry>.size <= 64)
        #expect(MemoryLayout<PageEntry>.stride == 64)
    }

    @Test func hintsRoundTripThroughInsertMoveAndReplace() throws {
        let directory = try PageDirectory(tierCapacities: [16, 16])
        let key = PageKey(high: 7, low: 9)
        let parent = PageKey(high: 1, low: 2)
        let hints = PageHints.kvBlock(depth: 12, parent: parent)
        _ = try directory.insert(key, location: location(0, 1), length: 10, checksum: 3, hints: hints)
        let stored = try #require(directory.snapshot(of: key))
        #expect(stored.hints == hints)
        #expect(stored.hints.parent == parent.policyID && stored.hints.parent == PageHints.parentID(of: parent))
        #expect(stored.length == 10 && stored.checksum == 3, "hints do not disturb the neighbouring fields")
        // A move keeps the hints.
        let claim = try #require(directory.beginMove(key))
        #expect(directory.commitMove(claim, to: location(1, 4)).committed)
        #expect(directory.snapshot(of: key)?.hints == hints)
        #expect(directory.snapshot(of: key)?.location == location(1, 4))
        // A new version carries its own hints (default generic).
        _ = try directory.insert(key, location: location(0, 2), length: 1, checksum: 0)
        #expect(directory.snapshot(of: key)?.hints == .generic)
        _ = try directory.insert(key, location: location(0, 3), length: 1, checksum: 0, hints: .weights(layerOrder: 70_000))
        #expect(directory.snapshot(of: key)?.hints == PageHints(pageClass: .weights, order: .max))
        // Reads see them too (what the store hands the policy on a lower-tier hit).
        let read = try #require(try directory.beginRead(key))
        #expect(read.hints.pageClass == .weights)
        _ = directory.endRead(read)
    }

    @Test func hintValuesAreClampedToWhatTheEntryHolds() {
        #expect(PageHints.kvBlock(depth: -3, parent: nil) == PageHints(pageClass: .kvBlock, order: 0, parent: 0))
        #expect(PageHints.kvBlock(depth: 1 << 20, parent: nil).order == UInt16.max)
        let seed = TestSeed.derive(41)
        var generator = SplitMix64(seed: seed)
        for _ in 0..<1000 {
            let id = PageHints.parentID(of: PageKey(high: generator.next(), low: generator.next()))
            #expect(id != 0 && id >> 63 == 0, "ids are nonzero with bit 63 clear (the policy's flag bit) \(TestSeed.note(seed))")
        }
    }
}
