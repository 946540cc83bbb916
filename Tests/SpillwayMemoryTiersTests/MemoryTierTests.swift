import Glibc
import Logging
import Synchronization
import Testing
@testable import SpillwayCore
@testable import SpillwayMemoryTiers

func roundTrip(_ tier: any Tier, slotCount: Int, length: Int) throws -> Bool {
    let extent = try #require(tier.allocate(slotCount: slotCount))
    defer { tier.release(extent) }
    let source = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
    var target = [UInt8](repeating: 0, count: length)
    let batch = TierBatch(capacity: 2)
    source.withUnsafeBytes { bytes in
        batch.append(TierIO(operation: .write, extent: extent, buffer: bytes.baseAddress, length: length))
        batch.run(on: tier, inline: tier.descriptor.completesInline)
    }
    #expect(batch.firstFailure == nil)
    batch.reset()
    target.withUnsafeMutableBytes { bytes in
        batch.append(TierIO(operation: .read, extent: extent, buffer: bytes.baseAddress, length: length))
        batch.run(on: tier, inline: tier.descriptor.completesInline)
    }
    #expect(batch.firstFailure == nil)
    return source == target
}

@Suite struct DRAMTierTests {
    @Test func roundTripsSingleAndMultiSlotExtents() throws {
        let tier = try DRAMTier(slotSize: 4096, capacitySlots: 16, prefault: false)
        #expect(try roundTrip(tier, slotCount: 1, length: 4096))
        #expect(try roundTrip(tier, slotCount: 3, length: 3 * 4096 - 17))
        #expect(tier.usedSlots == 0)
        #expect(tier.descriptor.kind == .dram && tier.descriptor.completesInline)
    }

    @Test func refusesOutOfRangeAndOversizedIO() throws {
        let tier = try DRAMTier(slotSize: 4096, capacitySlots: 4, prefault: false)
        var buffer = [UInt8](repeating: 0, count: 8192)
        let batch = TierBatch(capacity: 2)
        buffer.withUnsafeMutableBytes { bytes in
            batch.append(TierIO(operation: .read, extent: Extent(firstSlot: 3, slotCount: 2), buffer: bytes.baseAddress, length: 4096))
            batch.append(TierIO(operation: .read, extent: Extent(firstSlot: 0, slotCount: 1), buffer: bytes.baseAddress, length: 8192))
            batch.run(on: tier, inline: true)
        }
        #expect(batch[0].status == EINVAL)
        #expect(batch[1].status == EINVAL)
    }

    @Test func rejectsBadGeometry() {
        #expect(throws: SpillwayError.self) { _ = try DRAMTier(slotSize: 3000, capacitySlots: 4) }
        #expect(throws: SpillwayError.self) { _ = try DRAMTier(slotSize: 4 << 20, capacitySlots: 4) }
        #expect(throws: SpillwayError.self) { _ = try DRAMTier(slotSize: 4096, capacitySlots: 0) }
    }
}

/// A device backend whose copies or synchronization fail on demand.
final class FailingDeviceMemory: DeviceMemory, @unchecked Sendable {
    let backendName = "failing"
    let inner = HostDeviceMemory(prefault: false)
    let failCopies = Atomic<Bool>(false)
    let failSync = Atomic<Bool>(false)

    func allocate(byteCount: Int) throws(SpillwayError) { try inner.allocate(byteCount: byteCount) }
    func copyIn(from source: UnsafeRawPointer, toOffset offset: Int, count: Int) throws(SpillwayError) {
        if failCopies.load(ordering: .relaxed) { throw .tierIO(tier: "device", operation: "copy in", errno: EIO) }
        try inner.copyIn(from: source, toOffset: offset, count: count)
    }
    func copyOut(fromOffset offset: Int, to destination: UnsafeMutableRawPointer, count: Int) throws(SpillwayError) {
        if failCopies.load(ordering: .relaxed) { throw .tierIO(tier: "device", operation: "copy out", errno: EIO) }
        try inner.copyOut(fromOffset: offset, to: destination, count: count)
    }
    func synchronize() throws(SpillwayError) {
        if failSync.load(ordering: .relaxed) { throw .tierIO(tier: "device", operation: "synchronize", errno: EIO) }
    }
}

@Suite struct DeviceTierTests {
    @Test func roundTripsOnHostBackend() throws {
        let tier = try DeviceTier(slotSize: 8192, capacitySlots: 8, memory: HostDeviceMemory(prefault: false))
        #expect(try roundTrip(tier, slotCount: 2, length: 10_000))
        #expect(tier.descriptor.kind == .device)
    }

