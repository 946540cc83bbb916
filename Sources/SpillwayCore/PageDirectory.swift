import Atomics

#if canImport(Glibc)
import Glibc
#endif

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
    /// snapshot never matches an entry it was not taken from. Moves keep the version.
    public var version: UInt64
    public var pinCount: Int
    /// The class and hints the page was stored with.
    public var hints: PageHints
    /// Quarantined (failed its checksum while pinned): never served.
    public var isCorrupt: Bool
}

/// The page directory: a concurrent map from key to location, length, CRC32C, version, pin
/// count and access statistics.
///
/// Sharded 64 ways by the key's mixed hash. Each shard is an open-addressing table (linear
/// probing, backward-shift deletion, load ≤ 7/8) whose entries are exactly one cache line and
/// hold everything a `get` needs, so a lookup touches one line. Tables live in huge-page
/// mappings allocated at init; no operation allocates.
///
/// **Readers and reuse.** A read (`beginRead` … `endRead`) holds a count on the entry. When the
/// entry is replaced, removed or moved while reads of its old location are in flight, the old
/// location moves to the shard's small retired list with that count, and whoever drops the last
/// count gets the location back to release. So an extent is never reused while someone still
/// copies from it, and nobody spins waiting for readers.
///
/// **Visibility.** An entry is inserted only after its bytes are complete on its tier (the
/// store calls `insert` after the write completed), so a failed or in-progress store is never
/// visible.
///
/// **Optimistic reads** (`optimisticRead`): each shard has a sequence count, odd while a
/// change to its table is under way and bumped twice per change (a seqlock). A reader takes
/// the count, finds and copies the entry and its bytes without the lock, then checks that the
/// count did not move: an extent is only released after a change to its entry (replace,
/// remove, move), which bumps the count first, so an unchanged count proves the bytes copied
/// were the entry's all along. A moved count means: try again, then take the locked path.
/// A hit takes no lock and writes no entry; its only shared writes are two relaxed increments
/// of its shard's read counters (one line per shard and tier).
/// Racy reads of an entry are bounds-checked before use (a torn extent never leaves the
/// tier's memory) and thrown away when the count moved.
///
/// `@unchecked Sendable`: the shard mutexes and tables live in raw memory allocated in init and
/// freed in deinit (so a lookup pays no reference counting); each table is only touched inside
/// `withShard`, under its mutex. Clocks and counters are atomics.
public final class PageDirectory: @unchecked Sendable {
    public static let shardCount = 64
    @usableFromInline static let shardShift: UInt64 = 58

    private let shardMutexes: UnsafeMutablePointer<pthread_mutex_t>
    /// Per shard, its seqlock count (see *Optimistic reads*), one per cache line so readers of
    /// one shard never share a line with another shard's writer.
    private let shardSequences: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    /// Per shard and tier, reads served by the optimistic path and their bytes (atomics: those
    /// reads hold no lock), at `(shard * tiers + tier) * 8` (one line per shard and tier).
    private let optimisticCounts: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>
    private static let sequenceStride = 8
    private let shardTables: UnsafeMutablePointer<ShardTable>
    private let tableRegion: MappedRegion
    private let tierCapacities: [Int]
    private let versionClock = UnsafeAtomic<UInt64>.create(0)
    private let pagesPerTier: [ManagedAtomic<Int>]

