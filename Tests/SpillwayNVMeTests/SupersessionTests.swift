import Foundation
import Glibc
import Testing
@testable import SpillwayCore
@testable import SpillwayMemoryTiers
@testable import SpillwayNVMe
@testable import SpillwayStore

/// Item 8: a warm restart never serves a version older than the last acknowledged put or
/// remove of a key. Each test acknowledges an operation that supersedes an NVMe copy the
/// directory no longer (or never directly) points at, then abandons the tier as a killed
/// process would leave it (no release records, no checkpoint) and reopens the file.
@Suite(.serialized) struct SupersessionTests {
    /// Reopens `path` after abandoning `nvme`; the recovered version of `key` (nil if absent).
    private func recoveredPage(_ key: PageKey, path: String, abandoning nvme: NVMeTier) throws -> [UInt8]? {
        nvme.abandonForTesting()
        let (store, _) = try openStore(nvmePath: path)
        defer { store.close() }
        guard store.contains(key) else { return nil }
        return try store.get(key)
    }

    @Test func overwritingADemotedPageInvalidatesTheNVMeCopyBeforeThePutReturns() throws {
        let path = scratchPath("supersede-demoted")
        defer { unlink(path) }
        let (store, nvme) = try openStore(nvmePath: path)
        let key = PageKey(7)
        try store.put(key, bytes: bytes(1, 3000))
        #expect(store.demote(key))
        #expect(store.location(of: key)?.tier == 1)
        try store.put(key, bytes: bytes(2, 3000))  // lands in DRAM
        #expect(store.location(of: key)?.tier == 0)
        #expect(try recoveredPage(key, path: path, abandoning: nvme) == nil, "v1 must not come back as current")
        withExtendedLifetime(store) {}
    }

    @Test func removeWithAReadInFlightIsDurableWhenItReturns() throws {
        let path = scratchPath("supersede-reading")
        defer { unlink(path) }
        let (store, nvme) = try openStore(nvmePath: path, dramSlots: 0)
        let key = PageKey(8)
        try store.put(key, bytes: bytes(3, 4096))
        // A reader still copying from the page's slots: the remove cannot release them yet.
        let read = try #require(try store.directory.beginRead(key))
        #expect(try store.remove(key))
        #expect(try recoveredPage(key, path: path, abandoning: nvme) == nil, "the removed page came back")
        _ = store.directory.endRead(read)
        withExtendedLifetime(store) {}
    }

    @Test func removeOfAPromotedPageInvalidatesItsNVMeCopy() throws {
        let path = scratchPath("supersede-promoted")
        defer { unlink(path) }
        let (store, nvme) = try openStore(nvmePath: path)
        let key = PageKey(9)
        try store.put(key, bytes: bytes(4, 3000))
        #expect(store.demote(key))
        // Reads promote a page (LRU) once it is hit below the top: bring it back up.
        for _ in 0..<4 where store.location(of: key)?.tier != 0 { _ = try store.get(key) }
        try #require(store.location(of: key)?.tier == 0, "the page was not promoted")
        #expect(try store.remove(key))
        #expect(try recoveredPage(key, path: path, abandoning: nvme) == nil, "the promoted-then-removed page came back")
        withExtendedLifetime(store) {}
    }

    @Test func overwriteOnNVMeJournalsTheOldCopysReleaseInTheSameAppend() throws {
        let path = scratchPath("supersede-same-append")
        defer { unlink(path) }
        let (store, nvme) = try openStore(nvmePath: path, dramSlots: 0)
        let key = PageKey(10)
        try store.put(key, bytes: bytes(5, 4096))
        let before = nvme.journalState.withLock { $0.next }
        try store.put(key, bytes: bytes(6, 4096))
        #expect(nvme.journalState.withLock { $0.next } == before + 1, "one journal block for the new record and the old copy's release")
        #expect(nvme.tombstones.withLock { $0.notDurable.isEmpty }, "the old copy's release is durable")
        #expect(nvme.usedSlots == 1)
        #expect(try recoveredPage(key, path: path, abandoning: nvme) == bytes(6, 4096))
        withExtendedLifetime(store) {}
    }

