import Foundation
import Testing
@testable import SpillwayCore
@testable import SpillwayMemoryTiers
@testable import SpillwayNVMe
@testable import SpillwayStore
@testable import SpillwayWeights

func scratch(_ name: String) -> String {
    (ProcessInfo.processInfo.environment["SPILLWAY_TMPDIR"] ?? NSTemporaryDirectory()) + "/spillway-weights-\(getpid())-\(name)"
}

/// Deterministic tensor bytes: derived from the name.
func fillTensor(_ name: String, _ buffer: UnsafeMutableRawBufferPointer) {
    var generator = SplitMix64(seed: UInt64(truncatingIfNeeded: name.hashValueStable))
    for index in 0..<buffer.count { buffer[index] = UInt8(truncatingIfNeeded: generator.next()) }
}

extension String {
    /// FNV-1a (Swift's hashValue is randomized per process).
    var hashValueStable: UInt64 { utf8.reduce(0xcbf2_9ce4_8422_2325) { ($0 ^ UInt64($1)) &* 0x100_0000_01b3 } }
}

/// A small model: an embedding, `layers` layers of four tensors, a final norm.
func writeModel(_ path: String, layers: Int = 4, hidden: Int = 256) throws {
    var tensors: [(name: String, dtype: String, shape: [Int])] = [("model.embed_tokens.weight", "F16", [64, hidden])]
    for layer in 0..<layers {
        tensors.append(("model.layers.\(layer).self_attn.q_proj.weight", "F16", [hidden, hidden]))
        tensors.append(("model.layers.\(layer).self_attn.k_proj.weight", "BF16", [hidden / 2, hidden]))
        tensors.append(("model.layers.\(layer).mlp.up_proj.weight", "F16", [hidden * 2, hidden]))
        tensors.append(("model.layers.\(layer).input_layernorm.weight", "F32", [hidden]))
    }
    tensors.append(("model.norm.weight", "F32", [hidden]))
    try SafetensorsFile.write(path: path, tensors: tensors, metadata: ["format": "pt"], fill: fillTensor)
}

@Suite(.serialized) struct WeightsTests {
    @Test func safetensorsRoundTripAndLayerGrouping() throws {
        let path = scratch("model.safetensors")
        defer { unlink(path) }
        try writeModel(path)
        let file = try SafetensorsFile(path: path)
        #expect(file.tensors.count == 18)
        #expect(file.layers == [0, 1, 2, 3])
        #expect(file.metadata["format"] == "pt")
        let q = try #require(file.tensors.first { $0.name == "model.layers.2.self_attn.q_proj.weight" })
        #expect(q.layer == 2 && q.dtype == "F16" && q.shape == [256, 256] && q.byteCount == 256 * 256 * 2)
        #expect(file.tensors.first { $0.name == "model.norm.weight" }?.layer == nil)
        #expect(SafetensorsFile.layerIndex("transformer.h.11.attn.c_attn.weight") == 11)
        #expect(SafetensorsFile.layerIndex("encoder.layer.3.output.dense.weight") == 3)
    }

    @Test func malformedFilesAreRefusedWithAReason() throws {
        let path = scratch("bad.safetensors")
        defer { unlink(path) }
        func write(_ header: String, data: Int = 0, lengthOverride: UInt64? = nil) throws {
            var bytes = [UInt8]()
            withUnsafeBytes(of: (lengthOverride ?? UInt64(header.utf8.count)).littleEndian) { bytes += $0 }
            bytes += Array(header.utf8) + [UInt8](repeating: 0, count: data)
            try Data(bytes).write(to: URL(fileURLWithPath: path))
        }
        let cases: [(String, Int, UInt64?)] = [
            ("{}", 0, 1 << 40),                                                                      // header longer than the file
            ("not json", 0, nil),                                                                   // not JSON
            (#"{"a": {"dtype": "F17", "shape": [1], "data_offsets": [0, 2]}}"#, 2, nil),          // unknown dtype
            (#"{"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 2]}}"#, 2, nil),          // size ≠ shape × dtype
            (#"{"a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}"#, 1, nil),          // outside the data
            (#"{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}"#, 3, nil),  // overlap
            (#"{"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}"#, 0, nil),          // negative dimension
        ]
        for (header, data, length) in cases {
            try write(header, data: data, lengthOverride: length)
            #expect(throws: SpillwayError.self, "\(header)") { _ = try SafetensorsFile(path: path) }
        }
        try Data([1, 2, 3]).write(to: URL(fileURLWithPath: path))
        #expect(throws: SpillwayError.self) { _ = try SafetensorsFile(path: path) }
    }

    @Test func layersStreamFromNVMeWithPrefetchAndMatchTheFile() throws {
        let model = scratch("stream.safetensors")
        let nvme = scratch("stream.nvme")
        defer {
            unlink(model)
            unlink(nvme)
        }
        try writeModel(model, layers: 6)
        let store = try TieredStore(
            tiers: [try NVMeTier(NVMeTierConfiguration(path: nvme, slotSize: 4096, capacitySlots: 2048))],
            options: StoreOptions(maxPageSize: 1 << 20, backgroundWorker: false))
        defer { store.close() }
        // 64 KiB chunks: the 256 KiB up_proj tensors become several pages each.
        let weights = try ModelWeights(store: store, path: model, modelID: "tiny", chunkBytes: 64 << 10)
        #expect(weights.layers == [-1, 0, 1, 2, 3, 4, 5])
        // Registering again copies nothing (the pages are there).
        let putsBefore = store.stats().puts
        _ = try ModelWeights(store: store, path: model, modelID: "tiny", chunkBytes: 64 << 10)
        #expect(store.stats().puts == putsBefore)
        let largest = weights.layers.map { weights.bytes(layer: $0) }.max()!
        #expect(throws: SpillwayError.self) { _ = try WeightStreamer(weights: weights, deviceBudget: largest, prefetchDepth: 2) }
        let streamer = try WeightStreamer(weights: weights, deviceBudget: 4 * ((largest + (64 << 10)) / (64 << 10)) * (64 << 10), prefetchDepth: 2)
        defer { streamer.close() }
        for _ in 0..<2 {  // twice: the second pass reuses the budget
            for layer in weights.layers {
                let acquired = try streamer.acquire(layer: layer)
                #expect(acquired.tensors.count == weights.tensors(layer: layer).count)
                for (info, bytes) in acquired.tensors {
                    let expected = UnsafeMutableRawBufferPointer.allocate(byteCount: info.byteCount, alignment: 8)
                    defer { expected.deallocate() }
                    fillTensor(info.name, expected)
                    #expect(memcmp(expected.baseAddress!, bytes.baseAddress!, info.byteCount) == 0, "tensor \(info.name)")
                }
                streamer.release(layer: layer)
            }
        }
        #expect(streamer.stallNanoseconds.perAcquire.count == 2 * weights.layers.count)
        #expect(throws: SpillwayError.self) { _ = try streamer.acquire(layer: 99) }
    }
}