    /// - Parameter tierCapacities: slots per tier, in tier order. The directory can hold one
    ///   page per slot, spread over shards with generous slack.
    public init(tierCapacities: [Int]) throws(SystemCallError) {
        let totalSlots = tierCapacities.reduce(0, +)
        let mean = (totalSlots + Self.shardCount - 1) / Self.shardCount
        // Entries per shard: a power of two ≥ 1.5× the mean + 64; a shard refuses inserts past
        // 7/8 full (a ~10-sigma imbalance for hashed keys), reported as `storeFull`.
        var entries = 64
        while entries < mean + mean / 2 + 64 { entries <<= 1 }
        // One mapping for every shard's entries: as a whole it spans whole 2 MiB huge pages,
        // where 64 small mappings would each stay on 4 KiB pages (a TLB miss per lookup).
        let shardBytes = entries * MemoryLayout<PageEntry>.stride
        tableRegion = try MappedRegion(byteCount: shardBytes * Self.shardCount, prefault: false)
        shardMutexes = .allocate(capacity: Self.shardCount)
        shardSequences = .allocate(capacity: Self.shardCount * Self.sequenceStride)
        shardSequences.initialize(repeating: UnsafeAtomic<UInt64>.Storage(0), count: Self.shardCount * Self.sequenceStride)
        optimisticCounts = .allocate(capacity: Self.shardCount * max(1, tierCapacities.count) * 8)
        optimisticCounts.initialize(repeating: UnsafeAtomic<Int>.Storage(0), count: Self.shardCount * max(1, tierCapacities.count) * 8)
        shardTables = .allocate(capacity: Self.shardCount)
        for index in 0..<Self.shardCount {
            (shardMutexes + index).initialize(to: pthread_mutex_t())
            pthread_mutex_init(shardMutexes + index, nil)
            let base = (tableRegion.base + index * shardBytes).bindMemory(to: PageEntry.self, capacity: entries)
            (shardTables + index).initialize(to: ShardTable(entries: base, entryCount: entries, tierCount: tierCapacities.count))
        }
        self.tierCapacities = tierCapacities
        pagesPerTier = tierCapacities.map { _ in ManagedAtomic(0) }
    }

    public var tierCount: Int { tierCapacities.count }

    public func pageCount(tier: Int) -> Int { pagesPerTier[tier].load(ordering: .relaxed) }

    @inline(__always)
    static func shardIndex(_ hash: UInt64) -> Int { Int(truncatingIfNeeded: hash >> shardShift) }

    deinit {
        for index in 0..<Self.shardCount {
            (shardTables + index).deinitialize(count: 1)
            pthread_mutex_destroy(shardMutexes + index)
        }
        shardTables.deallocate()
        shardMutexes.deallocate()
        shardSequences.deallocate()
        optimisticCounts.deallocate()
        versionClock.destroy()
    }

    /// Shard `shard`'s counters of optimistic reads served from `tier`, and their bytes.
    @inline(__always)
    private func optimisticCounters(shard: Int, tier: Int) -> (reads: UnsafeAtomic<Int>, bytes: UnsafeAtomic<Int>) {
        let line = optimisticCounts + (shard * tierCapacities.count + tier) * 8
        return (UnsafeAtomic(at: line), UnsafeAtomic(at: line + 1))
    }

    @inline(__always)
    private func sequence(_ shard: Int) -> UnsafeAtomic<UInt64> { UnsafeAtomic(at: shardSequences + shard * Self.sequenceStride) }

    /// Runs `body` on shard `index`'s table under its mutex (a pthread mutex, like `Locked`,
    /// so ThreadSanitizer sees the ordering). A body that may change an entry's key, place,
    /// length or flags (`mutates`, the default) runs inside the shard's seqlock write, so
    /// optimistic readers notice; only bodies that touch nothing they read pass false.
    @inline(__always)
    private func withShard<R>(index: Int, mutates: Bool = true, _ body: (inout ShardTable) -> R) -> R {
        pthread_mutex_lock(shardMutexes + index)
        defer { pthread_mutex_unlock(shardMutexes + index) }
        guard mutates else { return body(&shardTables[index]) }
        let count = sequence(index)
        count.wrappingIncrement(ordering: .relaxed)
        atomicMemoryFence(ordering: .releasing)
        defer { count.wrappingIncrement(ordering: .releasing) }
        return body(&shardTables[index])
    }

    @inline(__always)
    private func withShard<R>(_ hash: UInt64, mutates: Bool = true, _ body: (inout ShardTable) -> R) -> R {
        withShard(index: Self.shardIndex(hash), mutates: mutates, body)
    }

    // MARK: Optimistic lookup

