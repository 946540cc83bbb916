import Atomics
import Logging
import Metrics
import SpillwayCore
import SpillwayProtocol

#if canImport(Glibc)
import Glibc
#endif

/// How to reach the daemons a remote tier borrows from.
public struct RemoteTierConfiguration: Sendable {
    public var name: String
    public var servers: [Endpoint]
    public var credentials: ClientCredentials
    /// Bytes this tier may borrow in all (rounded down to whole slots).
    public var capacity: Int
    public var slotSize: Int
    public var connectionsPerDaemon: Int
    /// Seconds without an answer before a daemon counts as dead.
    public var ioTimeout: Double
    /// Seconds between heartbeats (0 = no heartbeat thread).
    public var heartbeatInterval: Double
    /// Daemon slots, at least `servers.count`: room for daemons joining later from a
    /// cluster's registry (`DaemonFleet.join`). 0: just the servers.
    public var slots: Int = 0
    /// Microseconds a connection polls for a reply before sleeping (0 = sleep at once).
    public var pollMicroseconds: Int = 20
    /// Page transport (TOML `transport`, `--transport`): auto, rma or tcp (`TransportMode`).
    public var transport: TransportMode = .auto
    /// libfabric provider for RMA (TOML `fabric-provider`); nil: verbs or efa when present.
    public var fabricProvider: String?
    /// Seconds between canary rounds (0 = none): each writes and reads back a canary page on
    /// every live daemon holding one of this tier's slabs (`RemoteTier.runCanaries`).
    public var canaryInterval: Double = 2
    /// Seconds a daemon that failed a canary, or was a latency outlier, is drained: nothing
    /// new goes there and this tier's slabs on it move to other daemons.
    public var drainSeconds: Double = 30

    public init(name: String = "remote", servers: [Endpoint], credentials: ClientCredentials, capacity: Int, slotSize: Int,
                connectionsPerDaemon: Int = 4, ioTimeout: Double = 5, heartbeatInterval: Double = 1)
    {
        self.name = name
        self.servers = servers
        self.credentials = credentials
        self.capacity = capacity
        self.slotSize = slotSize
        self.connectionsPerDaemon = connectionsPerDaemon
        self.ioTimeout = ioTimeout
        self.heartbeatInterval = heartbeatInterval
    }
}

/// The remote tier: pages in DRAM that `spillwayd` daemons lend, over TCP.
///
/// The tier's slot space is cut into virtual slabs of the daemons' slab size; a virtual slab
/// is mapped onto a real slab of some daemon the first time an allocation touches it (the
/// daemon is picked by power of two choices on free slabs). A page is addressed as (daemon,
/// slab, offset); an extent that crosses a slab boundary becomes one transfer per piece.
/// A batch's transfers to one daemon are pipelined on one borrowed connection.
///
/// A daemon that fails (connection lost, heartbeat missed, goodbye) is marked dead: its slabs
/// are lost, I/O to them fails with `EHOSTDOWN` (so the store never serves those pages; the
/// erasure-coded tier is what makes them recoverable), their free slots are withheld, and new
/// allocations go to the live daemons. A write completes only after the daemon acknowledged
/// it.
///
/// `@unchecked Sendable`: the slab map and daemon states are behind `map`'s lock; the
/// allocator and clients are thread-safe.
public final class RemoteTier: EvacuatingTier, @unchecked Sendable {
    public let descriptor: TierDescriptor
    /// The daemons this tier lends from (membership, liveness, slab mapping, heartbeats).
    public let fleet: DaemonFleet
    /// The fleet's current client per daemon (a rejoined daemon has a new one): a snapshot,
    /// taken once per batch by the I/O path.
    public var clients: [DaemonClient?] { fleet.clients }
    public let slabSize: Int
    private let slabSlots: Int
    private let allocator: SlotAllocator
    private let map: Locked<SlabMap>
    private let mappingLock = Locked(())
    private let logger: Logger
    private let closed = ManagedAtomic<Bool>(false)
    private var heartbeatThread: BackgroundThread?
    /// In-process daemons started for this tier (the CLI's demonstration default), stopped
    /// when the tier closes.
    public var inProcessDaemons: InProcessDaemonGroup?
    /// Run first when the tier closes: what the builder attached to it (a cluster registry
    /// feed that joins and removes daemons). Set before the tier is shared.
    public var stopOnClose: [@Sendable () -> Void] = []
    /// Pages' I/Os refused because their daemon is gone.
    public let unavailableIOs = ManagedAtomic<Int>(0)
    /// The page transport in use ("rma", "tcp", or "mixed" across daemons) and why.
    public let transport: String
    public let transportReason: String
    /// Batches hold it shared; moving a slab to another daemon holds it exclusive, so no I/O
    /// sees the slab half moved.
    private let migrationGate = ReadWriteLock()
    /// Slabs moved to another daemon after a reclaim notice.
    public let migratedSlabs = ManagedAtomic<Int>(0)
    /// Slabs given back after the store moved their pages to another tier (no other daemon
    /// had room).
    public let evacuatedSlabs = ManagedAtomic<Int>(0)
    private let evacuationHandler = Locked<(@Sendable (Range<Int>) -> Int)?>(nil)
    /// Reclaim notices this tier could not honour (no other daemon had room, or the copy
    /// failed): the daemon revokes the slab at its deadline and its pages become unavailable.
    public let failedMigrations = ManagedAtomic<Int>(0)
    /// Canary pages written and read back (`runCanaries`), those that failed (an error or
    /// wrong bytes), and rounds that could only time a read (no free slot to write).
    public let canaries = ManagedAtomic<Int>(0)
    public let canaryFailures = ManagedAtomic<Int>(0)
    public let canaryReadsOnly = ManagedAtomic<Int>(0)
    private let canaryInterval: Double
    private let drainSeconds: Double
    private let nextCanary = ManagedAtomic<UInt64>(0)

