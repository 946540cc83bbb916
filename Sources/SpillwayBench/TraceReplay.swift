import Foundation
import Spillway
import SpillwayServer
import SpillwayPolicy

/// `spillway bench kv-trace`: replays a Mooncake-format KV trace (one JSON object per line:
/// `timestamp`, `input_length`, `output_length`, `hash_ids` = one id per 512-token prefix
/// block) through a `KVPool` on a tiered store, as a prefix-caching engine would: per request,
/// `lookup` the prompt's block hashes, `load` the matched prefix, `store` the rest.
///
/// The trace's ids are already chained prefix hashes (equal id = equal prefix up to that
/// block), so they are used as block hashes directly. Blocks are scaled down to `blockBytes`
/// (one whole-block page each) so the trace's ~44k unique blocks fit a laptop-sized store;
/// what is measured is the hit ratio the hierarchy achieves and what serving it costs.
public enum TraceReplay {
    public struct Options: Sendable {
        public var trace: String
        public var limit: Int?
        public var blockBytes = 4096
        public init(trace: String) { self.trace = trace }
    }

    /// The trace configured for commands given no `--trace`: `$SPILLWAY_TRACE`, if set and not
    /// empty. No path is built in: a library must not depend on where one machine (or one
    /// checkout layout) keeps its data, so without either the commands ask for `--trace`.
    public static func configuredTrace(environment: [String: String] = ProcessInfo.processInfo.environment) -> String? {
        guard let path = environment["SPILLWAY_TRACE"], !path.isEmpty else { return nil }
        return path
    }

    /// What a command says when it has no trace.
    public static let missingTraceReason = "needs --trace PATH (a Mooncake-format .jsonl), or SPILLWAY_TRACE set to one"

    struct Request {
        var hashIDs: [UInt64]
    }

    /// One parser for every trace consumer: `BlockTrace` (SpillwayPolicy) also feeds the policy
    /// simulator, so both agree on what a malformed line is and which line it was.
    static func load(_ path: String, limit: Int?) throws(SpillwayError) -> [Request] {
        let trace = try BlockTrace.load(path, limit: limit)
        return trace.requests.map { Request(hashIDs: Array(trace.hashIDs(of: $0))) }
    }

    public static func run(_ options: Options, configuration: SpillwayConfiguration) throws(SpillwayError) -> JSONValue {
        let requests = try load(options.trace, limit: options.limit)
        var configuration = configuration
        configuration.slotSize = max(4096, configuration.slotSize)
        configuration.maxPageSize = max(configuration.maxPageSize, options.blockBytes)
        let store = try TieredStore.open(configuration, daemons: InProcessDaemons())
        defer { store.close() }
        // tokens 512 × 1 layer × 1 head × head dim (blockBytes / 2048) × fp16 = blockBytes.
        let geometry = KVBlockGeometry(tokensPerBlock: 512, layers: 1, kvHeads: 1, headDim: max(1, options.blockBytes / 2048),
                                       dtypeSize: 2, layout: .wholeBlock)
        let pool = try KVPool(store: store, geometry: geometry, modelID: "mooncake-trace")
        let block = geometry.blockBytes
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: block * 128, alignment: 4096)
        defer { buffer.deallocate() }
        var seen = Set<UInt64>()
        var references = 0
        var anyHits = 0
        var prefixHits = 0
        var stored = 0
        var loadErrors = 0
        var storeErrors = 0
        var corrupt = 0
        let started = monotonicNanoseconds()
        for request in requests {
            let hashes = request.hashIDs.map { BlockHash(high: 0x4D4F_4F4E, low: $0) }  // "MOON"
            references += hashes.count
            for id in request.hashIDs where seen.contains(id) { anyHits += 1 }
            let matched = pool.lookup(hashes)
            prefixHits += matched
            // Load the matched prefix in chunks of 128 blocks and check each block's content.
            var start = 0
            while start < matched {
                let count = min(128, matched - start)
                let buffers = (0..<count).map { UnsafeMutableRawBufferPointer(start: buffer + $0 * block, count: block) }
                let result = pool.load(Array(hashes[start..<(start + count)]), into: buffers)
                loadErrors += count - result.succeeded
                for index in 0..<count where result.errors[index] == nil {
                    if buffer.load(fromByteOffset: index * block, as: UInt64.self) != hashes[start + index].low { corrupt += 1 }
                }
                start += count
            }
            // Store the blocks past the match (their content: the id, then zeros).
            start = matched
            while start < hashes.count {
                let count = min(128, hashes.count - start)
                for index in 0..<count {
                    memset(buffer + index * block, 0, block)
                    buffer.storeBytes(of: hashes[start + index].low, toByteOffset: index * block, as: UInt64.self)
                }
                let buffers = (0..<count).map { UnsafeRawBufferPointer(start: buffer + $0 * block, count: block) }
                let result = pool.store(Array(hashes[start..<(start + count)]), blocks: buffers)
                stored += result.succeeded
                storeErrors += count - result.succeeded
                start += count
            }
            for id in request.hashIDs { seen.insert(id) }
        }
        let seconds = Double(monotonicNanoseconds() &- started) / 1e9
        let stats = store.stats()
        return .object([
            ("tier", .string("kv-trace")), ("trace", .string(options.trace)), ("requests", .int(requests.count)),
            ("block_references", .int(references)), ("unique_blocks", .int(seen.count)), ("block_bytes", .int(block)),
            ("prefix_hit_ratio", .double(references == 0 ? 0 : Double(prefixHits) / Double(references))),
            ("infinite_cache_hit_ratio", .double(references == 0 ? 0 : Double(anyHits) / Double(references))),
            ("blocks_loaded", .int(prefixHits - loadErrors)), ("blocks_stored", .int(stored)),
            ("load_errors", .int(loadErrors)), ("store_errors", .int(storeErrors)), ("corrupt", .int(corrupt)),
            ("duration_s", .double(seconds)), ("goodput", .double(stats.goodput)),
            ("tiers", .array(stats.tiers.map { tier in
                .object([("name", .string(tier.name)), ("hits", .int(tier.hits)), ("pages", .int(tier.pages)),
                         ("evictions", .int(tier.evictions)), ("stall_ns", .int(tier.stallNanoseconds))])
            })),
        ])
    }
}