    /// Tests only (set before the directory is shared): runs on the reader's thread between
    /// an optimistic lookup and its copy, to force the races the seqlock must catch.
    public var beforeOptimisticCopy: ((PageSnapshot) -> Void)?

    /// Reads `key`'s entry without the shard lock and runs `body` on it (which copies the
    /// page's bytes, or returns false to decline); returns the entry if it was stable
    /// throughout (see *Optimistic reads*), nil otherwise — the key is absent, the entry is
    /// corrupt, `body` declined, or changes kept racing it `attempts` times: the caller takes
    /// the locked path, which gives every answer its proper error. `body` must check the
    /// snapshot's extent against its tier before touching memory: a torn read can hand it any
    /// values (it is called again, or its work dropped). Not generic: it runs once per get,
    /// and an unspecialized generic across modules costs a metadata lookup per call.
    @inline(__always)
    public func optimisticRead(_ key: PageKey, attempts: Int = 2, _ body: (PageSnapshot) -> Bool) -> PageSnapshot? {
        let hash = key.mixedHash
        let shard = Self.shardIndex(hash)
        let count = sequence(shard)
        let entries = shardTables[shard].entries
        let mask = shardTables[shard].mask
        for _ in 0..<attempts {
            let before = count.load(ordering: .acquiring)
            guard before & 1 == 0 else { continue }
            // A bounded probe: a table changing under us may have no empty line in reach.
            var index = Int(truncatingIfNeeded: hash) & mask
            var found: PageEntry?
            for _ in 0...mask {
                let entry = entries[index]
                guard entry.flags & PageEntry.occupied != 0 else { break }
                if entry.key == key {
                    found = entry
                    break
                }
                index = (index + 1) & mask
            }
            guard let entry = found, !entry.isCorrupt, Int(entry.tier) < tierCapacities.count,
                  Int(entry.extent.endSlot) <= tierCapacities[Int(entry.tier)]
            else {
                atomicMemoryFence(ordering: .acquiring)
                if count.load(ordering: .relaxed) == before { return nil }  // truly absent or corrupt
                continue
            }
            let snapshot = entry.snapshot
            if let hook = beforeOptimisticCopy { hook(snapshot) }
            let copied = body(snapshot)
            atomicMemoryFence(ordering: .acquiring)
            guard count.load(ordering: .relaxed) == before else { continue }
            guard copied else { return nil }
            let counters = optimisticCounters(shard: shard, tier: Int(entry.tier))
            counters.reads.wrappingIncrement(ordering: .relaxed)
            counters.bytes.wrappingIncrement(by: Int(entry.length), ordering: .relaxed)
            return snapshot
        }
        return nil
    }

    // MARK: Lookup

    /// The current entry for `key`, without side effects.
    public func snapshot(of key: PageKey) -> PageSnapshot? {
        let hash = key.mixedHash
        return withShard(hash, mutates: false) { table in
            table.find(key, hash: hash).map { table.entries[$0].snapshot }
        }
    }

    public func contains(_ key: PageKey) -> Bool {
        let hash = key.mixedHash
        return withShard(hash, mutates: false) { table in
            guard let index = table.find(key, hash: hash) else { return false }
            return !table.entries[index].isCorrupt
        }
    }

    /// Looks `key` up for reading: counts a reader on the entry so its
    /// extent is not reused until `endRead`. Nil for unknown keys. The count is 16 bits (the
    /// entry is one cache line): a read beyond 65,535 in flight on one key is refused with
    /// `invalidArgument` rather than wrapping the count (which would free the slots under
    /// the readers).
    @inline(__always)
    public func beginRead(_ key: PageKey) throws(SpillwayError) -> PageSnapshot? {
        let hash = key.mixedHash
        // Reader counts and read counters are nothing an optimistic reader looks at.
        let result: Result<PageSnapshot?, SpillwayError> = withShard(hash, mutates: false) { table in
            guard let index = table.find(key, hash: hash) else { return .success(nil) }
            guard table.entries[index].readers < .max else {
                return .failure(.invalidArgument("page \(key) has \(UInt16.max) reads in flight"))
            }
            table.entries[index].readers += 1
            table.countRead(tier: Int(table.entries[index].tier), bytes: Int(table.entries[index].length))
            return .success(table.entries[index].snapshot)
        }
        return try result.get()
    }