    struct VirtualSlab {
        var daemon = -1
        var slab: UInt32 = 0
        var lost = false
        /// The daemon's epoch when the slab was mapped (`DaemonFleet.MappedSlab`).
        var epoch: UInt32 = 0

        init() {}

        init(_ mapped: DaemonFleet.MappedSlab) {
            daemon = mapped.daemon
            slab = mapped.slab
            epoch = mapped.epoch
        }

        var mapped: DaemonFleet.MappedSlab { DaemonFleet.MappedSlab(daemon: daemon, slab: slab, epoch: epoch) }
    }

    struct SlabMap {
        var slabs: [VirtualSlab]
    }

    public init(_ configuration: RemoteTierConfiguration, logger: Logger = Logger(label: "spillway.remote")) throws(SpillwayError) {
        let name = configuration.name
        guard !configuration.servers.isEmpty else { throw .invalidConfiguration("tier '\(name)': no servers") }
        self.logger = logger
        fleet = try DaemonFleet(
            tier: name, servers: configuration.servers, credentials: configuration.credentials, minimumLive: 1,
            connectionsPerDaemon: configuration.connectionsPerDaemon, ioTimeout: configuration.ioTimeout,
            pollMicroseconds: configuration.pollMicroseconds, transport: configuration.transport,
            fabricProvider: configuration.fabricProvider, slots: configuration.slots, logger: logger)
        slabSize = fleet.slabSize
        canaryInterval = configuration.canaryInterval
        drainSeconds = configuration.drainSeconds
        guard configuration.slotSize <= slabSize, slabSize % configuration.slotSize == 0 else {
            throw .invalidConfiguration("tier '\(name)': slot size \(configuration.slotSize) does not divide the slab size \(slabSize)")
        }
        slabSlots = slabSize / configuration.slotSize
        let capacitySlots = configuration.capacity / configuration.slotSize
        guard capacitySlots > 0 else { throw .invalidConfiguration("tier '\(name)': capacity below one slot") }
        allocator = SlotAllocator(capacity: capacitySlots)
        map = Locked(SlabMap(slabs: Array(repeating: VirtualSlab(), count: (capacitySlots + slabSlots - 1) / slabSlots)))
        descriptor = TierDescriptor(name: name, kind: .remote, slotSize: configuration.slotSize, capacitySlots: capacitySlots,
                                    performance: .remote, verifiesReads: true, completesInline: true)
        let live = fleet.clients.compactMap { $0 }
        transport = live.allSatisfy { $0.usesRMA } ? "rma" : (live.contains { $0.usesRMA } ? "mixed" : "tcp")
        transportReason = Array(Set(live.map(\.transportReason))).sorted().joined(separator: "; ")
        if transport == "tcp" && configuration.transport == .auto && configuration.fabricProvider == nil {
            TransportSelection.choose(for: "tier \(name)", logger: logger)
        }
        logger.info("remote tier open", metadata: [
            "tier": "\(name)", "daemons": "\(fleet.liveCount)/\(fleet.count)", "transport": "\(transport)",
            "reason": "\(transportReason)",
        ])
        Gauge(label: "spillway_remote_transport", dimensions: [("tier", name), ("transport", transport)]).record(1)
        fleet.setDeathHandler { [weak self] daemon in self?.writeOff(daemon) }
        if configuration.heartbeatInterval > 0 {
            let interval = configuration.heartbeatInterval
            heartbeatThread = BackgroundThread { [weak self] in
                // Holds the tier only while pinging, so dropping it ends the thread.
                func beat(_ tier: RemoteTier?) -> Bool {
                    guard let tier, !tier.closed.load(ordering: .relaxed) else { return false }
                    tier.heartbeat()
                    return true
                }
                while beat(self) { usleep(UInt32(interval * 1_000_000)) }
            }
        }
    }

