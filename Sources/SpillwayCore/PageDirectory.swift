import Atomics
import Synchronization

/// A page's place in the hierarchy: which tier, which slots.
public struct PageLocation: Sendable, Equatable, CustomStringConvertible {
    public var tier: Int
    public var extent: Extent

    public init(tier: Int, extent: Extent) {
        self.tier = tier
        self.extent = extent
    }

    public var description: String { "tier \(tier) \(extent)" }
}

/// A consistent copy of one directory entry, taken under its shard lock.
public struct PageSnapshot: Sendable, Equatable {
    public var key: PageKey
    public var location: PageLocation
    public var length: Int
    public var checksum: UInt32
    /// Globally unique and increasing: a new `put` of the same key gets a new version, so a
    /// snapshot never matches an entry it was not taken from.
    public var version: UInt64
    public var pinCount: UInt32
    public var stats: PageAccessStats
    @usableFromInline var shard: UInt32
    @usableFromInline var record: UInt32
}

/// The page directory: a concurrent map from key to location, length, CRC32C, version, pin
/// count and access statistics.
///
/// Sharded 64 ways by the key's mixed hash; each shard is an open-addressing table (linear
/// probing, backward-shift deletion, load ≤ 1/2) over a fixed array of records, all allocated at
/// init, so no operation allocates. Records have stable indices, which lets two per-slot side
/// tables live outside the shard locks:
/// - the owner map (tier, first slot) → record, scanned by reclaim to find candidates;
/// - reader counts (tier, first slot), so an extent is never released (and reused) while a read
///   or move of it is in flight. Counts are only raised under the shard lock while the directory
///   still points at the extent, so once an entry is replaced, waiting for zero is enough.
///
/// Visibility rule: an entry is inserted only after its bytes are complete on its tier
/// (`insert` is called by the store after the write completed), so a failed or in-progress
/// store is never visible.
public final class PageDirectory: Sendable {
    public static let shardCount = 64
    @usableFromInline static let shardShift: UInt64 = 58

    private let shards: [LockedShard]
    private let slotTables: [SlotSideTable]
    private let versionClock = ManagedAtomic<UInt64>(0)
    private let accessClock = ManagedAtomic<UInt64>(0)
    private let pagesPerTier: [ManagedAtomic<Int>]
    private let scanCursors: [ManagedAtomic<Int>]

    /// - Parameter tierCapacities: slots per tier, in tier order. The directory can hold as
    ///   many pages as there are slots, spread over shards with generous slack.
    public init(tierCapacities: [Int]) {
        let totalSlots = tierCapacities.reduce(0, +)
        // Per-shard capacity: the mean plus 25% plus a constant. Keys are hashed with a
        // finalizer, so a shard beyond this is a ~10-sigma event; it reports `storeFull`.
        let mean = (totalSlots + Self.shardCount - 1) / Self.shardCount
        let perShard = mean + mean / 4 + 256
        shards = (0..<Self.shardCount).map { _ in LockedShard(recordCapacity: perShard) }
        slotTables = tierCapacities.map { SlotSideTable(capacity: $0) }
        pagesPerTier = tierCapacities.map { _ in ManagedAtomic(0) }
        scanCursors = tierCapacities.map { _ in ManagedAtomic(0) }
    }

    public var tierCount: Int { slotTables.count }

    /// Advances and returns the access clock (used for LRU and for tests).
    @inlinable
    public func tick() -> UInt64 { nextTick() }

    @usableFromInline func nextTick() -> UInt64 {
        accessClock.loadThenWrappingIncrement(ordering: .relaxed) &+ 1
    }

    public var now: UInt64 { accessClock.load(ordering: .relaxed) }

    public func pageCount(tier: Int) -> Int { pagesPerTier[tier].load(ordering: .relaxed) }

    // MARK: Lookup

    /// The current entry for `key`, without side effects.
    public func snapshot(of key: PageKey) -> PageSnapshot? {
        let hash = key.mixedHash
        let shard = Self.shardIndex(hash)
        return shards[shard].table.withLock { table in
            table.find(key, hash: hash).map { table.snapshot(shard: shard, record: $0) }
        }
    }

    public func contains(_ key: PageKey) -> Bool {
        let hash = key.mixedHash
        return shards[Self.shardIndex(hash)].table.withLock { $0.find(key, hash: hash) != nil }
    }

