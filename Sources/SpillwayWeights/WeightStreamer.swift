import CSpillwayXXHash
import Dispatch
import Logging
import SpillwayCore
import SpillwayMemoryTiers
import SpillwayPolicy
import SpillwayStore

#if canImport(Glibc)
import Glibc
#endif

/// A model's weights registered in a tiered store: every tensor of a safetensors file stored
/// as pages of at most `chunkBytes` (a tensor larger than a page is several pages), placed on
/// a given tier (NVMe or remote) or wherever the store's policy puts them.
///
/// Page keys are stable: XXH3-128 of (model id ‖ 0 ‖ tensor name ‖ 0 ‖ chunk index u32 LE),
/// seeded 0x53504C57 ("SPLW"), so a store that survives a restart (NVMe warm restart) still
/// holds a registered model.
public final class ModelWeights: Sendable {
    public let store: TieredStore
    public let file: SafetensorsFile
    public let modelID: String
    public let chunkBytes: Int
    /// Layer numbers in ascending order; -1 (shared tensors: embeddings, final norm, head) first
    /// when the model has any.
    public let layers: [Int]
    let tensorsByLayer: [Int: [TensorInfo]]

    public static let sharedLayer = -1

    /// Copies every tensor of `path` into `store` (on `tier` if given). Registration of a
    /// model already stored under the same id and complete is skipped.
    public init(store: TieredStore, path: String, modelID: String, tier: Int? = nil, chunkBytes: Int? = nil,
                logger: Logger = Logger(label: "spillway.weights")) throws(SpillwayError)
    {
        let file = try SafetensorsFile(path: path)
        let chunk = min(chunkBytes ?? 4 << 20, store.options.maxPageSize)
        guard chunk >= 4096 else { throw .invalidConfiguration("weights need pages of at least 4 KiB (store max page size \(store.options.maxPageSize))") }
        self.store = store
        self.file = file
        self.modelID = modelID
        self.chunkBytes = chunk
        var byLayer: [Int: [TensorInfo]] = [:]
        for tensor in file.tensors { byLayer[tensor.layer ?? Self.sharedLayer, default: []].append(tensor) }
        tensorsByLayer = byLayer
        layers = byLayer.keys.sorted()
        // Copy the tensors in, a chunk at a time, unless already there.
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw .invalidArgument("cannot open \(path)") }
        defer { close(descriptor) }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        var copied = 0
        // Chunks are stored as class `weights` with their layer's streaming position, so the
        // store's policy does not let a streaming pass push hot KV blocks out of tier 0.
        let layerOrder = Dictionary(uniqueKeysWithValues: layers.enumerated().map { ($1, $0) })
        for tensor in file.tensors {
            let hints = PageHints.weights(layerOrder: layerOrder[tensor.layer ?? Self.sharedLayer] ?? 0)
            for (index, length) in Self.chunks(tensor.byteCount, chunk).enumerated() {
                let key = Self.key(modelID: modelID, tensor: tensor.name, chunk: index)
                if store.length(of: key) == length {
                    // Already stored (e.g. recovered after a restart, which keeps no hints): tag it.
                    if store.hints(of: key) != hints { store.setHints(hints, of: key) }
                    continue
                }
                let offset = tensor.fileOffset + index * chunk
                var done = 0
                while done < length {
                    let got = pread(descriptor, buffer + done, length - done, off_t(offset + done))
                    guard got > 0 else { throw .invalidArgument("\(path): short read of tensor '\(tensor.name)'") }
                    done += got
                }
                try store.put(key, UnsafeRawBufferPointer(start: buffer, count: length), tier: tier, hints: hints)
                copied += length
            }
        }
        logger.info("model registered", metadata: [
            "model": "\(modelID)", "tensors": "\(file.tensors.count)", "layers": "\(layers.count)",
            "bytes_copied": "\(copied)", "chunk": "\(chunk)",
        ])
    }

    static func chunks(_ bytes: Int, _ chunk: Int) -> [Int] {
        guard bytes > 0 else { return [0] }
        return stride(from: 0, to: bytes, by: chunk).map { min(chunk, bytes - $0) }
    }

    static func key(modelID: String, tensor: String, chunk: Int) -> PageKey {
        var bytes = Array(modelID.utf8) + [0] + Array(tensor.utf8) + [0]
        withUnsafeBytes(of: UInt32(chunk).littleEndian) { bytes += $0 }
        let hash = bytes.withUnsafeMutableBytes { XXH3_128bits_withSeed($0.baseAddress, $0.count, 0x5350_4C57) }
        return PageKey(high: hash.high64, low: hash.low64)
    }

    /// The tensors of a layer (`sharedLayer` for those outside any layer), in file order.
    public func tensors(layer: Int) -> [TensorInfo] { tensorsByLayer[layer] ?? [] }

    /// Bytes of a layer's tensors.
    public func bytes(layer: Int) -> Int { tensors(layer: layer).reduce(0) { $0 + $1.byteCount } }
}

