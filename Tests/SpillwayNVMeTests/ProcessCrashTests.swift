import Foundation
import Glibc
import SpillwayTestSupport
import Testing
@testable import SpillwayCore
@testable import SpillwayNVMe

/// Crash tests with real processes: `spillway store soak` is SIGKILLed at random moments and
/// `spillway store verify` reopens the store (warm restart) and checks every acknowledged put
/// and remove. The seed of the kill times is printed; rerun with SPILLWAY_CRASH_SEED=N.
@Suite(.serialized, .timeLimit(.minutes(5))) struct ProcessCrashTests {
    static let nvmeOnly = """
        slot-size = "4k"
        [[tier]]
        kind = "nvme"
        capacity = "4m"
        path = "PATH"
        """
    /// A small DRAM tier over NVMe: the soak's 200 keys overflow it, so pages are demoted,
    /// promoted, overwritten and removed across the two tiers while the process dies.
    static let dramOverNVMe = """
        slot-size = "4k"
        [[tier]]
        kind = "dram"
        capacity = "256k"
        [[tier]]
        kind = "nvme"
        capacity = "4m"
        path = "PATH"
        """

    @Test(arguments: [("nvme", true), ("dram-over-nvme", false)])
    func killedSoakNeverRecoversAStaleOrCorruptPage(layout: String, expectAll: Bool) throws {
        let seed = getenv("SPILLWAY_CRASH_SEED").flatMap { UInt64(String(cString: $0)) } ?? UInt64.random(in: 1...UInt64(UInt32.max))
        print("ProcessCrashTests \(layout): seed \(seed) (rerun with SPILLWAY_CRASH_SEED=\(seed))")
        var random = SeededGenerator(seed: seed)
        let spillway = try builtExecutable("spillway").path
        let base = scratchPath("crash-\(layout)")
        let config = base + ".toml"
        let ackLog = base + ".acks"
        defer { for file in [config, ackLog, ackLog + ".intents", base + ".nvme"] { unlink(file) } }
        let text = (layout == "nvme" ? Self.nvmeOnly : Self.dramOverNVMe).replacingOccurrences(of: "PATH", with: base + ".nvme")
        try text.write(toFile: config, atomically: true, encoding: .utf8)

        for run in 0..<3 {
            // The previous run's log must not count as this run's progress.
            unlink(ackLog)
            let soakSeed = random.next()
            let soak = try ChildProcess(
                executable: spillway,
                arguments: ["store", "soak", "--config", config, "--duration", "60", "--keys", "200", "--seed", "\(soakSeed)",
                            "--ack-log", ackLog, "--json"],
                scratch: base + ".soak")
            // Let it acknowledge some operations (bounded), then kill it a random moment later.
            let wanted = Int(random.next() % 3000) + 1
            let deadline = Date().addingTimeInterval(60)
            while lineCount(ackLog) < wanted && Date() < deadline && soak.wait(seconds: 0.01) == nil {}
            #expect(soak.wait(seconds: 0) == nil, "run \(run): soak exited early: \(soak.standardError)")
            usleep(UInt32(random.next() % 200_000))
            soak.kill9()
            let status = soak.wait(seconds: 20)
            try #require(status != nil, "run \(run): the killed soak was not reaped within 20 s")
            #expect(soak.wasKilled, "run \(run): soak ended on its own: \(soak.standardError)")
            let acknowledged = lineCount(ackLog)
            #expect(acknowledged >= wanted, "run \(run): only \(acknowledged) acknowledged operations")

            let verify = try ChildProcess(
                executable: spillway,
                arguments: ["store", "verify", "--config", config, "--ack-log", ackLog, "--json"] + (expectAll ? ["--expect-all"] : []),
                scratch: base + ".verify")
            try #require(verify.wait(seconds: 60) != nil, "run \(run): verify did not finish within 60 s")
            let output = verify.standardOutput
            let counts = try #require(
                (try JSONSerialization.jsonObject(with: Data(output.utf8))) as? [String: Int],
                "run \(run): verify printed '\(output)', stderr '\(verify.standardError)'")
            print("ProcessCrashTests \(layout) run \(run) (seed \(seed)): \(acknowledged) acks, verify \(output)")
            #expect(counts["checked"] ?? 0 > 0)
            #expect(counts["stale"] == 0, "run \(run), seed \(seed): \(output)")
            #expect(counts["corrupt"] == 0, "run \(run), seed \(seed): \(output)")
            #expect(counts["errors"] == 0, "run \(run), seed \(seed): \(output)")
            if expectAll { #expect(counts["absent"] == 0, "run \(run), seed \(seed): \(output)") }
            #expect(verify.exitCode == 0, "run \(run), seed \(seed): \(output) \(verify.standardError)")
        }
    }

    /// A second process (here: this one) cannot open a file a running store holds: after
    /// retrying for two seconds it gets an error naming the file and the holder's pid.
    @Test func aSecondOpenerOfARunningStoresFileIsRefusedWithTheHoldersPid() throws {
        let spillway = try builtExecutable("spillway").path
        let base = scratchPath("crash-lock")
        let config = base + ".toml"
        let ackLog = base + ".acks"
        defer { for file in [config, ackLog, ackLog + ".intents", base + ".nvme"] { unlink(file) } }
        unlink(ackLog)
        try Self.nvmeOnly.replacingOccurrences(of: "PATH", with: base + ".nvme").write(toFile: config, atomically: true, encoding: .utf8)
        let soak = try ChildProcess(
            executable: spillway,
            arguments: ["store", "soak", "--config", config, "--duration", "60", "--keys", "50", "--ack-log", ackLog],
            scratch: base + ".soak")
        let deadline = Date().addingTimeInterval(60)
        while lineCount(ackLog) < 1 && Date() < deadline && soak.wait(seconds: 0.01) == nil {}
        try #require(lineCount(ackLog) >= 1, "soak never acknowledged anything: \(soak.standardError)")
        #expect {
            _ = try NVMeTier(NVMeTierConfiguration(path: base + ".nvme", slotSize: 4096, capacitySlots: 1024))
        } throws: { error in
            guard case SpillwayError.invalidConfiguration(let message) = error else { return false }
            return message.contains(base + ".nvme") && message.contains("pid \(soak.pid)")
        }
        soak.kill9()
        try #require(soak.wait(seconds: 20) != nil)
    }

    private func lineCount(_ path: String) -> Int {
        guard let data = FileManager.default.contents(atPath: path) else { return 0 }
        return data.reduce(0) { $0 + ($1 == 0x0A ? 1 : 0) }
    }
}

/// xorshift64*: reproducible kill times from a printed seed.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed | 1 }
    mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 0x2545_F491_4F6C_DD1D
    }
}
