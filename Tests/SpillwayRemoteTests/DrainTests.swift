import Foundation
import Testing
@testable import SpillwayCore
@testable import SpillwayRemote
@testable import SpillwayServer
@testable import SpillwayStore
import SpillwayTestSupport

/// The latency judge both tiers' canaries use: p99 over a window against the fleet's median,
/// a slow sample this round too, two rounds running.
@Suite struct CanaryJudgeTests {
    @Test func aDaemonSlowTwoRoundsRunningIsAnOutlierAndOneSlowReadIsNot() {
        var judge = CanaryJudge(daemons: 4, window: 8)
        func round(_ latencies: [UInt64]) -> [Int] {
            for (daemon, nanoseconds) in latencies.enumerated() { judge.record(daemon, nanoseconds: nanoseconds) }
            return judge.endRound().map(\.daemon)
        }
        #expect(round([100_000, 120_000, 90_000, 110_000]).isEmpty)
        // One slow read: a strike, not a verdict; the next round is fast again, the strike clears
        // (although the slow read is still in the window).
        #expect(round([100_000, 120_000, 90_000, 20_000_000]).isEmpty)
        #expect(round([100_000, 120_000, 90_000, 110_000]).isEmpty)
        #expect(round([100_000, 120_000, 90_000, 20_000_000]).isEmpty)
        // Slow twice running: reported, with the figures.
        #expect(round([100_000, 120_000, 90_000, 20_000_000]) == [3])
        #expect(judge.p99(3) == 20_000_000)
        // Below the 1 ms floor nothing is an outlier, however it compares.
        judge.forget(3)
        for _ in 0..<4 { #expect(round([10_000, 10_000, 10_000, 900_000]).isEmpty) }
    }

    @Test func twoDaemonsMakeNoMedian() {
        var judge = CanaryJudge(daemons: 2, window: 4)
        for _ in 0..<4 {
            judge.record(0, nanoseconds: 100_000)
            judge.record(1, nanoseconds: 50_000_000)
            #expect(judge.endRound().isEmpty)
        }
    }
}

/// Draining: a daemon judged suspect by canaries (or asked to drain for maintenance) loses no
/// page: the tier moves its slabs to the other daemons before anyone declares it dead.
@Suite(.serialized, .timeLimit(.minutes(3))) struct DrainTests {
    func remoteTier(_ servers: [RemoteMemoryServer], heartbeat: Double) throws -> (TieredStore, RemoteTier) {
        var configuration = RemoteTierConfiguration(servers: servers.map(endpoint), credentials: alice, capacity: 16 << 20, slotSize: 4096,
                                                    ioTimeout: 2, heartbeatInterval: heartbeat)
        configuration.canaryInterval = 0  // rounds run by the test
        let remote = try RemoteTier(configuration)
        return (try TieredStore(tiers: [remote], options: StoreOptions(maxPageSize: 4096, backgroundWorker: false)), remote)
    }

    func fill(_ store: TieredStore, pages: Int, seed: UInt64) throws -> [PageKey: [UInt8]] {
        var expected: [PageKey: [UInt8]] = [:]
        for value in 0..<pages {
            let page = pattern(seed &+ UInt64(value), 4096)
            try store.put(PageKey(UInt64(value)), bytes: page)
            expected[PageKey(UInt64(value))] = page
        }
        return expected
    }

    func slabsOn(_ remote: RemoteTier, _ daemon: Int) -> Int {
        remote.mappedSlabsForTest().filter { $0.daemon == daemon }.count
    }

    @Test func canariesFindASlowDaemonAndItsSlabsMoveWithNoLoss() throws {
        let seed = TestSeed.derive(31)
        let servers = try (0..<4).map { _ in try startDaemon(capacity: 16 << 20) }
        defer { for server in servers { server.shutdown(drain: 0) } }
        let (store, remote) = try remoteTier(servers, heartbeat: 0)
        defer { store.close() }
        let expected = try fill(store, pages: 2500, seed: seed)
        let holding = (0..<4).filter { slabsOn(remote, $0) > 0 }
        try #require(holding.count >= 3, "seed \(seed): the tier's slabs should spread over at least three daemons")
        #expect(remote.runCanaries().isEmpty)
        #expect(remote.canaries.load(ordering: .relaxed) == holding.count)
        #expect(remote.canaryFailures.load(ordering: .relaxed) == 0)
        // One daemon answers 20 ms late: an outlier once is a strike, twice running it is drained.
        let slow = holding[0]
        servers[slow].testDelayMicroseconds.store(20_000, ordering: .relaxed)
        #expect(!remote.runCanaries().contains(slow))
        #expect(remote.runCanaries().contains(slow))
        #expect(remote.fleet.drainingDaemons() == [slow])
        #expect(remote.fleet.stateCounts().draining == 1)
        // Its slabs move, a few per heartbeat, and none is lost.
        let before = slabsOn(remote, slow)
        var rounds = 0
        while slabsOn(remote, slow) > 0 && rounds < 50 {
            remote.drainSuspects()
            rounds += 1
        }
        #expect(slabsOn(remote, slow) == 0, "seed \(seed): \(slabsOn(remote, slow)) slabs still on the drained daemon")
        #expect(remote.migratedSlabs.load(ordering: .relaxed) == before)
        #expect(remote.failedMigrations.load(ordering: .relaxed) == 0)
        servers[slow].testDelayMicroseconds.store(0, ordering: .relaxed)
        for (key, page) in expected { #expect(try store.get(key) == page, "seed \(seed)") }
        // While it drains nothing new goes there.
        for value in 5000..<5600 { try store.put(PageKey(UInt64(value)), bytes: pattern(UInt64(value), 4096)) }
        #expect(slabsOn(remote, slow) == 0)
        #expect(remote.fleet.isAlive(slow), "a drained daemon is not declared dead")
    }

    @Test func aMaintenanceDrainEmptiesTheDaemonWithNoLoss() throws {
        let seed = TestSeed.derive(37)
        let servers = try (0..<3).map { _ in try startDaemon(capacity: 16 << 20) }
        defer { for server in servers { server.shutdown(drain: 0) } }
        let (store, remote) = try remoteTier(servers, heartbeat: 0.1)
        defer { store.close() }
        let expected = try fill(store, pages: 2000, seed: seed)
        let drained = try #require((0..<3).first { slabsOn(remote, $0) > 0 })
        servers[drained].beginMaintenanceDrain()
        #expect(servers[drained].maintenanceDraining)
        // The tenants get a reclaim notice per slab; the tier moves each one and gives it back.
        #expect(eventually(30) { servers[drained].maintenanceDrained }, "seed \(seed): \(servers[drained].snapshot().slabsLent) slabs still lent")
        #expect(slabsOn(remote, drained) == 0)
        #expect(remote.failedMigrations.load(ordering: .relaxed) == 0)
        #expect(servers[drained].counters.revokedSlabs.load(ordering: .relaxed) == 0, "a drain never revokes")
        for (key, page) in expected { #expect(try store.get(key) == page, "seed \(seed)") }
        // A draining daemon lends nothing new.
        let client = try DaemonClient(endpoint: endpoint(servers[drained]), credentials: bob, maxConnections: 1, ioTimeout: 2)
        defer { client.close() }
        #expect(throws: RemoteError.self) { _ = try client.mapSlab() }
        #expect(try JSONValue.parse(Array(servers[drained].statsJSON().utf8))["draining"] == .bool(true))
    }
}
