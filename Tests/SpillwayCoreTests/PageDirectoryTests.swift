import Testing
import SpillwayTestSupport
@testable import SpillwayCore

@Suite struct PageDirectoryTests {
    func location(_ tier: Int, _ slot: UInt32, _ count: UInt32 = 1) -> PageLocation {
        PageLocation(tier: tier, extent: Extent(firstSlot: slot, slotCount: count))
    }

    @Test func insertReplaceRemove() throws {
        let directory = try PageDirectory(tierCapacities: [16, 64])
        let key = PageKey(1)
        #expect(try directory.insert(key, location: location(0, 3), length: 100, checksum: 7) == nil)
        let first = try #require(directory.snapshot(of: key))
        #expect(first.length == 100 && first.checksum == 7 && first.location == location(0, 3))
        // Replacing returns the old location for release (no readers).
        #expect(try directory.insert(key, location: location(1, 9), length: 50, checksum: 8) == location(0, 3))
        let second = try #require(directory.snapshot(of: key))
        #expect(second.version > first.version)
        #expect(directory.pageCount(tier: 0) == 0 && directory.pageCount(tier: 1) == 1)
        let removed = try directory.remove(key)
        #expect(removed.found && removed.release == location(1, 9))
        #expect(!directory.contains(key))
        #expect(try directory.remove(key).found == false)
    }

    @Test func pinsBlockRemovalAndOverwrite() throws {
        let directory = try PageDirectory(tierCapacities: [16])
        let key = PageKey(2)
        _ = try directory.insert(key, location: location(0, 0), length: 1, checksum: 0)
        try directory.pin(key)
        try directory.pin(key)
        #expect(throws: SpillwayError.pagePinned(key)) { _ = try directory.remove(key) }
        #expect(throws: SpillwayError.pagePinned(key)) { _ = try directory.insert(key, location: self.location(0, 1), length: 1, checksum: 0) }
        #expect(directory.beginMove(key) == nil, "pinned pages never move")
        try directory.unpin(key)
        try directory.unpin(key)
        #expect(throws: SpillwayError.notPinned(key)) { try directory.unpin(key) }
        #expect(throws: SpillwayError.unknownKey(PageKey(99))) { try directory.pin(PageKey(99)) }
        #expect(try directory.remove(key).found)
    }

    @Test func readersKeepReplacedLocationAlive() throws {
        let directory = try PageDirectory(tierCapacities: [16])
        let key = PageKey(3)
        _ = try directory.insert(key, location: location(0, 4), length: 1, checksum: 0)
        let readA = try #require(try directory.beginRead(key))
        let readB = try #require(try directory.beginRead(key))
        // Overwrite while two reads are in flight: the old slot is not released yet.
        #expect(try directory.insert(key, location: location(0, 5), length: 1, checksum: 0) == nil)
        #expect(directory.endRead(readA) == nil)
        #expect(directory.endRead(readB) == location(0, 4), "the last reader gets the slot back")
        // Remove with a reader in flight.
        let readC = try #require(try directory.beginRead(key))
        #expect(try directory.remove(key) == (true, nil))
        #expect(directory.endRead(readC) == location(0, 5))
    }

    @Test func movesCommitAbortAndLoseRaces() throws {
        let directory = try PageDirectory(tierCapacities: [16, 16])
        let key = PageKey(4)
        _ = try directory.insert(key, location: location(0, 1), length: 1, checksum: 0)
        let claim = try #require(directory.beginMove(key, fromTier: 0))
        #expect(directory.beginMove(key) == nil, "one mover at a time")
        let commit = directory.commitMove(claim, to: location(1, 2))
        #expect(commit.committed && commit.release == location(0, 1))
        #expect(directory.snapshot(of: key)?.location == location(1, 2))

        // A move loses against a concurrent overwrite.
        let claim2 = try #require(directory.beginMove(key, fromTier: 1))
        #expect(try directory.insert(key, location: location(0, 7), length: 1, checksum: 0) == nil, "the mover still reads the old slot")
        let lost = directory.commitMove(claim2, to: location(0, 8))
        #expect(!lost.committed && lost.release == location(1, 2))
        #expect(directory.snapshot(of: key)?.location == location(0, 7))

        // A move loses against a pin taken meanwhile.
        let claim3 = try #require(directory.beginMove(key))
        try directory.pin(key)
        #expect(directory.commitMove(claim3, to: location(1, 3)).committed == false)
        #expect(directory.snapshot(of: key)?.location == location(0, 7))
        try directory.unpin(key)
        let claim4 = try #require(directory.beginMove(key))
        #expect(directory.abortMove(claim4) == nil)
        #expect(directory.beginMove(key) != nil, "abort clears the moving flag")
    }

    /// Property: the directory agrees with a dictionary model across random inserts/removes,
    /// which exercises probing and backward-shift deletion in crowded shards.
    @Test func matchesModelUnderChurn() throws {
        let directory = try PageDirectory(tierCapacities: [4096])
        var model: [PageKey: UInt32] = [:]
        var free = Array((0..<4096).map(UInt32.init).reversed())
        let seed = TestSeed.derive(103)
        var generator = SplitMix(seed: seed)
        for step in 0..<50_000 {
            let key = PageKey(generator.next() % 3000)
            if generator.next() % 2 == 0, model[key] == nil, let slot = free.popLast() {
                _ = try directory.insert(key, location: location(0, slot), length: Int(slot), checksum: slot)
                model[key] = slot
            } else if let slot = model[key] {
                let result = try directory.remove(key)
                #expect(result.found && result.release == location(0, slot), "\(key) at step \(step), \(TestSeed.note(seed))")
                model[key] = nil
                free.append(slot)
            }
        }
        for (key, slot) in model { #expect(directory.snapshot(of: key)?.checksum == slot, "\(key), \(TestSeed.note(seed))") }
        #expect(directory.allPages().count == model.count, "\(TestSeed.note(seed))")
    }

    /// The reader count is 16 bits: the 65,536th concurrent read of one key is refused with a
    /// typed error (it used to overflow `+= 1` and trap), a move cannot claim the saturated
    /// entry either, and once reads end everything works again.
    @Test func the65536thConcurrentReaderIsRefusedNotATrap() throws {
        let directory = try PageDirectory(tierCapacities: [16])
        let key = PageKey(5)
        _ = try directory.insert(key, location: location(0, 2), length: 10, checksum: 1)
        var reads: [PageSnapshot] = []
        for _ in 0..<Int(UInt16.max) { reads.append(try #require(try directory.beginRead(key))) }
        #expect(throws: SpillwayError.invalidArgument("page \(key) has 65535 reads in flight")) {
            _ = try directory.beginRead(key)
        }
        #expect(directory.beginMove(key) == nil, "a move would be one reader too many")
        // Replacing the page parks its old location with all 65,535 readers; the last one to
        // end gets it back to release.
        #expect(try directory.insert(key, location: location(0, 3), length: 10, checksum: 2) == nil)
        var released: [PageLocation] = []
        for read in reads { if let location = directory.endRead(read) { released.append(location) } }
        #expect(released == [location(0, 2)])
        let again = try #require(try directory.beginRead(key))
        #expect(again.location == location(0, 3))
        #expect(directory.endRead(again) == nil)
    }
}
