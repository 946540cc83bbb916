#if canImport(Glibc)
import Glibc
#endif
import Logging
import SpillwayCore

/// Accelerator memory as the device tier sees it: one allocation, byte copies between it and
/// host memory, and a synchronization point.
///
/// Copies may be asynchronous (a CUDA backend would issue `cudaMemcpyAsync` on a stream); they
/// are only guaranteed complete after `synchronize()`. The tier calls `synchronize()` once per
/// batch, before completing it. A CUDA backend (dlopen of libcudart) plugs in here without
/// touching the store; the default backend is pinned host memory.
public protocol DeviceMemory: AnyObject, Sendable {
    /// Human-readable backend name ("host", "cuda:0"), for logs and metrics.
    var backendName: String { get }
    /// Reserves the tier's memory; called once.
    func allocate(byteCount: Int) throws(SpillwayError)
    func copyIn(from source: UnsafeRawPointer, toOffset offset: Int, count: Int) throws(SpillwayError)
    func copyOut(fromOffset offset: Int, to destination: UnsafeMutableRawPointer, count: Int) throws(SpillwayError)
    /// Waits for every copy issued so far.
    func synchronize() throws(SpillwayError)
}

/// The default device backend: an `mlock`ed host arena standing in for HBM.
///
/// `@unchecked Sendable`: `arena` is written once in `allocate` (before the tier is shared) and
/// only read afterwards; the bytes are coordinated by the tier's allocator and the directory.
public final class HostDeviceMemory: DeviceMemory, @unchecked Sendable {
    public let backendName = "host"
    private let logger: Logger
    private let prefault: Bool
    private(set) var arena: HostArena?

    public init(prefault: Bool = true, logger: Logger = Logger(label: "spillway.device")) {
        self.prefault = prefault
        self.logger = logger
    }

    public func allocate(byteCount: Int) throws(SpillwayError) {
        precondition(arena == nil, "HostDeviceMemory.allocate called twice")
        arena = try HostArena(byteCount: byteCount, prefault: prefault, lock: true, label: "device/host", logger: logger)
    }

    public var isLocked: Bool { arena?.locked ?? false }

    public func copyIn(from source: UnsafeRawPointer, toOffset offset: Int, count: Int) throws(SpillwayError) {
        let arena = try checked(offset, count)
        memcpy(arena.base + offset, source, count)
    }

    public func copyOut(fromOffset offset: Int, to destination: UnsafeMutableRawPointer, count: Int) throws(SpillwayError) {
        let arena = try checked(offset, count)
        memcpy(destination, arena.base + offset, count)
    }

    public func synchronize() throws(SpillwayError) {}

    private func checked(_ offset: Int, _ count: Int) throws(SpillwayError) -> HostArena {
        guard let arena else { throw .invalidConfiguration("device memory used before allocate") }
        guard offset >= 0, count >= 0, offset <= arena.byteCount - count else {
            throw .invalidArgument("device copy [\(offset), +\(count)) outside \(arena.byteCount) bytes")
        }
        return arena
    }
}

/// The top, "HBM-like" tier: fixed capacity on a `DeviceMemory` backend.
///
/// Slots are managed on the host (`SlotAllocator`); each batch issues one copy per I/O then a
/// single `synchronize()`, mirroring how a CUDA stream would be driven.
public final class DeviceTier: Tier {
    public let descriptor: TierDescriptor
    public let memory: any DeviceMemory
    private let allocator: SlotAllocator

    public init(name: String = "device", slotSize: Int, capacitySlots: Int,
                memory: any DeviceMemory = HostDeviceMemory()) throws(SpillwayError)
    {
        try MemoryTierGeometry.validate(name: name, slotSize: slotSize, capacitySlots: capacitySlots)
        descriptor = TierDescriptor(
            name: name, kind: .device, slotSize: slotSize, capacitySlots: capacitySlots,
            performance: .device, verifiesReads: false, completesInline: true)
        self.memory = memory
        try memory.allocate(byteCount: slotSize * capacitySlots)
        allocator = SlotAllocator(capacity: capacitySlots)
    }

    public func allocate(slotCount: Int) -> Extent? { allocator.allocate(count: slotCount) }
    public func release(_ extent: Extent) { allocator.release(extent) }
    public var usedSlots: Int { allocator.usedSlots }

    public func submit(_ batch: TierBatch) {
        let slotSize = descriptor.slotSize
        for index in 0..<batch.count {
            let io = batch[index]
            let offset = Int(io.extent.firstSlot) * slotSize
            guard Int(io.extent.endSlot) <= descriptor.capacitySlots, io.length <= Int(io.extent.slotCount) * slotSize else {
                batch.setStatus(index, EINVAL)
                continue
            }
            guard io.length > 0, let buffer = io.buffer else { continue }
            do throws(SpillwayError) {
                switch io.operation {
                case .read: try memory.copyOut(fromOffset: offset, to: buffer, count: io.length)
                case .write: try memory.copyIn(from: buffer, toOffset: offset, count: io.length)
                case .discard: break
                }
            } catch {
                batch.setStatus(index, EIO)
            }
        }
        // One synchronization per batch; a failed sync fails every I/O that had not failed yet.
        var synchronized = true
        do throws(SpillwayError) { try memory.synchronize() } catch { synchronized = false }
        for index in 0..<batch.count {
            if !synchronized && batch[index].status == 0 { batch.setStatus(index, EIO) }
            batch.finish(index)
        }
    }

    public func close() {}
}
