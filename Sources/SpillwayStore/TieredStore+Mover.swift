import Atomics
import DequeModule
import Dispatch
import Logging
import SpillwayCore
import SpillwayPolicy

#if canImport(Glibc)
import Glibc
#endif

/// Moving pages between tiers: claims, copies with CRC verification, commits, eviction,
/// quarantine, and keeping the policy told about every page that moves or leaves.
extension TieredStore {
    /// Returns a vacated extent (one the directory no longer points at and nobody reads) to its tier.
    @inline(__always)
    func release(_ location: PageLocation) {
        tiers[location.tier].release(location.extent)
    }

    @inline(__always)
    func endRead(_ snapshot: PageSnapshot) {
        if let vacated = directory.endRead(snapshot) { release(vacated) }
    }

    func abortMove(_ claim: PageSnapshot) {
        if let vacated = directory.abortMove(claim) { release(vacated) }
    }

    /// Drops a page whose bytes failed their checksum: counted, logged, never served.
    /// `keyLocked`: the caller holds the key's stripe (a mover); otherwise it is taken here.
    func quarantine(_ snapshot: PageSnapshot, keyLocked: Bool = false) {
        let tier = tiers[snapshot.location.tier].descriptor.name
        tierCounters[snapshot.location.tier].checksumFailures.add(1)
        logger.error("checksum mismatch: page dropped", metadata: [
            "key": "\(snapshot.key)", "tier": "\(tier)", "location": "\(snapshot.location)",
        ])
        // A pinned page is marked corrupt instead (never served, removed at its last unpin).
        let drop = {
            let (removed, vacated) = self.directory.removeIfCurrent(snapshot, quarantine: true)
            self.policyEngine.removed(snapshot.key, tier: snapshot.location.tier)
            if removed && self.recordsMetadata[snapshot.location.tier] { self.tiers[snapshot.location.tier].retire(snapshot.location.extent) }
            if let vacated { self.release(vacated) }
        }
        if keyLocked { drop() } else { keyLocks.withLock(snapshot.key, drop) }
    }

    /// Hands back to `tier`'s policy the pages among `keys` still there that it does not track
    /// (victims that could not leave: busy, pinned, a failed move).
    func retrack(_ keys: some Sequence<PageKey>, tier: Int) {
        for key in keys {
            guard let snapshot = directory.snapshot(of: key), snapshot.location.tier == tier else { continue }
            policyEngine.track(key, hints: snapshot.hints, tier: tier)
        }
    }

    /// Hands every page on `tier` its policy does not track to the policy (a full scan of the
    /// directory; logged, since it means some path lost track of a page).
    func resynchronizePolicy(tier: Int) {
        let pages = directory.allPages().filter { $0.location.tier == tier && !$0.isCorrupt }
        var added = 0
        for page in pages where policyEngine.track(page.key, hints: page.hints, tier: tier) { added += 1 }
        if added > 0 {
            logger.warning("policy resynchronized with the directory", metadata: ["tier": "\(tiers[tier].descriptor.name)", "pages": "\(added)"])
        }
    }

    func evict(_ keys: [PageKey], tier index: Int) -> Int {
        var evicted = 0
        for key in keys {
            // A busy key (being put or removed) is skipped, never waited for.
            // A put making room on the last tier may hold the victim's stripe itself: then it
            // evicts it anyway (skipping it would change which page the policy evicts, once in
            // 4,096). Not on a tier above (the page could still be demoted: skipping keeps it),
            // nor on a persistent one (a batch put may already have retired that copy).
            let stripe = KeyLocks.stripe(key)
            guard let lock = keyLocks.tryLockUnlessOwned(stripe: stripe),
                  lock.locked || (!recordsMetadata[index] && index == tiers.count - 1)
            else {
                retrack([key], tier: index)
                continue
            }
            defer { if lock.locked { keyLocks.unlock(stripe: stripe) } }
            guard let snapshot = directory.snapshot(of: key), snapshot.location.tier == index else { continue }
            guard snapshot.pinCount == 0 else {
                policyEngine.track(key, hints: snapshot.hints, tier: index)
                continue
            }
            let (removed, vacated) = directory.removeIfCurrent(snapshot)
            if removed && recordsMetadata[index] { tiers[index].retire(snapshot.location.extent) }
            if let vacated { release(vacated) }
            guard removed else {
                retrack([key], tier: index)
                continue
            }
            policyEngine.removed(key, tier: index)
            tierCounters[index].evictions.add(1)
            evicted += 1
        }
        return evicted
    }

