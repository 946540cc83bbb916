import Dispatch
import Glibc
import Testing
import SpillwayTestSupport
@testable import SpillwayCore
@testable import SpillwayMemoryTiers
@testable import SpillwayNVMe
@testable import SpillwayStore

enum ProcessInfo {
    /// $SPILLWAY_TMPDIR, else $TMPDIR, else /tmp.
    static var scratchDirectory: String {
        getenv("SPILLWAY_TMPDIR").map { String(cString: $0) } ?? getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
    }
}

/// Random sequences of put/get/pin/unpin/remove/prefetch/demote/maintenance on a tiny
/// device+DRAM store, checked against a model: bytes in = bytes out, pinned pages never move
/// or disappear, and slot accounting never leaks. Odd seeds run the background worker, so
/// every operation races against its demotion and eviction (accounting is then checked once
/// the worker has stopped); even seeds check accounting after every step.
@Suite struct StorePropertyTests {
    @Test(arguments: 0..<24)
    func bytesInEqualBytesOut(seed: UInt64) throws {
        let store = try makeStore(device: 6, dram: 14, maxPageSize: 3 * 4096, worker: seed % 2 == 1,
                                  watermarks: [Watermarks(high: 0.7, low: 0.4), Watermarks(high: 0.9, low: 0.6)])
        defer { store.close() }
        try runRandomSequence(on: store, seed: seed, worker: seed % 2 == 1)
    }

    /// The same with an NVMe tier (a temporary file, real O_DIRECT I/O) under device and DRAM.
    @Test(arguments: 0..<12)
    func bytesInEqualBytesOutWithNVMe(seed: UInt64) throws {
        let path = "\(ProcessInfo.scratchDirectory)/spillway-property-\(getpid())-\(seed)"
        defer { unlink(path) }
        let tiers: [any Tier] = [
            try DeviceTier(slotSize: 4096, capacitySlots: 4, memory: HostDeviceMemory(prefault: false)),
            try DRAMTier(slotSize: 4096, capacitySlots: 8, prefault: false),
            try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 12)),
        ]
        let store = try TieredStore(tiers: tiers, options: StoreOptions(
            maxPageSize: 3 * 4096, watermarks: [Watermarks(high: 0.7, low: 0.4), Watermarks(high: 0.8, low: 0.5)],
            backgroundIntervalMilliseconds: 2, backgroundWorker: seed % 2 == 1))
        defer { store.close() }
        try runRandomSequence(on: store, seed: seed, worker: seed % 2 == 1)
    }

    func runRandomSequence(on store: TieredStore, seed: UInt64, worker: Bool) throws {
        var random = SplitMix(seed: seed &* 7919 &+ 1)
        var model: [PageKey: [UInt8]] = [:]
        var pins: [PageKey: (count: Int, location: PageLocation)] = [:]
        var nonce: UInt64 = 0

        for step in 0..<600 {
            let key = PageKey(random.next() % 24)
            switch random.next() % 100 {
            case 0..<35:
                nonce += 1
                let length = Int(random.next() % UInt64(3 * 4096 + 1))
                let bytes = pageBytes(key: key.low, nonce: nonce, length: length)
                switch attempt({ () throws(SpillwayError) in try store.put(key, bytes: bytes) }) {
                case .success:
                    #expect(pins[key] == nil, "step \(step): overwrote a pinned page")
                    model[key] = bytes
                case .failure(.pagePinned(let pinned)):
                    #expect(pinned == key && pins[key] != nil)
                case .failure(.storeFull):
                    #expect(pins.count >= 4, "step \(step): store full with few pins")
                case .failure(let error):
                    Issue.record("step \(step): put failed: \(error)")
                }
            case 35..<65:
                switch attempt({ () throws(SpillwayError) in try store.get(key) }) {
                case .success(let bytes):
                    let expected = try #require(model[key], "step \(step): got bytes for a key never stored or removed")
                    #expect(bytes == expected, "step \(step): wrong bytes for \(key)")
                case .failure(.unknownKey):
                    #expect(pins[key] == nil, "step \(step): a pinned page vanished")
                    model[key] = nil  // evicted: allowed, the store is a cache
                case .failure(let error):
                    Issue.record("step \(step): get failed: \(error)")
                }
            case 65..<73:
                switch attempt({ () throws(SpillwayError) in try store.pin(key) }) {
                case .success:
                    let location = try #require(store.location(of: key))
                    if let pinned = pins[key] {
                        #expect(pinned.location == location)
                        pins[key] = (pinned.count + 1, location)
                    } else {
                        pins[key] = (1, location)
                    }
                    #expect(model[key] != nil)
                case .failure(let error):
                    #expect(error == .unknownKey(key))
                    model[key] = nil
                }
            case 73..<83:
                switch attempt({ () throws(SpillwayError) in try store.unpin(key) }) {
                case .success:
                    let pinned = try #require(pins[key])
                    pins[key] = pinned.count == 1 ? nil : (pinned.count - 1, pinned.location)
                case .failure(let error):
                    #expect(error == .notPinned(key) || error == .unknownKey(key))
                    #expect(pins[key] == nil)
                }
            case 83..<89:
                switch attempt({ () throws(SpillwayError) in try store.remove(key) }) {
                case .success:
                    #expect(pins[key] == nil)
                    model[key] = nil
                case .failure(let error):
                    #expect(error == .pagePinned(key) && pins[key] != nil)
                }
            case 89..<93:
                store.prefetch([key, PageKey(random.next() % 24)])
                store.runMaintenance()
            case 93..<97:
                _ = store.demote(key)
            default:
                store.runMaintenance()
            }
            for (pinnedKey, pinned) in pins {
                #expect(store.location(of: pinnedKey) == pinned.location, "step \(step): pinned page \(pinnedKey) moved")
            }
            if !worker { #expect(accountingHolds(store), "step \(step): slot accounting leaked") }
        }
        // Everything the model still holds reads back exactly or was evicted (unknownKey, and
        // never while pinned); an I/O or checksum error is a failure, not an eviction.
        for (key, bytes) in model {
            switch attempt({ () throws(SpillwayError) in try store.get(key) }) {
            case .success(let read): #expect(read == bytes, "seed \(seed): wrong bytes for \(key) at the end")
            case .failure(.unknownKey): #expect(pins[key] == nil, "seed \(seed): pinned \(key) vanished")
            case .failure(let error): Issue.record("seed \(seed): final get of \(key) failed: \(error)")
            }
        }
        #expect(store.stats().checksumFailures == 0)
        if worker {
            store.close()  // stops the worker: nothing moves any more
            #expect(accountingHolds(store), "seed \(seed): slot accounting leaked")
        }
    }
}