    deinit { close() }

    // MARK: Space

    public func allocate(slotCount: Int) -> Extent? {
        guard let extent = allocator.allocate(count: slotCount) else { return nil }
        let firstSlab = Int(extent.firstSlot) / slabSlots
        let lastSlab = (Int(extent.endSlot) - 1) / slabSlots
        for index in firstSlab...lastSlab where !ensureMapped(index) {
            allocator.release(extent)
            return nil
        }
        return extent
    }

    public func release(_ extent: Extent) { allocator.release(extent) }

    public var usedSlots: Int { allocator.usedSlots }

    /// Maps virtual slab `index` onto a live daemon if it is not mapped yet.
    private func ensureMapped(_ index: Int) -> Bool {
        if map.withLock({ $0.slabs[index].daemon >= 0 }) { return true }
        return mappingLock.withLock { _ -> Bool in
            if map.withLock({ $0.slabs[index].daemon >= 0 }) { return true }
            guard let mapped = mapNewSlab(excluding: nil) else {
                noteMappingFailure()
                return false
            }
            map.withLock { $0.slabs[index] = VirtualSlab(mapped) }
            return true
        }
    }

    /// Why the last allocation found no daemon to map a slab on (each refusing daemon's own
    /// words, e.g. a tenant's token-file limit), or nil if none failed yet. The store's `put`
    /// then fails with `tierFull`/`storeFull`; this, and the error logged with it, says why.
    public var mappingFailure: String? { lastMappingFailure.withLock { $0 } }
    private let lastMappingFailure = Locked<String?>(nil)

    /// Records (and logs, once per distinct reason) that no live daemon could map a slab.
    private func noteMappingFailure() {
        let refusals = fleet.capacityRefusals
        let reason = refusals.isEmpty ? "no live daemon has a free slab" : refusals.joined(separator: "; ")
        let changed = lastMappingFailure.withLock { last -> Bool in
            defer { last = reason }
            return last != reason
        }
        guard changed else { return }
        logger.error("no daemon can map a slab: allocations on this tier fail", metadata: [
            "tier": "\(descriptor.name)", "tenant": "\(clients.compactMap { $0 }.first?.credentials.tenant ?? "?")",
            "live_daemons": "\(fleet.liveCount)/\(fleet.count)", "reason": "\(reason)",
        ])
    }

    /// Maps a fresh slab on a live daemon other than `excluded` (power of two choices on free
    /// slabs, `DaemonFleet`). Called under `mappingLock`.
    private func mapNewSlab(excluding excluded: Int?) -> DaemonFleet.MappedSlab? {
        fleet.mapSlabByTwoChoices(excluding: excluded.map { [$0] } ?? [])
    }

    // MARK: Reclaim

    /// Honours the reclaim notices the daemons sent: each named slab's pages move to a slab on
    /// another live daemon, then the slab is given back before its deadline. Runs on the
    /// heartbeat thread (or a caller's).
    public func serviceReclaims() {
        for notice in fleet.takeReclaims() { migrate(fromDaemon: notice.daemon, slab: notice.slab) }
    }

