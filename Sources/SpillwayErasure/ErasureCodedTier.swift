import Atomics
import CSpillwayISAL
import Logging
import Metrics
import SpillwayCore
import SpillwayRemote

#if canImport(Glibc)
import Glibc
#endif

/// How to reach the daemons an erasure-coded tier spreads its splits over, and the code.
public struct ErasureCodedTierConfiguration: Sendable {
    public var name: String = "ec"
    public var servers: [Endpoint]
    public var credentials: ClientCredentials
    /// Bytes of page data the tier holds (the daemons lend (k+r)/k times as much).
    public var capacity: Int
    public var slotSize: Int
    public var k: Int = 4
    public var r: Int = 2
    /// Late binding: read k+Δ splits and decode from the first k (0 = read exactly k).
    public var lateBindingDelta: Int = 1
    public var placement: CodingPlacement = .codingSets(slack: 1)
    /// Each server's failure domain (rack, host, zone; TOML `failure-domains`, or the cluster
    /// registry's), in `servers` order; empty: every daemon is its own domain. A stripe never
    /// has more than ⌈(k+r)/domains⌉ splits in one domain, nor more than r (so losing any one
    /// domain loses no page); where the domains cannot allow that, no new stripe is placed.
    public var failureDomains: [String] = []
    /// Daemon slots, at least `servers.count`: room for daemons joining later from a
    /// cluster's registry (`DaemonFleet.join`). 0: just the servers.
    public var slots: Int = 0
    public var connectionsPerDaemon: Int = 4
    /// Seconds without an answer before an operation fails (and its daemon is suspect).
    public var ioTimeout: Double = 2
    /// When a write is acknowledged (TOML `write-quorum`); see `ErasureWriteQuorum`.
    public var writeQuorum: ErasureWriteQuorum = .all
    /// Seconds a write waits for a slow member (TOML `write-deadline-ms`). A member that has
    /// not stored its split by then is marked suspect and its split counted missing (stale,
    /// rewritten by the repairer), so one slow daemon costs a write at most this much.
    public var writeDeadline: Double = 0.5
    /// Seconds a member stays suspect after missing a write deadline. Meanwhile writes neither
    /// send to it nor wait for it (its split is counted missing at once) and the repairer
    /// leaves its stale splits alone; afterwards the next write probes it again.
    public var suspectSeconds: Double = 2
    /// Seconds between heartbeats and repair rounds (0 = no background thread).
    public var heartbeatInterval: Double = 0.5
    /// Bytes of splits the repairer regenerates per second at most.
    public var repairBytesPerSecond: Int = 256 << 20
    public var pollMicroseconds: Int = 20
    /// Seconds between canary rounds (0 = none): each round reads one split the tier holds on
    /// every live daemon and checks its bytes and latency (`ErasureCodedTier.runCanaries`).
    public var canaryInterval: Double = 2
    /// Seconds a daemon that failed a canary, or was a latency outlier, is drained: nothing
    /// new goes there and the tier's splits on it are regenerated elsewhere (TOML
    /// `drain-seconds`). Afterwards it may be chosen again (and judged again).
    public var drainSeconds: Double = 30

    public init(servers: [Endpoint], credentials: ClientCredentials, capacity: Int, slotSize: Int) {
        self.servers = servers
        self.credentials = credentials
        self.capacity = capacity
        self.slotSize = slotSize
    }
}

/// When an erasure-coded write is acknowledged. Either way a write waits at most
/// `writeDeadline` for a slow member, which is then suspect and its split missing, and it
/// never acknowledges fewer than k+1 stored splits (a page that survives no failure).
public enum ErasureWriteQuorum: Sendable, Equatable, CustomStringConvertible {
    /// Every live member (alive and not suspect) stored its split, and at least k+1 did. An
    /// acknowledged page survives r − m further failures, m = members of its stripe dead or
    /// suspect when it was written (r when the pool is healthy).
    case all
    /// At least this many splits (k+1…k+r) stored, whatever the pool's state: an acknowledged
    /// page survives at least q − k further failures; the write fails (`EIO`) otherwise.
    case splits(Int)

    public var description: String {
        switch self {
        case .all: "all"
        case .splits(let count): "\(count)"
        }
    }
}

/// Pages on remote memory, erasure-coded (Hydra-style): each slot is cut into k data splits
/// plus r Reed–Solomon parity splits, each on a different `spillwayd` daemon, so any r
/// daemons can die without losing a page.
///
/// - **Layout.** The slot space is cut into *stripes*; a stripe maps to k+r real slabs on k+r
///   distinct daemons of one coding set (`CodingPlacement`), and split i of local slot j lives
///   at offset j·splitSize of member i's slab. Each split's CRC32C is kept client-side.
/// - **Writes** encode and send the k+r splits to every live, non-suspect member and are
///   acknowledged per `writeQuorum`: by default when every such member has stored its split.
///   A member still silent after `writeDeadline` is marked suspect and its split counted
///   missing (stale, repaired in the background). Fewer than k+1 (or q) stored fails the write
///   (`EIO`); the store never makes it visible.
/// - **Reads** ask for k+Δ valid splits, data splits first (late binding), and finish with
///   the first k that arrive and pass their CRC32C; k data splits need no decode. A split that
///   fails its check is an erasure: counted, logged, marked stale, rebuilt from the others.
/// - **Failures and repair.** A daemon that fails (connection, heartbeat) is dead: its
///   splits are skipped at once (degraded reads). The repairer maps a replacement slab on a
///   live daemon of the same coding set and regenerates the member's splits at a bounded
///   rate, under an exclusive gate per chunk so no I/O sees a half-rebuilt split; stale splits
///   are rewritten the same way. Pages then have full redundancy again.
///
/// `@unchecked Sendable`: the stripe map is behind `map`'s lock; per-slot split CRCs are
/// written only by the I/O that owns the slot (the store never writes a slot under a reader)
/// or by the repairer with the gate held exclusively; stale masks are atomics.
public final class ErasureCodedTier: Tier, @unchecked Sendable {
    public let descriptor: TierDescriptor
    public let configuration: ErasureCodedTierConfiguration
    public let code: ReedSolomonCode
    /// The daemons this tier lends from (membership, liveness, suspicion, slab mapping).
    public let fleet: DaemonFleet
    /// The fleet's current client per daemon (a rejoined daemon has a new one): a snapshot;
    /// a batch takes one and uses it throughout.
    public var clients: [DaemonClient?] { fleet.clients }
    public let splitSize: Int
    public let slotsPerStripe: Int
    public let groups: [[Int]]
    private let placementWarned = ManagedAtomic<Bool>(false)
    private let nextCanary = ManagedAtomic<UInt64>(0)
    private let k: Int
    private let n: Int
    private let allocator: SlotAllocator
    private let map: Locked<StripeMap>
    private let mappingLock = Locked(())
    private let gate = ReadWriteLock()
    private let logger: Logger
    private let closed = ManagedAtomic<Bool>(false)
    private var background: BackgroundThread?
    /// capacitySlots × n CRC32Cs of the splits as written.
    private let splitChecksums: UnsafeMutablePointer<UInt32>
    /// Per slot: bit i set = split i does not hold the current bytes (a write did not reach
    /// it, or it failed its check). Cleared by repair.
    private let staleMasks: UnsafeMutablePointer<UnsafeAtomic<UInt32>.Storage>
    /// In-process daemons started for this tier (the CLI's demonstration default), stopped
    /// when the tier closes.
    public var inProcessDaemons: InProcessDaemonGroup?
    /// Run first when the tier closes: what the builder attached to it (a cluster registry
    /// feed that joins and removes daemons). Set before the tier is shared.
    public var stopOnClose: [@Sendable () -> Void] = []
    public let counters = ErasureCounters()
    /// Where the next stale-split scan starts: each repair round resumes after the last slot
    /// the previous one looked at, so slots that cannot be repaired yet never starve the rest.
    private let staleCursor = ManagedAtomic<Int>(0)
    /// Created once: a metrics backend lookup per read would cost more than the read's bookkeeping.
    private let decodedReadsMetric: Counter
    private let degradedReadsMetric: Counter
    private let suspectMetric: Counter

    /// A slab with the epoch of its daemon when it was mapped: a daemon that rejoined since
    /// (restarted) has other slabs under the same ids, so an older epoch's slab is gone.
    typealias SlabReference = DaemonFleet.MappedSlab

