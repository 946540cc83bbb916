import Atomics
import Glibc
import Testing
@testable import SpillwayCore
@testable import SpillwayMemoryTiers
@testable import SpillwayStore

@Suite struct StoreBasicsTests {
    @Test func putGetOverwriteRemove() throws {
        let store = try makeStore(device: 8, dram: 16)
        defer { store.close() }
        let key = PageKey(1)
        let first = pageBytes(key: 1, nonce: 1, length: 5000)
        try store.put(key, bytes: first)
        #expect(store.contains(key))
        #expect(store.length(of: key) == 5000)
        #expect(try store.get(key) == first)
        let second = pageBytes(key: 1, nonce: 2, length: 100)
        try store.put(key, bytes: second)
        #expect(try store.get(key) == second)
        #expect(store.tiers[0].usedSlots == 1, "the old two-slot version was released")
        #expect(try store.remove(key))
        #expect(!store.contains(key))
        #expect(try store.remove(key) == false)
        #expect(store.tiers[0].usedSlots == 0)
        let stats = store.stats()
        #expect(stats.puts == 2 && stats.removes == 1)
    }

    @Test func emptyAndMultiSlotPages() throws {
        let store = try makeStore(device: 8, dram: 16)
        defer { store.close() }
        try store.put(PageKey(5), bytes: [])
        #expect(try store.get(PageKey(5)) == [])
        let big = pageBytes(key: 6, nonce: 0, length: 3 * 4096)
        try store.put(PageKey(6), bytes: big)
        #expect(store.location(of: PageKey(6))?.extent.slotCount == 3)
        #expect(store.demote(PageKey(6)))
        #expect(store.location(of: PageKey(6))?.tier == 1)
        #expect(try store.get(PageKey(6)) == big)
        #expect(store.location(of: PageKey(6))?.tier == 0, "a lower-tier hit is promoted")
        #expect(accountingHolds(store))
    }

    @Test func batchedGetAndPut() throws {
        let store = try makeStore(device: 16, dram: 64)
        defer { store.close() }
        let pages = (0..<20).map { pageBytes(key: UInt64($0), nonce: 9, length: 1000 + $0) }
        var sources = pages
        let writes = UnsafeMutableBufferPointer<PageWrite>.allocate(capacity: pages.count)
        defer { writes.deallocate() }
        for index in pages.indices {
            sources[index].withUnsafeBytes { bytes in
                writes.initializeElement(at: index, to: PageWrite(key: PageKey(UInt64(index)), bytes: UnsafeRawBufferPointer(start: bytes.baseAddress, count: bytes.count)))
            }
        }
        // Arrays are not moved while `sources` lives; the batch copies synchronously.
        #expect(store.put(batch: writes) == pages.count)
        let buffers = UnsafeMutableRawPointer.allocate(byteCount: 21 * 4096, alignment: 4096)
        defer { buffers.deallocate() }
        let reads = UnsafeMutableBufferPointer<PageRead>.allocate(capacity: 21)
        defer { reads.deallocate() }
        for index in 0..<21 {
            reads.initializeElement(at: index, to: PageRead(key: PageKey(UInt64(index)), buffer: UnsafeMutableRawBufferPointer(start: buffers + index * 4096, count: 4096)))
        }
        let before = monotonicNanoseconds()
        #expect(store.get(batch: reads) == 20)
        let wall = monotonicNanoseconds() - before
        // Every read reports what it waited, within the call: submission to its completion,
        // in completion order on an inline tier (never the call's time spread evenly).
        var previous: [Int: UInt64] = [:]
        for index in 0..<20 {
            let latency = reads[index].latencyNanoseconds
            #expect(latency > 0 && latency <= wall, "read \(index): \(latency) ns of a \(wall) ns call")
            guard let tier = store.location(of: PageKey(UInt64(index)))?.tier else { continue }
            if let last = previous[tier] { #expect(latency >= last, "completions of one inline tier come in order") }
            previous[tier] = latency
        }
        for index in 0..<20 {
            #expect(reads[index].length == pages[index].count)
            #expect(Array(UnsafeRawBufferPointer(start: reads[index].buffer.baseAddress, count: reads[index].length)) == pages[index])
        }
        #expect(reads[20].error == .unknownKey(PageKey(20)))
        withExtendedLifetime(sources) {}
    }
}

@Suite struct StoreErrorTests {
    @Test func callerErrors() throws {
        let store = try makeStore(device: 8, dram: 16, maxPageSize: 8192)
        defer { store.close() }
        #expect(throws: SpillwayError.pageTooLarge(length: 8193, limit: 8192)) { try store.put(PageKey(1), bytes: [UInt8](repeating: 0, count: 8193)) }
        #expect(throws: SpillwayError.unknownKey(PageKey(2))) { _ = try store.get(PageKey(2)) }
        try store.put(PageKey(3), bytes: [UInt8](repeating: 1, count: 100))
        var small = [UInt8](repeating: 0, count: 10)
        #expect(throws: SpillwayError.bufferTooSmall(required: 100, available: 10)) {
            try small.withUnsafeMutableBytes { _ = try store.get(PageKey(3), into: $0) }
        }
        try store.pin(PageKey(3))
        #expect(throws: SpillwayError.pagePinned(PageKey(3))) { try store.remove(PageKey(3)) }
        #expect(throws: SpillwayError.pagePinned(PageKey(3))) { try store.put(PageKey(3), bytes: [1]) }
        #expect(try store.get(PageKey(3)) == [UInt8](repeating: 1, count: 100), "a refused overwrite changes nothing")
        try store.unpin(PageKey(3))
        #expect(throws: SpillwayError.notPinned(PageKey(3))) { try store.unpin(PageKey(3)) }
        #expect(throws: SpillwayError.unknownKey(PageKey(4))) { try store.pin(PageKey(4)) }
        #expect(store.stats().misses == 1)
        store.close()
        #expect(throws: SpillwayError.closed) { try store.put(PageKey(1), bytes: [1]) }
        #expect(throws: SpillwayError.closed) { _ = try store.get(PageKey(3)) }
    }

