import Synchronization

/// Free-space map of a tier: one bit per slot, allocation of contiguous runs.
///
/// Single slots (KV blocks) come from a stack of recently freed slots, else from a next-fit
/// cursor scanning 64 slots per word, so the common case is O(1); multi-slot extents (weight tensors) search for a run of clear
/// bits. All memory is allocated at init. One lock guards the map: allocation is a few
/// dozen nanoseconds, far below any tier's I/O cost, and it is the only shared state touched.
public final class SlotAllocator: Sendable {
    private struct State: ~Copyable {
        let words: UnsafeMutablePointer<UInt64>
        let wordCount: Int
        let capacity: Int
        var used = 0
        var cursor = 0
        /// Recently freed single slots (LIFO, so their memory is likely still cached). Entries
        /// may be stale (the bitmap scan can hand the slot out meanwhile); pops re-check the bit.
        let recent: UnsafeMutablePointer<UInt32>
        let recentCapacity: Int
        var recentCount = 0

        init(capacity: Int) {
            self.capacity = capacity
            recentCapacity = min(max(capacity, 1), 1 << 16)
            recent = .allocate(capacity: recentCapacity)
            wordCount = max(1, (capacity + 63) / 64)
            words = .allocate(capacity: wordCount)
            words.initialize(repeating: 0, count: wordCount)
            // Bits past the end are permanently "used" so scans never hand them out.
            let tail = capacity % 64
            if tail != 0 { words[wordCount - 1] = ~0 << UInt64(tail) }
            if capacity == 0 { words[0] = ~0 }
        }

        deinit {
            words.deallocate()
            recent.deallocate()
        }

        func isSet(_ slot: Int) -> Bool { words[slot >> 6] & (1 << UInt64(slot & 63)) != 0 }

        mutating func mark(_ first: Int, _ count: Int, used value: Bool) {
            for slot in first..<(first + count) {
                let bit: UInt64 = 1 << UInt64(slot & 63)
                precondition(isSet(slot) != value, "slot \(slot) double \(value ? "allocation" : "release")")
                if value { words[slot >> 6] |= bit } else { words[slot >> 6] &= ~bit }
            }
            used += value ? count : -count
        }

        mutating func allocateOne() -> Int? {
            guard used < capacity else { return nil }
            while recentCount > 0 {
                recentCount -= 1
                let slot = Int(recent[recentCount])
                if !isSet(slot) {
                    words[slot >> 6] |= 1 << UInt64(slot & 63)
                    used += 1
                    return slot
                }
            }
            var wordIndex = cursor
            for _ in 0..<wordCount {
                let word = words[wordIndex]
                if word != ~0 {
                    let bit = (~word).trailingZeroBitCount
                    words[wordIndex] = word | (1 << UInt64(bit))
                    used += 1
                    cursor = wordIndex
                    return wordIndex * 64 + bit
                }
                wordIndex += 1
                if wordIndex == wordCount { wordIndex = 0 }
            }
            return nil
        }

        mutating func allocateRun(_ count: Int) -> Int? {
            guard capacity - used >= count else { return nil }
            // Next-fit from the cursor, wrapping once.
            let startSlot = cursor * 64
            var runStart = -1
            var runLength = 0
            var scanned = 0
            var slot = startSlot
            while scanned < capacity + count {
                if slot == capacity { slot = 0; runLength = 0 }
                if isSet(slot) {
                    runLength = 0
                    // Skip full words quickly.
                    if slot & 63 == 0 && words[slot >> 6] == ~0 {
                        let skip = min(64, capacity - slot)
                        slot += skip
                        scanned += skip
                        continue
                    }
                } else {
                    if runLength == 0 { runStart = slot }
                    runLength += 1
                    if runLength == count {
                        mark(runStart, count, used: true)
                        cursor = (runStart + count) / 64 % wordCount
                        return runStart
                    }
                }
                slot += 1
                scanned += 1
            }
            return nil
        }
    }

    private let state: Locked<State>
    /// Mirror of `state.used` readable without the lock (watermark checks on the put path).
    private let usedMirror = Atomic<Int>(0)
    public let capacity: Int

    public init(capacity: Int) {
        precondition(capacity >= 0 && capacity <= Int(UInt32.max))
        self.capacity = capacity
        state = Locked(State(capacity: capacity))
    }

    /// A run of `count` contiguous free slots, or nil.
    public func allocate(count: Int) -> Extent? {
        guard count > 0, count <= capacity else { return nil }
        let first: Int? = state.withLock { state in
            let first = count == 1 ? state.allocateOne() : state.allocateRun(count)
            usedMirror.store(state.used, ordering: .relaxed)
            return first
        }
        return first.map { Extent(firstSlot: UInt32($0), slotCount: UInt32(count)) }
    }

    /// Marks a specific extent used (recovery of a persistent tier). False if any slot of it is
    /// already used or it lies outside the capacity.
    public func reserve(_ extent: Extent) -> Bool {
        guard extent.slotCount > 0, Int(extent.endSlot) <= capacity else { return false }
        return state.withLock { state in
            for slot in Int(extent.firstSlot)..<Int(extent.endSlot) where state.isSet(slot) { return false }
            state.mark(Int(extent.firstSlot), Int(extent.slotCount), used: true)
            usedMirror.store(state.used, ordering: .relaxed)
            return true
        }
    }

    /// Frees an extent. Releasing a slot that is not allocated is a store bug and traps.
    public func release(_ extent: Extent) {
        precondition(Int(extent.endSlot) <= capacity, "extent \(extent) outside capacity \(capacity)")
        state.withLock { state in
            state.mark(Int(extent.firstSlot), Int(extent.slotCount), used: false)
            if extent.slotCount == 1 && state.recentCount < state.recentCapacity {
                state.recent[state.recentCount] = extent.firstSlot
                state.recentCount += 1
            }
            usedMirror.store(state.used, ordering: .relaxed)
        }
    }

    /// The runs of allocated slots inside `range` (what a tier must copy when it moves that
    /// part of its space elsewhere).
    public func allocatedRuns(in range: Range<Int>) -> [Range<Int>] {
        let range = range.clamped(to: 0..<capacity)
        return state.withLock { state in
            var runs: [Range<Int>] = []
            var start = -1
            for slot in range {
                if state.isSet(slot) {
                    if start < 0 { start = slot }
                } else if start >= 0 {
                    runs.append(start..<slot)
                    start = -1
                }
            }
            if start >= 0 { runs.append(start..<range.upperBound) }
            return runs
        }
    }

    /// Slots allocated now (a relaxed read: exact when no allocation races with it).
    public var usedSlots: Int { usedMirror.load(ordering: .relaxed) }

}
