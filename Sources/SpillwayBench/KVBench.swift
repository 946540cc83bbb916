import Histogram
import Spillway
import SpillwayServer

#if canImport(Glibc)
import Glibc
#endif

/// A model's KV-cache block shape for `spillway bench kv`: a pinned preset (from the model's
/// published config) or a custom one.
public struct KVBenchGeometry: Sendable, Equatable {
    public var name: String
    public var tokensPerBlock: Int
    public var layers: Int
    public var kvHeads: Int
    public var headDim: Int
    /// "fp16" or "bf16" (both 2 bytes).
    public var dtype: String

    public init(name: String, tokensPerBlock: Int, layers: Int, kvHeads: Int, headDim: Int, dtype: String) {
        self.name = name
        self.tokensPerBlock = tokensPerBlock
        self.layers = layers
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.dtype = dtype
    }

    /// Presets, pinned (16 tokens per block, bf16; layers, KV heads and head dim from each
    /// model's config.json): one layer's K and V of one block = 2 × 16 × heads × 128 × 2 B.
    public static let presets: [KVBenchGeometry] = [
        // 32 layers × 65,536 B = 2 MiB per block.
        KVBenchGeometry(name: "llama-3-8b", tokensPerBlock: 16, layers: 32, kvHeads: 8, headDim: 128, dtype: "bf16"),
        // 80 layers × 65,536 B = 5 MiB per block.
        KVBenchGeometry(name: "llama-3-70b", tokensPerBlock: 16, layers: 80, kvHeads: 8, headDim: 128, dtype: "bf16"),
        // 28 layers × 32,768 B = 896 KiB per block.
        KVBenchGeometry(name: "qwen2.5-7b", tokensPerBlock: 16, layers: 28, kvHeads: 4, headDim: 128, dtype: "bf16"),
    ]

    public static let dtypes = ["fp16", "bf16"]
    /// Largest custom layer slice (one layer's K and V of one block).
    public static let maxLayerBytes = 16 << 20
    /// Largest custom block (every layer).
    public static let maxBlockBytes = 1 << 30

    /// A preset by name, or (`custom`) the given shape, validated; every missing or
    /// out-of-range value is a clear error.
    public static func resolve(_ name: String, tokensPerBlock: Int? = nil, layers: Int? = nil, kvHeads: Int? = nil,
                               headDim: Int? = nil, dtype: String? = nil) throws(SpillwayError) -> KVBenchGeometry
    {
        let customGiven = [tokensPerBlock, layers, kvHeads, headDim].contains { $0 != nil } || dtype != nil
        if name != "custom" {
            guard let preset = presets.first(where: { $0.name == name }) else {
                throw .invalidArgument("--geometry '\(name)' (one of \((presets.map(\.name) + ["custom"]).joined(separator: ", ")))")
            }
            guard !customGiven else {
                throw .invalidArgument("--tokens-per-block, --layers, --kv-heads, --head-dim and --dtype go with --geometry custom, not \(name)")
            }
            return preset
        }
        var missing: [String] = []
        if tokensPerBlock == nil { missing.append("--tokens-per-block") }
        if layers == nil { missing.append("--layers") }
        if kvHeads == nil { missing.append("--kv-heads") }
        if headDim == nil { missing.append("--head-dim") }
        guard missing.isEmpty else { throw .invalidArgument("--geometry custom needs \(missing.joined(separator: ", "))") }
        let dtype = dtype ?? "bf16"
        guard dtypes.contains(dtype) else { throw .invalidArgument("--dtype '\(dtype)' (fp16 or bf16)") }
        let bounds: [(String, Int, ClosedRange<Int>)] = [
            ("--tokens-per-block", tokensPerBlock!, 1...4096), ("--layers", layers!, 1...1024),
            ("--kv-heads", kvHeads!, 1...1024), ("--head-dim", headDim!, 1...1024),
        ]
        for (option, value, range) in bounds where !range.contains(value) {
            throw .invalidArgument("\(option) \(value) must be between \(range.lowerBound) and \(range.upperBound)")
        }
        let geometry = KVBenchGeometry(name: "custom", tokensPerBlock: tokensPerBlock!, layers: layers!, kvHeads: kvHeads!,
                                       headDim: headDim!, dtype: dtype)
        guard geometry.layerBytes <= maxLayerBytes else {
            throw .invalidArgument("custom geometry: one layer's K and V of a block is \(geometry.layerBytes) bytes (2 × tokens × KV heads × head dim × 2 B); at most \(maxLayerBytes)")
        }
        guard geometry.blockBytes <= maxBlockBytes else {
            throw .invalidArgument("custom geometry: a block is \(geometry.blockBytes) bytes (layers × \(geometry.layerBytes)); at most \(maxBlockBytes)")
        }
        return geometry
    }

