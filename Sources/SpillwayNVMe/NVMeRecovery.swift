import CSpillwayURing
import Logging
import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// What `openContents` found or made.
struct OpenedContents {
    var report: NVMeRecoveryReport
    var pages: [RecoveredPage]
    var recordSequence: UInt64
    var instance: UInt64
    /// The checkpoint now on disk (the journal continues at its `replayFrom`).
    var checkpoint: NVMeFormat.Checkpoint
}

extension NVMeTier {
    static func chooseMode(requested: NVMePollMode?, directIO: Bool, fd: Int32, entries: Int,
                           mirror: MappedRegion, name: String, logger: Logger) -> NVMePollMode
    {
        if let requested { return requested }
        guard directIO else { return .interrupt }
        // Probe IOPOLL with a real read of the superblock.
        let probe: Int32
        do {
            let context = try URingContext(entries: 8, mode: .iopoll, fd: fd, bounceBytes: NVMeFormat.blockSize, bounceCount: 1,
                                           journalCount: 1)
            _ = context.prepare(write: false, buffer: context.bounceBuffer(0), length: NVMeFormat.blockSize, offset: 0,
                                fixedBuffer: 0, tag: 0)
            var result: Int32 = -EIO
            if context.submit(waitFor: 1) == 0 { _ = context.reap { _, value in result = value } }
            probe = result
        } catch {
            probe = -error.errno
        }
        if probe == Int32(NVMeFormat.blockSize) { return .iopoll }
        logger.notice("IOPOLL unavailable for this file; using interrupt-driven completions", metadata: [
            "tier": "\(name)", "probe": "\(probe < 0 ? String(cString: strerror(-probe)) : "short read \(probe)")",
        ])
        return .interrupt
    }