    /// Looks `key` up for reading: records the access and holds a reader count on the extent
    /// so it cannot be released until `endRead`. Returns nil for unknown keys.
    public func beginRead(_ key: PageKey) -> PageSnapshot? {
        let hash = key.mixedHash
        let shard = Self.shardIndex(hash)
        let tick = nextTick()
        return shards[shard].table.withLock { table -> PageSnapshot? in
            guard let record = table.find(key, hash: hash) else { return nil }
            table.touch(record, tick: tick)
            let snapshot = table.snapshot(shard: shard, record: record)
            slotTables[snapshot.location.tier].acquireReader(snapshot.location.extent.firstSlot)
            return snapshot
        }
    }

    /// Ends a read started by `beginRead` or `beginMove`.
    @inlinable
    public func endRead(_ snapshot: PageSnapshot) {
        releaseReader(snapshot.location)
    }

    @usableFromInline func releaseReader(_ location: PageLocation) {
        slotTables[location.tier].releaseReader(location.extent.firstSlot)
    }

    /// Blocks (yielding) until no read of `location` is in flight. Only valid once the directory
    /// no longer points at `location`, so no new reader can appear.
    public func waitForReaders(_ location: PageLocation) {
        slotTables[location.tier].waitForNoReaders(location.extent.firstSlot)
    }

    // MARK: Mutation

    /// Makes a completely written page visible. Returns the entry it replaced, whose extent the
    /// caller must release once `waitForReaders` returns. Throws `pagePinned` (and changes
    /// nothing) if the key exists and is pinned, `storeFull` if the shard has no free record.
    public func insert(_ key: PageKey, location: PageLocation, length: Int, checksum: UInt32)
        throws(SpillwayError) -> PageSnapshot?
    {
        precondition(location.tier < slotTables.count, "tier \(location.tier) out of range")
        precondition(Int(location.extent.endSlot) <= slotTables[location.tier].capacity, "extent beyond tier")
        let hash = key.mixedHash
        let shard = Self.shardIndex(hash)
        let version = versionClock.loadThenWrappingIncrement(ordering: .relaxed) &+ 1
        let tick = nextTick()
        let result: Result<PageSnapshot?, SpillwayError> = shards[shard].table.withLock { table in
            var replaced: PageSnapshot?
            let record: UInt32
            if let existing = table.find(key, hash: hash) {
                guard table.records[Int(existing)].pinCount == 0 else { return .failure(.pagePinned(key)) }
                replaced = table.snapshot(shard: shard, record: existing)
                record = existing
            } else {
                guard let fresh = table.insertKey(key, hash: hash) else {
                    return .failure(.storeFull(requiredSlots: Int(location.extent.slotCount)))
                }
                record = fresh
            }
            table.records[Int(record)] = PageRecord(
                key: key, length: length, extent: location.extent, version: version,
                insertTick: tick, lastAccessTick: tick, accessCount: 0, checksum: checksum,
                pinCount: 0, tier: UInt8(location.tier), moving: false)
            if let replaced { slotTables[replaced.location.tier].clearOwner(replaced.location.extent.firstSlot) }
            slotTables[location.tier].setOwner(location.extent.firstSlot, shard: shard, record: record)
            return .success(replaced)
        }
        let replaced = try result.get()
        pagesPerTier[location.tier].wrappingIncrement(ordering: .relaxed)
        if let replaced { pagesPerTier[replaced.location.tier].wrappingDecrement(ordering: .relaxed) }
        return replaced
    }

    /// Removes `key`. Returns the removed entry (release its extent after `waitForReaders`),
    /// nil if absent; throws `pagePinned` if pinned.
    public func remove(_ key: PageKey) throws(SpillwayError) -> PageSnapshot? {
        let hash = key.mixedHash
        let shard = Self.shardIndex(hash)
        let result: Result<PageSnapshot?, SpillwayError> = shards[shard].table.withLock { table in
            guard let record = table.find(key, hash: hash) else { return .success(nil) }
            guard table.records[Int(record)].pinCount == 0 else { return .failure(.pagePinned(key)) }
            return .success(removeLocked(&table, shard: shard, record: record, hash: hash))
        }
        return try result.get()
    }

