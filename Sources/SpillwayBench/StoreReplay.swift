import Foundation
import Spillway
import SpillwayServer
import SpillwayPolicy

/// `spillway replay` without `--simulate`: the trace through a real `TieredStore`, under the
/// same rules as the simulator, so the two can be compared reference for reference.
///
/// Per request, each block in order is looked up (`get`, which is what records the access for
/// the policy); a hit is checked byte for byte (a block holds its id, then a pattern), a miss
/// is stored (`put` with `kvBlock` hints naming its parent, which asks the policy's admission
/// and, when the tier is full, its eviction). The policy code is the simulator's
/// (`PolicyEngine` runs one `BlockCachePolicy` per tier), so on a one-tier store of N
/// block-sized slots the hits equal `spillway replay --simulate` at N blocks. The default store
/// is exactly that: one DRAM tier of `capacityBlocks` slots that drops declined puts (a cache
/// that may decline, as the replay rules say). With a configuration, the store is whatever it
/// describes (its capacities; `--policy` still chooses the policy), and hits are reported per tier.
public enum StoreReplay {
    public struct Options: Sendable {
        public var policy: StorePolicy
        public var capacityBlocks: Int
        public var blockBytes: Int
        /// A store to replay on instead of the default one-tier store.
        public var configuration: SpillwayConfiguration?

        public init(policy: StorePolicy, capacityBlocks: Int, blockBytes: Int = 4096, configuration: SpillwayConfiguration? = nil) {
            self.policy = policy
            self.capacityBlocks = capacityBlocks
            self.blockBytes = blockBytes
            self.configuration = configuration
        }
    }

    public struct TierResult: Sendable, Equatable {
        public var name: String
        public var hits: Int
        public var bytesWritten: Int
        public var demotionsOut: Int
        public var promotionsIn: Int
        public var evictions: Int
        public var stallNanoseconds: Int
    }

    public struct Result: Sendable, Equatable {
        public var policy: String
        public var capacityBlocks: Int
        public var blockBytes: Int
        public var requests: Int
        public var blockReferences: Int
        public var hits: Int
        public var prefixHits: Int
        /// Hits whose bytes were not the block's (must be 0).
        public var corrupt: Int
        public var putErrors: Int
        public var declinedPuts: Int
        public var tiers: [TierResult]
        public var goodput: Double
        public var seconds: Double
        /// The simulator's result for the same policy and capacity (nil when the store is not
        /// the default one-tier store, whose capacity is the simulated one).
        public var simulated: SimulationResult?

        public var hitRatio: Double { blockReferences == 0 ? 0 : Double(hits) / Double(blockReferences) }
        public var prefixHitRatio: Double { blockReferences == 0 ? 0 : Double(prefixHits) / Double(blockReferences) }

        public var json: JSONValue {
            var members: [(String, JSONValue)] = [
                ("mode", .string("store")), ("policy", .string(policy)), ("capacity_blocks", .int(capacityBlocks)),
                ("block_bytes", .int(blockBytes)), ("requests", .int(requests)), ("block_refs", .int(blockReferences)),
                ("hits", .int(hits)), ("prefix_hits", .int(prefixHits)),
                ("hit_ratio", .double(hitRatio)), ("prefix_hit_ratio", .double(prefixHitRatio)),
                ("corrupt", .int(corrupt)), ("put_errors", .int(putErrors)), ("declined_puts", .int(declinedPuts)),
                ("stall_ns", .int(tiers.reduce(0) { $0 + $1.stallNanoseconds })), ("goodput", .double(goodput)),
                ("duration_s", .double(seconds)),
                ("tiers", .array(tiers.map { tier in
                    .object([
                        ("name", .string(tier.name)), ("hits", .int(tier.hits)),
                        ("hit_ratio", .double(blockReferences == 0 ? 0 : Double(tier.hits) / Double(blockReferences))),
                        ("bytes_written", .int(tier.bytesWritten)), ("demotions_out", .int(tier.demotionsOut)),
                        ("promotions_in", .int(tier.promotionsIn)), ("evictions", .int(tier.evictions)),
                        ("stall_ns", .int(tier.stallNanoseconds)),
                    ])
                })),
            ]
            if let simulated {
                members.append(("simulated_hit_ratio", .double(simulated.hitRatio)))
                members.append(("simulated_prefix_hit_ratio", .double(simulated.prefixHitRatio)))
            }
            return .object(members)
        }
    }

