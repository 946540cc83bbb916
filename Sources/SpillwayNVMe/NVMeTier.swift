import Atomics
import CSpillwayURing
import Logging
import Metrics
import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// How to open an NVMe tier.
public struct NVMeTierConfiguration: Sendable {
    public var name: String
    /// A regular file (created if missing) or a block device.
    public var path: String
    public var slotSize: Int
    public var capacitySlots: Int
    /// Use the page cache instead of `O_DIRECT`. Only for filesystems that refuse `O_DIRECT`
    /// (the tier refuses to open there otherwise: no silent fallback).
    public var bufferedIO: Bool
    /// Nil: try `IOPOLL`, use interrupts if the device refuses it (logged either way).
    public var pollMode: NVMePollMode?
    /// Submission queue entries per ring.
    public var ringEntries: Int
    /// Start empty instead of recovering what the file holds.
    public var reformat: Bool
    /// What an acknowledged write survives: a process crash, or also a power loss.
    public var durability: NVMeDurability
    public var faults: NVMeFaultInjector?

    public init(name: String = "nvme", path: String, slotSize: Int, capacitySlots: Int, bufferedIO: Bool = false,
                pollMode: NVMePollMode? = nil, ringEntries: Int = 128, reformat: Bool = false,
                durability: NVMeDurability = .process, faults: NVMeFaultInjector? = nil)
    {
        self.name = name
        self.path = path
        self.slotSize = slotSize
        self.capacitySlots = capacitySlots
        self.bufferedIO = bufferedIO
        self.pollMode = pollMode
        self.ringEntries = ringEntries
        self.reformat = reformat
        self.durability = durability
        self.faults = faults
    }
}

/// What an acknowledged `put` or `remove` on an NVMe tier survives.
public enum NVMeDurability: String, Sendable, CaseIterable {
    /// The journal append completed (the kernel has the write): survives the process being
    /// killed, not a power loss or kernel crash (the device's volatile cache may lose it).
    case process
    /// The journal append, and every data write completed before it, is on stable media
    /// (`RWF_DSYNC`: FUA or a cache flush) before it is acknowledged: survives power loss too.
    case power
}

/// What opening the file found.
public struct NVMeRecoveryReport: Sendable, Equatable {
    /// The file had no valid superblock for this geometry and was (re)formatted.
    public var formatted: Bool
    /// Pages whose index record and data CRC32C verified: visible again.
    public var recovered: Int
    /// Records that were torn, overlapping, duplicated or whose data failed its CRC32C.
    public var discarded: Int
}

/// The NVMe tier: a file or block device driven through io_uring with `O_DIRECT`.
///
/// - **I/O.** Each submitter borrows a ring from a bounded pool (one per concurrent submitter,
///   at most `maxRings`); the tier's file is fixed file 0 of every ring and each ring's bounce
///   buffers and journal blocks are registered buffers. A batch runs as a sliding window of up
///   to its queue depth, each completion's replacement submitted at once, reaped on the
///   submitting thread (so the tier `completesInline`: no cross-thread wake-up on the latency
///   path). Aligned, block-multiple caller buffers are used directly; others bounce through the
///   registered buffers. Short transfers are resubmitted for the remainder, `EINTR` and
///   (a bounded number of times) `EAGAIN` are retried, other errors complete the I/O with
///   their errno.
/// - **Durability.** A page is durable once its `O_DIRECT` write completed and its record is
///   in the journal (63 records per 4 KiB block, one submission per batch); only then does the
///   I/O complete (so the store makes it visible). Checkpoints write the changed index blocks
///   so the journal's ring can wrap. With `durability = .process` that survives the process
///   being killed; `.power` adds `RWF_DSYNC` to every write (fdatasync after the journal on
///   IOPOLL rings) so it survives power loss too.
/// - **Warm restart.** Opening an existing file reads the checkpointed index, replays the
///   journal, checks every record's CRC32C, identity and every page's data CRC32C, and
///   recovers the newest record of each key if it verifies (`recoveredPages`); the rest are
///   discarded and counted (`recovery`). A key whose newest record fails is dropped, never
///   served from an older one.
/// - **Supersession.** When the store stops pointing at a page (`retire` or `release`) a
///   release record is queued (the record leaves the mirror once that is durable);
///   `persistInvalidations`
///   makes those of one key durable before the store acknowledges a put or remove of it, so a
///   restart never brings back a superseded version. Slots are reused only once the release
///   record is durable.
/// - **Exclusive.** The file is opened with `O_NOFOLLOW`, created 0600 and `flock`ed: one
///   process per file.
///
/// `@unchecked Sendable`: the descriptor, geometry and file descriptor are immutable; the
/// allocator, ring pool, index-block stripes and counters are each synchronized.
public final class NVMeTier: Tier, @unchecked Sendable {
    public let descriptor: TierDescriptor
    public let path: String
    public let mode: NVMePollMode
    public let directIO: Bool
    public let durability: NVMeDurability
    public let recovery: NVMeRecoveryReport
    public let recoveredPages: [RecoveredPage]

    let geometry: NVMeFormat.Geometry
    /// Byte offset of slot 0 in the file (benchmarks point fio at the same region).
    public var dataOffset: Int { geometry.dataOffset }
    let fd: Int32
    let allocator: SlotAllocator
    /// The index in memory: what the on-disk index plus the journal say, one record per slot.
    let mirror: MappedRegion
    /// Guard the mirror's 4 KiB blocks (block b → stripe b % 64) and their dirty flags.
    let indexStripes: [Locked<Void>]
    /// One byte per index block: changed since it was last written by a checkpoint.
    let dirtyIndexBlocks: UnsafeMutablePointer<UInt8>
    /// Identifies this formatting of the file; journal and checkpoint blocks of another
    /// instance are ignored.
    let instance: UInt64
    let journalState: Locked<JournalState>
    /// Checkpoints written since open (tests and metrics).
    let checkpoints = ManagedAtomic<Int>(0)
    /// Journal appends written inside a batch's data window, and appends written after it
    /// drained (the journal needed a checkpoint, or only releases), since open.
    let pipelinedAppends = ManagedAtomic<Int>(0)
    let drainedAppends = ManagedAtomic<Int>(0)
    /// Journal appends whose writes failed, since open.
    let appendFailures = ManagedAtomic<Int>(0)
    /// Records the store no longer points at whose release record is not durable yet
    /// (bounded: a release that finds 64 waiting writes them out itself).
    let tombstones = Locked(Tombstones())
    private let rings: Locked<(free: [URingContext], created: Int)>
    private let maxRings = 8
    private let ringEntries: Int
    private let bounceBytes: Int
    private let bounceCount: Int
    /// The last record sequence number used (records carry it so the newest copy of a key wins).
    let sequence: ManagedAtomic<UInt64>
    private let closed = ManagedAtomic<Bool>(false)
    let faults: NVMeFaultInjector?
    let logger: Logger