    /// Reads served by `optimisticRead` (no lock), over all shards and tiers.
    public var optimisticReads: Int {
        var total = 0
        for shard in 0..<Self.shardCount {
            for tier in 0..<tierCapacities.count {
                total += optimisticCounters(shard: shard, tier: tier).reads.load(ordering: .relaxed)
            }
        }
        return total
    }

    /// Lookups served per tier and their bytes, summed over shards in one pass. Counted under the shard
    /// lock `beginRead` already holds, so the hot path pays no atomic for them.
    public func readCounters() -> [(reads: Int, bytes: Int)] {
        var totals = [(reads: Int, bytes: Int)](repeating: (0, 0), count: tierCount)
        for shard in 0..<Self.shardCount {
            withShard(index: shard, mutates: false) { table in
                for tier in 0..<totals.count {
                    totals[tier].reads += table.readCounts[2 * tier]
                    totals[tier].bytes += table.readCounts[2 * tier + 1]
                }
            }
            for tier in 0..<totals.count {
                let counters = optimisticCounters(shard: shard, tier: tier)
                totals[tier].reads += counters.reads.load(ordering: .relaxed)
                totals[tier].bytes += counters.bytes.load(ordering: .relaxed)
            }
        }
        return totals
    }

    /// Ends a read begun by `beginRead` (or the read half of `beginMove`). Returns a location
    /// the caller must release if this was the last reader of a location already vacated.
    @inline(__always)
    public func endRead(_ snapshot: PageSnapshot) -> PageLocation? {
        let hash = snapshot.key.mixedHash
        // Releases a retired location at most: the entry a reader looks up is untouched.
        return withShard(hash, mutates: false) { $0.dropReader(snapshot, hash: hash) }
    }

    // MARK: Mutation

    /// Makes a completely written page visible. Returns the replaced entry's location if it must
    /// be released now (no reads in flight; otherwise its last reader gets it). Throws
    /// `pagePinned` (changing nothing) if the key exists and is pinned, `storeFull` if the shard
    /// is out of entries.
    public func insert(_ key: PageKey, location: PageLocation, length: Int, checksum: UInt32, hints: PageHints = .generic)
        throws(SpillwayError) -> PageLocation?
    {
        try replace(key, location: location, length: length, checksum: checksum, hints: hints).release
    }

    /// `insert`, also returning the location the new entry vacated (`old`, whether or not
    /// reads of it are still in flight): a persistent tier must stop treating it as current.
    public func replace(_ key: PageKey, location: PageLocation, length: Int, checksum: UInt32, hints: PageHints = .generic)
        throws(SpillwayError) -> (old: PageLocation?, release: PageLocation?)
    {
        precondition(location.tier < tierCapacities.count, "tier \(location.tier) out of range")
        precondition(Int(location.extent.endSlot) <= tierCapacities[location.tier], "extent beyond tier")
        precondition(length >= 0 && length <= Int(UInt32.max), "page length out of range")
        let hash = key.mixedHash
        let version = versionClock.loadThenWrappingIncrement(ordering: .relaxed) &+ 1
        let fresh = PageEntry(
            key: key, version: version, hintParent: hints.parent, extent: location.extent, length: UInt32(length),
            checksum: checksum, pinCount: 0, readers: 0, tier: UInt8(location.tier), flags: PageEntry.occupied,
            hintOrder: hints.order, hintClass: hints.pageClass.rawValue)
        while true {
            let outcome: Result<Vacate, SpillwayError> = withShard(hash) { table in
                if let index = table.find(key, hash: hash) {
                    let old = table.entries[index]
                    guard old.pinCount == 0 else { return .failure(.pagePinned(key)) }
                    guard let vacated = table.vacate(index) else { return .success(.busy) }
                    table.entries[index] = fresh
                    return .success(.done(old: old.location, release: vacated))
                }
                guard table.insertNew(fresh, hash: hash) else {
                    return .failure(.storeFull(requiredSlots: Int(location.extent.slotCount)))
                }
                return .success(.done(old: nil, release: nil))
            }
            switch try outcome.get() {
            case .busy:
                sched_yield()
            case .done(let old, let release):
                pagesPerTier[location.tier].wrappingIncrement(ordering: .relaxed)
                if let old { pagesPerTier[old.tier].wrappingDecrement(ordering: .relaxed) }
                return (old, release)
            }
        }
    }