    @Test func storeFullWhenEverythingIsPinned() throws {
        let store = try makeStore(device: 2, dram: 2, maxPageSize: 4096)
        defer { store.close() }
        for value in 0..<4 {
            try store.put(PageKey(UInt64(value)), bytes: [UInt8(value)])
            try store.pin(PageKey(UInt64(value)))
        }
        #expect(throws: SpillwayError.storeFull(requiredSlots: 1)) { try store.put(PageKey(9), bytes: [9]) }
        for value in 0..<4 { #expect(try store.get(PageKey(UInt64(value))) == [UInt8(value)]) }
        try store.unpin(PageKey(0))
        try store.put(PageKey(9), bytes: [9])
        #expect(!store.contains(PageKey(0)), "the only unpinned page was evicted")
    }

    @Test func explicitPlacementReportsTierFull() throws {
        let store = try makeStore(device: 2, dram: 8, maxPageSize: 4096)
        defer { store.close() }
        try store.put(PageKey(1), bytes: [1], tier: 1)
        #expect(store.location(of: PageKey(1))?.tier == 1)
        for value in 2..<4 {
            try store.put(PageKey(UInt64(value)), bytes: [UInt8(value)], tier: 0)
            try store.pin(PageKey(UInt64(value)))
        }
        #expect(throws: SpillwayError.tierFull(tier: "device")) { try store.put(PageKey(9), bytes: [9], tier: 0) }
        #expect { try store.put(PageKey(9), bytes: [9], tier: 5) } throws: { error in
            guard case SpillwayError.invalidArgument(let reason) = error else { return false }
            return reason.hasPrefix("tier 5 does not exist")
        }
        try store.unpin(PageKey(2))
        try store.put(PageKey(9), bytes: [9], tier: 0)
        #expect(store.location(of: PageKey(9))?.tier == 0)
        #expect(store.location(of: PageKey(2))?.tier == 1, "the unpinned page was demoted to make room")
    }