    public var dtypeSize: Int { 2 }
    public var layerBytes: Int { 2 * tokensPerBlock * kvHeads * headDim * dtypeSize }
    public var blockBytes: Int { layers * layerBytes }

    public var block: KVBlockGeometry {
        KVBlockGeometry(tokensPerBlock: tokensPerBlock, layers: layers, kvHeads: kvHeads, headDim: headDim, dtypeSize: dtypeSize,
                        layout: .perLayer)
    }

    /// The store slot a layer page fits: the next power of two ≥ layer_bytes, 4 KiB…2 MiB (a
    /// larger layer spans several 2 MiB slots).
    public var slotSize: Int {
        var slot = 4096
        while slot < layerBytes && slot < 2 << 20 { slot <<= 1 }
        return slot
    }

    /// Store slots one block takes: its layer pages and its manifest page.
    var slotsPerBlock: Int { layers * ((layerBytes + slotSize - 1) / slotSize) + 1 }

    public var json: JSONValue {
        .object([("tokens_per_block", .int(tokensPerBlock)), ("layers", .int(layers)), ("kv_heads", .int(kvHeads)),
                 ("head_dim", .int(headDim)), ("dtype", .string(dtype))])
    }
}

/// `spillway bench kv`: per-layer KV offload through a `KVPool` at a model's real block shape,
/// as a serving engine's layer-wise KV connector drives it.
///
/// Untimed prefill stores every block of the working set once. Save phase: random blocks, each
/// stored layer by layer (one `storeLayer` call per layer, after each layer's forward pass) from
/// a source buffer. Load phase: random stored blocks loaded layer by layer into one reused layer
/// buffer (`load(_:layer:into:)`). Every layer call is timed (an HdrHistogram each for save and
/// load); each loaded layer's first 16 bytes are checked against the (block, layer) stamp its
/// save wrote. Buffers, hashes and argument arrays are allocated before timing; the timed loops
/// allocate nothing beyond what `KVPool` itself does per call.
public enum KVBench {
    public struct Options: Sendable {
        public var geometry: KVBenchGeometry
        /// Bytes of KV blocks the pool holds (whole blocks: rounded down to a block).
        public var workingSet = 256 << 20
        /// Seconds of each phase (save, then load).
        public var durationSeconds: Double = 3
        public var seed: UInt64 = 42
        /// Blocks per layer call (a connector saves or loads one layer of every block of a batch
        /// at once); 1 = one layer of one block per call.
        public var blocksPerCall = 1

        public init(geometry: KVBenchGeometry) { self.geometry = geometry }

        public static let maxWorkingSet = 64 << 30

        public func validate() throws(SpillwayError) {
            guard durationSeconds > 0, durationSeconds <= 86_400 else { throw .invalidArgument("--duration must be between 0 and 86400 seconds") }
            guard (1...256).contains(blocksPerCall) else { throw .invalidArgument("--blocks-per-call must be between 1 and 256") }
            guard workingSet <= Self.maxWorkingSet else {
                throw .invalidArgument("--working-set \(workingSet) exceeds \(Self.maxWorkingSet) bytes")
            }
            let need = max(2, blocksPerCall) * geometry.blockBytes
            guard workingSet >= need else {
                throw .invalidArgument("--working-set \(workingSet) must hold at least \(max(2, blocksPerCall)) blocks of \(geometry.blockBytes) bytes (\(geometry.name): \(geometry.layers) layers × \(geometry.layerBytes)), i.e. ≥ \(need)")
            }
        }

