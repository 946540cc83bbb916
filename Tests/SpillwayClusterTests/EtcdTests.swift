import Foundation
import Logging
import Synchronization
import Testing
@testable import SpillwayCluster
import SpillwayCore

/// Against a real etcd on loopback (one per test, serialized: lease timings must not compete
/// with each other on a 2-core machine). Without the etcd binary these are reported as
/// skipped with the reason, never passed; CI installs etcd-server (tools/install-deps.sh).
@Suite(.serialized, .enabled(if: EtcdServer.binary != nil, Comment(rawValue: EtcdServer.missingReason)))
struct EtcdClientTests {
    @Test func putRangeDeleteRoundTripWithBinaryValues() async throws {
        try await onTestExecutor {
            let etcd = try await EtcdServer("kv")
            defer { etcd.stop() }
            try await withClient([etcd.endpoint]) { client in
                let binary: [UInt8] = (0...255).map { UInt8($0) } + [0, 0, 0xFF]
                let first = try await client.put(key: "/t/kv/a", value: binary)
                try await client.put(key: "/t/kv/b", value: [])
                try await client.put(key: "/t/kv/é", value: Array("ünïcode".utf8))
                try await client.put(key: "/t/kw", value: [1])  // outside the prefix
                let all = try await client.range(prefix: "/t/kv/")
                #expect(all.entries.map(\.key) == ["/t/kv/a", "/t/kv/b", "/t/kv/é"])
                #expect(all.entries[0].value == binary)
                #expect(all.entries[0].modRevision == first)
                #expect(all.entries[1].value.isEmpty)
                #expect(all.entries[2].value == Array("ünïcode".utf8))
                #expect(all.revision > first)
                #expect(try await client.get(key: "/t/kv/a")?.value == binary)
                #expect(try await client.get(key: "/t/kv/missing") == nil)
                #expect(try await client.delete(key: "/t/kv/a") == 1)
                #expect(try await client.delete(key: "/t/kv/a") == 0)
                #expect(try await client.range(prefix: "/t/kv/").entries.map(\.key) == ["/t/kv/b", "/t/kv/é"])
                #expect(try await client.range(prefix: "/nothing/").entries.isEmpty)
                // etcd refuses an empty key with HTTP 400 and its message.
                await #expect(throws: EtcdError.httpStatus(400, "etcdserver: key is not provided")) { try await client.put(key: "", value: [1]) }
            }
        }
    }

    @Test func leasesKeepRevokeAndExpire() async throws {
        try await onTestExecutor {
            let etcd = try await EtcdServer("lease")
            defer { etcd.stop() }
            try await withClient([etcd.endpoint]) { client in
                // Kept alive past its TTL, the key stays.
                let kept = try await client.grantLease(ttl: 2)
                try await client.put(key: "/t/lease/kept", value: [1], lease: kept)
                let keepUntil = ContinuousClock.now + .seconds(3)
                while ContinuousClock.now < keepUntil {
                    #expect(try await client.keepAlive(lease: kept) > 0)
                    try await Task.sleep(for: .milliseconds(500))
                }
                #expect(try await client.get(key: "/t/lease/kept") != nil)
                // Revoked, it goes at once.
                try await client.revoke(lease: kept)
                #expect(try await client.get(key: "/t/lease/kept") == nil)
                await #expect(throws: EtcdError.leaseExpired(kept)) { try await client.keepAlive(lease: kept) }
                await #expect(throws: EtcdError.leaseExpired(kept)) { try await client.revoke(lease: kept) }
                await #expect(throws: EtcdError.leaseExpired(kept)) { try await client.put(key: "/t/lease/x", value: [], lease: kept) }
                // Left alone, it expires (TTL 2 s; etcd may take up to about a second more).
                let left = try await client.grantLease(ttl: 2)
                try await client.put(key: "/t/lease/left", value: [2], lease: left)
                let gone = try await eventually(within: .seconds(8)) { try await client.get(key: "/t/lease/left") == nil }
                #expect(gone)
                await #expect(throws: EtcdError.leaseExpired(left)) { try await client.keepAlive(lease: left) }
            }
        }
    }