    struct Member {
        var daemon: Int
        var slab: UInt32
        var epoch: UInt32
        /// Non-nil while being rebuilt on a replacement slab: local slots below it are valid.
        var rebuiltUpTo: Int?
        /// Its slab is going away though its daemon lives (a reclaim notice, or the daemon
        /// revoked it): treated like a dead member, replaced and regenerated elsewhere.
        var retiring = false
        /// While this member (a replacement) is rebuilt: the retiring slab it replaces. It
        /// still holds the split of the slots past the rebuild watermark, so reads use it
        /// there and no page loses a split during the move; it goes back to its daemon only
        /// once the rebuild is complete (or the daemon revokes it first).
        var retired: SlabReference?

        var reference: SlabReference { SlabReference(daemon: daemon, slab: slab, epoch: epoch) }
    }

    struct Stripe {
        var members: [Member] = []
        var group = 0
        /// Logged once when a dead member has no replacement.
        var repairBlocked = false
    }

    struct StripeMap {
        var stripes: [Stripe]
    }

    /// The stripes and what the fleet knew of the daemons, taken one after the other (a daemon
    /// dying in between only makes a plan use a split that then fails, handled as missing).
    struct StripeSnapshot {
        var stripes: [Stripe]
        var daemons: DaemonFleet.State

        var alive: [Bool] { daemons.alive }
        func suspect(_ daemon: Int, at now: UInt64) -> Bool { daemons.isSuspect(daemon, at: now) }
        /// A slab mapped on `daemon` under `epoch` is usable: alive, and not rejoined since.
        func live(_ daemon: Int, _ epoch: UInt32) -> Bool { daemons.isCurrent(daemon, epoch: epoch) }
    }

    private func snapshot() -> StripeSnapshot {
        let stripes = map.withLock { $0.stripes }
        return StripeSnapshot(stripes: stripes, daemons: fleet.snapshot())
    }

    public init(_ configuration: ErasureCodedTierConfiguration, logger: Logger = Logger(label: "spillway.ec")) throws(SpillwayError) {
        let name = configuration.name
        code = try ReedSolomonCode(k: configuration.k, r: configuration.r)
        k = configuration.k
        n = configuration.k + configuration.r
        guard configuration.servers.count >= n else {
            throw .invalidConfiguration("tier '\(name)': RS(\(k), \(configuration.r)) needs at least \(n) daemons, got \(configuration.servers.count)")
        }
        guard configuration.lateBindingDelta >= 0, configuration.lateBindingDelta <= configuration.r else {
            throw .invalidConfiguration("tier '\(name)': late-binding delta must be 0…r")
        }
        if case .splits(let quorum) = configuration.writeQuorum, !(k + 1...n).contains(quorum) {
            throw .invalidConfiguration("tier '\(name)': write quorum \(quorum) must be \"all\" or k+1…k+r (\(k + 1)…\(n))")
        }
        guard configuration.writeDeadline > 0, configuration.suspectSeconds >= 0 else {
            throw .invalidConfiguration("tier '\(name)': the write deadline must be positive")
        }
        self.configuration = configuration
        self.logger = logger
        fleet = try DaemonFleet(
            tier: name, servers: configuration.servers, credentials: configuration.credentials, minimumLive: k + 1,
            connectionsPerDaemon: configuration.connectionsPerDaemon, ioTimeout: configuration.ioTimeout,
            pollMicroseconds: configuration.pollMicroseconds, slots: configuration.slots,
            failureDomains: configuration.failureDomains, logger: logger)
        let lentSlabSize = fleet.slabSize
        // Splits are whole 64-byte lines (ISA-L's vector width); the last data split is padded.
        splitSize = ((configuration.slotSize + k - 1) / k + 63) / 64 * 64
        slotsPerStripe = lentSlabSize / splitSize
        let capacitySlots = configuration.capacity / configuration.slotSize
        guard capacitySlots > 0, slotsPerStripe > 0 else { throw .invalidConfiguration("tier '\(name)': capacity below one slot") }
        groups = configuration.placement.groups(daemons: fleet.count, k: k, r: configuration.r)
        let domains = Set(fleet.snapshot().failureDomains.filter { !$0.isEmpty }).count
        if (n + domains - 1) / max(1, domains) > configuration.r {
            logger.warning("the failure domains cannot spread a stripe so that losing one loses no page: no stripe will be placed", metadata: [
                "tier": "\(name)", "domains": "\(domains)", "splits_per_stripe": "\(n)", "r": "\(configuration.r)",
                "needs": "at least \((n + configuration.r - 1) / configuration.r) domains",
            ])
        }
        allocator = SlotAllocator(capacity: capacitySlots)
        map = Locked(StripeMap(stripes: Array(repeating: Stripe(), count: (capacitySlots + slotsPerStripe - 1) / slotsPerStripe)))
        splitChecksums = .allocate(capacity: capacitySlots * n)
        splitChecksums.initialize(repeating: 0, count: capacitySlots * n)
        staleMasks = .allocate(capacity: capacitySlots)
        staleMasks.initialize(repeating: UnsafeAtomic<UInt32>.Storage(0), count: capacitySlots)
        descriptor = TierDescriptor(name: name, kind: .erasureCoded, slotSize: configuration.slotSize, capacitySlots: capacitySlots,
                                    performance: .remote, verifiesReads: true, completesInline: true)
        logger.info("erasure-coded tier open", metadata: [
            "tier": "\(name)", "code": "RS(\(k),\(configuration.r))", "daemons": "\(fleet.liveCount)/\(fleet.count)",
            "placement": "\(configuration.placement)", "coding_sets": "\(groups.count)", "split": "\(splitSize)",
            "late_binding_delta": "\(configuration.lateBindingDelta)", "write_quorum": "\(configuration.writeQuorum)",
            "transport": "\(TransportSelection.choose(for: "tier \(name)", logger: logger))",
        ])
        Gauge(label: "spillway_remote_transport", dimensions: [("tier", name), ("transport", "tcp")]).record(1)
        decodedReadsMetric = Counter(label: "spillway_ec_decoded_reads", dimensions: [("tier", name)])
        degradedReadsMetric = Counter(label: "spillway_ec_degraded_reads", dimensions: [("tier", name)])
        suspectMetric = Counter(label: "spillway_ec_suspect_members", dimensions: [("tier", name)])
        fleet.setDeathHandler { [weak self] daemon in self?.lost(daemon) }
        if configuration.heartbeatInterval > 0 {
            let interval = configuration.heartbeatInterval
            background = BackgroundThread { [weak self] in
                func round(_ tier: ErasureCodedTier?) -> Bool {
                    guard let tier, !tier.closed.load(ordering: .relaxed) else { return false }
                    tier.heartbeat()
                    tier.repair(budgetBytes: Int(Double(tier.configuration.repairBytesPerSecond) * interval))
                    return true
                }
                while round(self) { usleep(UInt32(interval * 1_000_000)) }
            }
        }
    }

    deinit {
        close()
        splitChecksums.deallocate()
        staleMasks.deallocate()
    }

    @inline(__always) private func stale(_ slot: Int) -> UnsafeAtomic<UInt32> { UnsafeAtomic(at: staleMasks + slot) }

    // MARK: Space

    public func allocate(slotCount: Int) -> Extent? {
        guard let extent = allocator.allocate(count: slotCount) else { return nil }
        let firstStripe = Int(extent.firstSlot) / slotsPerStripe
        let lastStripe = (Int(extent.endSlot) - 1) / slotsPerStripe
        for index in firstStripe...lastStripe where !ensureMapped(index) {
            allocator.release(extent)
            return nil
        }
        return extent
    }

    public func release(_ extent: Extent) { allocator.release(extent) }
    public var usedSlots: Int { allocator.usedSlots }
    public var hostMemory: UnsafeMutableRawBufferPointer? { nil }
    public var recoveredPages: [RecoveredPage] { [] }
    public func persistReleases() {}

    public var liveDaemons: Int { fleet.liveCount }

    private func ensureMapped(_ index: Int) -> Bool {
        if map.withLock({ !$0.stripes[index].members.isEmpty }) { return true }
        return mappingLock.withLock { _ -> Bool in
            if map.withLock({ !$0.stripes[index].members.isEmpty }) { return true }
            var excluded = Set<Int>()
            for _ in 0..<4 {
                guard let (group, chosen) = choosePlacement(excluding: excluded) else { return false }
                var members: [Member] = []
                for daemon in chosen {
                    // A refusal counts the daemon full; any other failure marks it dead (the fleet).
                    guard let mapped = fleet.mapSlab(on: daemon) else {
                        excluded.insert(daemon)
                        break
                    }
                    members.append(Member(daemon: daemon, slab: mapped.slab, epoch: mapped.epoch, rebuiltUpTo: nil))
                }
                if members.count == n {
                    map.withLock { $0.stripes[index] = Stripe(members: members, group: group) }
                    return true
                }
                for member in members { fleet.unmapSlab(member.reference) }
            }
            return false
        }
    }

