import Dispatch
import SpillwayCore
import SpillwayStore

#if canImport(Glibc)
import Glibc
#endif

/// Where a caller's KV array keeps its layer slices: the slice of the array's layer `i` (pool
/// layer `layers.lowerBound + i`) of block `b` is the `layerBytes` at
/// `base + i * layerStride + b * blockStride`. A C-contiguous `[layers, blocks, layerBytes]`
/// array has `layerStride = blocks * layerBytes` and `blockStride = layerBytes`; vLLM's
/// `[blocks, layers, …]` buffers (or any slice of them) are the same thing with other strides.
public struct KVArrayStrides: Sendable, Equatable {
    public var layerStride: Int
    public var blockStride: Int

    public init(layerStride: Int, blockStride: Int) {
        self.layerStride = layerStride
        self.blockStride = blockStride
    }

    /// The strides of a C-contiguous `[layers, blocks, layerBytes]` array.
    public static func contiguous(blocks: Int, layerBytes: Int) -> KVArrayStrides {
        KVArrayStrides(layerStride: blocks * layerBytes, blockStride: layerBytes)
    }
}

extension KVPool {
    /// An array call moving at least this many bytes splits its batch over up to
    /// `arrayFanOut` threads (the calling one and Dispatch's): one core copying 64 KiB pages
    /// (and checksumming them on store) reaches about half of a large memcpy's bandwidth.
    public static let arrayFanOutBytes = 2 << 20
    public static let arrayFanOut = max(1, min(4, sysconf(Int32(_SC_NPROCESSORS_ONLN))))

    /// Runs `body` on the requests, split into contiguous parts on several threads when they
    /// move `bytes` ≥ `arrayFanOutBytes` (the store's batch calls are thread-safe).
    func fannedOut<Request>(_ requests: inout [Request], bytes: Int, _ body: @Sendable (UnsafeMutableBufferPointer<Request>) -> Void) {
        let parts = min(Self.arrayFanOut, bytes / Self.arrayFanOutBytes + 1, requests.count)
        requests.withUnsafeMutableBufferPointer { all in
            guard parts > 1, let base = all.baseAddress else { return body(all) }
            let shared = DisjointParts(base: base, count: all.count)
            DispatchQueue.concurrentPerform(iterations: parts) { part in
                let start = shared.count * part / parts
                let end = shared.count * (part + 1) / parts
                body(UnsafeMutableBufferPointer(start: shared.base + start, count: end - start))
            }
        }
    }

    /// Checks an array call's shape against the geometry: layers in range, strides
    /// non-negative, the array's extent (from `base` to its last byte) representable, and for
    /// a load (`disjoint`) no two slices overlapping. Returns the extent in bytes.
    public func checkArray(blocks: Int, layers: Range<Int>, strides: KVArrayStrides, disjoint: Bool) throws(SpillwayError) -> Int {
        guard !layers.isEmpty, layers.lowerBound >= 0, layers.upperBound <= geometry.layers else {
            throw .invalidArgument("layers \(layers.lowerBound)..<\(layers.upperBound): need a non-empty range inside 0..<\(geometry.layers)")
        }
        guard strides.layerStride >= 0, strides.blockStride >= 0 else {
            throw .invalidArgument("negative stride (layer stride \(strides.layerStride), block stride \(strides.blockStride))")
        }
        let layerBytes = geometry.layerBytes
        guard blocks > 0 else { return 0 }
        // The last slice's end: (layers - 1) * layerStride + (blocks - 1) * blockStride + layerBytes.
        let (a, o1) = (layers.count - 1).multipliedReportingOverflow(by: strides.layerStride)
        let (b, o2) = (blocks - 1).multipliedReportingOverflow(by: strides.blockStride)
        let (ab, o3) = a.addingReportingOverflow(b)
        let (extent, o4) = ab.addingReportingOverflow(layerBytes)
        guard !(o1 || o2 || o3 || o4) else {
            throw .invalidArgument("strides overflow: layer stride \(strides.layerStride) × \(layers.count) layers, block stride \(strides.blockStride) × \(blocks) blocks")
        }
        if disjoint {
            // Slices of one axis must not overlap, and the other axis must step over a whole
            // run of the first (the nesting a real array has, in either order).
            var axes = [(stride: strides.layerStride, count: layers.count), (stride: strides.blockStride, count: blocks)]
                .filter { $0.count > 1 }
                .sorted { $0.stride < $1.stride }
            var span = layerBytes
            while let axis = axes.first {
                axes.removeFirst()
                guard axis.stride >= span else {
                    throw .invalidArgument("the destination's slices overlap (layer stride \(strides.layerStride), block stride \(strides.blockStride), \(layerBytes) bytes per slice)")
                }
                span = axis.stride * (axis.count - 1) + span
            }
        }
        return extent
    }

