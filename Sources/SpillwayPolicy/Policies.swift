import SpillwayCore

/// A cache policy over block ids for a fixed capacity in blocks. It is built from five
/// primitives so the same code serves two drivers:
///
/// - the simulator (`spillway replay --simulate`) calls `access`, which composes them exactly
///   as the replay rules say: a hit refreshes; a miss asks admission, evicts one block if the
///   cache is full, then inserts;
/// - the store (`PolicyEngine`, one instance per tier) calls them separately: `touch` for a
///   recorded hit, `admits` + `insert` when a page enters the tier, `evict` when the tier needs
///   room (the store moves or drops the page it names), `remove` when a page leaves for
///   another reason (removed, promoted, overwritten elsewhere).
///
/// Policies are single-threaded objects: a simulation owns its policy; the store calls one
/// under its tier's policy lock. Every structure is allocated at init; no call allocates.
public protocol BlockCachePolicy: AnyObject {
    /// The name used on the command line and in output (`lru`, `opt`, …).
    var name: String { get }
    var capacityBlocks: Int { get }
    /// Blocks currently cached (never above `capacityBlocks`).
    var residentCount: Int { get }
    func contains(_ block: UInt64) -> Bool
    /// A reference to `block`: refreshes it and returns true if it is cached; false (and no
    /// change) otherwise. `parent` is the block before this one in the request's prefix chain
    /// (nil for the first), `depth` its index in the chain, `now` the reference's position in
    /// the whole stream (a logical clock; OPT looks the future up by it).
    func touch(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) -> Bool
    /// Whether a block that missed should be cached. A policy may remember the refusal (a
    /// ghost) to admit the block on a later sighting. Always true for `lru` and `opt`.
    func admits(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) -> Bool
    /// Removes the block that should leave next and returns it (nil when empty).
    func evict() -> UInt64?
    /// Caches `block`, which is not cached; the caller made room (`residentCount < capacityBlocks`).
    func insert(_ block: UInt64, parent: UInt64?, depth: Int, now: Int)
    /// Forgets a cached block without counting it as evicted (no ghost). False if not cached.
    @discardableResult
    func remove(_ block: UInt64) -> Bool
    /// True when `admits` is always true and has no side effects, so a caller need not ask
    /// (the store then skips a lock per put).
    var admitsEverything: Bool { get }
}

extension BlockCachePolicy {
    /// One reference under the replay rules; returns whether it hit.
    @inline(__always)
    public func access(block: UInt64, parent: UInt64?, depth: Int, now: Int) -> Bool {
        if touch(block, parent: parent, depth: depth, now: now) { return true }
        guard admits(block, parent: parent, depth: depth, now: now) else { return false }
        if residentCount >= capacityBlocks { _ = evict() }
        guard residentCount < capacityBlocks else { return false }
        insert(block, parent: parent, depth: depth, now: now)
        return false
    }

    public func admits(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) -> Bool { true }
    public var admitsEverything: Bool { false }
}

/// Least recently used: the baseline every other policy is measured against.
public final class LRUBlockPolicy: BlockCachePolicy {
    public let name = "lru"
    public var admitsEverything: Bool { true }
    public let capacityBlocks: Int
    private var index: BlockIndex
    private var lists: SlotLists
    private var free: FreeSlots
    private var blocks: [UInt64]

    public init(capacityBlocks: Int) {
        self.capacityBlocks = max(1, capacityBlocks)
        index = BlockIndex(capacity: self.capacityBlocks)
        lists = SlotLists(slots: self.capacityBlocks, lists: 1)
        free = FreeSlots(count: self.capacityBlocks)
        blocks = Array(repeating: 0, count: self.capacityBlocks)
    }

    public var residentCount: Int { lists.counts[0] }
    public func contains(_ block: UInt64) -> Bool { index.find(block) != nil }

    public func touch(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) -> Bool {
        guard let slot = index.find(block) else { return false }
        lists.remove(slot)
        lists.pushHead(slot, list: 0)
        return true
    }

    public func evict() -> UInt64? {
        guard let victim = lists.tail(0) else { return nil }
        let block = blocks[victim]
        drop(victim)
        return block
    }

    public func insert(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) {
        guard let slot = free.take() else { return }
        blocks[slot] = block
        index.set(block, slot)
        lists.pushHead(slot, list: 0)
    }

    public func remove(_ block: UInt64) -> Bool {
        guard let slot = index.find(block) else { return false }
        drop(slot)
        return true
    }

    private func drop(_ slot: Int) {
        lists.remove(slot)
        index.remove(blocks[slot])
        free.give(slot)
    }
}

