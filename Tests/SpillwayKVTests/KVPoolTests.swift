import Testing
@testable import SpillwayCore
@testable import SpillwayKV
@testable import SpillwayMemoryTiers
@testable import SpillwayStore

/// A store of DRAM only, pages up to 64 KiB.
func kvStore(slots: Int = 512) throws -> TieredStore {
    try TieredStore(tiers: [try DRAMTier(slotSize: 4096, capacitySlots: slots, prefault: false)],
                    options: StoreOptions(maxPageSize: 64 << 10, backgroundWorker: false))
}

let smallGeometry = KVBlockGeometry(tokensPerBlock: 4, layers: 3, kvHeads: 2, headDim: 8, dtypeSize: 2)  // 256 B per layer

func blockBytes(_ seed: UInt64, _ count: Int) -> [UInt8] {
    var generator = SplitMix64(seed: seed)
    return (0..<count).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
}

@Suite struct KVPoolTests {
    @Test func blockHashesAreTheDocumentedStableXXH3Chain() {
        // Golden values from a C program calling libxxhash directly on the documented byte
        // layout (seed = XXH3_64(model id), parent ‖ tokens little-endian).
        let hasher = KVBlockHasher(modelID: "llama-3-8b", tokensPerBlock: 4)
        #expect(hasher.seed == 0x0067_98f4_1782_62e8)
        let hashes = hasher.blockHashes([1, 2, 3, 4, 5, 6, 7, 8, 9])  // the 9th token is a partial block
        #expect(hashes.count == 2)
        #expect(hashes.first?.description == "35ec72f68a754bc8c2ffb56f5239a622")
        #expect(hashes.last?.description == "6d2a19946ad6a927c20f62b1261ccb3d")
        // Another model, same tokens: other keys.
        #expect(KVBlockHasher(modelID: "other", tokensPerBlock: 4).blockHashes([1, 2, 3, 4]) != [hashes[0]])
    }

    @Test func aBlockIsVisibleOnlyOnceEveryLayerIsStored() throws {
        let pool = try KVPool(store: try kvStore(), geometry: smallGeometry, modelID: "m")
        let tokens: [UInt32] = Array(0..<14)  // 3 full blocks + 2 tokens
        let hashes = pool.blockHashes(tokens: tokens)
        #expect(hashes.count == 3)
        let layer = smallGeometry.layerBytes
        var data = (0..<3).map { block in (0..<3).map { layer_ in blockBytes(UInt64(block * 10 + layer_), layer) } }
        for layerIndex in 0..<2 {
            let result = data.indices.map { data[$0][layerIndex] }.withBuffers { pool.storeLayer(hashes, layer: layerIndex, buffers: $0) }
            #expect(result.allSucceeded)
            #expect(pool.lookup(hashes) == 0, "no block is complete before its last layer")
        }
        // The last layer of blocks 0 and 2 only: block 1 stays invisible, so the prefix is 1.
        let partial = [data[0][2], data[2][2]].withBuffers { pool.storeLayer([hashes[0], hashes[2]], layer: 2, buffers: $0) }
        #expect(partial.allSucceeded)
        #expect(pool.lookup(hashes) == 1)
        #expect(pool.lookup(tokens: tokens) == 4)
        _ = [data[1][2]].withBuffers { pool.storeLayer([hashes[1]], layer: 2, buffers: $0) }
        #expect(pool.lookup(hashes) == 3)
        // Per-layer loads and whole-block loads return exactly what was stored.
        var out = [[UInt8]](repeating: [UInt8](repeating: 0, count: layer), count: 3)
        let loaded = out.withMutableBuffers { pool.load(hashes, layer: 1, into: $0) }
        #expect(loaded.allSucceeded && out == data.map { $0[1] })
        var whole = [[UInt8]](repeating: [UInt8](repeating: 0, count: smallGeometry.blockBytes), count: 3)
        #expect(whole.withMutableBuffers { pool.load(hashes, into: $0) }.allSucceeded)
        #expect(whole == data.map { $0.flatMap { $0 } })
        // The pool copied on store: flipping a byte of the caller's copy changes nothing stored.
        let original = data[0][0]
        data[0][0][0] ^= 0xFF
        var again = [[UInt8]](repeating: [UInt8](repeating: 0, count: layer), count: 1)
        #expect(again.withMutableBuffers { pool.load([hashes[0]], layer: 0, into: $0) }.allSucceeded)
        #expect(again[0] == original && again[0] != data[0][0])
    }

