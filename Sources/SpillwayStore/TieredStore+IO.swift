import Atomics
import DequeModule
import Dispatch
import Logging
import SpillwayCore
import SpillwayPolicy

#if canImport(Glibc)
import Glibc
#endif

/// The data path: single and batched puts and gets, commit and visibility, verification and
/// promotion on a lower-tier hit.
extension TieredStore {
    func putLocked(_ key: PageKey, _ bytes: UnsafeRawBufferPointer, tier: Int?, hints: PageHints) throws(SpillwayError) {
        let length = bytes.count
        guard length <= options.maxPageSize else { throw .pageTooLarge(length: length, limit: options.maxPageSize) }
        let location: PageLocation
        if let tier {
            guard tiers.indices.contains(tier) else { throw .invalidArgument("tier \(tier) does not exist (\(tiers.count) tiers)") }
            guard let extent = makeRoom(onTier: tier, slots: slotsNeeded(length)) else {
                throw .tierFull(tier: tiers[tier].descriptor.name)
            }
            location = PageLocation(tier: tier, extent: extent)
        } else {
            guard let placed = try allocateForPut(key, slots: slotsNeeded(length), hints: hints) else {
                try dropDeclined(key)
                return
            }
            location = placed
        }
        let stallStart = location.tier > 0 ? monotonicNanoseconds() : 0
        defer { if location.tier > 0 { tierCounters[location.tier].stallNanoseconds.add(Int(monotonicNanoseconds() &- stallStart)) } }
        if let base = UnsafeMutableRawPointer(bitPattern: hostBases[location.tier]) {
            // Host-memory tier: copy with streaming stores (no read of the destination lines),
            // checksumming the source in the same pass.
            let checksum = length > 0
                ? CRC32C.copyStreaming(to: base + Int(location.extent.firstSlot) * slotSize, from: bytes.baseAddress!, length: length)
                : CRC32C.checksum(bytes)
            try commitPut(key, location: location, length: length, checksum: checksum, hints: hints)
            return
        }
        let tier = tiers[location.tier]
        let batch = ThreadBatch.current()
        retireSupersededCopy(of: key, onTier: location.tier)
        // A persistent tier records the checksum with the page, so it is needed up front;
        // otherwise it is computed while the write is in flight.
        let early: UInt32? = recordsMetadata[location.tier] ? CRC32C.checksum(bytes) : nil
        batch.append(TierIO(operation: .write, extent: location.extent, buffer: bytes.baseAddress, length: length,
                            key: key, checksum: early ?? 0))
        batch.beginSubmission(inline: inlineTiers[location.tier])
        tier.submit(batch)
        let checksum = early ?? CRC32C.checksum(bytes)
        batch.wait()
        if let failure = batch.firstFailure {
            tier.release(location.extent)
            tierCounters[location.tier].ioErrors.add(1)
            throw .tierIO(tier: tier.descriptor.name, operation: "write", errno: failure.status)
        }
        try commitPut(key, location: location, length: length, checksum: checksum, hints: hints)
    }

    func slotsNeeded(_ length: Int) -> Int { max(1, (length + slotSize - 1) / slotSize) }

    @inline(__always)
    func checkOpen() throws(SpillwayError) {
        if closedFlag.load(ordering: .relaxed) { throw .closed }
    }

    /// A put no tier admitted (`declinedPutsAreDropped`): counted, and an older version of the
    /// key is removed, so the put never leaves stale bytes visible. (Caller holds the key's stripe.)
    func dropDeclined(_ key: PageKey) throws(SpillwayError) {
        counters.declinedPuts.add(1)
        guard directory.contains(key) else { return }
        let (old, release) = try directory.removeEntry(key)
        if let old { policyEngine.removed(key, tier: old.tier) }
        if let old, recordsMetadata[old.tier] { tiers[old.tier].retire(old.extent) }
        if let release { self.release(release) }
        try persistInvalidations(of: key)
    }

    /// Makes a written page visible, retires the copy it replaced on a persistent tier, and
    /// makes every superseded persistent copy of the key durably invalid before returning (the
    /// caller holds the key's stripe).
    func commitPut(_ key: PageKey, location: PageLocation, length: Int, checksum: UInt32, hints: PageHints)
        throws(SpillwayError)
    {
        let replaced: (old: PageLocation?, release: PageLocation?)
        do {
            replaced = try directory.replace(key, location: location, length: length, checksum: checksum, hints: hints)
        } catch {
            tiers[location.tier].release(location.extent)
            throw error
        }
        if let old = replaced.old, recordsMetadata[old.tier] { tiers[old.tier].retire(old.extent) }
        if let vacated = replaced.release { release(vacated) }
        if let old = replaced.old, old.tier == location.tier {
            // Stored again where it was: a reference, recorded without the policy lock.
            policyEngine.recordRewrite(key, tier: location.tier)
        } else {
            if let old = replaced.old { policyEngine.removed(key, tier: old.tier) }
            policyEngine.inserted(key, hints: hints, tier: location.tier)
        }
        counters.puts.add(1)
        tierCounters[location.tier].bytesWritten.add(length)
        try persistInvalidations(of: key)
    }

