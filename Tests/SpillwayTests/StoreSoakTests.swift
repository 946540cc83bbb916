import Foundation
import Glibc
import SpillwayBench
import SpillwayTestSupport
import Testing
@testable import Spillway

/// `spillway store soak` / `verify`: the ack log, the classification rules, and the CLI's
/// contract (JSON, exit codes, errors on stderr). Kill tests are ProcessCrashTests.
@Suite(.timeLimit(.minutes(3))) struct StoreSoakTests {
    @Test func pagesVerifyAsTheirVersionAndNothingElse() {
        let page = StoreSoak.page(key: 7, version: 3, limit: 4096)
        #expect(StoreSoak.version(of: page, key: 7, limit: 4096) == 3)
        #expect(StoreSoak.version(of: page, key: 8, limit: 4096) == nil, "another key's page is corrupt")
        var flipped = page
        flipped[flipped.count - 1] ^= 1
        #expect(StoreSoak.version(of: flipped, key: 7, limit: 4096) == nil)
        #expect(StoreSoak.version(of: Array(page.dropLast()), key: 7, limit: 4096) == nil)
    }

    @Test func theAckLogKeepsTheLastOperationAndIgnoresAnIncompleteLastLine() throws {
        let log = "put 1 1\nput 2 1\nput 1 2\nremove 2\nput 3 1\nremove 1\nput 1 3\nput 4 1\nput 4 2"
        let last = try StoreSoak.parseAckLog(log)
        #expect(last == [1: .put(version: 3), 2: .remove(removed: 1), 3: .put(version: 1), 4: .put(version: 1)])
        #expect(throws: SpillwayError.invalidArgument("ack log line 2 is malformed: 'pot 1 2'")) {
            _ = try StoreSoak.parseAckLog("put 1 1\npot 1 2\n")
        }
        #expect(throws: SpillwayError.invalidArgument("ack log line 2: version 1 of key 1 after version 2")) {
            _ = try StoreSoak.parseAckLog("put 1 2\nput 1 1\n")
        }
    }

    @Test func classificationFollowsTheLastAcknowledgedOperation() {
        func classify(_ operation: StoreSoak.LastOperation, _ read: UInt64??) -> StoreSoak.VerifyResult {
            var result = StoreSoak.VerifyResult()
            StoreSoak.classify(operation, read: read, into: &result)
            return result
        }
        #expect(classify(.put(version: 5), .some(5)).present == 1)
        #expect(classify(.put(version: 5), .some(6)).present == 1, "a newer put was in flight")
        #expect(classify(.put(version: 5), .some(4)).stale == 1)
        #expect(classify(.put(version: 5), nil).absent == 1)
        #expect(classify(.put(version: 5), .some(nil)).corrupt == 1)
        #expect(classify(.remove(removed: 5), nil).present == 1)
        #expect(classify(.remove(removed: 5), .some(6)).present == 1)
        #expect(classify(.remove(removed: 5), .some(5)).stale == 1)
        #expect(classify(.remove(removed: 5), .some(2)).stale == 1)
    }

    /// A clean run: soak exits 0 with JSON, verify finds every key present with --expect-all;
    /// a malformed log is an error on stderr (even with --json) and a non-zero exit.
    @Test func soakThenVerifyOnAnNVMeOnlyStore() throws {
        let base = "\(try ScratchDirectory.path())/spillway-soak-cli-\(getpid())"
        defer { for file in [base + ".toml", base + ".acks", base + ".acks.intents", base + ".nvme", base + ".bad"] { unlink(file) } }
        try """
            slot-size = "4k"
            [[tier]]
            kind = "nvme"
            capacity = "2m"
            path = "\(base).nvme"
            """.write(toFile: base + ".toml", atomically: true, encoding: .utf8)
        let soak = try runSpillway(["store", "soak", "--config", base + ".toml", "--duration", "1", "--keys", "50",
                                    "--ack-log", base + ".acks", "--json"])
        #expect(soak.status == 0, "\(soak.stderr)")
        let soakJSON = try #require(try JSONSerialization.jsonObject(with: Data(soak.stdout.utf8)) as? [String: Int])
        #expect(soakJSON["puts"] ?? 0 > 0 && soakJSON["removes"] ?? 0 > 0 && soakJSON["gets"] ?? 0 > 0)
        #expect(soakJSON["stale"] == 0 && soakJSON["corrupt"] == 0)
        let verify = try runSpillway(["store", "verify", "--config", base + ".toml", "--ack-log", base + ".acks", "--json", "--expect-all"])
        #expect(verify.status == 0, "\(verify.stdout) \(verify.stderr)")
        let counts = try #require(try JSONSerialization.jsonObject(with: Data(verify.stdout.utf8)) as? [String: Int])
        #expect(counts["checked"] == 50 && counts["present"] == 50, "\(counts)")

        try "put 1 1\nbogus\n".write(toFile: base + ".bad", atomically: true, encoding: .utf8)
        let bad = try runSpillway(["store", "verify", "--config", base + ".toml", "--ack-log", base + ".bad", "--json"])
        #expect(bad.status != 0)
        #expect(bad.stdout.isEmpty)
        #expect(bad.stderr.contains("ack log line 2 is malformed"))
    }
}

@Suite struct NVMeConfigurationTests {
    @Test func durabilityIsATierKey() throws {
        let configuration = try SpillwayConfiguration(toml: """
            [[tier]]
            kind = "nvme"
            capacity = "1m"
            durability = "power"
            """)
        #expect(configuration.tiers[0].durability == .power)
        #expect(throws: SpillwayError.invalidConfiguration("tier 'nvme': durability 'fsync' (process or power)")) {
            _ = try SpillwayConfiguration(toml: "[[tier]]\nkind = \"nvme\"\ncapacity = \"1m\"\ndurability = \"fsync\"\n")
        }
    }

    /// The default NVMe file is per user and is not the benchmark's scratch file (a library
    /// store used to recover a benchmark run's pages from a shared /tmp file).
    @Test func theDefaultNVMeFileIsPerUserAndNotTheBenchmarks() throws {
        let tier = TierConfiguration(kind: .nvme, capacity: 1 << 20)
        #expect(tier.resolvedPath == "\(NVMeTier.defaultDirectory)/nvme.nvme")
        #expect(NVMeTier.defaultDirectory.hasSuffix("/spillway") || NVMeTier.defaultDirectory.hasSuffix("/spillway-\(getuid())"))
        #expect(!tier.resolvedPath.hasPrefix("/tmp/"))
        var bench = SpillwayConfiguration.embeddedDefault
        try bench.useBenchmarkScratchFiles()
        for nvme in bench.tiers where nvme.kind == .nvme {
            #expect(nvme.reformat)
            #expect(nvme.resolvedPath != tier.resolvedPath)
        }
    }
}
