import Atomics
import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// The daemon's slabs: one address-space reservation of `capacity` bytes cut into
/// `capacity / slabSize` slots, allocated at start, with per-slot atomics for the page path.
///
/// A slot's *state* word is `tenant << 32 | slab id` while the slot is lent, 0 while it is not.
/// A slab id (what the wire carries) is the slot index in the low `indexBits` bits and a
/// generation above them, bumped on every mapping, so a remapped slot never serves an old id
/// (a stale id gets "unknown slab" or "revoked", never the new mapping).
///
/// The page path takes no lock: a read or write **pins** the slot (`users += 1`, then checks
/// the state word against `tenant << 32 | slab`; both sequentially consistent, so a concurrent
/// retire either sees the pin or the access sees the retire), checks bounds, and copies (a
/// read's reply is sent straight from the slab, pinned until it is out); then unpins. Each
/// slot's words sit on their own cache line, so tenants on different slabs share nothing.
/// **Retire** (unmap, revoke, lease expiry; under the server's lock) stores 0 into the state,
/// then, once nothing pins the slot, drops its pages (`MADV_DONTNEED`: the next tenant reads
/// zeros) and frees the slot. A slot still pinned drains: it is not free (so memory in flight
/// still counts against capacity) until the janitor or the next mapping sees it unpinned.
///
/// Memory is committed only as tenants write, and handed back to the host when a slab is
/// returned, as with one `mmap` per slab before.
final class SlabTable: @unchecked Sendable {
    let slabSize: Int
    let count: Int
    let indexBits: Int
    let indexMask: UInt32
    /// The whole reservation (MAP_NORESERVE: nothing is committed until written).
    let base: UnsafeMutableRawPointer
    /// One 64-byte line per slot: state at +0, pins at +8 (no false sharing between slots).
    private let words: UnsafeMutableRawPointer
    private static let stride = 64

    init(capacity: Int, slabSize: Int) throws(SpillwayError) {
        self.slabSize = slabSize
        count = capacity / slabSize
        guard count >= 1, count <= 1 << 24 else {
            throw .invalidConfiguration("a daemon holds 1 to \(1 << 24) slabs (capacity / slab size), not \(count)")
        }
        var bits = 1
        while (1 << bits) < count { bits += 1 }
        indexBits = bits
        indexMask = UInt32((1 << bits) - 1)
        let reserved = mmap(nil, count * slabSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let reserved, reserved != MAP_FAILED else {
            throw .invalidConfiguration("cannot reserve \(ByteCount.format(count * slabSize)) of address space: \(String(cString: strerror(errno)))")
        }
        base = reserved
        words = .allocate(byteCount: count * Self.stride, alignment: Self.stride)
        for index in 0..<count {
            let slot = (words + index * Self.stride).bindMemory(to: UnsafeAtomic<UInt64>.Storage.self, capacity: 2)
            slot.initialize(to: UnsafeAtomic<UInt64>.Storage(0))
            (slot + 1).initialize(to: UnsafeAtomic<UInt64>.Storage(0))
        }
    }

    deinit {
        munmap(base, count * slabSize)
        words.deallocate()
    }

    @inline(__always)
    private func state(_ index: Int) -> UnsafeAtomic<UInt64> {
        UnsafeAtomic(at: (words + index * Self.stride).assumingMemoryBound(to: UnsafeAtomic<UInt64>.Storage.self))
    }

    @inline(__always)
    private func users(_ index: Int) -> UnsafeAtomic<UInt64> {
        UnsafeAtomic(at: (words + index * Self.stride + 8).assumingMemoryBound(to: UnsafeAtomic<UInt64>.Storage.self))
    }

    /// The slot a slab id names (nil if out of range: a peer's bad id).
    @inline(__always)
    func index(of slab: UInt32) -> Int? {
        let index = Int(slab & indexMask)
        return index < count ? index : nil
    }

    @inline(__always)
    static func word(tenant: UInt32, slab: UInt32) -> UInt64 { UInt64(tenant) << 32 | UInt64(slab) }

    /// The slab id of slot `index` at generation `generation` (never 0).
    func slabID(index: Int, generation: UInt32) -> UInt32 { generation << UInt32(indexBits) | UInt32(index) }

    /// Generations a slot cycles through (1 ... max; 0 is never used, so no id is 0).
    var maxGeneration: UInt32 { indexBits >= 32 ? 1 : UInt32((UInt64(1) << UInt64(32 - indexBits)) - 1) }

    /// Address of `offset` in slot `index` (the caller checked bounds).
    @inline(__always)
    func address(_ index: Int, _ offset: Int) -> UnsafeMutableRawPointer { base + index * slabSize + offset }

    /// Bounds of a range inside one slab (overflow-safe: the fields come from peers).
    @inline(__always)
    func inBounds(offset: UInt64, length: UInt32) -> Bool {
        offset <= UInt64(slabSize) && UInt64(length) <= UInt64(slabSize) - offset
    }

    // MARK: Page path

    /// Pins the slot for a read or write if `tenant` owns `slab`; its index, or nil (nothing pinned).
    @inline(__always)
    func pin(_ slab: UInt32, tenant: UInt32) -> Int? {
        guard let index = index(of: slab) else { return nil }
        users(index).wrappingIncrement(ordering: .sequentiallyConsistent)
        if state(index).load(ordering: .sequentiallyConsistent) == Self.word(tenant: tenant, slab: slab) { return index }
        users(index).wrappingDecrement(ordering: .releasing)
        return nil
    }

    @inline(__always)
    func unpin(_ index: Int) {
        users(index).wrappingDecrement(ordering: .releasing)
    }

    // MARK: Mapping (under the server's lock)

    /// Lends slot `index` as `slab` to `tenant`.
    func lend(_ index: Int, slab: UInt32, tenant: UInt32) {
        state(index).store(Self.word(tenant: tenant, slab: slab), ordering: .sequentiallyConsistent)
    }

    /// Takes slot `index` out of service. Returns true if it is free for reuse now (its pages
    /// dropped); false if a reply or write still pins it (call `drained` later).
    func retire(_ index: Int) -> Bool {
        state(index).store(0, ordering: .sequentiallyConsistent)
        return drained(index)
    }

    /// A retired slot nothing pins any more: its pages are dropped (zero on next use); true.
    func drained(_ index: Int) -> Bool {
        guard users(index).load(ordering: .sequentiallyConsistent) == 0 else { return false }
        madvise(address(index, 0), slabSize, MADV_DONTNEED)
        return true
    }

    /// The state word of a slot (for typed refusals on the slow path).
    func owner(_ index: Int) -> (tenant: UInt32, slab: UInt32) {
        let word = state(index).load(ordering: .acquiring)
        return (UInt32(truncatingIfNeeded: word >> 32), UInt32(truncatingIfNeeded: word))
    }
}