    /// Removes the entry only if it is still exactly `snapshot`'s version at the same location
    /// (and, when
    /// `requireUnpinned`, not pinned). Used by eviction and by corruption quarantine.
    public func removeIfCurrent(_ snapshot: PageSnapshot, requireUnpinned: Bool) -> Bool {
        let hash = snapshot.key.mixedHash
        let shard = Self.shardIndex(hash)
        return shards[shard].table.withLock { table in
            guard let record = table.find(snapshot.key, hash: hash),
                  table.records[Int(record)].version == snapshot.version,
                  Int(table.records[Int(record)].tier) == snapshot.location.tier,
                  table.records[Int(record)].extent == snapshot.location.extent,
                  !requireUnpinned || table.records[Int(record)].pinCount == 0
            else { return false }
            _ = removeLocked(&table, shard: shard, record: record, hash: hash)
            return true
        }
    }

    private func removeLocked(_ table: inout ShardTable, shard: Int, record: UInt32, hash: UInt64) -> PageSnapshot {
        let removed = table.snapshot(shard: shard, record: record)
        slotTables[removed.location.tier].clearOwner(removed.location.extent.firstSlot)
        table.deleteKey(removed.key, hash: hash)
        pagesPerTier[removed.location.tier].wrappingDecrement(ordering: .relaxed)
        return removed
    }

    /// Pins `key`: it will not be moved, evicted, overwritten or removed until unpinned.
    /// Pins nest. Returns the pinned entry.
    @discardableResult
    public func pin(_ key: PageKey) throws(SpillwayError) -> PageSnapshot {
        let hash = key.mixedHash
        let shard = Self.shardIndex(hash)
        let result: Result<PageSnapshot, SpillwayError> = shards[shard].table.withLock { table in
            guard let record = table.find(key, hash: hash) else { return .failure(.unknownKey(key)) }
            table.records[Int(record)].pinCount += 1
            return .success(table.snapshot(shard: shard, record: record))
        }
        return try result.get()
    }

    public func unpin(_ key: PageKey) throws(SpillwayError) {
        let hash = key.mixedHash
        let result: Result<Void, SpillwayError> = shards[Self.shardIndex(hash)].table.withLock { table in
            guard let record = table.find(key, hash: hash) else { return .failure(.unknownKey(key)) }
            guard table.records[Int(record)].pinCount > 0 else { return .failure(.notPinned(key)) }
            table.records[Int(record)].pinCount -= 1
            return .success(())
        }
        try result.get()
    }

    // MARK: Moves between tiers

    /// Claims the entry `key` for a move if it is unpinned, not already moving, and (when
    /// `fromTier` is given) on that tier. Holds a reader count on the source extent; finish
    /// with `commitMove` or `abortMove`.
    public func beginMove(_ key: PageKey, fromTier: Int? = nil) -> PageSnapshot? {
        let hash = key.mixedHash
        let shard = Self.shardIndex(hash)
        return shards[shard].table.withLock { table -> PageSnapshot? in
            guard let record = table.find(key, hash: hash) else { return nil }
            let entry = table.records[Int(record)]
            guard entry.pinCount == 0, !entry.moving, fromTier == nil || Int(entry.tier) == fromTier else { return nil }
            table.records[Int(record)].moving = true
            let snapshot = table.snapshot(shard: shard, record: record)
            slotTables[snapshot.location.tier].acquireReader(snapshot.location.extent.firstSlot)
            return snapshot
        }
    }

    /// Points the entry at `destination` if it is still `snapshot`'s version and unpinned.
    /// On success the caller waits for readers of the old location and releases it; on failure
    /// the caller releases `destination`. Either way the move's reader count is dropped.
    public func commitMove(_ snapshot: PageSnapshot, to destination: PageLocation) -> Bool {
        let hash = snapshot.key.mixedHash
        let committed = shards[Int(snapshot.shard)].table.withLock { table -> Bool in
            guard let record = table.find(snapshot.key, hash: hash) else { return false }
            let entry = table.records[Int(record)]
            guard entry.version == snapshot.version else { return false }
            table.records[Int(record)].moving = false
            guard entry.pinCount == 0 else { return false }
            table.records[Int(record)].tier = UInt8(destination.tier)
            table.records[Int(record)].extent = destination.extent
            slotTables[snapshot.location.tier].clearOwner(snapshot.location.extent.firstSlot)
            slotTables[destination.tier].setOwner(destination.extent.firstSlot, shard: Int(snapshot.shard), record: record)
            return true
        }
        releaseReader(snapshot.location)
        if committed {
            pagesPerTier[destination.tier].wrappingIncrement(ordering: .relaxed)
            pagesPerTier[snapshot.location.tier].wrappingDecrement(ordering: .relaxed)
        }
        return committed
    }