        var blocks: Int { workingSet / geometry.blockBytes }
    }

    /// The store a run on one tier uses: `tier` alone (its settings from the configuration, or a
    /// fresh tier of that kind from `base`), with the geometry's slot size and room for every
    /// block's pages, their manifests and copy-on-write slack.
    public static func singleTierConfiguration(_ tier: TierConfiguration, options: Options, policy: String) -> SpillwayConfiguration {
        let geometry = options.geometry
        let slots = options.blocks * geometry.slotsPerBlock + 2 * options.blocksPerCall * geometry.slotsPerBlock + 64
        var tier = tier
        tier.capacity = slots * geometry.slotSize
        return SpillwayConfiguration(slotSize: geometry.slotSize, maxPageSize: max(geometry.slotSize, geometry.layerBytes),
                                     policy: policy, tiers: [tier])
    }

    /// The whole configured hierarchy with the geometry's slot size; refused if it cannot hold
    /// the working set (the pool's blocks would be evicted and loads would miss).
    public static func tieredConfiguration(_ given: SpillwayConfiguration, options: Options) throws(SpillwayError) -> SpillwayConfiguration {
        var configuration = given
        let geometry = options.geometry
        configuration.slotSize = geometry.slotSize
        configuration.maxPageSize = max(configuration.maxPageSize, geometry.layerBytes, geometry.slotSize)
        let slots = configuration.tiers.reduce(0) { $0 + $1.capacity / geometry.slotSize }
        let need = options.blocks * geometry.slotsPerBlock + 2 * options.blocksPerCall * geometry.slotsPerBlock
        guard slots >= need else {
            throw .invalidArgument("the tiered store holds \(slots) slots of \(geometry.slotSize) bytes; --working-set \(options.workingSet) needs \(need): give a smaller --working-set")
        }
        return configuration
    }

