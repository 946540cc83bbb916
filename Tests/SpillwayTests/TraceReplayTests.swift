import Foundation
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

    @Test func theMooncakeTraceReplaysWithoutErrors() throws {
        guard let trace = TraceReplay.defaultTrace() else {
            print("skipped: the Mooncake trace is not in ../shared/traces/ on this machine")
            return
        }
        var options = TraceReplay.Options(trace: trace)
        options.limit = 600
        guard case .object(let fields) = try TraceReplay.run(options, configuration: dramOnly) else { return }
        let values = Dictionary(fields, uniquingKeysWith: { a, _ in a })
        #expect(values["requests"] == .int(600))
        #expect(values["load_errors"] == .int(0) && values["store_errors"] == .int(0) && values["corrupt"] == .int(0))
        guard case .int(let loaded) = values["blocks_loaded"] else { return }
        #expect(loaded > 0)
    }

    @Test func aMalformedTraceIsAClearError() throws {
        let path = NSTemporaryDirectory() + "spillway-trace-bad-\(getpid()).jsonl"
        defer { unlink(path) }
        try "{\"timestamp\": 0}\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(throws: SpillwayError.self) { _ = try TraceReplay.run(TraceReplay.Options(trace: path), configuration: dramOnly) }
    }
}
