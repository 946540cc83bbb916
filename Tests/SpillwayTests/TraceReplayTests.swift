import Foundation
import SpillwayTestSupport
import Testing
@testable import Spillway
@testable import SpillwayBench

@Suite struct TraceReplayTests {
    let dramOnly = SpillwayConfiguration(slotSize: 4096, maxPageSize: 4096, tiers: [TierConfiguration(kind: .dram, capacity: 64 << 20)])

    @Test func prefixSharingRequestsHitTheirCommonBlocks() throws {
        let path = NSTemporaryDirectory() + "spillway-trace-\(getpid()).jsonl"
        defer { unlink(path) }
        try """
        {"timestamp": 0, "input_length": 1536, "output_length": 1, "hash_ids": [0, 1, 2]}
        {"timestamp": 5, "input_length": 1536, "output_length": 1, "hash_ids": [0, 1, 3]}
        {"timestamp": 9, "input_length": 400, "output_length": 1, "hash_ids": [4]}
        {"timestamp": 9, "input_length": 1024, "output_length": 1, "hash_ids": [5, 1]}
        """.write(toFile: path, atomically: true, encoding: .utf8)
        let result = try TraceReplay.run(TraceReplay.Options(trace: path), configuration: dramOnly)
        guard case .object(let fields) = result else { Issue.record("not an object"); return }
        let values = Dictionary(fields, uniquingKeysWith: { a, _ in a })
        #expect(values["block_references"] == .int(9))
        #expect(values["blocks_loaded"] == .int(2), "the second request reuses blocks 0 and 1")
        // Block 1 of the last request was seen before but not as a prefix: it does not count.
        #expect(values["prefix_hit_ratio"] == .double(2.0 / 9.0))
        #expect(values["infinite_cache_hit_ratio"] == .double(3.0 / 9.0))
        #expect(values["load_errors"] == .int(0) && values["corrupt"] == .int(0))
    }

    /// The project's data lives in `shared/` beside the checkout (the tests' working directory).
    static let sharedTrace = "../shared/traces/mooncake_synthetic_trace.jsonl"

    @Test(.enabled(if: FileManager.default.fileExists(atPath: TraceReplayTests.sharedTrace),
                   "the Mooncake trace is not at ../shared/traces/mooncake_synthetic_trace.jsonl from the working directory"))
    func theMooncakeTraceReplaysWithoutErrors() throws {
        let trace = Self.sharedTrace
        var options = TraceReplay.Options(trace: trace)
        options.limit = 600
        let result = try TraceReplay.run(options, configuration: dramOnly)
        guard case .object(let fields) = result else {
            Issue.record("the replay's result is not an object: \(result)")
            return
        }
        let values = Dictionary(fields, uniquingKeysWith: { a, _ in a })
        #expect(values["requests"] == .int(600))
        #expect(values["load_errors"] == .int(0) && values["store_errors"] == .int(0) && values["corrupt"] == .int(0))
        guard case .int(let loaded) = try #require(values["blocks_loaded"]) else {
            Issue.record("blocks_loaded is not an integer: \(String(describing: values["blocks_loaded"]))")
            return
        }
        #expect(loaded > 0)
    }

    /// No trace path is built into the library: only `$SPILLWAY_TRACE` (configuration) or
    /// `--trace`. Even with the project's shared trace beside the working directory, commands
    /// given neither ask for one instead of reading it.
    @Test func aTraceComesFromConfigurationOnly() throws {
        #expect(TraceReplay.configuredTrace(environment: [:]) == nil)
        #expect(TraceReplay.configuredTrace(environment: ["SPILLWAY_TRACE": ""]) == nil)
        #expect(TraceReplay.configuredTrace(environment: ["SPILLWAY_TRACE": "/data/t.jsonl"]) == "/data/t.jsonl")
        let result = try runSpillway(["bench", "kv-trace", "--limit", "1"], removingEnvironment: ["SPILLWAY_TRACE"])
        #expect(result.status != 0)
        #expect(result.stderr.contains("needs --trace PATH"), "\(result.stderr)")
    }

    @Test func aMalformedTraceIsAClearError() throws {
        let path = NSTemporaryDirectory() + "spillway-trace-bad-\(getpid()).jsonl"
        defer { unlink(path) }
        try "{\"timestamp\": 0}\n".write(toFile: path, atomically: true, encoding: .utf8)
        let error = #expect(throws: SpillwayError.self) { _ = try TraceReplay.run(TraceReplay.Options(trace: path), configuration: dramOnly) }
        guard case .invalidArgument(let reason) = error else {
            Issue.record("expected invalidArgument, got \(String(describing: error))")
            return
        }
        #expect(reason.contains(":1: not a trace record (needs hash_ids)"), "\(reason)")
    }
}
