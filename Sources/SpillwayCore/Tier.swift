import Atomics
import Dispatch

/// Contiguous slots of one tier: the unit of allocation and of I/O.
///
/// A page of `length` bytes occupies `ceil(length / slotSize)` contiguous slots; small KV blocks
/// take one slot, a weight tensor may take thousands.
public struct Extent: Hashable, Sendable, CustomStringConvertible {
    public var firstSlot: UInt32
    public var slotCount: UInt32

    @inlinable
    public init(firstSlot: UInt32, slotCount: UInt32) {
        self.firstSlot = firstSlot
        self.slotCount = slotCount
    }

    @inlinable public var endSlot: UInt32 { firstSlot + slotCount }
    public var description: String { "[\(firstSlot)..<\(endSlot))" }
}

/// What kind of medium a tier is; used for names, metrics labels and default policies.
public enum TierKind: String, Sendable, CaseIterable {
    case device
    case dram
    case nvme
    case remote
    case erasureCoded = "ec"
}

/// A tier's nominal latency/bandwidth class. Policies use it to order tiers and to decide
/// whether prefetching from it is worth the effort; benchmarks report what it really does.
public struct TierPerformanceClass: Sendable, Equatable {
    /// Typical latency of one slot-sized access, in nanoseconds.
    public var nominalLatencyNanoseconds: Int
    /// Typical sequential bandwidth in bytes per second.
    public var nominalBandwidthBytesPerSecond: Int

    public init(nominalLatencyNanoseconds: Int, nominalBandwidthBytesPerSecond: Int) {
        self.nominalLatencyNanoseconds = nominalLatencyNanoseconds
        self.nominalBandwidthBytesPerSecond = nominalBandwidthBytesPerSecond
    }

    public static let device = TierPerformanceClass(nominalLatencyNanoseconds: 200, nominalBandwidthBytesPerSecond: 1 << 40)
    public static let dram = TierPerformanceClass(nominalLatencyNanoseconds: 300, nominalBandwidthBytesPerSecond: 20 << 30)
    public static let remote = TierPerformanceClass(nominalLatencyNanoseconds: 20_000, nominalBandwidthBytesPerSecond: 3 << 30)
    public static let nvme = TierPerformanceClass(nominalLatencyNanoseconds: 80_000, nominalBandwidthBytesPerSecond: 2 << 30)
}

/// What the store needs to know about a tier; fixed for the tier's lifetime.
public struct TierDescriptor: Sendable, Equatable {
    /// Unique within a store; used in errors, logs and metric labels.
    public var name: String
    public var kind: TierKind
    /// Bytes per slot: the pool's slot size (4 KiB … 2 MiB, a power of two).
    public var slotSize: Int
    public var capacitySlots: Int
    public var performance: TierPerformanceClass
    /// Verify the CRC32C on every `get` served from this tier (not only on tier crossings).
    /// On by default for tiers below DRAM, whose bytes travel over a bus, a wire or a disk.
    public var verifiesReads: Bool
    /// Writes need the page's key and checksum in their `TierIO` (persistent tiers).
    public var recordsPageMetadata: Bool
    /// The tier completes every I/O on the submitting thread before `submit` returns (memory
    /// tiers). The batch then skips its atomic countdown and wake-up: on x86 that locked
    /// instruction would stall until the copy's stores drain, which is most of a 4 KiB put.
    public var completesInline: Bool

    public init(name: String, kind: TierKind, slotSize: Int, capacitySlots: Int,
                performance: TierPerformanceClass, verifiesReads: Bool, completesInline: Bool = false,
                recordsPageMetadata: Bool = false) {
        self.completesInline = completesInline
        self.recordsPageMetadata = recordsPageMetadata
        self.name = name
        self.kind = kind
        self.slotSize = slotSize
        self.capacitySlots = capacitySlots
        self.performance = performance
        self.verifiesReads = verifiesReads
    }

    public var capacityBytes: Int { capacitySlots * slotSize }
}

/// One transfer in a batch: `length` bytes between `buffer` and the start of `extent`.
public struct TierIO: Sendable {
    public enum Operation: UInt8, Sendable {
        /// Copy from the tier into `buffer`.
        case read
        /// Copy from `buffer` into the tier.
        case write
        /// The extent's contents are no longer needed (TRIM, remote release); `buffer` unused.
        case discard
    }

