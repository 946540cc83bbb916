import Testing
@testable import SpillwayCore
@testable import SpillwayKV
@testable import SpillwayMemoryTiers
@testable import SpillwayStore

/// `storeLayers` / `loadLayers`: whole strided arrays in one batch.
@Suite struct KVArrayTests {
    @Test func contiguousAndStridedArraysRoundTripInOneCall() throws {
        let pool = try KVPool(store: try kvStore(), geometry: smallGeometry, modelID: "arrays")
        let hashes = pool.blockHashes(tokens: Array(0..<16))  // 4 blocks
        let layerBytes = smallGeometry.layerBytes
        let layers = smallGeometry.layers
        // [layers, blocks, layerBytes], C-contiguous.
        let kv = blockBytes(7, layers * 4 * layerBytes)
        let stored = kv.withUnsafeBytes {
            pool.storeLayers(hashes, layers: 0..<layers, from: $0.baseAddress!, strides: .contiguous(blocks: 4, layerBytes: layerBytes))
        }
        #expect(stored.allSucceeded)
        #expect(pool.lookup(hashes) == 4)
        // Back into a block-major [blocks, layers, layerBytes] array: layer stride layerBytes.
        var byBlock = [UInt8](repeating: 0, count: kv.count)
        let loaded = byBlock.withUnsafeMutableBytes {
            pool.loadLayers(hashes, layers: 0..<layers, into: $0.baseAddress!,
                            strides: KVArrayStrides(layerStride: layerBytes, blockStride: layers * layerBytes))
        }
        #expect(loaded.allSucceeded)
        for layer in 0..<layers {
            for block in 0..<4 {
                let expected = kv[((layer * 4 + block) * layerBytes)..<((layer * 4 + block + 1) * layerBytes)]
                let got = byBlock[((block * layers + layer) * layerBytes)..<((block * layers + layer + 1) * layerBytes)]
                #expect(Array(expected) == Array(got), "layer \(layer) block \(block)")
            }
        }
        // The per-block API sees the same bytes.
        var whole = [[UInt8]](repeating: [UInt8](repeating: 0, count: smallGeometry.blockBytes), count: 4)
        #expect(whole.withMutableBuffers { pool.load(hashes, into: $0) }.allSucceeded)
        #expect(whole.flatMap { $0 } == byBlock)
    }

    @Test func aBlockIsVisibleOnlyOnceEveryLayerIsStoredAcrossArrayCalls() throws {
        let pool = try KVPool(store: try kvStore(), geometry: smallGeometry, modelID: "layers")
        let hashes = pool.blockHashes(tokens: Array(0..<8))
        let layerBytes = smallGeometry.layerBytes
        let first = blockBytes(1, 2 * 2 * layerBytes)
        let last = blockBytes(2, 2 * layerBytes)
        #expect(first.withUnsafeBytes { pool.storeLayers(hashes, layers: 0..<2, from: $0.baseAddress!, strides: .contiguous(blocks: 2, layerBytes: layerBytes)) }.allSucceeded)
        #expect(pool.lookup(hashes) == 0)
        #expect(last.withUnsafeBytes { pool.storeLayers(hashes, layers: 2..<3, from: $0.baseAddress!, strides: .contiguous(blocks: 2, layerBytes: layerBytes)) }.allSucceeded)
        #expect(pool.lookup(hashes) == 2)
        var out = [UInt8](repeating: 0, count: 2 * layerBytes)
        #expect(out.withUnsafeMutableBytes { pool.loadLayers(hashes, layers: 2..<3, into: $0.baseAddress!, strides: .contiguous(blocks: 2, layerBytes: layerBytes)) }.allSucceeded)
        #expect(out == last)
    }

    @Test func badStridesAndLayersAreTypedErrorsAndTouchNothing() throws {
        let pool = try KVPool(store: try kvStore(), geometry: smallGeometry, modelID: "bad")
        let hashes = pool.blockHashes(tokens: Array(0..<8))
        let layerBytes = smallGeometry.layerBytes
        let bytes = blockBytes(3, 3 * 2 * layerBytes)
        func store(_ layers: Range<Int>, _ strides: KVArrayStrides) -> KVResult {
            bytes.withUnsafeBytes { pool.storeLayers(hashes, layers: layers, from: $0.baseAddress!, strides: strides) }
        }
        let cases: [(Range<Int>, KVArrayStrides, String)] = [
            (0..<3, KVArrayStrides(layerStride: -1, blockStride: layerBytes), "negative"),
            (0..<3, KVArrayStrides(layerStride: Int.max, blockStride: layerBytes), "overflow"),
            (0..<3, KVArrayStrides(layerStride: Int.max / 2, blockStride: layerBytes), "overflow"),  // 2 × (max/2) + 256 + 256
            (1..<4, .contiguous(blocks: 2, layerBytes: layerBytes), "layers"),
            (0..<0, .contiguous(blocks: 2, layerBytes: layerBytes), "layers"),
        ]
        for (layers, strides, words) in cases {
            let result = store(layers, strides)
            #expect(result.succeeded == 0)
            guard case .invalidArgument(let message) = result.firstError else {
                Issue.record("expected invalidArgument, got \(String(describing: result.firstError))")
                continue
            }
            #expect(message.contains(words), "\(message)")
        }
        #expect(pool.lookup(hashes) == 0)
        #expect(store(0..<3, .contiguous(blocks: 2, layerBytes: layerBytes)).allSucceeded)
        // Overlapping destinations are refused before anything is written.
        var out = [UInt8](repeating: 0x5A, count: bytes.count)
        let overlapping = out.withUnsafeMutableBytes {
            pool.loadLayers(hashes, layers: 0..<3, into: $0.baseAddress!, strides: KVArrayStrides(layerStride: layerBytes, blockStride: layerBytes / 2))
        }
        guard case .invalidArgument(let message) = overlapping.firstError else {
            Issue.record("expected invalidArgument, got \(String(describing: overlapping.firstError))")
            return
        }
        #expect(message.contains("overlap"))
        #expect(out.allSatisfy { $0 == 0x5A })
    }
}