/// Belady's offline optimum (MIN): evicts the resident block whose next use is farthest in
/// the future. It needs the whole reference stream up front; next uses are precomputed once,
/// and residents sit in an indexed max-heap keyed by next use. It always inserts on a miss
/// (as the replay rules ask), so a block never used again is the next victim.
public final class OptimalBlockPolicy: BlockCachePolicy {
    public let name = "opt"
    public var admitsEverything: Bool { true }
    public let capacityBlocks: Int
    private let stream: [UInt64]
    private let nextUse: [Int]
    private var index: BlockIndex
    private var free: FreeSlots
    private var blocks: [UInt64]
    private var key: [Int]
    private var heap: [Int32]
    private var position: [Int32]

    /// `stream` is every reference in order; `access(now:)` must be called with positions in it.
    public init(capacityBlocks: Int, stream: [UInt64]) {
        self.capacityBlocks = max(1, capacityBlocks)
        self.stream = stream
        var next = Array(repeating: Int.max, count: stream.count)
        var last: [UInt64: Int] = [:]
        for position in stream.indices.reversed() {
            if let later = last[stream[position]] { next[position] = later }
            last[stream[position]] = position
        }
        nextUse = next
        index = BlockIndex(capacity: self.capacityBlocks)
        free = FreeSlots(count: self.capacityBlocks)
        blocks = Array(repeating: 0, count: self.capacityBlocks)
        key = Array(repeating: 0, count: self.capacityBlocks)
        heap = []
        heap.reserveCapacity(self.capacityBlocks)
        position = Array(repeating: -1, count: self.capacityBlocks)
    }

    public var residentCount: Int { heap.count }
    public func contains(_ block: UInt64) -> Bool { index.find(block) != nil }

    /// The next use of the reference at `now`. A reference that does not match the stream the
    /// policy was built from has no known future: treated as never used again rather than
    /// trusting a wrong position.
    @inline(__always)
    private func nextUse(of block: UInt64, at now: Int) -> Int {
        now >= 0 && now < stream.count && stream[now] == block ? nextUse[now] : Int.max
    }

    public func touch(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) -> Bool {
        guard let slot = index.find(block) else { return false }
        key[slot] = nextUse(of: block, at: now)
        siftUp(Int(position[slot]))
        siftDown(Int(position[slot]))
        return true
    }

    public func evict() -> UInt64? {
        guard let victim = heap.first.map({ Int($0) }) else { return nil }
        removeTop()
        index.remove(blocks[victim])
        free.give(victim)
        return blocks[victim]
    }

    public func insert(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) {
        guard let slot = free.take() else { return }
        blocks[slot] = block
        key[slot] = nextUse(of: block, at: now)
        index.set(block, slot)
        position[slot] = Int32(heap.count)
        heap.append(Int32(slot))
        siftUp(heap.count - 1)
    }

    public func remove(_ block: UInt64) -> Bool {
        guard let slot = index.find(block) else { return false }
        // Raise it to the top, then remove the top.
        key[slot] = Int.max
        siftUp(Int(position[slot]))
        while heap.first.map({ Int($0) }) != slot, Int(position[slot]) > 0 {
            let parent = (Int(position[slot]) - 1) / 2
            swapAt(Int(position[slot]), parent)
        }
        removeTop()
        index.remove(block)
        free.give(slot)
        return true
    }

    private func removeTop() {
        let last = heap.removeLast()
        position[Int(last)] = -1
        if !heap.isEmpty {
            position[Int(heap[0])] = -1
            heap[0] = last
            position[Int(last)] = 0
            siftDown(0)
        }
    }

    private func swapAt(_ a: Int, _ b: Int) {
        heap.swapAt(a, b)
        position[Int(heap[a])] = Int32(a)
        position[Int(heap[b])] = Int32(b)
    }

    private func siftUp(_ start: Int) {
        var child = start
        while child > 0 {
            let parent = (child - 1) / 2
            guard key[Int(heap[child])] > key[Int(heap[parent])] else { return }
            swapAt(child, parent)
            child = parent
        }
    }

    private func siftDown(_ start: Int) {
        var parent = start
        while true {
            let left = 2 * parent + 1, right = left + 1
            var largest = parent
            if left < heap.count, key[Int(heap[left])] > key[Int(heap[largest])] { largest = left }
            if right < heap.count, key[Int(heap[right])] > key[Int(heap[largest])] { largest = right }
            if largest == parent { return }
            swapAt(parent, largest)
            parent = largest
        }
    }
}