    /// Reads the superblock, checkpoint, index and journal; recovers what verifies or formats
    /// the file. On return the on-disk index matches the mirror and a fresh checkpoint covers
    /// everything replayed, so the journal starts clean.
    static func openContents(fd: Int32, geometry: NVMeFormat.Geometry, mirror: MappedRegion, allocator: SlotAllocator,
                             reformat: Bool, name: String, path: String, logger: Logger) throws(SpillwayError) -> OpenedContents
    {
        let block = UnsafeMutableRawPointer.allocate(byteCount: 2 * NVMeFormat.blockSize, alignment: NVMeFormat.blockSize)
        defer { block.deallocate() }
        var stats = stat()
        guard fstat(fd, &stats) == 0 else { throw .tierIO(tier: name, operation: "fstat", errno: errno) }
        let isBlockDevice = stats.st_mode & S_IFMT == S_IFBLK
        if isBlockDevice {
            var deviceBytes: UInt64 = 0
            guard spillway_block_device_size(fd, &deviceBytes) == 0 else {
                throw .tierIO(tier: name, operation: "BLKGETSIZE64", errno: errno)
            }
            guard deviceBytes >= UInt64(geometry.fileBytes) else {
                throw .invalidConfiguration(
                    "tier '\(name)': the device holds \(ByteCount.format(Int(deviceBytes))), the tier needs \(ByteCount.format(geometry.fileBytes))")
            }
        }
        var existing: (geometry: NVMeFormat.Geometry, instance: UInt64)?
        if !reformat && (isBlockDevice || Int(stats.st_size) >= NVMeFormat.blockSize) {
            if try preadFully(fd, block, NVMeFormat.blockSize, 0, name: name) {
                if let version = NVMeFormat.superblockVersion(block), version != NVMeFormat.version {
                    // Another format's pages cannot be read safely; guessing would risk serving
                    // them under the wrong key, and silently wiping them would surprise.
                    throw .invalidConfiguration(
                        "tier '\(name)': '\(path)' holds Spillway NVMe format version \(version), this build reads version \(NVMeFormat.version) "
                            + "(\(version < NVMeFormat.version ? "older" : "newer")); its pages cannot be recovered. Delete the file, "
                            + "or open it once with reformat = true, to start empty")
                }
                existing = NVMeFormat.decodeSuperblock(block)
                if let found = existing, !isBlockDevice, Int(stats.st_size) < found.geometry.fileBytes {
                    existing = nil  // truncated: not the file that superblock describes
                }
            }
        }
        guard let found = existing, found.geometry == geometry else {
            let made = try format(fd: fd, geometry: geometry, isBlockDevice: isBlockDevice, block: block, name: name)
            if existing != nil {
                logger.warning("nvme file had another geometry; reformatted", metadata: ["tier": "\(name)"])
            }
            return OpenedContents(report: NVMeRecoveryReport(formatted: true, recovered: 0, discarded: 0), pages: [],
                                  recordSequence: 0, instance: made.instance, checkpoint: made)
        }
        let instance = found.instance

        // The newest intact checkpoint says where replay starts (none: from the beginning).
        guard try preadFully(fd, block, 2 * NVMeFormat.blockSize, geometry.checkpointOffset, name: name) else {
            throw .tierIO(tier: name, operation: "read checkpoint", errno: EIO)
        }
        let checkpoint = [NVMeFormat.Checkpoint.decode(block, instance: instance),
                          NVMeFormat.Checkpoint.decode(block + NVMeFormat.blockSize, instance: instance)]
            .compactMap { $0 }.max { $0.generation < $1.generation }
            ?? NVMeFormat.Checkpoint(generation: 0, replayFrom: 0, instance: instance)

        guard try preadFully(fd, mirror.base, geometry.indexBytes, geometry.indexOffset, name: name) else {
            throw .tierIO(tier: name, operation: "read index", errno: EIO)
        }
        var dirtyBlocks = Set<Int>()
        var discarded = 0

        // Replay the journal: intact blocks of this instance from the checkpoint on, in order.
        let journalBytes = geometry.journalBlocks * NVMeFormat.blockSize
        let journal = UnsafeMutableRawPointer.allocate(byteCount: journalBytes, alignment: NVMeFormat.blockSize)
        defer { journal.deallocate() }
        guard try preadFully(fd, journal, journalBytes, geometry.journalOffset, name: name) else {
            throw .tierIO(tier: name, operation: "read journal", errno: EIO)
        }
        var replay: [(sequence: UInt64, position: Int, count: Int)] = []
        for position in 0..<geometry.journalBlocks {
            guard let header = NVMeFormat.decodeJournalHeader(journal + position * NVMeFormat.blockSize, instance: instance),
                  header.sequence >= checkpoint.replayFrom,
                  header.sequence % UInt64(geometry.journalBlocks) == UInt64(position)
            else { continue }
            replay.append((header.sequence, position, header.count))
        }
        replay.sort { $0.sequence < $1.sequence }
        var nextJournal = checkpoint.replayFrom
        var replayedRecords = 0
        for entry in replay {
            nextJournal = max(nextJournal, entry.sequence + 1)
            for index in 0..<entry.count {
                let source = journal + entry.position * NVMeFormat.blockSize + NVMeFormat.recordSize * (1 + index)
                guard let record = NVMeFormat.Record.decode(source), record.instance == instance,
                      record.slot < UInt32(geometry.capacitySlots)
                else {
                    discarded += 1
                    continue
                }
                let target = mirror.base + Int(record.slot) * NVMeFormat.recordSize
                if record.isRelease {
                    // Only if the slot still holds an older record: a release never undoes a newer page.
                    if let current = NVMeFormat.Record.decode(target), current.sequence > record.sequence { continue }
                    memset(target, 0, NVMeFormat.recordSize)
                } else {
                    memcpy(target, source, NVMeFormat.recordSize)
                }
                dirtyBlocks.insert(geometry.indexBlock(ofSlot: record.slot))
                replayedRecords += 1
            }
        }

        // Check every record: torn, misplaced or foreign ones go; of the rest, newest first, a
        // page is accepted if its extent fits, overlaps nothing accepted, its key has no newer
        // record (valid or not), and its bytes match its CRC32C.
        var candidates: [(slot: UInt32, record: NVMeFormat.Record)] = []
        for slot in 0..<geometry.capacitySlots {
            let pointer = mirror.base + slot * NVMeFormat.recordSize
            if let record = NVMeFormat.Record.decode(pointer), !record.isRelease, record.slot == UInt32(slot),
               record.instance == instance
            {
                candidates.append((UInt32(slot), record))
            } else if pointer.load(as: UInt32.self) != 0 || pointer.load(fromByteOffset: 60, as: UInt32.self) != 0 {
                discarded += 1  // torn, misplaced or another store's record
                memset(pointer, 0, NVMeFormat.recordSize)
                dirtyBlocks.insert(geometry.indexBlock(ofSlot: UInt32(slot)))
            }
        }
        candidates.sort { $0.record.sequence > $1.record.sequence }
        var seen = Set<PageKey>()
        var pages: [RecoveredPage] = []
        var maxSequence: UInt64 = 0
        var data = UnsafeMutableRawPointer.allocate(byteCount: geometry.slotSize, alignment: NVMeFormat.blockSize)
        var dataCapacity = geometry.slotSize
        defer { data.deallocate() }
        for (slot, record) in candidates {
            maxSequence = max(maxSequence, record.sequence)
            // Bound the record's extent before building it (a valid-CRC record may still be absurd).
            let inRange = record.slotCount > 0 && UInt64(slot) + UInt64(record.slotCount) <= UInt64(geometry.capacitySlots)
            let extent = Extent(firstSlot: slot, slotCount: inRange ? record.slotCount : 1)
            let bytes = Int(extent.slotCount) * geometry.slotSize
            var valid = inRange && Int(record.length) <= bytes && !seen.contains(record.key) && allocator.reserve(extent)
            if valid {
                let want = NVMeFormat.roundUp(Int(record.length), to: NVMeFormat.blockSize)
                if want > dataCapacity {
                    data.deallocate()
                    data = UnsafeMutableRawPointer.allocate(byteCount: want, alignment: NVMeFormat.blockSize)
                    dataCapacity = want
                }
                let read = want == 0 ? true : try preadFully(fd, data, want, geometry.dataOffset(ofSlot: slot), name: name)
                valid = read && CRC32C.checksum(UnsafeRawBufferPointer(start: data, count: Int(record.length))) == record.checksum
                if !valid { allocator.release(extent) }
            }
            // The newest record of a key decides it: if its page does not verify, the key is
            // dropped, never served from an older record (that version was superseded).
            seen.insert(record.key)
            if valid {
                pages.append(RecoveredPage(key: record.key, extent: extent, length: Int(record.length), checksum: record.checksum))
            } else {
                discarded += 1
                memset(mirror.base + Int(slot) * NVMeFormat.recordSize, 0, NVMeFormat.recordSize)
                dirtyBlocks.insert(geometry.indexBlock(ofSlot: slot))
            }
        }

        // Persist the result, then a checkpoint covering the replayed journal, so discarded
        // records stay discarded and the journal's ring starts over from `nextJournal`.
        for index in dirtyBlocks.sorted() {
            let offset = index * NVMeFormat.blockSize
            guard pwrite(fd, mirror.base + offset, NVMeFormat.blockSize, off_t(geometry.indexOffset + offset)) == NVMeFormat.blockSize else {
                throw .tierIO(tier: name, operation: "rewrite index block", errno: errno)
            }
        }
        let next = NVMeFormat.Checkpoint(generation: checkpoint.generation + 1, replayFrom: nextJournal, instance: instance)
        try writeCheckpoint(next, fd: fd, geometry: geometry, block: block, name: name)
        if discarded > 0 {
            logger.warning("nvme warm restart discarded pages that did not verify", metadata: [
                "tier": "\(name)", "recovered": "\(pages.count)", "discarded": "\(discarded)",
            ])
        }
        logger.debug("nvme journal replayed", metadata: [
            "tier": "\(name)", "blocks": "\(replay.count)", "records": "\(replayedRecords)",
        ])
        return OpenedContents(report: NVMeRecoveryReport(formatted: false, recovered: pages.count, discarded: discarded),
                              pages: pages, recordSequence: maxSequence, instance: instance, checkpoint: next)
    }

