import Atomics
import Foundation
import Spillway

#if canImport(Glibc)
import Glibc
#endif

// The C ABI (include/spillway.h): `@_cdecl` exports over the Swift API. Nothing here throws
// across the boundary or traps on caller input: every entry point validates its arguments,
// maps errors to `spillway_status` codes and records a per-thread message.

/// Status codes beyond `SpillwayError.code`.
enum CStatus {
    static let ok: Int32 = 0
    static let invalidHandle: Int32 = 100
    static let partial: Int32 = 101
    /// `spillway_weights_release` of a layer this handle holds no acquisition of.
    static let notAcquired: Int32 = 102
    /// `spillway_batch_wait` ran out of time; the batch is still running.
    static let timedOut: Int32 = 103
}

/// What a handle names.
enum HandleEntry {
    case store(TieredStore, pools: Set<UInt64>)
    case pool(KVPool, store: UInt64)
    /// An asynchronous store: the pool's ticket (spillway_kv_store_async) or an array store's
    /// (spillway_kv_store_array_async).
    case ticket(KVStoreTicket)
    /// A store batch in flight (spillway_store_submit_get/put).
    case batch(SubmittedBatch)
    case weights(WeightsBox, store: UInt64)
}

/// A registered model, its streamer, and the C strings its tensor views point to (allocated
/// once, freed with the handle). `@unchecked Sendable`: the C strings are immutable after init;
/// `acquired` is behind its lock.
final class WeightsBox: @unchecked Sendable {
    let weights: ModelWeights
    let streamer: WeightStreamer
    let names: [String: (name: UnsafeMutablePointer<CChar>, dtype: UnsafeMutablePointer<CChar>)]
    /// Acquisitions made through this handle and not yet released, per layer. The streamer's
    /// own count is shared by every user of the layer (the prefetcher included) and ignores a
    /// release with no user; counting here makes a release without a matching acquire (or a
    /// second release) a typed error instead of silently giving back somebody else's hold.
    let acquired = Locked<[Int: Int]>([:])

    init(weights: ModelWeights, streamer: WeightStreamer) {
        self.weights = weights
        self.streamer = streamer
        var names: [String: (UnsafeMutablePointer<CChar>, UnsafeMutablePointer<CChar>)] = [:]
        for tensor in weights.file.tensors { names[tensor.name] = (strdup(tensor.name), strdup(tensor.dtype)) }
        self.names = names
    }

    deinit {
        streamer.close()
        for (name, dtype) in names.values {
            free(name)
            free(dtype)
        }
    }
}

/// Every live handle. Handles are counters, never addresses, so a stale or forged one is a
/// lookup miss (`SPILLWAY_E_INVALID_HANDLE`), not a wild pointer.
/// `@unchecked Sendable`: `entries` is behind its lock; the values are thread-safe objects.
final class HandleTable: @unchecked Sendable {
    let entries = Locked<[UInt64: HandleEntry]>([:])
    let next = ManagedAtomic<UInt64>(1)

    func insert(_ entry: HandleEntry) -> UInt64 {
        let handle = next.loadThenWrappingIncrement(ordering: .relaxed)
        entries.withLock { $0[handle] = entry }
        return handle
    }

    func store(_ handle: UInt64) throws(CError) -> TieredStore {
        guard case .store(let store, _) = entries.withLock({ $0[handle] }) else { throw CError.handle("no open store with handle \(handle)") }
        return store
    }

    func pool(_ handle: UInt64) throws(CError) -> KVPool {
        guard case .pool(let pool, _) = entries.withLock({ $0[handle] }) else { throw CError.handle("no KV pool with handle \(handle)") }
        return pool
    }
}

let handles = HandleTable()

/// An error on its way to a status code.
enum CError: Error {
    case spillway(SpillwayError)
    case handle(String)
    case notAcquired(String)

    var status: Int32 {
        switch self {
        case .spillway(let error): error.code
        case .handle: CStatus.invalidHandle
        case .notAcquired: CStatus.notAcquired
        }
    }

    var message: String {
        switch self {
        case .spillway(let error): error.description
        case .handle(let message): "invalid handle: \(message)"
        case .notAcquired(let message): "not acquired: \(message)"
        }
    }
}

/// The calling thread's last error message (a malloc'd C string, freed when replaced or
/// when the thread exits).
let lastErrorKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key) { free($0) }
    return key
}()

