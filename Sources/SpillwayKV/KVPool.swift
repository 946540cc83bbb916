import Dispatch
import DequeModule
import Logging
import SpillwayCore
import SpillwayStore

#if canImport(Glibc)
import Glibc
#endif

/// Where the first of a list of block hashes sits in its prefix chain (for the store's
/// placement hints): `depth` blocks precede it and the last of them is `parent`.
public struct KVChainStart: Sendable, Equatable {
    public var depth: Int
    public var parent: BlockHash?

    public init(depth: Int, parent: BlockHash?) {
        self.depth = depth
        self.parent = parent
    }

    /// The first block of a sequence: depth 0, no parent.
    public static let root = KVChainStart(depth: 0, parent: nil)
}

/// How a pool's blocks are cut into store pages.
public enum KVLayout: String, Sendable, CaseIterable {
    /// One page per (block, layer): a layer can be loaded while the previous one computes
    /// (vLLM's layer-wise KV connector).
    case perLayer = "per-layer"
    /// One page per block holding every layer.
    case wholeBlock = "whole-block"
}

/// The shape of one KV-cache block. A layer's slice of a block is K then V, each
/// `tokensPerBlock × kvHeads × headDim` elements of `dtypeSize` bytes: `layerBytes`. A whole
/// block is its layers back to back, layer 0 first: `blockBytes`.
public struct KVBlockGeometry: Sendable, Equatable, CustomStringConvertible {
    public var tokensPerBlock: Int
    public var layers: Int
    public var kvHeads: Int
    public var headDim: Int
    public var dtypeSize: Int
    public var layout: KVLayout

    public init(tokensPerBlock: Int, layers: Int, kvHeads: Int, headDim: Int, dtypeSize: Int, layout: KVLayout = .perLayer) {
        self.tokensPerBlock = tokensPerBlock
        self.layers = layers
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.dtypeSize = dtypeSize
        self.layout = layout
    }

    public var layerBytes: Int { 2 * tokensPerBlock * kvHeads * headDim * dtypeSize }

    public var description: String {
        "\(tokensPerBlock) tokens/block × \(layers) layers × \(kvHeads) KV heads × head dim \(headDim) × \(dtypeSize) B (\(layout.rawValue))"
    }
    public var blockBytes: Int { layers * layerBytes }

    public func validate() throws(SpillwayError) {
        guard (1...65_536).contains(tokensPerBlock), (1...1024).contains(layers), (1...4096).contains(kvHeads),
              (1...16_384).contains(headDim), [1, 2, 4, 8].contains(dtypeSize)
        else {
            throw .invalidConfiguration("KV geometry \(self): tokens per block 1…65536, layers 1…1024, KV heads 1…4096, head dim 1…16384, dtype size 1, 2, 4 or 8")
        }
        guard blockBytes <= Int(UInt32.max) else { throw .invalidConfiguration("KV block of \(blockBytes) bytes exceeds 4 GiB") }
    }

    /// Distinguishes geometries in page keys (so pools of different shapes never share bytes).
    var fingerprint: UInt64 {
        var bytes: [UInt8] = []
        for value in [tokensPerBlock, layers, kvHeads, headDim, dtypeSize] {
            withUnsafeBytes(of: UInt64(value).littleEndian) { bytes += $0 }
        }
        bytes += Array(layout.rawValue.utf8)
        return KVBlockHasher.hash64(bytes, seed: 0x5350_4B56)  // "SPKV"
    }
}

/// What happened to each block of a call. Blocks are independent: a failure of one never
/// makes another's bytes wrong.
public struct KVResult: Sendable {
    /// Per requested block: nil if it succeeded, else why not.
    public var errors: [SpillwayError?]

    public init(errors: [SpillwayError?]) { self.errors = errors }

    public var succeeded: Int { errors.reduce(0) { $0 + ($1 == nil ? 1 : 0) } }
    /// Blocks that succeeded from the first one with no gap: what an engine can use.
    public var contiguous: Int { errors.firstIndex { $0 != nil } ?? errors.count }
    public var allSucceeded: Bool { errors.allSatisfy { $0 == nil } }
    public var firstError: SpillwayError? { errors.lazy.compactMap { $0 }.first }
}