    @Test func watchSeesJoinAndLeave() async throws {
        try await onTestExecutor {
            let etcd = try await EtcdServer("watch")
            defer { etcd.stop() }
            try await withClient([etcd.endpoint]) { client in
                let start = try await client.range(prefix: "/t/w/").revision
                let events = Collected(client.watch(prefix: "/t/w/", fromRevision: start + 1))
                defer { events.cancel() }
                let lease = try await client.grantLease(ttl: 10)
                let putAt = ContinuousClock.now
                try await client.put(key: "/t/w/d1", value: [7, 0, 7], lease: lease)
                let joined = await eventually(within: .seconds(2)) { events.items.contains { $0.kind == .put && $0.key == "/t/w/d1" } }
                let joinLatency = events.arrivals[0] - putAt
                #expect(joined)
                #expect(events.items.first?.value == [7, 0, 7])
                try await client.put(key: "/t/w/d2", value: [1])
                try await client.delete(key: "/t/w/d2")
                let revokeAt = ContinuousClock.now
                try await client.revoke(lease: lease)
                let left = await eventually(within: .seconds(2)) { events.items.contains { $0.kind == .delete && $0.key == "/t/w/d1" } }
                let leaveLatency = (events.arrivals.last ?? revokeAt) - revokeAt
                #expect(left)
                #expect(events.items.map(\.kind) == [.put, .put, .delete, .delete])
                #expect(events.items.map(\.key) == ["/t/w/d1", "/t/w/d2", "/t/w/d2", "/t/w/d1"])
                #expect(events.failure == nil)
                print("etcd watch: put → event seen in \(joinLatency), revoke → delete seen in \(leaveLatency) (arrival times)")
                // Killing etcd ends the stream with a typed error instead of hanging.
                etcd.kill()
                #expect(await eventually(within: .seconds(5)) { events.ended })
                #expect(events.failure?.contains("etcd unreachable") == true)
            }
        }
    }

    @Test func anUnreachableEndpointIsATypedErrorNamingIt() async throws {
        try await onTestExecutor {
            let dead = "http://127.0.0.1:\(try freePort())"
            try await withClient([dead], timeout: .seconds(1)) { client in
                do {
                    _ = try await client.grantLease(ttl: 5)
                    Issue.record("a grant against a dead port succeeded")
                } catch {
                    guard let error = error as? EtcdError, case .unreachable(let endpoints, _) = error else {
                        Issue.record("expected .unreachable, got \(error)")
                        return
                    }
                    #expect(endpoints == [dead])
                    #expect("\(error)".contains(dead))
                }
            }
            #expect(throws: EtcdError.self) { try EtcdClient(endpoints: ["https://127.0.0.1:2379"]) }
            #expect(throws: EtcdError.self) { try EtcdClient(endpoints: ["127.0.0.1:2379"]) }
            #expect(throws: EtcdError.self) { try EtcdClient(endpoints: []) }
        }
    }

    @Test func failsOverToTheNextEndpoint() async throws {
        try await onTestExecutor {
            let etcd = try await EtcdServer("failover")
            defer { etcd.stop() }
            let dead = "http://127.0.0.1:\(try freePort())"
            try await withClient([dead, etcd.endpoint]) { client in
                try await client.put(key: "/t/f", value: [1])
                #expect(try await client.get(key: "/t/f")?.value == [1])
            }
        }
    }
}

@Suite(.serialized, .enabled(if: EtcdServer.binary != nil, Comment(rawValue: EtcdServer.missingReason)))
struct ClusterRegistrationTests {
    final class Free: Sendable {
        let slabs = Mutex<UInt64>(100)
    }