    public var operation: Operation
    public var extent: Extent
    /// Caller memory; must stay valid until the batch completes. For `.write` it is only read.
    /// Stored as a bit pattern so the struct stays `Sendable`; the batch owner guarantees
    /// exclusive use of the memory while the I/O is in flight.
    public var bufferAddress: UInt
    public var length: Int
    /// 0 on success, otherwise a POSIX errno. Written by the tier before it completes the I/O.
    public var status: Int32
    /// For writes: the page's key and CRC32C, which persistent tiers record with the bytes so a
    /// restarted process can find and verify them. Memory tiers ignore them.
    public var key: PageKey
    public var checksum: UInt32
    /// Filled by tiers that time their I/Os (NVMe): nanoseconds from submission to completion.
    public var latencyNanoseconds: UInt64
    /// For a read in a batch with `checksumsOnCompletion`: the CRC32C of the bytes read,
    /// computed by the tier as the read completed; `hasComputedChecksum` says it was.
    public var computedChecksum: UInt32
    public var hasComputedChecksum: Bool

    @inlinable
    public init(operation: Operation, extent: Extent, buffer: UnsafeRawPointer?, length: Int,
                key: PageKey = PageKey(0), checksum: UInt32 = 0) {
        self.operation = operation
        self.extent = extent
        self.bufferAddress = UInt(bitPattern: buffer)
        self.length = length
        self.status = 0
        self.key = key
        self.checksum = checksum
        self.latencyNanoseconds = 0
        self.computedChecksum = 0
        self.hasComputedChecksum = false
    }

    @inlinable
    public var buffer: UnsafeMutableRawPointer? { UnsafeMutableRawPointer(bitPattern: bufferAddress) }
}

/// A reusable, fixed-capacity batch of tier I/Os: the unit of submission and completion.
///
/// The submitter fills it, calls `Tier.submit`, then `wait()`. A tier completes each I/O
/// exactly once with `complete(_:status:)`, from any thread; the last completion wakes the
/// waiter. Tiers that complete inline (memory tiers, and the NVMe tier, which reaps its ring
/// on the submitting thread) skip the countdown and wake-up entirely; a socket transport will
/// complete from its event loop. Nothing here allocates after init.
///
/// `@unchecked Sendable`: between `submit` and the end of `wait()` the entries are owned by the
/// tier (each index written by exactly one completion, published by the release decrement of
/// `pending`); outside that window only the submitting thread touches them.
public final class TierBatch: @unchecked Sendable {
    public let capacity: Int
    @usableFromInline let entries: UnsafeMutablePointer<TierIO>
    public private(set) var count = 0
    /// At most this many of the batch's I/Os in flight at once (0: the tier's own limit). Tiers
    /// that queue (NVMe) keep the window full, refilling as I/Os complete, so a large batch runs
    /// at a sustained queue depth instead of draining in waves.
    public var maxInFlight = 0
    /// When set, an I/O a tier completes without timing it itself gets completion time −
    /// submission time as its latency (one clock read per I/O): what each page waited, not
    /// the batch's time divided evenly. The store sets it for its batch calls.
    public var timesCompletions = false
    /// When set, a tier that can checksums each I/O's buffer as it moves it: NVMe each
    /// successful read as it completes, while the batch's other reads are still in flight;
    /// a host-memory tier each write's source in the same pass as its copy. The store sets it
    /// on read batches of tiers that verify reads and on write batches of tiers that record no
    /// checksum, and computes what a tier left out (`hasComputedChecksum` false) itself.
    public var checksumsOnCompletion = false
    @usableFromInline var submittedAt: UInt64 = 0
    @usableFromInline let pending = ManagedAtomic<Int>(0)
    @usableFromInline let done = DispatchSemaphore(value: 0)
    /// Set by `beginSubmission(inline:)`; while set, completions count down `inlinePending`
    /// with plain arithmetic (only the submitting thread touches it).
    @usableFromInline var inline = false
    @usableFromInline var inlinePending = 0