    /// A coding set and k+r live members of it with free slabs (power of two choices among
    /// eligible sets by free slabs; within the set, the emptiest daemons).
    /// How many of a stripe's splits one failure domain may hold: ⌈(k+r)/domains⌉ over the
    /// live daemons' domains, or nil when that exceeds r (losing one domain could lose pages:
    /// no stripe is placed).
    func splitsPerDomain(_ state: DaemonFleet.State) -> Int? {
        var live = Set<String>()
        for daemon in state.alive.indices where state.alive[daemon] { live.insert(state.failureDomains[daemon]) }
        guard !live.isEmpty else { return nil }
        let perDomain = (n + live.count - 1) / live.count
        return perDomain <= configuration.r ? perDomain : nil
    }

    /// `splitsPerDomain` now.
    public var splitsPerDomain: Int? { splitsPerDomain(fleet.snapshot()) }

    private func choosePlacement(excluding excluded: Set<Int>) -> (group: Int, daemons: [Int])? {
        let placed: (group: Int, daemons: [Int])? = fleet.withState { map in
            guard let limit = splitsPerDomain(map) else { return nil }
            let now = monotonicNanoseconds()
            func candidates(_ group: Int) -> [Int] {
                groups[group].filter { map.accepts($0, at: now) && !excluded.contains($0) }
            }
            /// The emptiest (or, for `random`, any) daemons of the pool, at most
            /// `splitsPerDomain` per failure domain; nil if that leaves fewer than k+r.
            func members(_ group: Int) -> [Int]? {
                var pool = candidates(group).shuffled()
                if configuration.placement != .random { pool.sort { map.freeSlabs[$0] > map.freeSlabs[$1] } }
                var perDomain: [String: Int] = [:]
                var chosen: [Int] = []
                for daemon in pool where chosen.count < n && perDomain[map.failureDomains[daemon], default: 0] < limit {
                    perDomain[map.failureDomains[daemon], default: 0] += 1
                    chosen.append(daemon)
                }
                return chosen.count == n ? chosen : nil
            }
            let eligible = groups.indices.filter { candidates($0).count >= n && members($0) != nil }
            guard !eligible.isEmpty else { return nil }
            let a = eligible.randomElement()!
            let b = eligible.filter { $0 != a }.randomElement() ?? a
            func free(_ g: Int) -> Int { candidates(g).reduce(0) { $0 + map.freeSlabs[$1] } }
            let group = free(a) >= free(b) ? a : b
            return members(group).map { (group, $0) }
        }
        if placed == nil, !placementWarned.exchange(true, ordering: .relaxed) {
            logger.warning("no coding set has k+r live daemons with free slabs within the failure-domain limit: no new stripe", metadata: [
                "tier": "\(descriptor.name)", "splits_per_domain": "\(splitsPerDomain.map(String.init) ?? "none (too few domains)")",
                "live_daemons": "\(fleet.liveCount)"])
        }
        return placed
    }

    /// Whether `daemon` is suspect now (missed a write deadline less than `suspectSeconds` ago).
    public func isSuspect(_ daemon: Int) -> Bool { fleet.isSuspect(daemon) }

    /// Marks a daemon that missed a write deadline suspect for `suspectSeconds`.
    func markSuspect(_ daemon: Int, reason: String = "missed the write deadline") {
        guard fleet.markSuspect(daemon, for: configuration.suspectSeconds) else { return }
        counters.suspectMembers.wrappingIncrement(ordering: .relaxed)
        suspectMetric.increment()
        logger.warning("daemon suspect: writes count its splits missing for a while", metadata: [
            "tier": "\(descriptor.name)", "daemon": "\(fleet.name(daemon))", "reason": "\(reason)",
            "deadline_ms": "\(Int(configuration.writeDeadline * 1000))", "suspect_s": "\(configuration.suspectSeconds)",
        ])
    }

    /// A daemon is gone (`DaemonFleet.markDead`; the tier hears of it in `lost(_:)`).
    func markDead(_ daemon: Int, reason: String) { fleet.markDead(daemon, reason: reason) }

    /// The fleet marked `daemon` dead: reads of its splits go degraded until repair.
    private func lost(_ daemon: Int) {
        counters.daemonsLost.wrappingIncrement(ordering: .relaxed)
        logger.error("daemon lost; reads of its splits go degraded until repair", metadata: [
            "tier": "\(descriptor.name)", "daemon": "\(fleet.name(daemon))",
        ])
        Counter(label: "spillway_ec_daemons_lost", dimensions: [("tier", descriptor.name)]).increment()
    }

    // MARK: I/O

    /// One slot of one I/O: the unit that is coded.
    struct Unit {
        var io: Int
        var slot: Int
        var offset: Int
        var bytes: Int
        var write: Bool
        /// When the exchange finished with it (its last needed reply), for its I/O's latency.
        var finishedAt: UInt64 = 0
        /// Reads: splits arrived valid; writes: splits acknowledged.
        var good: UInt32 = 0
        var requested: UInt32 = 0
        /// Reads: splits whose daemon lagged this round (`EAGAIN`: never served, not missing),
        /// asked again in round 2.
        var lagged: UInt32 = 0
        var answered = 0
        var issued = 0
        var status: Int32 = 0
        /// This round: the unit needs no more replies (k valid splits, or all answered).
        var done = false
        /// This round's splits to transfer (bit i = split i).
        var choice: UInt32 = 0
        /// Reads: a split was unavailable (member dead, retired or being rebuilt, split stale)
        /// or failed (an error or its CRC32C). Distinct from decoding, which late binding also
        /// does on a healthy pool when a parity split merely answers first.
        var degraded = false
    }

    /// Fewest splits stored for a write to be acknowledged.
    private var acknowledgeFloor: Int {
        switch configuration.writeQuorum {
        case .all: k + 1
        case .splits(let quorum): quorum
        }
    }

    public func submit(_ batch: TierBatch) {
        defer { for index in 0..<batch.count { batch.finish(index) } }
        guard !closed.load(ordering: .relaxed) else {
            for index in 0..<batch.count { batch.setStatus(index, ESHUTDOWN) }
            return
        }
        gate.withReadLock { run(batch) }
    }

    /// Pages of `io` (slots it spans), or nil if the I/O is malformed.
    @inline(__always)
    private func unitCount(_ io: TierIO) -> Int? {
        guard io.buffer != nil, io.length <= Int(io.extent.slotCount) * descriptor.slotSize,
              Int(io.extent.endSlot) <= descriptor.capacitySlots
        else { return nil }
        return (io.length + descriptor.slotSize - 1) / descriptor.slotSize
    }

    private func run(_ batch: TierBatch) {
        let started = monotonicNanoseconds()
        var unitTotal = 0
        for index in 0..<batch.count {
            let io = batch[index]
            guard io.operation != .discard, io.length > 0 else { continue }
            guard let count = unitCount(io) else {
                batch.setStatus(index, EINVAL)
                continue
            }
            unitTotal += count
        }
        guard unitTotal > 0 else { return }
        ErasureScratch.withCurrent(units: unitTotal, n: n, splitSize: splitSize, daemons: fleet.count) { scratch in
            run(batch, scratch, started: started)
        }
    }