func setLastError(_ message: String) {
    let old = pthread_getspecific(lastErrorKey)
    pthread_setspecific(lastErrorKey, strdup(message))
    free(old)
}

/// Runs an entry point: maps thrown errors to status codes and records the message.
func entry(_ body: () throws(CError) -> Int32) -> Int32 {
    do {
        return try body()
    } catch {
        setLastError(error.message)
        return error.status
    }
}

func wrap<R>(_ body: () throws(SpillwayError) -> R) throws(CError) -> R {
    do { return try body() } catch { throw .spillway(error) }
}

func argument(_ condition: Bool, _ message: @autoclosure () -> String) throws(CError) {
    if !condition { throw .spillway(.invalidArgument(message())) }
}

/// A 16-byte big-endian key.
func readKey(_ bytes: UnsafePointer<UInt8>) -> PageKey {
    var high: UInt64 = 0
    var low: UInt64 = 0
    for index in 0..<8 { high = high << 8 | UInt64(bytes[index]) }
    for index in 8..<16 { low = low << 8 | UInt64(bytes[index]) }
    return PageKey(high: high, low: low)
}

func writeKey(_ key: PageKey, _ bytes: UnsafeMutablePointer<UInt8>) {
    for index in 0..<8 { bytes[index] = UInt8(truncatingIfNeeded: key.high >> (56 - 8 * UInt64(index))) }
    for index in 0..<8 { bytes[8 + index] = UInt8(truncatingIfNeeded: key.low >> (56 - 8 * UInt64(index))) }
}

func readHashes(_ bytes: UnsafePointer<UInt8>?, _ count: Int) throws(CError) -> [BlockHash] {
    try argument(count >= 0 && count <= 1 << 24, "block count \(count)")
    guard count > 0 else { return [] }
    guard let bytes else { throw .spillway(.invalidArgument("hashes is NULL")) }
    return (0..<count).map { index in
        let key = readKey(bytes + 16 * index)
        return BlockHash(high: key.high, low: key.low)
    }
}

@_cdecl("spillway_version")
public func spillway_version() -> UnsafePointer<CChar> {
    UnsafeRawPointer(StaticString("0.3.0").utf8Start).assumingMemoryBound(to: CChar.self)
}

@_cdecl("spillway_last_error")
public func spillway_last_error() -> UnsafePointer<CChar> {
    if let message = pthread_getspecific(lastErrorKey) { return UnsafePointer(message.assumingMemoryBound(to: CChar.self)) }
    return UnsafeRawPointer(StaticString("").utf8Start).assumingMemoryBound(to: CChar.self)
}

// MARK: Store

@_cdecl("spillway_store_open")
public func spillway_store_open(_ path: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<UInt64>?) -> Int32 {
    entry { () throws(CError) in
        guard let out else { throw .spillway(.invalidArgument("out is NULL")) }
        let configuration = try wrap { () throws(SpillwayError) in
            try path.map { path throws(SpillwayError) in try SpillwayConfiguration(contentsOfFile: String(cString: path)) }
                ?? SpillwayConfiguration.libraryDefault
        }
        let store = try wrap { () throws(SpillwayError) in try TieredStore.open(configuration) }
        out.pointee = handles.insert(.store(store, pools: []))
        return CStatus.ok
    }
}

@_cdecl("spillway_store_close")
public func spillway_store_close(_ handle: UInt64) -> Int32 {
    entry { () throws(CError) in
        let removed = handles.entries.withLock { entries -> (TieredStore, [KVPool])? in
            guard case .store(let store, let poolHandles) = entries[handle] else { return nil }
            entries[handle] = nil
            var pools: [KVPool] = []
            for poolHandle in poolHandles {
                if case .pool(let pool, _) = entries[poolHandle] { pools.append(pool) }
                if case .weights(let box, _) = entries[poolHandle] { box.streamer.close() }
                entries[poolHandle] = nil
            }
            return (store, pools)
        }
        guard let (store, pools) = removed else { throw .handle("no open store with handle \(handle)") }
        for pool in pools { pool.close() }
        store.close()
        return CStatus.ok
    }
}

@_cdecl("spillway_store_put")
public func spillway_store_put(_ handle: UInt64, _ key: UnsafePointer<UInt8>?, _ bytes: UnsafeRawPointer?, _ length: Int) -> Int32 {
    entry { () throws(CError) in
        let store = try handles.store(handle)
        guard let key else { throw .spillway(.invalidArgument("key is NULL")) }
        try argument(length >= 0 && (bytes != nil || length == 0), "bytes is NULL or length is negative")
        try wrap { () throws(SpillwayError) in try store.put(readKey(key), UnsafeRawBufferPointer(start: bytes, count: length)) }
        return CStatus.ok
    }
}