    @Test func tierWriteFailureIsTypedAndInvisible() throws {
        let faulty = try FaultyTier(slotSize: 4096, capacitySlots: 8)
        let store = try TieredStore(tiers: [faulty], options: StoreOptions(maxPageSize: 4096, backgroundWorker: false))
        defer { store.close() }
        try store.put(PageKey(1), bytes: [1, 2, 3])
        faulty.failWrites.store(ENOSPC, ordering: .relaxed)
        #expect(throws: SpillwayError.tierIO(tier: "faulty", operation: "write", errno: ENOSPC)) { try store.put(PageKey(1), bytes: [4, 5, 6]) }
        #expect(throws: SpillwayError.tierIO(tier: "faulty", operation: "write", errno: ENOSPC)) { try store.put(PageKey(2), bytes: [7]) }
        faulty.failWrites.store(0, ordering: .relaxed)
        #expect(try store.get(PageKey(1)) == [1, 2, 3], "the failed overwrite never became visible")
        #expect(!store.contains(PageKey(2)), "the failed store never became visible")
        faulty.failReads.store(EIO, ordering: .relaxed)
        #expect(throws: SpillwayError.tierIO(tier: "faulty", operation: "read", errno: EIO)) { _ = try store.get(PageKey(1)) }
        faulty.failReads.store(0, ordering: .relaxed)
        #expect(try store.get(PageKey(1)) == [1, 2, 3])
        #expect(store.stats().tiers[0].ioErrors == 3)
        #expect(accountingHolds(store))
    }

    @Test func invalidConfigurations() throws {
        let a = try DRAMTier(name: "a", slotSize: 4096, capacitySlots: 8, prefault: false)
        let b = try DRAMTier(name: "b", slotSize: 8192, capacitySlots: 8, prefault: false)
        let c = try DRAMTier(name: "a", slotSize: 4096, capacitySlots: 8, prefault: false)
        /// The store refuses with `invalidConfiguration` naming the problem.
        func refuses(_ fragment: String, _ open: () throws -> TieredStore) {
            #expect { _ = try open() } throws: { error in
                guard case SpillwayError.invalidConfiguration(let reason) = error else { return false }
                return reason.contains(fragment)
            }
        }
        refuses("1…255 tiers") { try TieredStore(tiers: []) }
        refuses("has slot size 8192") { try TieredStore(tiers: [a, b], options: StoreOptions(maxPageSize: 4096)) }
        refuses("duplicate tier name 'a'") { try TieredStore(tiers: [a, c], options: StoreOptions(maxPageSize: 4096)) }
        refuses("max page size 1048576 exceeds tier 'a'") { try TieredStore(tiers: [a], options: StoreOptions(maxPageSize: 1 << 20)) }
        refuses("watermark") {
            try TieredStore(tiers: [a], options: StoreOptions(maxPageSize: 4096, watermarks: [Watermarks(high: 0.5, low: 0.7)]))
        }
    }
}

@Suite struct IntegrityTests {
    /// Flips one byte of a page where it lies in a host-memory tier.
    func corrupt(_ store: TieredStore, _ key: PageKey) throws {
        let location = try #require(store.location(of: key))
        let arena = try #require(store.tiers[location.tier].hostMemory)
        arena[Int(location.extent.firstSlot) * store.slotSize + 7] ^= 0xFF
    }