    /// One batch, planned and exchanged in the thread's scratch (no allocation once it has
    /// grown to the batch: a degraded read's first decode of a pattern builds its plan).
    /// Each I/O's latency is its own: submission to its last unit's reply (or decode).
    private func run(_ batch: TierBatch, _ scratch: ErasureScratch, started: UInt64) {
        let clients = self.clients
        let units = scratch.units
        var unitCount = 0
        for index in 0..<batch.count {
            let io = batch[index]
            guard io.operation != .discard, io.length > 0, self.unitCount(io) != nil else { continue }
            var offset = 0
            var slot = Int(io.extent.firstSlot)
            while offset < io.length {
                let bytes = min(descriptor.slotSize, io.length - offset)
                units[unitCount] = Unit(io: index, slot: slot, offset: offset, bytes: bytes, write: io.operation == .write)
                unitCount += 1
                offset += bytes
                slot += 1
            }
        }
        let splits = scratch.splits
        let snapshot = snapshot()
        // Writes: encode into scratch, record split checksums.
        let pointers = scratch.pointers
        var anyRead = false
        for u in 0..<unitCount {
            guard units[u].write else {
                anyRead = true
                continue
            }
            let base = splits + u * n * splitSize
            let source = batch[units[u].io].buffer! + units[u].offset
            memcpy(base, source, units[u].bytes)
            memset(base + units[u].bytes, 0, k * splitSize - units[u].bytes)
            for i in 0..<n { pointers[i] = (base + i * splitSize).assumingMemoryBound(to: UInt8.self) }
            code.encode(data: pointers, parity: pointers + k, length: splitSize)
            for i in 0..<n {
                splitChecksums[units[u].slot * n + i] = CRC32C.checksum(UnsafeRawBufferPointer(start: base + i * splitSize, count: splitSize))
            }
        }
        // Round 1: every write's splits, every read's first k+Δ valid splits. With late
        // binding, daemons still owing replies from earlier reads (stragglers) go last.
        let owed = scratch.owed
        var anyLagging = false
        for daemon in 0..<clients.count {
            owed[daemon] = 0
            if configuration.lateBindingDelta > 0 && anyRead, let client = clients[daemon], snapshot.alive[daemon] {
                owed[daemon] = client.laggingReplies()
                anyLagging = anyLagging || owed[daemon] > 0
            }
        }
        let now = monotonicNanoseconds()
        let all: UInt32 = n >= 32 ? .max : (1 << n) - 1
        let wanted = k + configuration.lateBindingDelta
        for u in 0..<unitCount {
            let members = snapshot.stripes[units[u].slot / slotsPerStripe].members
            if units[u].write {
                // Suspect members are counted missing at once: a daemon known to be slow must
                // not cost every write the deadline (nor pile up requests it owes).
                var mask = all
                if members.count == n {
                    for i in 0..<n where snapshot.suspect(members[i].daemon, at: now) { mask &= ~(1 << i) }
                }
                units[u].choice = mask
                continue
            }
            let valid = validMask(units[u].slot, snapshot)
            if valid != all { units[u].degraded = true }
            guard valid.nonzeroBitCount >= k else {
                units[u].status = valid == 0 || snapshot.alive.contains(false) ? EHOSTDOWN : EIO
                continue
            }
            var chosen: UInt32 = 0
            if !anyLagging {
                // The first k+Δ valid splits: data splits first.
                var rest = valid
                while chosen.nonzeroBitCount < wanted && rest != 0 {
                    chosen |= rest & (~rest &+ 1)
                    rest &= rest &- 1
                }
            } else {
                // Fewest owed replies first (a straggler keeps owing), data splits first
                // among equals.
                while chosen.nonzeroBitCount < wanted && valid & ~chosen != 0 {
                    var best = -1
                    for i in 0..<n where valid & ~chosen & (1 << i) != 0 {
                        if best < 0 || owed[members[i].daemon] < owed[members[best].daemon] { best = i }
                    }
                    chosen |= 1 << best
                }
            }
            units[u].choice = chosen
        }
        exchange(scratch, unitCount: unitCount, snapshot: snapshot, clients: clients)
        // Round 2: reads still short of k valid splits ask for the rest.
        var retry = false
        for u in 0..<unitCount {
            units[u].choice = 0
            guard !units[u].write, units[u].status == 0, units[u].good.nonzeroBitCount < k else { continue }
            // Splits not asked yet, and those whose daemon only lagged (still valid there).
            units[u].choice = validMask(units[u].slot, snapshot) & (~units[u].requested | units[u].lagged)
            units[u].lagged = 0
            retry = retry || units[u].choice != 0
        }
        if retry { exchange(scratch, unitCount: unitCount, snapshot: snapshot, clients: clients) }
        // Finish each unit.
        var decodedCount = 0
        var degradedCount = 0
        defer {
            if decodedCount > 0 {
                counters.decodedReads.wrappingIncrement(by: decodedCount, ordering: .relaxed)
                decodedReadsMetric.increment(by: decodedCount)
            }
            if degradedCount > 0 {
                counters.degradedReads.wrappingIncrement(by: degradedCount, ordering: .relaxed)
                degradedReadsMetric.increment(by: degradedCount)
            }
        }
        for u in 0..<unitCount {
            let unit = units[u]
            let base = splits + u * n * splitSize
            if unit.status != 0 {
                if batch[unit.io].status == 0 { batch.setStatus(unit.io, unit.status) }
                if !unit.write { counters.lostReads.wrappingIncrement(ordering: .relaxed) }
                continue
            }
            if unit.write {
                let stored = unit.good.nonzeroBitCount
                // A member being rebuilt past this slot from a retired slab: reads there go to
                // the retired slab, which holds the previous bytes, so the split counts as
                // stale until the rebuild rewrites it.
                let pastWatermark = retiredPastWatermark(unit.slot, snapshot)
                if stored == n && pastWatermark == 0 {
                    stale(unit.slot).store(0, ordering: .relaxed)
                } else if stored >= acknowledgeFloor {
                    stale(unit.slot).store((~unit.good & all) | pastWatermark, ordering: .relaxed)
                    if stored < n { counters.degradedWrites.wrappingIncrement(ordering: .relaxed) }
                } else {
                    counters.failedWrites.wrappingIncrement(ordering: .relaxed)
                    if batch[unit.io].status == 0 { batch.setStatus(unit.io, EIO) }
                }
                continue
            }
            let dataMask: UInt32 = (1 << k) - 1
            if unit.good & dataMask != dataMask {
                guard unit.good.nonzeroBitCount >= k else {
                    counters.lostReads.wrappingIncrement(ordering: .relaxed)
                    if batch[unit.io].status == 0 { batch.setStatus(unit.io, snapshot.alive.contains(false) ? EHOSTDOWN : EIO) }
                    continue
                }
                // The first k good splits rebuild the missing data splits.
                var sources: UInt32 = 0
                var rest = unit.good
                while sources.nonzeroBitCount < k {
                    sources |= rest & (~rest &+ 1)
                    rest &= rest &- 1
                }
                guard let plan = code.plan(sourceMask: sources, targetMask: dataMask & ~unit.good) else {
                    if batch[unit.io].status == 0 { batch.setStatus(unit.io, EIO) }
                    continue
                }
                let targetPointers = scratch.targetPointers
                for (position, source) in plan.sources.enumerated() {
                    pointers[position] = (base + source * splitSize).assumingMemoryBound(to: UInt8.self)
                }
                for (position, target) in plan.targets.enumerated() {
                    targetPointers[position] = (base + target * splitSize).assumingMemoryBound(to: UInt8.self)
                }
                code.decode(plan, sources: pointers, targets: targetPointers, length: splitSize)
                decodedCount += 1
            }
            if unit.degraded { degradedCount += 1 }
            memcpy(batch[unit.io].buffer! + unit.offset, base, unit.bytes)
            stamp(unit, decoded: unit.good & dataMask != dataMask)
        }
        /// The I/O waited until its slowest unit finished (a decode ends when it is done).
        func stamp(_ unit: Unit, decoded: Bool) {
            let end = decoded || unit.finishedAt == 0 ? monotonicNanoseconds() : unit.finishedAt
            let waited = max(1, end &- started)
            if waited > batch[unit.io].latencyNanoseconds { batch.setLatency(unit.io, nanoseconds: waited) }
        }
        for u in 0..<unitCount where units[u].write && units[u].status == 0 { stamp(units[u], decoded: false) }
    }

    /// The splits of `slot` worth reading, as a mask (bit i = split i): member alive, rebuilt
    /// past this slot, not stale.
    private func validMask(_ slot: Int, _ snapshot: StripeSnapshot) -> UInt32 {
        let stripe = snapshot.stripes[slot / slotsPerStripe]
        guard stripe.members.count == n else { return 0 }
        let local = slot % slotsPerStripe
        let staleBits = stale(slot).load(ordering: .relaxed)
        var mask: UInt32 = 0
        for i in 0..<n where staleBits & (1 << i) == 0 {
            let member = stripe.members[i]
            let valid: Bool
            if member.rebuiltUpTo.map({ local < $0 }) ?? true {
                valid = snapshot.live(member.daemon, member.epoch) && !member.retiring
            } else {
                // Past the rebuild watermark: only a retired slab still holding the split counts.
                valid = member.retired.map { snapshot.live($0.daemon, $0.epoch) } ?? false
            }
            if valid { mask |= 1 << i }
        }
        return mask
    }

    /// `validMask` as split indices, data splits first (the repairer's view).
    private func validSplits(_ slot: Int, _ snapshot: StripeSnapshot) -> [Int] {
        let mask = validMask(slot, snapshot)
        return (0..<n).filter { mask & (1 << $0) != 0 }
    }