@_cdecl("spillway_store_put_hinted")
public func spillway_store_put_hinted(_ handle: UInt64, _ key: UnsafePointer<UInt8>?, _ bytes: UnsafeRawPointer?, _ length: Int,
                                      _ pageClass: UInt32, _ order: UInt32, _ parentKey: UnsafePointer<UInt8>?) -> Int32
{
    entry { () throws(CError) in
        let store = try handles.store(handle)
        guard let key else { throw .spillway(.invalidArgument("key is NULL")) }
        try argument(length >= 0 && (bytes != nil || length == 0), "bytes is NULL or length is negative")
        guard let kind = UInt8(exactly: pageClass).flatMap(PageClass.init(rawValue:)) else {
            throw .spillway(.invalidArgument("unknown page class \(pageClass) (0 generic, 1 kv block, 2 weights)"))
        }
        let hints = PageHints(pageClass: kind, order: UInt16(clamping: order),
                              parent: parentKey.map { PageHints.parentID(of: readKey($0)) } ?? 0)
        try wrap { () throws(SpillwayError) in
            try store.put(readKey(key), UnsafeRawBufferPointer(start: bytes, count: length), hints: hints)
        }
        return CStatus.ok
    }
}

@_cdecl("spillway_store_page_hints")
public func spillway_store_page_hints(_ handle: UInt64, _ key: UnsafePointer<UInt8>?, _ pageClass: UnsafeMutablePointer<UInt32>?,
                                      _ order: UnsafeMutablePointer<UInt32>?, _ parentID: UnsafeMutablePointer<UInt64>?) -> Int32
{
    entry { () throws(CError) in
        let store = try handles.store(handle)
        guard let key else { throw .spillway(.invalidArgument("key is NULL")) }
        guard let hints = store.hints(of: readKey(key)) else { throw .spillway(.unknownKey(readKey(key))) }
        pageClass?.pointee = UInt32(hints.pageClass.rawValue)
        order?.pointee = UInt32(hints.order)
        parentID?.pointee = hints.parent
        return CStatus.ok
    }
}

@_cdecl("spillway_parent_id")
public func spillway_parent_id(_ key: UnsafePointer<UInt8>?) -> UInt64 {
    // A NULL key has no id; 0 is what "no parent" reads as.
    guard let key else { return 0 }
    return PageHints.parentID(of: readKey(key))
}

@_cdecl("spillway_store_get")
public func spillway_store_get(_ handle: UInt64, _ key: UnsafePointer<UInt8>?, _ buffer: UnsafeMutableRawPointer?, _ capacity: Int,
                               _ length: UnsafeMutablePointer<Int>?) -> Int32
{
    entry { () throws(CError) in
        let store = try handles.store(handle)
        guard let key else { throw .spillway(.invalidArgument("key is NULL")) }
        try argument(capacity >= 0 && (buffer != nil || capacity == 0), "buffer is NULL or capacity is negative")
        do throws(SpillwayError) {
            let got = try store.get(readKey(key), into: UnsafeMutableRawBufferPointer(start: buffer, count: capacity))
            length?.pointee = got
        } catch {
            if case .bufferTooSmall(let required, available: _) = error { length?.pointee = required }
            throw .spillway(error)
        }
        return CStatus.ok
    }
}

@_cdecl("spillway_store_remove")
public func spillway_store_remove(_ handle: UInt64, _ key: UnsafePointer<UInt8>?) -> Int32 {
    entry { () throws(CError) in
        let store = try handles.store(handle)
        guard let key else { throw .spillway(.invalidArgument("key is NULL")) }
        guard try wrap({ () throws(SpillwayError) in try store.remove(readKey(key)) }) else {
            throw .spillway(.unknownKey(readKey(key)))
        }
        return CStatus.ok
    }
}