    /// Gives up a claimed move; the entry stays where it was.
    public func abortMove(_ snapshot: PageSnapshot) {
        let hash = snapshot.key.mixedHash
        shards[Int(snapshot.shard)].table.withLock { table in
            if let record = table.find(snapshot.key, hash: hash),
               table.records[Int(record)].version == snapshot.version {
                table.records[Int(record)].moving = false
            }
        }
        releaseReader(snapshot.location)
    }

    // MARK: Reclaim candidates

    /// The `count` coldest movable pages on `tier` by `policy`, looking at no more than
    /// `window` resident pages starting from a rotating cursor. With `window` ≥ the tier's
    /// page count the choice is exact; smaller windows bound the cost of on-demand eviction.
    public func coldestPages(tier: Int, count: Int, window: Int, policy: some PlacementPolicy) -> [PageKey] {
        guard count > 0 else { return [] }
        let table = slotTables[tier]
        let capacity = table.capacity
        guard capacity > 0 else { return [] }
        let now = self.now
        var heap = BoundedMaxHeap(capacity: count)
        var start = scanCursors[tier].load(ordering: .relaxed) % capacity
        var examined = 0
        var slot = start
        for _ in 0..<capacity {
            if let owner = table.owner(UInt32(slot)) {
                let candidate: (PageKey, UInt64)? = shards[owner.shard].table.withLock { shardTable in
                    let entry = shardTable.records[Int(owner.record)]
                    guard shardTable.isLive(owner.record), Int(entry.tier) == tier,
                          entry.extent.firstSlot == UInt32(slot), entry.pinCount == 0, !entry.moving
                    else { return nil }
                    return (entry.key, policy.retentionScore(entry.stats, now: now))
                }
                if let (key, score) = candidate {
                    heap.offer(score: score, key: key)
                    examined += 1
                    if examined >= window { start = slot + 1; break }
                }
            }
            slot += 1
            if slot == capacity { slot = 0 }
            start = slot
        }
        scanCursors[tier].store(start, ordering: .relaxed)
        return heap.keysColdestFirst()
    }

    /// Every visible page (tests, tools). Takes each shard lock in turn.
    public func allPages() -> [PageSnapshot] {
        var pages: [PageSnapshot] = []
        for shard in 0..<shards.count {
            shards[shard].table.withLock { table in
                for record in 0..<table.highWater where table.isLive(UInt32(record)) {
                    pages.append(table.snapshot(shard: shard, record: UInt32(record)))
                }
            }
        }
        return pages
    }

    @inlinable
    static func shardIndex(_ hash: UInt64) -> Int { Int(truncatingIfNeeded: hash >> shardShift) }
}

// MARK: - Shard internals

/// A shard table behind its lock (a class so the directory can keep them in an array).
final class LockedShard: Sendable {
    let table: Mutex<ShardTable>
    init(recordCapacity: Int) { table = Mutex(ShardTable(recordCapacity: recordCapacity)) }
}

struct PageRecord {
    var key: PageKey
    var length: Int
    var extent: Extent
    var version: UInt64
    var insertTick: UInt64
    var lastAccessTick: UInt64
    var accessCount: UInt32
    var checksum: UInt32
    var pinCount: UInt32
    var tier: UInt8
    var moving: Bool

    var stats: PageAccessStats {
        PageAccessStats(lastAccessTick: lastAccessTick, insertTick: insertTick, accessCount: accessCount, length: length)
    }
}

/// One shard: an open-addressing table of (hash tag, record index) over a fixed record array.
struct ShardTable: ~Copyable {
    /// Bucket = hash tag (low 32 bits of the key hash) << 32 | (record index + 1); 0 = empty.
    let buckets: UnsafeMutablePointer<UInt64>
    let bucketMask: Int
    let records: UnsafeMutablePointer<PageRecord>
    /// `records[i]` is live iff `live[i]`.
    let live: UnsafeMutablePointer<Bool>
    let recordCapacity: Int
    /// Records `0..<highWater` have been handed out at least once; freed ones form a stack.
    var highWater = 0
    let freeStack: UnsafeMutablePointer<UInt32>
    var freeCount = 0