    /// Superseded index records on their way to a durable release record.
    ///
    /// A record leaves the mirror as soon as the store retires or releases its extent (so no
    /// checkpoint writes it again), but until its release record is durable the journal or the
    /// on-disk index may still hold it, and a restart would bring that version back. `keys`
    /// lets `persistInvalidations(of:)` tell in O(1) whether a key has such a record.
    struct Tombstones {
        /// Extents whose release record is in no journal append yet.
        var waiting: [Extent] = []
        /// Every extent whose release record is not durable (waiting or in an append in
        /// flight), by first slot: its page's key, its extent, and whether the store released
        /// it (slots return once the record is durable) or only retired it (reads may still
        /// copy from it; `release` comes later).
        var notDurable: [UInt32: (key: PageKey, extent: Extent, released: Bool)] = [:]
        /// Keys with an entry in `notDurable`, counted.
        var keys: [PageKey: Int] = [:]
        /// Retired copies whose release record must ride with the next record of their key
        /// (a put overwriting them on this tier): not in `waiting`, so no other append can
        /// make the old copy's release durable before the new copy's record.
        var reserved: [PageKey: [Extent]] = [:]
        /// Superseded copies the store still serves whose release record may have reached the
        /// disk in an append that failed as a whole (another of its blocks failed): their
        /// records are journaled again, with new sequence numbers, by the next append.
        var reassert: [Extent] = []

        mutating func add(_ extent: Extent, key: PageKey, released: Bool, reservedFor owner: PageKey? = nil) {
            if let owner {
                reserved[owner, default: []].append(extent)
            } else {
                waiting.append(extent)
            }
            notDurable[extent.firstSlot] = (key, extent, released)
            keys[key, default: 0] += 1
        }

        /// Moves `extent` from `reserved` to `waiting` if it is there (it was released or
        /// retired again, or its key's invalidation must be made durable now).
        mutating func unreserve(key: PageKey) {
            guard let extents = reserved.removeValue(forKey: key) else { return }
            waiting.append(contentsOf: extents)
        }

        mutating func unreserve(_ extent: Extent) {
            guard let key = notDurable[extent.firstSlot]?.key, var extents = reserved[key],
                  let index = extents.firstIndex(of: extent)
            else { return }
            extents.remove(at: index)
            reserved[key] = extents.isEmpty ? nil : extents
            waiting.append(extent)
        }

        /// The release record of `extent` is durable: returns it if its slots can be reused now.
        mutating func settle(_ extent: Extent) -> Extent? {
            guard let entry = notDurable.removeValue(forKey: extent.firstSlot) else { return nil }
            if let count = keys[entry.key], count > 1 { keys[entry.key] = count - 1 } else { keys[entry.key] = nil }
            return entry.released ? entry.extent : nil
        }
    }

    /// Where the journal stands. `next`: sequence of the next journal block; `replayFrom`: the
    /// first block the on-disk checkpoint does not cover; `appending`: appends in flight.
    struct JournalState {
        var next: UInt64
        var replayFrom: UInt64
        var generation: UInt64
        var appending = 0
        var checkpointing = false
    }

    public init(_ configuration: NVMeTierConfiguration, logger: Logger = Logger(label: "spillway.nvme")) throws(SpillwayError) {
        let name = configuration.name
        let slotSize = configuration.slotSize
        guard slotSize >= 4096, slotSize <= 2 << 20, slotSize & (slotSize - 1) == 0 else {
            throw .invalidConfiguration("tier '\(name)': slot size \(slotSize) must be a power of two between 4KiB and 2MiB")
        }
        guard configuration.capacitySlots > 0, configuration.capacitySlots <= Int(UInt32.max) else {
            throw .invalidConfiguration("tier '\(name)': capacity must be between 1 and \(UInt32.max) slots")
        }
        guard configuration.ringEntries >= 8, configuration.ringEntries <= 4096 else {
            throw .invalidConfiguration("tier '\(name)': ring entries must be between 8 and 4096")
        }
        if configuration.bufferedIO && configuration.pollMode == .iopoll {
            throw .invalidConfiguration("tier '\(name)': poll-mode iopoll needs O_DIRECT, but buffered-io is set")
        }
        self.logger = logger
        path = configuration.path
        faults = configuration.faults
        ringEntries = configuration.ringEntries
        let geometry = NVMeFormat.Geometry(slotSize: slotSize, capacitySlots: configuration.capacitySlots)
        self.geometry = geometry
        bounceBytes = slotSize
        bounceCount = max(4, min(configuration.ringEntries, (16 << 20) / slotSize))

        // Open: O_DIRECT unless explicitly told otherwise; a refusal is an error, not a fallback.
        // O_NOFOLLOW: a symlink planted at the path (a shared /tmp) is refused, not followed.
        // New files are 0600: the pages are the caller's data.
        directIO = !configuration.bufferedIO
        durability = configuration.durability
        let flags = O_RDWR | O_CREAT | O_CLOEXEC | spillway_o_nofollow() | (directIO ? spillway_o_direct() : 0)
        var descriptor: Int32
        var openErrno: Int32 = 0
        if let injected = configuration.faults?.takeOpenFailure() {
            descriptor = -1
            openErrno = injected
        } else {
            descriptor = open(configuration.path, flags, 0o600)
            openErrno = errno
        }
        if descriptor < 0 {
            let error = openErrno
            if error == EINVAL && directIO {
                throw .invalidConfiguration(
                    "tier '\(name)': the filesystem of '\(configuration.path)' refuses O_DIRECT; choose another directory or set buffered-io = true")
            }
            if error == ELOOP {
                throw .invalidConfiguration("tier '\(name)': '\(configuration.path)' is a symbolic link; give the path of the file or device itself")
            }
            throw .tierIO(tier: name, operation: "open '\(configuration.path)'", errno: error)
        }
        // One process per file: a second opener (another worker with the same configuration)
        // would reformat it under the first, or recover the first's pages as its own.
        do throws(SpillwayError) {
            try Self.lockExclusively(fd: descriptor, path: configuration.path, name: name)
        } catch {
            Glibc.close(descriptor)
            throw error
        }
        var fileStatus = stat()
        if fstat(descriptor, &fileStatus) == 0, fileStatus.st_mode & S_IFMT == S_IFREG, fileStatus.st_mode & 0o077 != 0 {
            logger.warning("nvme file is readable or writable by other users; chmod 600 it", metadata: [
                "tier": "\(name)", "path": "\(configuration.path)", "mode": "\(String(fileStatus.st_mode & 0o777, radix: 8))",
            ])
        }
        fd = descriptor
        do {
            mirror = try MappedRegion(byteCount: geometry.indexBytes, prefault: false)
        } catch {
            Glibc.close(descriptor)
            throw .tierIO(tier: name, operation: "mmap index mirror", errno: error.errno)
        }
        allocator = SlotAllocator(capacity: configuration.capacitySlots)
        indexStripes = (0..<64).map { _ in Locked(()) }
        dirtyIndexBlocks = .allocate(capacity: geometry.indexBlocks)
        dirtyIndexBlocks.initialize(repeating: 0, count: geometry.indexBlocks)
        rings = Locked(([], 0))
        self.descriptor = TierDescriptor(
            name: name, kind: .nvme, slotSize: slotSize, capacitySlots: configuration.capacitySlots,
            performance: .nvme, verifiesReads: true, completesInline: true, recordsPageMetadata: true)

        // Recover or format.
        let opened: OpenedContents
        do throws(SpillwayError) {
            opened = try Self.openContents(fd: descriptor, geometry: geometry, mirror: mirror, allocator: allocator,
                                           reformat: configuration.reformat, name: name, path: configuration.path, logger: logger)
            if durability == .power && fdatasync(descriptor) != 0 {
                throw SpillwayError.tierIO(tier: name, operation: "fdatasync after recovery", errno: errno)
            }
        } catch {
            Glibc.close(descriptor)
            dirtyIndexBlocks.deallocate()
            throw error
        }
        recovery = opened.report
        recoveredPages = opened.pages
        sequence = ManagedAtomic(opened.recordSequence)
        instance = opened.instance
        journalState = Locked(JournalState(next: opened.checkpoint.replayFrom, replayFrom: opened.checkpoint.replayFrom,
                                           generation: opened.checkpoint.generation))

        // Pick the polling mode: what was asked, or IOPOLL if the device accepts it.
        mode = Self.chooseMode(requested: configuration.pollMode, directIO: directIO, fd: descriptor,
                               entries: configuration.ringEntries, mirror: mirror, name: name, logger: logger)
        // One ring now, so a ring that cannot be set up (memlock limit, old kernel) fails the
        // open instead of every later I/O.
        do {
            returnRing(try takeRing())
        } catch {
            throw .tierIO(tier: name, operation: error.call, errno: error.errno)
        }
        logger.info("nvme tier open", metadata: [
            "tier": "\(name)", "path": "\(configuration.path)", "io": "\(directIO ? "O_DIRECT" : "buffered (requested)")",
            "mode": "\(mode.rawValue)", "recovered": "\(recovery.recovered)", "discarded": "\(recovery.discarded)",
            "formatted": "\(recovery.formatted)",
        ])
        if !directIO {
            logger.warning("nvme tier uses buffered I/O (page cache) because buffered-io was requested", metadata: ["tier": "\(name)"])
        }
        // Which mode is in use is a metric too, not only a log line: a silent fallback is a bug.
        Gauge(label: "spillway_nvme_io_mode", dimensions: [("tier", name), ("mode", mode.rawValue), ("direct", "\(directIO)")]).record(1)
        Gauge(label: "spillway_nvme_recovered_pages", dimensions: [("tier", name)]).record(recovery.recovered)
        Gauge(label: "spillway_nvme_discarded_pages", dimensions: [("tier", name)]).record(recovery.discarded)
    }

