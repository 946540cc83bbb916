import Histogram
import Spillway

#if canImport(Glibc)
import Glibc
#endif

/// `spillway bench weights`: streams a model's layers from an NVMe tier into a device-memory
/// budget, layer after layer (FlexGen-style), with `prefetch` layers loading ahead, and reports
/// the streaming bandwidth and the stall per layer. Without a model file it writes a
/// synthetic one (`layers` layers of q/k/up projections and a norm at `hidden` width, fp16).
public enum WeightsBench {
    public struct Options: Sendable {
        public var model: String?
        public var prefetch = 2
        public var durationSeconds: Double = 3
        public var computeMicroseconds = 0
        public var nvmeFile: String?
        public var layers = 12
        public var hidden = 2048
        public init() {}
    }

    /// Writes the synthetic model; returns its path.
    public static func synthesize(_ options: Options) throws(SpillwayError) -> String {
        let path = try ScratchDirectory.file("spillway-bench-model.safetensors")
        var tensors: [(name: String, dtype: String, shape: [Int])] = [("model.embed_tokens.weight", "F16", [1024, options.hidden])]
        for layer in 0..<options.layers {
            tensors.append(("model.layers.\(layer).self_attn.q_proj.weight", "F16", [options.hidden, options.hidden]))
            tensors.append(("model.layers.\(layer).self_attn.k_proj.weight", "F16", [options.hidden / 2, options.hidden]))
            tensors.append(("model.layers.\(layer).mlp.up_proj.weight", "F16", [options.hidden * 2, options.hidden]))
            tensors.append(("model.layers.\(layer).input_layernorm.weight", "F32", [options.hidden]))
        }
        tensors.append(("model.norm.weight", "F32", [options.hidden]))
        try SafetensorsFile.write(path: path, tensors: tensors) { name, buffer in
            var generator = SplitMix64(seed: UInt64(name.utf8.count) &* 0x9E37_79B9_7F4A_7C15)
            let words = buffer.count / 8
            let base = buffer.baseAddress!
            for index in 0..<words { base.storeBytes(of: generator.next(), toByteOffset: index * 8, as: UInt64.self) }
            for index in (words * 8)..<buffer.count { buffer[index] = 0x5A }
        }
        return path
    }

    public static func run(_ options: Options) throws(SpillwayError) -> JSONValue {
        let model: String
        if let given = options.model { model = given } else { model = try synthesize(options) }
        let file = try SafetensorsFile(path: model)
        let chunk = 4 << 20
        let slot = 64 << 10
        let capacitySlots = file.tensors.reduce(0) { $0 + ($1.byteCount + slot - 1) / slot } + 64
        var tier = TierConfiguration(kind: .nvme, capacity: capacitySlots * slot)
        tier.path = if let file = options.nvmeFile { file } else { try ScratchDirectory.file("spillway-bench-weights.nvme") }
        tier.reformat = true
        let store = try TieredStore.open(SpillwayConfiguration(slotSize: slot, maxPageSize: chunk, tiers: [tier]))
        defer { store.close() }
        let registerStart = monotonicNanoseconds()
        let weights = try ModelWeights(store: store, path: model, modelID: "bench", tier: 0, chunkBytes: chunk)
        let registerSeconds = Double(monotonicNanoseconds() &- registerStart) / 1e9
        let largest = weights.layers.map { weights.bytes(layer: $0) }.max() ?? 0
        let budget = (options.prefetch + 1) * ((largest + slot - 1) / slot * slot) + slot
        let streamer = try WeightStreamer(weights: weights, deviceBudget: budget, prefetchDepth: options.prefetch)
        defer { streamer.close() }
        var streamed = 0
        var passes = 0
        var checksum: UInt64 = 0
        let start = monotonicNanoseconds()
        let deadline = start &+ UInt64(options.durationSeconds * 1e9)
        repeat {
            for layer in weights.layers {
                let acquired = try streamer.acquire(layer: layer)
                // Touch the layer (a stand-in for compute), optionally spin for compute time.
                for (_, bytes) in acquired.tensors where bytes.count >= 8 { checksum ^= bytes.loadUnaligned(as: UInt64.self) }
                if options.computeMicroseconds > 0 {
                    let until = monotonicNanoseconds() &+ UInt64(options.computeMicroseconds) * 1000
                    while monotonicNanoseconds() < until {}
                }
                streamed += weights.bytes(layer: layer)
                streamer.release(layer: layer)
            }
            passes += 1
        } while monotonicNanoseconds() < deadline
        let seconds = Double(monotonicNanoseconds() &- start) / 1e9
        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        let stalls = streamer.stallNanoseconds.perAcquire
        for stall in stalls { _ = histogram.record(max(1, stall)) }
        let total = stalls.reduce(0, +)
        return .object([
            ("tier", .string("weights")), ("model", .string(model)), ("model_bytes", .int(file.fileSize)),
            ("nvme_file", .string(tier.path ?? "")),
            ("layers", .int(weights.layers.count)), ("prefetch", .int(options.prefetch)), ("passes", .int(passes)),
            ("bytes_per_s", .double(Double(streamed) / seconds)), ("duration_s", .double(seconds)),
            ("compute_us_per_layer", .int(options.computeMicroseconds)), ("register_s", .double(registerSeconds)),
            ("stall_ns", .object([
                ("mean", .int(stalls.isEmpty ? 0 : Int(total / UInt64(stalls.count)))), ("p50", .int(Int(histogram.valueAtPercentile(50)))),
                ("p99", .int(Int(histogram.valueAtPercentile(99)))), ("max", .int(Int(histogram.max))),
                ("total", .int(Int(total))),
            ])),
            ("stall_fraction", .double(Double(total) / 1e9 / seconds)), ("checksum", .int(Int(truncatingIfNeeded: checksum))),
        ])
    }
}