    /// Moves the pages of `slab` on `daemon` to another daemon. False if they could not move.
    @discardableResult
    func migrate(fromDaemon daemon: Int, slab: UInt32) -> Bool {
        guard let (index, source) = map.withLock({ map -> (Int, DaemonFleet.MappedSlab)? in
            map.slabs.firstIndex { $0.daemon == daemon && $0.slab == slab && !$0.lost }.map { ($0, map.slabs[$0].mapped) }
        }), fleet.isCurrent(daemon, epoch: source.epoch) else {
            return true  // not (or no longer) one of ours
        }
        let metadata: Logger.Metadata = [
            "tier": "\(descriptor.name)", "daemon": "\(clients[daemon]?.endpoint.description ?? "?")", "slab": "\(slab)",
        ]
        guard let replacement = mappingLock.withLock({ _ in mapNewSlab(excluding: daemon) }) else {
            if let handler = evacuationHandler.withLock({ $0 }), evacuate(index, source, handler) {
                return true
            }
            failedMigrations.wrappingIncrement(ordering: .relaxed)
            Counter(label: "spillway_remote_reclaim_failures", dimensions: [("tier", descriptor.name)]).increment()
            logger.error("reclaim: no other daemon has a free slab and the store could not take the pages; they will be lost at the deadline",
                         metadata: metadata)
            return false
        }
        let started = monotonicNanoseconds()
        let copied: Result<Int, RemoteError> = migrationGate.withWriteLock {
            let result = copySlab(index, from: source, to: replacement)
            if case .success = result {
                map.withLock { $0.slabs[index] = VirtualSlab(replacement) }
            }
            return result
        }
        switch copied {
        case .success(let bytes):
            fleet.unmapSlab(source)
            migratedSlabs.wrappingIncrement(ordering: .relaxed)
            Counter(label: "spillway_remote_slabs_migrated", dimensions: [("tier", descriptor.name)]).increment()
            logger.notice("reclaim: slab moved to another daemon", metadata: metadata.merging([
                "to": "\(fleet.name(replacement.daemon))", "bytes": "\(bytes)",
                "ms": "\((monotonicNanoseconds() &- started) / 1_000_000)",
            ]) { $1 })
            return true
        case .failure(let error):
            fleet.unmapSlab(replacement)
            failedMigrations.wrappingIncrement(ordering: .relaxed)
            Counter(label: "spillway_remote_reclaim_failures", dimensions: [("tier", descriptor.name)]).increment()
            logger.error("reclaim: moving the slab failed", metadata: metadata.merging(["error": "\(error)"]) { $1 })
            return false
        }
    }

    public func setEvacuationHandler(_ handler: @escaping @Sendable (Range<Int>) -> Int) {
        evacuationHandler.withLock { $0 = handler }
    }

    /// Gives virtual slab `index` back after the store moved its pages to another tier: its
    /// free slots are withheld first (so nothing new lands there), the store moves the pages,
    /// then the slab is unmapped and the virtual slab is left unmapped (mapped afresh when an
    /// allocation needs it). False, with the slots handed back, if pages remain.
    private func evacuate(_ index: Int, _ source: DaemonFleet.MappedSlab, _ handler: (Range<Int>) -> Int) -> Bool {
        let first = index * slabSlots
        let range = first..<min(first + slabSlots, descriptor.capacitySlots)
        var withheld: [Int] = []
        func withhold() {
            for slot in range where allocator.reserve(Extent(firstSlot: UInt32(slot), slotCount: 1)) { withheld.append(slot) }
        }
        withhold()
        // A put that allocated here just before may commit after the store looked: look again.
        for _ in 0..<3 where withheld.count < range.count {
            guard handler(range) == 0 else { break }
            withhold()
        }
        guard withheld.count == range.count else {
            for slot in withheld { allocator.release(Extent(firstSlot: UInt32(slot), slotCount: 1)) }
            return false
        }
        migrationGate.withWriteLock {
            map.withLock { $0.slabs[index] = VirtualSlab() }
        }
        fleet.unmapSlab(source)
        for slot in withheld { allocator.release(Extent(firstSlot: UInt32(slot), slotCount: 1)) }
        evacuatedSlabs.wrappingIncrement(ordering: .relaxed)
        Counter(label: "spillway_remote_slabs_evacuated", dimensions: [("tier", descriptor.name)]).increment()
        logger.notice("reclaim: no other daemon had room; the store moved the slab's pages to another tier and the slab was given back",
                      metadata: ["tier": "\(descriptor.name)", "daemon": "\(fleet.name(source.daemon))", "slab": "\(source.slab)"])
        return true
    }