    init(recordCapacity: Int) {
        self.recordCapacity = recordCapacity
        var bucketCount = 16
        while bucketCount < recordCapacity * 2 { bucketCount <<= 1 }
        bucketMask = bucketCount - 1
        buckets = .allocate(capacity: bucketCount)
        buckets.initialize(repeating: 0, count: bucketCount)
        records = .allocate(capacity: recordCapacity)
        live = .allocate(capacity: recordCapacity)
        live.initialize(repeating: false, count: recordCapacity)
        freeStack = .allocate(capacity: recordCapacity)
    }

    deinit {
        buckets.deallocate()
        records.deallocate()
        live.deallocate()
        freeStack.deallocate()
    }

    @inline(__always)
    static func tag(_ hash: UInt64) -> UInt64 { hash & 0xFFFF_FFFF }

    func isLive(_ record: UInt32) -> Bool { Int(record) < highWater && live[Int(record)] }

    func find(_ key: PageKey, hash: UInt64) -> UInt32? {
        let tag = Self.tag(hash)
        var index = Int(tag) & bucketMask
        while true {
            let bucket = buckets[index]
            if bucket == 0 { return nil }
            if bucket >> 32 == tag {
                let record = UInt32(truncatingIfNeeded: bucket) - 1
                if records[Int(record)].key == key {
                    assert(live[Int(record)], "bucket points at a dead record")
                    return record
                }
            }
            index = (index + 1) & bucketMask
        }
    }

    /// Adds `key` (known absent) and returns its new record index, nil when out of records.
    mutating func insertKey(_ key: PageKey, hash: UInt64) -> UInt32? {
        let record: UInt32
        if freeCount > 0 {
            freeCount -= 1
            record = freeStack[freeCount]
        } else if highWater < recordCapacity {
            record = UInt32(highWater)
            highWater += 1
        } else {
            return nil
        }
        let tag = Self.tag(hash)
        var index = Int(tag) & bucketMask
        while buckets[index] != 0 { index = (index + 1) & bucketMask }
        buckets[index] = tag << 32 | UInt64(record + 1)
        // Placeholder key so `find` matches before the caller fills the record in.
        (records + Int(record)).initialize(to: PageRecord(
            key: key, length: 0, extent: Extent(firstSlot: 0, slotCount: 0), version: 0,
            insertTick: 0, lastAccessTick: 0, accessCount: 0, checksum: 0, pinCount: 0, tier: 0, moving: false))
        live[Int(record)] = true
        return record
    }

    /// Removes `key` (known present) with backward-shift deletion: no tombstones, so probe
    /// lengths never degrade over time.
    mutating func deleteKey(_ key: PageKey, hash: UInt64) {
        let tag = Self.tag(hash)
        var hole = Int(tag) & bucketMask
        var record: UInt32 = 0
        while true {
            let bucket = buckets[hole]
            precondition(bucket != 0, "deleteKey of an absent key")
            if bucket >> 32 == tag {
                record = UInt32(truncatingIfNeeded: bucket) - 1
                if records[Int(record)].key == key { break }
            }
            hole = (hole + 1) & bucketMask
        }
        var next = hole
        while true {
            next = (next + 1) & bucketMask
            let bucket = buckets[next]
            if bucket == 0 { break }
            let home = Int(bucket >> 32) & bucketMask
            // Move `next` into the hole unless its home lies cyclically in (hole, next].
            let stays = hole <= next ? (hole < home && home <= next) : (hole < home || home <= next)
            if stays { continue }
            buckets[hole] = bucket
            hole = next
        }
        buckets[hole] = 0
        live[Int(record)] = false
        freeStack[freeCount] = record
        freeCount += 1
    }

    mutating func touch(_ record: UInt32, tick: UInt64) {
        records[Int(record)].lastAccessTick = tick
        let count = records[Int(record)].accessCount
        if count != .max { records[Int(record)].accessCount = count + 1 }
    }

    func snapshot(shard: Int, record: UInt32) -> PageSnapshot {
        let entry = records[Int(record)]
        return PageSnapshot(
            key: entry.key, location: PageLocation(tier: Int(entry.tier), extent: entry.extent),
            length: entry.length, checksum: entry.checksum, version: entry.version,
            pinCount: entry.pinCount, stats: entry.stats, shard: UInt32(shard), record: record)
    }
}