@_cdecl("spillway_store_stats_json")
public func spillway_store_stats_json(_ handle: UInt64, _ buffer: UnsafeMutablePointer<CChar>?, _ capacity: Int,
                                      _ length: UnsafeMutablePointer<Int>?) -> Int32
{
    entry { () throws(CError) in
        let store = try handles.store(handle)
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.sortedKeys]
        let stats = store.stats()
        var object = ((try? encoder.encode(stats)).flatMap { try? JSONSerialization.jsonObject(with: $0) } as? [String: Any]) ?? [:]
        // Computed values the Codable synthesis leaves out.
        object["goodput"] = stats.goodput
        object["stall_nanoseconds"] = stats.stallNanoseconds
        let bytes = Array((try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8))
        length?.pointee = bytes.count
        guard let buffer, capacity > bytes.count else { throw .spillway(.bufferTooSmall(required: bytes.count + 1, available: capacity)) }
        bytes.withUnsafeBytes { UnsafeMutableRawPointer(buffer).copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        buffer[bytes.count] = 0
        return CStatus.ok
    }
}

// MARK: KV pool

@_cdecl("spillway_kv_pool_create")
public func spillway_kv_pool_create(_ storeHandle: UInt64, _ geometry: UnsafeRawPointer?, _ modelID: UnsafePointer<CChar>?,
                                    _ out: UnsafeMutablePointer<UInt64>?) -> Int32
{
    entry { () throws(CError) in
        let store = try handles.store(storeHandle)
        guard let geometry, let modelID, let out else { throw .spillway(.invalidArgument("geometry, model_id and out must not be NULL")) }
        // spillway_kv_geometry: six uint32_t.
        let fields = (0..<6).map { Int(geometry.loadUnaligned(fromByteOffset: 4 * $0, as: UInt32.self)) }
        try argument(fields[5] <= 1, "layout \(fields[5]) (0 = per-layer, 1 = whole-block)")
        let shape = KVBlockGeometry(tokensPerBlock: fields[0], layers: fields[1], kvHeads: fields[2], headDim: fields[3],
                                    dtypeSize: fields[4], layout: fields[5] == 0 ? .perLayer : .wholeBlock)
        let pool = try wrap { () throws(SpillwayError) in try KVPool(store: store, geometry: shape, modelID: String(cString: modelID)) }
        let handle = handles.insert(.pool(pool, store: storeHandle))
        let attached = handles.entries.withLock { entries -> Bool in
            guard case .store(let store, var pools) = entries[storeHandle] else { return false }
            pools.insert(handle)
            entries[storeHandle] = .store(store, pools: pools)
            return true
        }
        guard attached else {
            handles.entries.withLock { $0[handle] = nil }
            pool.close()
            throw .handle("store \(storeHandle) was closed meanwhile")
        }
        out.pointee = handle
        return CStatus.ok
    }
}

@_cdecl("spillway_kv_pool_destroy")
public func spillway_kv_pool_destroy(_ handle: UInt64) -> Int32 {
    entry { () throws(CError) in
        let pool = handles.entries.withLock { entries -> KVPool? in
            guard case .pool(let pool, let storeHandle) = entries[handle] else { return nil }
            entries[handle] = nil
            if case .store(let store, var pools) = entries[storeHandle] {
                pools.remove(handle)
                entries[storeHandle] = .store(store, pools: pools)
            }
            return pool
        }
        guard let pool else { throw .handle("no KV pool with handle \(handle)") }
        pool.close()
        return CStatus.ok
    }
}

@_cdecl("spillway_kv_block_sizes")
public func spillway_kv_block_sizes(_ handle: UInt64, _ layerBytes: UnsafeMutablePointer<Int>?, _ blockBytes: UnsafeMutablePointer<Int>?) -> Int32 {
    entry { () throws(CError) in
        let pool = try handles.pool(handle)
        layerBytes?.pointee = pool.geometry.layerBytes
        blockBytes?.pointee = pool.geometry.blockBytes
        return CStatus.ok
    }
}

@_cdecl("spillway_kv_block_hashes")
public func spillway_kv_block_hashes(_ handle: UInt64, _ tokens: UnsafePointer<UInt32>?, _ count: Int, _ hashes: UnsafeMutablePointer<UInt8>?,
                                     _ capacity: Int, _ blocks: UnsafeMutablePointer<Int>?) -> Int32
{
    entry { () throws(CError) in
        let pool = try handles.pool(handle)
        try argument(count >= 0 && (tokens != nil || count == 0), "tokens is NULL or count is negative")
        let all = count == 0 ? [] : Array(UnsafeBufferPointer(start: tokens, count: count))
        let result = pool.blockHashes(tokens: all)
        blocks?.pointee = result.count
        try argument(capacity >= 0, "capacity is negative")
        guard result.count <= capacity || result.isEmpty else {
            throw .spillway(.bufferTooSmall(required: 16 * result.count, available: 16 * capacity))
        }
        guard let hashes else {
            if result.isEmpty { return CStatus.ok }
            throw .spillway(.invalidArgument("hashes is NULL"))
        }
        for (index, hash) in result.enumerated() { writeKey(PageKey(high: hash.high, low: hash.low), hashes + 16 * index) }
        return CStatus.ok
    }
}

