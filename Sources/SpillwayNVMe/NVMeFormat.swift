import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// The NVMe tier's on-disk layout (docs/nvme-format.md is the prose version):
///
/// ```
/// [superblock 4K][checkpoint A 4K][checkpoint B 4K][index: 64 B per slot][journal: J × 4K][data: slots]
/// ```
///
/// The index is a checkpoint: one record per slot, at the position of the page's first slot.
/// Changes since the last checkpoint live in the journal, a ring of 4 KiB blocks each holding up
/// to 63 records, appended once per batch. Every structure carries its own CRC32C; records also
/// carry the page's CRC32C, which recovery checks against the data before a page is made
/// visible again.
enum NVMeFormat {
    static let blockSize = 4096
    static let superblockMagic: UInt64 = 0x314D_564E_574C_5053  // "SPLWNVM1" little-endian
    static let checkpointMagic: UInt64 = 0x5450_4B43_574C_5053  // "SPLWCKPT"
    static let journalMagic: UInt64 = 0x4C4E_524A_574C_5053  // "SPLWJRNL"
    /// 3: records carry the store's identity (the superblock's instance), so a record written
    /// by another store (another formatting of the file) is never recovered. Files of an older
    /// version are refused, not guessed at (NVMeRecovery says what to do).
    static let version: UInt32 = 3
    static let pageMagic: UInt32 = 0x4547_4150  // "PAGE"
    static let freeMagic: UInt32 = 0x4545_5246  // "FREE"
    static let recordSize = 64
    /// Records per journal block (the first 64 bytes are the block header).
    static let recordsPerJournalBlock = blockSize / recordSize - 1

    struct Geometry: Equatable {
        var slotSize: Int
        var capacitySlots: Int

        var checkpointOffset: Int { blockSize }
        var indexOffset: Int { 3 * blockSize }
        var indexBytes: Int { roundUp(capacitySlots * recordSize, to: blockSize) }
        var indexBlocks: Int { indexBytes / blockSize }
        var journalOffset: Int { indexOffset + indexBytes }
        /// As many journal blocks as index blocks (so a checkpoint, which rewrites at most every
        /// index block, costs at most one write per journal block appended), 64 to 8192.
        var journalBlocks: Int { min(8192, max(64, indexBlocks)) }
        var dataOffset: Int { journalOffset + journalBlocks * blockSize }
        var fileBytes: Int { dataOffset + capacitySlots * slotSize }

        func dataOffset(ofSlot slot: UInt32) -> Int { dataOffset + Int(slot) * slotSize }
        /// The index block (4 KiB) holding `slot`'s record, as a block number within the index.
        func indexBlock(ofSlot slot: UInt32) -> Int { Int(slot) * recordSize / blockSize }
        func journalBlockOffset(sequence: UInt64) -> Int { journalOffset + Int(sequence % UInt64(journalBlocks)) * blockSize }
    }

    static func roundUp(_ value: Int, to multiple: Int) -> Int { (value + multiple - 1) / multiple * multiple }

