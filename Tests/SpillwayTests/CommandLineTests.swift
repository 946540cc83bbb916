import Atomics
import Foundation
import SpillwayTestSupport
import Logging
import Testing
@testable import Spillway
@testable import SpillwayServer
@testable import SpillwayBench

func checkBenchSchema(_ object: [String: Any], tier: String) {
    #expect(object["tier"] as? String == tier)
    #expect(object["pattern"] is String)
    for key in ["block_size", "queue_depth", "ops"] { #expect(object[key] is Int, "\(key) must be an integer") }
    for key in ["iops", "bytes_per_s"] { #expect(object[key] is Double || object[key] is Int, "\(key) must be a number") }
    let latency = object["latency_ns"] as? [String: Any]
    for key in ["p50", "p99", "p999", "max"] { #expect(latency?[key] is Int, "latency_ns.\(key) must be an integer") }
    #expect((object["ops"] as? Int ?? 0) > 0)
    #expect(object["errors"] as? Int == 0)
}

@Suite(.serialized, .timeLimit(.minutes(10))) struct CommandLineTests {
    @Test(arguments: ["dram", "device"])
    func benchPrintsExactlyOneJSONObject(tier: String) throws {
        let result = try runSpillway(["bench", tier, "--json", "--duration", "0.2", "--size", "1m", "--pattern", "randwrite", "--queue-depth", "4"])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.hasSuffix("}\n"))
        #expect(result.stdout.filter { $0 == "\n" }.count == 1)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        checkBenchSchema(object, tier: tier)
        #expect(object["block_size"] as? Int == 4096)
        #expect(object["queue_depth"] as? Int == 4)
    }

    @Test func summaryRunsEveryTier() throws {
        let path = NSTemporaryDirectory() + "spillway-summary-\(getpid()).toml"
        try """
        size = "1m"
        [[tier]]
        kind = "device"
        capacity = "1m"
        [[tier]]
        kind = "dram"
        capacity = "4m"
        """.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let result = try runSpillway(["bench", "--json", "--duration", "0.1", "--config", path])
        #expect(result.status == 0, "\(result.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        let rows = try #require(object["results"] as? [[String: Any]])
        #expect(rows.map { $0["tier"] as? String } == ["device", "device", "dram", "dram", "tiered"])
        for row in rows { checkBenchSchema(row, tier: row["tier"] as? String ?? "") }
        let tiered = try #require(rows.last?["tiers"] as? [[String: Any]])
        #expect((tiered.first?["promotions"] as? Int ?? 0) > 0, "the tiered run exercises promotion")
    }

    @Test func benchReportsThePolicyInUse() throws {
        let path = NSTemporaryDirectory() + "spillway-bench-policy-\(getpid()).toml"
        try """
        policy = "lru"
        size = "1m"
        [[tier]]
        kind = "device"
        capacity = "1m"
        [[tier]]
        kind = "dram"
        capacity = "4m"
        """.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let table = try runSpillway(["bench", "tiered", "--duration", "0.1", "--config", path])
        #expect(table.status == 0, "\(table.stderr)")
        #expect(table.stdout.contains("policy: lru\n"), "\(table.stdout)")
        let json = try runSpillway(["bench", "tiered", "--json", "--duration", "0.1", "--config", path])
        let object = try #require(try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any])
        #expect(object["policy"] as? String == "lru")
        // A single-tier run's store uses the default policy.
        let single = try runSpillway(["bench", "dram", "--json", "--duration", "0.1", "--size", "1m"])
        let row = try #require(try JSONSerialization.jsonObject(with: Data(single.stdout.utf8)) as? [String: Any])
        #expect(row["policy"] as? String == "prefix-lru")
        // --policy picks it for any run (and wins over the file).
        let chosen = try runSpillway(["bench", "dram", "--json", "--duration", "0.1", "--size", "1m", "--policy", "lru"])
        let chosenRow = try #require(try JSONSerialization.jsonObject(with: Data(chosen.stdout.utf8)) as? [String: Any])
        #expect(chosenRow["policy"] as? String == "lru")
        let overridden = try runSpillway(["bench", "tiered", "--json", "--duration", "0.1", "--config", path, "--policy", "class-aware-lru"])
        let overriddenRow = try #require(try JSONSerialization.jsonObject(with: Data(overridden.stdout.utf8)) as? [String: Any])
        #expect(overriddenRow["policy"] as? String == "class-aware-lru")
        let unknown = try runSpillway(["bench", "dram", "--duration", "0.1", "--policy", "arc"])
        #expect(unknown.status != 0)
        #expect(unknown.stderr.contains("unknown policy 'arc' (available: prefix-lru, class-aware-lru, lru, s3fifo, s3fifo-prefix, tinylfu)"), "\(unknown.stderr)")
    }

    @Test func configFileSuppliesOptionsAndCommandLineWins() throws {
        let path = NSTemporaryDirectory() + "spillway-bench-\(getpid()).toml"
        try """
        pattern = "randwrite"
        block-size = "8k"
        duration = 0.1
        size = "1m"
        """.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let result = try runSpillway(["bench", "dram", "--json", "--config", path, "--block-size", "16k"])
        #expect(result.status == 0, "\(result.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        #expect(object["pattern"] as? String == "randwrite")
        #expect(object["block_size"] as? Int == 16384)
    }

    @Test(arguments: [
        ["bench", "dram", "--size", "12q"],
        ["bench", "dram", "--block-size", "3000", "--duration", "0.1"],
        ["bench", "tape", "--duration", "0.1"],
        ["bench", "dram", "--config", "/nonexistent.toml"],
        ["bench", "dram", "--queue-depth", "0"],
    ])
    func failuresAreOneLineOnStandardError(arguments: [String]) throws {
        let result = try runSpillway(arguments)
        #expect(result.status != 0)
        #expect(result.stdout.isEmpty)
        #expect(result.stderr.filter { $0 == "\n" }.count == 1, "stderr was: \(result.stderr)")
        #expect(result.stderr.hasPrefix("spillway: error: "))
    }

    @Test func benchRemoteRunsAgainstExternalAndInProcessDaemons() throws {
        let tokenPath = NSTemporaryDirectory() + "spillway-bench-remote-\(getpid()).tokens"
        defer { unlink(tokenPath) }
        try "bench bench-token-0123456789\n".write(toFile: tokenPath, atomically: true, encoding: .utf8)
        chmod(tokenPath, 0o600)
        let server = try RemoteMemoryServer(DaemonConfiguration(listen: Endpoint(host: "127.0.0.1", port: 0), capacity: 64 << 20,
                                                                slabSize: 1 << 20, tokens: try TokenFile.load(tokenPath, logger: Logger(label: "test"))))
        try server.start()
        defer { server.shutdown(drain: 0) }
        let external = try runSpillway(["bench", "remote", "--servers", "127.0.0.1:\(server.port)", "--token-file", tokenPath, "--json",
                                        "--duration", "0.3", "--size", "2m", "--queue-depth", "8"])
        #expect(external.status == 0, "\(external.stderr)")
        checkBenchSchema(try #require(try JSONSerialization.jsonObject(with: Data(external.stdout.utf8)) as? [String: Any]), tier: "remote")
        #expect(server.counters.reads.load(ordering: .relaxed) > 0, "the external daemon served the reads")
        let embedded = try runSpillway(["bench", "remote", "--json", "--duration", "0.3", "--size", "2m", "--pattern", "randwrite"])
        #expect(embedded.status == 0, "\(embedded.stderr)")
        checkBenchSchema(try #require(try JSONSerialization.jsonObject(with: Data(embedded.stdout.utf8)) as? [String: Any]), tier: "remote")
        // A wrong token is a clear one-line error, not a crash.
        try "bench wrong-token-0123456789\n".write(toFile: tokenPath, atomically: true, encoding: .utf8)
        let refused = try runSpillway(["bench", "remote", "--servers", "127.0.0.1:\(server.port)", "--token-file", tokenPath,
                                       "--duration", "0.2", "--size", "1m"])
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("refused the credentials"), "\(refused.stderr)")
    }

    @Test func statusReportsEachDaemonAndFailsOnAnUnreachableOne() throws {
        // No --token-file on either side: spillwayd generates one, status finds it by address.
        let daemon = try DaemonProcess()
        let ok = try runSpillway(["status", "--servers", "127.0.0.1:\(daemon.port)", "--json"])
        #expect(ok.status == 0, "\(ok.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(ok.stdout.utf8)) as? [String: Any])
        let daemons = try #require(object["daemons"] as? [[String: Any]])
        #expect(daemons.count == 1 && daemons[0]["reachable"] as? Bool == true)
        let stats = try #require(daemons[0]["stats"] as? [String: Any])
        #expect(stats["capacity"] as? Int == 32 << 20)
        #expect(stats["slabs_free"] as? Int == 32)
        #expect(stats["transport"] as? String == "tcp")
        #expect(stats["version"] is String && stats["ops"] is [String: Any] && stats["errors"] is [String: Any])
        // A dead address: reported, and the exit status says so.
        let listener = try TCPSocket.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        let deadPort = listener.localPort
        listener.close()
        let mixed = try runSpillway(["status", "--servers", "127.0.0.1:\(daemon.port),127.0.0.1:\(deadPort)"])
        #expect(mixed.status == 1)
        #expect(mixed.stdout.contains("unreachable"))
        #expect(mixed.stdout.contains("tcp"))
    }

    @Test func poolSoakSurvivesKillNineOfRDaemons() throws {
        // Six spillwayd processes; two are SIGKILLed while the soak runs, and the test proves
        // the soak was still running at each kill.
        let daemons = try (0..<6).map { _ in try DaemonProcess() }
        let soak = Process()
        soak.executableURL = try builtExecutable("spillway")
        soak.arguments = ["pool", "soak", "--servers", daemons.map(\.endpoint.description).joined(separator: ","), "--duration", "4",
                          "--size", "2m", "--json"]
        let out = Pipe()
        let err = Pipe()
        soak.standardOutput = out
        soak.standardError = err
        try soak.run()
        let killedMidRun = Locked<[Bool]>([])
        let killer = BackgroundThread {
            for (victim, delay) in [(1, 1_500_000), (4, 1_000_000)] {
                usleep(UInt32(delay))  // when to strike, not a synchronisation
                let running = soak.isRunning
                daemons[victim].kill9()
                killedMidRun.withLock { $0.append(running && soak.isRunning) }
            }
        }
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        soak.waitUntilExit()
        killer.join()
        #expect(killedMidRun.withLock { $0 } == [true, true], "both kills landed while the soak ran")
        let result = (status: soak.terminationStatus, stdout: String(decoding: stdout, as: UTF8.self),
                      stderr: String(decoding: stderr, as: UTF8.self))
        #expect(result.status == 0, "\(result.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        #expect(object["lost"] as? Int == 0)
        #expect(object["corrupt"] as? Int == 0)
        let reads = try #require(object["reads"] as? Int)
        #expect(reads > 0 && object["verified"] as? Int == reads)
        #expect((object["writes"] as? Int ?? 0) >= 512, "every page was written at least once")
        let latency = try #require(object["latency_ns"] as? [String: Any])
        for state in ["healthy", "degraded"] {
            let entry = try #require(latency[state] as? [String: Any])
            #expect(entry["p50"] is Int && entry["p99"] is Int)
        }
        // Two members died: reads after that are degraded (a member unavailable).
        #expect((object["degraded_reads"] as? Int ?? 0) > 0)
        #expect(object["decoded_reads"] is Int)
    }

    /// On a healthy pool late binding decodes many reads (a parity split answers first), but
    /// none is degraded: the soak used to report every decode as a degraded read.
    @Test func poolSoakOnAHealthyPoolReportsNoDegradedReads() throws {
        let result = try runSpillway(["pool", "soak", "--duration", "2", "--size", "1m", "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        let reads = try #require(object["reads"] as? Int)
        let decoded = try #require(object["decoded_reads"] as? Int)
        #expect(reads > 0 && (0...reads).contains(decoded))
        #expect(object["degraded_reads"] as? Int == 0, "decoded \(decoded) of \(reads) reads, none with a member unavailable")
        let latency = try #require(object["latency_ns"] as? [String: Any])
        let degraded = try #require(latency["degraded"] as? [String: Any])
        #expect(degraded["p50"] as? Int == 0 && degraded["p99"] as? Int == 0, "no read was timed as degraded")
    }

    @Test func helpExitsZero() throws {
        let result = try runSpillway(["bench", "--help"])
        #expect(result.status == 0)
        #expect(result.stdout.contains("--block-size"))
    }
}

@Suite struct BenchEngineTests {
    @Test func resultJSONHasTheSchemaEvenWhenEmpty() throws {
        let result = BenchResult(tier: "dram", pattern: .read, blockSize: 4096, queueDepth: 1, ops: 0, seconds: 0, p50: 0, p99: 0,
                                 p999: 0, max: 0, workingSetBytes: 4096, seed: 1, latencySampleEvery: 16, errors: 0, verifiedPages: 0)
        let text = result.json.serialized()
        #expect(text.contains("\"latency_ns\": {\"p50\": 0, \"p99\": 0, \"p999\": 0, \"max\": 0}"))
        #expect(text.contains("\"iops\": 0.0"))
    }

    @Test func sequentialAndRandomRunsVerifyContent() throws {
        for pattern in BenchPattern.allCases {
            let options = BenchOptions(target: "dram", pattern: pattern, blockSize: 4096, queueDepth: 2, durationSeconds: 0.05, size: 1 << 20)
            let result = try BenchRunner.run(options)
            #expect(result.ops > 0 && result.errors == 0)
            #expect(result.verifiedPages == 256)
        }
    }

    @Test func optionsAreValidated() {
        #expect(throws: SpillwayError.self) { try BenchOptions(target: "dram", blockSize: 1000).validate() }
        #expect(throws: SpillwayError.self) { try BenchOptions(target: "dram", queueDepth: 0).validate() }
        #expect(throws: SpillwayError.self) { try BenchOptions(target: "dram", durationSeconds: -1).validate() }
        #expect(throws: SpillwayError.self) { try BenchOptions(target: "dram", blockSize: 8192, size: 4096).validate() }
    }
}