    deinit {
        if !closed.load(ordering: .relaxed) {
            flushTombstones()
            checkpoint()
        }
        rings.withLock { $0.free.removeAll() }
        Glibc.close(fd)
        dirtyIndexBlocks.deallocate()
    }

    // MARK: Space

    public func allocate(slotCount: Int) -> Extent? {
        if let extent = allocator.allocate(count: slotCount) { return extent }
        // Slots waiting for their tombstone may be all that is missing.
        guard flushTombstones() else { return nil }
        return allocator.allocate(count: slotCount)
    }

    /// Gives the page's slots back. If its index record is still current (in the mirror, so
    /// possibly on disk), a release record is queued and the slots return to the allocator only
    /// once that record is durable (appended with the next batch's records, or here when 64
    /// releases are waiting, or on close), so no record on disk ever claims a reused slot. An
    /// extent retired earlier waits for its release record the same way; an extent without a
    /// record (a write that failed, or one whose release record is already durable) is free
    /// at once.
    public func release(_ extent: Extent) {
        let key = indexRecordKey(extent)
        let outcome = tombstones.withLock { state -> (freeNow: Bool, waiting: Int) in
            if state.notDurable[extent.firstSlot] != nil {
                state.notDurable[extent.firstSlot]!.released = true
                // Not waiting for a put of its key any more: its slots are wanted back.
                state.unreserve(extent)
                return (false, state.waiting.count)
            }
            if let key {
                state.add(extent, key: key, released: true)
                return (false, state.waiting.count)
            }
            return (true, 0)
        }
        if outcome.freeNow { allocator.release(extent) }
        if outcome.waiting >= 64 { flushTombstones() }
    }

    /// The store no longer points at `extent` (reads may still copy from it): a release record
    /// is queued; the slots stay allocated until `release`. The record stays in the mirror
    /// (and so in checkpoints) until the release record is durable: a checkpoint never makes a
    /// retirement durable before the operation that caused it journaled it.
    public func retire(_ extent: Extent) {
        let key = indexRecordKey(extent)
        let waiting = tombstones.withLock { state -> Int in
            if state.notDurable[extent.firstSlot] != nil {
                state.unreserve(extent)
            } else if let key {
                state.add(extent, key: key, released: false)
            }
            return state.waiting.count
        }
        if waiting >= 64 { flushTombstones() }
    }

    /// `retire`, with the release record held back for the next journal append that carries
    /// a record of `key` (the overwriting put's), so both become durable together.
    public func retire(_ extent: Extent, supersededByNextRecordOf key: PageKey) {
        guard let recorded = indexRecordKey(extent) else { return }
        tombstones.withLock { state in
            guard state.notDurable[extent.firstSlot] == nil else { return }
            state.add(extent, key: recorded, released: false, reservedFor: key)
        }
    }

    /// Journals the release records of `key`'s superseded pages now if any is not durable yet,
    /// waiting for an append already carrying one. Returns 0 or the journal write's errno
    /// (after three failed attempts).
    public func persistInvalidations(of key: PageKey) -> Int32 {
        var failures = 0
        while true {
            let state = tombstones.withLock { state in
                // A release held back for a put of this key that never appended (it failed).
                state.unreserve(key: key)
                return (pending: state.keys[key] != nil, waiting: !state.waiting.isEmpty)
            }
            guard state.pending else { return 0 }
            if state.waiting {
                let status: Int32
                do {
                    let context = try takeRing()
                    status = appendRecords([], of: nil, on: context)
                    returnRing(context)
                } catch {
                    status = error.errno
                }
                if status != 0 {
                    failures += 1
                    if failures >= 3 { return status }
                }
            } else {
                // Its release record is in another thread's append, which completes (or fails
                // and puts it back in `waiting`) without waiting for anything this thread holds.
                sched_yield()
            }
        }
    }

    /// The key of the mirror record at `extent`'s first slot, if there is one (a torn record
    /// counts, with a zero key).
    private func indexRecordKey(_ extent: Extent) -> PageKey? {
        var key: PageKey?
        let block = geometry.indexBlock(ofSlot: extent.firstSlot)
        indexStripes[block % indexStripes.count].withLock { _ in
            let record = mirror.base + Int(extent.firstSlot) * NVMeFormat.recordSize
            guard record.load(as: UInt32.self) != 0 else { return }
            key = NVMeFormat.Record.decode(record)?.key ?? PageKey(high: 0, low: 0)
        }
        return key
    }

    public var usedSlots: Int { allocator.usedSlots }

    public func persistReleases() {
        flushTombstones()
    }

    /// Slots released by the store whose empty index record is not on disk yet (still counted
    /// in `usedSlots` until it is).
    public var pendingReleaseSlots: Int {
        tombstones.withLock { $0.notDurable.values.reduce(0) { $0 + ($1.released ? Int($1.extent.slotCount) : 0) } }
    }

