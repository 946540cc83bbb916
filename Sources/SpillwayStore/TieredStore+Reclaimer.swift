import Atomics
import DequeModule
import Dispatch
import Logging
import SpillwayCore
import SpillwayPolicy

#if canImport(Glibc)
import Glibc
#endif

/// Making room: where a new page goes (placement and admission), freeing a tier by taking the
/// policy's victims and demoting them where the policy says (or evicting them), and
/// evacuating a range a tier gives up.
extension TieredStore {
    /// An extent for a new page: the policy's placement tier, or the first tier below it whose
    /// policy admits the page (the last tier takes it regardless, unless
    /// `declinedPutsAreDropped`: then nil), making room there if it is full, else the first
    /// lower tier that has or can make room. `storeFull` only when pinned pages leave no way to
    /// free enough contiguous slots.
    func allocateForPut(_ key: PageKey, slots: Int, hints: PageHints) throws(SpillwayError) -> PageLocation? {
        var first = min(policy.initialTier(for: hints, tierCount: tiers.count), tiers.count - 1)
        while !policyEngine.admits(key, hints: hints, tier: first) {
            if first + 1 < tiers.count {
                first += 1
            } else if options.declinedPutsAreDropped {
                return nil
            } else {
                break
            }
        }
        if let extent = tiers[first].allocate(slotCount: slots) {
            if tiers[first].usedSlots > highSlots[first] && first + 1 < tiers.count { wake.signal() }
            return PageLocation(tier: first, extent: extent)
        }
        for index in first..<tiers.count {
            if let extent = makeRoom(onTier: index, slots: slots) {
                return PageLocation(tier: index, extent: extent)
            }
        }
        throw .storeFull(requiredSlots: slots)
    }

    /// Reclaims `tier` until `slots` contiguous slots can be allocated, and allocates them.
    /// Starts with a watermark-sized batch (amortizing the scan over many puts), then keeps
    /// freeing in steps, since fragmentation can hide a contiguous run; gives up when a round
    /// frees nothing (everything left is pinned or being moved).
    func makeRoom(onTier index: Int, slots: Int) -> Extent? {
        let tier = tiers[index]
        let capacity = tier.descriptor.capacitySlots
        guard slots <= capacity else { return nil }
        var target = index + 1 < tiers.count ? min(lowSlots[index], capacity - slots) : capacity - slots
        var stalled = 0
        var stalledSince: UInt64 = 0
        // 64 rounds that free something (fragmentation can hide a contiguous run); rounds that
        // free nothing are bounded separately below.
        var round = 0
        while round < 64 {
            if let extent = tier.allocate(slotCount: slots) { return extent }
            let before = tier.usedSlots
            target = max(0, round == 0 ? min(target, before - slots) : min(target, before - max(slots, 8)))
            reclaim(tier: index, toUsedSlots: target)
            if let extent = tier.allocate(slotCount: slots) { return extent }
            if tier.usedSlots >= before {
                // Nothing left: every candidate was pinned, or busy — being put, or moved by
                // another mover that is freeing space right now. Busy passes, so give the
                // others a moment a few times before saying there is no room, and while a
                // mover holds keys, wait for it (at most 200 ms: a loaded machine may not run
                // it for a while).
                if stalled == 0 { stalledSince = monotonicNanoseconds() }
                stalled += 1
                if stalled >= 8, activeMovers.load(ordering: .relaxed) == 0 || monotonicNanoseconds() &- stalledSince > 200_000_000 {
                    return nil
                }
                sched_yield()
            } else {
                stalled = 0
                round += 1
            }
        }
        return nil
    }