/// A KV-cache block pool over a tiered store: the API a serving engine's KV connector calls.
///
/// Blocks are addressed by chained prefix hashes (`KVBlockHasher`). A block becomes visible
/// (`lookup`, `load`) only once it is completely stored: in the per-layer layout, once every
/// layer has been stored; then a small manifest page is written and lookups check for it
/// and for every data page. A whole block is one page, which the store makes visible only
/// when complete, so it needs no manifest. Buffers are checked against the geometry before anything is
/// written; loads fill the caller's buffers or fail per block, never with other bytes.
///
/// Thread-safe: any thread may call any method. Asynchronous stores run as the store's
/// submitted batches (`TieredStore.submitPut`), bounded by the store's `asyncBatchLimit`.
public final class KVPool: Sendable {
    public let store: TieredStore
    public let geometry: KVBlockGeometry
    public let hasher: KVBlockHasher
    private let fingerprint: UInt64
    private let logger: Logger
    let state = Locked(PoolState())
    /// Signalled when the last asynchronous store ends after `close` began.
    private let drained = DispatchSemaphore(value: 0)

    static let manifestPart: UInt32 = 0xFFFF_FFFE
    static let wholePart: UInt32 = 0xFFFF_FFFF

    struct PoolState {
        /// Per-layer layout: layers stored so far of blocks not yet complete.
        var pending: [BlockHash: Set<Int>] = [:]
        /// Blocks this pool completed (for `clear`).
        var committed: Set<BlockHash> = []
        /// `close` began: no new asynchronous stores; submitted ones still run.
        var closing = false
        var closed = false
        /// Asynchronous stores submitted and not finished.
        var storesInFlight = 0
    }

    public init(store: TieredStore, geometry: KVBlockGeometry, modelID: String,
                logger: Logger = Logger(label: "spillway.kv")) throws(SpillwayError)
    {
        try geometry.validate()
        let pageBytes = geometry.layout == .perLayer ? geometry.layerBytes : geometry.blockBytes
        guard pageBytes <= store.options.maxPageSize else {
            throw .invalidConfiguration("a KV \(geometry.layout == .perLayer ? "layer block" : "block") is \(pageBytes) bytes; the store's max page size is \(store.options.maxPageSize)")
        }
        guard !modelID.isEmpty else { throw .invalidConfiguration("KV pool: empty model id") }
        self.store = store
        self.geometry = geometry
        self.logger = logger
        hasher = KVBlockHasher(modelID: modelID, tokensPerBlock: geometry.tokensPerBlock)
        fingerprint = geometry.fingerprint
        logger.info("KV pool open", metadata: [
            "model": "\(modelID)", "layout": "\(geometry.layout.rawValue)", "block_bytes": "\(geometry.blockBytes)",
            "tokens_per_block": "\(geometry.tokensPerBlock)", "layers": "\(geometry.layers)",
        ])
    }

    deinit { close() }

    /// Finishes queued asynchronous stores (refusing new ones), then refuses every call
    /// (`closed`).
    public func close() {
        let (first, waiting) = state.withLock { state -> (Bool, Bool) in
            guard !state.closing else { return (false, false) }
            state.closing = true
            return (true, state.storesInFlight > 0)
        }
        guard first else { return }
        if waiting { drained.wait() }
        state.withLock { $0.closed = true }
    }

    // MARK: Keys

    /// The chained hashes of every full block of `tokens`.
    public func blockHashes(tokens: [UInt32]) -> [BlockHash] { hasher.blockHashes(tokens) }

    func dataKey(_ block: BlockHash, layer: Int) -> PageKey {
        hasher.pageKey(block, part: geometry.layout == .perLayer ? UInt32(layer) : Self.wholePart, fingerprint: fingerprint)
    }

    func manifestKey(_ block: BlockHash) -> PageKey { hasher.pageKey(block, part: Self.manifestPart, fingerprint: fingerprint) }

    /// The page whose presence makes a block visible: the manifest (per-layer layout), or the
    /// block's single page, which the store already makes visible only when complete.
    func visibilityKey(_ block: BlockHash) -> PageKey {
        geometry.layout == .perLayer ? manifestKey(block) : dataKey(block, layer: 0)
    }

    private func dataKeys(_ block: BlockHash) -> [PageKey] {
        geometry.layout == .perLayer ? (0..<geometry.layers).map { dataKey(block, layer: $0) } : [dataKey(block, layer: 0)]
    }

    private func checkOpen() throws(SpillwayError) {
        if state.withLock({ $0.closed }) { throw .closed }
    }

