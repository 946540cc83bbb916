import Foundation
import Glibc
import Testing
@testable import SpillwayCore
@testable import SpillwayNVMe
@testable import SpillwayStore

/// Scratch files live under $SPILLWAY_TMPDIR, else the system temporary directory.
/// The NVMe tests' files, in the scratch directory (`ScratchDirectory`).
let scratchDirectory: String = {
    do {
        return try ScratchDirectory.path()
    } catch {
        fatalError("no scratch directory for the NVMe tests: \(error)")
    }
}()

func scratchPath(_ name: String) -> String { "\(scratchDirectory)/spillway-test-\(getpid())-\(name)" }

func bytes(_ seed: UInt64, _ length: Int) -> [UInt8] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<length).map { _ in
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return UInt8(truncatingIfNeeded: state)
    }
}

/// Runs one I/O on a tier; returns its status.
func io(_ tier: NVMeTier, _ operation: TierIO.Operation, _ extent: Extent, _ buffer: UnsafeMutableRawPointer, _ length: Int,
        key: PageKey = PageKey(0), checksum: UInt32 = 0) -> Int32
{
    let batch = TierBatch(capacity: 1)
    batch.append(TierIO(operation: operation, extent: extent, buffer: buffer, length: length, key: key, checksum: checksum))
    batch.run(on: tier, inline: true)
    return batch[0].status
}

