import Foundation
import Glibc
import Testing
@testable import Spillway
@testable import SpillwayErasure
@testable import SpillwayProtocol
@testable import SpillwayRemote
@testable import SpillwayServer
import SpillwayTestSupport

// The hardening issue's security items seen from the outside: the embedded daemons, a real
// spillwayd under a flood of strangers, and its metrics endpoint.

@Suite(.serialized, .timeLimit(.minutes(5))) struct SecurityCommandTests {
    @Test func embeddedDaemonsRefuseStrangers() throws {
        let configuration = SpillwayConfiguration(slotSize: 4096, tiers: [
            { var tier = TierConfiguration(kind: .erasureCoded, capacity: 4 << 20); tier.k = 2; tier.r = 1; return tier }(),
        ])
        let daemons = InProcessDaemons()
        let store = try TieredStore.open(configuration, daemons: daemons)
        defer { store.close() }
        let coded = try #require(store.tiers.first as? ErasureCodedTier)
        let servers = daemons.servers(ofTier: coded.descriptor.name)
        #expect(servers.count == 3)
        try store.put(PageKey(high: 0, low: 1), bytes: [UInt8](repeating: 7, count: 4096))
        for server in servers {
            let address = Endpoint(host: "127.0.0.1", port: server.port)
            // The tenant the tier uses, with no token and with a wrong one.
            let missing = #expect(throws: RemoteError.self) {
                _ = try DaemonClient(endpoint: address, credentials: ClientCredentials(tenant: "spillway", token: nil))
            }
            guard case .refused(let reply)? = missing else { Issue.record("no token: \(String(describing: missing))"); continue }
            #expect(reply.code == .authenticationRequired)
            let wrong = #expect(throws: RemoteError.self) {
                _ = try DaemonClient(endpoint: address, credentials: ClientCredentials(tenant: "spillway", token: Array("guessed-token-0123456789".utf8)))
            }
            guard case .refused(let wrongReply)? = wrong else { Issue.record("wrong token: \(String(describing: wrong))"); continue }
            #expect(wrongReply.code == .authenticationFailed)
        }
        // And the tier itself still works.
        #expect(try store.get(PageKey(high: 0, low: 1)) == [UInt8](repeating: 7, count: 4096))
    }

    @Test func theLibraryDefaultHasNoRemoteTierAndTheCLIDefaultHasOne() throws {
        #expect(SpillwayConfiguration.libraryDefault.tiers.map(\.kind) == [.device, .dram, .nvme])
        #expect(SpillwayConfiguration.embeddedDefault.tiers.contains { $0.kind == .erasureCoded })
    }

    /// The library ships no daemon: a remote or erasure-coded tier naming no servers opens only
    /// with a launcher (the CLI's), else a clear error, and nothing is left running.
    @Test func withoutALauncherATierWithNoServersIsAnError() throws {
        for kind in [TierKind.remote, .erasureCoded] {
            let configuration = SpillwayConfiguration(slotSize: 4096, tiers: [TierConfiguration(kind: kind, capacity: 4 << 20)])
            let error = #expect(throws: SpillwayError.self) { _ = try TieredStore.open(configuration) }
            guard case .invalidConfiguration(let reason)? = error else {
                Issue.record("\(kind): \(String(describing: error))")
                continue
            }
            #expect(reason.contains("names no servers") && reason.contains("spillwayd"), "\(reason)")
        }
    }

    @Test func aThousandIdleStrangersLockNobodyOut() throws {
        // Room for a thousand sockets in this process.
        var limit = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        if limit.rlim_cur < 4096 {
            limit.rlim_cur = min(4096, limit.rlim_max)
            setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
        try #require(limit.rlim_cur >= 2048, "RLIMIT_NOFILE \(limit.rlim_cur) is too low for a thousand connections")
        let daemon = try DaemonProcess(arguments: ["--max-unauthenticated", "32"])
        defer { daemon.kill9() }
        let baseline = try #require(daemon.threadCount)
        var strangers: [TCPSocket] = []
        defer { for socket in strangers { socket.close() } }
        for index in 0..<1000 {
            let socket = try TCPSocket.connect(to: daemon.endpoint, ioTimeout: 5)
            if index % 2 == 0 {
                // Half of them start a hello and never finish it.
                var bytes: [UInt8] = [0x53, 0x50, 0x57]
                try bytes.withUnsafeMutableBytes { raw in
                    var vector = iovec(iov_base: raw.baseAddress, iov_len: raw.count)
                    try withUnsafeMutablePointer(to: &vector) { try socket.send(UnsafeMutableBufferPointer(start: $0, count: 1)) }
                }
            }
            strangers.append(socket)
        }
        // Evicted strangers' threads exit asynchronously after their sockets are shut down:
        // the count must settle within the bound (quota + slack) while all 1,000 stay open.
        var threads = try #require(daemon.threadCount)
        let settled = eventually(10) {
            threads = daemon.threadCount ?? .max
            return threads <= baseline + 32 + 16
        }
        print("spillwayd threads: \(baseline) before, \(threads) with 1000 idle strangers")
        #expect(settled, "threads grew from \(baseline) to \(threads)")
        // A tenant still gets in: status and a short remote benchmark.
        let started = monotonicNanoseconds()
        let status = try runSpillway(["status", "--servers", daemon.endpoint.description, "--json"])
        let statusSeconds = Double(monotonicNanoseconds() - started) / 1e9
        #expect(status.status == 0, "\(status.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(status.stdout.utf8)) as? [String: Any])
        let stats = try #require((object["daemons"] as? [[String: Any]])?.first?["stats"] as? [String: Any])
        let errors = try #require(stats["errors"] as? [String: Any])
        #expect((errors["handshake_evictions"] as? Int ?? 0) >= 1000 - 32 - 1)
        let benchStarted = monotonicNanoseconds()
        let bench = try runSpillway(["bench", "remote", "--servers", daemon.endpoint.description, "--duration", "0.5", "--size", "2m",
                                     "--json"])
        let benchSeconds = Double(monotonicNanoseconds() - benchStarted) / 1e9
        #expect(bench.status == 0, "\(bench.stderr)")
        print("with 1000 idle strangers: status took \(statusSeconds) s, bench remote (0.5 s run) \(benchSeconds) s")
    }

    @Test func slowScrapersNeitherStallTheMetricsEndpointNorOutliveItsDeadline() throws {
        // A bare port binds loopback.
        let daemon = try DaemonProcess(arguments: ["--metrics", "0"])
        defer { daemon.kill9() }
        let port = try #require(daemon.metricsPort)
        // Two scrapers trickle a request head a byte at a time: each receive succeeds, so only
        // a total deadline ends them, and while they trickle, a real scrape must get through.
        let tricklers = (0..<2).map { _ in try? TCPSocket.connect(to: Endpoint(host: "127.0.0.1", port: port), ioTimeout: 10) }
        let stop = Locked(false)
        let closedAfter = Locked<[Double]>([])
        let threads = tricklers.map { socket in
            BackgroundThread {
                guard let socket else { return }
                let start = monotonicNanoseconds()
                var byte = UInt8(ascii: "G")
                for _ in 0..<100 {
                    if stop.withLock({ $0 }) { return }
                    var vector = iovec(iov_base: &byte, iov_len: 1)
                    let sent = withUnsafeMutablePointer(to: &vector) { (try? socket.send(UnsafeMutableBufferPointer(start: $0, count: 1))) != nil }
                    if !sent || socket.isReadable { break }
                    usleep(100_000)
                }
                closedAfter.withLock { $0.append(Double(monotonicNanoseconds() - start) / 1e9) }
            }
        }
        usleep(200_000)  // the tricklers are connected and sending (not a synchronisation: either order passes)
        let (status, body) = try daemon.scrape()
        #expect(status == "HTTP/1.1 200 OK")
        #expect(body.contains("spillwayd_slabs_lent"))
        let ended = eventually(15) { closedAfter.withLock { $0.count } == 2 }
        stop.withLock { $0 = true }
        for thread in threads { thread.join() }
        #expect(ended)
        for seconds in closedAfter.withLock({ $0 }) {
            #expect(seconds < 9, "a trickling scraper was served for \(seconds) s (deadline 2 s)")
        }
    }
}