    /// The page a whole-block pool keeps for block `index`, when the array holds it contiguously.
    private func wholeBlockAddress(_ index: Int, layers: Range<Int>, strides: KVArrayStrides) throws(SpillwayError) -> Int {
        guard layers == 0..<geometry.layers, geometry.layers == 1 || strides.layerStride == geometry.layerBytes else {
            throw .invalidArgument("a whole-block pool stores whole blocks: the array must hold all \(geometry.layers) layers of a block back to back (layer stride \(geometry.layerBytes))")
        }
        return index * strides.blockStride
    }

    /// Stores layers `layers` of each block from one strided array (`KVArrayStrides`): one
    /// batch for every (layer, block) slice, no per-block buffers (split over `arrayFanOut`
    /// threads when it moves `arrayFanOutBytes` or more). Per-layer layout: a block is
    /// visible once all its layers are stored (by this call or earlier ones). Whole-block
    /// layout: the array must hold every layer of a block back to back. `chain` as for
    /// `storeLayer`.
    public func storeLayers(_ hashes: [BlockHash], layers: Range<Int>, from base: UnsafeRawPointer,
                            strides: KVArrayStrides, chain: KVChainStart = .root) -> KVResult
    {
        do throws(SpillwayError) {
            if state.withLock({ $0.closed }) { throw .closed }
            _ = try checkArray(blocks: hashes.count, layers: layers, strides: strides, disjoint: false)
            if geometry.layout == .wholeBlock {
                return store(hashes, blocks: try wholeBlocks(hashes, layers: layers, base: base, strides: strides), chain: chain)
            }
        } catch {
            return KVResult(errors: Array(repeating: error, count: max(1, hashes.count)))
        }
        var (planned, writes) = planLayers(hashes, layers: layers, base: base, strides: strides, chain: chain)
        fannedOut(&writes, bytes: writes.count * geometry.layerBytes) { [store] in _ = store.put(batch: $0) }
        return writes.withUnsafeMutableBufferPointer { finish(planned, $0) }
    }

    /// `storeLayers`, submitted as one of the store's asynchronous batches (`storeAsync`'s
    /// path): returns at once; the caller keeps the array valid and unchanged until the
    /// ticket's `wait()` returns.
    public func storeLayersAsync(_ hashes: [BlockHash], layers: Range<Int>, from base: UnsafeRawPointer,
                                 strides: KVArrayStrides, chain: KVChainStart = .root) -> KVStoreTicket
    {
        if geometry.layout == .wholeBlock {
            let buffers: [UnsafeRawBufferPointer]
            do throws(SpillwayError) {
                _ = try checkArray(blocks: hashes.count, layers: layers, strides: strides, disjoint: false)
                buffers = try wholeBlocks(hashes, layers: layers, base: base, strides: strides)
            } catch {
                let refused = KVStoreTicket()
                refused.finish(KVResult(errors: Array(repeating: error, count: max(1, hashes.count))))
                return refused
            }
            return storeAsync(hashes, buffers: buffers, chain: chain)
        }
        return submit(blocks: hashes.count) { () throws(SpillwayError) in
            _ = try checkArray(blocks: hashes.count, layers: layers, strides: strides, disjoint: false)
            return planLayers(hashes, layers: layers, base: base, strides: strides, chain: chain)
        }
    }