    /// Replaces the hints of the current version of `key` in place (no new version, no move):
    /// for pages that came back without them, e.g. recovered from NVMe on a warm restart.
    /// False if `key` is absent.
    @discardableResult
    public func setHints(_ hints: PageHints, of key: PageKey) -> Bool {
        let hash = key.mixedHash
        return withShard(hash) { table in
            guard let index = table.find(key, hash: hash) else { return false }
            table.entries[index].hintOrder = hints.order
            table.entries[index].hintParent = hints.parent
            table.entries[index].hintClass = hints.pageClass.rawValue
            return true
        }
    }

    /// Removes `key`. `found` is false if absent; `release` is the location to release now.
    /// Throws `pagePinned` if pinned.
    public func remove(_ key: PageKey) throws(SpillwayError) -> (found: Bool, release: PageLocation?) {
        let (old, release) = try removeEntry(key)
        return (old != nil, release)
    }

    /// `remove`, returning the vacated location (`old`, nil if absent) as well.
    public func removeEntry(_ key: PageKey) throws(SpillwayError) -> (old: PageLocation?, release: PageLocation?) {
        let hash = key.mixedHash
        while true {
            let outcome: Result<Vacate, SpillwayError> = withShard(hash) { table in
                guard let index = table.find(key, hash: hash) else { return .success(.done(old: nil, release: nil)) }
                guard table.entries[index].pinCount == 0 else { return .failure(.pagePinned(key)) }
                return .success(removeLocked(&table, index: index, hash: hash))
            }
            switch try outcome.get() {
            case .busy: sched_yield()
            case .done(let old, let release): return (old, release)
            }
        }
    }

    /// Removes the entry if it is still `snapshot`'s version at the same location and unpinned.
    /// Used by eviction and corruption quarantine, whose callers may hold reads themselves, so
    /// it never waits: when the shard's retired list is full it gives up (`removed` false).
    /// With `quarantine`, a pinned entry is instead marked corrupt: it stays (pins are a
    /// promise) but is never served, and it goes away at its last `unpin`.
    public func removeIfCurrent(_ snapshot: PageSnapshot, quarantine: Bool = false) -> (removed: Bool, release: PageLocation?) {
        let hash = snapshot.key.mixedHash
        let outcome: Vacate = withShard(hash) { table in
            guard let index = table.find(snapshot.key, hash: hash) else { return .done(old: nil, release: nil) }
            let entry = table.entries[index]
            guard entry.version == snapshot.version, entry.location == snapshot.location else { return .done(old: nil, release: nil) }
            guard entry.pinCount == 0 else {
                if quarantine { table.entries[index].flags |= PageEntry.corrupt }
                return .done(old: nil, release: nil)
            }
            return removeLocked(&table, index: index, hash: hash)
        }
        switch outcome {
        case .busy: return (false, nil)
        case .done(let old, let release): return (old != nil, release)
        }
    }

    private func removeLocked(_ table: inout ShardTable, index: Int, hash: UInt64) -> Vacate {
        let entry = table.entries[index]
        guard let release = table.vacate(index) else { return .busy }
        table.delete(at: index)
        pagesPerTier[entry.location.tier].wrappingDecrement(ordering: .relaxed)
        return .done(old: entry.location, release: release)
    }