    public static func run(_ options: Options, tier: String, configuration: SpillwayConfiguration,
                           progress: ProgressBar? = nil) throws(SpillwayError) -> KVBenchResult
    {
        try options.validate()
        let geometry = options.geometry
        let store = try TieredStore.open(configuration, daemons: InProcessDaemons())
        defer { store.close() }
        let pool = try KVPool(store: store, geometry: geometry.block, modelID: "spillway-bench-kv-\(geometry.name)")
        defer { pool.close() }
        let layers = geometry.layers
        let layerBytes = geometry.layerBytes
        let blockBytes = geometry.blockBytes
        let blocks = options.blocks
        let batch = options.blocksPerCall
        let stamped = layerBytes >= 16

        // Block hashes: block b is the first block of its own sequence (tokens b·T … b·T+T−1).
        var hashes: [BlockHash] = []
        hashes.reserveCapacity(blocks)
        var tokens = [UInt32](repeating: 0, count: geometry.tokensPerBlock)
        for block in 0..<blocks {
            for index in tokens.indices { tokens[index] = UInt32(truncatingIfNeeded: block &* geometry.tokensPerBlock &+ index) }
            hashes.append(pool.blockHashes(tokens: tokens)[0])
        }

        // Source: `batch` blocks of KV (pseudo-random bytes); each layer slice is stamped with
        // (block, layer) right before it is stored.
        let source = UnsafeMutableRawPointer.allocate(byteCount: batch * blockBytes, alignment: 4096)
        defer { source.deallocate() }
        BenchRunner.fillPage(UnsafeMutableRawBufferPointer(start: source, count: batch * blockBytes), key: 0x4B56, seed: options.seed)
        // saveBuffers[layer][i]: layer `layer` of source block i.
        let saveBuffers: [[UnsafeRawBufferPointer]] = (0..<layers).map { layer in
            (0..<batch).map { UnsafeRawBufferPointer(start: source + $0 * blockBytes + layer * layerBytes, count: layerBytes) }
        }
        // The one reused layer buffer (one layer slice per block of a call).
        let layerBuffer = UnsafeMutableRawPointer.allocate(byteCount: batch * layerBytes, alignment: 4096)
        defer { layerBuffer.deallocate() }
        let loadBuffers = (0..<batch).map { UnsafeMutableRawBufferPointer(start: layerBuffer + $0 * layerBytes, count: layerBytes) }
        var callHashes = [BlockHash](repeating: .root, count: batch)
        var callBlocks = [Int](repeating: 0, count: batch)

        @inline(__always) func stamp(block: Int, layer: Int) -> (UInt64, UInt64) {
            (UInt64(block) ^ 0x5350_4B56_0000_0000, UInt64(layer) &* 0x9E37_79B9_7F4A_7C15 ^ options.seed)
        }
        @inline(__always) func stampSource(_ index: Int, block: Int, layer: Int) {
            guard stamped else { return }
            let (first, second) = stamp(block: block, layer: layer)
            let base = source + index * blockBytes + layer * layerBytes
            base.storeBytes(of: first, as: UInt64.self)
            base.storeBytes(of: second, toByteOffset: 8, as: UInt64.self)
        }

        // Prefill (untimed): every block once, in order, `batch` at a time, layer by layer.
        var errors = 0
        var firstError: SpillwayError?
        var block = 0
        while block < blocks {
            let count = min(batch, blocks - block)
            for layer in 0..<layers {
                for index in 0..<count { stampSource(index, block: block + index, layer: layer) }
                let result = pool.storeLayer(Array(hashes[block..<(block + count)]), layer: layer,
                                             buffers: Array(saveBuffers[layer][0..<count]))
                if !result.allSucceeded { throw result.firstError ?? .invalidArgument("prefill store failed") }
            }
            block += count
            if block & 63 == 0 { progress?.update(fraction: 0, detail: "\(tier) prefill \(block)/\(blocks) blocks") }
        }
        let prefilled = pool.lookup(hashes)
        guard prefilled == blocks || configuration.tiers.count > 1 else {
            throw .invalidArgument("prefill: only \(prefilled) of \(blocks) blocks visible after storing them")
        }

        let durationNanos = UInt64(options.durationSeconds * 1e9)
        var random = SplitMix64(seed: options.seed)

        // Save phase.
        var saveHistogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var saveCalls = 0
        let saveDetail = "\(tier) save", loadDetail = "\(tier) load"
        let saveStart = monotonicNanoseconds()
        var now = saveStart
        repeat {
            for index in 0..<batch {
                let chosen = Int(random.next() % UInt64(blocks))
                callBlocks[index] = chosen
                callHashes[index] = hashes[chosen]
            }
            for layer in 0..<layers {
                for index in 0..<batch { stampSource(index, block: callBlocks[index], layer: layer) }
                let before = monotonicNanoseconds()
                let result = pool.storeLayer(callHashes, layer: layer, buffers: saveBuffers[layer])
                now = monotonicNanoseconds()
                _ = saveHistogram.record(max(1, now &- before))
                if !result.allSucceeded {
                    errors += batch - result.succeeded
                    firstError = firstError ?? result.firstError
                }
                saveCalls += 1
            }
            progress?.update(fraction: Double(now &- saveStart) / Double(durationNanos) / 2, detail: saveDetail)
        } while now &- saveStart < durationNanos
        let saveSeconds = Double(now &- saveStart) / 1e9

        // Load phase.
        var loadHistogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var loadCalls = 0
        var verified = 0
        var corrupt = 0
        let loadStart = monotonicNanoseconds()
        now = loadStart
        repeat {
            for index in 0..<batch {
                let chosen = Int(random.next() % UInt64(blocks))
                callBlocks[index] = chosen
                callHashes[index] = hashes[chosen]
            }
            for layer in 0..<layers {
                let before = monotonicNanoseconds()
                let result = pool.load(callHashes, layer: layer, into: loadBuffers)
                now = monotonicNanoseconds()
                _ = loadHistogram.record(max(1, now &- before))
                loadCalls += 1
                for index in 0..<batch {
                    if let error = result.errors[index] {
                        errors += 1
                        firstError = firstError ?? error
                    } else if stamped {
                        let (first, second) = stamp(block: callBlocks[index], layer: layer)
                        let base = layerBuffer + index * layerBytes
                        if base.load(as: UInt64.self) == first && base.load(fromByteOffset: 8, as: UInt64.self) == second {
                            verified += 1
                        } else {
                            corrupt += 1
                        }
                    }
                }
            }
            progress?.update(fraction: 0.5 + Double(now &- loadStart) / Double(durationNanos) / 2, detail: loadDetail)
        } while now &- loadStart < durationNanos
        let loadSeconds = Double(now &- loadStart) / 1e9
        progress?.finish()

        guard corrupt == 0 else {
            throw .invalidArgument("verification failed: \(corrupt) loaded layers of \(tier) held bytes other than their block's and layer's")
        }
        var nvme: (file: String, dataOffset: Int, directIO: Bool)?
        if configuration.tiers.count == 1, let tier = store.tiers[0] as? NVMeTier {
            nvme = (tier.path, tier.dataOffset, tier.directIO)
        }
        return KVBenchResult(
            tier: tier, geometry: geometry, blocks: blocks, blocksPerCall: batch, slotSize: configuration.slotSize,
            saveBytes: saveCalls * batch * layerBytes, saveSeconds: saveSeconds, saveCalls: saveCalls,
            loadBytes: loadCalls * batch * layerBytes, loadSeconds: loadSeconds, loadCalls: loadCalls,
            save: KVLatency(saveHistogram), load: KVLatency(loadHistogram), errors: errors,
            firstError: firstError.map { "\($0)" }, verifiedLayers: verified, stats: store.stats(), nvme: nvme)
    }
}

