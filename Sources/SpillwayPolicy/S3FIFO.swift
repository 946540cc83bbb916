/// S3-FIFO (Yang et al., SOSP '23): most blocks of a KV trace are referenced once (each
/// request's unique suffix), so new blocks enter a small FIFO (10 % of the capacity) and only
/// those referenced again while there are promoted to the main FIFO; the rest leave as ids in a
/// ghost FIFO, and a miss on a ghost goes straight to main. Main evicts with a second chance
/// (a 2-bit frequency, decremented on each pass). A scan of one-time blocks therefore churns
/// the small queue and never flushes reused blocks out of main.
///
/// `smallFraction` and `ghostMultiple` default to the paper's 10 % and 1× main; ghosts are
/// ids only (bytes, against a KV block's megabytes), so a larger multiple is cheap and helps
/// when reuse gaps are long. `s3fifo-prefix` uses 30 % and 4× (measured in docs/policies.md).
///
/// With `prefixAware`, a new block that follows a hit in the same request (a one-off suffix
/// on a reused prefix, usually) is only remembered as a ghost and admitted on its second
/// sighting, and the prefix-tree rules of `PrefixLRUBlockPolicy` are added: a block inserted
/// right after its parent is linked just behind it (so a chain leaves deepest-first), and main
/// gives a block with cached children another pass instead of evicting it (a bounded number of
/// times per eviction).
public final class S3FIFOBlockPolicy: BlockCachePolicy {
    public let name: String
    public let capacityBlocks: Int
    private let prefixAware: Bool
    private let smallTarget: Int
    private static let small = 0, main = 1
    private static let maxFrequency: UInt8 = 3
    /// Extra passes main may give to blocks with cached children during one eviction.
    private static let ancestorPassLimit = 64
    private var index: BlockIndex
    private var lists: SlotLists
    private var free: FreeSlots
    private var frequency: [UInt8]
    private var ghosts: GhostRing
    private var tree: PrefixTreeState
    /// Whether the current request (identified by the position of its first reference) hit.
    private var requestHit: (request: Int, hit: Bool) = (-1, false)
    /// The block `admits` found among the ghosts (it goes to main on insert), if any.
    private var admittedGhost: UInt64?
    /// The block the current `evict` dropped.
    private var evicted: UInt64?

    public init(capacityBlocks: Int, prefixAware: Bool = false, smallFraction: Double = 0.1, ghostMultiple: Double = 1) {
        self.capacityBlocks = max(1, capacityBlocks)
        self.prefixAware = prefixAware
        name = prefixAware ? "s3fifo-prefix" : "s3fifo"
        smallTarget = max(1, Int(Double(self.capacityBlocks) * smallFraction))
        index = BlockIndex(capacity: self.capacityBlocks)
        lists = SlotLists(slots: self.capacityBlocks, lists: 2)
        free = FreeSlots(count: self.capacityBlocks)
        frequency = Array(repeating: 0, count: self.capacityBlocks)
        // The ghost FIFO remembers as many ids as main holds, as in the paper.
        ghosts = GhostRing(capacity: max(1, Int(Double(self.capacityBlocks - smallTarget) * ghostMultiple)))
        tree = PrefixTreeState(slots: self.capacityBlocks)
    }

    public var residentCount: Int { lists.counts[Self.small] + lists.counts[Self.main] }
    public func contains(_ block: UInt64) -> Bool { index.find(block) != nil }

    /// Tracks whether the current request (identified by the position of its first
    /// reference, `now - depth`) has hit so far.
    @inline(__always)
    private func noteRequest(depth: Int, now: Int) {
        if requestHit.request != now - depth { requestHit = (now - depth, false) }
    }

    public func touch(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) -> Bool {
        noteRequest(depth: depth, now: now)
        guard let slot = index.find(block) else { return false }
        requestHit.hit = true
        if frequency[slot] < Self.maxFrequency { frequency[slot] += 1 }
        tree.lastTouch[slot] = now
        return true
    }

    public func admits(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) -> Bool {
        noteRequest(depth: depth, now: now)
        let remembered = ghosts.contains(block)
        if prefixAware, !remembered, requestHit.hit {
            // A new block after a reused prefix is a one-off suffix (a different question on a
            // shared document) far more often than the start of a reused chain: remember it and
            // admit it only on its second sighting.
            ghosts.push(block)
            return false
        }
        // Whether it was a ghost is decided now: making room may push ghosts out of the ring.
        admittedGhost = remembered ? block : nil
        return true
    }

    public func insert(_ block: UInt64, parent: UInt64?, depth: Int, now: Int) {
        guard let slot = free.take() else { return }
        let target: Int
        if admittedGhost == block || (admittedGhost == nil && ghosts.contains(block)) {
            ghosts.remove(block)
            target = Self.main
        } else {
            target = Self.small
        }
        admittedGhost = nil
        frequency[slot] = 0
        tree.attach(slot, block: block, parent: parent, now: now, index: index)
        index.set(block, slot)
        if prefixAware, let anchor = tree.justTouchedParent(parent, now: now, index: index), lists.list(of: anchor) == target {
            lists.insert(slot, behind: anchor)
        } else {
            lists.pushHead(slot, list: target)
        }
    }

    public func remove(_ block: UInt64) -> Bool {
        guard let slot = index.find(block) else { return false }
        lists.remove(slot)
        drop(slot)
        return true
    }

    public func evict() -> UInt64? {
        guard residentCount > 0 else { return nil }
        evicted = nil
        if lists.counts[Self.small] >= smallTarget || lists.counts[Self.main] == 0 {
            evictSmall()
        } else {
            evictMain()
        }
        return evicted
    }

    private func evictSmall() {
        while let tail = lists.tail(Self.small) {
            lists.remove(tail)
            if frequency[tail] > 0 {
                // Referenced again while in probation: it is reused, keep it in main.
                frequency[tail] = 0
                lists.pushHead(tail, list: Self.main)
            } else {
                ghosts.push(tree.blocks[tail])
                drop(tail)
                return
            }
        }
        evictMain()
    }

    private func evictMain() {
        var ancestorPasses = Self.ancestorPassLimit
        while let tail = lists.tail(Self.main) {
            lists.remove(tail)
            if frequency[tail] > 0 {
                frequency[tail] -= 1
                lists.pushHead(tail, list: Self.main)
            } else if prefixAware, tree.children[tail] > 0, ancestorPasses > 0 {
                ancestorPasses -= 1
                lists.pushHead(tail, list: Self.main)
            } else {
                drop(tail)
                return
            }
        }
        // Main was empty after all: fall back to the small queue's tail.
        if let tail = lists.tail(Self.small) {
            lists.remove(tail)
            ghosts.push(tree.blocks[tail])
            drop(tail)
        }
    }

    private func drop(_ slot: Int) {
        evicted = tree.blocks[slot]
        tree.detach(slot, index: index)
        index.remove(tree.blocks[slot])
        free.give(slot)
    }
}