/// Many threads on one store with a live background worker: any successful read must be a
/// complete page that was written under that key (never torn, never another key's bytes),
/// and a key's version never goes backwards: each key has one writer (thread key % threads)
/// that puts increasing versions (the page nonce) and removes it; every thread reads every key
/// and checks the version against what it saw before and what the writer has acknowledged.
@Suite struct StoreConcurrencyTests {
    @Test func concurrentMixedOperations() throws {
        let store = try makeStore(device: 16, dram: 48, maxPageSize: 2 * 4096, worker: true,
                                  watermarks: [Watermarks(high: 0.6, low: 0.3)])
        defer { store.close() }
        try hammer(store)
    }

    /// The same with an NVMe tier at the bottom: ring pool, index writes and tombstones under
    /// concurrent moves.
    @Test func concurrentMixedOperationsWithNVMe() throws {
        let path = "\(ProcessInfo.scratchDirectory)/spillway-concurrency-\(getpid())"
        defer { unlink(path) }
        let tiers: [any Tier] = [
            try DeviceTier(slotSize: 4096, capacitySlots: 8, memory: HostDeviceMemory(prefault: false)),
            try DRAMTier(slotSize: 4096, capacitySlots: 16, prefault: false),
            try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 64)),
        ]
        let store = try TieredStore(tiers: tiers, options: StoreOptions(
            maxPageSize: 2 * 4096, watermarks: [Watermarks(high: 0.6, low: 0.3), Watermarks(high: 0.7, low: 0.4)],
            backgroundIntervalMilliseconds: 5))
        defer { store.close() }
        try hammer(store, operations: 800)
    }

    func hammer(_ store: TieredStore, operations: Int = 3000) throws {
        let threads = 6
        let keys: UInt64 = 96
        let failures = ManagedCounter()
        // Per key: the lowest version a read may return (the last acknowledged put's, or one
        // past it after an acknowledged remove).
        let floors = Locked([UInt64](repeating: 0, count: Int(keys)))
        DispatchQueue.concurrentPerform(iterations: threads) { thread in
            var random = SplitMix(seed: UInt64(thread) &+ 100)
            var versions = [UInt64](repeating: 0, count: Int(keys))
            var seen = [UInt64](repeating: 0, count: Int(keys))
            for _ in 0..<operations {
                var keyValue = random.next() % keys
                let key = PageKey(keyValue)
                // Writes and removes go to a key this thread owns.
                let owned = PageKey(keyValue - keyValue % UInt64(threads) + UInt64(thread) < keys
                                    ? keyValue - keyValue % UInt64(threads) + UInt64(thread) : UInt64(thread))
                switch random.next() % 10 {
                case 0..<3:
                    keyValue = owned.low
                    versions[Int(keyValue)] += 1
                    let version = versions[Int(keyValue)]
                    let length = 16 + Int(random.next() % UInt64(2 * 4096 - 16))
                    let bytes = pageBytes(key: keyValue, nonce: version, length: length)
                    switch attempt({ () throws(SpillwayError) in try store.put(owned, bytes: bytes) }) {
                    case .success: floors.withLock { $0[Int(keyValue)] = version }
                    case .failure(.pagePinned), .failure(.storeFull): break
                    case .failure(let error): failures.record("put: \(error)")
                    }
                case 3..<7:
                    let floor = floors.withLock { $0[Int(keyValue)] }
                    switch attempt({ () throws(SpillwayError) in try store.get(key) }) {
                    case .success(let bytes):
                        if !isConsistentPage(bytes, key: keyValue) {
                            failures.record("torn or foreign page for \(key)")
                        } else {
                            let version = bytes[8..<16].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
                            if version < floor || version < seen[Int(keyValue)] {
                                failures.record("\(key) went back to v\(version) after v\(max(floor, seen[Int(keyValue)]))")
                            }
                            seen[Int(keyValue)] = max(seen[Int(keyValue)], version)
                        }
                    case .failure(.unknownKey): break
                    case .failure(let error): failures.record("get: \(error)")
                    }
                case 7:
                    let outcome = attempt { () throws(SpillwayError) in
                        try store.pin(key)
                        let before = store.location(of: key)
                        let bytes = try store.get(key)
                        if !isConsistentPage(bytes, key: keyValue) { failures.record("pinned read wrong for \(key)") }
                        if store.location(of: key) != before { failures.record("pinned page \(key) moved") }
                        try store.unpin(key)
                    }
                    switch outcome {
                    case .success, .failure(.unknownKey): break
                    case .failure(let error): failures.record("pin: \(error)")
                    }
                case 8:
                    let version = versions[Int(owned.low)]
                    switch attempt({ () throws(SpillwayError) in try store.remove(owned) }) {
                    case .success: floors.withLock { $0[Int(owned.low)] = version + 1 }
                    case .failure(.pagePinned): break
                    case .failure(let error): failures.record("remove: \(error)")
                    }
                default:
                    store.prefetch([key])
                }
            }
        }
        store.runMaintenance()
        #expect(failures.messages.isEmpty, "\(failures.messages.prefix(5))")
        #expect(store.stats().checksumFailures == 0)
        store.close()
        #expect(accountingHolds(store))
    }
}