    /// Frees slots on `tier` until at most `target` are used: demotes the coldest movable pages
    /// one tier down (making room there first, recursively), or evicts them from the last tier
    /// (or from this one, when nothing below can take them).
    /// Serialized per tier; cascades lock tiers top-down, so they cannot deadlock.
    func reclaim(tier index: Int, toUsedSlots target: Int) {
        guard tiers[index].usedSlots > target else { return }
        let started = DispatchTime.now().uptimeNanoseconds
        defer { metrics.recordReclaim(tier: index, nanoseconds: Int64(DispatchTime.now().uptimeNanoseconds - started)) }
        reclaimLocks[index].withLock { _ in
            var offeredInVain = 0
            var resynchronized = false
            while tiers[index].usedSlots > target, !closedFlag.load(ordering: .relaxed) {
                let excess = tiers[index].usedSlots - target
                let count = min(excess, 4096)
                var victims = policyEngine.victims(tier: index, count: count)
                if victims.isEmpty {
                    // The tier holds pages its policy does not track (it never loses one, but a
                    // bug must cost a scan, not a full tier): hand them to it and try again.
                    guard !resynchronized else { break }
                    resynchronized = true
                    resynchronizePolicy(tier: index)
                    victims = policyEngine.victims(tier: index, count: count)
                    if victims.isEmpty { break }
                }
                var progressed = 0
                var start = 0
                while start < victims.count {
                    let end = min(victims.count, start + ThreadBatch.moveChunk)
                    let chunk = Array(victims[start..<end])
                    start = end
                    guard tiers[index].usedSlots > target else {
                        // Taken but not needed after all: back to the policy.
                        retrack(chunk, tier: index)
                        continue
                    }
                    if let destination = policyEngine.demotionTarget(from: index, isFull: { self.tiers[$0].usedSlots >= self.highSlots[$0] }) {
                        let moved = movePages(chunk, from: index, to: destination)
                        if moved > 0 {
                            progressed += moved
                        } else if tiers[destination].freeSlots < chunkSlots(chunk, tier: index) {
                            // Nothing below could take them (full of pinned pages): a cache drops
                            // its coldest pages rather than refuse new ones.
                            progressed += evict(chunk, tier: index)
                        } else {
                            // There was room below: they could not move because they were busy
                            // (a put or another mover holds them). Never drop a page for that.
                            retrack(chunk, tier: index)
                        }
                    } else {
                        progressed += evict(chunk, tier: index)
                    }
                }
                // Victims that could not leave (pinned, busy) went back to the policy's
                // protected end, so asking again offers others; give up once every page the
                // policy tracks was offered without any leaving.
                if progressed == 0 {
                    offeredInVain += victims.count
                    if offeredInVain > policyEngine.trackedCount(tier: index) { break }
                } else {
                    offeredInVain = 0
                }
            }
        }
    }

    /// Slots the pages among `keys` still on `tier` take there.
    private func chunkSlots(_ keys: [PageKey], tier: Int) -> Int {
        keys.reduce(0) { total, key in
            guard let snapshot = directory.snapshot(of: key), snapshot.location.tier == tier else { return total }
            return total + Int(snapshot.location.extent.slotCount)
        }
    }

    /// Moves every page whose extent overlaps `slots` on `tier` to the tier below (else the one
    /// above), making room there as usual. Returns how many pages are still in the range
    /// (pinned or failed moves); the tier must not give the range up unless this is 0.
    func evacuate(tier index: Int, slots: Range<Int>) -> Int {
        func pagesInRange() -> [PageKey] {
            directory.allPages().filter { page in
                page.location.tier == index && Int(page.location.extent.firstSlot) < slots.upperBound
                    && Int(page.location.extent.endSlot) > slots.lowerBound
            }.map(\.key)
        }
        let targets = (index + 1 < tiers.count ? [index + 1] : []) + (index > 0 ? [index - 1] : [])
        var moved = 0
        for _ in 0..<3 {
            let keys = pagesInRange()
            if keys.isEmpty { break }
            for target in targets {
                var start = 0
                while start < keys.count {
                    let end = min(keys.count, start + ThreadBatch.moveChunk)
                    moved += movePages(Array(keys[start..<end]), from: index, to: target)
                    start = end
                }
            }
        }
        let left = pagesInRange().count
        logger.notice("tier gave up space: pages moved off it", metadata: [
            "tier": "\(tiers[index].descriptor.name)", "slots": "\(slots)", "moved": "\(moved)", "left": "\(left)",
        ])
        return left
    }
}