@_cdecl("spillway_kv_lookup")
public func spillway_kv_lookup(_ handle: UInt64, _ hashes: UnsafePointer<UInt8>?, _ count: Int, _ matched: UnsafeMutablePointer<Int>?) -> Int32 {
    entry { () throws(CError) in
        let pool = try handles.pool(handle)
        guard let matched else { throw .spillway(.invalidArgument("matched is NULL")) }
        matched.pointee = pool.lookup(try readHashes(hashes, count))
        return CStatus.ok
    }
}

/// Status of a per-block result: OK, the error when nothing succeeded, else PARTIAL.
func status(of result: KVResult) throws(CError) -> Int32 {
    if result.allSucceeded { return CStatus.ok }
    let first = result.firstError ?? .invalidArgument("unknown failure")
    if result.succeeded == 0 { throw .spillway(first) }
    setLastError("\(result.errors.count - result.succeeded) of \(result.errors.count) blocks failed; first: \(first)")
    return CStatus.partial
}

func bufferList(_ buffers: UnsafePointer<UnsafeRawPointer?>?, _ count: Int, _ bytes: Int) throws(CError) -> [UnsafeRawBufferPointer] {
    try argument(bytes >= 0, "buffer_bytes is negative")
    guard count > 0 else { return [] }
    guard let buffers else { throw .spillway(.invalidArgument("buffers is NULL")) }
    var list: [UnsafeRawBufferPointer] = []
    for index in 0..<count {
        guard let buffer = buffers[index] else { throw .spillway(.invalidArgument("buffers[\(index)] is NULL")) }
        list.append(UnsafeRawBufferPointer(start: buffer, count: bytes))
    }
    return list
}

@_cdecl("spillway_kv_store")
public func spillway_kv_store(_ handle: UInt64, _ hashes: UnsafePointer<UInt8>?, _ count: Int, _ layer: Int32,
                              _ buffers: UnsafePointer<UnsafeRawPointer?>?, _ bufferBytes: Int, _ stored: UnsafeMutablePointer<Int>?) -> Int32
{
    entry { () throws(CError) in
        let pool = try handles.pool(handle)
        let blocks = try readHashes(hashes, count)
        let list = try bufferList(buffers, count, bufferBytes)
        let result = layer < 0 ? pool.store(blocks, blocks: list) : pool.storeLayer(blocks, layer: Int(layer), buffers: list)
        stored?.pointee = result.contiguous
        return try status(of: result)
    }
}

@_cdecl("spillway_kv_store_async")
public func spillway_kv_store_async(_ handle: UInt64, _ hashes: UnsafePointer<UInt8>?, _ count: Int, _ layer: Int32,
                                    _ buffers: UnsafePointer<UnsafeRawPointer?>?, _ bufferBytes: Int,
                                    _ ticket: UnsafeMutablePointer<UInt64>?) -> Int32
{
    entry { () throws(CError) in
        let pool = try handles.pool(handle)
        guard let ticket else { throw .spillway(.invalidArgument("ticket is NULL")) }
        let blocks = try readHashes(hashes, count)
        let list = try bufferList(buffers, count, bufferBytes)
        let pending = pool.storeAsync(blocks, layer: layer < 0 ? nil : Int(layer), buffers: list)
        ticket.pointee = handles.insert(.ticket(pending))
        return CStatus.ok
    }
}

@_cdecl("spillway_kv_wait")
public func spillway_kv_wait(_ handle: UInt64, _ stored: UnsafeMutablePointer<Int>?) -> Int32 {
    entry { () throws(CError) in
        let ticket = handles.entries.withLock { entries -> KVStoreTicket? in
            guard case .ticket(let ticket) = entries[handle] else { return nil }
            entries[handle] = nil
            return ticket
        }
        guard let ticket else { throw .handle("no pending store with ticket \(handle)") }
        let result = ticket.wait()
        stored?.pointee = result.contiguous
        return try status(of: result)
    }
}