    // MARK: Lookup

    /// How many blocks from the start of `hashes` are stored completely (only a contiguous
    /// prefix counts: the first missing block ends the match).
    public func lookup(_ hashes: [BlockHash]) -> Int {
        var matched = 0
        for block in hashes {
            guard store.contains(visibilityKey(block)), dataKeys(block).allSatisfy({ store.contains($0) }) else { break }
            matched += 1
        }
        return matched
    }

    /// Tokens of `tokens` whose KV is stored: a whole number of blocks.
    public func lookup(tokens: [UInt32]) -> Int { lookup(blockHashes(tokens: tokens)) * geometry.tokensPerBlock }

    // MARK: Store

    /// The store hints of a page of `hashes[index]` (`part` of it, a layer or the manifest):
    /// class `kvBlock`, its depth in the prefix chain, and as parent the same part of the block
    /// before it (`hashes[index - 1]`, or `chain.parent` for the first one).
    func hints(_ hashes: [BlockHash], _ index: Int, chain: KVChainStart, part: (BlockHash) -> PageKey) -> PageHints {
        let parent: BlockHash? = index > 0 ? hashes[index - 1] : chain.parent
        return .kvBlock(depth: chain.depth + index, parent: parent.map(part))
    }

    /// What finishing a store needs once its page writes have run (the writes themselves go to
    /// the store separately: they point at the caller's buffers).
    struct PlannedStore: Sendable {
        var hashes: [BlockHash]
        var chain: KVChainStart
        /// Per write, the index of its block in `hashes`.
        var owner: [Int] = []
        /// Per write, the layer it stores, for stores whose blocks complete layer by layer
        /// (per-layer stores); empty for stores of whole blocks.
        var writeLayers: [Int] = []
    }

    /// Checks the buffers against the geometry and lays out the page writes of a store of
    /// one layer of each block (`layer`) or of whole blocks (nil).
    private func plan(_ hashes: [BlockHash], layer: Int?, buffers: [UnsafeRawBufferPointer], chain: KVChainStart)
        throws(SpillwayError) -> (PlannedStore, [PageWrite])
    {
        try checkOpen()
        var planned = PlannedStore(hashes: hashes, chain: chain)
        var writes: [PageWrite] = []
        if let layer {
            guard geometry.layout == .perLayer else { throw .invalidArgument("storeLayer needs the per-layer layout; this pool stores whole blocks") }
            guard (0..<geometry.layers).contains(layer) else { throw .invalidArgument("layer \(layer) outside 0..<\(geometry.layers)") }
            try checkBuffers(hashes.count, buffers.lazy.map(\.count), expected: geometry.layerBytes)
            for index in hashes.indices {
                writes.append(PageWrite(key: dataKey(hashes[index], layer: layer), bytes: buffers[index],
                                        hints: hints(hashes, index, chain: chain) { dataKey($0, layer: layer) }))
                planned.owner.append(index)
                planned.writeLayers.append(layer)
            }
            return (planned, writes)
        }
        try checkBuffers(hashes.count, buffers.lazy.map(\.count), expected: geometry.blockBytes)
        for (index, block) in hashes.enumerated() {
            if geometry.layout == .perLayer {
                for layer in 0..<geometry.layers {
                    let slice = UnsafeRawBufferPointer(rebasing: buffers[index][(layer * geometry.layerBytes)..<((layer + 1) * geometry.layerBytes)])
                    writes.append(PageWrite(key: dataKey(block, layer: layer), bytes: slice,
                                            hints: hints(hashes, index, chain: chain) { dataKey($0, layer: layer) }))
                    planned.owner.append(index)
                }
            } else {
                writes.append(PageWrite(key: dataKey(block, layer: 0), bytes: buffers[index],
                                        hints: hints(hashes, index, chain: chain) { dataKey($0, layer: 0) }))
                planned.owner.append(index)
            }
        }
        return (planned, writes)
    }

