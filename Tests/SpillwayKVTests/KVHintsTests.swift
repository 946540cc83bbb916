import Testing
@testable import SpillwayCore
@testable import SpillwayKV
@testable import SpillwayMemoryTiers
@testable import SpillwayStore

@Suite struct KVHintsTests {
    @Test func perLayerPagesAreKVBlocksWithDepthAndParent() throws {
        let store = try kvStore()
        let pool = try KVPool(store: store, geometry: smallGeometry, modelID: "m")
        defer { pool.close() }
        let hashes = pool.blockHashes(tokens: Array(0..<12))  // 3 blocks
        let blocks = hashes.indices.map { blockBytes(UInt64(500 + $0), smallGeometry.blockBytes) }
        #expect(blocks.withBuffers { pool.store(hashes, blocks: $0) }.allSucceeded)
        for (depth, block) in hashes.enumerated() {
            let parent = depth > 0 ? hashes[depth - 1] : nil
            for layer in 0..<smallGeometry.layers {
                let expected = PageHints.kvBlock(depth: depth, parent: parent.map { pool.dataKey($0, layer: layer) })
                #expect(store.hints(of: pool.dataKey(block, layer: layer)) == expected, "block \(depth) layer \(layer)")
            }
            #expect(store.hints(of: pool.manifestKey(block)) == .kvBlock(depth: depth, parent: parent.map(pool.manifestKey)))
        }
        // A child names its parent: the id the policy tracks the parent's page by.
        let child = try #require(store.hints(of: pool.dataKey(hashes[2], layer: 1)))
        #expect(child.parent == pool.dataKey(hashes[1], layer: 1).policyID)
    }

    @Test func chainStartOffsetsDepthAndNamesTheParent() throws {
        let store = try kvStore()
        let geometry = KVBlockGeometry(tokensPerBlock: 4, layers: 2, kvHeads: 2, headDim: 8, dtypeSize: 2, layout: .wholeBlock)
        let pool = try KVPool(store: store, geometry: geometry, modelID: "m")
        defer { pool.close() }
        let hashes = pool.blockHashes(tokens: Array(0..<16))  // 4 blocks; store the last two
        let blocks = [blockBytes(1, geometry.blockBytes), blockBytes(2, geometry.blockBytes)]
        let result = blocks.withBuffers { pool.store(Array(hashes[2...]), blocks: $0, chain: KVChainStart(depth: 2, parent: hashes[1])) }
        #expect(result.allSucceeded)
        #expect(store.hints(of: pool.dataKey(hashes[2], layer: 0)) == .kvBlock(depth: 2, parent: pool.dataKey(hashes[1], layer: 0)))
        #expect(store.hints(of: pool.dataKey(hashes[3], layer: 0)) == .kvBlock(depth: 3, parent: pool.dataKey(hashes[2], layer: 0)))
    }

    @Test func storeLayerCarriesHintsToo() throws {
        let store = try kvStore()
        let pool = try KVPool(store: store, geometry: smallGeometry, modelID: "m")
        defer { pool.close() }
        let hashes = pool.blockHashes(tokens: Array(0..<8))  // 2 blocks
        let slices = hashes.indices.map { blockBytes(UInt64(700 + $0), smallGeometry.layerBytes) }
        for layer in 0..<smallGeometry.layers {
            #expect(slices.withBuffers { pool.storeLayer(hashes, layer: layer, buffers: $0) }.allSucceeded)
        }
        #expect(store.hints(of: pool.dataKey(hashes[1], layer: 2)) == .kvBlock(depth: 1, parent: pool.dataKey(hashes[0], layer: 2)))
        #expect(store.hints(of: pool.manifestKey(hashes[1])) == .kvBlock(depth: 1, parent: pool.manifestKey(hashes[0])))
        #expect(pool.lookup(hashes) == 2)
    }
}