    /// Journals waiting releases and writes a checkpoint, so the next open replays nothing,
    /// then gives up the file's lock (another store may open it now).
    public func close() {
        guard !closed.load(ordering: .relaxed) else { return }
        flushTombstones()
        checkpoint()
        closed.store(true, ordering: .releasing)
        _ = flock(fd, LOCK_UN)
    }

    /// Tests: stops writing anything at all (no release records, no checkpoint, not even at
    /// deinit) and gives up the lock, leaving the file as a killed process would, so the same
    /// process can reopen it. Process-level crash tests kill a real `spillway store soak`.
    func abandonForTesting() {
        closed.store(true, ordering: .releasing)
        _ = flock(fd, LOCK_UN)
    }

    // MARK: I/O

    /// Progress of one I/O in a window slot.
    private struct Flight {
        var io: Int
        var done: Int
        var want: Int
        var bounce: Int32
        var interrupted: Int
        var wouldBlock: Int
        var status: Int32
        var finished: Bool
        var startedAt: UInt64 = 0
    }

    public func submit(_ batch: TierBatch) {
        guard !closed.load(ordering: .relaxed) else {
            for index in 0..<batch.count { batch.complete(index, status: ESHUTDOWN) }
            return
        }
        let context: URingContext
        do {
            context = try takeRing()
        } catch {
            logger.error("no io_uring available", metadata: ["tier": "\(descriptor.name)", "error": "\(error)"])
            for index in 0..<batch.count { batch.complete(index, status: error.errno) }
            return
        }
        let limit = min(context.entries / 2, context.bounceCount)
        let window = batch.maxInFlight > 0 ? min(batch.maxInFlight, limit) : limit
        let failuresBefore = appendFailures.load(ordering: .relaxed)
        run(batch, window: window, on: context)
        returnRing(context)
        // A failed append's pages have release records waiting (their blocks may have landed
        // anyway): write them before the puts report failure.
        if appendFailures.load(ordering: .relaxed) != failuresBefore { flushTombstones() }
        for index in 0..<batch.count { batch.finish(index) }
    }

    /// Keeps up to `window` of the batch's I/Os in flight, starting the next one in a slot as
    /// soon as its previous I/O completes (a sustained queue depth, not waves).
    ///
    /// Completed writes get their index records in the same ring while the rest of the batch
    /// is still writing: every `recordsPerJournalBlock` completed writes start a journal
    /// append of their records (up to two appends in flight, each in half of the ring's
    /// journal buffers), so by the time the last data write completes only its own records
    /// remain to write. A completion's tag says what it is: a data slot (< `window`) or, with
    /// `journalTag` set, a journal buffer. A record is still only appended after its page's
    /// data write completed, and a superseded copy's release rides in the same block as its
    /// replacement's record, so a kill at any moment recovers the old or the new page, never
    /// a record without its bytes. What cannot be pipelined (the journal needs a checkpoint,
    /// or an append would not fit its half) is appended after the window drains, as before.
    private func run(_ batch: TierBatch, window: Int, on context: URingContext) {
        withUnsafeTemporaryAllocation(of: Flight.self, capacity: window) { flights in
            flights.initialize(repeating: Flight(io: 0, done: 0, want: 0, bounce: -1, interrupted: 0, wouldBlock: 0, status: 0, finished: true))
            defer { flights.deinitialize() }
            var next = 0
            var inFlight = 0
            var written: [Int] = []
            // The journal pipeline. IOPOLL rings of a power-durable tier sync after their
            // metadata writes instead of writing them with RWF_DSYNC: those keep the old path.
            let pipelining = context.journalCount >= 2 && !(durability == .power && mode == .iopoll)
            let halfBlocks = context.journalCount / 2
            var appends: (PreparedAppend?, PreparedAppend?) = (nil, nil)
            var appendPending = (0, 0)
            var appendStatus: (Int32, Int32) = (0, 0)
            var journaled = 0  // written[..<journaled] are in an append or in `late`
            var late: [Int] = []
            // Per journal buffer: bytes written and retries. Sized by the first pipelined append,
            // so a batch that writes nothing (every get) allocates nothing for them.
            var blockDone: [Int] = []
            var blockRetries: [Int] = []

            // Starts the next I/O that needs the device in `slot`; I/Os that need none (empty,
            // discard, invalid) complete on the way. False when the batch is exhausted.
            func start(_ slot: Int) -> Bool {
                while next < batch.count {
                    let index = next
                    next += 1
                    var flight = plan(batch[index], index: index, slot: slot, context: context)
                    if flight.finished {
                        if flight.status != 0 { batch.setStatus(index, flight.status) }
                        continue
                    }
                    flight.startedAt = monotonicNanoseconds()
                    flights[slot] = flight
                    queue(flight, batch: batch, context: context, tag: UInt64(slot))
                    return true
                }
                return false
            }
            func prepared(_ half: Int) -> PreparedAppend? { half == 0 ? appends.0 : appends.1 }
            // Queues (the rest of) journal buffer `buffer`'s block write.
            func queueJournal(_ buffer: Int) -> Bool {
                guard let append = prepared(buffer / halfBlocks) else { return false }
                let offset = geometry.journalBlockOffset(sequence: append.first + UInt64(buffer - append.bufferBase))
                let done = blockDone[buffer]
                return context.prepareOrFlush(write: true, buffer: context.journalBlock(buffer) + done,
                                              length: NVMeFormat.blockSize - done, offset: offset + done,
                                              fixedBuffer: context.journalFixedBuffer(buffer), tag: Self.journalTag | UInt64(buffer),
                                              rwFlags: metadataWriteFlags)
            }
            // Starts appends of completed writes' records while a half of the journal buffers
            // is free: whole blocks' worth during the data phase, the rest once it is over.
            func pumpJournal(final: Bool) {
                guard pipelining else { return }
                while written.count > journaled {
                    let waiting = written.count - journaled
                    guard final || waiting >= NVMeFormat.recordsPerJournalBlock else { return }
                    let half: Int
                    if appends.0 == nil { half = 0 } else if appends.1 == nil { half = 1 } else { return }
                    let chunk = written[journaled..<(journaled + min(waiting, 4 * NVMeFormat.recordsPerJournalBlock))]
                    journaled += chunk.count
                    guard !closed.load(ordering: .acquiring),
                          let (blocks, first) = packAndBeginAppend(chunk, of: batch, maxBlocks: halfBlocks)
                    else {
                        late.append(contentsOf: chunk)
                        continue
                    }
                    pipelinedAppends.wrappingIncrement(ordering: .relaxed)
                    let append = encodeJournal(blocks[...], first: first, bufferBase: half * halfBlocks, of: batch, on: context)
                    if half == 0 { appends.0 = append; appendPending.0 = blocks.count; appendStatus.0 = 0 }
                    else { appends.1 = append; appendPending.1 = blocks.count; appendStatus.1 = 0 }
                    if blockDone.isEmpty {
                        blockDone = [Int](repeating: 0, count: 2 * halfBlocks)
                        blockRetries = [Int](repeating: 0, count: 2 * halfBlocks)
                    }
                    for block in 0..<blocks.count {
                        let buffer = half * halfBlocks + block
                        blockDone[buffer] = 0
                        blockRetries[buffer] = 0
                        _ = queueJournal(buffer)
                    }
                    context.flush()
                }
            }
            // One journal block's completion; the append is settled when its last block is.
            func journalCompleted(_ buffer: Int, _ value: Int32) {
                let half = buffer / halfBlocks
                let failure: Int32
                switch blockWriteStep(value, done: &blockDone[buffer], retries: &blockRetries[buffer]) {
                case .again:
                    if queueJournal(buffer) { return }
                    failure = EIO  // the ring failed; the loop fails the rest when its submit does
                case .done(let status):
                    failure = status
                }
                if half == 0 {
                    if failure != 0 { appendStatus.0 = failure }
                    appendPending.0 -= 1
                    if appendPending.0 == 0, let append = appends.0 {
                        finishAppend(append, status: appendStatus.0, of: batch)
                        appends.0 = nil
                    }
                } else {
                    if failure != 0 { appendStatus.1 = failure }
                    appendPending.1 -= 1
                    if appendPending.1 == 0, let append = appends.1 {
                        finishAppend(append, status: appendStatus.1, of: batch)
                        appends.1 = nil
                    }
                }
            }
            var journalInFlight: Bool { appends.0 != nil || appends.1 != nil }

            for slot in 0..<window {
                guard start(slot) else { break }
                inFlight += 1
            }
            while inFlight > 0 || journalInFlight {
                let submitStatus = context.submit(waitFor: 1)
                if submitStatus < 0 {
                    // The ring itself failed (it is now marked broken and will be dropped, not
                    // reused): fail what is in flight, what never started, writes that
                    // completed but have no durable index record, and appends in flight.
                    for slot in 0..<window where !flights[slot].finished {
                        batch.setStatus(flights[slot].io, -submitStatus)
                        flights[slot].finished = true
                    }
                    while next < batch.count {
                        batch.setStatus(next, -submitStatus)
                        next += 1
                    }
                    for index in written[journaled...] { batch.setStatus(index, -submitStatus) }
                    for index in late { batch.setStatus(index, -submitStatus) }
                    if let append = appends.0 { finishAppend(append, status: -submitStatus, of: batch) }
                    if let append = appends.1 { finishAppend(append, status: -submitStatus, of: batch) }
                    return
                }
                _ = context.reap { tag, result in
                    if tag & Self.journalTag != 0 {
                        journalCompleted(Int(tag & ~Self.journalTag), result)
                        return
                    }
                    let slot = Int(tag)
                    let io = batch[flights[slot].io]
                    let isWrite = io.operation == .write
                    var result = result
                    if let faults, faults.isArmed { result = faults.apply(isWrite ? .write : .read, result: result) }
                    if !isWrite && result > 0 && flights[slot].bounce >= 0 {
                        // Copy this piece out before the bounce buffer is reused for the next one.
                        let payload = min(Int(result), io.length - flights[slot].done)
                        if payload > 0 {
                            memcpy(io.buffer! + flights[slot].done, context.bounceBuffer(Int(flights[slot].bounce)), payload)
                        }
                    }
                    if handle(result, flight: &flights[slot]) {
                        queue(flights[slot], batch: batch, context: context, tag: tag)
                        return
                    }
                    let flight = flights[slot]
                    batch.setLatency(flight.io, nanoseconds: monotonicNanoseconds() &- flight.startedAt)
                    if flight.status != 0 {
                        batch.setStatus(flight.io, flight.status)
                    } else if isWrite {
                        written.append(flight.io)
                    } else {
                        // Checksummed now, while the window's other reads are in flight.
                        batch.checksumCompletedRead(flight.io)
                    }
                    inFlight -= 1
                    if start(slot) {
                        inFlight += 1
                        // Hand the replacement to the device now rather than with the next
                        // wait: completions arrive in bursts, and a burst resubmitted as one
                        // batch leaves the device's queue uneven (measured: 4K randread QD32
                        // 66k → 76k IOPS, randwrite 74k → 93k; fio's default does the same).
                        context.flush()
                    }
                }
                pumpJournal(final: inFlight == 0)
            }
            late.append(contentsOf: written[journaled...])
            if !late.isEmpty { appendRecords(late, of: batch, on: context) }
        }
    }