@Suite(.serialized) struct NVMeTierTests {
    @Test func roundTripsAlignedAndBouncedIO() throws {
        let path = scratchPath("roundtrip")
        defer { unlink(path) }
        let tier = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 8192, capacitySlots: 64))
        #expect(tier.directIO)
        #expect(tier.recovery.formatted)
        // Aligned, block-multiple: direct. Odd lengths and unaligned buffers: bounced.
        for (length, offset) in [(8192, 0), (5000, 0), (3 * 8192, 0), (100, 3), (8192, 1), (3 * 8192 - 5, 0), (2 * 8192, 7)] {
            let slots = max(1, (length + 8191) / 8192)
            let extent = try #require(tier.allocate(slotCount: slots))
            let source = bytes(UInt64(length), length)
            let raw = UnsafeMutableRawPointer.allocate(byteCount: length + 4096 + offset, alignment: 4096)
            defer { raw.deallocate() }
            source.withUnsafeBytes { memcpy(raw + offset, $0.baseAddress!, length) }
            #expect(io(tier, .write, extent, raw + offset, length, key: PageKey(UInt64(length)), checksum: CRC32C.checksum(source)) == 0)
            memset(raw, 0, length + 4096 + offset)
            #expect(io(tier, .read, extent, raw + offset, length) == 0)
            #expect(Array(UnsafeRawBufferPointer(start: raw + offset, count: length)) == source, "length \(length) offset \(offset)")
        }
        #expect(tier.usedSlots == 1 + 1 + 3 + 1 + 1 + 3 + 2)
    }

    @Test func batchesManyIOsInOneSubmission() throws {
        let path = scratchPath("batch")
        defer { unlink(path) }
        let tier = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 512, ringEntries: 32))
        let count = 200  // more than a ring's entries: the tier must run it in waves
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: count * 4096, alignment: 4096)
        defer { buffer.deallocate() }
        for index in 0..<count { bytes(UInt64(index), 4096).withUnsafeBytes { memcpy(buffer + index * 4096, $0.baseAddress!, 4096) } }
        let batch = TierBatch(capacity: count)
        var extents: [Extent] = []
        for index in 0..<count {
            let extent = try #require(tier.allocate(slotCount: 1))
            extents.append(extent)
            batch.append(TierIO(operation: .write, extent: extent, buffer: buffer + index * 4096, length: 4096, key: PageKey(UInt64(index))))
        }
        batch.run(on: tier, inline: true)
        #expect(batch.firstFailure == nil)
        memset(buffer, 0, count * 4096)
        batch.reset()
        for index in 0..<count { batch.append(TierIO(operation: .read, extent: extents[index], buffer: buffer + index * 4096, length: 4096)) }
        batch.run(on: tier, inline: true)
        #expect(batch.firstFailure == nil)
        for index in 0..<count { #expect(Array(UnsafeRawBufferPointer(start: buffer + index * 4096, count: 4096)) == bytes(UInt64(index), 4096)) }
    }

    @Test func injectedFaultsAreRetriedOrReported() throws {
        let path = scratchPath("faults")
        defer { unlink(path) }
        let faults = NVMeFaultInjector()
        let tier = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 16384, capacitySlots: 16, faults: faults))
        let extent = try #require(tier.allocate(slotCount: 1))
        let source = bytes(9, 16384)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 16384, alignment: 4096)
        defer { buffer.deallocate() }
        source.withUnsafeBytes { memcpy(buffer, $0.baseAddress!, 16384) }

        // Short transfers, EINTR and a few EAGAINs are absorbed: the bytes still arrive whole.
        faults.inject(.shortTransfer, on: .write, times: 2)
        faults.inject(.interrupted, on: .write)
        #expect(io(tier, .write, extent, buffer, 16384, key: PageKey(1), checksum: CRC32C.checksum(source)) == 0)
        faults.inject(.shortTransfer, on: .read, times: 2)
        faults.inject(.wouldBlock, on: .read, times: 3)
        faults.inject(.interrupted, on: .read)
        memset(buffer, 0, 16384)
        #expect(io(tier, .read, extent, buffer, 16384) == 0)
        #expect(Array(UnsafeRawBufferPointer(start: buffer, count: 16384)) == source)
        #expect(faults.firedCount == 9)

        // EIO and ENOSPC are reported with their errno; endless EAGAIN gives up.
        faults.inject(.error(EIO), on: .read)
        #expect(io(tier, .read, extent, buffer, 16384) == EIO)
        faults.inject(.error(ENOSPC), on: .write)
        #expect(io(tier, .write, extent, buffer, 16384) == ENOSPC)
        faults.inject(.wouldBlock, on: .read, times: 100)
        #expect(io(tier, .read, extent, buffer, 16384) == EAGAIN)
        faults.clear()
        #expect(io(tier, .read, extent, buffer, 16384) == 0)
    }

    @Test func truncatedFileReadsFailInsteadOfReturningZeros() throws {
        let path = scratchPath("truncated")
        defer { unlink(path) }
        let tier = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 64))
        let extent = Extent(firstSlot: 60, slotCount: 1)  // I/O does not require the slot to be allocated
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        memset(buffer, 7, 4096)
        #expect(io(tier, .write, extent, buffer, 4096, key: PageKey(1)) == 0)
        // Cut the file under the tier: the slot now lies past the end.
        #expect(truncate(path, off_t(tier.geometry.dataOffset(ofSlot: 10))) == 0)
        #expect(io(tier, .read, extent, buffer, 4096) == EIO)
    }

    @Test(.enabled(if: LoopDevices.available, "needs root, /dev/loop-control, losetup and mkfs.ext4"))
    func fullFilesystemIsReportedAtOpen() throws {
        // A 16 MiB ext4 image on a loop device; a 64 MiB tier cannot reserve its space there.
        let image = scratchPath("small.img")
        let mountPoint = scratchPath("small-mnt")
        defer {
            _ = system("umount \(mountPoint) 2>/dev/null")
            rmdir(mountPoint)
            unlink(image)
        }
        guard system("truncate -s 16M \(image) && mkfs.ext4 -q \(image) && mkdir -p \(mountPoint) && mount -o loop \(image) \(mountPoint) 2>/dev/null") == 0 else {
            // Needs root and a loop device; report why instead of passing silently.
            Issue.record("cannot mount a loop filesystem here (needs root and /dev/loop*)")
            return
        }
        #expect {
            _ = try NVMeTier(NVMeTierConfiguration(path: "\(mountPoint)/tier", slotSize: 4096, capacitySlots: 16384))
        } throws: { error in
            guard case SpillwayError.tierIO(_, _, let errno) = error else { return false }
            return errno == ENOSPC
        }
    }

    @Test func refusesBadGeometry() {
        #expect(throws: SpillwayError.invalidConfiguration("tier 'nvme': slot size 1000 must be a power of two between 4KiB and 2MiB")) {
            _ = try NVMeTier(NVMeTierConfiguration(path: scratchPath("bad"), slotSize: 1000, capacitySlots: 4))
        }
        #expect(throws: SpillwayError.tierIO(tier: "nvme", operation: "open '/nonexistent-dir/tier'", errno: ENOENT)) {
            _ = try NVMeTier(NVMeTierConfiguration(path: "/nonexistent-dir/tier", slotSize: 4096, capacitySlots: 4))
        }
    }
}