    /// After a store's writes ran: each block's first error, and the blocks now complete made
    /// visible. A whole-block store completes each block it wrote without error; a per-layer
    /// store records the layers written and completes a block with its last layer (stored by
    /// this call or earlier ones).
    func finish(_ planned: PlannedStore, _ writes: UnsafeMutableBufferPointer<PageWrite>) -> KVResult {
        var errors = [SpillwayError?](repeating: nil, count: planned.hashes.count)
        for position in writes.indices where writes[position].error != nil && errors[planned.owner[position]] == nil {
            errors[planned.owner[position]] = writes[position].error
        }
        var complete: [Int] = []
        state.withLock { state in
            if !planned.writeLayers.isEmpty {
                for position in writes.indices where writes[position].error == nil {
                    state.pending[planned.hashes[planned.owner[position]], default: []].insert(planned.writeLayers[position])
                }
            }
            for (index, block) in planned.hashes.enumerated() where errors[index] == nil {
                guard planned.writeLayers.isEmpty || state.pending[block]?.count == geometry.layers else { continue }
                state.pending[block] = nil
                complete.append(index)
            }
        }
        for index in complete {
            if let error = commit(planned.hashes[index], hints: hints(planned.hashes, index, chain: planned.chain, part: manifestKey)) {
                errors[index] = error
            }
        }
        return KVResult(errors: errors)
    }

    /// Stores one layer of each block (per-layer layout): `buffers[i]` is block i's layer
    /// slice, exactly `layerBytes`. A block becomes visible when its last layer is stored.
    /// `chain` says where `hashes[0]` sits in its prefix chain (consecutive hashes are taken as
    /// consecutive blocks, as `blockHashes(tokens:)` returns them); it only informs the store's
    /// placement policy.
    public func storeLayer(_ hashes: [BlockHash], layer: Int, buffers: [UnsafeRawBufferPointer],
                           chain: KVChainStart = .root) -> KVResult
    {
        run(hashes, layer: layer, buffers: buffers, chain: chain)
    }

    /// Stores whole blocks: `buffers[i]` is block i, exactly `blockBytes`, layers back to back.
    /// Each block is visible once all of it is stored. `chain` as for `storeLayer`.
    public func store(_ hashes: [BlockHash], blocks buffers: [UnsafeRawBufferPointer], chain: KVChainStart = .root) -> KVResult {
        run(hashes, layer: nil, buffers: buffers, chain: chain)
    }

    private func run(_ hashes: [BlockHash], layer: Int?, buffers: [UnsafeRawBufferPointer], chain: KVChainStart) -> KVResult {
        do throws(SpillwayError) {
            var (planned, writes) = try plan(hashes, layer: layer, buffers: buffers, chain: chain)
            return writes.withUnsafeMutableBufferPointer { writes in
                _ = store.put(batch: writes)
                return finish(planned, writes)
            }
        } catch {
            return KVResult(errors: Array(repeating: error, count: max(1, hashes.count)))
        }
    }

    /// Submits a store of whole blocks (or, with `layer`, of one layer of each block) to the
    /// store's asynchronous batches (`TieredStore.submitPut`) and returns at once; the
    /// ticket's `wait()` gives the result. A connector saving layer after layer thus keeps
    /// the tiers busy across calls. The caller keeps the buffers valid and unchanged until
    /// then. Waits for room when the store has `asyncBatchLimit` batches in flight.
    public func storeAsync(_ hashes: [BlockHash], layer: Int? = nil, buffers: [UnsafeRawBufferPointer],
                           chain: KVChainStart = .root) -> KVStoreTicket
    {
        submit(blocks: hashes.count) { () throws(SpillwayError) in try plan(hashes, layer: layer, buffers: buffers, chain: chain) }
    }

    /// Plans a store (`makePlan`) and submits its writes as one of the store's asynchronous
    /// batches; the ticket completes once `finish` has run. The one asynchronous path of the
    /// pool's stores (`storeAsync`, `storeLayersAsync`).
    func submit(blocks: Int, _ makePlan: () throws(SpillwayError) -> (PlannedStore, [PageWrite])) -> KVStoreTicket {
        let ticket = KVStoreTicket()
        do throws(SpillwayError) {
            // Counted under the state lock, so `close` either waits for this store or it is
            // refused here: no ticket waits forever.
            try state.withLock { state throws(SpillwayError) in
                guard !state.closing else { throw .closed }
                state.storesInFlight += 1
            }
            let planned: PlannedStore
            let writes: [PageWrite]
            do throws(SpillwayError) {
                (planned, writes) = try makePlan()
            } catch {
                storeFinished()
                throw error
            }
            store.submitPut(writes) { [self] pages, _ in
                ticket.finish(finish(planned, pages))
                storeFinished()
            }
        } catch {
            ticket.finish(KVResult(errors: Array(repeating: error, count: max(1, blocks))))
        }
        return ticket
    }