    // MARK: Superblock

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
        block.storeBytes(of: UInt64(geometry.journalOffset).littleEndian, toByteOffset: 56, as: UInt64.self)
        block.storeBytes(of: UInt32(geometry.journalBlocks).littleEndian, toByteOffset: 64, as: UInt32.self)
        block.storeBytes(of: CRC32C.checksum(UnsafeRawBufferPointer(start: block, count: 68)).littleEndian, toByteOffset: 68, as: UInt32.self)
    }

    /// The format version of a block that starts with the superblock magic (nil: not a
    /// Spillway superblock at all).
    static func superblockVersion(_ block: UnsafeRawPointer) -> UInt32? {
        guard UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 0, as: UInt64.self)) == superblockMagic else { return nil }
        return UInt32(littleEndian: block.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
    }

    /// The geometry and instance a superblock describes, or nil if it is not a valid Spillway
    /// superblock of this format version.
    static func decodeSuperblock(_ block: UnsafeRawPointer) -> (geometry: Geometry, instance: UInt64)? {
        guard UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 0, as: UInt64.self)) == superblockMagic,
              UInt32(littleEndian: block.loadUnaligned(fromByteOffset: 8, as: UInt32.self)) == version,
              UInt32(littleEndian: block.loadUnaligned(fromByteOffset: 68, as: UInt32.self))
                == CRC32C.checksum(UnsafeRawBufferPointer(start: block, count: 68))
        else { return nil }
        // Bound the raw fields before any arithmetic, so a hostile superblock cannot trap.
        let slotSize = UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        let capacity = UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
        guard slotSize >= 4096, slotSize <= 2 << 20, capacity > 0, capacity <= UInt64(UInt32.max) else { return nil }
        let geometry = Geometry(slotSize: Int(slotSize), capacitySlots: Int(capacity))
        guard UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 32, as: UInt64.self)) == UInt64(geometry.indexOffset),
              UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 40, as: UInt64.self)) == UInt64(geometry.dataOffset),
              UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 56, as: UInt64.self)) == UInt64(geometry.journalOffset),
              UInt32(littleEndian: block.loadUnaligned(fromByteOffset: 64, as: UInt32.self)) == UInt32(geometry.journalBlocks)
        else { return nil }
        return (geometry, UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 48, as: UInt64.self)))
    }

    // MARK: Checkpoint

    /// "The index on disk reflects every journal block before `replayFrom`." Written to block
    /// A or B alternately (generation parity), so a torn checkpoint write leaves the other one.
    struct Checkpoint: Equatable {
        var generation: UInt64
        var replayFrom: UInt64
        var instance: UInt64

        func offset(in geometry: Geometry) -> Int { geometry.checkpointOffset + Int(generation % 2) * blockSize }

        func encode(into block: UnsafeMutableRawPointer) {
            memset(block, 0, blockSize)
            block.storeBytes(of: checkpointMagic.littleEndian, toByteOffset: 0, as: UInt64.self)
            block.storeBytes(of: generation.littleEndian, toByteOffset: 8, as: UInt64.self)
            block.storeBytes(of: replayFrom.littleEndian, toByteOffset: 16, as: UInt64.self)
            block.storeBytes(of: instance.littleEndian, toByteOffset: 24, as: UInt64.self)
            block.storeBytes(of: CRC32C.checksum(UnsafeRawBufferPointer(start: block, count: 60)).littleEndian, toByteOffset: 60, as: UInt32.self)
        }

        static func decode(_ block: UnsafeRawPointer, instance: UInt64) -> Checkpoint? {
            guard UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 0, as: UInt64.self)) == checkpointMagic,
                  UInt32(littleEndian: block.loadUnaligned(fromByteOffset: 60, as: UInt32.self))
                    == CRC32C.checksum(UnsafeRawBufferPointer(start: block, count: 60)),
                  UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 24, as: UInt64.self)) == instance
            else { return nil }
            return Checkpoint(generation: UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 8, as: UInt64.self)),
                              replayFrom: UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 16, as: UInt64.self)),
                              instance: instance)
        }
    }

    // MARK: Journal block

    /// Header (first 64 bytes): magic, sequence, instance, record count, CRC32C of the records,
    /// CRC32C of the header. The block's position in the ring is `sequence % journalBlocks`.
    static func encodeJournalHeader(into block: UnsafeMutableRawPointer, sequence: UInt64, instance: UInt64, count: Int) {
        memset(block, 0, recordSize)
        block.storeBytes(of: journalMagic.littleEndian, toByteOffset: 0, as: UInt64.self)
        block.storeBytes(of: sequence.littleEndian, toByteOffset: 8, as: UInt64.self)
        block.storeBytes(of: instance.littleEndian, toByteOffset: 16, as: UInt64.self)
        block.storeBytes(of: UInt32(count).littleEndian, toByteOffset: 24, as: UInt32.self)
        let payload = CRC32C.checksum(UnsafeRawBufferPointer(start: block + recordSize, count: count * recordSize))
        block.storeBytes(of: payload.littleEndian, toByteOffset: 28, as: UInt32.self)
        block.storeBytes(of: CRC32C.checksum(UnsafeRawBufferPointer(start: block, count: 60)).littleEndian, toByteOffset: 60, as: UInt32.self)
    }

    /// The block's sequence and record count if it is an intact journal block of this instance.
    static func decodeJournalHeader(_ block: UnsafeRawPointer, instance: UInt64) -> (sequence: UInt64, count: Int)? {
        guard UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 0, as: UInt64.self)) == journalMagic,
              UInt32(littleEndian: block.loadUnaligned(fromByteOffset: 60, as: UInt32.self))
                == CRC32C.checksum(UnsafeRawBufferPointer(start: block, count: 60)),
              UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 16, as: UInt64.self)) == instance
        else { return nil }
        let count = Int(UInt32(littleEndian: block.loadUnaligned(fromByteOffset: 24, as: UInt32.self)))
        guard count <= recordsPerJournalBlock,
              UInt32(littleEndian: block.loadUnaligned(fromByteOffset: 28, as: UInt32.self))
                == CRC32C.checksum(UnsafeRawBufferPointer(start: block + recordSize, count: count * recordSize))
        else { return nil }
        return (UInt64(littleEndian: block.loadUnaligned(fromByteOffset: 8, as: UInt64.self)), count)
    }

    // MARK: Record

    /// One 64-byte record: a page (in the index, or appended to the journal) or, in the journal
    /// only, a release of an extent (`isRelease`, magic "FREE").
    struct Record: Equatable {
        var key: PageKey
        var slot: UInt32
        var slotCount: UInt32
        var length: UInt32
        var checksum: UInt32
        var sequence: UInt64
        /// The store (superblock instance) that wrote the record.
        var instance: UInt64
        var isRelease: Bool = false

        static func release(_ extent: Extent, sequence: UInt64, instance: UInt64) -> Record {
            Record(key: PageKey(high: 0, low: 0), slot: extent.firstSlot, slotCount: extent.slotCount, length: 0, checksum: 0,
                   sequence: sequence, instance: instance, isRelease: true)
        }

        func encode(into record: UnsafeMutableRawPointer) {
            memset(record, 0, recordSize)
            record.storeBytes(of: (isRelease ? freeMagic : pageMagic).littleEndian, toByteOffset: 0, as: UInt32.self)
            record.storeBytes(of: slotCount.littleEndian, toByteOffset: 4, as: UInt32.self)
            record.storeBytes(of: key.high.littleEndian, toByteOffset: 8, as: UInt64.self)
            record.storeBytes(of: key.low.littleEndian, toByteOffset: 16, as: UInt64.self)
            record.storeBytes(of: length.littleEndian, toByteOffset: 24, as: UInt32.self)
            record.storeBytes(of: checksum.littleEndian, toByteOffset: 28, as: UInt32.self)
            record.storeBytes(of: sequence.littleEndian, toByteOffset: 32, as: UInt64.self)
            record.storeBytes(of: slot.littleEndian, toByteOffset: 40, as: UInt32.self)
            record.storeBytes(of: instance.littleEndian, toByteOffset: 48, as: UInt64.self)
            let crc = CRC32C.checksum(UnsafeRawBufferPointer(start: record, count: 60))
            record.storeBytes(of: crc.littleEndian, toByteOffset: 60, as: UInt32.self)
        }

        /// Nil for an empty (all-zero), torn or foreign record.
        static func decode(_ record: UnsafeRawPointer) -> Record? {
            let magic = UInt32(littleEndian: record.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
            guard magic == pageMagic || magic == freeMagic,
                  UInt32(littleEndian: record.loadUnaligned(fromByteOffset: 60, as: UInt32.self))
                    == CRC32C.checksum(UnsafeRawBufferPointer(start: record, count: 60))
            else { return nil }
            return Record(
                key: PageKey(high: UInt64(littleEndian: record.loadUnaligned(fromByteOffset: 8, as: UInt64.self)),
                             low: UInt64(littleEndian: record.loadUnaligned(fromByteOffset: 16, as: UInt64.self))),
                slot: UInt32(littleEndian: record.loadUnaligned(fromByteOffset: 40, as: UInt32.self)),
                slotCount: UInt32(littleEndian: record.loadUnaligned(fromByteOffset: 4, as: UInt32.self)),
                length: UInt32(littleEndian: record.loadUnaligned(fromByteOffset: 24, as: UInt32.self)),
                checksum: UInt32(littleEndian: record.loadUnaligned(fromByteOffset: 28, as: UInt32.self)),
                sequence: UInt64(littleEndian: record.loadUnaligned(fromByteOffset: 32, as: UInt64.self)),
                instance: UInt64(littleEndian: record.loadUnaligned(fromByteOffset: 48, as: UInt64.self)),
                isRelease: magic == freeMagic)
        }
    }
}
