import Testing
@testable import SpillwayCore
@testable import SpillwayErasure
@testable import SpillwayMemoryTiers
@testable import SpillwayRemote
@testable import SpillwayStore
import SpillwayTestSupport

/// Random put/get/remove/maintenance/repair sequences on a DRAM tier over an erasure-coded
/// tier (so pages keep moving into and out of the coded tier), with up to r of its daemons
/// shut down along the way, checked against a model: bytes in = bytes out, a failed put
/// leaves the previous version, and no page with ≤ r lost splits is ever unreadable.
@Suite(.serialized) struct ErasurePropertyTests {
    @Test(arguments: 0..<4)
    func bytesInEqualBytesOutWhileDaemonsDie(seed: UInt64) throws {
        let servers = try startDaemons(7)
        defer { for server in servers { server.shutdown(drain: 0) } }
        var configuration = ErasureCodedTierConfiguration(servers: servers.map { Endpoint(host: "127.0.0.1", port: $0.port) },
                                                          credentials: testCredentials, capacity: 2 << 20, slotSize: 4096)
        configuration.heartbeatInterval = 0
        configuration.ioTimeout = 2
        let coded = try ErasureCodedTier(configuration)
        let store = try TieredStore(tiers: [try DRAMTier(slotSize: 4096, capacitySlots: 6, prefault: false), coded],
                                    options: StoreOptions(maxPageSize: 2 * 4096, backgroundWorker: false))
        defer { store.close() }
        var random = SplitMix64(seed: seed &* 104_729 &+ 3)
        var model: [PageKey: [UInt8]] = [:]
        var killed = 0
        for step in 0..<400 {
            if step == 130 || step == 260, killed < coded.configuration.r {
                // Shut down a daemon holding a split of some coded page (or any, if none yet).
                let victim = coded.daemonOf(slot: 0, split: Int(random.next() % 6)) ?? Int(random.next() % 7)
                servers[victim].shutdown(drain: 0)
                killed += 1
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
                    // Refused (e.g. fewer than k+1 live daemons for the coded tier): the previous
                    // version, if any, must still be there.
                }
            case 40..<85:
                guard let expected = model[key] else {
                    #expect(!store.contains(key), "step \(step): a page the model does not have")
                    continue
                }
                do {
                    #expect(try store.get(key) == expected, "step \(step): bytes in ≠ bytes out")
                } catch {
                    Issue.record("step \(step): a page with at most r lost splits was unreadable: \(error)")
                }
            case 85..<93:
                if model[key] != nil {
                    _ = try? store.remove(key)
                    model[key] = nil
                }
            case 93..<97:
                store.runMaintenance()
            default:
                coded.heartbeat()
                coded.repair(budgetBytes: 1 << 20)
            }
        }
        for (key, expected) in model { #expect(try store.get(key) == expected) }
        #expect(store.stats().checksumFailures == 0)
    }
}