    /// Tags journal-block completions in a batch's ring (data I/Os are tagged with their slot).
    private static let journalTag: UInt64 = 1 << 63

    /// Validates one I/O and prepares its buffer: the caller's when it is block-aligned and a
    /// whole number of blocks long, else bounce buffer `slot` (filled now for writes).
    private func plan(_ io: TierIO, index: Int, slot: Int, context: URingContext) -> Flight {
        var flight = Flight(io: index, done: 0, want: 0, bounce: -1, interrupted: 0, wouldBlock: 0, status: 0, finished: true)
        guard UInt64(io.extent.firstSlot) + UInt64(io.extent.slotCount) <= UInt64(descriptor.capacitySlots), io.length >= 0,
              io.length <= Int(io.extent.slotCount) * descriptor.slotSize
        else {
            flight.status = EINVAL
            return flight
        }
        if io.operation == .discard || io.length == 0 { return flight }
        guard io.buffer != nil else {
            flight.status = EINVAL
            return flight
        }
        let want = NVMeFormat.roundUp(io.length, to: NVMeFormat.blockSize)
        flight.want = want
        flight.finished = false
        if io.bufferAddress % UInt(NVMeFormat.blockSize) != 0 || want != io.length {
            flight.bounce = Int32(slot)
        }
        return flight
    }

    /// Queues the rest of an I/O: all of it from the caller's buffer, or the next bounce-sized
    /// piece (a write's piece is copied in, zero-padded to whole blocks, first). False if the
    /// ring failed (the ring is then broken and the caller stops).
    @discardableResult
    private func queue(_ flight: Flight, batch: TierBatch, context: URingContext, tag: UInt64) -> Bool {
        let io = batch[flight.io]
        let offset = geometry.dataOffset(ofSlot: io.extent.firstSlot) + flight.done
        var length = flight.want - flight.done
        let buffer: UnsafeMutableRawPointer
        if flight.bounce >= 0 {
            length = min(length, context.bounceBytes)
            buffer = context.bounceBuffer(Int(flight.bounce))
            if io.operation == .write {
                let payload = max(0, min(length, io.length - flight.done))
                if payload > 0 { memcpy(buffer, io.buffer! + flight.done, payload) }
                if payload < length { memset(buffer + payload, 0, length - payload) }
            }
        } else {
            buffer = io.buffer! + flight.done
        }
        // A power-durable tier writes pages with RWF_DSYNC as well: a journal write with
        // RWF_DSYNC may be a lone FUA write that does not flush earlier completed writes.
        return context.prepareOrFlush(write: io.operation == .write, buffer: buffer, length: length,
                                      offset: offset, fixedBuffer: flight.bounce, tag: tag,
                                      rwFlags: io.operation == .write ? metadataWriteFlags : 0)
    }

    /// Interprets one completion. Returns true if the I/O must be queued again.
    private func handle(_ result: Int32, flight: inout Flight) -> Bool {
        switch result {
        case -EINTR:
            flight.interrupted += 1
            if flight.interrupted <= 64 { return true }
            flight.status = EINTR
        case -EAGAIN:
            flight.wouldBlock += 1
            if flight.wouldBlock <= 8 { return true }
            flight.status = EAGAIN
        case ..<0:
            flight.status = -result
        case 0:
            // Nothing transferred: end of file (the file was truncated under us) or a full device.
            flight.status = EIO
        default:
            flight.done += Int(result)
            if flight.done < flight.want { return true }
        }
        flight.finished = true
        return false
    }