    private static func writeCheckpoint(_ checkpoint: NVMeFormat.Checkpoint, fd: Int32, geometry: NVMeFormat.Geometry,
                                        block: UnsafeMutableRawPointer, name: String) throws(SpillwayError)
    {
        checkpoint.encode(into: block)
        guard pwrite(fd, block, NVMeFormat.blockSize, off_t(checkpoint.offset(in: geometry))) == NVMeFormat.blockSize else {
            throw .tierIO(tier: name, operation: "write checkpoint", errno: errno)
        }
    }

    /// Formats the file for `geometry` under a new instance; returns the first checkpoint.
    private static func format(fd: Int32, geometry: NVMeFormat.Geometry, isBlockDevice: Bool,
                               block: UnsafeMutableRawPointer, name: String) throws(SpillwayError) -> NVMeFormat.Checkpoint
    {
        if !isBlockDevice {
            // Empty the file (so no stale index or journal survives), then reserve the space up
            // front: a full filesystem is reported now, not as a failed write later.
            guard ftruncate(fd, 0) == 0, ftruncate(fd, off_t(geometry.fileBytes)) == 0 else {
                throw .tierIO(tier: name, operation: "ftruncate to \(geometry.fileBytes)", errno: errno)
            }
            let status = posix_fallocate(fd, 0, off_t(geometry.fileBytes))
            if status != 0 && status != EOPNOTSUPP && status != EINVAL {
                throw .tierIO(tier: name, operation: "reserve \(ByteCount.format(geometry.fileBytes))", errno: status)
            }
        } else {
            // A block device: zero the checkpoints, index and journal.
            let zeros = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: NVMeFormat.blockSize)
            defer { zeros.deallocate() }
            memset(zeros, 0, 1 << 20)
            var offset = geometry.checkpointOffset
            while offset < geometry.dataOffset {
                let length = min(1 << 20, geometry.dataOffset - offset)
                guard pwrite(fd, zeros, length, off_t(offset)) == length else {
                    throw .tierIO(tier: name, operation: "zero index", errno: errno)
                }
                offset += length
            }
        }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        // Time plus randomness: a reformat of the same device never matches an older instance.
        let instance = (UInt64(now.tv_sec) << 32 ^ UInt64(now.tv_nsec)) ^ UInt64.random(in: .min ... .max)
        memset(block, 0, NVMeFormat.blockSize)
        NVMeFormat.encodeSuperblock(geometry, instance: instance, into: block)
        guard pwrite(fd, block, NVMeFormat.blockSize, 0) == NVMeFormat.blockSize else {
            throw .tierIO(tier: name, operation: "write superblock", errno: errno)
        }
        let first = NVMeFormat.Checkpoint(generation: 1, replayFrom: 0, instance: instance)
        try writeCheckpoint(first, fd: fd, geometry: geometry, block: block, name: name)
        return first
    }

    /// `pread` until `count` bytes or end of file (false). EINTR retried; errors thrown.
    static func preadFully(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int, _ offset: Int,
                           name: String) throws(SpillwayError) -> Bool
    {
        var done = 0
        while done < count {
            let result = pread(fd, buffer + done, count - done, off_t(offset + done))
            if result < 0 {
                if errno == EINTR { continue }
                throw .tierIO(tier: name, operation: "read at \(offset + done)", errno: errno)
            }
            if result == 0 { return false }
            done += result
        }
        return true
    }
}

