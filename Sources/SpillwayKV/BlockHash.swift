import CSpillwayXXHash
import SpillwayCore

/// The 128-bit key of one KV-cache block: a chained hash of the block's tokens and every
/// token before it, so equal hashes mean equal prefixes (the vLLM / LMCache prefix-caching
/// scheme). Stable across processes and machines — never a per-process random hash — so a
/// block stored by one engine instance is found by another.
public struct BlockHash: Hashable, Sendable, CustomStringConvertible {
    public var high: UInt64
    public var low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// The parent of a sequence's first block.
    public static let root = BlockHash(high: 0, low: 0)

    public var description: String { PageKey(high: high, low: low).description }
}

/// Computes block hashes for one model (docs/kv-cache.md, "Keys"):
///
///     seed        = XXH3_64bits_withSeed(UTF-8 bytes of modelID, 0)
///     block hash  = XXH3_128bits_withSeed(parent.high ‖ parent.low ‖ token₀ ‖ … ‖ tokenₙ₋₁, seed)
///
/// with the parent's halves as little-endian u64 (`BlockHash.root` = 0, 0 for the first
/// block) and tokens as little-endian u32. Only full blocks are hashed: a trailing partial
/// block is never cached.
public struct KVBlockHasher: Sendable {
    public let modelID: String
    public let seed: UInt64
    public let tokensPerBlock: Int

    public init(modelID: String, tokensPerBlock: Int) {
        self.modelID = modelID
        self.tokensPerBlock = tokensPerBlock
        var bytes = Array(modelID.utf8)
        seed = bytes.withUnsafeMutableBytes { XXH3_64bits_withSeed($0.baseAddress, $0.count, 0) }
    }

    /// The hash of one block of `tokens` (exactly `tokensPerBlock` of them) after `parent`.
    public func hash(parent: BlockHash, tokens: UnsafeBufferPointer<UInt32>) -> BlockHash {
        precondition(tokens.count == tokensPerBlock)
        return withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 16 + 4 * tokens.count) { buffer in
            let raw = UnsafeMutableRawBufferPointer(buffer)
            raw.storeBytes(of: parent.high.littleEndian, toByteOffset: 0, as: UInt64.self)
            raw.storeBytes(of: parent.low.littleEndian, toByteOffset: 8, as: UInt64.self)
            for (index, token) in tokens.enumerated() {
                raw.storeBytes(of: token.littleEndian, toByteOffset: 16 + 4 * index, as: UInt32.self)
            }
            let hash = XXH3_128bits_withSeed(raw.baseAddress, raw.count, seed)
            return BlockHash(high: hash.high64, low: hash.low64)
        }
    }

    /// The chained hashes of every full block of `tokens`.
    public func blockHashes(_ tokens: [UInt32]) -> [BlockHash] {
        tokens.withUnsafeBufferPointer { all in
            var hashes: [BlockHash] = []
            hashes.reserveCapacity(all.count / tokensPerBlock)
            var parent = BlockHash.root
            var start = 0
            while start + tokensPerBlock <= all.count {
                parent = hash(parent: parent, tokens: UnsafeBufferPointer(rebasing: all[start..<(start + tokensPerBlock)]))
                hashes.append(parent)
                start += tokensPerBlock
            }
            return hashes
        }
    }

    /// The store key of part `part` of a block (a layer index, or one of the reserved parts)
    /// under geometry `fingerprint`: XXH3-128 of (block high ‖ block low ‖ part u32 ‖
    /// fingerprint u64), little-endian, same seed. The fingerprint keeps pools of different
    /// geometry from ever reading each other's bytes.
    func pageKey(_ block: BlockHash, part: UInt32, fingerprint: UInt64) -> PageKey {
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 28) { buffer in
            let raw = UnsafeMutableRawBufferPointer(buffer)
            raw.storeBytes(of: block.high.littleEndian, toByteOffset: 0, as: UInt64.self)
            raw.storeBytes(of: block.low.littleEndian, toByteOffset: 8, as: UInt64.self)
            raw.storeBytes(of: part.littleEndian, toByteOffset: 16, as: UInt32.self)
            raw.storeBytes(of: fingerprint.littleEndian, toByteOffset: 20, as: UInt64.self)
            let hash = XXH3_128bits_withSeed(raw.baseAddress, raw.count, seed)
            return PageKey(high: hash.high64, low: hash.low64)
        }
    }

    static func hash64(_ bytes: [UInt8], seed: UInt64) -> UInt64 {
        var bytes = bytes
        return bytes.withUnsafeMutableBytes { XXH3_64bits_withSeed($0.baseAddress, $0.count, seed) }
    }
}