    private func storeFinished() {
        let last = state.withLock { state -> Bool in
            state.storesInFlight -= 1
            return state.storesInFlight == 0 && state.closing
        }
        if last { drained.signal() }
    }

    /// Makes `block` visible: writes its manifest (per-layer layout; a whole block's single
    /// page needs none).
    func commit(_ block: BlockHash, hints: PageHints) -> SpillwayError? {
        guard geometry.layout == .perLayer else {
            state.withLock { _ = $0.committed.insert(block) }
            return nil
        }
        var manifest = [UInt8](repeating: 0, count: 32)
        manifest.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: UInt32(0x5350_4B56).littleEndian, toByteOffset: 0, as: UInt32.self)  // "SPKV"
            raw.storeBytes(of: UInt32(1).littleEndian, toByteOffset: 4, as: UInt32.self)
            raw.storeBytes(of: fingerprint.littleEndian, toByteOffset: 8, as: UInt64.self)
            raw.storeBytes(of: UInt32(geometry.layers).littleEndian, toByteOffset: 16, as: UInt32.self)
            raw.storeBytes(of: UInt32(geometry.tokensPerBlock).littleEndian, toByteOffset: 20, as: UInt32.self)
        }
        do {
            try store.put(manifestKey(block), bytes: manifest, hints: hints)
            state.withLock { _ = $0.committed.insert(block) }
            return nil
        } catch {
            return error
        }
    }

    /// Whether `block` is completely stored, for a load: its manifest (or whole page) is there.
    /// (A pool-wide `committed` shortcut was tried: it put the pool's one lock on every block of
    /// every load, for no measured gain.)
    func isVisible(_ block: BlockHash) -> Bool { store.contains(visibilityKey(block)) }

    /// Checks the buffers' sizes (a lazy view of them: no array per call).
    private func checkBuffers(_ blocks: Int, _ sizes: some Collection<Int>, expected: Int) throws(SpillwayError) {
        guard blocks == sizes.count else { throw .invalidArgument("\(blocks) block hashes but \(sizes.count) buffers") }
        if let bad = sizes.enumerated().first(where: { $0.element != expected }) {
            throw .invalidArgument("buffer \(bad.offset) has \(bad.element) bytes; this pool's geometry needs \(expected)")
        }
    }

    // MARK: Load

    /// Loads layer `layer` of each block into `buffers[i]` (exactly `layerBytes`; per-layer
    /// layout), or with `layer` nil whole blocks (exactly `blockBytes`, either layout). A block
    /// that is not completely stored fails with `unknownKey`.
    public func load(_ hashes: [BlockHash], layer: Int? = nil, into buffers: [UnsafeMutableRawBufferPointer]) -> KVResult {
        // Pages per block read here, and each one's length.
        let perBlock = layer == nil && geometry.layout == .perLayer ? geometry.layers : 1
        let pageBytes = layer != nil || geometry.layout == .perLayer ? geometry.layerBytes : geometry.blockBytes
        do throws(SpillwayError) {
            try checkOpen()
            if let layer {
                guard geometry.layout == .perLayer else { throw .invalidArgument("a per-layer load needs the per-layer layout") }
                guard (0..<geometry.layers).contains(layer) else { throw .invalidArgument("layer \(layer) outside 0..<\(geometry.layers)") }
            }
            try checkBuffers(hashes.count, buffers.lazy.map(\.count), expected: layer == nil ? geometry.blockBytes : geometry.layerBytes)
        } catch {
            return KVResult(errors: Array(repeating: error, count: max(1, hashes.count)))
        }
        var errors = [SpillwayError?](repeating: nil, count: hashes.count)
        // Page p belongs to block p / perBlock. A block not (yet) complete is still read (its
        // pages may exist) but fails: nothing of it is reported loaded.
        TemporaryBuffer.with(PageRead.self, count: hashes.count * perBlock) { reads in
            for (index, block) in hashes.enumerated() {
                if !isVisible(block) { errors[index] = .unknownKey(visibilityKey(block)) }
                for part in 0..<perBlock {
                    let pageLayer = layer ?? part
                    let buffer = perBlock == 1 ? buffers[index]
                        : UnsafeMutableRawBufferPointer(rebasing: buffers[index][(part * pageBytes)..<((part + 1) * pageBytes)])
                    let key = geometry.layout == .perLayer ? dataKey(block, layer: pageLayer) : dataKey(block, layer: 0)
                    reads.initializeElement(at: index * perBlock + part, to: PageRead(key: key, buffer: buffer))
                }
            }
            if reads.count == 1 {
                // One page (a layer of one block): the store's single get, lock-free on a hit.
                do throws(SpillwayError) {
                    reads[0].length = try store.get(reads[0].key, into: reads[0].buffer)
                } catch {
                    reads[0].error = error
                }
            } else {
                _ = store.get(batch: reads)
            }
            for position in reads.indices where errors[position / perBlock] == nil {
                if let error = reads[position].error {
                    errors[position / perBlock] = error
                } else if reads[position].length != pageBytes {
                    errors[position / perBlock] = .invalidArgument("stored page has \(reads[position].length) bytes, expected \(pageBytes)")
                }
            }
            reads.deinitialize()
        }
        return KVResult(errors: errors)
    }

    /// Starts moving the blocks' pages (or only `layers` of them) toward the top tier.
    public func prefetch(_ hashes: [BlockHash], layers: Range<Int>? = nil) {
        let range = layers ?? 0..<geometry.layers
        var keys: [PageKey] = []
        for block in hashes {
            if geometry.layout == .perLayer {
                for layer in range.clamped(to: 0..<geometry.layers) { keys.append(dataKey(block, layer: layer)) }
            } else {
                keys.append(dataKey(block, layer: 0))
            }
        }
        store.prefetch(keys)
    }

    // MARK: Pin, evict

    /// Keeps the blocks where they are (in active use). All or nothing: on failure, blocks
    /// pinned by this call are unpinned again.
    public func pin(_ hashes: [BlockHash]) throws(SpillwayError) {
        try checkOpen()
        var pinned: [PageKey] = []
        for block in hashes {
            guard store.contains(visibilityKey(block)) else {
                for key in pinned { try? store.unpin(key) }
                throw .unknownKey(visibilityKey(block))
            }
            for key in dataKeys(block) {
                do {
                    try store.pin(key)
                    pinned.append(key)
                } catch {
                    for key in pinned { try? store.unpin(key) }
                    throw error
                }
            }
        }
    }

    public func unpin(_ hashes: [BlockHash]) throws(SpillwayError) {
        var first: SpillwayError?
        for block in hashes {
            for key in dataKeys(block) {
                do { try store.unpin(key) } catch { first = first ?? error }
            }
        }
        if let first { throw first }
    }

    /// Removes blocks (their manifest first, so a concurrent lookup never sees half a block).
    /// Returns how many were stored.
    @discardableResult
    public func evict(_ hashes: [BlockHash]) -> Int {
        var removed = 0
        for block in hashes {
            if (try? store.remove(visibilityKey(block))) == true { removed += 1 }
            for key in dataKeys(block) { _ = try? store.remove(key) }
            state.withLock { state in
                state.committed.remove(block)
                state.pending[block] = nil
            }
        }
        return removed
    }

    /// Removes every block this pool stored.
    @discardableResult
    public func clear() -> Int {
        let blocks = state.withLock { state -> [BlockHash] in
            let all = Array(state.committed) + Array(state.pending.keys)
            return all
        }
        return evict(blocks)
    }

    /// Blocks this pool has made visible and not evicted (some may since have been evicted by
    /// the store's own capacity management: `lookup` is the truth).
    public var committedBlocks: Int { state.withLock { $0.committed.count } }
}

/// The result of an asynchronous store, available once the store has finished.
public final class KVStoreTicket: Sendable {
    private let done = DispatchSemaphore(value: 0)
    private let result = Locked<KVResult?>(nil)

    func finish(_ value: KVResult) {
        result.withLock { $0 = value }
        done.signal()
    }

    /// Waits for the store to finish; then the caller may reuse its buffers.
    public func wait() -> KVResult {
        if let value = result.withLock({ $0 }) { return value }
        done.wait()
        done.signal()  // later waiters return at once
        return result.withLock { $0! }
    }

    /// Waits at most `seconds`: the result, or nil if the store has not finished by then (the
    /// caller must then keep its buffers until a later `wait`).
    public func wait(timeout seconds: Double) -> KVResult? {
        if let value = result.withLock({ $0 }) { return value }
        guard done.wait(timeout: .now() + seconds) == .success else { return nil }
        done.signal()
        return result.withLock { $0! }
    }
}