    /// The splits of `slot` whose member is rebuilt from a retired slab not yet past `slot`.
    private func retiredPastWatermark(_ slot: Int, _ snapshot: StripeSnapshot) -> UInt32 {
        let stripe = snapshot.stripes[slot / slotsPerStripe]
        guard stripe.members.count == n else { return 0 }
        let local = slot % slotsPerStripe
        var bits: UInt32 = 0
        for (i, member) in stripe.members.enumerated() {
            if member.retired != nil, let rebuilt = member.rebuiltUpTo, local >= rebuilt { bits |= 1 << i }
        }
        return bits
    }

    /// Where split `split` of unit `unit` goes this round: its member's slab, or (a read past a
    /// rebuild watermark) the retired slab it replaces; nil when there is none or its daemon
    /// is down.
    @inline(__always)
    private func destination(_ unit: Unit, split: Int, _ stripe: Stripe, local: Int, _ snapshot: StripeSnapshot,
                             _ clients: [DaemonClient?]) -> SlabReference?
    {
        let member = stripe.members[split]
        var target = member.reference
        if let rebuilt = member.rebuiltUpTo, !unit.write, local >= rebuilt {
            // Not rebuilt this far: read the retired slab it replaces, if any.
            guard let retired = member.retired else { return nil }
            target = retired
        }
        guard snapshot.live(target.daemon, target.epoch), clients[target.daemon] != nil else { return nil }
        return target
    }

    /// Runs one round: for each unit, transfers the splits in its `choice` mask, all daemons'
    /// frames in flight at once (`MultiDaemonExchange`).
    private func exchange(_ scratch: ErasureScratch, unitCount: Int, snapshot: StripeSnapshot, clients: [DaemonClient?]) {
        let units = scratch.units
        let plan = scratch.fanOut
        plan.reset(daemons: clients.count, capacity: unitCount * n)
        // Count each daemon's operations, then lay them out daemon by daemon.
        for u in 0..<unitCount where units[u].choice != 0 && units[u].status == 0 {
            let stripe = snapshot.stripes[units[u].slot / slotsPerStripe]
            guard stripe.members.count == n else {
                units[u].status = EINVAL
                continue
            }
            let local = units[u].slot % slotsPerStripe
            var bits = units[u].choice
            while bits != 0 {
                let split = bits.trailingZeroBitCount
                bits &= bits &- 1
                if let target = destination(units[u], split: split, stripe, local: local, snapshot, clients) { plan.count(target.daemon) }
            }
        }
        guard plan.layOut() > 0 else { return }
        for u in 0..<unitCount where units[u].choice != 0 && units[u].status == 0 {
            let stripe = snapshot.stripes[units[u].slot / slotsPerStripe]
            let local = units[u].slot % slotsPerStripe
            var bits = units[u].choice
            while bits != 0 {
                let split = bits.trailingZeroBitCount
                bits &= bits &- 1
                guard let target = destination(units[u], split: split, stripe, local: local, snapshot, clients) else { continue }
                plan.place(target.daemon, RemoteOperation(write: units[u].write, slab: target.slab, offset: UInt64(local * splitSize),
                                                          length: splitSize, buffer: scratch.splits + (u * n + split) * splitSize),
                           owner: FanOut.Owner(u, split))
                units[u].requested |= 1 << split
                units[u].issued += 1
            }
        }
        var readsPending = 0
        var writesPending = 0
        for u in 0..<unitCount {
            units[u].done = units[u].answered == units[u].issued || (!units[u].write && units[u].good.nonzeroBitCount >= k)
            guard !units[u].done else { continue }
            if units[u].write { writesPending += 1 } else { readsPending += 1 }
        }
        let started = monotonicNanoseconds()
        let writeDeadline = started &+ UInt64(configuration.writeDeadline * 1e9)
        let hardDeadline = started &+ UInt64(configuration.ioTimeout * 1e9)
        let floor = acknowledgeFloor
        let splits = scratch.splits
        let operations = plan.operations
        plan.withLegs(clients: clients) { legs in
            // A daemon whose every connection still owes replies (a straggler, or a host gone
            // silent) is not waited for: its splits fail at once and the others stand in.
            MultiDaemonExchange.run(legs, window: 128, skipBusy: true, onReply: { leg, index in
                let position = plan.position(leg: leg, index: index)
                let u = Int(plan.owners[position].first)
                let split = Int(plan.owners[position].second)
                let status = operations[position].status
                units[u].answered += 1
                defer {
                    // A unit is finished for this round once it has what it needs or
                    // every request it made is answered.
                    if !units[u].done && (units[u].answered == units[u].issued || (!units[u].write && units[u].good.nonzeroBitCount >= k)) {
                        units[u].done = true
                        units[u].finishedAt = monotonicNanoseconds()
                        if units[u].write { writesPending -= 1 } else { readsPending -= 1 }
                    }
                }
                if units[u].write {
                    if status == 0 { units[u].good |= 1 << split }
                    return
                }
                guard status == 0 else {
                    // EAGAIN: its daemon lagged (a slow member, not a missing split).
                    if status == EAGAIN { units[u].lagged |= 1 << split } else { units[u].degraded = true }
                    return
                }
                let slot = units[u].slot
                let bytes = UnsafeRawBufferPointer(start: splits + (u * n + split) * splitSize, count: splitSize)
                if CRC32C.checksum(bytes) == splitChecksums[slot * n + split] {
                    units[u].good |= 1 << split
                } else {
                    units[u].degraded = true
                    counters.corruptSplits.wrappingIncrement(ordering: .relaxed)
                    _ = stale(slot).loadThenBitwiseOr(with: 1 << split, ordering: .relaxed)
                    logger.error("split failed its CRC32C; treated as an erasure and rebuilt from the others", metadata: [
                        "tier": "\(descriptor.name)", "slot": "\(slot)", "split": "\(split)",
                        "daemon": "\(clients[plan.legDaemons[leg]]?.endpoint.description ?? "?")",
                    ])
                }
            }, stop: { now in
                if now >= hardDeadline { return true }
                guard readsPending <= 0 else { return false }
                if writesPending <= 0 { return true }
                // Every write waits for all its members until the deadline; then the
                // members still silent are suspect, and a write with its acknowledgement
                // floor stored need not wait for them.
                guard now >= writeDeadline else { return false }
                for u in 0..<unitCount where units[u].write && !units[u].done && units[u].good.nonzeroBitCount < floor { return false }
                return true
            })
        }
        for daemon in 0..<clients.count where plan.counts[daemon] > 0 {
            let run = plan.run(of: daemon)
            if clients[daemon]!.failed.load(ordering: .relaxed) {
                markDead(daemon, reason: "connection failed")
                continue
            }
            // A write split still unanswered here outlived the write deadline, or found every
            // connection of its daemon still owing replies: its member is slow.
            if run.contains(where: { operations[$0].write && (operations[$0].status == MultiDaemonExchange.pending || operations[$0].status == EAGAIN) }) {
                markSuspect(daemon)
            }
        }
        // ENXIO: the daemon no longer has that slab (revoked after a missed reclaim deadline).
        for daemon in 0..<clients.count where plan.counts[daemon] > 0 {
            for position in plan.run(of: daemon) where operations[position].status == ENXIO {
                retire(daemon: daemon, slab: operations[position].slab, reason: "slab revoked", revoked: true)
            }
        }
    }

    // MARK: Heartbeat and repair

    public func heartbeat() {
        fleet.heartbeat()
        let now = monotonicNanoseconds()
        if configuration.canaryInterval > 0, now >= nextCanary.load(ordering: .relaxed) {
            nextCanary.store(now &+ UInt64(configuration.canaryInterval * 1e9), ordering: .relaxed)
            runCanaries()
        }
        // Reclaim: the slab's split moves elsewhere by regeneration (repair), then the slab
        // goes back. No page loses more than that one split meanwhile.
        for notice in fleet.takeReclaims() where fleet.isAlive(notice.daemon) {
            retire(daemon: notice.daemon, slab: notice.slab, reason: "reclaim notice")
        }
        drainSuspects()
    }

    /// Retires every member this tier has on a daemon it drains (`DaemonFleet.markDraining`):
    /// the repairer regenerates those splits on other daemons, then gives the slabs back, so
    /// the pages keep full redundancy without the suspect daemon before anyone declares it dead.
    func drainSuspects() {
        let draining = fleet.drainingDaemons()
        guard !draining.isEmpty else { return }
        let epochs = fleet.snapshot().epoch
        let slabs: [(daemon: Int, slab: UInt32)] = map.withLock { map in
            var slabs: [(Int, UInt32)] = []
            for stripe in map.stripes {
                for member in stripe.members where draining.contains(member.daemon) && member.epoch == epochs[member.daemon]
                    && !member.retiring && member.rebuiltUpTo == nil
                {
                    slabs.append((member.daemon, member.slab))
                }
            }
            return slabs
        }
        for (daemon, slab) in slabs { retire(daemon: daemon, slab: slab, reason: "draining a suspect daemon") }
    }