    @Test func promotionVerifiesAndDropsCorruptPage() throws {
        let store = try makeStore(device: 4, dram: 8)
        defer { store.close() }
        let key = PageKey(1)
        try store.put(key, bytes: pageBytes(key: 1, nonce: 0, length: 3000))
        #expect(store.demote(key))
        try corrupt(store, key)
        #expect {
            _ = try store.get(key)
        } throws: { error in
            guard case SpillwayError.checksumMismatch(let failed, let tier, _, _) = error else { return false }
            return failed == key && tier == "dram"
        }
        #expect(!store.contains(key), "a corrupt page is never served again")
        #expect(store.stats().checksumFailures == 1)
        #expect(accountingHolds(store))
    }

    @Test func pinnedCorruptPageIsNeverServedAndLeavesAtLastUnpin() throws {
        let store = try makeStore(device: 4, dram: 8)
        defer { store.close() }
        let key = PageKey(3)
        try store.put(key, bytes: pageBytes(key: 3, nonce: 0, length: 4000))
        #expect(store.demote(key))
        try store.pin(key)
        try corrupt(store, key)
        for _ in 0..<2 {
            #expect { _ = try store.get(key) } throws: { error in
                guard case SpillwayError.checksumMismatch(let failed, _, _, _) = error else { return false }
                return failed == key
            }
        }
        #expect(!store.contains(key), "a quarantined page is not offered")
        #expect(throws: SpillwayError.pagePinned(key)) { try store.remove(key) }
        try store.unpin(key)
        #expect(store.location(of: key) == nil, "the last unpin removes it")
        #expect(accountingHolds(store))
    }

    @Test func verifyingTierCatchesCorruptionOnEveryRead() throws {
        let store = try makeStore(device: 0, dram: 8, dramVerifies: true)
        defer { store.close() }
        try store.put(PageKey(1), bytes: pageBytes(key: 1, nonce: 0, length: 100))
        #expect(try store.get(PageKey(1)) == pageBytes(key: 1, nonce: 0, length: 100))
        try corrupt(store, PageKey(1))
        #expect { _ = try store.get(PageKey(1)) } throws: { error in
            guard case SpillwayError.checksumMismatch(let failed, let tier, _, _) = error else { return false }
            return failed == PageKey(1) && tier == "dram"
        }
        #expect(!store.contains(PageKey(1)))
    }

    @Test func demotionVerifiesBeforeCommitting() throws {
        let store = try makeStore(device: 4, dram: 8)
        defer { store.close() }
        let key = PageKey(2)
        try store.put(key, bytes: pageBytes(key: 2, nonce: 0, length: 4096))
        let location = try #require(store.location(of: key))
        // Corrupt the device copy through its backend, then demote: the move must refuse it.
        let device = try #require(store.tiers[0] as? DeviceTier)
        var byte: UInt8 = 0xEE
        try device.memory.copyIn(from: &byte, toOffset: Int(location.extent.firstSlot) * 4096 + 100, count: 1)
        #expect(!store.demote(key))
        #expect(!store.contains(key))
        #expect(store.stats().tiers[0].checksumFailures == 1)
        #expect(accountingHolds(store))
    }
}

