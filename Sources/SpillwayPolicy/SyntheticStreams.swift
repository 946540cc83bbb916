import SpillwayCore

/// One access of a page stream: a position within a stream.
public struct PageAccess: Sendable, Equatable {
    public var stream: UInt64
    public var position: Int64

    public init(stream: UInt64, position: Int64) {
        self.stream = stream
        self.position = position
    }
}

/// A named sequence of accesses, for evaluating prefetchers.
public struct PageStream: Sendable {
    public var name: String
    public var accesses: [PageAccess]

    public init(name: String, accesses: [PageAccess]) {
        self.name = name
        self.accesses = accesses
    }
}

/// Synthetic access patterns with known structure, seeded (SplitMix64) so every run sees the
/// same streams. Each covers a case a prefetcher must get right: dense and strided runs in
/// both directions, several streams interleaved, the store's two structured workloads
/// (weights passes in layer order, KV blocks read layer by layer), and the cases where it must
/// hold back (random) or see through noise.
public enum SyntheticStream: String, CaseIterable, Sendable {
    /// 0, 1, 2, …
    case sequential
    /// 0, 4, 8, …
    case strided
    /// n-1, n-2, …, 0
    case reverse
    /// Four streams (strides 1, 2, -1, 3) under their own ids, the next one picked at random.
    case interleaved
    /// A model of 32 layers × 16 pages read in layer order, pass after pass.
    case weights
    /// Requests of 8–64 KV blocks, 4 decode steps each, every step reading all blocks layer by
    /// layer (8 layers, one stream per layer; positions are block ids).
    case perLayerKV = "kv-layers"
    /// Uniform over 2²⁰ positions.
    case random
    /// `sequential` with 20 % of the accesses replaced by random ones.
    case noisySequential = "noisy-sequential"
    /// `strided` with 20 % of the accesses replaced by random ones.
    case noisyStrided = "noisy-strided"

    public static var names: String { allCases.map(\.rawValue).joined(separator: ", ") }

    public func generate(seed: UInt64, accesses count: Int) -> PageStream {
        let accesses: [PageAccess] = switch self {
        case .sequential: Self.strided(count: count, stride: 1)
        case .strided: Self.strided(count: count, stride: 4)
        case .reverse: Self.strided(count: count, stride: -1, start: Int64(count - 1))
        case .interleaved: Self.interleaved(count: count, strides: [1, 2, -1, 3], seed: seed)
        case .weights: Self.weightPasses(count: count, layers: 32, pagesPerLayer: 16)
        case .perLayerKV: Self.layeredKV(count: count, layers: 8, blocks: 8...64, steps: 4, seed: seed)
        case .random: Self.random(count: count, range: 1 << 20, seed: seed)
        case .noisySequential: Self.noisy(Self.strided(count: count, stride: 1), fraction: 0.2, seed: seed)
        case .noisyStrided: Self.noisy(Self.strided(count: count, stride: 4), fraction: 0.2, seed: seed)
        }
        return PageStream(name: rawValue, accesses: accesses)
    }

    /// `start`, `start + stride`, … on stream `stream`.
    public static func strided(count: Int, stride: Int64, start: Int64 = 0, stream: UInt64 = 0) -> [PageAccess] {
        (0..<max(0, count)).map { PageAccess(stream: stream, position: start + Int64($0) * stride) }
    }

    /// One stream per stride (ids 1, 2, …; starting 1 M apart, negative strides from the top),
    /// each access going to a random one of them.
    public static func interleaved(count: Int, strides: [Int64], seed: UInt64) -> [PageAccess] {
        guard !strides.isEmpty else { return [] }
        var random = SplitMix64(seed: seed)
        var cursors = strides.enumerated().map { Int64($0) * 1_000_000 + ($1 < 0 ? 999_999 : 0) }
        return (0..<max(0, count)).map { _ in
            let index = Int(random.next() % UInt64(strides.count))
            defer { cursors[index] += strides[index] }
            return PageAccess(stream: UInt64(index + 1), position: cursors[index])
        }
    }

    /// Layer-ordered passes over a model: page `layer * pagesPerLayer + j`, all layers, repeated.
    public static func weightPasses(count: Int, layers: Int, pagesPerLayer: Int, stream: UInt64 = 0) -> [PageAccess] {
        let pages = Int64(max(1, layers * pagesPerLayer))
        return (0..<max(0, count)).map { PageAccess(stream: stream, position: Int64($0) % pages) }
    }

    /// Requests with a random number of new blocks; each decode step reads every block of the
    /// request for layer 0, then layer 1, …; layer `l` is stream `100 + l`.
    public static func layeredKV(count: Int, layers: Int, blocks: ClosedRange<Int>, steps: Int, seed: UInt64) -> [PageAccess] {
        var random = SplitMix64(seed: seed)
        var out: [PageAccess] = []
        out.reserveCapacity(max(0, count))
        var nextBlock: Int64 = 0
        while out.count < count {
            let span = UInt64(blocks.upperBound - blocks.lowerBound + 1)
            let length = Int64(blocks.lowerBound) + Int64(random.next() % span)
            let first = nextBlock
            nextBlock += length
            for _ in 0..<max(1, steps) {
                for layer in 0..<max(1, layers) {
                    for block in first..<(first + length) where out.count < count {
                        out.append(PageAccess(stream: 100 + UInt64(layer), position: block))
                    }
                }
            }
        }
        return out
    }

    /// Uniform positions in 0..<range.
    public static func random(count: Int, range: UInt64, seed: UInt64, stream: UInt64 = 0) -> [PageAccess] {
        var random = SplitMix64(seed: seed)
        return (0..<max(0, count)).map { _ in PageAccess(stream: stream, position: Int64(random.next() % max(1, range))) }
    }

    /// `base` with random accesses mixed in: each access is, with probability `fraction`, a
    /// random position far from the pattern (2³⁰ + [0, 2²⁰)) on the same stream, else the next
    /// access of `base` (which continues where it left off). As long as `base`.
    public static func noisy(_ base: [PageAccess], fraction: Double, seed: UInt64) -> [PageAccess] {
        var random = SplitMix64(seed: seed)
        let threshold = UInt64(max(0, min(1, fraction)) * Double(1 << 53))
        var out: [PageAccess] = []
        out.reserveCapacity(base.count)
        var next = 0
        while out.count < base.count {
            if random.next() >> 11 < threshold {
                out.append(PageAccess(stream: base[next].stream, position: (1 << 30) + Int64(random.next() % (1 << 20))))
            } else {
                out.append(base[next])
                next += 1
            }
        }
        return out
    }
}