    /// Splits one canary reads at most (consecutive slots of one member).
    static let canarySplits = 16

    /// One canary round: on every live daemon, a run of up to `canarySplits` splits the tier
    /// stored there (consecutive allocated slots of a random stripe with a current member on
    /// it), read in one request, each checked against its recorded CRC32C, timed. A split that fails its check is stale (repaired)
    /// and its daemon drained; a daemon whose canary p99 (over its last 32) is more than 4×
    /// the fleet's median (and over 1 ms), with a slow read this round too, in two rounds
    /// running, is drained (`CanaryJudge`, `DaemonFleet.markDraining`): suspect, no new
    /// stripes, its splits regenerated elsewhere for `drainSeconds`. Returns the daemons
    /// found suspect.
    @discardableResult
    public func runCanaries() -> [Int] {
        let snapshot = snapshot()
        let clients = self.clients
        var suspects: [Int] = []
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: Self.canarySplits * splitSize, alignment: 64)
        defer { buffer.deallocate() }
        // Per daemon, the stripes with a current, fully rebuilt member on it: one pass.
        var candidates = [[(stripe: Int, split: Int)]](repeating: [], count: fleet.count)
        for (index, stripe) in snapshot.stripes.enumerated() where stripe.members.count == n {
            for (split, member) in stripe.members.enumerated()
                where snapshot.live(member.daemon, member.epoch) && member.rebuiltUpTo == nil && !member.retiring
            {
                candidates[member.daemon].append((index, split))
            }
        }
        for daemon in 0..<fleet.count where !snapshot.alive[daemon] { fleet.forgetCanaries(daemon) }
        for daemon in 0..<fleet.count where snapshot.alive[daemon] {
            guard let client = clients[daemon] else { continue }
            var checked = false
            for (stripeIndex, split) in candidates[daemon].shuffled().prefix(4) where !checked {
                let first = stripeIndex * slotsPerStripe
                let runs = allocator.allocatedRuns(in: first..<min(first + slotsPerStripe, descriptor.capacitySlots))
                guard let run = runs.randomElement(), let start = run.randomElement() else { continue }
                // Up to `canarySplits` consecutive splits in one read: a canary that moves some
                // bytes feels a rate-limited link (a single small reply slips through a token
                // bucket's burst) and checks more splits per round.
                let count = min(Self.canarySplits, run.upperBound - start)
                let member = snapshot.stripes[stripeIndex].members[split]
                var operation = RemoteOperation(write: false, slab: member.slab, offset: UInt64((start - first) * splitSize),
                                                length: count * splitSize, buffer: buffer)
                // The first read holds no lock: a daemon that does not answer must not hold the
                // gate for the I/O timeout (a repair waiting for it would stall every read).
                // A mismatch is read again under the shared gate, where no repair chunk
                // rewrites a split; a put may (its CRC is recorded with the gate shared too),
                // hence the pause first. Returns the first slot whose split came back wrong.
                func read(gated: Bool) -> (status: Int32, elapsed: UInt64, wrong: Int?) {
                    gated ? gate.withReadLock { attempt() } : attempt()
                }
                func attempt() -> (status: Int32, elapsed: UInt64, wrong: Int?) {
                    func isStale(_ slot: Int) -> Bool { stale(slot).load(ordering: .relaxed) & (1 << split) != 0 }
                    guard (start..<(start + count)).contains(where: { !isStale($0) }) else { return (-1, 0, nil) }
                    let started = monotonicNanoseconds()
                    _ = withUnsafeMutablePointer(to: &operation) { client.execute(UnsafeMutableBufferPointer(start: $0, count: 1)) }
                    let elapsed = monotonicNanoseconds() &- started
                    guard operation.status == 0 else { return (operation.status, elapsed, nil) }
                    for slot in start..<(start + count) {
                        let bytes = UnsafeRawBufferPointer(start: buffer + (slot - start) * splitSize, count: splitSize)
                        if CRC32C.checksum(bytes) != splitChecksums[slot * n + split] && !isStale(slot) { return (0, elapsed, slot) }
                    }
                    return (0, elapsed, nil)
                }
                var (status, elapsed, wrong) = read(gated: false)
                if status == 0 && wrong != nil {
                    // A put or a repair may have been rewriting this slot: look once more,
                    // under the gate, before calling the bytes wrong.
                    usleep(5000)
                    (status, _, wrong) = read(gated: true)
                }
                let intact = wrong == nil
                let slot = wrong ?? start
                guard status != -1 else { continue }  // stale: not a fair test
                checked = true
                counters.canaries.wrappingIncrement(ordering: .relaxed)
                if status != 0 || !intact {
                    counters.canaryFailures.wrappingIncrement(ordering: .relaxed)
                    if status == 0 {
                        counters.corruptSplits.wrappingIncrement(ordering: .relaxed)
                        _ = stale(slot).loadThenBitwiseOr(with: 1 << split, ordering: .relaxed)
                    }
                    logger.error("canary failed: the daemon returned an error or wrong bytes", metadata: [
                        "tier": "\(descriptor.name)", "daemon": "\(fleet.name(daemon))", "slot": "\(slot)", "split": "\(split)",
                        "status": "\(status)"])
                    fleet.markDraining(daemon, for: configuration.drainSeconds,
                                       reason: status == 0 ? "a canary read returned bytes that failed their CRC32C" : "a canary read failed (errno \(status))")
                    suspects.append(daemon)
                    continue
                }
                fleet.recordCanary(daemon, nanoseconds: elapsed)
            }
        }
        // Latency outliers: p99 over the window against the fleet's median, two rounds running.
        suspects += fleet.endCanaryRound(drainFor: configuration.drainSeconds)
        return suspects
    }

    /// Marks the member on (`daemon`, `slab`) for replacement. `revoked`: the daemon no longer
    /// has the slab, so a retired slab it matches stops serving reads at once.
    func retire(daemon: Int, slab: UInt32, reason: String, revoked: Bool = false) {
        // Only the daemon's current epoch: an older epoch's slab with the same id is gone already.
        let epoch = fleet.snapshot().epoch[daemon]
        let reference = SlabReference(daemon: daemon, slab: slab, epoch: epoch)
        let found = map.withLock { map -> Bool in
            for stripe in map.stripes.indices {
                for member in map.stripes[stripe].members.indices where map.stripes[stripe].members[member].retired == reference {
                    // Already being moved; a reclaim notice changes nothing, a revocation means
                    // its splits past the rebuild watermark are gone.
                    if revoked { map.stripes[stripe].members[member].retired = nil }
                    return false
                }
                for member in map.stripes[stripe].members.indices
                    where map.stripes[stripe].members[member].reference == reference && !map.stripes[stripe].members[member].retiring
                {
                    map.stripes[stripe].members[member].retiring = true
                    return true
                }
            }
            return false
        }
        guard found else { return }
        counters.slabsRetired.wrappingIncrement(ordering: .relaxed)
        logger.notice("stripe member retired; its splits are regenerated on another daemon", metadata: [
            "tier": "\(descriptor.name)", "daemon": "\(clients[daemon]?.endpoint.description ?? "?")", "slab": "\(slab)", "reason": "\(reason)",
        ])
    }

    /// One repair round, regenerating at most `budgetBytes` of splits: replacement slabs for
    /// members on dead daemons (same coding set when possible), then their splits, then stale
    /// splits on live members. Returns the splits regenerated.
    @discardableResult
    public func repair(budgetBytes: Int) -> Int {
        var budget = max(splitSize, budgetBytes) / splitSize
        var regenerated = 0
        assignReplacements()
        // Rebuild members on replacement slabs, a chunk at a time.
        let rebuilding: [(stripe: Int, member: Int, from: Int)] = map.withLock { map in
            var list: [(Int, Int, Int)] = []
            for (index, stripe) in map.stripes.enumerated() {
                for (position, member) in stripe.members.enumerated() {
                    if let from = member.rebuiltUpTo { list.append((index, position, from)) }
                }
            }
            return list
        }
        for (stripe, member, from) in rebuilding where budget > 0 {
            let first = stripe * slotsPerStripe
            // The last stripe may extend past the tier's capacity: those slots never exist.
            let stripeEnd = min(slotsPerStripe, descriptor.capacitySlots - first)
            let end = min(stripeEnd, from + min(budget, 256))
            let slots = allocator.allocatedRuns(in: (first + from)..<(first + end)).flatMap { $0 }
            let (done, returning) = gate.withWriteLock { () -> (Bool, SlabReference?) in
                let ok = regenerate(slots.map { ($0, [member]) })
                // Counted before the member is published complete, so whoever sees full
                // health also sees the count.
                if end >= stripeEnd { counters.membersRebuilt.wrappingIncrement(ordering: .relaxed) }
                return (ok, map.withLock { map -> SlabReference? in
                    let next = end >= stripeEnd ? nil : end
                    map.stripes[stripe].members[member].rebuiltUpTo = next
                    guard next == nil, let retired = map.stripes[stripe].members[member].retired else { return nil }
                    // Every split is regenerated: the retired slab is no longer read.
                    map.stripes[stripe].members[member].retired = nil
                    return retired
                })
            }
            if let returning { giveBack(returning) }
            regenerated += slots.count
            budget -= max(1, slots.count)
            if end >= stripeEnd {
                logger.notice(done ? "stripe member rebuilt; full redundancy restored" : "stripe member rebuilt; some of its pages were already lost", metadata: [
                    "tier": "\(descriptor.name)", "stripe": "\(stripe)", "split": "\(member)",
                ])
            }
        }
        // Stale splits on live, complete, non-suspect members. The scan resumes where the
        // last round stopped and wraps around, so slots that cannot be repaired now never hold
        // back the ones behind them round after round.
        if budget > 0 {
            let snapshot = snapshot()
            let now = monotonicNanoseconds()
            let capacity = descriptor.capacitySlots
            let start = staleCursor.load(ordering: .relaxed) % capacity
            let limit = min(budget, 256)
            var work: [(Int, [Int])] = []
            var resume: Int?
            scan: for range in [start..<capacity, 0..<start] {
                for run in allocator.allocatedRuns(in: range) {
                    for slot in run {
                        guard work.count < limit else {
                            resume = slot
                            break scan
                        }
                        let bits = stale(slot).load(ordering: .relaxed)
                        guard bits != 0 else { continue }
                        let stripe = snapshot.stripes[slot / slotsPerStripe]
                        guard stripe.members.count == n else { continue }
                        // Fewer than k valid splits: the page is lost (health() counts it);
                        // retrying it every round would only spend the budget.
                        guard validSplits(slot, snapshot).count >= k else { continue }
                        let targets = (0..<n).filter { bits & (1 << $0) != 0 && snapshot.live(stripe.members[$0].daemon, stripe.members[$0].epoch)
                            && stripe.members[$0].rebuiltUpTo == nil && !stripe.members[$0].retiring
                            && !snapshot.suspect(stripe.members[$0].daemon, at: now) }
                        if !targets.isEmpty { work.append((slot, targets)) }
                    }
                }
            }
            // A full lap found less than the limit: the next round starts over where this one did.
            staleCursor.store(resume ?? start, ordering: .relaxed)
            if !work.isEmpty {
                gate.withWriteLock { _ = regenerate(work) }
                regenerated += work.reduce(0) { $0 + $1.1.count }
            }
        }
        if regenerated > 0 {
            counters.repairedSplits.wrappingIncrement(by: regenerated, ordering: .relaxed)
            Counter(label: "spillway_ec_repaired_splits", dimensions: [("tier", descriptor.name)]).increment(by: regenerated)
        }
        publishHealth()
        return regenerated
    }

    /// Maps a replacement slab for every member on a dead daemon (in the stripe's coding set
    /// if it has a live daemon not in the stripe, else anywhere, logged).
    private func assignReplacements() {
        let fleetState = fleet.snapshot()
        let limit = splitsPerDomain(fleetState) ?? 0
        let needing: [(stripe: Int, member: Int, group: Int, used: Set<Int>, domains: [String: Int])] = map.withLock { map in
            var list: [(Int, Int, Int, Set<Int>, [String: Int])] = []
            for (index, stripe) in map.stripes.enumerated() {
                // A member whose daemon is dead or rejoined since (new epoch: its slab is gone).
                let current = stripe.members.filter { fleetState.isCurrent($0.daemon, epoch: $0.epoch) && !$0.retiring }
                let used = Set(stripe.members.filter { fleetState.isCurrent($0.daemon, epoch: $0.epoch) }.map(\.daemon))
                // Splits per failure domain among the members that stay: a replacement must
                // not take its domain past the limit.
                var domains: [String: Int] = [:]
                for member in current { domains[fleetState.failureDomains[member.daemon], default: 0] += 1 }
                for (position, member) in stripe.members.enumerated()
                    where !fleetState.isCurrent(member.daemon, epoch: member.epoch) || member.retiring
                {
                    list.append((index, position, stripe.group, used, domains))
                }
            }
            return list
        }
        // Replacements made this round, per stripe: a stripe missing two members must not get
        // both on one daemon, nor past its domain limit.
        var placedDaemons: [Int: Set<Int>] = [:]
        var placedDomains: [Int: [String: Int]] = [:]
        for (stripe, member, group, used, domains) in needing {
            let taken = used.union(placedDaemons[stripe] ?? [])
            let extra = placedDomains[stripe] ?? [:]
            let now = monotonicNanoseconds()
            let candidate: Int? = fleet.withState { map in
                func fits(_ daemon: Int) -> Bool {
                    let domain = map.failureDomains[daemon]
                    return map.accepts(daemon, at: now) && !taken.contains(daemon)
                        && domains[domain, default: 0] + extra[domain, default: 0] < limit
                }
                let inGroup = groups[group].filter(fits)
                let anywhere = (0..<fleet.count).filter(fits)
                return (inGroup.isEmpty ? anywhere : inGroup).max { map.freeSlabs[$0] < map.freeSlabs[$1] }
            }
            guard let daemon = candidate, clients[daemon] != nil else {
                let first = map.withLock { map -> Bool in
                    defer { map.stripes[stripe].repairBlocked = true }
                    return !map.stripes[stripe].repairBlocked
                }
                if first {
                    logger.warning("no live daemon outside the stripe has room; the stripe stays degraded", metadata: [
                        "tier": "\(descriptor.name)", "stripe": "\(stripe)",
                    ])
                }
                continue
            }
            if !groups[group].contains(daemon) {
                logger.warning("repairing outside the stripe's coding set (none of its daemons has room)", metadata: [
                    "tier": "\(descriptor.name)", "stripe": "\(stripe)",
                ])
            }
            // A refusal counts the daemon full; any other failure marks it dead (the fleet).
            if let mapped = fleet.mapSlab(on: daemon) {
                placedDaemons[stripe, default: []].insert(daemon)
                placedDomains[stripe, default: [:]][fleetState.failureDomains[daemon], default: 0] += 1
                let superseded = gate.withWriteLock {
                    map.withLock { map -> SlabReference? in
                        let old = map.stripes[stripe].members[member]
                        var replacement = Member(daemon: daemon, slab: mapped.slab, epoch: mapped.epoch, rebuiltUpTo: 0)
                        var superseded: SlabReference?
                        if old.retiring {
                            // The retiring slab still holds its splits: it serves reads past the
                            // rebuild watermark and goes back only once the rebuild completes.
                            replacement.retired = old.reference
                            superseded = old.retired
                        } else {
                            // A dead replacement: keep the retired slab it was rebuilt from.
                            replacement.retired = old.retired
                        }
                        map.stripes[stripe].members[member] = replacement
                        map.stripes[stripe].repairBlocked = false
                        return superseded
                    }
                }
                // A slab retired twice over (its replacement was retired mid-rebuild): the
                // newer retiring slab holds the same splits, so the older one can go.
                if let superseded { giveBack(superseded) }
            }
        }
    }

    /// Unmaps a retired slab on its (live) daemon.
    private func giveBack(_ reference: SlabReference) {
        if fleet.unmapSlab(reference) { counters.slabsReturned.wrappingIncrement(ordering: .relaxed) }
    }

    /// Regenerates the listed splits of each slot from k valid others (data first) and writes
    /// them. Called with the gate held exclusively. False if any slot had fewer than k valid
    /// splits (those pages are lost) or a transfer failed.
    private func regenerate(_ work: [(slot: Int, targets: [Int])]) -> Bool {
        guard !work.isEmpty else { return true }
        let snapshot = snapshot()
        let clients = self.clients
        return ErasureScratch.withCurrent(units: work.count, n: n, splitSize: splitSize, daemons: clients.count) { scratch in
            let units = scratch.units
            var targetMasks = [UInt32](repeating: 0, count: work.count)
            for (u, item) in work.enumerated() {
                for target in item.targets { targetMasks[u] |= 1 << target }
                units[u] = Unit(io: 0, slot: item.slot, offset: 0, bytes: 0, write: false)
                // k valid splits that are not targets, data splits first.
                var rest = validMask(item.slot, snapshot) & ~targetMasks[u]
                var chosen: UInt32 = 0
                while chosen.nonzeroBitCount < k && rest != 0 {
                    chosen |= rest & (~rest &+ 1)
                    rest &= rest &- 1
                }
                units[u].choice = chosen
            }
            exchange(scratch, unitCount: work.count, snapshot: snapshot, clients: clients)
            var ok = true
            let pointers = scratch.pointers
            let targetPointers = scratch.targetPointers
            for u in 0..<work.count {
                let good = units[u].good
                // The same unit, now writing the regenerated splits.
                units[u].write = true
                units[u].good = 0
                units[u].answered = 0
                units[u].issued = 0
                units[u].requested = 0
                units[u].choice = 0
                guard good.nonzeroBitCount >= k else {
                    ok = false
                    logger.error("page lost: fewer than k valid splits left", metadata: ["tier": "\(descriptor.name)", "slot": "\(units[u].slot)"])
                    counters.lostPagesSeen.wrappingIncrement(ordering: .relaxed)
                    continue
                }
                let base = scratch.splits + u * n * splitSize
                var sources: UInt32 = 0
                var rest = good
                while sources.nonzeroBitCount < k {
                    sources |= rest & (~rest &+ 1)
                    rest &= rest &- 1
                }
                guard let plan = code.plan(sourceMask: sources, targetMask: targetMasks[u]) else {
                    ok = false
                    continue
                }
                for (position, source) in plan.sources.enumerated() { pointers[position] = (base + source * splitSize).assumingMemoryBound(to: UInt8.self) }
                for (position, target) in plan.targets.enumerated() { targetPointers[position] = (base + target * splitSize).assumingMemoryBound(to: UInt8.self) }
                code.decode(plan, sources: pointers, targets: targetPointers, length: splitSize)
                for target in plan.targets {
                    let crc = CRC32C.checksum(UnsafeRawBufferPointer(start: base + target * splitSize, count: splitSize))
                    if crc != splitChecksums[units[u].slot * n + target] {
                        // The sources decoded to other bytes than were written: never store them.
                        ok = false
                        logger.error("regenerated split does not match its recorded CRC32C; not written", metadata: [
                            "tier": "\(descriptor.name)", "slot": "\(units[u].slot)", "split": "\(target)",
                        ])
                        continue
                    }
                    units[u].choice |= 1 << target
                }
            }
            // Writes go to the targets' current members, including a replacement being rebuilt.
            var chosen = [UInt32](repeating: 0, count: work.count)
            for u in 0..<work.count { chosen[u] = units[u].choice }
            exchange(scratch, unitCount: work.count, snapshot: snapshot, clients: clients)
            for u in 0..<work.count where chosen[u] != 0 {
                let written = units[u].good
                _ = stale(units[u].slot).loadThenBitwiseAnd(with: ~written, ordering: .relaxed)
                if written.nonzeroBitCount != chosen[u].nonzeroBitCount { ok = false }
            }
            return ok
        }
    }

    // MARK: Health

    /// Allocated slots by redundancy: all k+r splits valid, k…k+r-1 valid, fewer than k.
    public func health() -> (healthy: Int, degraded: Int, lost: Int) {
        let snapshot = snapshot()
        var healthy = 0
        var degraded = 0
        var lost = 0
        for run in allocator.allocatedRuns(in: 0..<descriptor.capacitySlots) {
            for slot in run {
                let valid = validSplits(slot, snapshot).count
                if valid == n { healthy += 1 } else if valid >= k { degraded += 1 } else { lost += 1 }
            }
        }
        return (healthy, degraded, lost)
    }

    func publishHealth() {
        let (healthy, degraded, lost) = health()
        Gauge(label: "spillway_ec_pages", dimensions: [("tier", descriptor.name), ("state", "healthy")]).record(healthy)
        Gauge(label: "spillway_ec_pages", dimensions: [("tier", descriptor.name), ("state", "degraded")]).record(degraded)
        Gauge(label: "spillway_ec_pages", dimensions: [("tier", descriptor.name), ("state", "lost")]).record(lost)
    }

    /// Test hook: flips the bytes of split `split` of `slot` on its daemon (which must run
    /// with `--enable-test-faults`).
    public func corruptSplitForTest(slot: Int, split: Int) throws(RemoteError) {
        guard let member = member(slot: slot, split: split), let client = clients[member.daemon] else {
            throw .protocolViolation("slot \(slot) split \(split) is not mapped")
        }
        try client.corruptForTest(slab: member.slab, offset: UInt64(slot % slotsPerStripe * splitSize), length: 16)
    }

    /// Test hook: marks splits of `slot` stale (bit i = split i), as a write that missed them
    /// or a failed check would.
    func markStaleForTest(slot: Int, splits: UInt32) {
        _ = stale(slot).loadThenBitwiseOr(with: splits, ordering: .relaxed)
    }

    /// The daemon (index into `clients`) holding split `split` of `slot`; nil if not mapped.
    public func daemonOf(slot: Int, split: Int) -> Int? { member(slot: slot, split: split)?.daemon }

    /// Slabs this tier still holds on `daemon` in its current epoch: stripe members, and
    /// retired slabs not yet given back (a drain is over when this is 0).
    public func slabsHeld(on daemon: Int) -> Int {
        let epoch = fleet.snapshot().epoch[daemon]
        return map.withLock { map in
            map.stripes.reduce(0) { total, stripe in
                total + stripe.members.reduce(0) { count, member in
                    count + (member.daemon == daemon && member.epoch == epoch ? 1 : 0)
                        + (member.retired.map { $0.daemon == daemon && $0.epoch == epoch } == true ? 1 : 0)
                }
            }
        }
    }

    private func member(slot: Int, split: Int) -> Member? {
        guard slot >= 0, slot < descriptor.capacitySlots, split >= 0, split < n else { return nil }
        return map.withLock { map in
            let members = map.stripes[slot / slotsPerStripe].members
            return members.count == n ? members[split] : nil
        }
    }

    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        for stop in stopOnClose { stop() }
        background?.join()
        let mapped: [SlabReference] = map.withLock { map in
            let members = map.stripes.flatMap { $0.members }
            return members.map(\.reference) + members.compactMap(\.retired)
        }
        fleet.close(unmapping: mapped)
        inProcessDaemons?.stop()
    }
}