extension NVMeTier {
    /// How long an opener waits for another holder's lock: a killed holder's io_uring rings
    /// can keep the file open (and locked) for a moment after the process is gone.
    static let lockWaitNanoseconds: UInt64 = 2_000_000_000

    /// Takes an exclusive `flock` on the tier's file, retrying for up to two seconds, then
    /// fails naming the file and the holder's pid (from /proc/locks; "unknown" if it is not
    /// listed there, e.g. another PID namespace).
    static func lockExclusively(fd: Int32, path: String, name: String) throws(SpillwayError) {
        let deadline = monotonicNanoseconds() + lockWaitNanoseconds
        while true {
            if spillway_flock_exclusive_nonblocking(fd) == 0 { return }
            let error = errno
            if error == EINTR { continue }
            guard error == EWOULDBLOCK else {
                throw .tierIO(tier: name, operation: "flock '\(path)'", errno: error)
            }
            if monotonicNanoseconds() >= deadline { break }
            var pause = timespec(tv_sec: 0, tv_nsec: 10_000_000)
            nanosleep(&pause, nil)
        }
        let holder = lockHolder(fd: fd).map(String.init) ?? "unknown"
        throw .invalidConfiguration(
            "tier '\(name)': '\(path)' is in use by another process (pid \(holder)); each store needs its own NVMe file (set its path)")
    }

    /// The pid holding a `flock` on `fd`'s file, from /proc/locks (lines such as
    /// `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`, matched by inode).
    static func lockHolder(fd: Int32) -> Int32? {
        var status = stat()
        guard fstat(fd, &status) == 0, let file = fopen("/proc/locks", "r") else { return nil }
        defer { fclose(file) }
        let inode = ":\(status.st_ino) "
        var line: UnsafeMutablePointer<CChar>?
        var capacity = 0
        defer { free(line) }
        while getline(&line, &capacity, file) > 0 {
            guard let line else { break }
            let text = String(cString: line)
            guard text.contains("FLOCK"), !text.contains("->"), text.contains(inode) else { continue }
            let fields = text.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 6, let pid = Int32(fields[4]) else { continue }
            return pid
        }
        return nil
    }
}

extension NVMeTier {
    /// Where NVMe files without a configured path live: `$XDG_CACHE_HOME/spillway` if set,
    /// else `/var/tmp/spillway-<uid>` (disk-backed, unlike a tmpfs /tmp, and per user: two
    /// users' default stores never share a file).
    public static var defaultDirectory: String {
        if let cache = getenv("XDG_CACHE_HOME"), cache.pointee != 0 { return "\(String(cString: cache))/spillway" }
        return "/var/tmp/spillway-\(getuid())"
    }

    /// Creates `defaultDirectory` (mode 0700) if missing; refuses one that is a symlink, not a
    /// directory, owned by another user or open to group/others (someone else could read or
    /// swap the files): `PrivateDirectory`, the same rule as the daemon's token directory.
    public static func createDefaultDirectory() throws(SpillwayError) {
        try PrivateDirectory.ensure(defaultDirectory)
    }
}