    /// Copies the allocated slots of virtual slab `index` from one real slab to another.
    /// Called with the migration gate held exclusively. Returns the bytes copied.
    private func copySlab(_ index: Int, from source: DaemonFleet.MappedSlab, to target: DaemonFleet.MappedSlab) -> Result<Int, RemoteError> {
        let clients = self.clients
        guard let reader = clients[source.daemon], let writer = clients[target.daemon] else {
            return .failure(.protocolViolation("daemon has no client"))
        }
        let first = index * slabSlots
        let runs = allocator.allocatedRuns(in: first..<min(first + slabSlots, descriptor.capacitySlots))
        let chunk = min(slabSize, 1 << 20)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        var copied = 0
        for run in runs {
            var offset = (run.lowerBound - first) * descriptor.slotSize
            let end = (run.upperBound - first) * descriptor.slotSize
            while offset < end {
                let length = min(chunk, end - offset)
                var read = RemoteOperation(write: false, slab: source.slab, offset: UInt64(offset), length: length, buffer: buffer)
                var write = RemoteOperation(write: true, slab: target.slab, offset: UInt64(offset), length: length, buffer: buffer)
                if let error = withUnsafeMutablePointer(to: &read, { reader.execute(UnsafeMutableBufferPointer(start: $0, count: 1)) }) {
                    return .failure(error)
                }
                guard read.status == 0 else { return .failure(.system(SystemCallError(call: "reclaim read", errno: read.status))) }
                if let error = withUnsafeMutablePointer(to: &write, { writer.execute(UnsafeMutableBufferPointer(start: $0, count: 1)) }) {
                    return .failure(error)
                }
                guard write.status == 0 else { return .failure(.system(SystemCallError(call: "reclaim write", errno: write.status))) }
                offset += length
                copied += length
            }
        }
        return .success(copied)
    }

    /// A slab the daemon revoked (a missed reclaim deadline): its pages are lost, its free
    /// slots withheld.
    func markSlabLost(_ index: Int) {
        let newlyLost = map.withLock { map -> Bool in
            guard !map.slabs[index].lost else { return false }
            map.slabs[index].lost = true
            return true
        }
        guard newlyLost else { return }
        let start = index * slabSlots
        for slot in start..<min(start + slabSlots, descriptor.capacitySlots) {
            _ = allocator.reserve(Extent(firstSlot: UInt32(slot), slotCount: 1))
        }
        logger.error("slab revoked by its daemon; its pages are unavailable", metadata: ["tier": "\(descriptor.name)", "virtual_slab": "\(index)"])
        Counter(label: "spillway_remote_slabs_revoked", dimensions: [("tier", descriptor.name)]).increment()
    }

    /// A daemon is gone (`DaemonFleet.markDead`).
    func markDead(_ daemon: Int, reason: String) { fleet.markDead(daemon, reason: reason) }

    /// The fleet marked `daemon` dead: its slabs are lost; their free slots are withheld from
    /// allocation.
    private func writeOff(_ daemon: Int) {
        let lostSlabs: [Int] = map.withLock { map in
            var lost: [Int] = []
            for index in map.slabs.indices where map.slabs[index].daemon == daemon && !map.slabs[index].lost {
                map.slabs[index].lost = true
                lost.append(index)
            }
            return lost
        }
        for index in lostSlabs {
            let start = index * slabSlots
            for slot in start..<min(start + slabSlots, descriptor.capacitySlots) {
                _ = allocator.reserve(Extent(firstSlot: UInt32(slot), slotCount: 1))
            }
        }
        logger.error("daemon lost; its pages are unavailable", metadata: [
            "tier": "\(descriptor.name)", "daemon": "\(fleet.name(daemon))", "slabs": "\(lostSlabs.count)",
        ])
        Counter(label: "spillway_remote_daemons_lost", dimensions: [("tier", descriptor.name)]).increment()
    }

    /// Live daemons.
    public var liveDaemons: Int { fleet.liveCount }

    /// The real slabs this tier uses now (mapped, not lost), for tests and tools.
    public func mappedSlabsForTest() -> [DaemonFleet.MappedSlab] {
        map.withLock { map in map.slabs.filter { $0.daemon >= 0 && !$0.lost }.map(\.mapped) }
    }