    /// Before a put writes `key` to persistent tier `tier`: retires the current copy if it is on
    /// that tier too, so its release record goes into the same journal append as the new
    /// page's record. (Caller holds the key's stripe; a pinned page is left alone: the put will
    /// fail on it.)
    func retireSupersededCopy(of key: PageKey, onTier tier: Int) {
        guard recordsMetadata[tier], let current = directory.snapshot(of: key), current.location.tier == tier,
              current.pinCount == 0
        else { return }
        tiers[tier].retire(current.location.extent, supersededByNextRecordOf: key)
    }

    /// Makes every persistent tier's invalidations of `key` durable; a failure fails the
    /// operation (it cannot promise that a restart will not bring back an older version).
    func persistInvalidations(of key: PageKey) throws(SpillwayError) {
        for index in persistentTiers {
            let status = tiers[index].persistInvalidations(of: key)
            if status != 0 {
                tierCounters[index].ioErrors.add(1)
                throw .tierIO(tier: tiers[index].descriptor.name, operation: "journal invalidation", errno: status)
            }
        }
    }

    func putChunk(_ requests: UnsafeMutableBufferPointer<PageWrite>, queueDepth: Int) -> Int {
        guard !closedFlag.load(ordering: .relaxed) else {
            for index in requests.indices { requests[index].error = .closed }
            return 0
        }
        return keyLocks.withLocked(count: requests.count, key: { requests[$0].key }) {
            putLocked(requests, queueDepth: queueDepth)
        }
    }

    /// `putChunk` with the keys' stripes held.
    private func putLocked(_ requests: UnsafeMutableBufferPointer<PageWrite>, queueDepth: Int) -> Int {
        return TemporaryBuffer.with((location: PageLocation, checksum: UInt32)?.self, count: requests.count) { plans in
            for index in requests.indices {
                plans.initializeElement(at: index, to: nil)
                requests[index].error = nil
                requests[index].declined = false
                let bytes = requests[index].bytes
                guard bytes.count <= options.maxPageSize else {
                    requests[index].error = .pageTooLarge(length: bytes.count, limit: options.maxPageSize)
                    continue
                }
                do throws(SpillwayError) {
                    guard let location = try allocateForPut(requests[index].key, slots: slotsNeeded(bytes.count), hints: requests[index].hints)
                    else {
                        try dropDeclined(requests[index].key)
                        requests[index].declined = true
                        continue
                    }
                    // A tier that records checksums needs it before the write; others may
                    // compute it while they copy (`checksumsOnCompletion`), else after.
                    plans[index] = (location, recordsMetadata[location.tier] ? CRC32C.checksum(bytes) : 0)
                    retireSupersededCopy(of: requests[index].key, onTier: location.tier)
                } catch {
                    requests[index].error = error
                }
            }
            let batch = ThreadBatch.current()
            for tierIndex in tiers.indices {
                batch.reset()
                batch.timesCompletions = true  // each request gets what it waited
                batch.checksumsOnCompletion = !recordsMetadata[tierIndex]
                for index in requests.indices {
                    guard let plan = plans[index], plan.location.tier == tierIndex else { continue }
                    batch.append(TierIO(operation: .write, extent: plan.location.extent,
                                        buffer: requests[index].bytes.baseAddress, length: requests[index].bytes.count,
                                        key: requests[index].key, checksum: plan.checksum))
                }
                guard batch.count > 0 else { continue }
                runAccounted(batch, tier: tierIndex, write: true, queueDepth: queueDepth)
                var entry = 0
                for index in requests.indices {
                    guard let plan = plans[index], plan.location.tier == tierIndex else { continue }
                    let status = batch[entry].status
                    requests[index].latencyNanoseconds = batch[entry].latencyNanoseconds
                    if !recordsMetadata[tierIndex] && status == 0 {
                        plans[index]!.checksum = batch[entry].hasComputedChecksum
                            ? batch[entry].computedChecksum : CRC32C.checksum(requests[index].bytes)
                    }
                    entry += 1
                    if status != 0 {
                        tiers[tierIndex].release(plan.location.extent)
                        tierCounters[tierIndex].ioErrors.add(1)
                        requests[index].error = .tierIO(tier: tiers[tierIndex].descriptor.name, operation: "write", errno: status)
                        plans[index] = nil
                    }
                }
            }
            var succeeded = 0
            for index in requests.indices {
                guard let plan = plans[index] else {
                    if requests[index].declined { succeeded += 1 }
                    continue
                }
                do throws(SpillwayError) {
                    try commitPut(requests[index].key, location: plan.location, length: requests[index].bytes.count, checksum: plan.checksum,
                                  hints: requests[index].hints)
                    succeeded += 1
                } catch {
                    requests[index].error = error
                }
            }
            plans.deinitialize()
            return succeeded
        }
    }

