import SpillwayCore

/// The policies the simulator knows, by command-line name.
public enum PolicyKind: String, CaseIterable, Sendable {
    case lru
    case prefixLRU = "prefix-lru"
    case s3fifo
    case s3fifoPrefix = "s3fifo-prefix"
    case tinylfu
    case opt

    public static var names: String { allCases.map(\.rawValue).joined(separator: ", ") }

    /// Whether the store can run it: everything but `opt`, which needs the future.
    public var runsInStore: Bool { self != .opt }

    public init(name: String) throws(SpillwayError) {
        guard let kind = PolicyKind(rawValue: name) else { throw .invalidArgument("unknown policy '\(name)' (one of \(Self.names))") }
        self = kind
    }

    public func make(capacityBlocks: Int, trace: BlockTrace) -> any BlockCachePolicy {
        switch self {
        case .lru: LRUBlockPolicy(capacityBlocks: capacityBlocks)
        case .prefixLRU: PrefixLRUBlockPolicy(capacityBlocks: capacityBlocks)
        case .s3fifo: S3FIFOBlockPolicy(capacityBlocks: capacityBlocks)
        case .s3fifoPrefix: S3FIFOBlockPolicy(capacityBlocks: capacityBlocks, prefixAware: true, smallFraction: 0.3, ghostMultiple: 4)
        case .tinylfu: TinyLFUBlockPolicy(capacityBlocks: capacityBlocks)
        case .opt: OptimalBlockPolicy(capacityBlocks: capacityBlocks, stream: trace.references)
        }
    }
}

public struct SimulationResult: Sendable, Equatable {
    public var policy: String
    public var capacityBlocks: Int
    public var requests: Int
    public var blockReferences: Int
    public var hits: Int
    /// Hits up to each request's first miss: what a prefix cache can actually serve.
    public var prefixHits: Int

    public var hitRatio: Double { blockReferences == 0 ? 0 : Double(hits) / Double(blockReferences) }
    public var prefixHitRatio: Double { blockReferences == 0 ? 0 : Double(prefixHits) / Double(blockReferences) }

    public var json: JSONValue {
        .object([
            ("policy", .string(policy)), ("capacity_blocks", .int(capacityBlocks)), ("requests", .int(requests)),
            ("block_refs", .int(blockReferences)), ("hits", .int(hits)), ("prefix_hits", .int(prefixHits)),
            ("hit_ratio", .double(hitRatio)), ("prefix_hit_ratio", .double(prefixHitRatio)),
        ])
    }
}

/// Replays a trace through one policy: per request, each block id in order; a hit refreshes
/// it, a miss lets the policy evict and insert (or decline).
public enum PolicySimulator {
    /// The capacities of a sweep, as fractions of the trace's unique blocks.
    public static let sweepFractions: [Double] = [0.01, 0.05, 0.10, 0.25, 0.50]

    /// Capacity in blocks for a fraction of the trace's unique blocks (at least one block).
    public static func capacity(fraction: Double, of trace: BlockTrace) throws(SpillwayError) -> Int {
        guard fraction.isFinite, fraction > 0, fraction <= 1 else {
            throw .invalidArgument("capacity fraction \(fraction) must be in (0, 1]")
        }
        return max(1, Int((fraction * Double(trace.uniqueBlocks)).rounded()))
    }

    /// Upper bound on --capacity-blocks: the structures are allocated at init (about 50 bytes
    /// per block of capacity, more for TinyLFU's sketch), so a typo must not exhaust memory;
    /// 16 M blocks is far beyond any trace's unique blocks.
    public static let maxCapacityBlocks = 1 << 24

    public static func run(_ kind: PolicyKind, capacityBlocks: Int, trace: BlockTrace) throws(SpillwayError) -> SimulationResult {
        guard capacityBlocks >= 1, capacityBlocks <= maxCapacityBlocks else {
            throw .invalidArgument("capacity \(capacityBlocks) blocks must be in 1...\(maxCapacityBlocks)")
        }
        return run(kind.make(capacityBlocks: capacityBlocks, trace: trace), trace: trace)
    }

    public static func run(_ policy: any BlockCachePolicy, trace: BlockTrace) -> SimulationResult {
        var hits = 0, prefixHits = 0
        for request in trace.requests {
            var prefixIntact = true
            var parent: UInt64? = nil
            for now in request.blocks {
                let block = trace.references[now]
                let hit = policy.access(block: block, parent: parent, depth: now - request.blocks.lowerBound, now: now)
                if hit {
                    hits += 1
                    if prefixIntact { prefixHits += 1 }
                } else {
                    prefixIntact = false
                }
                parent = block
            }
        }
        return SimulationResult(policy: policy.name, capacityBlocks: policy.capacityBlocks, requests: trace.requests.count,
                                blockReferences: trace.references.count, hits: hits, prefixHits: prefixHits)
    }

    /// Every policy at every sweep fraction: rows in `PolicyKind.allCases` order.
    public static func sweep(trace: BlockTrace, policies: [PolicyKind] = PolicyKind.allCases) throws(SpillwayError) -> [[SimulationResult]] {
        var table: [[SimulationResult]] = []
        for kind in policies {
            var row: [SimulationResult] = []
            for fraction in sweepFractions {
                row.append(try run(kind, capacityBlocks: try capacity(fraction: fraction, of: trace), trace: trace))
            }
            table.append(row)
        }
        return table
    }
}
