import Foundation
import Testing
@testable import SpillwayCore
@testable import SpillwayKV
@testable import SpillwayMemoryTiers
@testable import SpillwayStore
import SpillwayPolicy
@testable import SpillwayWeights

/// Streaming a model through `WeightStreamer` must not flush hot KV blocks out of tier 0.
@Suite(.serialized) struct WeightsPolicyTests {
    /// Tier 0: 64 slots (256 KiB) over 2048 DRAM slots. Registers a ~2.7 MiB model, fills 48
    /// of tier 0's slots with 16 KV blocks (3 pages each), streams every layer twice, running the
    /// store's maintenance (what its background worker does) after each layer so demotions are
    /// deterministic. Returns how many of the KV pages are still in tier 0, and their count.
    func kvPagesLeftInTierZero(policy: StorePolicy, name: String) throws -> (left: Int, total: Int) {
        let model = scratch("policy-\(name).safetensors")
        defer { unlink(model) }
        try writeModel(model, layers: 6)
        let store = try TieredStore(
            tiers: [try DeviceTier(slotSize: 4096, capacitySlots: 64, memory: HostDeviceMemory(prefault: false)),
                    try DRAMTier(slotSize: 4096, capacitySlots: 2048, prefault: false)],
            policy: policy, options: StoreOptions(maxPageSize: 64 << 10, backgroundWorker: false))
        defer { store.close() }
        let weights = try ModelWeights(store: store, path: model, modelID: "big", chunkBytes: 16 << 10)
        let modelBytes = weights.layers.reduce(0) { $0 + weights.bytes(layer: $1) }
        #expect(modelBytes > 64 * 4096, "the model is larger than tier 0")

        let geometry = KVBlockGeometry(tokensPerBlock: 16, layers: 2, kvHeads: 2, headDim: 16, dtypeSize: 2)
        let pool = try KVPool(store: store, geometry: geometry, modelID: "big")
        defer { pool.close() }
        let hashes = pool.blockHashes(tokens: (0..<(16 * 16)).map { UInt32($0) })
        let blocks = hashes.indices.map { [UInt8](repeating: UInt8($0), count: geometry.blockBytes) }
        let stored = blocks.withBufferList { pool.store(hashes, blocks: $0) }
        #expect(stored.allSucceeded)
        let kvKeys = hashes.flatMap { block in [pool.dataKey(block, layer: 0), pool.dataKey(block, layer: 1), pool.manifestKey(block)] }
        #expect(kvKeys.allSatisfy { store.location(of: $0)?.tier == 0 }, "the KV blocks start in tier 0")

        let largest = weights.layers.map { weights.bytes(layer: $0) }.max()!
        let unit = 64 << 10
        let streamer = try WeightStreamer(weights: weights, deviceBudget: 4 * ((largest + unit) / unit) * unit, prefetchDepth: 2)
        defer { streamer.close() }
        for _ in 0..<2 {
            for layer in weights.layers {
                let acquired = try streamer.acquire(layer: layer)
                #expect(acquired.tensors.count == weights.tensors(layer: layer).count)
                streamer.release(layer: layer)
                store.runMaintenance()
            }
        }
        return (kvKeys.filter { store.location(of: $0)?.tier == 0 }.count, kvKeys.count)
    }

    @Test func streamingWeightsKeepsKVBlocksInTierZero() throws {
        let outcome = try kvPagesLeftInTierZero(policy: try StorePolicy.named("class-aware-lru"), name: "class-aware")
        #expect(outcome.left == outcome.total, "\(outcome.total - outcome.left) KV pages were pushed out of tier 0")
    }

    /// The behaviour before page classes (LRU promoted every streamed chunk): the same run
    /// pushes KV blocks out, so the test above does measure the fix.
    @Test func underPlainLRUStreamingDisplacesKVBlocks() throws {
        let outcome = try kvPagesLeftInTierZero(policy: try StorePolicy.named("lru"), name: "lru")
        #expect(outcome.left < outcome.total)
    }