/// The lock-free hit path under fire: on every core, gets of a small set of keys race puts
/// (new versions, several writers per key), removes and moves (demotions, and promotions by
/// the gets themselves) of the same keys. Every successful read must be a whole page written
/// under that key — never torn, never another key's, never a reused extent's new bytes — and
/// the optimistic path must actually have served reads (or this tests nothing).
@Suite struct OptimisticReadStressTests {
    /// The race made certain: between a lock-free lookup and its copy, the page is removed
    /// and its extent handed to another key's new page. The read must not return that page's
    /// bytes as its own: the seqlock sends it to the locked path, which finds the key gone.
    @Test func anExtentReusedBetweenLookupAndCopyIsNeverServed() throws {
        let store = try makeStore(device: 4, dram: 0, maxPageSize: 4096)
        defer { store.close() }
        let a = PageKey(1)
        let b = PageKey(2)
        try store.put(a, bytes: pageBytes(key: 1, nonce: 1, length: 4096))
        let extentOfA = try #require(store.location(of: a))
        let fired = Locked(false)
        store.directory.beforeOptimisticCopy = { snapshot in
            guard snapshot.key == a, !fired.withLock({ $0 }) else { return }
            fired.withLock { $0 = true }
            if case .failure(let error) = attempt({ () throws(SpillwayError) in try store.remove(a) }) { Issue.record("remove: \(error)") }
            if case .failure(let error) = attempt({ () throws(SpillwayError) in try store.put(b, bytes: pageBytes(key: 2, nonce: 7, length: 4096)) }) {
                Issue.record("put: \(error)")
            }
        }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 64)
        defer { buffer.deallocate() }
        let outcome = attempt { () throws(SpillwayError) in try store.get(a, into: buffer) }
        store.directory.beforeOptimisticCopy = nil
        #expect(fired.withLock { $0 })
        #expect(store.location(of: b) == extentOfA, "the new page took the vacated extent (the race this test needs)")
        switch outcome {
        case .failure(.unknownKey): break
        case .success: Issue.record("a removed page was served: \(isConsistentPage(Array(buffer), key: 1) ? "its old bytes" : "another key's bytes")")
        case .failure(let error): Issue.record("unexpected \(error)")
        }
        // And with nothing racing, the hit is served without a lock.
        let before = store.directory.optimisticReads
        #expect(isConsistentPage(try store.get(b), key: 2))
        #expect(store.directory.optimisticReads == before + 1)
    }