    /// Pins `key`: it will not be moved, evicted, overwritten or removed until unpinned. Pins
    /// nest (up to 65535).
    @discardableResult
    public func pin(_ key: PageKey) throws(SpillwayError) -> PageSnapshot {
        let hash = key.mixedHash
        let result: Result<PageSnapshot, SpillwayError> = withShard(hash, mutates: false) { table in
            guard let index = table.find(key, hash: hash) else { return .failure(.unknownKey(key)) }
            guard table.entries[index].pinCount < .max else { return .failure(.invalidArgument("page \(key) pinned 65535 times")) }
            table.entries[index].pinCount += 1
            return .success(table.entries[index].snapshot)
        }
        return try result.get()
    }

    /// Drops one pin. Returns a location to release when this was the last pin of a page
    /// quarantined as corrupt (which is removed now).
    @discardableResult
    public func unpin(_ key: PageKey) throws(SpillwayError) -> PageLocation? {
        let hash = key.mixedHash
        while true {
            let result: Result<Vacate, SpillwayError> = withShard(hash) { table in
                guard let index = table.find(key, hash: hash) else { return .failure(.unknownKey(key)) }
                guard table.entries[index].pinCount > 0 else { return .failure(.notPinned(key)) }
                if table.entries[index].pinCount == 1 && table.entries[index].isCorrupt {
                    let outcome = removeLocked(&table, index: index, hash: hash)
                    return .success(outcome)
                }
                table.entries[index].pinCount -= 1
                return .success(.done(old: nil, release: nil))
            }
            switch try result.get() {
            case .busy: sched_yield()
            case .done(_, let release): return release
            }
        }
    }

    // MARK: Moves between tiers

    /// Claims `key` for a move if it is unpinned, not already moving and (when `fromTier` is
    /// given) on that tier. Counts as a reader of the source; finish with `commitMove` or
    /// `abortMove`.
    public func beginMove(_ key: PageKey, fromTier: Int? = nil) -> PageSnapshot? {
        let hash = key.mixedHash
        return withShard(hash) { table -> PageSnapshot? in
            guard let index = table.find(key, hash: hash) else { return nil }
            let entry = table.entries[index]
            guard entry.pinCount == 0, !entry.isMoving, !entry.isCorrupt, entry.readers < .max,
                  fromTier == nil || Int(entry.tier) == fromTier
            else { return nil }
            table.entries[index].flags |= PageEntry.moving
            table.entries[index].readers += 1
            return entry.snapshot
        }
    }

    /// Points the entry at `destination` if it is still `snapshot`'s version and unpinned, and
    /// drops the move's reader count. `release` is a location to release now: the vacated
    /// source on success (if no other reads are in flight) or a retired location whose last
    /// reader the move was. On failure the caller also releases `destination`.
    public func commitMove(_ snapshot: PageSnapshot, to destination: PageLocation) -> (committed: Bool, release: PageLocation?) {
        let hash = snapshot.key.mixedHash
        while true {
            let outcome: (committed: Bool, release: PageLocation?)? = withShard(hash) { table in
                guard let index = table.find(snapshot.key, hash: hash),
                      table.entries[index].version == snapshot.version,
                      table.entries[index].location == snapshot.location
                else {
                    return (false, table.dropReader(snapshot, hash: hash))
                }
                let entry = table.entries[index]
                guard entry.pinCount == 0 else {
                    table.entries[index].flags &= ~PageEntry.moving
                    return (false, table.dropReader(snapshot, hash: hash))
                }
                // Drop the move's own read, then vacate the source for any remaining readers. If
                // the retired list is full, give up rather than wait: the caller may hold reads
                // that only it can end, and the page is fine where it is.
                table.entries[index].readers -= 1
                guard let release = table.vacate(index) else {
                    table.entries[index].flags &= ~PageEntry.moving
                    return (false, nil)
                }
                table.entries[index].flags &= ~PageEntry.moving
                table.entries[index].tier = UInt8(destination.tier)
                table.entries[index].extent = destination.extent
                return (true, release)
            }
            guard let outcome else {
                sched_yield()
                continue
            }
            if outcome.committed {
                pagesPerTier[destination.tier].wrappingIncrement(ordering: .relaxed)
                pagesPerTier[snapshot.location.tier].wrappingDecrement(ordering: .relaxed)
            }
            return outcome
        }
    }