/// Prefix-aware LRU. A KV block is only usable if every block before it in the prefix is
/// cached too, so a block is worth at least as much as its descendants: evicting an ancestor
/// first wastes the descendants still cached. Two rules follow:
/// - placement: a block touched right after its parent is linked just behind the parent
///   (towards the eviction end), so within one request's chain the deepest block leaves first;
/// - victim choice: from the LRU end, the first block with no cached child is evicted (a
///   bounded walk; if it finds none, the LRU tail goes).
public final class PrefixLRUBlockPolicy: BlockCachePolicy {
    public let name = "prefix-lru"
    public var admitsEverything: Bool { true }
    public let capacityBlocks: Int
    /// How far from the LRU end a victim search looks for a leaf before giving up.
    static let leafSearchLimit = 64
    private var index: BlockIndex
    private var lists: SlotLists
    private var free: FreeSlots
    private var tree: PrefixTreeState

    public init(capacityBlocks: Int) {
        self.capacityBlocks = max(1, capacityBlocks)
        index = BlockIndex(capacity: self.capacityBlocks)
        lists = SlotLists(slots: self.capacityBlocks, lists: 1)
        free = FreeSlots(count: self.capacityBlocks)
        tree = PrefixTreeState(slots: self.capacityBlocks)
    }

    public var residentCount: Int { lists.counts[0] }
    public func contains(_ block: UInt64) -> Bool { index.find(block) != nil }

    public func touch(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) -> Bool {
        guard let slot = index.find(block) else { return false }
        lists.remove(slot)
        place(slot, parent: parent, now: now)
        tree.lastTouch[slot] = now
        return true
    }

    public func insert(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) {
        guard let slot = free.take() else { return }
        tree.attach(slot, block: block, parent: parent, now: now, index: index)
        index.set(block, slot)
        place(slot, parent: parent, now: now)
    }

    public func remove(_ block: UInt64) -> Bool {
        guard let slot = index.find(block) else { return false }
        drop(slot)
        return true
    }

    private func place(_ slot: Int, parent: UInt64?, now: Int) {
        if let anchor = tree.justTouchedParent(parent, now: now, index: index), lists.list(of: anchor) == 0 {
            lists.insert(slot, behind: anchor)
        } else {
            lists.pushHead(slot, list: 0)
        }
    }

    public func evict() -> UInt64? {
        guard var candidate = lists.tail(0) else { return nil }
        var victim = candidate
        for _ in 0..<Self.leafSearchLimit {
            if tree.children[candidate] == 0 { victim = candidate; break }
            guard let newer = lists.newer(candidate) else { break }
            candidate = newer
        }
        let block = tree.blocks[victim]
        drop(victim)
        return block
    }

    private func drop(_ slot: Int) {
        lists.remove(slot)
        tree.detach(slot, index: index)
        index.remove(tree.blocks[slot])
        free.give(slot)
    }
}

/// Per-slot prefix-tree bookkeeping shared by the prefix-aware policies: the block, its
/// parent's id, when it was last touched, and how many of its children are cached.
struct PrefixTreeState {
    var blocks: [UInt64]
    var parents: [UInt64]
    var hasParent: [Bool]
    var lastTouch: [Int]
    var children: [Int32]

    init(slots: Int) {
        blocks = Array(repeating: 0, count: slots)
        parents = Array(repeating: 0, count: slots)
        hasParent = Array(repeating: false, count: slots)
        lastTouch = Array(repeating: Int.min, count: slots)
        children = Array(repeating: 0, count: slots)
    }

    /// The parent's slot if it is cached and was the reference just before `now` (so this
    /// block continues the same request's chain).
    @inline(__always)
    func justTouchedParent(_ parent: UInt64?, now: Int, index: BlockIndex) -> Int? {
        guard let parent, let slot = index.find(parent), lastTouch[slot] == now - 1 else { return nil }
        return slot
    }

    mutating func attach(_ slot: Int, block: UInt64, parent: UInt64?, now: Int, index: BlockIndex) {
        blocks[slot] = block
        lastTouch[slot] = now
        children[slot] = 0
        hasParent[slot] = parent != nil
        parents[slot] = parent ?? 0
        if let parent, let parentSlot = index.find(parent) { children[parentSlot] += 1 }
    }

    mutating func detach(_ slot: Int, index: BlockIndex) {
        // The count can be off only if a parent was evicted before its child and cached again
        // later; clamping keeps it a usable hint rather than a wrong invariant.
        if hasParent[slot], let parentSlot = index.find(parents[slot]), children[parentSlot] > 0 {
            children[parentSlot] -= 1
        }
    }
}