@Suite(.serialized) struct NVMeDeviceAndModeTests {
    @Test func aFilesystemRefusingODirectIsAClearErrorNotAFallback() throws {
        // tmpfs on this kernel accepts O_DIRECT, so the refusal (EINVAL from open) is injected.
        let path = scratchPath("no-odirect")
        defer { unlink(path) }
        let faults = NVMeFaultInjector()
        faults.failNextOpen(errno: EINVAL)
        do {
            _ = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 8, faults: faults))
            Issue.record("open must fail")
        } catch {
            guard case .invalidConfiguration(let message) = error else {
                Issue.record("expected invalidConfiguration, got \(error)")
                return
            }
            #expect(message.contains("refuses O_DIRECT") && message.contains("buffered-io"))
        }
        // Other open errors keep their errno.
        faults.failNextOpen(errno: EACCES)
        #expect(throws: SpillwayError.tierIO(tier: "nvme", operation: "open '\(path)'", errno: EACCES)) {
            _ = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 8, faults: faults))
        }
    }

    @Test func bufferedModeWorksWhereRequested() throws {
        // /dev/shm is tmpfs: buffered I/O is the explicit opt-in for filesystems without O_DIRECT.
        let path = "/dev/shm/spillway-test-\(getpid())-buffered"
        defer { unlink(path) }
        let tier = try NVMeTier(NVMeTierConfiguration(path: path, slotSize: 4096, capacitySlots: 8, bufferedIO: true))
        #expect(!tier.directIO)
        #expect(tier.mode == .interrupt)
        let extent = try #require(tier.allocate(slotCount: 1))
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        memset(buffer, 0x33, 4096)
        #expect(io(tier, .write, extent, buffer, 3000, key: PageKey(1)) == 0)
        memset(buffer, 0, 4096)
        #expect(io(tier, .read, extent, buffer, 3000) == 0)
        #expect(Array(UnsafeRawBufferPointer(start: buffer, count: 3000)) == [UInt8](repeating: 0x33, count: 3000))
    }

    @Test(.enabled(if: LoopDevices.available, "needs root, /dev/loop-control, losetup and mkfs.ext4"))
    func blockDeviceRoundTripsAndRecovers() throws {
        let image = scratchPath("blockdev.img")
        defer { unlink(image) }
        guard system("truncate -s 32M \(image)") == 0,
              let pipe = popen("losetup -f --show \(image) 2>/dev/null", "r")
        else {
            Issue.record("cannot create a loop device here (needs root and /dev/loop-control)")
            return
        }
        var line = [CChar](repeating: 0, count: 256)
        let device = fgets(&line, 256, pipe) != nil ? String(cString: line).trimmingCharacters(in: .whitespacesAndNewlines) : ""
        pclose(pipe)
        guard device.hasPrefix("/dev/loop") else {
            Issue.record("losetup gave no device")
            return
        }
        defer { _ = system("losetup -d \(device)") }
        do {
            let tier = try NVMeTier(NVMeTierConfiguration(path: device, slotSize: 4096, capacitySlots: 1024))
            #expect(tier.recovery.formatted)
            let store = try TieredStore(tiers: [tier], options: StoreOptions(maxPageSize: 8192, backgroundWorker: false))
            for value in 0..<10 { try store.put(PageKey(UInt64(value)), bytes: bytes(UInt64(value), 5000)) }
            store.close()
        }
        let tier = try NVMeTier(NVMeTierConfiguration(path: device, slotSize: 4096, capacitySlots: 1024))
        let store = try TieredStore(tiers: [tier], options: StoreOptions(maxPageSize: 8192, backgroundWorker: false))
        defer { store.close() }
        #expect(tier.recovery.recovered == 10)
        for value in 0..<10 { #expect(try store.get(PageKey(UInt64(value))) == bytes(UInt64(value), 5000)) }
    }
}

/// Whether loop devices can be set up here (root, the loop driver, and the tools).
enum LoopDevices {
    static let available: Bool = {
        geteuid() == 0 && access("/dev/loop-control", F_OK) == 0
            && system("command -v losetup >/dev/null && command -v mkfs.ext4 >/dev/null") == 0
    }()
}