    /// Two concurrent puts of one key: whichever the directory ends up with must be the one a
    /// restart would recover (the newest record of the key by sequence number), every round.
    @Test(.timeLimit(.minutes(2))) func concurrentPutsOfOneKeyJournalInDirectoryOrder() throws {
        let path = scratchPath("supersede-racing-puts")
        defer { unlink(path) }
        let (store, nvme) = try openStore(nvmePath: path, dramSlots: 0, nvmeSlots: 64)
        defer { store.close() }
        let key = PageKey(11)
        let failures = Locked<[String]>([])
        for round in 0..<300 {
            let threads = (0..<2).map { writer in
                BackgroundThread {
                    do {
                        try store.put(key, bytes: bytes(UInt64(round * 2 + writer), 4096))
                    } catch {
                        failures.withLock { $0.append("round \(round) writer \(writer): \(error)") }
                    }
                }
            }
            for thread in threads { thread.join() }
            #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
            let current = try #require(store.directory.snapshot(of: key))
            // The newest record of the key in the index mirror is what recovery would pick.
            var newest: NVMeFormat.Record?
            for slot in 0..<64 {
                guard let record = NVMeFormat.Record.decode(nvme.mirror.base + slot * NVMeFormat.recordSize),
                      !record.isRelease, record.key == key
                else { continue }
                if newest == nil || record.sequence > newest!.sequence { newest = record }
            }
            let recovered = try #require(newest, "round \(round): no record of the key")
            #expect(recovered.checksum == current.checksum && recovered.slot == current.location.extent.firstSlot,
                    "round \(round): the directory holds one put, a restart would recover the other")
        }
    }

    /// Per-key order under concurrency: writers put increasing versions of their keys while
    /// readers check that a key's version never goes backwards, with the background worker
    /// demoting and promoting between DRAM and NVMe. Then the tier is abandoned and reopened:
    /// no key may come back older than its last acknowledged version.
    @Test(.timeLimit(.minutes(5))) func versionsNeverGoBackwardsUnderConcurrencyOrAfterARestart() throws {
        let seed = UInt64.random(in: 1...UInt64(UInt32.max))
        print("versionsNeverGoBackwards: seed \(seed)")
        let path = scratchPath("supersede-concurrent")
        defer { unlink(path) }
        let nvme = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 256))
        let dram = try DRAMTier(slotSize: 4096, capacitySlots: 16, prefault: false)
        let store = try TieredStore(tiers: [dram, nvme], options: StoreOptions(maxPageSize: 4096, backgroundIntervalMilliseconds: 2))
        let keys = 24
        let writers = 3
        let acknowledged = Locked([UInt64](repeating: 0, count: keys))
        let failures = Locked<[String]>([])
        let done = ManagedAtomicFlag()
        @Sendable func page(_ key: Int, _ version: UInt64) -> [UInt8] {
            var page = bytes(UInt64(key) << 32 | version, 512)
            withUnsafeBytes(of: version.littleEndian) { for index in 0..<8 { page[index] = $0[index] } }
            return page
        }
        @Sendable func version(of page: [UInt8]) -> UInt64 {
            page.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        }
        // Real threads, all running at once (concurrentPerform would run only as many as there
        // are cores, serializing writers and readers on a small machine); joined below.
        @Sendable func work(_ worker: Int) {
            var random = SeededGenerator(seed: seed &+ UInt64(worker))
            if worker < writers {
                // Writer `worker` owns keys ≡ worker (mod writers): per key, versions increase.
                var versions = [UInt64](repeating: 0, count: keys)
                for _ in 0..<300 {
                    let key = Int(random.next() % UInt64(keys / writers)) * writers + worker
                    versions[key] += 1
                    do {
                        try store.put(PageKey(UInt64(key)), bytes: page(key, versions[key]))
                        acknowledged.withLock { $0[key] = versions[key] }
                    } catch {
                        failures.withLock { $0.append("put \(key) v\(versions[key]): \(error)") }
                    }
                }
                done.increment()
            } else {
                var seen = [UInt64](repeating: 0, count: keys)
                while done.value < writers {
                    let key = Int(random.next() % UInt64(keys))
                    let floor = acknowledged.withLock { $0[key] }
                    do {
                        let read = version(of: try store.get(PageKey(UInt64(key))))
                        if read < seen[key] || read < floor {
                            failures.withLock { $0.append("key \(key): read v\(read) after v\(max(seen[key], floor))") }
                        }
                        seen[key] = max(seen[key], read)
                    } catch SpillwayError.unknownKey {
                        // Not written yet (nothing is evicted: 24 keys fit the NVMe tier).
                        if floor > 0 { failures.withLock { $0.append("key \(key) v\(floor) missing") } }
                    } catch {
                        failures.withLock { $0.append("get \(key): \(error)") }
                    }
                }
            }
        }
        let threads = (0..<(writers + 2)).map { worker in BackgroundThread { work(worker) } }
        for thread in threads { thread.join() }
        #expect(failures.withLock { $0 }.isEmpty, "seed \(seed): \(failures.withLock { $0.prefix(10) })")
        #expect(store.stats().tiers[0].demotionsOut > 0, "the worker demoted while the writers ran")
        let last = acknowledged.withLock { $0 }
        nvme.abandonForTesting()
        let (again, _) = try openStore(nvmePath: path, dramSlots: 0, nvmeSlots: 256)
        defer { again.close() }
        for key in 0..<keys where again.contains(PageKey(UInt64(key))) {
            let read = version(of: try again.get(PageKey(UInt64(key))))
            #expect(read >= last[key], "seed \(seed): key \(key) recovered v\(read), v\(last[key]) was acknowledged")
        }
        withExtendedLifetime(store) {}
    }
}

/// A counter the concurrent tests use to tell readers that the writers are done.
final class ManagedAtomicFlag: Sendable {
    private let count = Locked(0)
    func increment() { count.withLock { $0 += 1 } }
    var value: Int { count.withLock { $0 } }
}
