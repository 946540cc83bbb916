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
    public var faults: NVMeFaultInjector?

    public init(name: String = "nvme", path: String, slotSize: Int, capacitySlots: Int, bufferedIO: Bool = false,
                pollMode: NVMePollMode? = nil, ringEntries: Int = 128, reformat: Bool = false, faults: NVMeFaultInjector? = nil)
    {
        self.name = name
        self.path = path
        self.slotSize = slotSize
        self.capacitySlots = capacitySlots
        self.bufferedIO = bufferedIO
        self.pollMode = pollMode
        self.ringEntries = ringEntries
        self.reformat = reformat
        self.faults = faults
    }
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
///   buffers and the index mirror are registered buffers. A batch is queued as many SQEs as fit,
///   submitted with one `io_uring_submit_and_wait`, and reaped in batches on the submitting
///   thread (so the tier `completesInline`: no cross-thread wake-up on the latency path).
///   Aligned, block-multiple caller buffers are used directly; others bounce through the
///   registered buffers. Short transfers are resubmitted for the remainder, `EINTR` and
///   (a bounded number of times) `EAGAIN` are retried, other errors complete the I/O with
///   their errno.
/// - **Durability.** A page is durable once its `O_DIRECT` write completed; then its index
///   record is written, and only then does the I/O complete (so the store makes it visible).
///   Power loss is out of scope: there is no fsync per page.
/// - **Warm restart.** Opening an existing file reads the index, checks every record's CRC32C
///   and every page's data CRC32C, and recovers the pages that verify (`recoveredPages`); the
///   rest are discarded and counted (`recovery`).
/// - **Release** empties the page's index record at once in memory; the empty record reaches
///   the disk with the next batch's index write (or after 64 releases, or on close) and only
///   then are the slots reused. A slot is never reused under an old record, but a process that
///   crashes inside that window can recover a page removed or superseded just before.
///
/// `@unchecked Sendable`: the descriptor, geometry and file descriptor are immutable; the
/// allocator, ring pool, index-block stripes and counters are each synchronized.
public final class NVMeTier: Tier, @unchecked Sendable {
    public let descriptor: TierDescriptor
    public let path: String
    public let mode: NVMePollMode
    public let directIO: Bool
    public let recovery: NVMeRecoveryReport
    public let recoveredPages: [RecoveredPage]

    let geometry: NVMeFormat.Geometry
    /// Byte offset of slot 0 in the file (benchmarks point fio at the same region).
    public var dataOffset: Int { geometry.dataOffset }
    private let fd: Int32
    private let allocator: SlotAllocator
    private let mirror: MappedRegion
    private let indexStripes: [Locked<Void>]
    /// Released extents whose empty index record is not on disk yet (bounded: a release that
    /// finds 64 waiting writes them out itself).
    private let tombstones = Locked<[Extent]>([])
    private let rings: Locked<(free: [URingContext], created: Int)>
    private let maxRings = 8
    private let ringEntries: Int
    private let bounceBytes: Int
    private let bounceCount: Int
    private let sequence: ManagedAtomic<UInt64>
    private let closed = ManagedAtomic<Bool>(false)
    private let faults: NVMeFaultInjector?
    private let logger: Logger

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
        directIO = !configuration.bufferedIO
        let flags = O_RDWR | O_CREAT | O_CLOEXEC | (directIO ? spillway_o_direct() : 0)
        let descriptor = open(configuration.path, flags, 0o600)
        if descriptor < 0 {
            let error = errno
            if error == EINVAL && directIO {
                throw .invalidConfiguration(
                    "tier '\(name)': the filesystem of '\(configuration.path)' refuses O_DIRECT; choose another directory or set buffered-io = true")
            }
            throw .tierIO(tier: name, operation: "open '\(configuration.path)'", errno: error)
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
        rings = Locked(([], 0))
        self.descriptor = TierDescriptor(
            name: name, kind: .nvme, slotSize: slotSize, capacitySlots: configuration.capacitySlots,
            performance: .nvme, verifiesReads: true, completesInline: true, recordsPageMetadata: true)

        // Recover or format.
        let opened: (report: NVMeRecoveryReport, pages: [RecoveredPage], sequence: UInt64)
        do throws(SpillwayError) {
            opened = try Self.openContents(fd: descriptor, geometry: geometry, mirror: mirror, allocator: allocator,
                                           reformat: configuration.reformat, name: name, logger: logger)
        } catch {
            Glibc.close(descriptor)
            throw error
        }
        recovery = opened.report
        recoveredPages = opened.pages
        sequence = ManagedAtomic(opened.sequence)

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
        _ = flushTombstones()
        rings.withLock { $0.free.removeAll() }
        Glibc.close(fd)
    }

