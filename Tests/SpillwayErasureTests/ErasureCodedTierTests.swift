import Foundation
import Glibc
import Testing
@testable import SpillwayCore
@testable import SpillwayErasure
@testable import SpillwayMemoryTiers
@testable import SpillwayRemote
@testable import SpillwayStore
import SpillwayTestSupport

func pattern(_ seed: UInt64, _ count: Int) -> [UInt8] {
    var generator = SplitMix64(seed: seed)
    return (0..<count).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
}

func startDaemons(_ count: Int, testFaults: Bool = false, slowIndex: Int? = nil, delayMicroseconds: Int = 0) throws -> [RemoteMemoryServer] {
    try (0..<count).map { index in
        var configuration = DaemonConfiguration(listen: Endpoint(host: "127.0.0.1", port: 0), capacity: 32 << 20, slabSize: 1 << 20,
                                                tokens: testTokens)
        configuration.enableTestFaults = testFaults || index == slowIndex
        if index == slowIndex { configuration.testDelayMicroseconds = delayMicroseconds }
        let server = try RemoteMemoryServer(configuration)
        try server.start()
        return server
    }
}

func ecStore(_ endpoints: [Endpoint], delta: Int = 1, heartbeat: Double = 0, capacity: Int = 4 << 20,
             placement: CodingPlacement = .codingSets(slack: 1), writeGrace: Double = 0.02,
             credentials: ClientCredentials = testCredentials) throws -> (TieredStore, ErasureCodedTier)
{
    var configuration = ErasureCodedTierConfiguration(servers: endpoints, credentials: credentials,
                                                      capacity: capacity, slotSize: 4096)
    configuration.lateBindingDelta = delta
    configuration.heartbeatInterval = heartbeat
    configuration.ioTimeout = 2
    configuration.placement = placement
    configuration.writeGrace = writeGrace
    let tier = try ErasureCodedTier(configuration)
    return (try TieredStore(tiers: [tier], options: StoreOptions(maxPageSize: 3 * 4096, backgroundWorker: false)), tier)
}