    /// A byte flipped in the tier's memory under a stored block is detected on load (a typed
    /// checksum error for that block), never served; the other blocks still load.
    @Test func aCorruptedBlockIsReportedNotServed() throws {
        let tier = try DRAMTier(slotSize: 4096, capacitySlots: 64, prefault: false, verifiesReads: true)
        let store = try TieredStore(tiers: [tier], options: StoreOptions(maxPageSize: 64 << 10, backgroundWorker: false))
        let pool = try KVPool(store: store, geometry: smallGeometry, modelID: "m")
        let hashes = pool.blockHashes(tokens: Array(0..<8))
        let blocks = (0..<2).map { blockBytes(UInt64(200 + $0), smallGeometry.blockBytes) }
        #expect(blocks.withBuffers { pool.store(hashes, blocks: $0) }.allSucceeded)
        // Flip one byte of block 0's layer-1 page where the DRAM tier holds it.
        let key = pool.dataKey(hashes[0], layer: 1)
        let snapshot = try #require(store.directory.snapshot(of: key))
        #expect(snapshot.location.tier == 0)
        let page = tier.arena.base + Int(snapshot.location.extent.firstSlot) * 4096
        page.storeBytes(of: page.load(fromByteOffset: 17, as: UInt8.self) ^ 0x01, toByteOffset: 17, as: UInt8.self)

        var out = [[UInt8]](repeating: [UInt8](repeating: 0, count: smallGeometry.blockBytes), count: 2)
        let result = out.withMutableBuffers { pool.load(hashes, into: $0) }
        #expect(!result.allSucceeded && result.contiguous == 0, "block 0 is not served")
        guard case .checksumMismatch(let corrupt, _, _, _) = result.errors[0] else {
            Issue.record("a flipped byte must be a checksum error, got \(String(describing: result.errors[0]))")
            return
        }
        #expect(corrupt == key)
        #expect(result.errors[1] == nil && out[1] == blocks[1], "the intact block still loads")
        #expect(store.stats().tiers[0].checksumFailures >= 1)
        // Asked again, the block is no longer complete: lookup stops before it.
        #expect(pool.lookup(hashes) == 0)
    }

    @Test func wholeBlocksRoundTripInBothLayoutsAndGeometriesNeverShareBytes() throws {
        let store = try kvStore()
        var geometry = smallGeometry
        geometry.layout = .wholeBlock
        let whole = try KVPool(store: store, geometry: geometry, modelID: "m")
        let layered = try KVPool(store: store, geometry: smallGeometry, modelID: "m")
        let hashes = whole.blockHashes(tokens: Array(0..<8))
        let blocks = (0..<2).map { blockBytes(UInt64(100 + $0), geometry.blockBytes) }
        #expect(blocks.withBuffers { whole.store(hashes, blocks: $0) }.allSucceeded)
        #expect(whole.lookup(hashes) == 2)
        #expect(layered.lookup(hashes) == 0, "same model and tokens, other layout: not the same pages")
        var out = [[UInt8]](repeating: [UInt8](repeating: 0, count: geometry.blockBytes), count: 2)
        #expect(out.withMutableBuffers { whole.load(hashes, into: $0) }.allSucceeded && out == blocks)
        #expect(blocks.withBuffers { layered.store(hashes, blocks: $0) }.allSucceeded)
        #expect(layered.lookup(hashes) == 2)
        var layer2 = [[UInt8]](repeating: [UInt8](repeating: 0, count: smallGeometry.layerBytes), count: 2)
        #expect(layer2.withMutableBuffers { layered.load(hashes, layer: 2, into: $0) }.allSucceeded)
        #expect(layer2 == blocks.map { Array($0[(2 * smallGeometry.layerBytes)...]) })
    }