    // MARK: Space

    public func allocate(slotCount: Int) -> Extent? {
        if let extent = allocator.allocate(count: slotCount) { return extent }
        // Slots waiting for their tombstone may be all that is missing.
        guard flushTombstones() else { return nil }
        return allocator.allocate(count: slotCount)
    }

    /// Empties the page's index record in the mirror now; the slots return to the allocator
    /// only once that empty record is on disk (written with the next batch's index blocks, or
    /// here when 64 releases are waiting, or on close).
    public func release(_ extent: Extent) {
        let slot = extent.firstSlot
        let block = geometry.indexBlockOffset(ofSlot: slot)
        withIndexBlock(block) { memset(mirror.base + Int(slot) * NVMeFormat.recordSize, 0, NVMeFormat.recordSize) }
        let waiting = tombstones.withLock { pending -> Int in
            pending.append(extent)
            return pending.count
        }
        if waiting >= 64 { _ = flushTombstones() }
    }

    public var usedSlots: Int { allocator.usedSlots }

    public func persistReleases() {
        _ = flushTombstones()
    }

    /// Slots released by the store whose empty index record is not on disk yet (still counted
    /// in `usedSlots` until it is).
    public var pendingReleaseSlots: Int { tombstones.withLock { $0.reduce(0) { $0 + Int($1.slotCount) } } }

    public func close() {
        _ = flushTombstones()
        closed.store(true, ordering: .releasing)
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
        defer { returnRing(context) }
        let limit = min(context.entries / 2, context.bounceCount)
        let window = batch.maxInFlight > 0 ? min(batch.maxInFlight, limit) : limit
        run(batch, window: window, on: context)
        for index in 0..<batch.count { batch.finish(index) }
    }