    /// Layer-ahead loading is the store policy's prefetcher: next-N for weights under the class
    /// rules (their hints say they stream in layer order), Leap's trend detection under plain LRU.
    @Test(arguments: [("class-aware-lru", "next-2"), ("lru", "leap")])
    func layerAheadPrefetchIsThePolicysDecision(policy: String, prefetcher: String) throws {
        let model = scratch("prefetch-\(policy).safetensors")
        defer { unlink(model) }
        try writeModel(model, layers: 8)
        let store = try TieredStore(tiers: [try DRAMTier(slotSize: 4096, capacitySlots: 4096, prefault: false)],
                                    policy: try StorePolicy.named(policy), options: StoreOptions(maxPageSize: 1 << 20, backgroundWorker: false))
        defer { store.close() }
        let weights = try ModelWeights(store: store, path: model, modelID: "m", chunkBytes: 64 << 10)
        let largest = weights.layers.map { weights.bytes(layer: $0) }.max()!
        let unit = 64 << 10
        let streamer = try WeightStreamer(weights: weights, deviceBudget: 3 * ((largest + unit) / unit) * unit, prefetchDepth: 2)
        defer { streamer.close() }
        #expect(streamer.prefetcherName == prefetcher)
        for _ in 0..<3 {
            for layer in weights.layers {
                _ = try streamer.acquire(layer: layer)
                streamer.release(layer: layer)
            }
        }
        let counters = streamer.prefetchCounters
        let acquires = 3 * weights.layers.count
        #expect(counters.accesses == acquires)
        #expect(counters.issued > 0 && counters.useful > 0, "\(counters)")
        #expect(counters.accuracy > 0.7, "prefetched layers are used: \(counters)")
        // Layer-ahead knows the trend at once; Leap needs a few layers per pass to see it.
        #expect(counters.coverage > (prefetcher == "next-2" ? 0.8 : 0.4), "\(counters)")
    }

    @Test func registrationStoresChunksAsWeightsInLayerOrder() throws {
        let model = scratch("hints.safetensors")
        defer { unlink(model) }
        try writeModel(model, layers: 3)
        let store = try TieredStore(tiers: [try DRAMTier(slotSize: 4096, capacitySlots: 1024, prefault: false)],
                                    options: StoreOptions(maxPageSize: 1 << 20, backgroundWorker: false))
        defer { store.close() }
        let weights = try ModelWeights(store: store, path: model, modelID: "m", chunkBytes: 64 << 10)
        #expect(weights.layers == [-1, 0, 1, 2])
        for (order, layer) in weights.layers.enumerated() {
            for tensor in weights.tensors(layer: layer) {
                let key = ModelWeights.key(modelID: "m", tensor: tensor.name, chunk: 0)
                #expect(store.hints(of: key) == .weights(layerOrder: order), "\(tensor.name)")
            }
        }
        // Pages that lost their hints (as after a warm restart: recovered pages are generic)
        // are re-tagged by a registration that finds them stored, without copying them again.
        let first = ModelWeights.key(modelID: "m", tensor: weights.tensors(layer: 0)[0].name, chunk: 0)
        #expect(store.setHints(.generic, of: first))
        #expect(store.hints(of: first) == .generic)
        let putsBefore = store.stats().puts
        _ = try ModelWeights(store: store, path: model, modelID: "m", chunkBytes: 64 << 10)
        #expect(store.stats().puts == putsBefore)
        #expect(store.hints(of: first) == .weights(layerOrder: 1))
        #expect(!store.setHints(.generic, of: PageKey(12345)))
    }
}

extension Array where Element == [UInt8] {
    /// The arrays' bytes as buffers, valid inside `body`.
    func withBufferList<R>(_ body: ([UnsafeRawBufferPointer]) throws -> R) rethrows -> R {
        var pointers: [UnsafeRawBufferPointer] = []
        var copies: [UnsafeMutableRawBufferPointer] = []
        defer { copies.forEach { $0.deallocate() } }
        for bytes in self {
            let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 16)
            bytes.withUnsafeBytes { copy.copyMemory(from: $0) }
            copies.append(copy)
            pointers.append(UnsafeRawBufferPointer(copy))
        }
        return try body(pointers)
    }
}