    @Test func backendFailuresBecomeIOErrors() throws {
        let memory = FailingDeviceMemory()
        let tier = try DeviceTier(slotSize: 4096, capacitySlots: 4, memory: memory)
        var buffer = [UInt8](repeating: 1, count: 4096)
        let batch = TierBatch(capacity: 2)
        memory.failCopies.store(true, ordering: .relaxed)
        buffer.withUnsafeMutableBytes { bytes in
            batch.append(TierIO(operation: .write, extent: Extent(firstSlot: 0, slotCount: 1), buffer: bytes.baseAddress, length: 4096))
            batch.run(on: tier, inline: true)
        }
        #expect(batch[0].status == EIO)
        memory.failCopies.store(false, ordering: .relaxed)
        memory.failSync.store(true, ordering: .relaxed)
        batch.reset()
        buffer.withUnsafeMutableBytes { bytes in
            batch.append(TierIO(operation: .write, extent: Extent(firstSlot: 0, slotCount: 1), buffer: bytes.baseAddress, length: 4096))
            batch.run(on: tier, inline: true)
        }
        #expect(batch[0].status == EIO, "a failed synchronize fails the batch")
    }

    @Test func hostBackendChecksBounds() throws {
        let memory = HostDeviceMemory(prefault: false)
        try memory.allocate(byteCount: 4096)
        var byte: UInt8 = 0
        #expect(throws: SpillwayError.self) { try memory.copyOut(fromOffset: 4090, to: &byte, count: 10) }
        #expect(throws: SpillwayError.self) { try memory.copyIn(from: &byte, toOffset: -1, count: 1) }
    }

    /// Whether this process may pin 4 KiB: root (CAP_IPC_LOCK) or a memlock limit that allows it.
    static let mayLock: Bool = {
        var limit = rlimit()
        return geteuid() == 0 || (getrlimit(__rlimit_resource_t(__RLIMIT_MEMLOCK.rawValue), &limit) == 0 && limit.rlim_cur >= 4096)
    }()

    /// The pinned path: mlock is allowed, so the device backend's arena is locked.
    @Test(.enabled(if: DeviceTierTests.mayLock, "neither root nor an RLIMIT_MEMLOCK of at least 4 KiB: mlock would be refused"))
    func hostBackendPinsItsMemoryWhenAllowed() throws {
        let memory = HostDeviceMemory(prefault: false)
        try memory.allocate(byteCount: 4096)
        #expect(memory.isLocked)
    }

    /// The unpinned fallback: an arena whose mlock is refused logs a warning naming the errno
    /// and works, unpinned. (Injected: as root, a lowered RLIMIT_MEMLOCK does not refuse.)
    @Test func anArenaWhoseLockIsRefusedWarnsAndWorksUnpinned() throws {
        let records = CapturedLog()
        let logger = Logger(label: "test.arena") { _ in CapturingLogHandler(records: records) }
        let arena = try HostArena(byteCount: 8192, prefault: false, lock: true, label: "device/test", logger: logger) { _, _ in EPERM }
        #expect(!arena.locked)
        let warnings = records.entries.withLock { $0.filter { $0.level == .warning } }
        #expect(warnings.count == 1, "\(warnings)")
        #expect(warnings.first?.message.contains("mlock refused; continuing with unpinned memory") == true, "\(warnings)")
        #expect(warnings.first?.metadata["errno"] == "\(EPERM)" && warnings.first?.metadata["tier"] == "device/test", "\(warnings)")
        // Unpinned memory is still memory: the whole arena is writable and reads back.
        memset(arena.base, 0x5A, arena.byteCount)
        #expect(UnsafeRawBufferPointer(start: arena.base, count: arena.byteCount).allSatisfy { $0 == 0x5A })
        // And a lock that succeeds logs nothing of the kind.
        let quiet = CapturedLog()
        let pinned = try HostArena(byteCount: 4096, prefault: false, lock: true, label: "device/test",
                                   logger: Logger(label: "test.arena") { _ in CapturingLogHandler(records: quiet) }) { _, _ in 0 }
        #expect(pinned.locked)
        #expect(quiet.entries.withLock { $0.isEmpty })
    }
}

/// Log records captured by `CapturingLogHandler`.
final class CapturedLog: Sendable {
    struct Entry: Sendable {
        var level: Logger.Level
        var message: String
        var metadata: [String: String]
    }
    let entries = Mutex<[Entry]>([])
}

struct CapturingLogHandler: LogHandler {
    let records: CapturedLog
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var flattened: [String: String] = [:]
        for (key, value) in metadata.merging(event.metadata ?? [:], uniquingKeysWith: { $1 }) { flattened[key] = "\(value)" }
        records.entries.withLock { $0.append(CapturedLog.Entry(level: event.level, message: "\(event.message)", metadata: flattened)) }
    }
}