    @Test func badInputGetsClearErrorsAndStoresNothing() throws {
        let store = try kvStore()
        let pool = try KVPool(store: store, geometry: smallGeometry, modelID: "m")
        let hashes = pool.blockHashes(tokens: Array(0..<8))
        let wrongSize = [blockBytes(1, 100), blockBytes(2, 100)].withBuffers { pool.store(hashes, blocks: $0) }
        guard case .invalidArgument = wrongSize.firstError else {
            Issue.record("wrong buffer size: \(String(describing: wrongSize.firstError))")
            return
        }
        #expect(store.stats().tiers[0].pages == 0)
        let wrongCount = [blockBytes(1, smallGeometry.blockBytes)].withBuffers { pool.store(hashes, blocks: $0) }
        #expect(!wrongCount.allSucceeded)
        let wrongLayer = [blockBytes(1, smallGeometry.layerBytes)].withBuffers { pool.storeLayer([hashes[0]], layer: 3, buffers: $0) }
        #expect(!wrongLayer.allSucceeded)
        #expect(throws: SpillwayError.self) {
            _ = try KVPool(store: store, geometry: KVBlockGeometry(tokensPerBlock: 0, layers: 1, kvHeads: 1, headDim: 1, dtypeSize: 2), modelID: "m")
        }
        #expect(throws: SpillwayError.self) {  // a layer block larger than the store's pages
            _ = try KVPool(store: store, geometry: KVBlockGeometry(tokensPerBlock: 256, layers: 1, kvHeads: 8, headDim: 128, dtypeSize: 2), modelID: "m")
        }
        // Loading a block that was never stored: a per-block error, never bytes.
        var out = [[UInt8]](repeating: [UInt8](repeating: 7, count: smallGeometry.blockBytes), count: 2)
        let missing = out.withMutableBuffers { pool.load(hashes, into: $0) }
        guard case .unknownKey = missing.errors[0] else {
            Issue.record("missing block: \(String(describing: missing.errors[0]))")
            return
        }
        pool.close()
        guard case .closed = [blockBytes(1, smallGeometry.blockBytes)].withBuffers({ pool.store([hashes[0]], blocks: $0) }).firstError else {
            Issue.record("a closed pool must refuse")
            return
        }
    }

    @Test func aLostPageFailsOnlyItsBlock() throws {
        let store = try kvStore()
        let pool = try KVPool(store: store, geometry: smallGeometry, modelID: "m")
        let hashes = pool.blockHashes(tokens: Array(0..<12))
        let blocks = (0..<3).map { blockBytes(UInt64(200 + $0), smallGeometry.blockBytes) }
        #expect(blocks.withBuffers { pool.store(hashes, blocks: $0) }.allSucceeded)
        // The store loses one layer page of block 1 (e.g. evicted under pressure).
        #expect(try store.remove(pool.dataKey(hashes[1], layer: 1)))
        #expect(pool.lookup(hashes) == 1)
        var out = [[UInt8]](repeating: [UInt8](repeating: 0, count: smallGeometry.blockBytes), count: 3)
        let result = out.withMutableBuffers { pool.load(hashes, into: $0) }
        #expect(result.contiguous == 1 && result.succeeded == 2 && result.errors[1] != nil)
        #expect(out[0] == blocks[0] && out[2] == blocks[2])
    }

    @Test func closeFinishesQueuedAsyncStoresThenRefuses() throws {
        let store = try kvStore()
        let pool = try KVPool(store: store, geometry: smallGeometry, modelID: "m")
        let hashes = pool.blockHashes(tokens: Array(0..<80))  // 20 blocks
        let blocks = hashes.indices.map { blockBytes(UInt64(500 + $0), smallGeometry.blockBytes) }
        try blocks.withBuffers { buffers in
            let tickets = hashes.indices.map { pool.storeAsync([hashes[$0]], buffers: [buffers[$0]]) }
            pool.close()  // while stores are queued
            for ticket in tickets { #expect(ticket.wait(timeout: 30)?.allSucceeded == true, "a queued store runs before close returns") }
        }
        #expect(pool.lookup(hashes) == 20)
        let late = try #require([blocks[0]].withBuffers { pool.storeAsync([hashes[0]], buffers: $0).wait(timeout: 30) })
        guard case .closed = late.firstError else {
            Issue.record("a closed pool must refuse new stores")
            return
        }
        _ = try? store.remove(PageKey(0))
    }

    @Test func asyncStoresPinsEvictionAndClear() throws {
        let store = try kvStore()
        let pool = try KVPool(store: store, geometry: smallGeometry, modelID: "m")
        let hashes = pool.blockHashes(tokens: Array(0..<40))  // 10 blocks
        let blocks = hashes.indices.map { blockBytes(UInt64(300 + $0), smallGeometry.blockBytes) }
        var tickets: [KVStoreTicket] = []
        try blocks.withBuffers { buffers in
            for index in hashes.indices {
                tickets.append(pool.storeAsync([hashes[index]], buffers: [buffers[index]]))
            }
            for ticket in tickets { #expect(ticket.wait(timeout: 30)?.allSucceeded == true) }
            try pool.pin(Array(hashes[0..<2]))
            #expect(throws: SpillwayError.self) { _ = try store.remove(pool.dataKey(hashes[0], layer: 0)) }
            try pool.unpin(Array(hashes[0..<2]))
        }
        #expect(pool.lookup(hashes) == 10)
        #expect(pool.evict([hashes[5]]) == 1)
        #expect(pool.lookup(hashes) == 5)
        #expect(pool.clear() == 9)
        #expect(pool.lookup(hashes) == 0)
        #expect(store.stats().tiers[0].pages == 0)
        #expect(throws: SpillwayError.self) { try pool.pin([hashes[0]]) }
    }
}

extension Array where Element == [UInt8] {
    func withBuffers<R>(_ body: ([UnsafeRawBufferPointer]) throws -> R) rethrows -> R {
        let copies = map { bytes -> UnsafeMutableRawBufferPointer in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Swift.max(1, bytes.count), alignment: 64)
            buffer.copyBytes(from: bytes)
            return UnsafeMutableRawBufferPointer(rebasing: buffer[0..<bytes.count])
        }
        defer { for copy in copies { copy.deallocate() } }
        return try body(copies.map { UnsafeRawBufferPointer($0) })
    }

    mutating func withMutableBuffers<R>(_ body: ([UnsafeMutableRawBufferPointer]) throws -> R) rethrows -> R {
        let copies = map { bytes -> UnsafeMutableRawBufferPointer in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Swift.max(1, bytes.count), alignment: 64)
            buffer.copyBytes(from: bytes)
            return UnsafeMutableRawBufferPointer(rebasing: buffer[0..<bytes.count])
        }
        defer { for copy in copies { copy.deallocate() } }
        let result = try body(copies)
        for index in indices { self[index] = [UInt8](copies[index]) }
        return result
    }
}