    public init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
        entries = .allocate(capacity: capacity)
    }

    deinit { entries.deallocate() }

    public var isFull: Bool { count == capacity }

    /// Empties the batch for reuse. Must not be called while I/Os are in flight.
    @inlinable
    public func reset() {
        setCount(0)
        maxInFlight = 0
        timesCompletions = false
        checksumsOnCompletion = false
    }

    @usableFromInline func setCount(_ value: Int) { count = value }

    /// Appends an I/O and returns its index. Traps if the batch is full (a caller bug: batch
    /// sizes are fixed and checked by the caller).
    @discardableResult
    @inlinable
    public func append(_ io: TierIO) -> Int {
        precondition(count < capacity, "TierBatch overflow")
        (entries + count).initialize(to: io)
        setCount(count + 1)
        return count - 1
    }

    @inlinable
    public subscript(index: Int) -> TierIO {
        get {
            precondition(index >= 0 && index < count)
            return entries[index]
        }
    }

    /// Called by `Tier.submit` implementations once per I/O.
    @inlinable
    public func complete(_ index: Int, status: Int32) {
        entries[index].status = status
        stampCompletion(index)
        finishOne()
    }

    /// Records a status without completing the I/O (for tiers that complete after a sync).
    @inlinable
    public func setStatus(_ index: Int, _ status: Int32) { entries[index].status = status }

    /// Records the CRC32C of an I/O's buffer that the tier computed while moving it (a write
    /// into a host-memory tier checksums its source as it copies it).
    @inlinable
    public func setComputedChecksum(_ index: Int, _ checksum: UInt32) {
        entries[index].computedChecksum = checksum
        entries[index].hasComputedChecksum = true
    }

    /// A read just completed: with `checksumsOnCompletion`, records its bytes' CRC32C.
    @inlinable
    public func checksumCompletedRead(_ index: Int) {
        guard checksumsOnCompletion, entries[index].status == 0, let buffer = entries[index].buffer else { return }
        entries[index].computedChecksum = CRC32C.checksum(UnsafeRawBufferPointer(start: buffer, count: entries[index].length))
        entries[index].hasComputedChecksum = true
    }

    /// Records how long an I/O took (tiers that time their I/Os).
    @inlinable
    public func setLatency(_ index: Int, nanoseconds: UInt64) { entries[index].latencyNanoseconds = nanoseconds }

    /// Completes an I/O with the status already recorded (0 unless `setStatus` said otherwise).
    @inlinable
    public func finish(_ index: Int) {
        stampCompletion(index)
        finishOne()
    }

    /// The I/O's latency, if the batch is timed and the tier did not record one.
    @inlinable
    func stampCompletion(_ index: Int) {
        if timesCompletions && entries[index].latencyNanoseconds == 0 {
            entries[index].latencyNanoseconds = max(1, monotonicNanoseconds() &- submittedAt)
        }
    }

    @inlinable
    func finishOne() {
        if inline {
            inlinePending -= 1
        } else if pending.loadThenWrappingDecrement(ordering: .acquiringAndReleasing) == 1 {
            done.signal()
        }
    }

    /// Marks every I/O in flight; the store calls this right before `Tier.submit`. `inline`
    /// must match the tier's `completesInline`.
    @inlinable
    public func beginSubmission(inline: Bool = false) {
        for index in 0..<count {
            entries[index].status = 0
            entries[index].latencyNanoseconds = 0
            entries[index].hasComputedChecksum = false
        }
        if timesCompletions { submittedAt = monotonicNanoseconds() }
        self.inline = inline
        if inline {
            inlinePending = count
        } else {
            pending.store(count, ordering: .releasing)
            if count == 0 { done.signal() }
        }
    }

    /// Blocks until every I/O has completed.
    @inlinable
    public func wait() {
        if inline {
            precondition(inlinePending == 0, "a tier declared completesInline but left I/Os pending")
            inline = false
        } else {
            done.wait()
        }
    }

    /// Submits to `tier` and waits: the synchronous path used by the store.
    @inlinable
    public func run(on tier: any Tier, inline: Bool) {
        beginSubmission(inline: inline)
        tier.submit(self)
        wait()
    }

    /// The first failed I/O's index and errno, if any.
    public var firstFailure: (index: Int, status: Int32)? {
        for index in 0..<count where entries[index].status != 0 {
            return (index, entries[index].status)
        }
        return nil
    }
}

/// A level of the memory hierarchy: fixed capacity in slots, batched asynchronous I/O on
/// extents into caller-provided buffers.
///
/// Space is managed synchronously (`allocate`/`release` are bookkeeping on the tier's own slot
/// map); data moves asynchronously through `submit`, one batch at a time, so io_uring (NVMe),
/// a socket transport (remote) and an erasure-coded server group can all implement it with one
/// submission per batch and no allocation per page. The store holds tiers as class-bound
/// existentials (a pointer and a witness table: no boxing), and dispatches once per batch.
public protocol Tier: AnyObject, Sendable {
    var descriptor: TierDescriptor { get }