    // MARK: I/O

    public func submit(_ batch: TierBatch) {
        defer { for index in 0..<batch.count { batch.finish(index) } }
        guard !closed.load(ordering: .relaxed) else {
            for index in 0..<batch.count { batch.setStatus(index, ESHUTDOWN) }
            return
        }
        migrationGate.withReadLock { submitLocked(batch) }
    }

    private func submitLocked(_ batch: TierBatch) {
        FanOut.withCurrent { plan in submitLocked(batch, plan) }
    }

    /// Plans the batch in `plan` (the thread's, reused: no allocation) and runs it: the
    /// daemons reached over TCP all at once (`MultiDaemonExchange`: the batch costs the
    /// slowest daemon's time, not the sum, and each page's latency is its own, submission to
    /// its reply), then those reached over RMA through `execute` (a parallel RMA fan-out is
    /// still to do).
    private func submitLocked(_ batch: TierBatch, _ plan: FanOut) {
        let snapshot = map.withLock { $0 }
        let fleetState = fleet.snapshot()
        let clients = self.clients
        /// Calls `body(daemon, slab, offset in slab, length, offset in the I/O, virtual slab)`
        /// for each piece of I/O `index` (an extent crossing a slab boundary has several);
        /// false (and the I/O's status set) if it cannot go.
        func forEachPiece(_ index: Int, _ body: (Int, UInt32, Int, Int, Int, Int) -> Void) -> Bool {
            let io = batch[index]
            guard io.buffer != nil, io.length <= Int(io.extent.slotCount) * descriptor.slotSize,
                  Int(io.extent.endSlot) <= descriptor.capacitySlots
            else {
                batch.setStatus(index, EINVAL)
                return false
            }
            var done = 0
            var slot = Int(io.extent.firstSlot)
            while done < io.length {
                let virtual = snapshot.slabs[slot / slabSlots]
                let offsetInSlab = (slot % slabSlots) * descriptor.slotSize
                let piece = min(io.length - done, slabSize - offsetInSlab)
                guard virtual.daemon >= 0, !virtual.lost, fleetState.isCurrent(virtual.daemon, epoch: virtual.epoch),
                      clients[virtual.daemon] != nil
                else {
                    batch.setStatus(index, virtual.daemon < 0 ? EINVAL : EHOSTDOWN)
                    unavailableIOs.wrappingIncrement(ordering: .relaxed)
                    return false
                }
                body(virtual.daemon, virtual.slab, offsetInSlab, piece, done, slot / slabSlots)
                done += piece
                slot += (piece + descriptor.slotSize - 1) / descriptor.slotSize
            }
            return true
        }
        // A piece covers at least one slot: the extents' slots bound the pieces.
        var capacity = 0
        for index in 0..<batch.count where batch[index].operation != .discard && batch[index].length > 0 {
            capacity += Int(batch[index].extent.slotCount)
        }
        plan.reset(daemons: clients.count, capacity: capacity)
        // Check, count, lay out, place: an I/O any of whose pieces cannot go sends none.
        for index in 0..<batch.count where batch[index].operation != .discard && batch[index].length > 0 {
            if forEachPiece(index, { _, _, _, _, _, _ in }) {
                _ = forEachPiece(index) { daemon, _, _, _, _, _ in plan.count(daemon) }
            }
        }
        guard plan.layOut() > 0 else { return }
        for index in 0..<batch.count where batch[index].operation != .discard && batch[index].length > 0 && batch[index].status == 0 {
            let io = batch[index]
            _ = forEachPiece(index) { daemon, slab, offset, length, done, virtual in
                plan.place(daemon, RemoteOperation(write: io.operation == .write, slab: slab, offset: UInt64(offset), length: length,
                                                   buffer: io.buffer! + done), owner: FanOut.Owner(index, virtual))
            }
        }
        let window = batch.maxInFlight > 0 ? batch.maxInFlight : 32
        let started = monotonicNanoseconds()
        plan.withLegs(clients: clients, include: { !clients[$0]!.usesRMA }) { legs in
            guard !legs.isEmpty else { return }
            MultiDaemonExchange.run(legs, window: window, onReply: { leg, position in
                let index = Int(plan.owners[plan.position(leg: leg, index: position)].first)
                batch.setLatency(index, nanoseconds: monotonicNanoseconds() &- started)
            }, stop: { _ in false })
        }
        for daemon in 0..<clients.count where plan.counts[daemon] > 0 {
            guard let client = clients[daemon] else { continue }
            let run = plan.run(of: daemon)
            if client.usesRMA {
                let begun = monotonicNanoseconds()
                let failure = client.execute(UnsafeMutableBufferPointer(start: plan.operations + run.lowerBound, count: run.count),
                                             window: window)
                // The channel completes the batch as a whole: that is what each page waited.
                let elapsed = monotonicNanoseconds() &- begun
                for position in run { batch.setLatency(Int(plan.owners[position].first), nanoseconds: elapsed) }
                if let failure, case .system = failure { markDead(daemon, reason: "\(failure)") }
            }
            for position in run {
                let status = plan.operations[position].status
                let index = Int(plan.owners[position].first)
                if status != 0 && batch[index].status == 0 { batch.setStatus(index, status == MultiDaemonExchange.pending ? EIO : status) }
                // ENXIO: the daemon no longer has the slab (revoked after a missed reclaim deadline).
                if status == ENXIO { markSlabLost(Int(plan.owners[position].second)) }
            }
            if client.failed.load(ordering: .relaxed) { markDead(daemon, reason: "daemon said goodbye or its connection failed") }
        }
    }