/// p50, p99, max of a latency histogram (0 when empty).
public struct KVLatency: Sendable {
    public var p50: UInt64
    public var p99: UInt64
    public var max: UInt64

    init(_ histogram: Histogram<UInt64>) {
        let empty = histogram.totalCount == 0
        p50 = empty ? 0 : histogram.valueAtPercentile(50)
        p99 = empty ? 0 : histogram.valueAtPercentile(99)
        max = empty ? 0 : histogram.max
    }

    var json: JSONValue { .object([("p50", .int(Int(p50))), ("p99", .int(Int(p99))), ("max", .int(Int(max)))]) }
}

/// One `bench kv` run. `json` leads with the documented keys: tier, geometry, layer_bytes,
/// block_bytes, save_bytes_per_s, load_bytes_per_s, layer_latency_ns (load, per layer call).
public struct KVBenchResult: Sendable {
    public var tier: String
    public var geometry: KVBenchGeometry
    public var blocks: Int
    public var blocksPerCall: Int
    public var slotSize: Int
    public var saveBytes: Int
    public var saveSeconds: Double
    public var saveCalls: Int
    public var loadBytes: Int
    public var loadSeconds: Double
    public var loadCalls: Int
    /// Per layer call: `save` of storeLayer, `load` of load(layer:).
    public var save: KVLatency
    public var load: KVLatency
    public var errors: Int
    public var firstError: String?
    public var verifiedLayers: Int
    public var stats: StoreStats?
    public var nvme: (file: String, dataOffset: Int, directIO: Bool)?

    public var saveBytesPerSecond: Double { saveSeconds > 0 ? Double(saveBytes) / saveSeconds : 0 }
    public var loadBytesPerSecond: Double { loadSeconds > 0 ? Double(loadBytes) / loadSeconds : 0 }