/// One acquired layer: its tensors' bytes in device-tier memory, valid until `release`.
public struct LayerWeights: @unchecked Sendable {
    // `@unchecked Sendable`: the views point into the streamer's arena region owned by this
    // acquisition; the streamer never reuses it before `release(layer:)`.
    public let layer: Int
    public let tensors: [(info: TensorInfo, bytes: UnsafeRawBufferPointer)]

    public func tensor(named name: String) -> UnsafeRawBufferPointer? { tensors.first { $0.info.name == name }?.bytes }
}

/// Streams a registered model's layers into a fixed device-memory budget, FlexGen-style:
/// `acquire(layer:)` returns the layer's tensors in device-tier memory (waiting only if they
/// are not there yet: that wait is the *stall*), and a loader thread keeps the next
/// `prefetchDepth` layers loading while the current one is in use. `release(layer:)` frees
/// the layer's memory for the layers ahead.
///
/// The budget is one `HostArena` (the device tier's backend until a GPU one exists), carved
/// with a `SlotAllocator` in 64 KiB units; it must hold `prefetchDepth + 1` of the largest
/// layers. Loads are one batched `get` per layer, so a queueing tier (NVMe) sees many reads
/// in flight.
///
/// What to load ahead is the store policy's decision (`StorePolicy.makePrefetcher`): each
/// acquire reports the layer's position in the model's streaming order, and whether it had
/// been prefetched, to the policy's prefetcher, which answers the positions to load next
/// (layer-ahead for weights under the class rules; Leap's trend detection otherwise), at most
/// `prefetchDepth` ahead (what the budget holds).
///
/// Thread-safe. Layers are acquired in any order.
public final class WeightStreamer: Sendable {
    public let weights: ModelWeights
    public let prefetchDepth: Int
    private let arena: HostArena
    private let allocator: SlotAllocator
    private static let unit = 64 << 10
    private let slots = Locked<[Int: LayerSlot]>([:])
    private let queue = Locked<[Int]>([])
    private let wake = DispatchSemaphore(value: 0)
    private let released = DispatchSemaphore(value: 0)
    private let stopped = Locked(false)
    private let loader = Locked<BackgroundThread?>(nil)
    /// Layers submitted and not yet loaded, at most one (`load`).
    private let loadsInFlight = DispatchSemaphore(value: 1)
    private let logger: Logger
    /// Nanoseconds callers waited in `acquire` for layers not loaded yet.
    private let stall = Locked(StallRecord())
    /// The store policy's prefetcher for this model's layer stream, and its reusable plan.
    private let prefetch: Locked<(policy: any PrefetchPolicy, plan: PrefetchPlan)>
    private let streamID: UInt64

    struct StallRecord {
        var total: UInt64 = 0
        var perAcquire: [UInt64] = []
    }

    /// A layer's region and state. `@unchecked Sendable`: fields are guarded by the
    /// streamer's `slots` lock; `loaded` is signalled once.
    final class LayerSlot: @unchecked Sendable {
        var extent: Extent?
        var users = 0
        var ready = false
        var error: SpillwayError?
        let loaded = DispatchSemaphore(value: 0)
    }