    /// The page writes of layers `layers` of each block from a checked strided array (per-layer
    /// layout), layer by layer.
    private func planLayers(_ hashes: [BlockHash], layers: Range<Int>, base: UnsafeRawPointer, strides: KVArrayStrides,
                            chain: KVChainStart) -> (PlannedStore, [PageWrite])
    {
        var planned = PlannedStore(hashes: hashes, chain: chain)
        var writes: [PageWrite] = []
        writes.reserveCapacity(hashes.count * layers.count)
        for (position, layer) in layers.enumerated() {
            for index in hashes.indices {
                let address = base + position * strides.layerStride + index * strides.blockStride
                writes.append(PageWrite(key: dataKey(hashes[index], layer: layer),
                                        bytes: UnsafeRawBufferPointer(start: address, count: geometry.layerBytes),
                                        hints: hints(hashes, index, chain: chain) { dataKey($0, layer: layer) }))
                planned.owner.append(index)
                planned.writeLayers.append(layer)
            }
        }
        return (planned, writes)
    }

    /// Each block's whole slice of a checked array (whole-block layout).
    private func wholeBlocks(_ hashes: [BlockHash], layers: Range<Int>, base: UnsafeRawPointer, strides: KVArrayStrides)
        throws(SpillwayError) -> [UnsafeRawBufferPointer]
    {
        try hashes.indices.map { index throws(SpillwayError) -> UnsafeRawBufferPointer in
            UnsafeRawBufferPointer(start: base + (try wholeBlockAddress(index, layers: layers, strides: strides)), count: geometry.blockBytes)
        }
    }

    /// Loads layers `layers` of each block into one strided array (`KVArrayStrides`; slices
    /// must not overlap): one batch, no per-block buffers (split as for `storeLayers`). A block that is not completely
    /// stored fails with `unknownKey` and its slices are left as they were.
    public func loadLayers(_ hashes: [BlockHash], layers: Range<Int>, into base: UnsafeMutableRawPointer,
                           strides: KVArrayStrides) -> KVResult
    {
        let layerBytes = geometry.layerBytes
        do throws(SpillwayError) {
            if state.withLock({ $0.closed }) { throw .closed }
            _ = try checkArray(blocks: hashes.count, layers: layers, strides: strides, disjoint: true)
            if geometry.layout == .wholeBlock {
                let buffers = try hashes.indices.map { index throws(SpillwayError) -> UnsafeMutableRawBufferPointer in
                    let offset = try wholeBlockAddress(index, layers: layers, strides: strides)
                    return UnsafeMutableRawBufferPointer(start: base + offset, count: geometry.blockBytes)
                }
                return load(hashes, layer: nil, into: buffers)
            }
        } catch {
            return KVResult(errors: Array(repeating: error, count: max(1, hashes.count)))
        }
        var errors = [SpillwayError?](repeating: nil, count: hashes.count)
        var reads: [PageRead] = []
        var owner: [Int] = []
        reads.reserveCapacity(hashes.count * layers.count)
        owner.reserveCapacity(hashes.count * layers.count)
        let visible = hashes.map(isVisible)
        for (index, block) in hashes.enumerated() where !visible[index] {
            errors[index] = .unknownKey(visibilityKey(block))
        }
        for (position, layer) in layers.enumerated() {
            for index in hashes.indices where visible[index] {
                let address = base + position * strides.layerStride + index * strides.blockStride
                reads.append(PageRead(key: dataKey(hashes[index], layer: layer), buffer: UnsafeMutableRawBufferPointer(start: address, count: layerBytes)))
                owner.append(index)
            }
        }
        fannedOut(&reads, bytes: reads.count * layerBytes) { [store] in _ = store.get(batch: $0) }
        for (position, read) in reads.enumerated() where errors[owner[position]] == nil {
            if let error = read.error {
                errors[owner[position]] = error
            } else if read.length != layerBytes {
                errors[owner[position]] = .invalidArgument("stored page has \(read.length) bytes, expected \(layerBytes)")
            }
        }
        return KVResult(errors: errors)
    }
}

/// A batch split into parts that threads work on, each its own range. `@unchecked Sendable`:
/// the parts are disjoint and the owner waits for every thread before it reads the batch again.
struct DisjointParts<Request>: @unchecked Sendable {
    let base: UnsafeMutablePointer<Request>
    let count: Int
}