    /// The key a trace block is stored under ("REPL" in the high half, the id in the low).
    static func key(_ block: UInt64) -> PageKey { PageKey(high: 0x5245_504C, low: block) }

    public static func run(_ trace: BlockTrace, options: Options) throws(SpillwayError) -> Result {
        guard options.capacityBlocks >= 1, options.capacityBlocks <= PolicySimulator.maxCapacityBlocks else {
            throw .invalidArgument("capacity \(options.capacityBlocks) blocks must be in 1...\(PolicySimulator.maxCapacityBlocks)")
        }
        guard options.blockBytes >= 16, options.blockBytes <= 2 << 20 else {
            throw .invalidArgument("block bytes \(options.blockBytes) must be in 16...2MiB")
        }
        let store: TieredStore
        if var configuration = options.configuration {
            configuration.policy = options.policy.name
            configuration.demotion = options.policy.demotion.rawValue
            configuration.maxPageSize = max(configuration.maxPageSize, options.blockBytes)
            store = try TieredStore.open(configuration, daemons: InProcessDaemons())
        } else {
            var slot = 4096
            while slot < options.blockBytes { slot <<= 1 }
            let tier = try DRAMTier(slotSize: slot, capacitySlots: options.capacityBlocks, prefault: false)
            store = try TieredStore(tiers: [tier], policy: options.policy, options: StoreOptions(
                maxPageSize: slot, declinedPutsAreDropped: true, backgroundWorker: false))
        }
        defer { store.close() }
        let bytes = options.blockBytes
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: 64)
        defer { buffer.deallocate() }
        let page = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: 64)
        defer { page.deallocate() }
        func fill(_ block: UInt64) {
            // The id in every 8-byte word, so a hit serving another block's bytes shows anywhere.
            for offset in stride(from: 0, to: bytes - 7, by: 8) { page.storeBytes(of: block, toByteOffset: offset, as: UInt64.self) }
        }
        var hits = 0, prefixHits = 0, corrupt = 0, putErrors = 0
        let started = monotonicNanoseconds()
        for request in trace.requests {
            var prefixIntact = true
            var parent: PageKey? = nil
            for position in request.blocks {
                let block = trace.references[position]
                let key = Self.key(block)
                do throws(SpillwayError) {
                    let length = try store.get(key, into: buffer)
                    fill(block)
                    if length != bytes || memcmp(buffer.baseAddress!, page.baseAddress!, bytes) != 0 { corrupt += 1 }
                    hits += 1
                    if prefixIntact { prefixHits += 1 }
                } catch .unknownKey {
                    prefixIntact = false
                    fill(block)
                    do throws(SpillwayError) {
                        try store.put(key, UnsafeRawBufferPointer(page), hints: .kvBlock(depth: position - request.blocks.lowerBound, parent: parent))
                    } catch {
                        putErrors += 1
                    }
                } catch {
                    prefixIntact = false
                    corrupt += 1
                }
                parent = key
            }
        }
        let seconds = Double(monotonicNanoseconds() &- started) / 1e9
        let stats = store.stats()
        let simulated = options.configuration == nil
            ? try PolicySimulator.run(options.policy.eviction, capacityBlocks: options.capacityBlocks, trace: trace) : nil
        return Result(
            policy: options.policy.name, capacityBlocks: options.capacityBlocks, blockBytes: bytes, requests: trace.requests.count,
            blockReferences: trace.references.count, hits: hits, prefixHits: prefixHits, corrupt: corrupt, putErrors: putErrors,
            declinedPuts: stats.declinedPuts,
            tiers: stats.tiers.map { tier in
                TierResult(name: tier.name, hits: tier.hits, bytesWritten: tier.bytesWritten, demotionsOut: tier.demotionsOut,
                           promotionsIn: tier.promotionsIn, evictions: tier.evictions, stallNanoseconds: tier.stallNanoseconds)
            },
            goodput: stats.goodput, seconds: seconds, simulated: simulated)
    }
}