    /// Everything after the read of a page that is not a plain top-tier hit: status, checksum,
    /// counters, promotion, and ending the read.
    func finishRead(_ snapshot: PageSnapshot, buffer: UnsafeRawBufferPointer, status: Int32, computedChecksum: UInt32? = nil)
        throws(SpillwayError)
    {
        let tierIndex = snapshot.location.tier
        let tier = tiers[tierIndex]
        guard status == 0 else {
            endRead(snapshot)
            tierCounters[tierIndex].ioErrors.add(1)
            throw .tierIO(tier: tier.descriptor.name, operation: "read", errno: status)
        }
        let promoting = tierIndex > 0 && policy.shouldPromote(snapshot.hints, fromTier: tierIndex)
        if tier.descriptor.verifiesReads || promoting {
            let actual = computedChecksum ?? CRC32C.checksum(buffer)
            if actual != snapshot.checksum {
                endRead(snapshot)
                quarantine(snapshot)
                throw .checksumMismatch(key: snapshot.key, tier: tier.descriptor.name, expected: snapshot.checksum, actual: actual)
            }
        }
        // End our read first: the verified bytes are in `buffer`, and a promotion that finds no
        // other readers of the old location releases it at once.
        endRead(snapshot)
        if promoting { promote(snapshot, from: buffer) }
    }

    /// Copies a verified page (already in `buffer`) to the top tier and repoints the directory,
    /// if it is still the same version and unpinned.
    func promote(_ snapshot: PageSnapshot, from buffer: UnsafeRawBufferPointer) {
        // A key being put or removed is not promoted (never waited for on the read path).
        let stripe = KeyLocks.stripe(snapshot.key)
        guard keyLocks.tryLock(stripe: stripe) else {
            counters.promotionsSkipped.add(1)
            return
        }
        defer { keyLocks.unlock(stripe: stripe) }
        guard let claim = directory.beginMove(snapshot.key, fromTier: snapshot.location.tier) else { return }
        guard claim.version == snapshot.version, let extent = tiers[0].allocate(slotCount: Int(claim.location.extent.slotCount)) else {
            abortMove(claim)
            counters.promotionsSkipped.add(1)
            wake.signal()
            return
        }
        let batch = ThreadBatch.current()
        batch.append(TierIO(operation: .write, extent: extent, buffer: buffer.baseAddress, length: snapshot.length,
                            key: snapshot.key, checksum: snapshot.checksum))
        batch.run(on: tiers[0], inline: inlineTiers[0])
        let destination = PageLocation(tier: 0, extent: extent)
        guard batch[0].status == 0 else {
            tierCounters[0].ioErrors.add(1)
            tiers[0].release(extent)
            abortMove(claim)
            return
        }
        let (committed, vacated) = directory.commitMove(claim, to: destination)
        if committed && recordsMetadata[claim.location.tier] { tiers[claim.location.tier].retire(claim.location.extent) }
        if let vacated { release(vacated) }
        guard committed else {
            tiers[0].release(extent)
            return
        }
        policyEngine.removed(snapshot.key, tier: claim.location.tier)
        policyEngine.inserted(snapshot.key, hints: claim.hints, tier: 0)
        tierCounters[0].promotionsIn.add(1)
        tierCounters[0].bytesWritten.add(snapshot.length)
        if tiers[0].usedSlots > highSlots[0] { wake.signal() }
    }

