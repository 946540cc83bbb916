import Testing
@testable import SpillwayCore
@testable import SpillwayErasure
@testable import SpillwayMemoryTiers
@testable import SpillwayRemote
@testable import SpillwayStore
import SpillwayTestSupport

/// Random put/get/remove/maintenance/repair sequences on a DRAM tier over an erasure-coded
/// tier (so pages keep moving into and out of the coded tier), with r distinct daemons of the
/// coded tier shut down along the way, checked against a model: bytes in = bytes out, every
/// put succeeds (the pool keeps k+1 live members per stripe: a lost member is detected and
/// replaced on one of the two spare daemons), and no page with ≤ r lost splits is ever
/// unreadable.
@Suite(.serialized, .timeLimit(.minutes(5))) struct ErasurePropertyTests {
    @Test(arguments: 0..<12)
    func bytesInEqualBytesOutWhileDaemonsDie(run: UInt64) throws {
        let seed = TestSeed.derive(1000 + run)
        // k+r+2 daemons: each of the r victims can be replaced.
        let servers = try startDaemons(8)
        defer { for server in servers { server.shutdown(drain: 0) } }
        var configuration = ErasureCodedTierConfiguration(servers: servers.map { Endpoint(host: "127.0.0.1", port: $0.port) },
                                                          credentials: testCredentials, capacity: 2 << 20, slotSize: 4096)
        configuration.heartbeatInterval = 0
        configuration.ioTimeout = 2
        let coded = try ErasureCodedTier(configuration)
        let store = try TieredStore(tiers: [try DRAMTier(slotSize: 4096, capacitySlots: 6, prefault: false), coded],
                                    options: StoreOptions(maxPageSize: 2 * 4096, backgroundWorker: false))
        defer { store.close() }
        var random = SplitMix64(seed: seed)
        var model: [PageKey: [UInt8]] = [:]
        var killed: Set<Int> = []
        for step in 0..<400 {
            if step == 130 || step == 260 {
                // Shut down a daemon holding a split of some coded page (any live one if no
                // stripe is mapped yet), never one already down.
                let members = (0..<coded.configuration.k + coded.configuration.r).compactMap { coded.daemonOf(slot: 0, split: $0) }
                    .filter { !killed.contains($0) }
                let others = servers.indices.filter { !killed.contains($0) }
                let victim = members.isEmpty ? others[Int(random.next() % UInt64(others.count))] : members[Int(random.next() % UInt64(members.count))]
                servers[victim].shutdown(drain: 0)
                killed.insert(victim)
                // The failure is detected and the member replaced (the heartbeat thread's job).
                coded.heartbeat()
                coded.repair(budgetBytes: 1 << 20)
                #expect(coded.liveDaemons == 8 - killed.count, "seed \(seed) step \(step)")
            }
            let key = PageKey(random.next() % 40)
            switch random.next() % 100 {
            case 0..<40:
                let length = Int(random.next() % UInt64(2 * 4096)) + 1
                let bytes = pattern(random.next(), length)
                do {
                    try store.put(key, bytes: bytes)
                    model[key] = bytes
                } catch {
                    Issue.record("seed \(seed) step \(step): a put failed with \(killed.count) ≤ r daemons down: \(error)")
                }
            case 40..<85:
                guard let expected = model[key] else {
                    #expect(!store.contains(key), "seed \(seed) step \(step): a page the model does not have")
                    continue
                }
                do {
                    #expect(try store.get(key) == expected, "seed \(seed) step \(step): bytes in ≠ bytes out")
                } catch {
                    Issue.record("seed \(seed) step \(step): a page with at most r lost splits was unreadable: \(error)")
                }
            case 85..<93:
                if model[key] != nil {
                    #expect(try store.remove(key), "seed \(seed) step \(step)")
                    model[key] = nil
                }
            case 93..<97:
                store.runMaintenance()
            default:
                coded.heartbeat()
                coded.repair(budgetBytes: 1 << 20)
            }
        }
        for (key, expected) in model { #expect(try store.get(key) == expected, "seed \(seed)") }
        #expect(store.stats().checksumFailures == 0, "seed \(seed)")
    }
}