@_cdecl("spillway_kv_load")
public func spillway_kv_load(_ handle: UInt64, _ hashes: UnsafePointer<UInt8>?, _ count: Int, _ layer: Int32,
                             _ buffers: UnsafePointer<UnsafeMutableRawPointer?>?, _ bufferBytes: Int,
                             _ loaded: UnsafeMutablePointer<Int>?) -> Int32
{
    entry { () throws(CError) in
        let pool = try handles.pool(handle)
        let blocks = try readHashes(hashes, count)
        let list = try bufferList(UnsafeRawPointer(buffers).map { $0.assumingMemoryBound(to: UnsafeRawPointer?.self) }, count, bufferBytes)
        let result = pool.load(blocks, layer: layer < 0 ? nil : Int(layer), into: list.map { UnsafeMutableRawBufferPointer(mutating: $0) })
        loaded?.pointee = result.contiguous
        return try status(of: result)
    }
}

/// The C arguments of an array call, checked: the pool's layers first_layer..<first_layer +
/// layer_count, the strides, and layer_bytes equal to the pool's (what the caller believes a
/// slice holds). The pool checks the rest (strides, extent, overlap) before touching memory.
func arrayArguments(_ pool: KVPool, count: Int, base: UnsafeRawPointer?, firstLayer: Int32, layerCount: Int32,
                    layerStride: Int, blockStride: Int, layerBytes: Int, disjoint: Bool) throws(CError) -> (Range<Int>, KVArrayStrides)
{
    try argument(layerBytes == pool.geometry.layerBytes,
                 "layer_bytes \(layerBytes) does not match the pool's \(pool.geometry.layerBytes) bytes per layer slice")
    try argument(firstLayer >= 0 && layerCount >= 1 && Int(firstLayer) + Int(layerCount) <= pool.geometry.layers,
                 "layers \(firstLayer) + \(layerCount): need first_layer >= 0, layer_count >= 1, first_layer + layer_count <= \(pool.geometry.layers)")
    try argument(base != nil || count == 0, "base is NULL")
    let layers = Int(firstLayer)..<(Int(firstLayer) + Int(layerCount))
    let strides = KVArrayStrides(layerStride: layerStride, blockStride: blockStride)
    _ = try wrap { () throws(SpillwayError) in try pool.checkArray(blocks: count, layers: layers, strides: strides, disjoint: disjoint) }
    return (layers, strides)
}

@_cdecl("spillway_kv_store_array")
public func spillway_kv_store_array(_ handle: UInt64, _ hashes: UnsafePointer<UInt8>?, _ count: Int, _ firstLayer: Int32, _ layerCount: Int32,
                                    _ base: UnsafeRawPointer?, _ layerStride: Int, _ blockStride: Int, _ layerBytes: Int,
                                    _ stored: UnsafeMutablePointer<Int>?) -> Int32
{
    entry { () throws(CError) in
        let pool = try handles.pool(handle)
        let blocks = try readHashes(hashes, count)
        let (layers, strides) = try arrayArguments(pool, count: count, base: base, firstLayer: firstLayer, layerCount: layerCount,
                                                   layerStride: layerStride, blockStride: blockStride, layerBytes: layerBytes, disjoint: false)
        guard let base else {
            stored?.pointee = 0
            return CStatus.ok
        }
        let result = pool.storeLayers(blocks, layers: layers, from: base, strides: strides)
        stored?.pointee = result.contiguous
        return try status(of: result)
    }
}

@_cdecl("spillway_kv_store_array_async")
public func spillway_kv_store_array_async(_ handle: UInt64, _ hashes: UnsafePointer<UInt8>?, _ count: Int, _ firstLayer: Int32,
                                          _ layerCount: Int32, _ base: UnsafeRawPointer?, _ layerStride: Int, _ blockStride: Int,
                                          _ layerBytes: Int, _ ticket: UnsafeMutablePointer<UInt64>?) -> Int32
{
    entry { () throws(CError) in
        let pool = try handles.pool(handle)
        guard let ticket else { throw .spillway(.invalidArgument("ticket is NULL")) }
        let blocks = try readHashes(hashes, count)
        let (layers, strides) = try arrayArguments(pool, count: count, base: base, firstLayer: firstLayer, layerCount: layerCount,
                                                   layerStride: layerStride, blockStride: blockStride, layerBytes: layerBytes, disjoint: false)
        // No base: no blocks (checked above), an empty store.
        let pending = base.map { pool.storeLayersAsync(blocks, layers: layers, from: $0, strides: strides) } ?? pool.storeAsync([], buffers: [])
        ticket.pointee = handles.insert(.ticket(pending))
        return CStatus.ok
    }
}