    @Test func getsRacingPutsRemovesAndMovesOfTheSameKeysReadOnlyWholePages() throws {
        let store = try makeStore(device: 24, dram: 96, maxPageSize: 4096)
        defer { store.close() }
        let keys: UInt64 = 16
        let failures = ManagedCounter()
        let seed = TestSeed.derive(1601)
        let threads = max(4, 2 * sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        DispatchQueue.concurrentPerform(iterations: threads) { thread in
            var random = SplitMix(seed: seed &+ UInt64(thread))
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 64)
            defer { buffer.deallocate() }
            for iteration in 0..<4_000 {
                let keyValue = random.next() % keys
                let key = PageKey(keyValue)
                // Even threads mostly read; odd threads write, remove and move.
                let roll = random.next() % 100
                if thread % 2 == 0 || roll < 40 {
                    switch attempt({ () throws(SpillwayError) in try store.get(key, into: buffer) }) {
                    case .success(let length):
                        let bytes = Array(UnsafeRawBufferPointer(rebasing: buffer[0..<length]))
                        if !isConsistentPage(bytes, key: keyValue) { failures.record("torn, foreign or reused page for \(key) (seed \(seed))") }
                    case .failure(.unknownKey): break
                    case .failure(let error): failures.record("get: \(error)")
                    }
                } else if roll < 80 {
                    let bytes = pageBytes(key: keyValue, nonce: UInt64(thread) << 32 | UInt64(iteration), length: 16 + Int(random.next() % 4080))
                    switch attempt({ () throws(SpillwayError) in try store.put(key, bytes: bytes) }) {
                    case .success, .failure(.storeFull): break
                    case .failure(let error): failures.record("put: \(error)")
                    }
                } else if roll < 90 {
                    switch attempt({ () throws(SpillwayError) in try store.remove(key) }) {
                    case .success: break
                    case .failure(let error): failures.record("remove: \(error)")
                    }
                } else {
                    _ = store.demote(key)
                }
            }
        }
        #expect(failures.messages.isEmpty, "\(failures.messages.prefix(5))")
        #expect(store.directory.optimisticReads > 0, "the lock-free path served no read")
        print("optimistic reads served: \(store.directory.optimisticReads) (seed \(seed))")
        #expect(store.stats().checksumFailures == 0)
        store.close()
        #expect(accountingHolds(store))
    }
}

/// Runs a typed-throwing operation and returns its outcome as a value.
func attempt<T>(_ body: () throws(SpillwayError) -> T) -> Result<T, SpillwayError> {
    do { return .success(try body()) } catch { return .failure(error) }
}

/// Collects failure messages from many threads.
final class ManagedCounter: Sendable {
    private let storage = SynchronizedArray()
    func record(_ message: String) { storage.append(message) }
    var messages: [String] { storage.values }
}

final class SynchronizedArray: Sendable {
    private let lock = Locked<[String]>([])
    func append(_ value: String) { lock.withLock { $0.append(value) } }
    var values: [String] { lock.withLock { $0 } }
}