    // MARK: Index and journal

    /// One record of a journal append: a page (an index into the append's batch) or a release.
    private enum JournalEntry {
        case page(Int)
        case release(Extent)
        /// The extent's current index record again, with a new sequence number.
        case reassert(Extent)
    }

    /// A journal append whose blocks are encoded in a ring's journal buffers
    /// (`bufferBase..<bufferBase + blocks`), whose sequence numbers are reserved and counted in
    /// `appending`, and whose records are in the index mirror: it waits for its blocks' writes,
    /// then `finishAppend` settles it.
    private struct PreparedAppend {
        var first: UInt64
        var blocks: Int
        var bufferBase: Int
        /// Batch indices of the page records it carries.
        var pages: [Int]
        /// Extents whose release records it carries.
        var frees: [Extent]
    }

    /// Takes the releases an append of `indices` must carry (each page's held-back releases,
    /// then every waiting one) and packs them with the page records into 4 KiB journal blocks,
    /// never splitting a group (a page record and the releases held for its key; a lone
    /// release). With `maxBlocks`, takes nothing and returns nil when they might need more.
    private func packJournal<Indices: Collection<Int>>(_ indices: Indices, of batch: TierBatch?, maxBlocks: Int?) -> [[JournalEntry]]? {
        let perBlock = NVMeFormat.recordsPerJournalBlock
        var held: [PageKey: [Extent]] = [:]
        var releases: [Extent] = []
        var reasserts: [Extent] = []
        let taken = tombstones.withLock { state -> Bool in
            if let maxBlocks {
                // A group never splits, so a block may end up to half empty: twice the records
                // is a safe bound on the blocks needed.
                var records = indices.count + state.waiting.count + state.reassert.count
                if let batch, !state.reserved.isEmpty {
                    for index in indices { records += state.reserved[batch[index].key]?.count ?? 0 }
                }
                guard (2 * records + perBlock - 1) / perBlock <= maxBlocks else { return false }
            }
            if let batch, !state.reserved.isEmpty {
                for index in indices {
                    let key = batch[index].key
                    if let extents = state.reserved.removeValue(forKey: key) { held[key, default: []].append(contentsOf: extents) }
                }
            }
            releases = state.waiting
            state.waiting.removeAll(keepingCapacity: true)
            reasserts = state.reassert
            state.reassert.removeAll()
            return true
        }
        guard taken else { return nil }
        var blocks: [[JournalEntry]] = [[]]
        blocks[0].reserveCapacity(min(perBlock, indices.count + releases.count))
        func place(_ entry: JournalEntry, groupSize: Int) {
            if !blocks[blocks.count - 1].isEmpty && blocks[blocks.count - 1].count + groupSize > perBlock { blocks.append([]) }
            if blocks[blocks.count - 1].count == perBlock { blocks.append([]) }
            blocks[blocks.count - 1].append(entry)
        }
        for index in indices {
            if let batch, !held.isEmpty, let extents = held.removeValue(forKey: batch[index].key) {
                place(.page(index), groupSize: 1 + extents.count)
                for extent in extents { place(.release(extent), groupSize: 1) }
            } else {
                place(.page(index), groupSize: 1)
            }
        }
        // Re-asserted records before any release: a failed append's release of the same slot
        // is older than both.
        for extent in reasserts { place(.reassert(extent), groupSize: 1) }
        for extent in releases { place(.release(extent), groupSize: 1) }
        if blocks[blocks.count - 1].isEmpty { blocks.removeLast() }
        return blocks
    }

    /// Packs an append of `indices` and reserves its journal blocks in one step (the journal
    /// lock held around the packing, so the blocks it takes are the ones it was checked for),
    /// for a ring with appends of its own in flight: it must neither wait for a checkpoint
    /// (which waits for those appends) nor write one (its ring's completions belong to its
    /// pipeline). Nil, taking nothing, when the journal needs a checkpoint first or the append
    /// might need more than `maxBlocks` blocks.
    private func packAndBeginAppend(_ indices: ArraySlice<Int>, of batch: TierBatch, maxBlocks: Int) -> ([[JournalEntry]], UInt64)? {
        journalState.withLock { state -> ([[JournalEntry]], UInt64)? in
            guard !state.checkpointing, state.next + UInt64(maxBlocks) <= state.replayFrom + UInt64(geometry.journalBlocks),
                  let blocks = packJournal(indices, of: batch, maxBlocks: maxBlocks), !blocks.isEmpty
            else { return nil }
            state.appending += 1
            defer { state.next += UInt64(blocks.count) }
            return (blocks, state.next)
        }
    }

    /// Encodes `blocks` (sequences from `first`) into `context`'s journal buffers from
    /// `bufferBase`, and enters their page records into the index mirror (before any
    /// checkpoint can run: the caller's append is counted in `appending`).
    private func encodeJournal(_ blocks: ArraySlice<[JournalEntry]>, first: UInt64, bufferBase: Int, of batch: TierBatch?,
                               on context: URingContext) -> PreparedAppend
    {
        var prepared = PreparedAppend(first: first, blocks: blocks.count, bufferBase: bufferBase, pages: [], frees: [])
        for (offset, entries) in blocks.enumerated() {
            let block = context.journalBlock(bufferBase + offset)
            for (index, entry) in entries.enumerated() {
                let target = block + NVMeFormat.recordSize * (1 + index)
                let sequence = self.sequence.loadThenWrappingIncrement(ordering: .relaxed) &+ 1
                switch entry {
                case .page(let batchIndex):
                    guard let batch else { continue }
                    prepared.pages.append(batchIndex)
                    let io = batch[batchIndex]
                    let page = NVMeFormat.Record(key: io.key, slot: io.extent.firstSlot, slotCount: io.extent.slotCount,
                                                 length: UInt32(io.length), checksum: io.checksum, sequence: sequence,
                                                 instance: instance)
                    page.encode(into: target)
                    setIndexRecord(slot: page.slot) { memcpy($0, target, NVMeFormat.recordSize) }
                case .release(let extent):
                    prepared.frees.append(extent)
                    NVMeFormat.Record.release(extent, sequence: sequence, instance: instance).encode(into: target)
                case .reassert(let extent):
                    // The mirror still holds the record (it leaves only once a release of it
                    // is durable); if it is gone the copy was released meanwhile, and a
                    // release record says the same.
                    var record = NVMeFormat.Record.release(extent, sequence: sequence, instance: instance)
                    setIndexRecord(slot: extent.firstSlot) { current in
                        guard var current = NVMeFormat.Record.decode(current), !current.isRelease, current.slot == extent.firstSlot
                        else { return }
                        current.sequence = sequence
                        record = current
                    }
                    record.encode(into: target)
                    if !record.isRelease { setIndexRecord(slot: extent.firstSlot) { memcpy($0, target, NVMeFormat.recordSize) } }
                }
            }
            NVMeFormat.encodeJournalHeader(into: block, sequence: first + UInt64(offset), instance: instance, count: entries.count)
        }
        return prepared
    }

