import Foundation
import Glibc
import SpillwayCluster
import SpillwayCore
import SpillwayTestSupport
import Testing

// Cluster mode end to end through the executables: `spillwayd --etcd … --cluster …` registers
// under a lease, `spillway cluster status` lists what etcd holds, `bench remote` finds its
// daemons there, a SIGTERM withdraws a daemon at once and a SIGKILL lets its lease expire.

/// `spillway cluster status --json`'s daemons: address → (state, failure domain).
private func clusterStatus(_ etcd: String, _ cluster: String) throws -> [String: (state: String, domain: String)] {
    let result = try runSpillway(["cluster", "status", "--etcd", etcd, "--cluster", cluster, "--json"])
    guard result.status == 0 else { throw SpillwayError.invalidConfiguration("cluster status failed: \(result.stderr)") }
    let json = try JSONValue.parse(Array(result.stdout.utf8))
    var daemons: [String: (state: String, domain: String)] = [:]
    for daemon in json["daemons"]?.arrayValue ?? [] {
        daemons[daemon["address"]?.stringValue ?? "?"] = (daemon["state"]?.stringValue ?? "?", daemon["failure_domain"]?.stringValue ?? "?")
    }
    return daemons
}

@Suite(.serialized, .timeLimit(.minutes(3)), .enabled(if: EtcdServer.binary != nil, Comment(rawValue: EtcdServer.missingReason)))
struct ClusterCommandTests {
    @Test func daemonsRegisterAreListedFoundByClientsAndLeave() async throws {
        let etcd = try await EtcdServer("cli")
        defer { etcd.stop() }
        let tokens = try ScratchDirectory.file("cluster-cli-tokens-\(getpid())")
        try "bench bench-token-0123456789abcdef\n".write(toFile: tokens, atomically: true, encoding: .utf8)
        chmod(tokens, 0o600)
        defer { unlink(tokens) }
        let daemons = try (1...3).map { index in
            try DaemonProcess(arguments: ["--token-file", tokens, "--etcd", etcd.endpoint, "--cluster", "cli",
                                          "--failure-domain", "rack\(index)", "--etcd-lease-ttl", "2"])
        }
        defer { for daemon in daemons { daemon.kill9() } }
        // Registered before each daemon announced its port.
        let listed = try clusterStatus(etcd.endpoint, "cli")
        #expect(listed.count == 3)
        for (index, daemon) in daemons.enumerated() {
            let entry = listed["127.0.0.1:\(daemon.port)"]
            #expect(entry?.state == "live" && entry?.domain == "rack\(index + 1)", "\(listed)")
        }
        // A client finds them through the registry.
        let bench = try runSpillway(["bench", "remote", "--etcd", etcd.endpoint, "--cluster", "cli", "--token-file", tokens,
                                     "--size", "4m", "--duration", "0.3", "--queue-depth", "4", "--json"])
        #expect(bench.status == 0, "\(bench.stderr)")
        let ops = try JSONValue.parse(Array(bench.stdout.utf8))["ops"]?.intValue ?? 0
        #expect(ops > 0)
        // SIGTERM: withdrawn before the daemon drains (not after the lease).
        daemons[0].kill(SIGTERM)
        #expect(daemons[0].wait(seconds: 15) == 0)
        #expect(try clusterStatus(etcd.endpoint, "cli")["127.0.0.1:\(daemons[0].port)"] == nil)
        // SIGKILL: gone once its 2 s lease expires (bounded wait).
        daemons[1].kill9()
        let expired = try eventually(10) { try clusterStatus(etcd.endpoint, "cli")["127.0.0.1:\(daemons[1].port)"] == nil }
        #expect(expired)
        #expect(try clusterStatus(etcd.endpoint, "cli").count == 1)
    }

    @Test func aDaemonThatCannotRegisterSaysWhyAndExits() throws {
        let port = try freePort()
        let daemon = Process()
        daemon.executableURL = try builtExecutable("spillwayd")
        daemon.arguments = ["--listen", "127.0.0.1:0", "--capacity", "32m", "--slab-size", "1m", "--log-level", "error",
                            "--etcd", "http://127.0.0.1:\(port)", "--cluster", "nowhere"]
        let errors = Pipe()
        daemon.standardError = errors
        daemon.standardOutput = Pipe()
        try daemon.run()
        let text = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        daemon.waitUntilExit()
        #expect(daemon.terminationStatus != 0)
        #expect(text.contains("cannot register in cluster 'nowhere'") && text.contains("127.0.0.1:\(port)"), "\(text)")
    }

    @Test func halfAClusterOptionIsRefused() throws {
        let result = try runSpillway(["cluster", "status", "--etcd", "http://127.0.0.1:1"])
        #expect(result.status != 0)
        #expect(result.stderr.contains("--etcd needs --cluster"), "\(result.stderr)")
    }
}
