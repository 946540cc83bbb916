import Glibc
import Synchronization
@testable import SpillwayCore
@testable import SpillwayMemoryTiers
@testable import SpillwayNVMe
@testable import SpillwayStore

/// Deterministic generator for tests: SpillwayCore's SplitMix64.
typealias SplitMix = SplitMix64

/// Page content derived from (key, nonce): the first 16 bytes carry both, so any reader can
/// check that bytes belong to the key they were read under and are internally consistent.
func pageBytes(key: UInt64, nonce: UInt64, length: Int) -> [UInt8] {
    var generator = SplitMix(seed: key &* 31 ^ nonce)
    var bytes = (0..<length).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
    withUnsafeBytes(of: key.littleEndian) { header in for index in 0..<min(8, length) { bytes[index] = header[index] } }
    if length > 8 {
        withUnsafeBytes(of: nonce.littleEndian) { header in for index in 8..<min(16, length) { bytes[index] = header[index - 8] } }
    }
    return bytes
}

/// Whether `bytes` are exactly what `pageBytes` produced for `key` and some nonce.
func isConsistentPage(_ bytes: [UInt8], key: UInt64) -> Bool {
    guard bytes.count >= 16 else { return false }
    let storedKey = bytes[0..<8].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
    let nonce = bytes[8..<16].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
    return storedKey == key && pageBytes(key: key, nonce: nonce, length: bytes.count) == bytes
}

func makeStore(device: Int, dram: Int, slotSize: Int = 4096, maxPageSize: Int? = nil, worker: Bool = false,
               watermarks: [Watermarks] = [], dramVerifies: Bool = false) throws -> TieredStore
{
    var tiers: [any Tier] = []
    if device > 0 { tiers.append(try DeviceTier(slotSize: slotSize, capacitySlots: device, memory: HostDeviceMemory(prefault: false))) }
    if dram > 0 { tiers.append(try DRAMTier(slotSize: slotSize, capacitySlots: dram, prefault: false, verifiesReads: dramVerifies)) }
    let options = StoreOptions(maxPageSize: maxPageSize ?? slotSize * 3, watermarks: watermarks, backgroundIntervalMilliseconds: 5,
                               backgroundWorker: worker)
    return try TieredStore(tiers: tiers, options: options)
}

/// Slots in use must equal the slots the directory's pages need: nothing leaked, nothing shared.
func accountingHolds(_ store: TieredStore) -> Bool {
    var needed = [Int](repeating: 0, count: store.tiers.count)
    for page in store.directory.allPages() { needed[page.location.tier] += Int(page.location.extent.slotCount) }
    // An NVMe tier holds released slots until their empty index record is on disk.
    return store.tiers.indices.allSatisfy {
        store.tiers[$0].usedSlots - ((store.tiers[$0] as? NVMeTier)?.pendingReleaseSlots ?? 0) == needed[$0]
    }
}

/// A DRAM tier whose reads or writes fail with a chosen errno on demand.
final class FaultyTier: Tier {
    let inner: DRAMTier
    let failWrites = Atomic<Int32>(0)
    let failReads = Atomic<Int32>(0)

    init(name: String = "faulty", slotSize: Int, capacitySlots: Int) throws {
        inner = try DRAMTier(name: name, slotSize: slotSize, capacitySlots: capacitySlots, prefault: false)
    }

    var descriptor: TierDescriptor { inner.descriptor }
    func allocate(slotCount: Int) -> Extent? { inner.allocate(slotCount: slotCount) }
    func release(_ extent: Extent) { inner.release(extent) }
    var usedSlots: Int { inner.usedSlots }
    func close() {}

    func submit(_ batch: TierBatch) {
        let writeErrno = failWrites.load(ordering: .relaxed)
        let readErrno = failReads.load(ordering: .relaxed)
        if writeErrno == 0 && readErrno == 0 { return inner.submit(batch) }
        for index in 0..<batch.count {
            let failing = batch[index].operation == .write ? writeErrno : readErrno
            batch.complete(index, status: failing)
        }
    }
}