    /// Moves pages from tier `source` to tier `target` (one batch of reads, one of writes),
    /// verifying each page's CRC32C on the way. Returns how many moved.
    func movePages(_ keys: [PageKey], from source: Int, to target: Int) -> Int {
        precondition(source != target && keys.count <= ThreadBatch.moveChunk)
        // Make room first, before claiming anything (claims hold reader counts).
        var needed = 0
        for key in keys {
            if let snapshot = directory.snapshot(of: key), snapshot.location.tier == source {
                needed += Int(snapshot.location.extent.slotCount)
            }
        }
        guard needed > 0 else { return 0 }
        let targetTier = tiers[target]
        if targetTier.freeSlots < needed {
            let capacity = targetTier.descriptor.capacitySlots
            let goal = target + 1 < tiers.count && target > source ? min(lowSlots[target], capacity - needed) : capacity - needed
            reclaim(tier: target, toUsedSlots: max(0, goal))
        }
        var moves: [(claim: PageSnapshot, destination: Extent)] = []
        moves.reserveCapacity(keys.count)
        // Held from the claim to the commit, so a put or remove of the key cannot interleave
        // with the move's journal record; busy keys are skipped (the caller may hold stripes).
        var held = HeldStripes()
        // From here the keys this mover takes are busy for everyone else (see `makeRoom`).
        activeMovers.wrappingIncrement(ordering: .relaxed)
        defer {
            held.releaseAll(in: keyLocks)
            activeMovers.wrappingDecrement(ordering: .relaxed)
        }
        for key in keys {
            guard held.tryAcquire(key, in: keyLocks), let claim = directory.beginMove(key, fromTier: source) else {
                retrack([key], tier: source)
                continue
            }
            guard let extent = targetTier.allocate(slotCount: Int(claim.location.extent.slotCount)) else {
                abortMove(claim)
                retrack([key], tier: source)
                continue
            }
            moves.append((claim, extent))
        }
        guard !moves.isEmpty else { return 0 }
        let copyStart = monotonicNanoseconds()
        let statuses = copy(moves, from: source, to: target)
        policyEngine.observe(tier: target, write: true, nanoseconds: monotonicNanoseconds() &- copyStart, pages: moves.count)
        var moved = 0
        for (index, move) in moves.enumerated() {
            let destination = PageLocation(tier: target, extent: move.destination)
            switch statuses[index] {
            case .copied:
                let (committed, vacated) = directory.commitMove(move.claim, to: destination)
                if committed && recordsMetadata[source] { tiers[source].retire(move.claim.location.extent) }
                if let vacated { release(vacated) }
                if committed {
                    policyEngine.removed(move.claim.key, tier: source)
                    policyEngine.inserted(move.claim.key, hints: move.claim.hints, tier: target)
                    if target > source {
                        tierCounters[source].demotionsOut.add(1)
                    } else {
                        tierCounters[target].promotionsIn.add(1)
                    }
                    tierCounters[target].bytesWritten.add(move.claim.length)
                    moved += 1
                } else {
                    targetTier.release(move.destination)
                    retrack([move.claim.key], tier: source)
                }
            case .failed(let errno, let tierIndex):
                tierCounters[tierIndex].ioErrors.add(1)
                logger.warning("tier move failed", metadata: [
                    "key": "\(move.claim.key)", "tier": "\(tiers[tierIndex].descriptor.name)", "errno": "\(errno)",
                ])
                targetTier.release(move.destination)
                abortMove(move.claim)
                retrack([move.claim.key], tier: source)
            case .corrupt(let actual):
                targetTier.release(move.destination)
                abortMove(move.claim)
                logger.error("checksum mismatch during move", metadata: [
                    "expected": "\(move.claim.checksum)", "actual": "\(actual)",
                ])
                quarantine(move.claim, keyLocked: true)
            }
        }
        return moved
    }

    enum CopyStatus {
        case copied
        case failed(errno: Int32, tier: Int)
        case corrupt(actual: UInt32)
    }

    /// The data movement of `movePages`: straight into the target's host arena, straight out of
    /// the source's, or (neither is host memory) one page at a time through a staging buffer.
    func copy(_ moves: [(claim: PageSnapshot, destination: Extent)], from source: Int, to target: Int) -> [CopyStatus] {
        let batch = ThreadBatch.current()
        let sourceTier = tiers[source]
        let targetTier = tiers[target]
        func verify(_ base: UnsafeMutableRawPointer, _ move: (claim: PageSnapshot, destination: Extent)) -> CopyStatus {
            let actual = CRC32C.checksum(UnsafeRawBufferPointer(start: base, count: move.claim.length))
            return actual == move.claim.checksum ? .copied : .corrupt(actual: actual)
        }
        if let arena = targetTier.hostMemory {
            for move in moves {
                batch.append(TierIO(operation: .read, extent: move.claim.location.extent,
                                    buffer: arena.baseAddress! + Int(move.destination.firstSlot) * slotSize, length: move.claim.length))
            }
            batch.run(on: sourceTier, inline: inlineTiers[source])
            return moves.indices.map { index in
                let status = batch[index].status
                guard status == 0 else { return .failed(errno: status, tier: source) }
                return verify(arena.baseAddress! + Int(moves[index].destination.firstSlot) * slotSize, moves[index])
            }
        }
        if let arena = sourceTier.hostMemory {
            var statuses = [CopyStatus](repeating: .copied, count: moves.count)
            var entries: [Int] = []
            for (index, move) in moves.enumerated() {
                let bytes = arena.baseAddress! + Int(move.claim.location.extent.firstSlot) * slotSize
                statuses[index] = verify(bytes, move)
                guard case .copied = statuses[index] else { continue }
                batch.append(TierIO(operation: .write, extent: move.destination, buffer: bytes, length: move.claim.length,
                                    key: move.claim.key, checksum: move.claim.checksum))
                entries.append(index)
            }
            guard batch.count > 0 else { return statuses }
            batch.run(on: targetTier, inline: inlineTiers[target])
            for (entry, index) in entries.enumerated() where batch[entry].status != 0 {
                statuses[index] = .failed(errno: batch[entry].status, tier: target)
            }
            return statuses
        }
        return moves.map { move in
            staging.withBuffer { buffer -> CopyStatus in
                batch.reset()
                batch.append(TierIO(operation: .read, extent: move.claim.location.extent, buffer: buffer, length: move.claim.length))
                batch.run(on: sourceTier, inline: inlineTiers[source])
                guard batch[0].status == 0 else { return .failed(errno: batch[0].status, tier: source) }
                let verdict = verify(buffer, move)
                guard case .copied = verdict else { return verdict }
                batch.reset()
                batch.append(TierIO(operation: .write, extent: move.destination, buffer: buffer, length: move.claim.length,
                                    key: move.claim.key, checksum: move.claim.checksum))
                batch.run(on: targetTier, inline: inlineTiers[target])
                return batch[0].status == 0 ? .copied : .failed(errno: batch[0].status, tier: target)
            }
        }
    }
}