    /// Pings every live daemon (one that does not answer is dead), runs a canary round when
    /// one is due, honours reclaim notices and moves slabs off the daemons being drained.
    public func heartbeat() {
        fleet.heartbeat()
        let now = monotonicNanoseconds()
        if canaryInterval > 0, now >= nextCanary.load(ordering: .relaxed) {
            nextCanary.store(now &+ UInt64(canaryInterval * 1e9), ordering: .relaxed)
            runCanaries()
        }
        serviceReclaims()
        drainSuspects()
    }

    /// Moves this tier's slabs off the daemons it drains (`DaemonFleet.markDraining`), at most
    /// `limit` slabs per call (a heartbeat), each like a reclaimed slab: copied to another
    /// daemon, or its pages handed to the store, then given back. Returns the slabs moved.
    @discardableResult
    public func drainSuspects(limit: Int = 4) -> Int {
        let draining = fleet.drainingDaemons()
        guard !draining.isEmpty else { return 0 }
        let epochs = fleet.snapshot().epoch
        let slabs: [(daemon: Int, slab: UInt32)] = map.withLock { map in
            map.slabs.filter { $0.daemon >= 0 && !$0.lost && draining.contains($0.daemon) && $0.epoch == epochs[$0.daemon] }
                .prefix(limit).map { ($0.daemon, $0.slab) }
        }
        var moved = 0
        for (daemon, slab) in slabs where migrate(fromDaemon: daemon, slab: slab) { moved += 1 }
        return moved
    }