@_cdecl("spillway_kv_load_array")
public func spillway_kv_load_array(_ handle: UInt64, _ hashes: UnsafePointer<UInt8>?, _ count: Int, _ firstLayer: Int32, _ layerCount: Int32,
                                   _ base: UnsafeMutableRawPointer?, _ layerStride: Int, _ blockStride: Int, _ layerBytes: Int,
                                   _ loaded: UnsafeMutablePointer<Int>?) -> Int32
{
    entry { () throws(CError) in
        let pool = try handles.pool(handle)
        let blocks = try readHashes(hashes, count)
        let (layers, strides) = try arrayArguments(pool, count: count, base: base.map { UnsafeRawPointer($0) }, firstLayer: firstLayer,
                                                   layerCount: layerCount, layerStride: layerStride, blockStride: blockStride,
                                                   layerBytes: layerBytes, disjoint: true)
        guard let base else {
            loaded?.pointee = 0
            return CStatus.ok
        }
        let result = pool.loadLayers(blocks, layers: layers, into: base, strides: strides)
        loaded?.pointee = result.contiguous
        return try status(of: result)
    }
}

@_cdecl("spillway_kv_prefetch")
public func spillway_kv_prefetch(_ handle: UInt64, _ hashes: UnsafePointer<UInt8>?, _ count: Int) -> Int32 {
    entry { () throws(CError) in
        try handles.pool(handle).prefetch(try readHashes(hashes, count))
        return CStatus.ok
    }
}

@_cdecl("spillway_kv_pin")
public func spillway_kv_pin(_ handle: UInt64, _ hashes: UnsafePointer<UInt8>?, _ count: Int) -> Int32 {
    entry { () throws(CError) in
        let pool = try handles.pool(handle)
        let blocks = try readHashes(hashes, count)
        try wrap { () throws(SpillwayError) in try pool.pin(blocks) }
        return CStatus.ok
    }
}

@_cdecl("spillway_kv_unpin")
public func spillway_kv_unpin(_ handle: UInt64, _ hashes: UnsafePointer<UInt8>?, _ count: Int) -> Int32 {
    entry { () throws(CError) in
        let pool = try handles.pool(handle)
        let blocks = try readHashes(hashes, count)
        try wrap { () throws(SpillwayError) in try pool.unpin(blocks) }
        return CStatus.ok
    }
}

@_cdecl("spillway_kv_evict")
public func spillway_kv_evict(_ handle: UInt64, _ hashes: UnsafePointer<UInt8>?, _ count: Int, _ removed: UnsafeMutablePointer<Int>?) -> Int32 {
    entry { () throws(CError) in
        let pool = try handles.pool(handle)
        removed?.pointee = pool.evict(try readHashes(hashes, count))
        return CStatus.ok
    }
}

// MARK: Weights

func weightsBox(_ handle: UInt64) throws(CError) -> WeightsBox {
    guard case .weights(let box, _) = handles.entries.withLock({ $0[handle] }) else { throw .handle("no weights with handle \(handle)") }
    return box
}

@_cdecl("spillway_weights_register")
public func spillway_weights_register(_ storeHandle: UInt64, _ path: UnsafePointer<CChar>?, _ modelID: UnsafePointer<CChar>?, _ tier: Int32,
                                      _ deviceBudget: Int, _ prefetch: UInt32, _ out: UnsafeMutablePointer<UInt64>?) -> Int32
{
    entry { () throws(CError) in
        let store = try handles.store(storeHandle)
        guard let path, let modelID, let out else { throw .spillway(.invalidArgument("path, model_id and out must not be NULL")) }
        try argument(deviceBudget > 0 && prefetch <= 64, "device budget must be positive and prefetch at most 64")
        let weights = try wrap { () throws(SpillwayError) in
            try ModelWeights(store: store, path: String(cString: path), modelID: String(cString: modelID), tier: tier < 0 ? nil : Int(tier))
        }
        let streamer = try wrap { () throws(SpillwayError) in try WeightStreamer(weights: weights, deviceBudget: deviceBudget, prefetchDepth: Int(prefetch)) }
        let handle = handles.insert(.weights(WeightsBox(weights: weights, streamer: streamer), store: storeHandle))
        let attached = handles.entries.withLock { entries -> Bool in
            guard case .store(let store, var children) = entries[storeHandle] else { return false }
            children.insert(handle)
            entries[storeHandle] = .store(store, pools: children)
            return true
        }
        guard attached else {
            handles.entries.withLock { $0[handle] = nil }
            throw .handle("store \(storeHandle) was closed meanwhile")
        }
        out.pointee = handle
        return CStatus.ok
    }
}