    func getChunk(_ requests: UnsafeMutableBufferPointer<PageRead>, queueDepth: Int) -> Int {
        guard !closedFlag.load(ordering: .relaxed) else {
            for index in requests.indices { requests[index].error = .closed }
            return 0
        }
        let started = monotonicNanoseconds()
        var optimistic = 0
        return TemporaryBuffer.with(PageSnapshot?.self, count: requests.count) { snapshots in
            for index in requests.indices {
                requests[index].error = nil
                requests[index].length = 0
                requests[index].latencyNanoseconds = 0
                // Top-tier hits in host memory are copied here, without a lock.
                if let length = optimisticHit(requests[index].key, into: requests[index].buffer, deviceCopies: false) {
                    snapshots.initializeElement(at: index, to: nil)
                    requests[index].length = length
                    requests[index].latencyNanoseconds = max(1, monotonicNanoseconds() &- started)
                    optimistic += 1
                    continue
                }
                let snapshot: PageSnapshot?
                do throws(SpillwayError) {
                    snapshot = try directory.beginRead(requests[index].key)
                } catch {
                    snapshots.initializeElement(at: index, to: nil)
                    requests[index].error = error
                    continue
                }
                snapshots.initializeElement(at: index, to: snapshot)
                guard let snapshot else {
                    counters.misses.add(1)
                    requests[index].error = .unknownKey(requests[index].key)
                    continue
                }
                policyEngine.recordRead(snapshot.key, tier: snapshot.location.tier, hints: snapshot.hints)
                if snapshot.isCorrupt {
                    endRead(snapshot)
                    snapshots[index] = nil
                    requests[index].error = .checksumMismatch(key: snapshot.key, tier: tiers[snapshot.location.tier].descriptor.name,
                                                              expected: snapshot.checksum, actual: 0)
                } else if requests[index].buffer.count < snapshot.length {
                    endRead(snapshot)
                    snapshots[index] = nil
                    requests[index].error = .bufferTooSmall(required: snapshot.length, available: requests[index].buffer.count)
                }
            }
            let batch = ThreadBatch.current()
            var succeeded = optimistic
            for tierIndex in tiers.indices {
                batch.reset()
                batch.timesCompletions = true  // each request gets what it waited
                batch.checksumsOnCompletion = tiers[tierIndex].descriptor.verifiesReads
                for index in requests.indices {
                    guard let snapshot = snapshots[index], snapshot.location.tier == tierIndex else { continue }
                    batch.append(TierIO(operation: .read, extent: snapshot.location.extent,
                                        buffer: requests[index].buffer.baseAddress, length: snapshot.length))
                }
                guard batch.count > 0 else { continue }
                runAccounted(batch, tier: tierIndex, write: false, queueDepth: queueDepth)
                // Copy statuses (and checksums the tier computed as reads completed) out before
                // finishRead reuses the thread's batch for promotions.
                withUnsafeTemporaryAllocation(of: (status: Int32, checksum: UInt32?).self, capacity: batch.count) { results in
                    for entry in 0..<batch.count {
                        let io = batch[entry]
                        results.initializeElement(at: entry, to: (io.status, io.hasComputedChecksum ? io.computedChecksum : nil))
                    }
                    var timed = 0
                    for index in requests.indices {
                        guard let snapshot = snapshots[index], snapshot.location.tier == tierIndex else { continue }
                        requests[index].latencyNanoseconds = batch[timed].latencyNanoseconds
                        timed += 1
                    }
                    var entry = 0
                    for index in requests.indices {
                        guard let snapshot = snapshots[index], snapshot.location.tier == tierIndex else { continue }
                        let result = results[entry]
                        entry += 1
                        do throws(SpillwayError) {
                            try finishRead(snapshot, buffer: UnsafeRawBufferPointer(start: requests[index].buffer.baseAddress, count: snapshot.length),
                                           status: result.status, computedChecksum: result.checksum)
                            requests[index].length = snapshot.length
                            succeeded += 1
                        } catch {
                            requests[index].error = error
                        }
                    }
                }
            }
            snapshots.deinitialize()
            return succeeded
        }
    }

    /// Runs `batch` on tier `tierIndex`. Below the top tier its time is stall (goodput) and a
    /// cost sample for the policy's demotion planner, and a read is a lower-tier hit.
    func runAccounted(_ batch: TierBatch, tier tierIndex: Int, write: Bool, queueDepth: Int) {
        batch.maxInFlight = queueDepth
        let start = tierIndex > 0 ? monotonicNanoseconds() : 0
        batch.run(on: tiers[tierIndex], inline: inlineTiers[tierIndex])
        guard tierIndex > 0 else { return }
        accountLowerTier(tierIndex, write: write, nanoseconds: monotonicNanoseconds() &- start, pages: batch.count)
    }

    /// `pages` pages moved to or from tier `tierIndex` (> 0) in `nanoseconds`: stall for
    /// goodput, a cost sample for the demotion planner, and for reads, lower-tier hits.
    @inline(__always)
    func accountLowerTier(_ tierIndex: Int, write: Bool, nanoseconds: UInt64, pages: Int) {
        tierCounters[tierIndex].stallNanoseconds.add(Int(nanoseconds))
        policyEngine.observe(tier: tierIndex, write: write, nanoseconds: nanoseconds, pages: pages)
        if !write { policyEngine.noteLowerTierHit(below: tierIndex - 1, count: pages) }
    }
}