    /// Gives up a claimed move; the entry stays where it was. Returns a location to release
    /// if the move held the last read of an already vacated location.
    public func abortMove(_ snapshot: PageSnapshot) -> PageLocation? {
        let hash = snapshot.key.mixedHash
        return withShard(hash) { table in
            if let index = table.find(snapshot.key, hash: hash), table.entries[index].version == snapshot.version {
                table.entries[index].flags &= ~PageEntry.moving
            }
            return table.dropReader(snapshot, hash: hash)
        }
    }

    /// Every visible page (tests, tools). Takes each shard lock in turn.
    public func allPages() -> [PageSnapshot] {
        var pages: [PageSnapshot] = []
        for shard in 0..<Self.shardCount {
            withShard(index: shard, mutates: false) { table in
                for index in 0..<table.entryCount where table.entries[index].isOccupied {
                    pages.append(table.entries[index].snapshot)
                }
            }
        }
        return pages
    }

    /// Outcome of vacating an entry's location under the shard lock.
    private enum Vacate {
        /// The retired list is full: drop the lock, yield, retry.
        case busy
        /// `old` is the vacated location (nil: nothing was there); `release` is the location to
        /// release now (nil when readers still hold it or nothing was vacated).
        case done(old: PageLocation?, release: PageLocation?)
    }
}

// MARK: - Shard internals

/// One directory entry: exactly one 64-byte cache line.
struct PageEntry {
    static let occupied: UInt8 = 1
    static let moving: UInt8 = 2
    /// Failed its checksum while pinned: kept for the pin holders' bookkeeping, never served.
    static let corrupt: UInt8 = 4

    var key: PageKey
    var version: UInt64
    /// The caller's `PageHints` (`hintParent`, `hintOrder`, `hintClass`): moves keep them, a
    /// new `put` replaces them. Recency and frequency are not kept here: the store's policy
    /// owns them (`PolicyEngine`), so a read writes nothing but the reader count.
    var hintParent: UInt64
    var extent: Extent
    var length: UInt32
    var checksum: UInt32
    var pinCount: UInt16
    /// Reads in flight of the current location.
    var readers: UInt16
    var tier: UInt8
    var flags: UInt8
    var hintOrder: UInt16
    var hintClass: UInt8

    var isOccupied: Bool { flags & Self.occupied != 0 }
    var isMoving: Bool { flags & Self.moving != 0 }
    var isCorrupt: Bool { flags & Self.corrupt != 0 }
    var location: PageLocation { PageLocation(tier: Int(tier), extent: extent) }
    var hints: PageHints {
        // The class byte always came from a `PageClass`, so the fallback is never taken.
        PageHints(pageClass: PageClass(rawValue: hintClass) ?? .generic, order: hintOrder, parent: hintParent)
    }

    var snapshot: PageSnapshot {
        PageSnapshot(key: key, location: location, length: Int(length), checksum: checksum, version: version,
                     pinCount: Int(pinCount), hints: hints, isCorrupt: isCorrupt)
    }
}

/// A vacated location that reads are still copying from.
struct RetiredLocation {
    var version: UInt64
    var location: PageLocation
    var readers: UInt16
}

/// One shard: open addressing over inline `PageEntry` lines, plus the retired list.
struct ShardTable: ~Copyable {
    static let retiredCapacity = 32

    let entries: UnsafeMutablePointer<PageEntry>
    let entryCount: Int
    let mask: Int
    let limit: Int
    var count = 0
    var retired: (count: Int, items: [RetiredLocation])
    /// Per tier: reads served, bytes served (pairs).
    let readCounts: UnsafeMutablePointer<Int>
    let tierCount: Int

