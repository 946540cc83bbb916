import Foundation
import Glibc
import Spillway
import SpillwayTestSupport
import Testing

// A cluster of hosts on one machine (tools/netns-cluster.sh): etcd in one network namespace,
// `spillwayd` in seven others across three failure domains, one more host for a daemon that
// joins later; the client is this test process, on the bridge's address. It checks that a
// running client sees joins and leaves, that a SIGKILLed daemon's lease expiry removes it and
// repair rebuilds its splits, that a partitioned daemon (its link down: packets vanish, no
// reset) does not hang reads and is repaired around, and that after the partition heals the
// daemon rejoins under a new epoch — 0 pages lost, 0 served wrong. Then a daemon slowed by
// `tc tbf` is found by the canaries (a latency outlier) and drained: its splits move to its
// peers while it stays alive; and `spillway cluster drain` empties another, which then leaves.

private let harness: String = {
    var directory = URL(fileURLWithPath: #filePath)
    while directory.path != "/" {
        directory.deleteLastPathComponent()
        let candidate = directory.appendingPathComponent("tools/netns-cluster.sh")
        if FileManager.default.fileExists(atPath: candidate.path) { return candidate.path }
    }
    return "tools/netns-cluster.sh"
}()

/// Why these tests cannot run here, or nil.
private let netnsUnavailable: String? = {
    if getuid() != 0 { return "network namespaces need root" }
    if EtcdServer.binary == nil { return EtcdServer.missingReason }
    guard access("/usr/sbin/ip", X_OK) == 0 || access("/sbin/ip", X_OK) == 0 || access("/usr/bin/ip", X_OK) == 0 else {
        return "iproute2 (ip) is not installed"
    }
    guard run(harness, ["probe"]) == 0 else { return "this kernel or container does not allow network namespaces and veth pairs" }
    return nil
}()

@discardableResult
private func run(_ executable: String, _ arguments: [String]) -> Int32 {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    do { try process.run() } catch { return -1 }
    process.waitUntilExit()
    return process.terminationStatus
}

/// A process inside a namespace (`ip netns exec` execs it: the pid is the process's own).
private final class HostProcess {
    let process = Process()
    let firstLine: String

    init(namespace: String, _ executable: String, _ arguments: [String], waitForLine: Bool) throws {
        process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        process.arguments = ["netns", "exec", namespace, executable] + arguments
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle.nullDevice
        try process.run()
        firstLine = waitForLine ? (readLine(from: out.fileHandleForReading.fileDescriptor, seconds: 20) ?? "") : ""
    }

    func signal(_ signal: Int32) { kill(process.processIdentifier, signal) }

    /// Its exit status once it exits within `seconds`, else nil.
    func wait(seconds: Double) -> Int32? {
        guard secondsUntil(seconds, { !process.isRunning }) != nil else { return nil }
        process.waitUntilExit()
        return process.terminationStatus
    }

    func stop() {
        signal(SIGKILL)
        process.waitUntilExit()
    }
}



@Suite(.serialized, .timeLimit(.minutes(6)), .enabled(if: netnsUnavailable == nil, Comment(rawValue: netnsUnavailable ?? "")))
struct ClusterNetnsTests {
    @Test func joinsLeavesKillsAndPartitionsAcrossHosts() throws {
        let prefix = "spw\(getpid() % 1000)"
        let net = 100 + Int(getpid() % 100)
        let hosts = 9
        #expect(run(harness, ["up", prefix, "\(hosts)", "\(net)"]) == 0)
        defer { run(harness, ["down", prefix, "\(hosts)"]) }
        func address(_ host: Int) -> String { "10.\(net).0.\(host + 1)" }
        let etcdURL = "http://\(address(0)):2379"
        let data = "/dev/shm/spillway-netns-etcd-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: data) }
        let etcd = try HostProcess(namespace: "\(prefix)0", EtcdServer.binary!, [
            "--name", "default", "--data-dir", data,
            "--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
            "--listen-peer-urls", "http://\(address(0)):2380", "--initial-advertise-peer-urls", "http://\(address(0)):2380",
            "--initial-cluster", "default=http://\(address(0)):2380", "--log-level", "warn",
        ], waitForLine: false)
        defer { etcd.stop() }
        #expect(secondsUntil(10) { (try? ClusterDirectory.members(etcd: etcdURL, cluster: "netns", logger: .init(label: "t"))) != nil } != nil)
        let tokens = try ScratchDirectory.file("netns-tokens-\(getpid())")
        try "netns netns-token-0123456789abcdef\n".write(toFile: tokens, atomically: true, encoding: .utf8)
        chmod(tokens, 0o600)
        defer { unlink(tokens) }
        let spillwayd = try builtExecutable("spillwayd").path
        func startDaemon(_ host: Int, domain: String) throws -> HostProcess {
            try HostProcess(namespace: "\(prefix)\(host)", spillwayd, [
                "--listen", "\(address(host)):7450", "--capacity", "32m", "--slab-size", "1m", "--token-file", tokens,
                "--etcd", etcdURL, "--cluster", "netns", "--failure-domain", domain, "--etcd-lease-ttl", "2", "--log-level", "error",
            ], waitForLine: true)
        }
        // Three failure domains; host 7 joins later (r1) and host 8 is a spare in r2, so that
        // after losing one r1 and one r2 daemon every stripe can still be rebuilt within the
        // limit of two splits per domain.
        let domains = [1: "r1", 2: "r1", 3: "r2", 4: "r2", 5: "r3", 6: "r3", 7: "r1", 8: "r2"]
        var daemons: [Int: HostProcess] = [:]
        defer { for daemon in daemons.values { daemon.stop() } }
        for host in [1, 2, 3, 4, 5, 6, 8] {
            daemons[host] = try startDaemon(host, domain: domains[host]!)
            #expect(daemons[host]!.firstLine.contains(address(host)), "\(daemons[host]!.firstLine)")
        }

        var tier = TierConfiguration(kind: .erasureCoded, capacity: 4 << 20)
        tier.etcd = etcdURL
        tier.cluster = "netns"
        tier.tokenFile = tokens
        // A drained (slow) daemon may be chosen again after 10 s: the by-hand drain below
        // needs its failure domain's third daemon.
        tier.drainSeconds = 10
        let store = try TieredStore.open(SpillwayConfiguration(slotSize: 4096, maxPageSize: 4096, tiers: [tier]))
        defer { store.close() }
        let coded = try #require(store.tiers.first as? ErasureCodedTier)
        #expect(coded.liveDaemons == 7)
        let seed = TestSeed.derive(91)
        let pages = (0..<200).map { pattern(seed &+ UInt64($0), 4096) }
        for (value, page) in pages.enumerated() { try store.put(PageKey(UInt64(value)), bytes: page) }
        func readAll() -> (wrong: Int, failed: Int) {
            var wrong = 0
            var failed = 0
            for (value, page) in pages.enumerated() {
                do {
                    if try store.get(PageKey(UInt64(value))) != page { wrong += 1 }
                } catch {
                    print("netns: read of page \(value) failed: \(error)")
                    failed += 1
                }
            }
            return (wrong, failed)
        }

        // Join: host 7 registers; the running client takes it in.
        daemons[7] = try startDaemon(7, domain: "r1")
        let joined = secondsUntil(10) { coded.liveDaemons == 8 }
        print("netns: join seen after \(joined.map { String(format: "%.2f s", $0) } ?? "never") (seed \(TestSeed.base))")
        #expect(joined.map { $0 <= 2 } == true)

        // SIGKILL host 1: its lease expires (2 s), the client sees it leave, reads go degraded,
        // repair rebuilds its splits elsewhere.
        daemons[1]!.stop()
        daemons[1] = nil
        let left = secondsUntil(15) { coded.liveDaemons == 7 }
        print("netns: SIGKILLed daemon gone after \(left.map { String(format: "%.2f s", $0) } ?? "never")")
        #expect(left != nil)
        #expect(readAll() == (0, 0))
        let repaired = secondsUntil(60) { coded.health().degraded == 0 && coded.health().lost == 0 }
        print("netns: \(pages.count) pages at full redundancy again \(repaired.map { String(format: "%.2f s", $0) } ?? "never") after the reads")
        #expect(repaired != nil, "\(coded.health())")

        // Partition host 3 (link down: no reset): reads finish without it, it is judged dead
        // (heartbeat, then its lease), and repair works around it.
        #expect(run(harness, ["cut", prefix, "3"]) == 0)
        let readStarted = monotonicNanoseconds()
        #expect(readAll() == (0, 0))
        print("netns: 200 reads during the partition took \(Double(monotonicNanoseconds() - readStarted) / 1e9) s")
        let judged = secondsUntil(20) { coded.liveDaemons == 6 }
        let repairedAfterCut = secondsUntil(60) { coded.health().degraded == 0 && coded.health().lost == 0 }
        print("netns: partitioned daemon judged dead \(judged.map { String(format: "%.2f s", $0) } ?? "never") after the reads, full redundancy \(repairedAfterCut.map { String(format: "%.2f s", $0) } ?? "never") later")
        #expect(judged != nil)
        #expect(repairedAfterCut != nil, "\(coded.health())")

        // Heal: the daemon re-registers and rejoins under a new epoch; its old slabs are never
        // used (their splits were rebuilt elsewhere), nothing is lost or wrong.
        let rejoinedBefore = coded.fleet.daemonsRejoined.load(ordering: .relaxed)
        #expect(run(harness, ["heal", prefix, "3"]) == 0)
        #expect(secondsUntil(30) { coded.liveDaemons == 7 && coded.fleet.daemonsRejoined.load(ordering: .relaxed) > rejoinedBefore } != nil)
        #expect(readAll() == (0, 0))
        for value in 0..<50 { try store.put(PageKey(UInt64(1000 + value)), bytes: pattern(seed &+ 1000 &+ UInt64(value), 4096)) }
        for value in 0..<50 { #expect(try store.get(PageKey(UInt64(1000 + value))) == pattern(seed &+ 1000 &+ UInt64(value), 4096)) }
        #expect(coded.health().lost == 0)

        // Slow: host 4 (r2, which has two other daemons to take its splits) rate-limited to
        // 2 Mbit/s both ways. The canaries (every 2 s) find it an outlier twice running and
        // drain it: its splits are regenerated on r2's others, while it stays alive.
        let clients = coded.clients
        func index(_ host: Int) -> Int? { clients.firstIndex { $0?.endpoint.description == "\(address(host)):7450" } }
        let slow = try #require(index(4))
        func splitsOn(_ daemon: Int) -> Int {
            var count = 0
            for value in pages.indices {
                guard let slot = store.location(of: PageKey(UInt64(value)))?.extent.firstSlot else { continue }
                count += (0..<6).filter { coded.daemonOf(slot: Int(slot), split: $0) == daemon }.count
            }
            return count
        }
        #expect(splitsOn(slow) > 0)
        let drainedBefore = coded.fleet.daemonsDrained.load(ordering: .relaxed)
        #expect(run(harness, ["slow", prefix, "4", "2mbit"]) == 0)
        defer { run(harness, ["fast", prefix, "4"]) }
        let detected = secondsUntil(30) { coded.fleet.daemonsDrained.load(ordering: .relaxed) > drainedBefore }
        print("netns: slow daemon (tbf 2mbit) judged an outlier and drained after \(detected.map { String(format: "%.2f s", $0) } ?? "never")")
        #expect(detected != nil)
        #expect(coded.fleet.drainingDaemons() == [slow])
        let moved = secondsUntil(60) { coded.slabsHeld(on: slow) == 0 && coded.health().degraded == 0 }
        print("netns: its splits regenerated elsewhere after \(moved.map { String(format: "%.2f s", $0) } ?? "never") more")
        #expect(moved != nil, "\(coded.slabsHeld(on: slow)) slabs still held on the slow daemon; \(coded.health())")
        #expect(splitsOn(slow) == 0)
        #expect(coded.fleet.isAlive(slow), "drained, not declared dead")
        #expect(run(harness, ["fast", prefix, "4"]) == 0)
        #expect(readAll() == (0, 0))

        // By hand: `spillway cluster drain` empties host 8 (r2); the client moves its splits
        // (to host 4 once its drain has run out: r2 has no other room), and host 8 leaves.
        let drainedHost = try #require(index(8))
        #expect(splitsOn(drainedHost) > 0)
        let drain = try runSpillway(["cluster", "drain", "\(address(8)):7450", "--etcd", etcdURL, "--cluster", "netns", "--timeout", "90", "--json"])
        print("netns: cluster drain: \(drain.stdout.trimmingCharacters(in: .whitespacesAndNewlines))")
        #expect(drain.status == 0, "\(drain.stderr)")
        #expect(daemons[8]!.wait(seconds: 15) == 0, "the drained daemon exits by itself")
        daemons[8] = nil
        #expect(splitsOn(drainedHost) == 0)
        #expect(readAll() == (0, 0))
        #expect(secondsUntil(30) { coded.health().degraded == 0 && coded.health().lost == 0 } != nil, "\(coded.health())")
    }
}