    public init(weights: ModelWeights, deviceBudget: Int, prefetchDepth: Int = 2,
                logger: Logger = Logger(label: "spillway.weights")) throws(SpillwayError)
    {
        guard prefetchDepth >= 0 else { throw .invalidArgument("prefetch depth must be ≥ 0") }
        let largest = weights.layers.map { weights.bytes(layer: $0) }.max() ?? 0
        let needed = (prefetchDepth + 1) * ((largest + Self.unit - 1) / Self.unit) * Self.unit
        guard deviceBudget >= needed else {
            throw .invalidConfiguration("device budget \(ByteCount.format(deviceBudget)) cannot hold \(prefetchDepth + 1) layers of \(ByteCount.format(largest)) (prefetch \(prefetchDepth) + the current one)")
        }
        self.weights = weights
        self.prefetchDepth = prefetchDepth
        self.logger = logger
        prefetch = Locked((weights.store.policy.makePrefetcher(for: .weights, depth: prefetchDepth), PrefetchPlan(capacity: max(1, prefetchDepth))))
        streamID = PageKey(high: 0x5745_4947, low: UInt64(truncatingIfNeeded: weights.modelID.hashValue)).policyID
        arena = try HostArena(byteCount: deviceBudget, prefault: true, lock: false, label: "weights", logger: logger)
        allocator = SlotAllocator(capacity: deviceBudget / Self.unit)
        loader.withLock {
            $0 = BackgroundThread { [self] in loadLoop() }
        }
    }

    deinit { close() }

    /// The prefetcher's counters: layers asked for ahead, how many were then used, accuracy
    /// and coverage.
    public var prefetchCounters: PrefetchCounters { prefetch.withLock { $0.policy.counters } }

    /// The policy's prefetcher in use (`next-N` for weights under class rules, else `leap`).
    public var prefetcherName: String { prefetch.withLock { $0.policy.name } }

    public func close() {
        let first = stopped.withLock { stopped -> Bool in
            defer { stopped = true }
            return !stopped
        }
        guard first else { return }
        wake.signal()
        released.signal()
        loader.withLock { $0?.join() }
    }

    /// The layer's tensors in device memory; waits while they load. Starts loading the layers
    /// the policy's prefetcher names (at most `prefetchDepth` ahead).
    public func acquire(layer: Int) throws(SpillwayError) -> LayerWeights {
        guard weights.layers.contains(layer) else { throw .invalidArgument("model '\(weights.modelID)' has no layer \(layer)") }
        guard !stopped.withLock({ $0 }) else { throw .closed }
        // Queued, loading or loaded before anyone asked: the prefetcher asked for it.
        let queued = queue.withLock { $0.contains(layer) }
        let (slot, prefetched) = slots.withLock { slots -> (LayerSlot, Bool) in
            let existing = slots[layer]
            let slot = existing ?? LayerSlot()
            slots[layer] = slot
            slot.users += 1
            return (slot, (existing != nil || queued) && slot.users == 1)
        }
        enqueue(layer, front: true)
        if prefetchDepth > 0, let position = weights.layers.firstIndex(of: layer) {
            let ahead = prefetch.withLock { state -> [Int] in
                state.policy.recordAccess(stream: streamID, position: Int64(position), outcome: prefetched ? .prefetchHit : .miss,
                                          into: &state.plan)
                return state.plan.compactMap { $0 > Int64(position) && $0 <= Int64(position + prefetchDepth) && $0 < Int64(weights.layers.count) ? Int($0) : nil }
            }
            for index in ahead { enqueue(weights.layers[index], front: false) }
        }
        let started = monotonicNanoseconds()
        let isReady = slots.withLock { _ in slot.ready || slot.error != nil }
        if !isReady {
            slot.loaded.wait()
            slot.loaded.signal()
        }
        let waited = isReady ? 0 : monotonicNanoseconds() &- started
        stall.withLock {
            $0.total &+= waited
            $0.perAcquire.append(waited)
        }
        if let error = slots.withLock({ _ in slot.error }) {
            release(layer: layer)
            throw error
        }
        let base = arena.base + Int(slot.extent!.firstSlot) * Self.unit
        var offset = 0
        let views = weights.tensors(layer: layer).map { tensor -> (info: TensorInfo, bytes: UnsafeRawBufferPointer) in
            defer { offset += tensor.byteCount }
            return (tensor, UnsafeRawBufferPointer(start: base + offset, count: tensor.byteCount))
        }
        return LayerWeights(layer: layer, tensors: views)
    }

