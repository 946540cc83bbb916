/// Fixed-capacity building blocks shared by the policies. Everything is sized at init so an
/// access allocates nothing: the simulator runs hundreds of thousands of references per
/// policy and capacity, and the same structures are meant to move into the store later.

/// Open-addressing hash table from block id to slot (linear probing, backward-shift deletion,
/// so there are no tombstones to accumulate over a long trace). Load factor stays ≤ 1/2.
struct BlockIndex {
    private var keys: [UInt64]
    private var values: [Int32]  // -1 = empty
    private let mask: Int

    init(capacity: Int) {
        var size = 8
        while size < capacity * 2 { size <<= 1 }
        keys = Array(repeating: 0, count: size)
        values = Array(repeating: -1, count: size)
        mask = size - 1
    }

    @inline(__always)
    private func home(_ key: UInt64) -> Int {
        // SplitMix64 finalizer: trace ids are small consecutive integers, which would cluster
        // badly under linear probing without mixing.
        var z = key &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return Int(truncatingIfNeeded: z ^ (z >> 31)) & mask
    }

    @inline(__always)
    func find(_ key: UInt64) -> Int? {
        var index = home(key)
        while values[index] >= 0 {
            if keys[index] == key { return Int(values[index]) }
            index = (index + 1) & mask
        }
        return nil
    }

    /// Inserts or overwrites. The caller keeps the number of keys within the init capacity.
    @inline(__always)
    mutating func set(_ key: UInt64, _ slot: Int) {
        var index = home(key)
        while values[index] >= 0 {
            if keys[index] == key { values[index] = Int32(slot); return }
            index = (index + 1) & mask
        }
        keys[index] = key
        values[index] = Int32(slot)
    }

    mutating func remove(_ key: UInt64) {
        var hole = home(key)
        while true {
            if values[hole] < 0 { return }
            if keys[hole] == key { break }
            hole = (hole + 1) & mask
        }
        values[hole] = -1
        // Shift back every later entry of the run whose home is not in (hole, index].
        var index = hole
        while true {
            index = (index + 1) & mask
            if values[index] < 0 { return }
            let wanted = home(keys[index])
            let stays = hole <= index ? (wanted > hole && wanted <= index) : (wanted > hole || wanted <= index)
            if !stays {
                keys[hole] = keys[index]
                values[hole] = values[index]
                values[index] = -1
                hole = index
            }
        }
    }
}

/// Intrusive doubly-linked lists over slot indices: every slot is in at most one list at a
/// time. Head = newest / most protected end, tail = the eviction end.
struct SlotLists {
    private(set) var next: [Int32]
    private(set) var prev: [Int32]
    private(set) var owner: [Int8]  // -1 = in no list
    private var heads: [Int32]
    private var tails: [Int32]
    private(set) var counts: [Int]

    init(slots: Int, lists: Int) {
        next = Array(repeating: -1, count: slots)
        prev = Array(repeating: -1, count: slots)
        owner = Array(repeating: -1, count: slots)
        heads = Array(repeating: -1, count: lists)
        tails = Array(repeating: -1, count: lists)
        counts = Array(repeating: 0, count: lists)
    }

    @inline(__always) func tail(_ list: Int) -> Int? { tails[list] < 0 ? nil : Int(tails[list]) }
    @inline(__always) func head(_ list: Int) -> Int? { heads[list] < 0 ? nil : Int(heads[list]) }
    /// The neighbour one step towards the head (newer end).
    @inline(__always) func newer(_ slot: Int) -> Int? { prev[slot] < 0 ? nil : Int(prev[slot]) }
    @inline(__always) func list(of slot: Int) -> Int? { owner[slot] < 0 ? nil : Int(owner[slot]) }

    mutating func pushHead(_ slot: Int, list: Int) {
        let old = heads[list]
        next[slot] = old
        prev[slot] = -1
        if old >= 0 { prev[Int(old)] = Int32(slot) } else { tails[list] = Int32(slot) }
        heads[list] = Int32(slot)
        owner[slot] = Int8(list)
        counts[list] += 1
    }

    /// Links `slot` right behind `anchor` (one step towards the tail), in the anchor's list.
    mutating func insert(_ slot: Int, behind anchor: Int) {
        let list = Int(owner[anchor])
        let after = next[anchor]
        prev[slot] = Int32(anchor)
        next[slot] = after
        next[anchor] = Int32(slot)
        if after >= 0 { prev[Int(after)] = Int32(slot) } else { tails[list] = Int32(slot) }
        owner[slot] = Int8(list)
        counts[list] += 1
    }

    mutating func remove(_ slot: Int) {
        let list = Int(owner[slot])
        guard list >= 0 else { return }
        let before = prev[slot], after = next[slot]
        if before >= 0 { next[Int(before)] = after } else { heads[list] = after }
        if after >= 0 { prev[Int(after)] = before } else { tails[list] = before }
        next[slot] = -1
        prev[slot] = -1
        owner[slot] = -1
        counts[list] -= 1
    }
}

/// A stack of free slot numbers, full at init.
struct FreeSlots {
    private var stack: [Int32]
    init(count: Int) { stack = (0..<count).reversed().map { Int32($0) } }
    @inline(__always) var isEmpty: Bool { stack.isEmpty }
    @inline(__always) var count: Int { stack.count }
    @inline(__always) mutating func take() -> Int? { stack.popLast().map { Int($0) } }
    @inline(__always) mutating func give(_ slot: Int) { stack.append(Int32(slot)) }
}

/// A bounded FIFO of evicted block ids ("ghosts"), for policies that remember recent misses
/// without keeping their data. Pushing onto a full ring forgets the oldest id.
struct GhostRing {
    private var ring: [UInt64]
    private var index: BlockIndex
    private var position = 0
    private var filled = 0
    let capacity: Int

    init(capacity: Int) {
        self.capacity = max(1, capacity)
        ring = Array(repeating: 0, count: self.capacity)
        index = BlockIndex(capacity: self.capacity)
    }

    func contains(_ block: UInt64) -> Bool { index.find(block) != nil }

    mutating func push(_ block: UInt64) {
        if filled == capacity {
            // Forget the oldest, unless it was removed (or pushed again) since.
            let old = ring[position]
            if index.find(old) == position { index.remove(old) }
        } else {
            filled += 1
        }
        if index.find(block) != nil { index.remove(block) }
        ring[position] = block
        index.set(block, position)
        position = (position + 1) % capacity
    }

    mutating func remove(_ block: UInt64) { index.remove(block) }
}
