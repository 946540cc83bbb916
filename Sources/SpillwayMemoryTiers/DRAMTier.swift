import CSpillwayCopy
#if canImport(Glibc)
import Glibc
#endif
import Logging
import SpillwayCore

/// Host DRAM tier: a `HostArena` of fixed-size slots and a `SlotAllocator`.
///
/// Every I/O is a `memcpy` performed inline in `submit`, so a batch completes before `submit`
/// returns and the waiter never sleeps. Nothing is allocated per operation.
public final class DRAMTier: Tier {
    public let descriptor: TierDescriptor
    public let arena: HostArena
    private let allocator: SlotAllocator

    public init(name: String = "dram", slotSize: Int, capacitySlots: Int, prefault: Bool = true,
                verifiesReads: Bool = false, logger: Logger = Logger(label: "spillway.dram")) throws(SpillwayError)
    {
        try MemoryTierGeometry.validate(name: name, slotSize: slotSize, capacitySlots: capacitySlots)
        descriptor = TierDescriptor(
            name: name, kind: .dram, slotSize: slotSize, capacitySlots: capacitySlots,
            performance: .dram, verifiesReads: verifiesReads, completesInline: true)
        arena = try HostArena(byteCount: slotSize * capacitySlots, prefault: prefault, lock: false, label: name, logger: logger)
        allocator = SlotAllocator(capacity: capacitySlots)
    }

    public func allocate(slotCount: Int) -> Extent? { allocator.allocate(count: slotCount) }
    public func release(_ extent: Extent) { allocator.release(extent) }
    public var usedSlots: Int { allocator.usedSlots }

    public func submit(_ batch: TierBatch) {
        let slotSize = descriptor.slotSize
        for index in 0..<batch.count {
            let io = batch[index]
            let bytes = Int(io.extent.slotCount) * slotSize
            guard Int(io.extent.endSlot) <= descriptor.capacitySlots, io.length <= bytes else {
                batch.complete(index, status: EINVAL)
                continue
            }
            let slot = arena.base + Int(io.extent.firstSlot) * slotSize
            if io.length > 0, let buffer = io.buffer {
                switch io.operation {
                case .read: memcpy(buffer, slot, io.length)
                // Streaming stores: a page written here is not read back soon (CSpillwayCopy).
                case .write:
                    if batch.checksumsOnCompletion {
                        batch.setComputedChecksum(index, CRC32C.copyStreaming(to: slot, from: buffer, length: io.length))
                    } else {
                        spillway_copy_streaming(slot, buffer, io.length)
                    }
                case .discard: break
                }
            }
            batch.complete(index, status: 0)
        }
    }

    public var hostMemory: UnsafeMutableRawBufferPointer? {
        UnsafeMutableRawBufferPointer(start: arena.base, count: arena.byteCount)
    }

    public func close() {}
}

enum MemoryTierGeometry {
    static let minimumSlotSize = 4 << 10
    static let maximumSlotSize = 2 << 20

    static func validate(name: String, slotSize: Int, capacitySlots: Int) throws(SpillwayError) {
        guard slotSize >= minimumSlotSize, slotSize <= maximumSlotSize, slotSize & (slotSize - 1) == 0 else {
            throw .invalidConfiguration("tier '\(name)': slot size \(slotSize) must be a power of two between 4KiB and 2MiB")
        }
        guard capacitySlots > 0, capacitySlots <= Int(UInt32.max) else {
            throw .invalidConfiguration("tier '\(name)': capacity must be between 1 and \(UInt32.max) slots")
        }
    }
}