@_cdecl("spillway_weights_layers")
public func spillway_weights_layers(_ handle: UInt64, _ layers: UnsafeMutablePointer<Int32>?, _ capacity: Int, _ count: UnsafeMutablePointer<Int>?) -> Int32 {
    entry { () throws(CError) in
        let box = try weightsBox(handle)
        let all = box.weights.layers
        count?.pointee = all.count
        guard capacity >= all.count else { throw .spillway(.bufferTooSmall(required: all.count, available: max(0, capacity))) }
        guard let layers else { throw .spillway(.invalidArgument("layers is NULL")) }
        for (index, layer) in all.enumerated() { layers[index] = Int32(layer) }
        return CStatus.ok
    }
}

@_cdecl("spillway_weights_acquire")
public func spillway_weights_acquire(_ handle: UInt64, _ layer: Int32, _ views: UnsafeMutableRawPointer?, _ capacity: Int,
                                     _ count: UnsafeMutablePointer<Int>?) -> Int32
{
    entry { () throws(CError) in
        let box = try weightsBox(handle)
        let tensors = box.weights.tensors(layer: Int(layer))
        count?.pointee = tensors.count
        guard box.weights.layers.contains(Int(layer)) else { throw .spillway(.invalidArgument("no layer \(layer)")) }
        guard capacity >= tensors.count else { throw .spillway(.bufferTooSmall(required: tensors.count, available: max(0, capacity))) }
        guard let views else { throw .spillway(.invalidArgument("views is NULL")) }
        let acquired = try wrap { () throws(SpillwayError) in try box.streamer.acquire(layer: Int(layer)) }
        box.acquired.withLock { $0[Int(layer), default: 0] += 1 }
        // spillway_tensor_view: name, dtype, data pointers then a size_t (32 bytes).
        for (index, (info, bytes)) in acquired.tensors.enumerated() {
            let view = views + 32 * index
            let strings = box.names[info.name]!
            view.storeBytes(of: UnsafeRawPointer(strings.name), toByteOffset: 0, as: UnsafeRawPointer.self)
            view.storeBytes(of: UnsafeRawPointer(strings.dtype), toByteOffset: 8, as: UnsafeRawPointer.self)
            view.storeBytes(of: bytes.baseAddress.map { UInt(bitPattern: $0) } ?? 0, toByteOffset: 16, as: UInt.self)
            view.storeBytes(of: bytes.count, toByteOffset: 24, as: Int.self)
        }
        return CStatus.ok
    }
}

@_cdecl("spillway_weights_release")
public func spillway_weights_release(_ handle: UInt64, _ layer: Int32) -> Int32 {
    entry { () throws(CError) in
        let box = try weightsBox(handle)
        // Take one of this handle's acquisitions first; only then give the layer back.
        let held = box.acquired.withLock { acquired -> Bool in
            guard let count = acquired[Int(layer)], count > 0 else { return false }
            acquired[Int(layer)] = count == 1 ? nil : count - 1
            return true
        }
        guard held else { throw .notAcquired("layer \(layer) is not acquired through weights handle \(handle) (never acquired, or already released)") }
        box.streamer.release(layer: Int(layer))
        return CStatus.ok
    }
}

@_cdecl("spillway_weights_stall")
public func spillway_weights_stall(_ handle: UInt64, _ nanoseconds: UnsafeMutablePointer<UInt64>?) -> Int32 {
    entry { () throws(CError) in
        nanoseconds?.pointee = try weightsBox(handle).streamer.stallNanoseconds.total
        return CStatus.ok
    }
}

@_cdecl("spillway_weights_destroy")
public func spillway_weights_destroy(_ handle: UInt64) -> Int32 {
    entry { () throws(CError) in
        let box = handles.entries.withLock { entries -> WeightsBox? in
            guard case .weights(let box, let storeHandle) = entries[handle] else { return nil }
            entries[handle] = nil
            if case .store(let store, var children) = entries[storeHandle] {
                children.remove(handle)
                entries[storeHandle] = .store(store, pools: children)
            }
            return box
        }
        guard let box else { throw .handle("no weights with handle \(handle)") }
        box.streamer.close()
        return CStatus.ok
    }
}
