import Glibc
import Testing
@testable import SpillwayCore
@testable import SpillwayNVMe
@testable import SpillwayStore

/// The journaled index: records reach the disk as appended journal blocks, checkpoints let the
/// journal's ring wrap, and what a reopen finds. Tests that reopen a file without a clean
/// close first `abandonForTesting()` the tier (it stops writing and gives up its lock); real
/// crashes (SIGKILL of a child process at random moments) are ProcessCrashTests.
@Suite(.serialized) struct JournalTests {
    @Test func journalWrapsThroughCheckpointsAndStaysRecoverable() throws {
        let path = scratchPath("journal-wrap")
        defer { unlink(path) }
        let (store, nvme) = try openStore(nvmePath: path, dramSlots: 0)
        #expect(nvme.geometry.journalBlocks == 64)
        var latest: [PageKey: [UInt8]] = [:]
        // Each put appends at least one journal block: 400 puts lap the 64-block ring 6 times.
        for round in 0..<10 {
            for value in 0..<40 {
                let page = bytes(UInt64(round * 1000 + value), 2000 + value)
                try store.put(PageKey(UInt64(value)), bytes: page)
                latest[PageKey(UInt64(value))] = page
            }
        }
        #expect(nvme.checkpoints.load(ordering: .relaxed) >= 5)
        nvme.abandonForTesting()

        let (again, recovered) = try openStore(nvmePath: path, dramSlots: 0)
        #expect(recovered.recovery.recovered == 40)
        for (key, page) in latest { #expect(try again.get(key) == page) }
        again.close()
        withExtendedLifetime(store) {}
    }

    @Test func aFailedJournalWriteFailsThePutAndLeavesNothingBehind() throws {
        let path = scratchPath("journal-fail")
        defer { unlink(path) }
        let faults = NVMeFaultInjector()
        let nvme = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 64, faults: faults))
        let store = try TieredStore(tiers: [nvme], options: StoreOptions(maxPageSize: 4096, backgroundWorker: false))
        try store.put(PageKey(1), bytes: bytes(1, 4096))
        faults.inject(.error(EIO), on: .metadataWrite)
        #expect(throws: SpillwayError.tierIO(tier: "nvme", operation: "write", errno: EIO)) {
            try store.put(PageKey(2), bytes: bytes(2, 4096))
        }
        #expect(!store.contains(PageKey(2)))
        #expect(faults.firedCount == 1)
        #expect(nvme.usedSlots == 1, "the failed put's slot was given back")
        // An interrupted or would-block journal write is resubmitted, not mistaken for success
        // or failure. (Journal blocks are single 4 KiB writes: they cannot be short.)
        faults.inject(.interrupted, on: .metadataWrite)
        faults.inject(.wouldBlock, on: .metadataWrite)
        try store.put(PageKey(3), bytes: bytes(3, 4096))
        #expect(faults.firedCount == 3, "both the EINTR and the EAGAIN fired")
        nvme.abandonForTesting()

        let (again, recovered) = try openStore(nvmePath: path, dramSlots: 0)
        #expect(recovered.recovery.recovered == 2)
        #expect(!again.contains(PageKey(2)))
        #expect(try again.get(PageKey(3)) == bytes(3, 4096))
        again.close()
        withExtendedLifetime(store) {}
    }

    @Test func aTornJournalBlockLosesOnlyItsOwnRecords() throws {
        let path = scratchPath("journal-torn")
        defer { unlink(path) }
        let (store, nvme) = try openStore(nvmePath: path, dramSlots: 0)
        for value in 0..<6 { try store.put(PageKey(UInt64(value)), bytes: bytes(UInt64(value), 4096)) }
        // The last put's journal block is the newest; flip a byte of one of its records.
        let last = nvme.journalState.withLock { $0.next } - 1
        let descriptor = open(path, O_RDWR)
        #expect(descriptor >= 0)
        var garbage: UInt8 = 0x5A
        #expect(pwrite(descriptor, &garbage, 1, off_t(nvme.geometry.journalBlockOffset(sequence: last) + 64 + 10)) == 1)
        close(descriptor)
        nvme.abandonForTesting()

        let (again, recovered) = try openStore(nvmePath: path, dramSlots: 0)
        #expect(recovered.recovery.recovered == 5)
        #expect(!again.contains(PageKey(5)))
        for value in 0..<5 { #expect(try again.get(PageKey(UInt64(value))) == bytes(UInt64(value), 4096)) }
        again.close()
        withExtendedLifetime(store) {}
    }

    @Test func cleanCloseLeavesNothingToReplay() throws {
        let path = scratchPath("journal-close")
        defer { unlink(path) }
        do {
            let (store, _) = try openStore(nvmePath: path, dramSlots: 0)
            for value in 0..<8 { try store.put(PageKey(UInt64(value)), bytes: bytes(UInt64(value), 4096)) }
            try store.remove(PageKey(7))
            store.close()
        }
        let (store, nvme) = try openStore(nvmePath: path, dramSlots: 0)
        defer { store.close() }
        #expect(nvme.recovery.recovered == 7)
        // The checkpoint written at close covers the whole journal: replay starts past it.
        let state = nvme.journalState.withLock { $0 }
        #expect(state.next == state.replayFrom && state.next > 0)
    }
}

