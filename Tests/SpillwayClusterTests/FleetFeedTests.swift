import Foundation
import Glibc
import Spillway
import SpillwayTestSupport
import Testing

// A running client follows its cluster's registry: an erasure-coded tier configured with
// `etcd`/`cluster` (no `servers`) uses the registered daemons and their failure domains, a
// daemon that registers later joins its fleet, one that withdraws leaves it (its splits are
// repaired elsewhere), and one restarted on the same port (a new instance) rejoins under a
// new epoch. Daemons are real `spillwayd` processes registering in a real etcd.


@Suite(.serialized, .timeLimit(.minutes(3)), .enabled(if: EtcdServer.binary != nil, Comment(rawValue: EtcdServer.missingReason)))
struct FleetFeedTests {
    @Test func anOpenTierFollowsJoinsLeavesAndRestarts() async throws {
        // Its own thread: this body blocks (processes, polling), which must stall neither the
        // cooperative pool nor the other etcd tests' executor.
        try await withTaskExecutorPreference(ClusterExecutor()) {
            try await followJoinsLeavesAndRestarts()
        }
    }

    private func followJoinsLeavesAndRestarts() async throws {
        let etcd = try await EtcdServer("feed")
        defer { etcd.stop() }
        let tokens = try ScratchDirectory.file("fleet-feed-tokens-\(getpid())")
        try "feed feed-token-0123456789abcdef\n".write(toFile: tokens, atomically: true, encoding: .utf8)
        chmod(tokens, 0o600)
        defer { unlink(tokens) }
        func daemon(_ domain: String, listen: String = "127.0.0.1:0") throws -> DaemonProcess {
            try DaemonProcess(arguments: ["--token-file", tokens, "--etcd", etcd.endpoint, "--cluster", "feed",
                                          "--failure-domain", domain, "--etcd-lease-ttl", "2"], listen: listen)
        }
        var daemons = try ["a", "a", "b", "b", "c", "c"].map { try daemon($0) }
        defer { for daemon in daemons { daemon.kill9() } }
        var tier = TierConfiguration(kind: .erasureCoded, capacity: 4 << 20)
        tier.etcd = etcd.endpoint
        tier.cluster = "feed"
        tier.tokenFile = tokens
        let store = try TieredStore.open(SpillwayConfiguration(slotSize: 4096, maxPageSize: 4096, tiers: [tier]))
        defer { store.close() }
        let coded = try #require(store.tiers.first as? ErasureCodedTier)
        #expect(coded.liveDaemons == 6)
        #expect(coded.splitsPerDomain == 2)
        let pages = (0..<100).map { pattern(TestSeed.derive(UInt64($0)), 4096) }
        for (value, page) in pages.enumerated() { try store.put(PageKey(UInt64(value)), bytes: page) }

        // A seventh daemon registers: the open tier takes it in. (In domain "a": with three
        // domains each stripe holds exactly two splits per domain, so a lost "a" member can
        // only be replaced in "a".)
        daemons.append(try daemon("a"))
        let joined = secondsUntil(5) { coded.liveDaemons == 7 }
        print("join seen by the running client after \(joined.map { String(format: "%.2f s", $0) } ?? "never")")
        #expect(joined != nil)

        // One withdraws (SIGTERM): it leaves the fleet; its splits are repaired on the others.
        daemons[0].kill(SIGTERM)
        #expect(daemons[0].wait(seconds: 15) == 0)
        let left = secondsUntil(5) { coded.liveDaemons == 6 }
        print("leave seen by the running client after \(left.map { String(format: "%.2f s", $0) } ?? "never")")
        #expect(left != nil)
        for (value, page) in pages.enumerated() { #expect(try store.get(PageKey(UInt64(value))) == page, "seed \(TestSeed.base)") }
        #expect(secondsUntil(30) { coded.health().degraded == 0 } != nil, "\(coded.health())")

        // Another is killed and restarted on its port (a new instance): it rejoins under a new
        // epoch, and no page is served wrong meanwhile.
        let port = daemons[1].port
        daemons[1].kill9()
        daemons[1] = try daemon("a", listen: "127.0.0.1:\(port)")
        #expect(secondsUntil(10) { coded.fleet.daemonsRejoined.load(ordering: .relaxed) >= 1 && coded.liveDaemons == 6 } != nil)
        for (value, page) in pages.enumerated() { #expect(try store.get(PageKey(UInt64(value))) == page, "seed \(TestSeed.base)") }
        #expect(secondsUntil(30) { coded.health().degraded == 0 && coded.health().lost == 0 } != nil, "\(coded.health())")
    }
}

extension FleetFeedTests {
    /// A client records its verdicts in the registry: a daemon that misses write deadlines
    /// (answers 0.8 s late, the deadline is 0.5 s) is marked suspect there, where
    /// `spillway cluster status` reads it.
    @Test func aSlowDaemonIsRecordedSuspectInTheRegistry() async throws {
        try await withTaskExecutorPreference(ClusterExecutor()) {
            try await recordSuspect()
        }
    }

    private func recordSuspect() async throws {
        let etcd = try await EtcdServer("verdict")
        defer { etcd.stop() }
        let tokens = try ScratchDirectory.file("fleet-verdict-tokens-\(getpid())")
        try "feed feed-token-0123456789abcdef\n".write(toFile: tokens, atomically: true, encoding: .utf8)
        chmod(tokens, 0o600)
        defer { unlink(tokens) }
        // Each daemon its own failure domain: left to default, all six would share this host's
        // name, and one domain cannot hold a stripe safely (nothing would be placed).
        func daemon(_ domain: String, _ extra: [String] = []) throws -> DaemonProcess {
            try DaemonProcess(arguments: ["--token-file", tokens, "--etcd", etcd.endpoint, "--cluster", "verdict", "--etcd-lease-ttl", "2",
                                          "--failure-domain", domain] + extra)
        }
        let slow = try daemon("d0", ["--enable-test-faults", "--test-delay-us", "800000"])
        var daemons = [slow]
        for index in 1..<6 { daemons.append(try daemon("d\(index)")) }
        defer { for daemon in daemons { daemon.kill9() } }
        var tier = TierConfiguration(kind: .erasureCoded, capacity: 4 << 20)
        tier.etcd = etcd.endpoint
        tier.cluster = "verdict"
        tier.tokenFile = tokens
        let store = try TieredStore.open(SpillwayConfiguration(slotSize: 4096, maxPageSize: 4096, tiers: [tier]))
        defer { store.close() }
        for value in 0..<8 { try store.put(PageKey(UInt64(value)), bytes: pattern(UInt64(value), 4096)) }
        let suspectSeen = secondsUntil(10) {
            let members = (try? ClusterDirectory.members(etcd: etcd.endpoint, cluster: "verdict", logger: .init(label: "t"))) ?? []
            return members.contains { $0.record.address == "127.0.0.1:\(slow.port)" && $0.state == .suspect }
        }
        #expect(suspectSeen != nil, "the slow daemon was not recorded suspect")
        for value in 0..<8 { #expect(try store.get(PageKey(UInt64(value))) == pattern(UInt64(value), 4096)) }
    }
}


extension FleetFeedTests {
    /// Maintenance: `spillway cluster drain ADDRESS` marks the daemon draining in the
    /// registry; the daemon stops lending and asks its tenants to move their slabs, the open
    /// remote tier moves them to the other daemons, and the daemon leaves the cluster and
    /// exits 0 once empty. No page is lost.
    @Test func clusterDrainEmptiesADaemonWhichThenLeaves() async throws {
        try await withTaskExecutorPreference(ClusterExecutor()) {
            try await drainByHand()
        }
    }

    private func drainByHand() async throws {
        let etcd = try await EtcdServer("drain")
        defer { etcd.stop() }
        let tokens = try ScratchDirectory.file("fleet-drain-tokens-\(getpid())")
        try "feed feed-token-0123456789abcdef\n".write(toFile: tokens, atomically: true, encoding: .utf8)
        chmod(tokens, 0o600)
        defer { unlink(tokens) }
        let daemons = try (0..<3).map { index in
            try DaemonProcess(arguments: ["--token-file", tokens, "--etcd", etcd.endpoint, "--cluster", "drain", "--etcd-lease-ttl", "2",
                                          "--failure-domain", "d\(index)"])
        }
        defer { for daemon in daemons { daemon.kill9() } }
        var tier = TierConfiguration(kind: .remote, capacity: 16 << 20)
        tier.etcd = etcd.endpoint
        tier.cluster = "drain"
        tier.tokenFile = tokens
        let store = try TieredStore.open(SpillwayConfiguration(slotSize: 4096, maxPageSize: 4096, tiers: [tier]))
        defer { store.close() }
        let remote = try #require(store.tiers.first as? RemoteTier)
        let seed = TestSeed.derive(41)
        let pages = (0..<2000).map { pattern(seed &+ UInt64($0), 4096) }
        for (value, page) in pages.enumerated() { try store.put(PageKey(UInt64(value)), bytes: page) }
        let clients = remote.clients
        let target = try #require((0..<3).first { daemon in remote.mappedSlabsForTest().contains { $0.daemon == daemon } })
        let address = try #require(clients[target]?.endpoint.description)
        let process = try #require(daemons.first { "127.0.0.1:\($0.port)" == address })
        let drain = try runSpillway(["cluster", "drain", address, "--etcd", etcd.endpoint, "--cluster", "drain", "--timeout", "60", "--json"])
        #expect(drain.status == 0, "\(drain.stderr)")
        let report = try JSONValue.parse(Array(drain.stdout.utf8))
        #expect(report["drained"] == .bool(true), "\(drain.stdout)")
        print("cluster drain: \(drain.stdout.trimmingCharacters(in: .whitespacesAndNewlines))")
        #expect(process.wait(seconds: 15) == 0, "the drained daemon exits by itself")
        #expect(!remote.mappedSlabsForTest().contains { $0.daemon == target })
        #expect(remote.failedMigrations.load(ordering: .relaxed) == 0)
        for (value, page) in pages.enumerated() { #expect(try store.get(PageKey(UInt64(value))) == page, "seed \(seed)") }
        let members = try ClusterDirectory.members(etcd: etcd.endpoint, cluster: "drain", logger: .init(label: "t"))
        #expect(members.count == 2 && !members.contains { $0.record.address == address })
    }
}