/// What the erasure-coded tier counts (relaxed atomics).
public final class ErasureCounters: Sendable {
    /// Slot reads that found a split unavailable: its member dead, retired or being rebuilt,
    /// the split stale, or it failed (an error or its CRC32C). Per slot, whether or not the
    /// read then succeeded by decoding.
    public let degradedReads = ManagedAtomic<Int>(0)
    /// Reads that had to reconstruct data splits (missing, corrupt, or a parity split came
    /// first under late binding).
    public let decodedReads = ManagedAtomic<Int>(0)
    /// Reads that found fewer than k valid splits.
    public let lostReads = ManagedAtomic<Int>(0)
    /// Splits that failed their CRC32C.
    public let corruptSplits = ManagedAtomic<Int>(0)
    /// Writes acknowledged with fewer than k+r splits stored (members dead or suspect).
    public let degradedWrites = ManagedAtomic<Int>(0)
    /// Writes refused: fewer than the acknowledgement floor (k+1, or the write quorum) stored.
    public let failedWrites = ManagedAtomic<Int>(0)
    /// Times a daemon was marked suspect (missed a write deadline while not suspect).
    public let suspectMembers = ManagedAtomic<Int>(0)
    public let repairedSplits = ManagedAtomic<Int>(0)
    public let membersRebuilt = ManagedAtomic<Int>(0)
    public let daemonsLost = ManagedAtomic<Int>(0)
    /// Members retired on live daemons (reclaim notices, revoked slabs) and slabs returned.
    public let slabsRetired = ManagedAtomic<Int>(0)
    public let slabsReturned = ManagedAtomic<Int>(0)
    public let lostPagesSeen = ManagedAtomic<Int>(0)
    /// Canary reads done, and those that failed (an error, or bytes that failed their CRC32C).
    public let canaries = ManagedAtomic<Int>(0)
    public let canaryFailures = ManagedAtomic<Int>(0)
}