/// Journal appends pipelined into a batch's data window (`NVMeTier.run`): records of completed
/// writes are appended while the rest of the batch is still writing.
@Suite(.serialized) struct JournalPipelineTests {
    static let pages = 400

    func putAll(_ store: TieredStore, version: UInt64, firstKey: Int = 0, queueDepth: Int = 32) -> [SpillwayError?] {
        let contents = (0..<Self.pages).map { bytes(version * 100_000 + UInt64(firstKey + $0), 4096) }
        return contents.withUnsafeBufferPointers { buffers in
            var requests = (0..<Self.pages).map { PageWrite(key: PageKey(UInt64(firstKey + $0)), bytes: buffers[$0]) }
            _ = requests.withUnsafeMutableBufferPointer { store.put(batch: $0, queueDepth: queueDepth) }
            return requests.map(\.error)
        }
    }

    @Test func aLargeBatchJournalsInsideItsWindowAndRecoversEveryPage() throws {
        let path = scratchPath("journal-pipeline")
        defer { unlink(path) }
        let (store, nvme) = try openStore(nvmePath: path, dramSlots: 0, nvmeSlots: 1024)
        #expect(putAll(store, version: 1).allSatisfy { $0 == nil })
        #expect(nvme.pipelinedAppends.load(ordering: .relaxed) >= 2, "400 writes make several appends inside the window")
        // Overwrites: each new record carries its superseded copy's release in its own block.
        let before = nvme.pipelinedAppends.load(ordering: .relaxed)
        #expect(putAll(store, version: 2).allSatisfy { $0 == nil })
        #expect(nvme.pipelinedAppends.load(ordering: .relaxed) > before)
        for index in 0..<Self.pages { #expect(try store.get(PageKey(UInt64(index))) == bytes(200_000 + UInt64(index), 4096)) }
        #expect(nvme.usedSlots == Self.pages, "every superseded copy's slot came back once its release was durable")
        nvme.abandonForTesting()

        let (again, recovered) = try openStore(nvmePath: path, dramSlots: 0, nvmeSlots: 1024)
        #expect(recovered.recovery.recovered == Self.pages)
        for index in 0..<Self.pages { #expect(try again.get(PageKey(UInt64(index))) == bytes(200_000 + UInt64(index), 4096)) }
        again.close()
        withExtendedLifetime(store) {}
    }

    @Test func aFailedPipelinedAppendFailsOnlyItsOwnPages() throws {
        let path = scratchPath("journal-pipeline-fail")
        defer { unlink(path) }
        let faults = NVMeFaultInjector()
        let nvme = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 1024, faults: faults))
        let store = try TieredStore(tiers: [nvme], options: StoreOptions(maxPageSize: 4096, backgroundWorker: false))
        #expect(putAll(store, version: 1).allSatisfy { $0 == nil })
        // One journal block of the overwriting batch fails: the pages whose records it carried
        // fail and keep their first version; every other page has its second.
        faults.inject(.error(EIO), on: .metadataWrite)
        let errors = putAll(store, version: 2)
        #expect(faults.firedCount == 1)
        let failed = Set(errors.indices.filter { errors[$0] != nil })
        #expect(!failed.isEmpty && failed.count < Self.pages, "one block's pages failed, not the batch: \(failed.count)")
        for index in failed {
            #expect(errors[index] == .tierIO(tier: "nvme", operation: "write", errno: EIO))
        }
        func expected(_ index: Int) -> [UInt8] { bytes((failed.contains(index) ? 100_000 : 200_000) + UInt64(index), 4096) }
        for index in 0..<Self.pages { #expect(try store.get(PageKey(UInt64(index))) == expected(index)) }
        // New keys: a failed one has no earlier version to fall back to, and must not appear.
        faults.inject(.error(EIO), on: .metadataWrite)
        let newErrors = putAll(store, version: 3, firstKey: Self.pages)
        let failedNew = Set(newErrors.indices.filter { newErrors[$0] != nil }.map { Self.pages + $0 })
        #expect(!failedNew.isEmpty && failedNew.count < Self.pages)
        #expect(nvme.usedSlots == 2 * Self.pages - failedNew.count, "failed pages' slots came back once their release records were durable")
        nvme.abandonForTesting()

        // The injected error hit a block that really reached the disk: its records must not
        // come back after a restart (each failed page's extent got a release record), and
        // the failed pages' first versions, which the store still serves, must.
        let (again, recovered) = try openStore(nvmePath: path, dramSlots: 0, nvmeSlots: 1024)
        #expect(recovered.recovery.recovered == 2 * Self.pages - failedNew.count)
        for index in 0..<Self.pages { #expect(try again.get(PageKey(UInt64(index))) == expected(index)) }
        for index in Self.pages..<(2 * Self.pages) {
            if failedNew.contains(index) {
                #expect(!again.contains(PageKey(UInt64(index))), "a failed put surfaced after a restart")
            } else {
                #expect(try again.get(PageKey(UInt64(index))) == bytes(300_000 + UInt64(index), 4096))
            }
        }
        again.close()
        withExtendedLifetime(store) {}
    }
}

extension Array where Element == [UInt8] {
    /// Lends every element's bytes at once.
    func withUnsafeBufferPointers<R>(_ body: ([UnsafeRawBufferPointer]) -> R) -> R {
        func lend(_ index: Int, _ lent: [UnsafeRawBufferPointer]) -> R {
            guard index < count else { return body(lent) }
            return self[index].withUnsafeBytes { lend(index + 1, lent + [$0]) }
        }
        return lend(0, [])
    }
}

/// Reads of a batch are checksummed as each completes (`TierBatch.checksumsOnCompletion`),
/// while the window's other reads are in flight; a corrupt page is still caught.
@Suite(.serialized) struct CompletionChecksumTests {
    @Test func aBatchGetCatchesACorruptPageOnTheDevice() throws {
        let path = scratchPath("completion-checksum")
        defer { unlink(path) }
        let (store, nvme) = try openStore(nvmePath: path, dramSlots: 0, nvmeSlots: 256)
        defer { store.close() }
        let count = 64
        for index in 0..<count { try store.put(PageKey(UInt64(index)), bytes: bytes(UInt64(index), 4096)) }
        // Flip a byte of page 17 on the device, behind the tier's back.
        let victim = PageKey(17)
        let location = try #require(store.location(of: victim))
        let file = open(path, O_RDWR)
        try #require(file >= 0)
        let offset = off_t(nvme.dataOffset + Int(location.extent.firstSlot) * 4096 + 100)
        var byte: UInt8 = 0
        #expect(pread(file, &byte, 1, offset) == 1)
        byte ^= 0xFF
        #expect(pwrite(file, &byte, 1, offset) == 1)
        #expect(fsync(file) == 0)
        close(file)

        let buffers = UnsafeMutableRawPointer.allocate(byteCount: count * 4096, alignment: 4096)
        defer { buffers.deallocate() }
        var requests = (0..<count).map {
            PageRead(key: PageKey(UInt64($0)), buffer: UnsafeMutableRawBufferPointer(start: buffers + $0 * 4096, count: 4096))
        }
        let served = requests.withUnsafeMutableBufferPointer { store.get(batch: $0, queueDepth: 16) }
        #expect(served == count - 1)
        for index in 0..<count {
            if index == 17 {
                guard case .checksumMismatch(let key, let tier, _, _)? = requests[index].error else {
                    Issue.record("page 17: \(String(describing: requests[index].error))")
                    continue
                }
                #expect(key == victim && tier == "nvme")
            } else {
                #expect(requests[index].error == nil)
                #expect(Array(UnsafeRawBufferPointer(start: buffers + index * 4096, count: 4096)) == bytes(UInt64(index), 4096))
            }
        }
        #expect(!store.contains(victim), "a corrupt page is never served again")
    }
}