    /// One canary round: on every live daemon holding one of this tier's slabs, a page of
    /// known bytes is written into a free slot of such a slab (reserved meanwhile, so no put
    /// lands there), read back, compared and timed. A daemon with no free slot there gets a
    /// timed read of an allocated page instead (`canaryReadsOnly`). An error or wrong bytes
    /// drain the daemon at once; a latency outlier against its peers (`CanaryJudge`: p99 over
    /// its last 32 canaries above 4× the fleet's median and 1 ms, two rounds running) is
    /// drained too (`DaemonFleet.markDraining`). Returns the daemons drained.
    @discardableResult
    public func runCanaries() -> [Int] {
        let fleetState = fleet.snapshot()
        let clients = self.clients
        let slotSize = descriptor.slotSize
        let written = UnsafeMutableRawPointer.allocate(byteCount: slotSize, alignment: 4096)
        let readBack = UnsafeMutableRawPointer.allocate(byteCount: slotSize, alignment: 4096)
        defer {
            written.deallocate()
            readBack.deallocate()
        }
        var drained: [Int] = []
        let byDaemon: [[Int]] = map.withLock { map in
            var byDaemon = [[Int]](repeating: [], count: fleet.count)
            for (index, slab) in map.slabs.enumerated()
                where slab.daemon >= 0 && !slab.lost && fleetState.isCurrent(slab.daemon, epoch: slab.epoch)
            {
                byDaemon[slab.daemon].append(index)
            }
            return byDaemon
        }
        for daemon in 0..<fleet.count where !fleetState.alive[daemon] { fleet.forgetCanaries(daemon) }
        for daemon in 0..<fleet.count where fleetState.alive[daemon] {
            guard let client = clients[daemon], let index = byDaemon[daemon].randomElement() else { continue }
            let first = index * slabSlots
            let slots = first..<min(first + slabSlots, descriptor.capacitySlots)
            let mapped = map.withLock { $0.slabs[index] }
            // A free slot of the slab, held for the canary; else an allocated one, read only.
            var reserved: Int?
            for slot in slots.shuffled().prefix(8) where allocator.reserve(Extent(firstSlot: UInt32(slot), slotCount: 1)) {
                reserved = slot
                break
            }
            let slot = reserved ?? allocator.allocatedRuns(in: slots).randomElement()?.randomElement()
            guard let slot else { continue }
            let offset = UInt64((slot - first) * slotSize)
            var pattern = UInt64.random(in: 1 ... .max)
            for word in 0..<(slotSize / 8) {
                pattern = pattern &* 6364136223846793005 &+ 1442695040888963407
                written.storeBytes(of: pattern, toByteOffset: word * 8, as: UInt64.self)
            }
            // No lock held over the I/O: a daemon that does not answer must not hold the
            // migration gate for the I/O timeout (a migration waiting for it would stall every
            // batch). A slab moved meanwhile is noticed below and the canary not judged.
            let (status, elapsed, intact): (Int32, UInt64, Bool) = {
                var status: Int32 = 0
                if reserved != nil {
                    var write = RemoteOperation(write: true, slab: mapped.slab, offset: offset, length: slotSize, buffer: written)
                    _ = withUnsafeMutablePointer(to: &write) { client.execute(UnsafeMutableBufferPointer(start: $0, count: 1)) }
                    status = write.status
                }
                var read = RemoteOperation(write: false, slab: mapped.slab, offset: offset, length: slotSize, buffer: readBack)
                let started = monotonicNanoseconds()
                if status == 0 {
                    _ = withUnsafeMutablePointer(to: &read) { client.execute(UnsafeMutableBufferPointer(start: $0, count: 1)) }
                    status = read.status
                }
                let elapsed = monotonicNanoseconds() &- started
                return (status, elapsed, reserved == nil || memcmp(written, readBack, slotSize) == 0)
            }()
            if let reserved { allocator.release(Extent(firstSlot: UInt32(reserved), slotCount: 1)) }
            // A slab moved meanwhile, or a daemon that died (the fleet's business), is no test.
            let moved = map.withLock { $0.slabs[index].daemon != mapped.daemon || $0.slabs[index].slab != mapped.slab }
            guard !moved, fleet.isCurrent(daemon, epoch: mapped.epoch) else { continue }
            if reserved == nil { canaryReadsOnly.wrappingIncrement(ordering: .relaxed) }
            canaries.wrappingIncrement(ordering: .relaxed)
            if status != 0 || !intact {
                canaryFailures.wrappingIncrement(ordering: .relaxed)
                Counter(label: "spillway_remote_canary_failures", dimensions: [("tier", descriptor.name)]).increment()
                logger.error("canary failed: the daemon returned an error or wrong bytes", metadata: [
                    "tier": "\(descriptor.name)", "daemon": "\(fleet.name(daemon))", "slab": "\(mapped.slab)", "status": "\(status)"])
                fleet.markDraining(daemon, for: drainSeconds,
                                   reason: status == 0 ? "a canary page read back different bytes" : "a canary I/O failed (errno \(status))")
                drained.append(daemon)
                continue
            }
            fleet.recordCanary(daemon, nanoseconds: elapsed)
        }
        drained += fleet.endCanaryRound(drainFor: drainSeconds)
        return drained
    }

    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        for stop in stopOnClose { stop() }
        heartbeatThread?.join()
        // Give the slabs back so a daemon does not hold them for the lease.
        let mapped: [DaemonFleet.MappedSlab] = map.withLock { map in
            map.slabs.filter { $0.daemon >= 0 && !$0.lost }.map(\.mapped)
        }
        fleet.close(unmapping: mapped)
        inProcessDaemons?.stop()
    }
}