    @Test func registrationAppearsUpdatesAndStopRemovesIt() async throws {
        try await onTestExecutor {
            let etcd = try await EtcdServer("reg")
            defer { etcd.stop() }
            try await withClient([etcd.endpoint]) { client in
                let keys = try ClusterKeys(cluster: "reg-test")
                let free = Free()
                // TTL 6 s (a keep-alive every 2 s): in CI's parallel suite on 2 cores a 3 s lease
                // once expired before its keep-alive ran ("etcd lease ... expired: re-registering").
                let registration = try DaemonRegistration(client: client, keys: keys, ttl: 6, refreshInterval: .milliseconds(300)) {
                    try! record("00c0ffee", freeSlabs: free.slabs.withLock { $0 })
                }
                let membership = ClusterMembership(client: client, keys: keys)
                let events = Collected(membership.watch())
                defer { events.cancel() }
                try await registration.start()
                #expect(registration.key == "/spillway/reg-test/daemons/00c0ffee")
                let listed = try await membership.snapshot().daemons
                #expect(listed == [try record("00c0ffee", freeSlabs: 100)])
                #expect(await eventually(within: .seconds(2)) { events.items.contains(.joined(try! record("00c0ffee", freeSlabs: 100))) })
                // Free slabs change: the record is rewritten and watchers see an update.
                free.slabs.withLock { $0 = 42 }
                #expect(await eventually(within: .seconds(3)) { events.items.contains(.updated(try! record("00c0ffee", freeSlabs: 42))) })
                #expect(try await membership.snapshot().daemons.first?.freeSlabs == 42)
                // Kept alive past its TTL (three keep-alives are 6 s).
                #expect(await eventually(within: .seconds(8)) { registration.keepAlives >= 3 })
                #expect(try await membership.snapshot().daemons.count == 1)
                // stop() revokes: gone at once, and watchers see the leave.
                let stopError = await registration.stop()
                #expect(stopError == nil)
                #expect(try await membership.snapshot().daemons.isEmpty)
                #expect(await eventually(within: .seconds(2)) { events.items.contains(.left(instance: "00c0ffee")) })
                #expect(registration.outages == 0)
                #expect(registration.reRegistrations == 0)
                // Health verdicts round-trip.
                try await membership.setHealthState(.suspect, instance: "00c0ffee")
                #expect(try await membership.healthState(instance: "00c0ffee") == .suspect)
                try await membership.clearHealthState(instance: "00c0ffee")
                #expect(try await membership.healthState(instance: "00c0ffee") == nil)
            }
        }
    }

    @Test func stopWhileEtcdIsDownReturnsTheErrorAndTheRecordExpires() async throws {
        try await onTestExecutor {
            let etcd = try await EtcdServer("stopdown")
            defer { etcd.stop() }
            try await withClient([etcd.endpoint], timeout: .seconds(1)) { client in
                let keys = try ClusterKeys(cluster: "stopdown")
                let registration = try DaemonRegistration(client: client, keys: keys, ttl: 2) { try! record("5") }
                try await registration.start()
                etcd.kill()
                let error = await registration.stop()
                guard case .unreachable? = error else {
                    Issue.record("expected .unreachable from stop() with etcd down, got \(String(describing: error))")
                    return
                }
                // Back up, the lease runs out on its own (etcd restarts leases at their full TTL).
                try await etcd.restart()
                let membership = ClusterMembership(client: client, keys: keys)
                let expired = try await eventually(within: .seconds(8)) { try await membership.snapshot().daemons.isEmpty }
                #expect(expired)
            }
        }
    }

    @Test func aLostLeaseIsReplacedWithoutAnOutage() async throws {
        try await onTestExecutor {
            let etcd = try await EtcdServer("lost")
            defer { etcd.stop() }
            try await withClient([etcd.endpoint]) { client in
                let keys = try ClusterKeys(cluster: "lost")
                let registration = try DaemonRegistration(client: client, keys: keys, ttl: 3) { try! record("77") }
                try await registration.start()
                let first = registration.lease
                // Someone revokes the daemon's lease (an operator, or etcd lost it): the record goes,
                // and the next keep-alive notices and registers again under a new lease.
                try await client.revoke(lease: first)
                #expect(await eventually(within: .seconds(4)) { registration.reRegistrations == 1 })
                #expect(registration.outages == 0)
                #expect(registration.lease != first)
                #expect(try await client.get(key: registration.key) != nil)
                #expect(await registration.stop() == nil)
                #expect(try await client.get(key: registration.key) == nil)
            }
        }
    }