    /// Keeps up to `window` of the batch's I/Os in flight, starting the next one in a slot as
    /// soon as its previous I/O completes (a sustained queue depth, not waves). Completed writes
    /// get their index records at the end, in one submission.
    private func run(_ batch: TierBatch, window: Int, on context: URingContext) {
        withUnsafeTemporaryAllocation(of: Flight.self, capacity: window) { flights in
            flights.initialize(repeating: Flight(io: 0, done: 0, want: 0, bounce: -1, interrupted: 0, wouldBlock: 0, status: 0, finished: true))
            defer { flights.deinitialize() }
            var next = 0
            var inFlight = 0
            var written: [Int] = []
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
                    flight.startedAt = Self.now()
                    flights[slot] = flight
                    queue(flight, batch: batch, context: context, tag: UInt64(slot))
                    return true
                }
                return false
            }
            for slot in 0..<window {
                guard start(slot) else { break }
                inFlight += 1
            }
            while inFlight > 0 {
                let submitStatus = context.submit(waitFor: 1)
                if submitStatus < 0 {
                    // The ring itself failed (it is now marked broken and will be dropped, not
                    // reused): fail what is in flight, what never started, and writes that
                    // completed but have no index record.
                    for slot in 0..<window where !flights[slot].finished {
                        batch.setStatus(flights[slot].io, -submitStatus)
                        flights[slot].finished = true
                    }
                    while next < batch.count {
                        batch.setStatus(next, -submitStatus)
                        next += 1
                    }
                    for index in written { batch.setStatus(index, -submitStatus) }
                    return
                }
                _ = context.reap { tag, result in
                    let slot = Int(tag)
                    let io = batch[flights[slot].io]
                    let isWrite = io.operation == .write
                    var result = result
                    if let faults, faults.isArmed { result = faults.apply(write: isWrite, result: result) }
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
                    batch.setLatency(flight.io, nanoseconds: Self.now() &- flight.startedAt)
                    if flight.status != 0 {
                        batch.setStatus(flight.io, flight.status)
                    } else if isWrite {
                        written.append(flight.io)
                    }
                    inFlight -= 1
                    if start(slot) { inFlight += 1 }
                }
            }
            if !written.isEmpty {
                let status = recordWrites(written, of: batch, on: context)
                if status != 0 { for index in written { batch.setStatus(index, status) } }
            }
        }
    }

    @inline(__always)
    static func now() -> UInt64 {
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return UInt64(spec.tv_sec) &* 1_000_000_000 &+ UInt64(spec.tv_nsec)
    }

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
        return context.prepareOrFlush(write: io.operation == .write, buffer: buffer, length: length,
                                      offset: offset, fixedBuffer: flight.bounce, tag: tag)
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

    // MARK: Index

    /// Writes index records for completed writes, plus any waiting tombstones, as one
    /// submission of all touched 4 KiB index blocks. The blocks' stripe locks are held (in
    /// ascending order) from encoding until the writes complete, so concurrent updates of a
    /// block reach the disk in the order they were made. Returns 0 or an errno.
    private func recordWrites(_ indices: [Int], of batch: TierBatch, on context: URingContext) -> Int32 {
        let waiting = tombstones.withLock { pending -> [Extent] in
            defer { pending.removeAll(keepingCapacity: true) }
            return pending
        }
        var blocks = Set(indices.map { geometry.indexBlockOffset(ofSlot: batch[$0].extent.firstSlot) })
        for extent in waiting { blocks.insert(geometry.indexBlockOffset(ofSlot: extent.firstSlot)) }
        let status = withIndexBlocks(Array(blocks)) { () -> Int32 in
            for index in indices {
                let io = batch[index]
                let record = NVMeFormat.Record(
                    key: io.key, slotCount: io.extent.slotCount, length: UInt32(io.length), checksum: io.checksum,
                    sequence: sequence.loadThenWrappingIncrement(ordering: .relaxed) &+ 1)
                record.encode(into: mirror.base + Int(io.extent.firstSlot) * NVMeFormat.recordSize)
            }
            let status = writeIndexBlocks(Array(blocks), on: context)
            if status != 0 {
                // Not durable: take the records back out of the mirror before anyone else
                // writes these blocks, so a failed put can never surface after a restart.
                for index in indices {
                    memset(mirror.base + Int(batch[index].extent.firstSlot) * NVMeFormat.recordSize, 0, NVMeFormat.recordSize)
                }
            }
            return status
        }
        settle(waiting, written: status == 0)
        return status
    }

    /// Writes every waiting tombstone now. False if nothing was waiting or the write failed.
    private func flushTombstones() -> Bool {
        let waiting = tombstones.withLock { pending -> [Extent] in
            defer { pending.removeAll(keepingCapacity: true) }
            return pending
        }
        guard !waiting.isEmpty else { return false }
        guard let context = try? takeRing() else {
            settle(waiting, written: false)
            return false
        }
        defer { returnRing(context) }
        let blocks = Array(Set(waiting.map { geometry.indexBlockOffset(ofSlot: $0.firstSlot) }))
        let status = withIndexBlocks(blocks) { writeIndexBlocks(blocks, on: context) }
        settle(waiting, written: status == 0)
        return status == 0
    }

    /// Released extents whose tombstones are on disk go back to the allocator; if the write
    /// failed they wait for the next one (a persistent failure keeps them out of use; see
    /// `pendingReleaseSlots`).
    private func settle(_ extents: [Extent], written: Bool) {
        guard !extents.isEmpty else { return }
        if written {
            for extent in extents { allocator.release(extent) }
        } else {
            tombstones.withLock { $0.append(contentsOf: extents) }
            logger.error("could not write index tombstones; their slots stay allocated", metadata: [
                "tier": "\(descriptor.name)", "extents": "\(extents.count)",
            ])
        }
    }

    private func stripe(ofBlock block: Int) -> Int { (block / NVMeFormat.blockSize) % indexStripes.count }

    private func withIndexBlock<R>(_ block: Int, _ body: () -> R) -> R {
        indexStripes[stripe(ofBlock: block)].withLock { _ in body() }
    }

    /// Runs `body` holding the stripe locks of `blocks`, taken in ascending order.
    private func withIndexBlocks<R>(_ blocks: [Int], _ body: () -> R) -> R {
        let stripes = Array(Set(blocks.map(stripe(ofBlock:)))).sorted()
        func nest(_ remaining: ArraySlice<Int>) -> R {
            guard let first = remaining.first else { return body() }
            return indexStripes[first].withLock { _ in nest(remaining.dropFirst()) }
        }
        return nest(stripes[...])
    }

    /// Writes index blocks from the mirror in as few submissions as the ring allows (at most
    /// half its entries in flight); short writes and EINTR/EAGAIN are resubmitted. Returns 0 or
    /// the first errno. Always drains what it queued unless the ring itself fails (then the
    /// ring is broken and dropped by the pool).
    private func writeIndexBlocks(_ blocks: [Int], on context: URingContext) -> Int32 {
        var done = [Int](repeating: 0, count: blocks.count)
        var retries = [Int](repeating: 0, count: blocks.count)
        var failure: Int32 = 0
        var pending = 0
        var next = 0
        let limit = max(1, context.entries / 2)
        func queue(_ index: Int) -> Bool {
            let block = blocks[index]
            return context.prepareOrFlush(write: true, buffer: mirror.base + block + done[index],
                                          length: NVMeFormat.blockSize - done[index],
                                          offset: geometry.indexOffset + block + done[index], fixedBuffer: -1, tag: UInt64(index))
        }
        func fill() -> Bool {
            while pending < limit && next < blocks.count {
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
                var result = value
                if let faults, faults.isArmed { result = faults.apply(write: true, result: result) }
                switch result {
                case -EINTR, -EAGAIN:
                    retries[index] += 1
                    if retries[index] <= 64 {
                        if !queue(index) { ringFailed = true }
                        return
                    }
                    failure = -result
                case ..<0: failure = -result
                case 0: failure = EIO
                default:
                    done[index] += Int(result)
                    if done[index] < NVMeFormat.blockSize {
                        if !queue(index) { ringFailed = true }
                        return
                    }
                }
                pending -= 1
            }
            if ringFailed || !fill() { return EIO }
        }
        return failure
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

    // MARK: Open

    private static func chooseMode(requested: NVMePollMode?, directIO: Bool, fd: Int32, entries: Int,
                                   mirror: MappedRegion, name: String, logger: Logger) -> NVMePollMode
    {
        if let requested { return requested }
        guard directIO else { return .interrupt }
        // Probe IOPOLL with a real read of the superblock.
        let probe: Int32
        do {
            let context = try URingContext(entries: 8, mode: .iopoll, fd: fd, bounceBytes: NVMeFormat.blockSize, bounceCount: 1)
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

    /// Reads the superblock and index; recovers what verifies or formats the file.
    private static func openContents(fd: Int32, geometry: NVMeFormat.Geometry, mirror: MappedRegion, allocator: SlotAllocator,
                                     reformat: Bool, name: String, logger: Logger)
        throws(SpillwayError) -> (report: NVMeRecoveryReport, pages: [RecoveredPage], sequence: UInt64)
    {
        let block = UnsafeMutableRawPointer.allocate(byteCount: NVMeFormat.blockSize, alignment: NVMeFormat.blockSize)
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
        var existing: NVMeFormat.Geometry?
        if !reformat && (isBlockDevice || Int(stats.st_size) >= geometry.fileBytes) {
            if try preadFully(fd, block, NVMeFormat.blockSize, 0, name: name) {
                existing = NVMeFormat.decodeSuperblock(block)
            }
        }
        guard existing == geometry else {
            try format(fd: fd, geometry: geometry, isBlockDevice: isBlockDevice, block: block, name: name)
            if existing != nil {
                logger.warning("nvme file had another geometry; reformatted", metadata: ["tier": "\(name)"])
            }
            return (NVMeRecoveryReport(formatted: true, recovered: 0, discarded: 0), [], 0)
        }
        // Recover: read the whole index, then check each candidate's data.
        guard try preadFully(fd, mirror.base, geometry.indexBytes, geometry.indexOffset, name: name) else {
            throw .tierIO(tier: name, operation: "read index", errno: EIO)
        }
        var candidates: [(slot: UInt32, record: NVMeFormat.Record)] = []
        var discarded = 0
        var dirtyBlocks = Set<Int>()
        for slot in 0..<geometry.capacitySlots {
            let pointer = mirror.base + slot * NVMeFormat.recordSize
            if let record = NVMeFormat.Record.decode(pointer) {
                candidates.append((UInt32(slot), record))
            } else if pointer.load(as: UInt32.self) != 0 || pointer.load(fromByteOffset: 60, as: UInt32.self) != 0 {
                discarded += 1  // torn or foreign record
                memset(pointer, 0, NVMeFormat.recordSize)
                dirtyBlocks.insert(geometry.indexBlockOffset(ofSlot: UInt32(slot)))
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
            if valid {
                seen.insert(record.key)
                pages.append(RecoveredPage(key: record.key, extent: extent, length: Int(record.length), checksum: record.checksum))
            } else {
                discarded += 1
                memset(mirror.base + Int(slot) * NVMeFormat.recordSize, 0, NVMeFormat.recordSize)
                dirtyBlocks.insert(geometry.indexBlockOffset(ofSlot: slot))
            }
        }
        // Persist the cleanup so discarded records stay discarded.
        for offset in dirtyBlocks {
            guard pwrite(fd, mirror.base + offset, NVMeFormat.blockSize, off_t(geometry.indexOffset + offset)) == NVMeFormat.blockSize else {
                throw .tierIO(tier: name, operation: "rewrite index block", errno: errno)
            }
        }
        if discarded > 0 {
            logger.warning("nvme warm restart discarded pages that did not verify", metadata: [
                "tier": "\(name)", "recovered": "\(pages.count)", "discarded": "\(discarded)",
            ])
        }
        return (NVMeRecoveryReport(formatted: false, recovered: pages.count, discarded: discarded), pages, maxSequence)
    }

    private static func format(fd: Int32, geometry: NVMeFormat.Geometry, isBlockDevice: Bool,
                               block: UnsafeMutableRawPointer, name: String) throws(SpillwayError)
    {
        if !isBlockDevice {
            // Empty the file (so no stale index survives), then reserve the space up front: a
            // full filesystem is reported now, not as a failed write later.
            guard ftruncate(fd, 0) == 0, ftruncate(fd, off_t(geometry.fileBytes)) == 0 else {
                throw .tierIO(tier: name, operation: "ftruncate to \(geometry.fileBytes)", errno: errno)
            }
            let status = posix_fallocate(fd, 0, off_t(geometry.fileBytes))
            if status != 0 && status != EOPNOTSUPP && status != EINVAL {
                throw .tierIO(tier: name, operation: "reserve \(ByteCount.format(geometry.fileBytes))", errno: status)
            }
        } else {
            // A block device: zero the index region.
            let zeros = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: NVMeFormat.blockSize)
            defer { zeros.deallocate() }
            memset(zeros, 0, 1 << 20)
            var offset = 0
            while offset < geometry.indexBytes {
                let length = min(1 << 20, geometry.indexBytes - offset)
                guard pwrite(fd, zeros, length, off_t(geometry.indexOffset + offset)) == length else {
                    throw .tierIO(tier: name, operation: "zero index", errno: errno)
                }
                offset += length
            }
        }
        memset(block, 0, NVMeFormat.blockSize)
        var instance = timespec()
        clock_gettime(CLOCK_REALTIME, &instance)
        NVMeFormat.encodeSuperblock(geometry, instance: UInt64(instance.tv_sec) << 32 | UInt64(instance.tv_nsec), into: block)
        guard pwrite(fd, block, NVMeFormat.blockSize, 0) == NVMeFormat.blockSize else {
            throw .tierIO(tier: name, operation: "write superblock", errno: errno)
        }
    }

    /// `pread` until `count` bytes or end of file (false). EINTR retried; errors thrown.
    private static func preadFully(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int, _ offset: Int,
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