    /// Settles an append whose block writes ended with `status` (0: all durable).
    ///
    /// A failed append's pages fail. Their records leave the mirror before a checkpoint can
    /// write them, and, because a block whose write reported an error may still have reached
    /// the disk, each failed page's extent also gets a release record of its own (journaled
    /// with the next append, or by `submit` right after the batch) before its slots can be
    /// reused: a failed put never surfaces after a restart. A superseded copy whose release
    /// rode in the failed append goes back to waiting for its key's next record, so the
    /// version the store still serves stays durable.
    private func finishAppend(_ prepared: PreparedAppend, status: Int32, of batch: TierBatch?) {
        if status == 0 {
            // The release records are durable: only now do the records leave the mirror,
            // and before `endAppend`, so no checkpoint can cover these journal blocks
            // while still writing the released records.
            for extent in prepared.frees { setIndexRecord(slot: extent.firstSlot) { memset($0, 0, NVMeFormat.recordSize) } }
            endAppend()
            settle(prepared.frees, written: true)
            return
        }
        logger.error("journal write failed", metadata: ["tier": "\(descriptor.name)", "errno": "\(status)", "pages": "\(prepared.pages.count)"])
        guard let batch else {
            endAppend()
            settle(prepared.frees, written: false)
            return
        }
        for index in prepared.pages {
            setIndexRecord(slot: batch[index].extent.firstSlot) { memset($0, 0, NVMeFormat.recordSize) }
            batch.setStatus(index, status)
        }
        endAppend()
        let failedKeys = Set(prepared.pages.lazy.map { batch[$0].key })
        tombstones.withLock { state in
            for index in prepared.pages where state.notDurable[batch[index].extent.firstSlot] == nil {
                state.add(batch[index].extent, key: batch[index].key, released: false)
            }
            for extent in prepared.frees {
                if let entry = state.notDurable[extent.firstSlot], !entry.released, failedKeys.contains(entry.key) {
                    state.reserved[entry.key, default: []].append(extent)
                    state.reassert.append(extent)
                } else {
                    state.waiting.append(extent)
                }
            }
        }
        appendFailures.wrappingIncrement(ordering: .relaxed)
    }

    /// Appends journal records for completed writes (`indices` of `batch`) plus every waiting
    /// release, in as few 4 KiB journal blocks as they fit, written in one submission per
    /// round of `context.journalCount` blocks. A release held back for a key this append
    /// records (the put's superseded copy on this tier) goes right after that key's page record
    /// in the same block: the kernel may complete, or on a kill cancel, the blocks of one
    /// submission in any order, and a single block lands whole or not at all, so the old copy's
    /// release is never durable without its replacement. A page's record enters the index
    /// mirror when its journal block is reserved and leaves it again if the block's write fails
    /// (before any checkpoint can see it: checkpoints wait for in-flight appends); a released
    /// record leaves the mirror once its release record is durable. Writes whose record did
    /// not reach the disk get its errno as their status. Returns 0 or the last round's errno.
    /// `run` pipelines most appends into its data window instead (`JournalPipeline`); this is
    /// the path for what it could not, and for releases alone.
    @discardableResult
    func appendRecords(_ indices: [Int], of batch: TierBatch?, on context: URingContext) -> Int32 {
        if closed.load(ordering: .acquiring) {
            // Closed (or abandoned by a test): nothing reaches the file any more.
            if let batch { for index in indices { batch.setStatus(index, ESHUTDOWN) } }
            return ESHUTDOWN
        }
        guard let blocks = packJournal(indices, of: batch, maxBlocks: nil), !blocks.isEmpty else { return 0 }
        drainedAppends.wrappingIncrement(ordering: .relaxed)
        var status: Int32 = 0
        var start = 0
        while start < blocks.count {
            let end = min(blocks.count, start + context.journalCount)
            let round = blocks[start..<end]
            start = end
            let first: UInt64
            switch beginAppend(blocks: round.count, on: context) {
            case .failure(let error):
                status = error.errno
                var frees: [Extent] = []
                for entries in round {
                    for entry in entries {
                        switch entry {
                        case .page(let index): batch?.setStatus(index, status)
                        case .release(let extent): frees.append(extent)
                        case .reassert(let extent): tombstones.withLock { $0.reassert.append(extent) }
                        }
                    }
                }
                settle(frees, written: false)
                continue
            case .success(let sequence):
                first = sequence
            }
            let prepared = encodeJournal(round, first: first, bufferBase: 0, of: batch, on: context)
            let roundStatus = writeBlocks(round.count, on: context) { block in
                (context.journalBlock(block), geometry.journalBlockOffset(sequence: first + UInt64(block)), context.journalFixedBuffer(block))
            }
            finishAppend(prepared, status: roundStatus, of: batch)
            if roundStatus != 0 { status = roundStatus }
        }
        return status
    }

    /// Writes every waiting release to the journal now. False if nothing was waiting or the
    /// write failed.
    @discardableResult
    func flushTombstones() -> Bool {
        guard tombstones.withLock({ !$0.waiting.isEmpty || !$0.reassert.isEmpty }) else { return false }
        guard let context = try? takeRing() else { return false }
        defer { returnRing(context) }
        return appendRecords([], of: nil, on: context) == 0
    }

    /// Extents whose release record is on disk go back to the allocator if the store released
    /// them (retired ones when it does); if the write failed they wait for the next one (a
    /// persistent failure keeps them out of use; see `pendingReleaseSlots`).
    private func settle(_ extents: [Extent], written: Bool) {
        guard !extents.isEmpty else { return }
        if written {
            let free = tombstones.withLock { state in extents.compactMap { state.settle($0) } }
            for extent in free { allocator.release(extent) }
        } else {
            tombstones.withLock { $0.waiting.append(contentsOf: extents) }
            logger.error("could not journal releases; their slots stay allocated", metadata: [
                "tier": "\(descriptor.name)", "extents": "\(extents.count)",
            ])
        }
    }

    /// Changes `slot`'s record in the index mirror and marks its block dirty, under the block's
    /// stripe lock.
    func setIndexRecord(slot: UInt32, _ body: (UnsafeMutableRawPointer) -> Void) {
        let block = geometry.indexBlock(ofSlot: slot)
        indexStripes[block % indexStripes.count].withLock { _ in
            body(mirror.base + Int(slot) * NVMeFormat.recordSize)
            dirtyIndexBlocks[block] = 1
        }
    }

    /// Reserves `blocks` consecutive journal sequence numbers and counts an append in flight.
    /// When the ring of journal blocks would overwrite blocks a restart still needs, checkpoints
    /// first (this caller does it; others wait).
    private func beginAppend(blocks: Int, on context: URingContext) -> Result<UInt64, SystemCallError> {
        enum Step { case go(UInt64), wait, checkpoint }
        while true {
            let step = journalState.withLock { state -> Step in
                if state.checkpointing { return .wait }
                if state.next + UInt64(blocks) > state.replayFrom + UInt64(geometry.journalBlocks) {
                    state.checkpointing = true
                    return .checkpoint
                }
                state.appending += 1
                defer { state.next += UInt64(blocks) }
                return .go(state.next)
            }
            switch step {
            case .go(let first): return .success(first)
            case .wait: sched_yield()
            case .checkpoint:
                let status = checkpointLocked(on: context)
                if status != 0 { return .failure(SystemCallError(call: "journal checkpoint", errno: status)) }
            }
        }
    }

