import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// The NVMe tier's on-disk layout (docs/nvme-format.md is the prose version):
///
/// ```
/// [superblock: 4 KiB][index: one 64-byte record per slot, padded to 4 KiB][data: slots]
/// ```
///
/// A page's record sits at the index position of its first slot. Records and the superblock
/// carry their own CRC32C; records also carry the page's CRC32C, which recovery checks against
/// the data before a page is made visible again.
enum NVMeFormat {
    static let blockSize = 4096
    static let superblockMagic: UInt64 = 0x314D_564E_574C_5053  // "SPLWNVM1" little-endian
    static let version: UInt32 = 1
    static let recordMagic: UInt32 = 0x4547_4150  // "PAGE"
    static let recordSize = 64

    struct Geometry: Equatable {
        var slotSize: Int
        var capacitySlots: Int

        var indexOffset: Int { blockSize }
        var indexBytes: Int { roundUp(capacitySlots * recordSize, to: blockSize) }
        var dataOffset: Int { indexOffset + indexBytes }
        var fileBytes: Int { dataOffset + capacitySlots * slotSize }

        func dataOffset(ofSlot slot: UInt32) -> Int { dataOffset + Int(slot) * slotSize }
        /// The index block (4 KiB) holding `slot`'s record, as a byte offset into the index.
        func indexBlockOffset(ofSlot slot: UInt32) -> Int { Int(slot) * recordSize / blockSize * blockSize }
    }

    static func roundUp(_ value: Int, to multiple: Int) -> Int { (value + multiple - 1) / multiple * multiple }

    /// Writes the superblock for `geometry` into `block` (4 KiB, zeroed by the caller).
    static func encodeSuperblock(_ geometry: Geometry, instance: UInt64, into block: UnsafeMutableRawPointer) {
        block.storeBytes(of: superblockMagic.littleEndian, toByteOffset: 0, as: UInt64.self)
        block.storeBytes(of: version.littleEndian, toByteOffset: 8, as: UInt32.self)
        block.storeBytes(of: UInt32(blockSize).littleEndian, toByteOffset: 12, as: UInt32.self)
        block.storeBytes(of: UInt64(geometry.slotSize).littleEndian, toByteOffset: 16, as: UInt64.self)
        block.storeBytes(of: UInt64(geometry.capacitySlots).littleEndian, toByteOffset: 24, as: UInt64.self)
        block.storeBytes(of: UInt64(geometry.indexOffset).littleEndian, toByteOffset: 32, as: UInt64.self)
        block.storeBytes(of: UInt64(geometry.dataOffset).littleEndian, toByteOffset: 40, as: UInt64.self)
        block.storeBytes(of: instance.littleEndian, toByteOffset: 48, as: UInt64.self)
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(start: block, count: 56))
        block.storeBytes(of: crc.littleEndian, toByteOffset: 56, as: UInt32.self)
    }

    /// The geometry a superblock describes, or nil if it is not a valid Spillway superblock.
    static func decodeSuperblock(_ block: UnsafeRawPointer) -> Geometry? {
        guard UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 0, as: UInt64.self)) == superblockMagic,
              UInt32(littleEndian: block.loadUnaligned(fromByteOffset: 8, as: UInt32.self)) == version,
              UInt32(littleEndian: block.loadUnaligned(fromByteOffset: 56, as: UInt32.self))
                == CRC32C.checksum(UnsafeRawBufferPointer(start: block, count: 56))
        else { return nil }
        // Bound the raw fields before any arithmetic, so a hostile superblock cannot trap.
        let slotSize = UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        let capacity = UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
        guard slotSize >= 4096, slotSize <= 2 << 20, capacity > 0, capacity <= UInt64(UInt32.max) else { return nil }
        let geometry = Geometry(slotSize: Int(slotSize), capacitySlots: Int(capacity))
        guard UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 32, as: UInt64.self)) == UInt64(geometry.indexOffset),
              UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 40, as: UInt64.self)) == UInt64(geometry.dataOffset)
        else { return nil }
        return geometry
    }

    /// One index record.
    struct Record: Equatable {
        var key: PageKey
        var slotCount: UInt32
        var length: UInt32
        var checksum: UInt32
        var sequence: UInt64

        func encode(into record: UnsafeMutableRawPointer) {
            memset(record, 0, recordSize)
            record.storeBytes(of: recordMagic.littleEndian, toByteOffset: 0, as: UInt32.self)
            record.storeBytes(of: slotCount.littleEndian, toByteOffset: 4, as: UInt32.self)
            record.storeBytes(of: key.high.littleEndian, toByteOffset: 8, as: UInt64.self)
            record.storeBytes(of: key.low.littleEndian, toByteOffset: 16, as: UInt64.self)
            record.storeBytes(of: length.littleEndian, toByteOffset: 24, as: UInt32.self)
            record.storeBytes(of: checksum.littleEndian, toByteOffset: 28, as: UInt32.self)
            record.storeBytes(of: sequence.littleEndian, toByteOffset: 32, as: UInt64.self)
            let crc = CRC32C.checksum(UnsafeRawBufferPointer(start: record, count: 60))
            record.storeBytes(of: crc.littleEndian, toByteOffset: 60, as: UInt32.self)
        }

        /// Nil for an empty (all-zero), torn or foreign record.
        static func decode(_ record: UnsafeRawPointer) -> Record? {
            guard UInt32(littleEndian: record.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) == recordMagic,
                  UInt32(littleEndian: record.loadUnaligned(fromByteOffset: 60, as: UInt32.self))
                    == CRC32C.checksum(UnsafeRawBufferPointer(start: record, count: 60))
            else { return nil }
            return Record(
                key: PageKey(high: UInt64(littleEndian: record.loadUnaligned(fromByteOffset: 8, as: UInt64.self)),
                             low: UInt64(littleEndian: record.loadUnaligned(fromByteOffset: 16, as: UInt64.self))),
                slotCount: UInt32(littleEndian: record.loadUnaligned(fromByteOffset: 4, as: UInt32.self)),
                length: UInt32(littleEndian: record.loadUnaligned(fromByteOffset: 24, as: UInt32.self)),
                checksum: UInt32(littleEndian: record.loadUnaligned(fromByteOffset: 28, as: UInt32.self)),
                sequence: UInt64(littleEndian: record.loadUnaligned(fromByteOffset: 32, as: UInt64.self)))
        }
    }
}