    @Test func startAgainstADeadPortThrowsUnreachable() async throws {
        try await onTestExecutor {
            let dead = "http://127.0.0.1:\(try freePort())"
            try await withClient([dead], timeout: .seconds(1)) { client in
                let registration = try DaemonRegistration(client: client, keys: try ClusterKeys(cluster: "c")) { try! record("1") }
                do {
                    try await registration.start()
                    Issue.record("start() succeeded against a dead port")
                } catch let error as EtcdError {
                    guard case .unreachable = error else {
                        Issue.record("expected .unreachable, got \(error)")
                        return
                    }
                    #expect("\(error)".contains(dead))
                }
                #expect(await registration.stop() == nil)
            }
        }
    }

    @Test func etcdRestartReRegistersAndTheWatchResumes() async throws {
        try await onTestExecutor {
            let etcd = try await EtcdServer("restart")
            defer { etcd.stop() }
            try await withClient([etcd.endpoint], timeout: .seconds(1)) { client in
                let keys = try ClusterKeys(cluster: "restart")
                let registration = try DaemonRegistration(client: client, keys: keys, ttl: 3) { try! record("ab12") }
                let membership = ClusterMembership(client: client, keys: keys, maxBackoff: .milliseconds(500))
                try await registration.start()
                let events = Collected(membership.watch())
                defer { events.cancel() }
                #expect(await eventually(within: .seconds(2)) { events.items.count == 1 })
                etcd.kill()
                // The registration notices at its next keep-alive (every TTL/3 = 1 s).
                #expect(await eventually(within: .seconds(5)) { registration.outages == 1 })
                try await etcd.restart()
                let restartedAt = ContinuousClock.now
                #expect(await eventually(within: .seconds(8)) { registration.reRegistrations == 1 })
                #expect(registration.outages == 1)
                // The watch reconnected from its last revision and saw the re-registration.
                #expect(await eventually(within: .seconds(5)) { events.items.contains(.updated(try! record("ab12"))) })
                if let index = events.items.firstIndex(of: .updated(try record("ab12"))) {
                    print("etcd restart: etcd answering → re-registration seen by the watch in \(events.arrivals[index] - restartedAt)")
                }
                #expect(membership.reconnects >= 1)
                #expect(!events.items.contains(.left(instance: "ab12")))
                #expect(events.failure == nil)
                #expect(try await membership.snapshot().daemons == [try record("ab12")])
                // The old lease was revoked after the new one took the key: exactly one lease holds it.
                let newLease = registration.lease
                #expect(newLease != 0)
                #expect(try await client.keepAlive(lease: newLease) > 0)
                #expect(await registration.stop() == nil)
                #expect(try await membership.snapshot().daemons.isEmpty)
            }
        }
    }

    @Test func aKilledDaemonsLeaseExpiresAndTheWatchSeesItLeave() async throws {
        try await onTestExecutor {
            let etcd = try await EtcdServer("expiry")
            defer { etcd.stop() }
            try await withClient([etcd.endpoint]) { client in
                let keys = try ClusterKeys(cluster: "expiry")
                let membership = ClusterMembership(client: client, keys: keys)
                let events = Collected(membership.watch())
                defer { events.cancel() }
                #expect(await eventually(within: .seconds(2)) { membership.reconnects == 0 && events.failure == nil })
                // A "daemon" that registers and then stops renewing, as after SIGKILL.
                let lease = try await client.grantLease(ttl: 2)
                try await client.put(key: try keys.daemonKey(instance: "dead1"), value: try record("dead1").encoded(), lease: lease)
                #expect(await eventually(within: .seconds(2)) { events.items.contains(.joined(try! record("dead1"))) })
                #expect(await eventually(within: .seconds(8)) { events.items.contains(.left(instance: "dead1")) })
                // Garbage under the prefix is skipped and counted, not fatal.
                try await client.put(key: keys.daemonsPrefix + "beef", value: Array("{not json".utf8))
                try await client.put(key: keys.daemonsPrefix + "not-hex", value: try record("cafe").encoded())
                #expect(await eventually(within: .seconds(2)) { membership.skippedRecords >= 2 })
                #expect(events.failure == nil)
            }
        }
    }
}
