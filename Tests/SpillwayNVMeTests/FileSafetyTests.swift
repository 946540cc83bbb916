import Foundation
import Glibc
import Testing
@testable import SpillwayCore
@testable import SpillwayNVMe

/// Item 10: the NVMe file belongs to one store.
@Suite(.serialized) struct FileSafetyTests {
    @Test func aSecondOpenerWaitsThenGetsAnErrorNamingTheFileAndThePid() throws {
        let path = scratchPath("lock")
        defer { unlink(path) }
        let first = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 16))
        let started = Date()
        #expect {
            _ = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 16))
        } throws: { error in
            guard case SpillwayError.invalidConfiguration(let message) = error else { return false }
            return message.contains(path) && message.contains("pid \(getpid())")
        }
        #expect(Date().timeIntervalSince(started) >= 1.9, "the opener retried for two seconds")
        first.close()
        // Closed: the lock is gone and the file opens at once.
        let second = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 16))
        second.close()
    }

    @Test func aSymlinkIsRefusedNotFollowed() throws {
        let target = scratchPath("symlink-target")
        let link = scratchPath("symlink")
        defer { unlink(target); unlink(link) }
        #expect(symlink(target, link) == 0)
        #expect(throws: SpillwayError.invalidConfiguration(
            "tier 'nvme': '\(link)' is a symbolic link; give the path of the file or device itself")) {
            _ = try NVMeTier(NVMeTierConfiguration(path: link, slotSize: 4096, capacitySlots: 16))
        }
        #expect(access(target, F_OK) != 0, "nothing was created through the link")
    }

    @Test func newFilesAreMode0600() throws {
        let path = scratchPath("mode")
        defer { unlink(path) }
        let previous = umask(0)
        defer { umask(previous) }
        let tier = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 16))
        defer { tier.close() }
        var status = stat()
        #expect(stat(path, &status) == 0)
        #expect(status.st_mode & 0o777 == 0o600)
    }

    @Test func anOlderFormatIsRefusedWithWhatToDo() throws {
        let path = scratchPath("old-format")
        defer { unlink(path) }
        do {
            let tier = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 16))
            tier.close()
        }
        // Turn the superblock into a version-2 one (the format before records carried the
        // store's identity).
        let descriptor = open(path, O_RDWR)
        #expect(descriptor >= 0)
        var version = UInt32(2).littleEndian
        #expect(pwrite(descriptor, &version, 4, 8) == 4)
        close(descriptor)
        #expect {
            _ = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 16))
        } throws: { error in
            guard case SpillwayError.invalidConfiguration(let message) = error else { return false }
            return message.contains("format version 2") && message.contains("reformat = true")
        }
        // What the message says works.
        let tier = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 16, reformat: true))
        #expect(tier.recovery.formatted)
        tier.close()
    }

    /// Index records written by another store (another formatting of the file, e.g. a
    /// process that kept writing after someone else reformatted it) are never recovered.
    @Test func recordsOfAnotherStoreAreNeverRecovered() throws {
        let path = scratchPath("identity")
        defer { unlink(path) }
        var instance: UInt64 = 0
        do {
            let (store, nvme) = try openStore(nvmePath: path, dramSlots: 0)
            for value in 0..<5 { try store.put(PageKey(UInt64(value)), bytes: bytes(UInt64(value), 4096)) }
            instance = nvme.instance
            store.close()
        }
        // Another store formats the file (same geometry, new identity) ...
        let other = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 64, reformat: true))
        #expect(other.instance != instance)
        other.close()
        // ... and the first one's records are written back into its index behind its back.
        let descriptor = open(path, O_RDWR)
        #expect(descriptor >= 0)
        let geometry = other.geometry
        var record = [UInt8](repeating: 0, count: NVMeFormat.recordSize)
        for value in 0..<5 {
            record.withUnsafeMutableBytes { raw in
                NVMeFormat.Record(key: PageKey(UInt64(value)), slot: UInt32(value), slotCount: 1, length: 4096,
                                  checksum: CRC32C.checksum(bytes(UInt64(value), 4096).withUnsafeBytes { $0 }),
                                  sequence: UInt64(value + 1), instance: instance).encode(into: raw.baseAddress!)
            }
            #expect(pwrite(descriptor, record, record.count, off_t(geometry.indexOffset + value * NVMeFormat.recordSize)) == record.count)
            let page = bytes(UInt64(value), 4096)
            #expect(pwrite(descriptor, page, page.count, off_t(geometry.dataOffset(ofSlot: UInt32(value)))) == page.count)
        }
        close(descriptor)
        let (store, nvme) = try openStore(nvmePath: path, dramSlots: 0)
        defer { store.close() }
        #expect(nvme.recovery.recovered == 0)
        #expect(nvme.recovery.discarded == 5)
    }
}