@Suite struct PlacementTests {
    @Test func demotesPastHighWatermarkDownToLow() throws {
        let store = try makeStore(device: 10, dram: 40, watermarks: [Watermarks(high: 0.8, low: 0.5)])
        defer { store.close() }
        for value in 0..<10 { try store.put(PageKey(UInt64(value)), bytes: pageBytes(key: UInt64(value), nonce: 0, length: 4096)) }
        #expect(store.tiers[0].usedSlots == 10)
        store.runMaintenance()
        #expect(store.tiers[0].usedSlots == 5)
        // The five oldest went down.
        for value in 0..<5 { #expect(store.location(of: PageKey(UInt64(value)))?.tier == 1) }
        for value in 5..<10 { #expect(store.location(of: PageKey(UInt64(value)))?.tier == 0) }
        for value in 0..<10 { #expect(try store.get(PageKey(UInt64(value))) == pageBytes(key: UInt64(value), nonce: 0, length: 4096)) }
        #expect(store.stats().tiers[0].demotionsOut == 5)
        #expect(accountingHolds(store))
    }

    @Test func putIntoFullTopTierReclaimsSynchronously() throws {
        let store = try makeStore(device: 4, dram: 16)
        defer { store.close() }
        for value in 0..<12 { try store.put(PageKey(UInt64(value)), bytes: pageBytes(key: UInt64(value), nonce: 0, length: 2000)) }
        #expect(store.location(of: PageKey(11))?.tier == 0, "new pages land on top")
        for value in 0..<12 { #expect(try store.get(PageKey(UInt64(value))) == pageBytes(key: UInt64(value), nonce: 0, length: 2000)) }
        #expect(accountingHolds(store))
    }

    @Test func lastTierEvictsLeastRecentlyUsed() throws {
        let store = try makeStore(device: 0, dram: 8)
        defer { store.close() }
        for value in 0..<8 { try store.put(PageKey(UInt64(value)), bytes: [UInt8(value)]) }
        // Touch 0…3 so 4…7 are the coldest.
        for value in 0..<4 { _ = try store.get(PageKey(UInt64(value))) }
        try store.put(PageKey(100), bytes: [100])
        #expect(!store.contains(PageKey(4)), "the least recently used page went first")
        for value in [0, 1, 2, 3, 5, 6, 7, 100] { #expect(store.contains(PageKey(UInt64(value)))) }
        #expect(store.stats().evictions == 1)
    }

    @Test func pinnedPagesNeverMove() throws {
        let store = try makeStore(device: 4, dram: 8)
        defer { store.close() }
        try store.put(PageKey(1), bytes: [1])
        try store.pin(PageKey(1))
        let pinnedAt = store.location(of: PageKey(1))
        for value in 2..<40 { try store.put(PageKey(UInt64(value)), bytes: [UInt8(value)]) }
        store.runMaintenance()
        #expect(!store.demote(PageKey(1)))
        #expect(store.location(of: PageKey(1)) == pinnedAt)
        #expect(try store.get(PageKey(1)) == [1])
    }

    @Test func prefetchBringsPagesToTheTop() throws {
        let store = try makeStore(device: 8, dram: 16)
        defer { store.close() }
        for value in 0..<4 { try store.put(PageKey(UInt64(value)), bytes: [UInt8(value)]) }
        for value in 0..<4 { #expect(store.demote(PageKey(UInt64(value)))) }
        store.prefetch((0..<4).map { PageKey(UInt64($0)) } + [PageKey(99)])
        store.runMaintenance()
        for value in 0..<4 { #expect(store.location(of: PageKey(UInt64(value)))?.tier == 0) }
        #expect(store.stats().prefetchRequests == 5)
        #expect(store.stats().tiers[0].promotionsIn == 4)
    }

    @Test func prefetchQueueIsBounded() throws {
        let tiers: [any Tier] = [try DRAMTier(slotSize: 4096, capacitySlots: 4, prefault: false)]
        let store = try TieredStore(tiers: tiers, options: StoreOptions(maxPageSize: 4096, prefetchQueueLimit: 3, backgroundWorker: false))
        defer { store.close() }
        store.prefetch((0..<10).map { PageKey(UInt64($0)) })
        #expect(store.stats().prefetchDropped == 7)
    }

    @Test func storeDroppedWithoutCloseStopsItsWorker() async throws {
        weak var weakStore: TieredStore?
        do {
            let store = try makeStore(device: 4, dram: 8, worker: true)
            try store.put(PageKey(1), bytes: [1])
            weakStore = store
        }
        var waited = 0
        while weakStore != nil && waited < 200 {
            try await Task.sleep(for: .milliseconds(5))
            waited += 1
        }
        #expect(weakStore == nil)
    }

    @Test func backgroundWorkerDemotesOnItsOwn() async throws {
        let store = try makeStore(device: 10, dram: 40, worker: true, watermarks: [Watermarks(high: 0.8, low: 0.5)])
        defer { store.close() }
        for value in 0..<10 { try store.put(PageKey(UInt64(value)), bytes: [UInt8(value)]) }
        // The worker races the puts, so the exact end state varies; what must hold is that it
        // demoted on its own and left the tier below its high watermark (8 of 10 slots).
        var waited = 0
        while (store.tiers[0].usedSlots > 8 || store.stats().tiers[0].demotionsOut == 0) && waited < 500 {
            try await Task.sleep(for: .milliseconds(10))
            waited += 1
        }
        #expect(store.tiers[0].usedSlots <= 8)
        #expect(store.stats().tiers[0].demotionsOut >= 2)
        for value in 0..<10 { #expect(try store.get(PageKey(UInt64(value))) == [UInt8(value)]) }
    }
}

/// The asynchronous batch API: submit returns at once, the ticket (or callback) reports the
/// outcome, at most `asyncBatchLimit` batches are in flight, and close runs what it accepted.
@Suite struct StoreAsyncTests {
    final class Requests {
        let pages: [[UInt8]]
        let writes: UnsafeMutableBufferPointer<PageWrite>
        let reads: UnsafeMutableBufferPointer<PageRead>
        let buffers: UnsafeMutableRawPointer

        init(first: Int, count: Int, nonce: UInt64) {
            pages = (0..<count).map { pageBytes(key: UInt64(first + $0), nonce: nonce, length: 4096) }
            writes = .allocate(capacity: count)
            reads = .allocate(capacity: count)
            buffers = .allocate(byteCount: count * 4096, alignment: 4096)
            for index in 0..<count {
                let key = PageKey(UInt64(first + index))
                pages[index].withUnsafeBytes { bytes in writes.initializeElement(at: index, to: PageWrite(key: key, bytes: bytes)) }
                reads.initializeElement(at: index, to: PageRead(key: key, buffer: UnsafeMutableRawBufferPointer(start: buffers + index * 4096, count: 4096)))
            }
        }

        deinit {
            writes.deallocate()
            reads.deallocate()
            buffers.deallocate()
        }

        func readBack(_ index: Int) -> [UInt8] { Array(UnsafeRawBufferPointer(start: reads[index].buffer.baseAddress, count: reads[index].length)) }
    }

    @Test func submittedBatchesCompleteWithEveryPageAndItsLatency() throws {
        let store = try makeStore(device: 32, dram: 512)
        defer { store.close() }
        let batches = (0..<6).map { Requests(first: $0 * 64, count: 64, nonce: 3) }
        let called = ManagedAtomic<Int>(0)
        let tickets = batches.map { requests in
            store.submitPut(batch: requests.writes, queueDepth: 16) { succeeded in if succeeded == 64 { called.wrappingIncrement(ordering: .relaxed) } }
        }
        for ticket in tickets { #expect(ticket.wait(timeout: 30) == 64) }
        #expect(called.load(ordering: .relaxed) == 6, "each callback ran once with the count")
        let reads = batches.map { store.submitGet(batch: $0.reads, queueDepth: 16) }
        for (ticket, requests) in zip(reads, batches) {
            #expect(ticket.wait(timeout: 30) == 64)
            #expect(ticket.isDone)
            for index in 0..<64 {
                #expect(requests.reads[index].error == nil)
                #expect(requests.readBack(index) == requests.pages[index])
                #expect(requests.reads[index].latencyNanoseconds > 0)
            }
        }
    }

    @Test func atMostTheLimitIsInFlightAndCloseRunsWhatItAccepted() throws {
        var options = StoreOptions(maxPageSize: 4096, backgroundWorker: false)
        options.asyncBatchLimit = 2
        options.asyncWorkers = 2
        let store = try TieredStore(tiers: [try DRAMTier(slotSize: 4096, capacitySlots: 2048, prefault: false)], options: options)
        let batches = (0..<12).map { Requests(first: $0 * 32, count: 32, nonce: 5) }
        let highest = ManagedAtomic<Int>(0)
        var tickets: [StoreTicket] = []
        for requests in batches {
            tickets.append(store.submitPut(batch: requests.writes) { _ in
                let now = store.asyncBatchesInFlight
                var seen = highest.load(ordering: .relaxed)
                while now > seen, !highest.compareExchange(expected: seen, desired: now, ordering: .relaxed).exchanged {
                    seen = highest.load(ordering: .relaxed)
                }
            })
            #expect(store.asyncBatchesInFlight <= 2)
        }
        // Closing waits for the accepted batches; they all ran.
        store.close()
        #expect(highest.load(ordering: .relaxed) <= 2)
        for ticket in tickets {
            #expect(ticket.isDone)
            #expect(ticket.wait() == 32)
        }
        // After close: refused at once, every request saying why.
        let late = Requests(first: 9000, count: 4, nonce: 1)
        let ticket = store.submitGet(batch: late.reads)
        #expect(ticket.isDone && ticket.wait() == 0)
        for index in 0..<4 { #expect(late.reads[index].error == .closed) }
    }
}