@Suite(.serialized) struct ErasureCodedTierTests {
    @Test func pagesSurviveRDaemonsGoingAwayAndNeverComeBackWrong() throws {
        let servers = try startDaemons(6)
        defer { for server in servers { server.shutdown(drain: 0) } }
        let (store, tier) = try ecStore(servers.map { Endpoint(host: "127.0.0.1", port: $0.port) })
        defer { store.close() }
        var expected: [PageKey: [UInt8]] = [:]
        for value in 0..<200 {
            let page = pattern(UInt64(value), value % 3 == 0 ? 9000 : 4096)  // some pages span 3 slots
            try store.put(PageKey(UInt64(value)), bytes: page)
            expected[PageKey(UInt64(value))] = page
        }
        for (key, page) in expected { #expect(try store.get(key) == page) }
        #expect(tier.counters.degradedReads.load(ordering: .relaxed) == 0, "every page has full redundancy")
        #expect(tier.health().healthy == tier.usedSlots)
        // Two daemons (r) go away: every page still reads back, by decoding.
        servers[0].shutdown(drain: 0)
        servers[3].shutdown(drain: 0)
        for (key, page) in expected { #expect(try store.get(key) == page) }
        #expect(tier.counters.degradedReads.load(ordering: .relaxed) > 0)
        #expect(tier.liveDaemons == 4)
        // Writes need k+1 = 5 live daemons: with 4 they fail with a typed error and stay invisible.
        #expect(throws: SpillwayError.self) { try store.put(PageKey(9999), bytes: pattern(1, 4096)) }
        #expect(!store.contains(PageKey(9999)))
        #expect(tier.counters.failedWrites.load(ordering: .relaxed) > 0)
        // A third daemon gone: pages are unavailable (typed error), never wrong bytes.
        servers[1].shutdown(drain: 0)
        var unavailable = 0
        for (key, page) in expected {
            do {
                #expect(try store.get(key) == page, "a read returned bytes other than those written")
            } catch {
                guard case .tierIO = error else {
                    Issue.record("unexpected error \(error)")
                    continue
                }
                unavailable += 1
            }
        }
        #expect(unavailable > 0)
    }

    @Test func aCorruptSplitIsDetectedRebuiltAndRepaired() throws {
        let servers = try startDaemons(6, testFaults: true)
        defer { for server in servers { server.shutdown(drain: 0) } }
        // Δ = 0 reads exactly the k data splits, so the corrupt one is always looked at (with
        // late binding it may simply lose the race and go unread).
        let (store, tier) = try ecStore(servers.map { Endpoint(host: "127.0.0.1", port: $0.port) }, delta: 0)
        defer { store.close() }
        let page = pattern(77, 4096)
        try store.put(PageKey(1), bytes: page)
        let slot = Int(try #require(store.location(of: PageKey(1))).extent.firstSlot)
        // Corrupt a data split in the daemon's memory.
        try tier.corruptSplitForTest(slot: slot, split: 1)
        #expect(try store.get(PageKey(1)) == page)
        #expect(tier.counters.corruptSplits.load(ordering: .relaxed) == 1)
        #expect(tier.counters.decodedReads.load(ordering: .relaxed) >= 1)
        #expect(tier.health().degraded == 1, "the corrupt split counts as missing until repaired")
        // Repair rewrites it; the page is healthy and reads without decoding again.
        #expect(tier.repair(budgetBytes: 1 << 20) == 1)
        #expect(tier.health() == (healthy: 1, degraded: 0, lost: 0))
        let degradedBefore = tier.counters.degradedReads.load(ordering: .relaxed)
        #expect(try store.get(PageKey(1)) == page)
        #expect(tier.counters.degradedReads.load(ordering: .relaxed) == degradedBefore)
        // Corrupt r+1 splits: the page cannot be rebuilt and is refused, never served wrong.
        for split in [0, 2, 4] { try tier.corruptSplitForTest(slot: slot, split: split) }
        #expect(throws: SpillwayError.self) { _ = try store.get(PageKey(1)) }
    }

    @Test func lateBindingReadsAroundASlowDaemon() throws {
        let servers = try startDaemons(6, testFaults: true)
        defer { for server in servers { server.shutdown(drain: 0) } }
        let endpoints = servers.map { Endpoint(host: "127.0.0.1", port: $0.port) }
        for delta in [1, 0] {
            let (store, tier) = try ecStore(endpoints, delta: delta)
            for value in 0..<20 { try store.put(PageKey(UInt64(value)), bytes: pattern(UInt64(value), 4096)) }
            // The daemon holding data split 0 of these pages answers 30 ms late from now on.
            let slot = Int(try #require(store.location(of: PageKey(0))).extent.firstSlot)
            let slow = servers[try #require(tier.daemonOf(slot: slot, split: 0))]
            slow.testDelayMicroseconds.store(30_000, ordering: .relaxed)
            let before = tier.counters.decodedReads.load(ordering: .relaxed)
            for value in 0..<20 { #expect(try store.get(PageKey(UInt64(value))) == pattern(UInt64(value), 4096)) }
            let decoded = tier.counters.decodedReads.load(ordering: .relaxed) - before
            slow.testDelayMicroseconds.store(0, ordering: .relaxed)
            if delta == 1 {
                // Late binding: the parity split arrives first and stands in for the slow one.
                #expect(decoded == 20)
            } else {
                #expect(decoded == 0, "without late binding every read waits for its k data splits")
            }
            store.close()
        }
    }

    @Test func killNineOfRDaemonsThenRepairRestoresFullRedundancy() throws {
        // k+r+2 daemons: each of the r lost members needs a live daemon outside the stripe.
        let daemons = try (0..<8).map { _ in try DaemonProcess() }
        let (store, tier) = try ecStore(daemons.map(\.endpoint), heartbeat: 0.1, capacity: 2 << 20,
                                        credentials: ClientCredentials(tenant: "t", token: nil))  // their generated token files
        defer { store.close() }
        var expected: [PageKey: [UInt8]] = [:]
        for value in 0..<300 {
            let page = pattern(UInt64(value) &* 3, 4096)
            try store.put(PageKey(UInt64(value)), bytes: page)
            expected[PageKey(UInt64(value))] = page
        }
        // Which daemons hold splits: kill two of them mid-workload.
        let slot = Int(try #require(store.location(of: PageKey(0))).extent.firstSlot)
        let victims = [try #require(tier.daemonOf(slot: slot, split: 0)), try #require(tier.daemonOf(slot: slot, split: 5))]
        for (index, (key, page)) in expected.enumerated() {
            if index == 100 { for victim in victims { daemons[victim].kill9() } }
            #expect(try store.get(key) == page)
        }
        // More writes while degraded (k+1 = 5 of the stripe's members are alive).
        for value in 300..<350 {
            let page = pattern(UInt64(value) &* 3, 4096)
            try store.put(PageKey(UInt64(value)), bytes: page)
            expected[PageKey(UInt64(value))] = page
        }
        // The repairer maps replacements on the spare daemon and regenerates the splits.
        let deadline = Date().addingTimeInterval(30)
        while (tier.health().healthy != tier.usedSlots || tier.counters.membersRebuilt.load(ordering: .relaxed) < 2) && Date() < deadline {
            usleep(100_000)
        }
        let health = tier.health()
        #expect(health.degraded == 0 && health.lost == 0 && health.healthy == tier.usedSlots, "\(health)")
        #expect(tier.counters.membersRebuilt.load(ordering: .relaxed) == 2)
        for (key, page) in expected { #expect(try store.get(key) == page) }
    }

    @Test func aReclaimedSlabIsRegeneratedElsewhereAndGivenBackWithNoLoss() throws {
        // Seven daemons (six per stripe + a spare), each reading MemAvailable from its own file.
        let paths = (0..<7).map { "/tmp/spillway-ec-reclaim-\(getpid())-\($0)" }
        defer { for path in paths { unlink(path) } }
        for path in paths { try "MemAvailable: 8388608 kB\n".write(toFile: path, atomically: true, encoding: .utf8) }
        let servers = try paths.map { path in
            let server = try RemoteMemoryServer(DaemonConfiguration(
                listen: Endpoint(host: "127.0.0.1", port: 0), capacity: 32 << 20, slabSize: 1 << 20, tokens: testTokens, headroom: 1 << 30,
                reclaimDeadline: 10, memoryInfoPath: path, checkInterval: 0.05))
            try server.start()
            return server
        }
        defer { for server in servers { server.shutdown(drain: 0) } }
        let (store, tier) = try ecStore(servers.map { Endpoint(host: "127.0.0.1", port: $0.port) }, heartbeat: 0.1, capacity: 2 << 20)
        defer { store.close() }
        var expected: [PageKey: [UInt8]] = [:]
        for value in 0..<200 {
            let page = pattern(UInt64(value) &+ 99, 4096)
            try store.put(PageKey(UInt64(value)), bytes: page)
            expected[PageKey(UInt64(value))] = page
        }
        let slot = Int(try #require(store.location(of: PageKey(0))).extent.firstSlot)
        let pressured = try #require(tier.daemonOf(slot: slot, split: 2))
        #expect(servers[pressured].snapshot().slabsLent == 1)
        try "MemAvailable: 1024 kB\n".write(toFile: paths[pressured], atomically: true, encoding: .utf8)
        let deadline = Date().addingTimeInterval(20)
        while (servers[pressured].snapshot().slabsLent > 0 || tier.health().healthy != tier.usedSlots) && Date() < deadline {
            usleep(50_000)
        }
        #expect(servers[pressured].snapshot().slabsLent == 0, "the reclaimed slab was given back")
        #expect(servers[pressured].counters.revokedSlabs.load(ordering: .relaxed) == 0, "before the deadline")
        #expect(tier.counters.slabsRetired.load(ordering: .relaxed) >= 1)
        #expect(tier.health().healthy == tier.usedSlots, "full redundancy again, on the spare daemon")
        #expect(tier.daemonOf(slot: slot, split: 2) != pressured)
        for (key, page) in expected { #expect(try store.get(key) == page) }
    }

    @Test func codingSetsLoseDataFarLessOftenThanRandomPlacement() {
        var simulation = PlacementLossSimulation()
        simulation.trials = 300
        simulation.stripes = 50_000
        let random = simulation.lossProbability(.random)
        let codingSets = simulation.lossProbability(.codingSets(slack: 1))
        print("loss probability, 1000 daemons, 10 failed, RS(4,2), 50k stripes: random \(random), coding sets \(codingSets)")
        #expect(codingSets < random)
    }

    @Test func configurationIsValidated() throws {
        let servers = try startDaemons(3)
        defer { for server in servers { server.shutdown(drain: 0) } }
        #expect(throws: SpillwayError.self) { _ = try ecStore(servers.map { Endpoint(host: "127.0.0.1", port: $0.port) }) }
    }
}