    /// `entries` must be zeroed memory (every entry unoccupied) owned by the directory.
    init(entries: UnsafeMutablePointer<PageEntry>, entryCount: Int, tierCount: Int) {
        self.tierCount = tierCount
        readCounts = .allocate(capacity: 2 * max(1, tierCount))
        readCounts.initialize(repeating: 0, count: 2 * max(1, tierCount))
        precondition(MemoryLayout<PageEntry>.stride == 64, "PageEntry must be one cache line")
        self.entries = entries
        self.entryCount = entryCount
        mask = entryCount - 1
        limit = entryCount - entryCount / 8
        retired = (0, Array(repeating: RetiredLocation(version: 0, location: PageLocation(tier: 0, extent: Extent(firstSlot: 0, slotCount: 0)), readers: 0),
                            count: Self.retiredCapacity))
    }

    deinit { readCounts.deallocate() }

    @inline(__always)
    func countRead(tier: Int, bytes: Int) {
        readCounts[2 * tier] &+= 1
        readCounts[2 * tier + 1] &+= bytes
    }

    @inline(__always)
    func find(_ key: PageKey, hash: UInt64) -> Int? {
        var index = Int(truncatingIfNeeded: hash) & mask
        while true {
            let entry = entries + index
            guard entry.pointee.flags & PageEntry.occupied != 0 else { return nil }
            if entry.pointee.key == key { return index }
            index = (index + 1) & mask
        }
    }

    /// Adds an entry for a key known to be absent; false when the shard is at its limit.
    mutating func insertNew(_ entry: PageEntry, hash: UInt64) -> Bool {
        guard count < limit else { return false }
        var index = Int(truncatingIfNeeded: hash) & mask
        while entries[index].isOccupied { index = (index + 1) & mask }
        entries[index] = entry
        count += 1
        return true
    }

    /// Backward-shift deletion: no tombstones, so probe lengths never degrade.
    mutating func delete(at index: Int) {
        var hole = index
        var next = index
        while true {
            next = (next + 1) & mask
            guard entries[next].isOccupied else { break }
            let home = Int(truncatingIfNeeded: entries[next].key.mixedHash) & mask
            // Leave `next` in place if its home lies cyclically in (hole, next].
            let stays = hole <= next ? (hole < home && home <= next) : (hole < home || home <= next)
            if stays { continue }
            entries[hole] = entries[next]
            hole = next
        }
        entries[hole].flags = 0
        count -= 1
    }

    /// Takes the entry's current location away from its readers. Returns the location to
    /// release now (no readers), or `.some(nil)` once parked in the retired list for its last
    /// reader, or nil if the retired list is full (retry later).
    mutating func vacate(_ index: Int) -> PageLocation?? {
        let entry = entries[index]
        if entry.readers == 0 { return .some(entry.location) }
        guard retired.count < Self.retiredCapacity else { return nil }
        retired.items[retired.count] = RetiredLocation(version: entry.version, location: entry.location, readers: entry.readers)
        retired.count += 1
        entries[index].readers = 0
        return .some(nil)
    }

    /// Drops one reader of `snapshot`'s location: on the live entry if it still has that
    /// location, else on the retired list (returning the location when the count hits zero).
    mutating func dropReader(_ snapshot: PageSnapshot, hash: UInt64) -> PageLocation? {
        if let index = find(snapshot.key, hash: hash),
           entries[index].version == snapshot.version, entries[index].location == snapshot.location {
            precondition(entries[index].readers > 0, "reader count underflow for \(snapshot.key)")
            entries[index].readers -= 1
            return nil
        }
        for slot in 0..<retired.count
        where retired.items[slot].version == snapshot.version && retired.items[slot].location == snapshot.location {
            retired.items[slot].readers -= 1
            guard retired.items[slot].readers == 0 else { return nil }
            let location = retired.items[slot].location
            retired.count -= 1
            retired.items[slot] = retired.items[retired.count]
            return location
        }
        preconditionFailure("endRead of \(snapshot.key) v\(snapshot.version) matches no reader")
    }
}