    public var json: JSONValue {
        var members: [(String, JSONValue)] = [
            ("tier", .string(tier)), ("geometry", .string(geometry.name)), ("layer_bytes", .int(geometry.layerBytes)),
            ("block_bytes", .int(geometry.blockBytes)), ("save_bytes_per_s", .double(saveBytesPerSecond)),
            ("load_bytes_per_s", .double(loadBytesPerSecond)),
            ("layer_latency_ns", .object([("p50", .int(Int(load.p50))), ("p99", .int(Int(load.p99)))])),
            ("save_layer_latency_ns", .object([("p50", .int(Int(save.p50))), ("p99", .int(Int(save.p99)))])),
            ("shape", geometry.json), ("blocks", .int(blocks)), ("working_set_bytes", .int(blocks * geometry.blockBytes)),
            ("blocks_per_call", .int(blocksPerCall)), ("slot_size", .int(slotSize)),
            ("save_layer_calls", .int(saveCalls)), ("save_s", .double(saveSeconds)),
            ("load_layer_calls", .int(loadCalls)), ("load_s", .double(loadSeconds)),
            ("load_layer_latency_max_ns", .int(Int(load.max))), ("save_layer_latency_max_ns", .int(Int(save.max))),
            ("errors", .int(errors)), ("verified_layers", .int(verifiedLayers)),
        ]
        if let firstError { members.append(("first_error", .string(firstError))) }
        if let nvme {
            members.append(("file", .string(nvme.file)))
            members.append(("data_offset", .int(nvme.dataOffset)))
            members.append(("direct_io", .bool(nvme.directIO)))
        }
        if let stats, stats.tiers.count > 1 {
            members.append(("tiers", .array(stats.tiers.map { tier in
                .object([("name", .string(tier.name)), ("hits", .int(tier.hits)), ("pages", .int(tier.pages)),
                         ("promotions", .int(tier.promotionsIn)), ("demotions", .int(tier.demotionsOut)),
                         ("evictions", .int(tier.evictions))])
            })))
        }
        return .object(members)
    }

    /// The table `spillway bench kv` prints without --json.
    public static func table(_ results: [KVBenchResult]) -> String {
        let header = ["tier", "geometry", "layer", "save GB/s", "load GB/s", "save p50", "save p99", "load p50", "load p99", "errors"]
        var rows = [header]
        func nanos(_ value: UInt64) -> String {
            value >= 1_000_000 ? format2(Double(value) / 1e6) + "ms" : value >= 1000 ? format2(Double(value) / 1e3) + "µs" : "\(value)ns"
        }
        for result in results {
            rows.append([
                result.tier, result.geometry.name, "\(result.geometry.layerBytes)",
                format2(result.saveBytesPerSecond / 1e9), format2(result.loadBytesPerSecond / 1e9),
                nanos(result.save.p50), nanos(result.save.p99), nanos(result.load.p50), nanos(result.load.p99), "\(result.errors)",
            ])
        }
        let widths = header.indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
        var lines = rows.map { row in
            row.enumerated().map { column, cell in
                let pad = String(repeating: " ", count: widths[column] - cell.count)
                return column < 2 ? cell + pad : pad + cell
            }.joined(separator: "  ")
        }
        lines.insert(String(repeating: "-", count: lines[0].count), at: 1)
        if let first = results.first {
            let g = first.geometry
            lines.append("geometry \(g.name): \(g.tokensPerBlock) tokens/block × \(g.layers) layers × \(g.kvHeads) KV heads × head dim \(g.headDim) × \(g.dtype); layer (K+V of one block) \(g.layerBytes) B, block \(g.blockBytes) B; \(first.blocks) blocks, \(first.blocksPerCall) per layer call; latency per layer call")
        }
        return lines.joined(separator: "\n")
    }

    static func format2(_ value: Double) -> String {
        let scaled = (value * 100).rounded()
        let whole = Int(scaled) / 100
        let fraction = abs(Int(scaled)) % 100
        return "\(whole).\(fraction < 10 ? "0" : "")\(fraction)"
    }
}
