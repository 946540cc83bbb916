import Testing
import SpillwayTestSupport
@testable import SpillwayCore

@Suite struct PageClassTests {
    func location(_ tier: Int, _ slot: UInt32) -> PageLocation {
        PageLocation(tier: tier, extent: Extent(firstSlot: slot, slotCount: 1))
    }

    @Test func entryStaysOneCacheLine() {
        // The hints live in the entry's spare bytes; a lookup must still touch one line.
        #expect(MemoryLayout<PageEntry>.size == 64)
        #expect(MemoryLayout<PageEntry>.stride == 64)
    }

    @Test func hintsRoundTripThroughInsertMoveAndReplace() throws {
        let directory = try PageDirectory(tierCapacities: [16, 16])
        let key = PageKey(high: 7, low: 9)
        let parent = PageKey(high: 1, low: 2)
        let hints = PageHints.kvBlock(depth: 12, parent: parent)
        _ = try directory.insert(key, location: location(0, 1), length: 10, checksum: 3, hints: hints)
        let stored = try #require(directory.snapshot(of: key))
        #expect(stored.stats.hints == hints)
        #expect(stored.stats.hints.parent == PageHints.digest(of: parent))
        #expect(stored.length == 10 && stored.checksum == 3, "hints do not disturb the neighbouring fields")
        // A move keeps the hints.
        let claim = try #require(directory.beginMove(key))
        #expect(directory.commitMove(claim, to: location(1, 4)).committed)
        #expect(directory.snapshot(of: key)?.stats.hints == hints)
        #expect(directory.snapshot(of: key)?.location == location(1, 4))
        // A new version carries its own hints (default generic).
        _ = try directory.insert(key, location: location(0, 2), length: 1, checksum: 0)
        #expect(directory.snapshot(of: key)?.stats.hints == .generic)
        _ = try directory.insert(key, location: location(0, 3), length: 1, checksum: 0, hints: .weights(layerOrder: 70_000))
        #expect(directory.snapshot(of: key)?.stats.hints == PageHints(pageClass: .weights, order: .max))
        // Reads see them too (what the store hands the policy on a lower-tier hit).
        let read = try #require(try directory.beginRead(key))
        #expect(read.stats.hints.pageClass == .weights)
        _ = directory.endRead(read)
    }

    @Test func hintValuesAreClampedToWhatTheEntryHolds() {
        #expect(PageHints.kvBlock(depth: -3, parent: nil) == PageHints(pageClass: .kvBlock, order: 0, parent: 0))
        #expect(PageHints.kvBlock(depth: 1 << 20, parent: nil).order == UInt16.max)
        #expect(PageHints(pageClass: .kvBlock, order: 1, parent: 0xFFFF_FFFF).parent == PageHints.parentMask)
        let seed = TestSeed.derive(41)
        var generator = SplitMix64(seed: seed)
        for _ in 0..<1000 {
            let digest = PageHints.digest(of: PageKey(high: generator.next(), low: generator.next()))
            #expect(digest != 0 && digest <= PageHints.parentMask, "\(TestSeed.note(seed))")
        }
    }

    @Test func classAwarePolicyRules() {
        let policy = ClassAwareLRUPolicy()
        let weights = PageAccessStats(lastAccessTick: 1_000, accessCount: 5, length: 4096, hints: .weights(layerOrder: 0))
        let kv = PageAccessStats(lastAccessTick: 10, accessCount: 1, length: 4096, hints: .kvBlock(depth: 0, parent: nil))
        let kvNewer = PageAccessStats(lastAccessTick: 20, accessCount: 1, length: 4096, hints: .kvBlock(depth: 1, parent: nil))
        let generic = PageAccessStats(lastAccessTick: 5, accessCount: 1, length: 4096)
        #expect(!policy.shouldPromote(weights, fromTier: 1))
        #expect(policy.shouldPromote(kv, fromTier: 1) && policy.shouldPromote(generic, fromTier: 2))
        // A just-used weights page is colder than an old KV block; LRU within each group.
        #expect(policy.retentionScore(weights, now: 1_000) < policy.retentionScore(kv, now: 1_000))
        #expect(policy.retentionScore(weights, now: 1_000) < policy.retentionScore(generic, now: 1_000))
        #expect(policy.retentionScore(kv, now: 1_000) < policy.retentionScore(kvNewer, now: 1_000))
        #expect(policy.initialTier(for: .weights(layerOrder: 0), length: 4096, tierCount: 3) == 1)
        #expect(policy.initialTier(for: .weights(layerOrder: 0), length: 4096, tierCount: 1) == 0)
        #expect(policy.initialTier(for: .generic, length: 4096, tierCount: 3) == 0)
        // Plain LRU ignores classes.
        #expect(LRUPolicy().shouldPromote(weights, fromTier: 1))
        #expect(LRUPolicy().initialTier(for: .weights(layerOrder: 0), length: 4096, tierCount: 3) == 0)
    }

    @Test func coldestPagesRanksWeightsFirstUnderClassAwareLRU() throws {
        let directory = try PageDirectory(tierCapacities: [64])
        // KV blocks stored first (oldest), then weights (newest): weights still go first.
        for index in 0..<8 {
            _ = try directory.insert(PageKey(UInt64(index)), location: location(0, UInt32(index)), length: 1, checksum: 0,
                                     hints: .kvBlock(depth: index, parent: nil))
        }
        for index in 8..<12 {
            _ = try directory.insert(PageKey(UInt64(index)), location: location(0, UInt32(index)), length: 1, checksum: 0,
                                     hints: .weights(layerOrder: index))
        }
        try directory.pin(PageKey(11))
        let victims = directory.coldestPages(tier: 0, count: 4, window: 1000, policy: ClassAwareLRUPolicy())
        #expect(victims == [PageKey(8), PageKey(9), PageKey(10), PageKey(0)], "pinned weights are not candidates")
        let lru = directory.coldestPages(tier: 0, count: 3, window: 1000, policy: LRUPolicy())
        #expect(lru == [PageKey(0), PageKey(1), PageKey(2)])
    }

    @Test func policiesByName() throws {
        #expect(try PlacementPolicies.named("lru").name == "lru")
        #expect(try PlacementPolicies.named("class-aware-lru").name == "class-aware-lru")
        #expect(PlacementPolicies.names.first == PlacementPolicies.defaultName)
        #expect(throws: SpillwayError.invalidConfiguration("unknown policy 'lfu' (available: class-aware-lru, lru)")) {
            _ = try PlacementPolicies.named("lfu")
        }
    }
}