/// Per-slot side tables of one tier: owner (for reclaim scans) and in-flight reader counts.
/// Plain atomics, so reclaim scans and reads can consult them without the shard lock.
///
/// `@unchecked Sendable`: the two pointers are set once in init and freed in deinit; every
/// access to the memory they point at goes through `UnsafeAtomic`.
final class SlotSideTable: @unchecked Sendable {
    let capacity: Int
    private let owners: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    private let readers: UnsafeMutablePointer<UnsafeAtomic<UInt32>.Storage>

    init(capacity: Int) {
        self.capacity = capacity
        owners = .allocate(capacity: max(1, capacity))
        owners.initialize(repeating: .init(0), count: max(1, capacity))
        readers = .allocate(capacity: max(1, capacity))
        readers.initialize(repeating: .init(0), count: max(1, capacity))
    }

    deinit {
        owners.deallocate()
        readers.deallocate()
    }

    private func ownerCell(_ slot: UInt32) -> UnsafeAtomic<UInt64> {
        precondition(Int(slot) < capacity)
        return UnsafeAtomic(at: owners + Int(slot))
    }

    private func readerCell(_ slot: UInt32) -> UnsafeAtomic<UInt32> {
        precondition(Int(slot) < capacity)
        return UnsafeAtomic(at: readers + Int(slot))
    }

    func setOwner(_ slot: UInt32, shard: Int, record: UInt32) {
        let previous = ownerCell(slot).exchange(UInt64(shard) << 32 | UInt64(record + 1), ordering: .relaxed)
        assert(previous == 0, "slot \(slot) already owned")
    }

    func clearOwner(_ slot: UInt32) { ownerCell(slot).store(0, ordering: .relaxed) }

    func owner(_ slot: UInt32) -> (shard: Int, record: UInt32)? {
        let value = ownerCell(slot).load(ordering: .relaxed)
        guard value != 0 else { return nil }
        return (Int(value >> 32), UInt32(truncatingIfNeeded: value) - 1)
    }

    func acquireReader(_ slot: UInt32) { readerCell(slot).wrappingIncrement(ordering: .relaxed) }

    func releaseReader(_ slot: UInt32) {
        let previous = readerCell(slot).loadThenWrappingDecrement(ordering: .releasing)
        precondition(previous > 0, "reader count underflow on slot \(slot)")
    }

    func waitForNoReaders(_ slot: UInt32) {
        var spins = 0
        while readerCell(slot).load(ordering: .acquiring) != 0 {
            spins += 1
            if spins > 64 { sched_yield_portable() }
        }
    }
}

#if canImport(Glibc)
import Glibc
@inline(__always) func sched_yield_portable() { sched_yield() }
#else
import Darwin
@inline(__always) func sched_yield_portable() { sched_yield() }
#endif

/// Keeps the `capacity` lowest-scored keys seen (a max-heap on score; the root is evicted).
struct BoundedMaxHeap {
    private var items: [(score: UInt64, key: PageKey)] = []
    let capacity: Int

    init(capacity: Int) {
        self.capacity = capacity
        items.reserveCapacity(min(capacity, 1 << 16))
    }

    mutating func offer(score: UInt64, key: PageKey) {
        if items.count < capacity {
            items.append((score, key))
            siftUp(items.count - 1)
        } else if let root = items.first, score < root.score {
            items[0] = (score, key)
            siftDown(0)
        }
    }

    func keysColdestFirst() -> [PageKey] {
        items.sorted { $0.score < $1.score }.map(\.key)
    }

    private mutating func siftUp(_ index: Int) {
        var child = index
        while child > 0 {
            let parent = (child - 1) / 2
            guard items[child].score > items[parent].score else { return }
            items.swapAt(child, parent)
            child = parent
        }
    }

    private mutating func siftDown(_ index: Int) {
        var parent = index
        while true {
            let left = 2 * parent + 1
            let right = left + 1
            var largest = parent
            if left < items.count, items[left].score > items[largest].score { largest = left }
            if right < items.count, items[right].score > items[largest].score { largest = right }
            if largest == parent { return }
            items.swapAt(parent, largest)
            parent = largest
        }
    }
}