    private func endAppend() {
        journalState.withLock { $0.appending -= 1 }
    }

    /// Writes a checkpoint now (used on close). Returns 0 or an errno.
    @discardableResult
    func checkpoint() -> Int32 {
        if closed.load(ordering: .acquiring) { return ESHUTDOWN }
        while true {
            let mine = journalState.withLock { state -> Bool in
                guard !state.checkpointing else { return false }
                state.checkpointing = true
                return true
            }
            if mine { break }
            sched_yield()
        }
        guard let context = try? takeRing() else {
            journalState.withLock { $0.checkpointing = false }
            return EIO
        }
        defer { returnRing(context) }
        return checkpointLocked(on: context)
    }

    /// Makes the on-disk index reflect every journal block appended so far, so their ring
    /// positions can be reused: waits for in-flight appends, writes the dirty index blocks, then
    /// the checkpoint block (A/B alternately) naming the first block a restart must replay. The
    /// caller has set `checkpointing` (new appends wait); this clears it.
    private func checkpointLocked(on context: URingContext) -> Int32 {
        while journalState.withLock({ $0.appending }) > 0 { sched_yield() }
        let (replayFrom, generation) = journalState.withLock { ($0.next, $0.generation + 1) }
        var blocks: [Int] = []
        for stripe in 0..<indexStripes.count {
            indexStripes[stripe].withLock { _ in
                var block = stripe
                while block < geometry.indexBlocks {
                    if dirtyIndexBlocks[block] != 0 {
                        dirtyIndexBlocks[block] = 0
                        blocks.append(block)
                    }
                    block += indexStripes.count
                }
            }
        }
        blocks.sort()
        var status = writeBlocks(blocks.count, on: context) { index in
            (mirror.base + blocks[index] * NVMeFormat.blockSize, geometry.indexOffset + blocks[index] * NVMeFormat.blockSize, -1)
        }
        let checkpoint = NVMeFormat.Checkpoint(generation: generation, replayFrom: replayFrom, instance: instance)
        if status == 0 {
            checkpoint.encode(into: context.journalBlock(0))
            status = writeBlocks(1, on: context) { _ in
                (context.journalBlock(0), checkpoint.offset(in: geometry), context.journalFixedBuffer(0))
            }
        }
        if status != 0 {
            for block in blocks { indexStripes[block % indexStripes.count].withLock { _ in dirtyIndexBlocks[block] = 1 } }
            logger.error("journal checkpoint failed; appends fail until one succeeds", metadata: [
                "tier": "\(descriptor.name)", "errno": "\(status)",
            ])
        }
        journalState.withLock { state in
            if status == 0 {
                state.replayFrom = replayFrom
                state.generation = generation
            }
            state.checkpointing = false
        }
        checkpoints.wrappingIncrement(ordering: .relaxed)
        return status
    }

    /// Writes `count` 4 KiB blocks (`describe(i)` = buffer, file offset, fixed buffer index or
    /// -1) with at most half the ring in flight; short writes and EINTR/EAGAIN are resubmitted.
    /// Returns 0 or the first errno. Always drains what it queued unless the ring itself fails
    /// (then the ring is broken and dropped by the pool).
    private func writeBlocks(_ count: Int, on context: URingContext,
                             _ describe: (Int) -> (buffer: UnsafeMutableRawPointer, offset: Int, fixed: Int32)) -> Int32
    {
        guard count > 0 else { return 0 }
        var done = [Int](repeating: 0, count: count)
        var retries = [Int](repeating: 0, count: count)
        var failure: Int32 = 0
        var pending = 0
        var next = 0
        let limit = max(1, context.entries / 2)
        func queue(_ index: Int) -> Bool {
            let target = describe(index)
            return context.prepareOrFlush(write: true, buffer: target.buffer + done[index], length: NVMeFormat.blockSize - done[index],
                                          offset: target.offset + done[index], fixedBuffer: target.fixed, tag: UInt64(index),
                                          rwFlags: metadataWriteFlags)
        }
        func fill() -> Bool {
            while pending < limit && next < count {
                guard queue(next) else { return false }
                next += 1
                pending += 1
            }
            return true
        }
        guard fill() else { return EIO }
        while pending > 0 {
            let submitStatus = context.submit(waitFor: 1)
            if submitStatus < 0 { return -submitStatus }
            var ringFailed = false
            _ = context.reap { tag, value in
                let index = Int(tag)
                switch blockWriteStep(value, done: &done[index], retries: &retries[index]) {
                case .again:
                    if !queue(index) { ringFailed = true }
                    return
                case .done(let status):
                    if status != 0 { failure = status }
                }
                pending -= 1
            }
            if ringFailed || !fill() { return EIO }
        }
        // IOPOLL rings take no RWF_DSYNC; a power-durable tier syncs after the blocks instead
        // (it also covers the data writes that completed before them).
        if failure == 0 && durability == .power && mode == .iopoll && fdatasync(fd) != 0 { return errno }
        return failure
    }

    /// What a metadata block write's completion means: write the rest again (a short write,
    /// or `EINTR`/`EAGAIN` up to 64 times), or done with 0 or an errno.
    private enum BlockWriteStep {
        case again
        case done(Int32)
    }

    private func blockWriteStep(_ value: Int32, done: inout Int, retries: inout Int) -> BlockWriteStep {
        var result = value
        if let faults, faults.isArmed { result = faults.apply(.metadataWrite, result: result) }
        switch result {
        case -EINTR, -EAGAIN:
            retries += 1
            return retries <= 64 ? .again : .done(-result)
        case ..<0: return .done(-result)
        case 0: return .done(EIO)
        default:
            done += Int(result)
            return done < NVMeFormat.blockSize ? .again : .done(0)
        }
    }

    /// `RWF_DSYNC` for page, journal, index and checkpoint writes when `durability` is
    /// `power`: each is on stable media before it completes.
    private var metadataWriteFlags: Int32 {
        durability == .power && mode != .iopoll ? spillway_rwf_dsync() : 0
    }

    // MARK: Rings

    private func takeRing() throws(SystemCallError) -> URingContext {
        while true {
            let taken: (URingContext?, Bool) = rings.withLock { pool in
                if let ring = pool.free.popLast() { return (ring, false) }
                if pool.created < maxRings {
                    pool.created += 1
                    return (nil, true)
                }
                return (nil, false)
            }
            if let ring = taken.0 { return ring }
            if taken.1 {
                do {
                    return try URingContext(entries: ringEntries, mode: mode, fd: fd, bounceBytes: bounceBytes,
                                            bounceCount: bounceCount)
                } catch {
                    rings.withLock { $0.created -= 1 }
                    throw error
                }
            }
            sched_yield()
        }
    }

    private func returnRing(_ ring: URingContext) {
        rings.withLock { pool in
            if ring.broken {
                pool.created -= 1  // dropped: it may still hold another batch's I/Os
            } else {
                pool.free.append(ring)
            }
        }
    }
}