    /// Gives the layer's memory back once its last user releases it.
    public func release(layer: Int) {
        let freed = slots.withLock { slots -> Extent? in
            guard let slot = slots[layer], slot.users > 0 else { return nil }
            slot.users -= 1
            guard slot.users == 0, slot.ready || slot.error != nil else { return nil }
            slots[layer] = nil
            return slot.extent
        }
        if let freed {
            allocator.release(freed)
            released.signal()
        }
    }

    /// Total and per-acquire stall (nanoseconds waited in `acquire`).
    public var stallNanoseconds: (total: UInt64, perAcquire: [UInt64]) { stall.withLock { ($0.total, $0.perAcquire) } }

    private func enqueue(_ layer: Int, front: Bool) {
        let added = queue.withLock { queue -> Bool in
            if queue.contains(layer) {
                if front { queue.removeAll { $0 == layer }; queue.insert(layer, at: 0) }
                return front
            }
            let known = slots.withLock { $0[layer].map { $0.ready || $0.extent != nil } ?? false }
            guard !known else { return false }
            if front { queue.insert(layer, at: 0) } else { queue.append(layer) }
            return true
        }
        if added { wake.signal() }
    }

    private func loadLoop() {
        while true {
            wake.wait()
            if stopped.withLock({ $0 }) {
                failPending(.closed)
                return
            }
            while let layer = queue.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) {
                load(layer)
                if stopped.withLock({ $0 }) { break }
            }
        }
    }

    private func failPending(_ error: SpillwayError) {
        slots.withLock { slots in
            for slot in slots.values where !slot.ready && slot.error == nil {
                slot.error = error
                slot.loaded.signal()
            }
        }
    }

    private func load(_ layer: Int) {
        let slot = slots.withLock { slots -> LayerSlot? in
            if let slot = slots[layer], slot.ready || slot.extent != nil { return nil }
            let slot = slots[layer] ?? LayerSlot()
            slots[layer] = slot
            return slot
        }
        guard let slot else { return }
        let bytes = weights.bytes(layer: layer)
        let units = max(1, (bytes + Self.unit - 1) / Self.unit)
        // Room: else drop a prefetched layer nobody holds, else wait for a release.
        var extent = allocator.allocate(count: units)
        while extent == nil {
            if stopped.withLock({ $0 }) { return }
            let dropped = slots.withLock { slots -> Extent? in
                guard let (victim, idle) = slots.first(where: { $0.key != layer && $0.value.users == 0 && $0.value.ready }) else { return nil }
                slots[victim] = nil
                return idle.extent
            }
            if let dropped {
                allocator.release(dropped)
            } else {
                _ = released.wait(timeout: .now() + .milliseconds(50))
            }
            extent = allocator.allocate(count: units)
        }
        slots.withLock { _ in slot.extent = extent }  // marks it loading: never queued twice
        let base = arena.base + Int(extent!.firstSlot) * Self.unit
        var reads: [PageRead] = []
        var offset = 0
        for tensor in weights.tensors(layer: layer) {
            for (index, length) in ModelWeights.chunks(tensor.byteCount, weights.chunkBytes).enumerated() where length > 0 {
                reads.append(PageRead(key: ModelWeights.key(modelID: weights.modelID, tensor: tensor.name, chunk: index),
                                      buffer: UnsafeMutableRawBufferPointer(start: base + offset + index * weights.chunkBytes, count: length)))
            }
            offset += tensor.byteCount
        }
        // Submitted, not waited for: the loader goes on to the next queued layer while this one's
        // reads run, so the device sees the next layer's reads queued behind this one's (the
        // store bounds how many batches are in flight).
        // One layer in flight: the loader prepares the next layer (room, requests) while this
        // one's reads run, then waits to submit it. With two in flight the loader ran ahead
        // and, under load, dropped prefetched layers for room before they were used (the
        // policy test's accuracy fell to 0.70 and coverage to 0.78).
        loadsInFlight.wait()
        weights.store.submitGet(reads) { [self] pages, succeeded in
            defer { loadsInFlight.signal() }
            let error: SpillwayError? = succeeded == pages.count
                ? nil : (pages.first { $0.error != nil }?.error ?? .invalidArgument("layer \(layer) did not load"))
            slots.withLock { _ in
                slot.ready = error == nil
                slot.error = error
            }
            if let error { logger.error("layer load failed", metadata: ["layer": "\(layer)", "error": "\(error)"]) }
            slot.loaded.signal()
        }
    }
}