    /// Reserves `slotCount` contiguous slots; nil when no such run is free.
    func allocate(slotCount: Int) -> Extent?
    /// Returns an extent's slots to the free pool. The caller guarantees no I/O is in flight.
    func release(_ extent: Extent)
    /// Slots currently allocated.
    var usedSlots: Int { get }

    /// Starts every I/O in `batch`; each completes (possibly before this returns) through
    /// `batch.complete(_:status:)`. Lengths never exceed the extent's bytes (checked by the
    /// store; tiers assert it again).
    func submit(_ batch: TierBatch)

    /// For tiers whose slots are host memory: the slot arena (slot `i` starts at
    /// `i * slotSize`). The mapping is fixed for the tier's lifetime, so the store reads and
    /// writes it directly (memory-tier hits are one `memcpy`, moves skip staging). Whoever uses
    /// it keeps the tier alive and touches only extents it owns or holds a directory read on.
    /// Nil for tiers that are not host memory.
    var hostMemory: UnsafeMutableRawBufferPointer? { get }

    /// Pages found intact when a persistent tier was opened (warm restart); their slots are
    /// already allocated. The store makes them visible when it opens. Empty for volatile tiers.
    var recoveredPages: [RecoveredPage] { get }

    /// Makes every release so far durable (a persistent tier writes its pending empty index
    /// records now), so a page explicitly removed cannot be recovered after a crash.
    /// Volatile tiers have nothing to do.
    func persistReleases()

    /// The directory no longer points at `extent` (a newer version, a removal, a move or an
    /// eviction replaced it), though reads may still copy from it until `release`. A
    /// persistent tier stops treating the page there as current: it will not be recovered
    /// once `persistInvalidations(of:)` returned (or the tier journaled it on its own).
    /// Volatile tiers have nothing to do.
    func retire(_ extent: Extent)

    /// Like `retire`, for the current copy of `key` on this tier just before a put writes a
    /// new version of `key` to this same tier: a persistent tier journals the old copy's
    /// invalidation in the same append as the new copy's record (never before it, so a crash
    /// leaves one of the two).
    func retire(_ extent: Extent, supersededByNextRecordOf key: PageKey)

    /// Makes every retirement or release of a page of `key` durable before returning, so a
    /// warm restart cannot bring back a version the store has superseded. Returns 0 or the
    /// errno of the failed journal write. Volatile tiers return 0 at once.
    func persistInvalidations(of key: PageKey) -> Int32

    /// Releases the tier's resources. Further I/O completes with `ESHUTDOWN`.
    func close()
}

/// A tier that may have to give up part of its slot space while pages live there: the remote
/// tier, when a daemon reclaims a slab and no other daemon has room for its pages. The store
/// installs a handler that moves every page stored in a slot range to another tier and
/// returns how many pages it could not move.
public protocol EvacuatingTier: Tier {
    func setEvacuationHandler(_ handler: @escaping @Sendable (_ slots: Range<Int>) -> Int)
}

/// A page a persistent tier recovered at open: where it is and what it must verify to.
public struct RecoveredPage: Sendable, Equatable {
    public var key: PageKey
    public var extent: Extent
    public var length: Int
    public var checksum: UInt32

    public init(key: PageKey, extent: Extent, length: Int, checksum: UInt32) {
        self.key = key
        self.extent = extent
        self.length = length
        self.checksum = checksum
    }
}

extension Tier {
    public var hostMemory: UnsafeMutableRawBufferPointer? { nil }

    public var recoveredPages: [RecoveredPage] { [] }

    public func persistReleases() {}

    public func retire(_ extent: Extent) {}

    public func retire(_ extent: Extent, supersededByNextRecordOf key: PageKey) {}

    public func persistInvalidations(of key: PageKey) -> Int32 { 0 }

    public var freeSlots: Int { descriptor.capacitySlots - usedSlots }

    /// Slots needed for a page of `length` bytes (at least one, so empty pages have a home).
    @inlinable
    public func slotsNeeded(forLength length: Int) -> Int {
        let slotSize = descriptor.slotSize
        return max(1, (length + slotSize - 1) / slotSize)
    }
}
