/// A count-min sketch of 4-bit-style counters (stored in bytes, capped at 15) with periodic
/// halving, as in TinyLFU: it estimates how often each block id was referenced recently
/// without keeping per-block state for blocks that are not cached. Sized at init.
struct FrequencySketch {
    private var table: [UInt8]
    private let mask: Int
    private let sampleSize: Int
    private var additions = 0
    private static let depth = 4
    private static let maximum: UInt8 = 15

    init(capacity: Int, sampleMultiple: Int = 10) {
        var width = 64
        while width < capacity * 4 { width <<= 1 }
        table = Array(repeating: 0, count: width * Self.depth)
        mask = width - 1
        // Halve every 10 × capacity references: old popularity fades, recent counts dominate.
        sampleSize = max(64, capacity * sampleMultiple)
    }

    @inline(__always)
    private func slot(_ block: UInt64, row: Int) -> Int {
        var z = block &+ UInt64(row + 1) &* 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return row * (mask + 1) + (Int(truncatingIfNeeded: z ^ (z >> 31)) & mask)
    }

    func estimate(_ block: UInt64) -> Int {
        var least = Self.maximum
        for row in 0..<Self.depth { least = min(least, table[slot(block, row: row)]) }
        return Int(least)
    }

    mutating func increment(_ block: UInt64) {
        // Conservative update: only the rows at the minimum grow, which keeps collisions from
        // inflating every estimate.
        let least = estimate(block)
        guard least < Int(Self.maximum) else { return }
        for row in 0..<Self.depth {
            let index = slot(block, row: row)
            if Int(table[index]) == least { table[index] += 1 }
        }
        additions += 1
        if additions >= sampleSize {
            additions = 0
            for index in table.indices { table[index] >>= 1 }
        }
    }
}

/// W-TinyLFU (Einziger et al.): a small LRU window (1 % of the capacity) takes every new
/// block; a block leaving the window is admitted into the main segmented LRU only if the
/// sketch says it is referenced more often than the block main would evict. Blocks seen once
/// (each request's unique suffix) therefore pass through the window and are declined, and
/// cannot flush blocks that keep being reused. Main is probation (20 %) + protected (80 %): a
/// hit in probation promotes to protected.
public final class TinyLFUBlockPolicy: BlockCachePolicy {
    public let name = "tinylfu"
    public let capacityBlocks: Int
    private static let window = 0, probation = 1, protected = 2
    private let windowTarget: Int
    private let protectedTarget: Int
    private var index: BlockIndex
    private var lists: SlotLists
    private var free: FreeSlots
    private var blocks: [UInt64]
    private var sketch: FrequencySketch

    public init(capacityBlocks: Int, windowFraction: Double = 0.01, sampleMultiple: Int = 10) {
        self.capacityBlocks = max(1, capacityBlocks)
        windowTarget = max(1, Int(Double(self.capacityBlocks) * windowFraction))
        protectedTarget = max(0, (self.capacityBlocks - windowTarget) * 8 / 10)
        index = BlockIndex(capacity: self.capacityBlocks)
        lists = SlotLists(slots: self.capacityBlocks, lists: 3)
        free = FreeSlots(count: self.capacityBlocks)
        blocks = Array(repeating: 0, count: self.capacityBlocks)
        sketch = FrequencySketch(capacity: self.capacityBlocks, sampleMultiple: sampleMultiple)
    }

    public var residentCount: Int { lists.counts[0] + lists.counts[1] + lists.counts[2] }
    public func contains(_ block: UInt64) -> Bool { index.find(block) != nil }

    public func touch(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) -> Bool {
        guard let slot = index.find(block) else { return false }
        sketch.increment(block)
        let list = lists.list(of: slot)
        lists.remove(slot)
        if list == Self.probation {
            lists.pushHead(slot, list: Self.protected)
            if lists.counts[Self.protected] > protectedTarget, let demoted = lists.tail(Self.protected) {
                lists.remove(demoted)
                lists.pushHead(demoted, list: Self.probation)
            }
        } else {
            lists.pushHead(slot, list: list ?? Self.window)
        }
        return true
    }

    /// Counts the sighting; the admission test itself happens between the window and main.
    public func admits(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) -> Bool {
        sketch.increment(block)
        return true
    }

    public func insert(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) {
        guard let slot = free.take() else { return }
        blocks[slot] = block
        index.set(block, slot)
        lists.pushHead(slot, list: Self.window)
        // While the cache is filling there is no competition: the window overflows into main.
        if lists.counts[Self.window] > windowTarget, let oldest = lists.tail(Self.window) {
            lists.remove(oldest)
            lists.pushHead(oldest, list: Self.probation)
        }
    }

    public func remove(_ block: UInt64) -> Bool {
        guard let slot = index.find(block) else { return false }
        drop(slot)
        return true
    }

    /// Frees one slot: the window's oldest block either moves into main (evicting main's
    /// victim, if it is referenced more often) or is itself evicted.
    public func evict() -> UInt64? {
        guard lists.counts[Self.window] >= windowTarget, let candidate = lists.tail(Self.window) else {
            // The window is below its share: main gives up its victim.
            guard let victim = lists.tail(Self.probation) ?? lists.tail(Self.protected) ?? lists.tail(Self.window) else { return nil }
            return drop(victim)
        }
        guard let victim = lists.tail(Self.probation) ?? lists.tail(Self.protected) else {
            return drop(candidate)
        }
        if sketch.estimate(blocks[candidate]) > sketch.estimate(blocks[victim]) {
            lists.remove(candidate)
            lists.pushHead(candidate, list: Self.probation)
            return drop(victim)
        }
        return drop(candidate)
    }

    @discardableResult
    private func drop(_ slot: Int) -> UInt64 {
        lists.remove(slot)
        index.remove(blocks[slot])
        free.give(slot)
        return blocks[slot]
    }
}
