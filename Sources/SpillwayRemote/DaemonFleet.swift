import Atomics
import Logging
import Metrics
import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// The daemons one remote or erasure-coded tier lends memory from: their connections,
/// liveness, suspicion, free-slab counts, slab mapping (power of two choices), heartbeats and
/// reclaim notices. Both tiers use it, so membership has one implementation and the tiers see
/// Spillway's own types (`DaemonFleet.Reclaim`), not wire messages.
///
/// A tier keeps its own map from its address space to slabs; the fleet tells it when a
/// daemon dies (`setDeathHandler`), after marking it dead, so the tier can write off that
/// daemon's slabs. Daemons are indices into `clients`.
///
/// **Rejoining.** A dead daemon (or one unreachable at open) is retried by `heartbeat()` with
/// backoff (1 s doubling to 30 s). When it answers again — typically restarted, with a new
/// instance id — it rejoins as a fresh, empty member under a new *epoch*: every slab is
/// mapped under the epoch of its daemon at the time (`MappedSlab.epoch`), and a slab of an
/// older epoch is never read, written or unmapped again (`State.isCurrent`), since a
/// restarted daemon numbers its slabs from 1 again and the same id may now be someone
/// else's — or another of this tier's slabs.
public final class DaemonFleet: Sendable {
    public let tier: String
    /// The current client of each daemon (a rejoined daemon gets a new one); a snapshot.
    public var clients: [DaemonClient?] { members.withLock { $0 } }
    private let members: Locked<[DaemonClient?]>
    /// Each slot's daemon address (nil: an empty slot, waiting for a daemon to `join`).
    private let endpoints: Locked<[Endpoint?]>
    private let connect: @Sendable (Endpoint) throws(RemoteError) -> DaemonClient
    /// Daemons that rejoined since open.
    public let daemonsRejoined = ManagedAtomic<Int>(0)
    /// Bytes per slab the daemons lend (all of them agree, checked at open).
    public let slabSize: Int
    private let state: Locked<State>
    private let deathHandler = Locked<(@Sendable (Int) -> Void)?>(nil)
    private let verdictHandler = Locked<(@Sendable (Endpoint, UInt64, Verdict) -> Void)?>(nil)

    /// What this fleet concluded about a daemon (for whoever records it: a cluster's registry).
    public enum Verdict: Sendable, Equatable {
        case live
        /// Missed a deadline: no new work for a while.
        case suspect
        case dead
    }
    private let logger: Logger
    private let lostCounter: Counter
    private let drainedCounter: Counter
    /// `spillway_fleet_daemons{state=live|suspect|draining|dead}`, set each heartbeat.
    private let stateGauges: [Gauge]
    /// Times this tier began draining a daemon (`markDraining`).
    public let daemonsDrained = ManagedAtomic<Int>(0)
    /// Canary latencies per daemon and their verdicts (both tiers' canaries feed it).
    private let canaryJudge: Locked<CanaryJudge>
    /// Daemons marked dead since open.
    public let daemonsLost = ManagedAtomic<Int>(0)
    /// Per daemon, the message of its last capacity refusal of a slab (`noCapacity`: the
    /// daemon is full, or this tenant reached its token-file limit there); nil once a slab
    /// maps again. Each daemon's first refusal is logged as a warning.
    private let refusals: Locked<[String?]>
    private let refusalsLogged: Locked<Set<Int>>

    /// What the fleet knows of each daemon; read together under one lock (`withState`).
    public struct State: Sendable {
        public var alive: [Bool]
        public var freeSlabs: [Int]
        /// Monotonic nanoseconds until which a daemon is suspect; 0 = never was.
        public var suspectUntil: [UInt64]
        /// Monotonic nanoseconds until which this tier drains a daemon (moves its pages off
        /// and maps nothing new there); 0 = never was. Set with a suspicion (`markDraining`).
        public var drainUntil: [UInt64]
        /// Bumped each time the daemon rejoins: slabs of an older epoch are gone.
        public var epoch: [UInt32]
        /// Dead daemons: when to try again, and the backoff after that.
        var retryAt: [UInt64]
        var retryDelay: [Double]
        /// Expected to serve: retried while dead. A daemon that left the cluster's registry
        /// is not (until it joins again).
        var registered: [Bool]
        /// Each slot's failure domain (rack, host, zone); a daemon without one is its own.
        public var failureDomains: [String]

        public func isSuspect(_ daemon: Int, at now: UInt64) -> Bool { now < suspectUntil[daemon] }
        public func isDraining(_ daemon: Int, at now: UInt64) -> Bool { now < drainUntil[daemon] }
        /// Whether a new slab (a new stripe's member, a replacement) may go on `daemon`:
        /// alive, with a free slab, neither suspect nor draining.
        public func accepts(_ daemon: Int, at now: UInt64) -> Bool {
            alive[daemon] && freeSlabs[daemon] > 0 && !isSuspect(daemon, at: now) && !isDraining(daemon, at: now)
        }
        /// Whether a slab mapped on `daemon` under `epoch` can be used: the daemon is alive
        /// and has not rejoined since.
        public func isCurrent(_ daemon: Int, epoch: UInt32) -> Bool { alive[daemon] && self.epoch[daemon] == epoch }
        /// Daemons that accept a new slab now (`accepts`), not in `excluded`.
        public func available(excluding excluded: Set<Int> = [], at now: UInt64 = monotonicNanoseconds()) -> [Int] {
            alive.indices.filter { accepts($0, at: now) && !excluded.contains($0) }
        }
    }

    /// A daemon asked for a slab back (it needs the memory): the tier moves the slab's pages
    /// elsewhere and unmaps it before the deadline, or loses them.
    public struct Reclaim: Sendable, Equatable {
        public var daemon: Int
        public var slab: UInt32
    }

    /// A slab a daemon lent: valid while the daemon is alive in the same epoch.
    public struct MappedSlab: Sendable, Equatable {
        public var daemon: Int
        public var slab: UInt32
        public var epoch: UInt32

        public init(daemon: Int, slab: UInt32, epoch: UInt32) {
            self.daemon = daemon
            self.slab = slab
            self.epoch = epoch
        }
    }

    /// Connects to every server (unreachable ones are kept as nil and logged); at least
    /// `minimumLive` must answer. Wrong credentials anywhere are an error. `slots` (at least
    /// the servers) leaves room for daemons that `join` later (a cluster's registry);
    /// `failureDomains` labels the servers (empty: each its own).
    public init(tier: String, servers: [Endpoint], credentials: ClientCredentials, minimumLive: Int, connectionsPerDaemon: Int,
                ioTimeout: Double, pollMicroseconds: Int, transport: TransportMode = .tcp, fabricProvider: String? = nil,
                slots: Int = 0, failureDomains: [String] = [], logger: Logger) throws(SpillwayError)
    {
        guard failureDomains.isEmpty || failureDomains.count == servers.count else {
            throw .invalidConfiguration("tier '\(tier)': \(failureDomains.count) failure domains for \(servers.count) servers (one per server)")
        }
        // `transport` defaults to TCP: the erasure-coded tier's exchange pipelines TCP frames
        // across daemons; the remote tier passes its configured transport.
        let (clients, welcomes, slabSize) = try DaemonClient.connectAll(
            tier: tier, servers: servers, credentials: credentials, minimumLive: minimumLive,
            connectionsPerDaemon: connectionsPerDaemon, ioTimeout: ioTimeout, pollMicroseconds: pollMicroseconds,
            transport: transport, fabricProvider: fabricProvider, logger: logger)
        self.tier = tier
        let slotCount = max(servers.count, slots)
        let padding = slotCount - servers.count
        members = Locked(clients + Array(repeating: nil, count: padding))
        endpoints = Locked(servers.map { Optional($0) } + Array(repeating: nil, count: padding))
        count = slotCount
        connect = { endpoint throws(RemoteError) in
            try DaemonClient(endpoint: endpoint, credentials: credentials, maxConnections: connectionsPerDaemon, ioTimeout: ioTimeout,
                             pollMicroseconds: pollMicroseconds, transport: transport, fabricProvider: fabricProvider, logger: logger)
        }
        self.slabSize = slabSize
        self.logger = logger
        let now = monotonicNanoseconds()
        let labels = failureDomains.isEmpty ? servers.map(\.description) : failureDomains
        state = Locked(State(alive: clients.map { $0 != nil } + Array(repeating: false, count: padding),
                             freeSlabs: welcomes.map { Int($0?.freeSlabs ?? 0) } + Array(repeating: 0, count: padding),
                             suspectUntil: Array(repeating: 0, count: slotCount), drainUntil: Array(repeating: 0, count: slotCount),
                             epoch: Array(repeating: 0, count: slotCount),
                             retryAt: Array(repeating: now &+ 1_000_000_000, count: slotCount), retryDelay: Array(repeating: 1, count: slotCount),
                             registered: servers.map { _ in true } + Array(repeating: false, count: padding),
                             failureDomains: labels + Array(repeating: "", count: padding)))
        lostCounter = Counter(label: "spillway_fleet_daemons_lost", dimensions: [("tier", tier)])
        drainedCounter = Counter(label: "spillway_fleet_daemons_drained", dimensions: [("tier", tier)])
        stateGauges = ["live", "suspect", "draining", "dead"].map {
            Gauge(label: "spillway_fleet_daemons", dimensions: [("tier", tier), ("state", $0)])
        }
        canaryJudge = Locked(CanaryJudge(daemons: slotCount))
        refusals = Locked(Array(repeating: nil, count: slotCount))
        refusalsLogged = Locked([])
    }

    /// Why `daemon` last refused to map a slab (its own words), if it did since its last
    /// successful mapping.
    public func capacityRefusal(_ daemon: Int) -> String? { refusals.withLock { $0[daemon] } }

    /// Every daemon's standing capacity refusal, as "ADDRESS: MESSAGE" (empty if none).
    public var capacityRefusals: [String] {
        let current = refusals.withLock { $0 }
        return current.indices.compactMap { daemon in current[daemon].map { "\(name(daemon)): \($0)" } }
    }

    /// Records a daemon's refusal and logs it the first time that daemon refuses.
    private func noteRefusal(_ daemon: Int, _ message: String) {
        refusals.withLock { $0[daemon] = message }
        let first = refusalsLogged.withLock { $0.insert(daemon).inserted }
        guard first else { return }
        let tenant = clients[daemon]?.credentials.tenant ?? "?"
        logger.warning("daemon refused a slab (no capacity for this tenant)", metadata: [
            "tier": "\(tier)", "daemon": "\(name(daemon))", "tenant": "\(tenant)", "reason": "\(message)",
        ])
    }

    /// Called once per daemon, right after it is marked dead (on the thread that noticed).
    public func setDeathHandler(_ handler: @escaping @Sendable (Int) -> Void) {
        deathHandler.withLock { $0 = handler }
    }

    /// Called when a daemon is newly judged dead or suspect, or rejoins (live), with its
    /// address and the instance judged (the incarnation this fleet talks to); on the thread
    /// that judged, so it must not block.
    public func setVerdictHandler(_ handler: @escaping @Sendable (Endpoint, UInt64, Verdict) -> Void) {
        verdictHandler.withLock { $0 = handler }
    }

    private func tell(_ daemon: Int, _ verdict: Verdict, client: DaemonClient? = nil) {
        guard let handler = verdictHandler.withLock({ $0 }), let endpoint = endpoints.withLock({ $0[daemon] }),
              let judged = client ?? members.withLock({ $0[daemon] })
        else { return }
        handler(endpoint, judged.welcome.daemonInstance, verdict)
    }

    /// Daemon slots (daemons configured, plus room for ones that may join).
    public let count: Int

    /// Reads (or updates) the fleet's state under its lock.
    public func withState<R>(_ body: (inout State) -> R) -> R { state.withLock(body) }

    public func snapshot() -> State { state.withLock { $0 } }

    public func isAlive(_ daemon: Int) -> Bool { state.withLock { $0.alive[daemon] } }

    public var liveCount: Int { state.withLock { $0.alive.filter { $0 }.count } }

    /// The daemon's address, for logs.
    public func name(_ daemon: Int) -> String { endpoints.withLock { $0[daemon]?.description ?? "-" } }

    /// Marks `daemon` dead (logged and counted once) and tells the tier. False if it already was.
    @discardableResult
    public func markDead(_ daemon: Int, reason: String) -> Bool {
        let now = monotonicNanoseconds()
        let newly = state.withLock { state -> Bool in
            guard state.alive[daemon] else { return false }
            state.alive[daemon] = false
            state.retryAt[daemon] = now &+ 1_000_000_000
            state.retryDelay[daemon] = 1
            return true
        }
        guard newly else { return false }
        daemonsLost.wrappingIncrement(ordering: .relaxed)
        lostCounter.increment()
        logger.error("daemon lost", metadata: ["tier": "\(tier)", "daemon": "\(name(daemon))", "reason": "\(reason)"])
        deathHandler.withLock { $0 }?(daemon)
        tell(daemon, .dead)
        return true
    }

    /// Marks `daemon` suspect for `seconds` (missed a deadline). True if it was not suspect.
    @discardableResult
    public func markSuspect(_ daemon: Int, for seconds: Double) -> Bool {
        let now = monotonicNanoseconds()
        let newly = state.withLock { state -> Bool in
            defer { state.suspectUntil[daemon] = now &+ UInt64(max(0, seconds) * 1e9) }
            return !state.isSuspect(daemon, at: now)
        }
        if newly { tell(daemon, .suspect) }
        return newly
    }

    public func isSuspect(_ daemon: Int) -> Bool {
        let now = monotonicNanoseconds()
        return state.withLock { $0.isSuspect(daemon, at: now) }
    }

    /// Suspect, and drained: for `seconds` nothing new goes on `daemon`, and the tier moves
    /// the pages it has there elsewhere (`drainingDaemons`, on its heartbeat) before anything
    /// declares it dead. For a daemon that fails canaries or is a latency outlier; logged and
    /// counted, recorded as `suspect`. True if it was not draining.
    @discardableResult
    public func markDraining(_ daemon: Int, for seconds: Double, reason: String) -> Bool {
        let now = monotonicNanoseconds()
        let until = now &+ UInt64(max(0, seconds) * 1e9)
        let (newlyDraining, newlySuspect) = state.withLock { state -> (Bool, Bool) in
            let wasDraining = state.isDraining(daemon, at: now)
            let wasSuspect = state.isSuspect(daemon, at: now)
            state.drainUntil[daemon] = max(state.drainUntil[daemon], until)
            state.suspectUntil[daemon] = max(state.suspectUntil[daemon], until)
            return (!wasDraining, !wasSuspect)
        }
        if newlySuspect { tell(daemon, .suspect) }
        guard newlyDraining else { return false }
        daemonsDrained.wrappingIncrement(ordering: .relaxed)
        drainedCounter.increment()
        logger.warning("daemon suspect: draining it (its pages move elsewhere, nothing new goes there)", metadata: [
            "tier": "\(tier)", "daemon": "\(name(daemon))", "reason": "\(reason)", "for_s": "\(seconds)"])
        return true
    }

    /// Records a canary's latency on `daemon` for this round (`CanaryJudge`).
    public func recordCanary(_ daemon: Int, nanoseconds: UInt64) { canaryJudge.withLock { $0.record(daemon, nanoseconds: nanoseconds) } }

    /// A daemon that died or rejoined: its canary history is someone else's.
    public func forgetCanaries(_ daemon: Int) { canaryJudge.withLock { $0.forget(daemon) } }

    /// Ends a canary round: the latency outliers (`CanaryJudge`: p99 over its window above 4×
    /// the fleet's median and 1 ms, two rounds running) are logged and drained for `seconds`.
    /// Returns them.
    public func endCanaryRound(drainFor seconds: Double) -> [Int] {
        canaryJudge.withLock { $0.endRound() }.map { outlier in
            logger.warning("canary: daemon is much slower than its peers; suspect", metadata: [
                "tier": "\(tier)", "daemon": "\(name(outlier.daemon))",
                "p99_us": "\(outlier.p99 / 1000)", "median_us": "\(outlier.median / 1000)", "rounds": "\(outlier.strikes)"])
            markDraining(outlier.daemon, for: seconds,
                         reason: "canary p99 \(outlier.p99 / 1000) µs, over 4× the fleet's median \(outlier.median / 1000) µs")
            return outlier.daemon
        }
    }

    /// Live daemons this tier is draining now.
    public func drainingDaemons() -> [Int] {
        let now = monotonicNanoseconds()
        return state.withLock { state in state.alive.indices.filter { state.alive[$0] && state.isDraining($0, at: now) } }
    }

    /// Daemons per health state over the slots in use: live (neither suspect nor draining),
    /// suspect, draining (alive), dead (expected but not answering).
    public func stateCounts() -> (live: Int, suspect: Int, draining: Int, dead: Int) {
        let now = monotonicNanoseconds()
        return state.withLock { state in
            var counts = (live: 0, suspect: 0, draining: 0, dead: 0)
            for daemon in state.alive.indices {
                if !state.alive[daemon] {
                    if state.registered[daemon] { counts.dead += 1 }
                } else if state.isDraining(daemon, at: now) {
                    counts.draining += 1
                } else if state.isSuspect(daemon, at: now) {
                    counts.suspect += 1
                } else {
                    counts.live += 1
                }
            }
            return counts
        }
    }

    private func publishStates() {
        let counts = stateCounts()
        for (gauge, value) in zip(stateGauges, [counts.live, counts.suspect, counts.draining, counts.dead]) { gauge.record(value) }
    }

    /// Maps a fresh slab on `daemon`. A daemon out of capacity counts as having no free slab;
    /// any other failure marks it dead. Nil on failure.
    public func mapSlab(on daemon: Int) -> MappedSlab? {
        // The client and epoch together: a slab mapped through a client replaced meanwhile
        // carries the old epoch, so it is never used.
        let (client, epoch) = state.withLock { state in (members.withLock { $0[daemon] }, state.epoch[daemon]) }
        guard let client else { return nil }
        do throws(RemoteError) {
            let slab = try client.mapSlab()
            state.withLock { if $0.epoch[daemon] == epoch { $0.freeSlabs[daemon] -= 1 } }
            refusals.withLock { $0[daemon] = nil }
            return MappedSlab(daemon: daemon, slab: slab, epoch: epoch)
        } catch {
            if case .refused(let reply) = error, reply.code == .noCapacity {
                state.withLock { $0.freeSlabs[daemon] = 0 }
                noteRefusal(daemon, reply.message)
            } else if isCurrent(daemon, epoch: epoch) {
                markDead(daemon, reason: "\(error)")
            }
            return nil
        }
    }

    public func isCurrent(_ daemon: Int, epoch: UInt32) -> Bool { state.withLock { $0.isCurrent(daemon, epoch: epoch) } }

    /// Maps a fresh slab on a live daemon not in `excluded`, chosen by power of two choices on
    /// free slabs (two random candidates, the freer wins); tries others when one refuses.
    public func mapSlabByTwoChoices(excluding excluded: Set<Int> = []) -> MappedSlab? {
        var refused = excluded
        while true {
            let now = monotonicNanoseconds()
            let candidate: Int? = state.withLock { state in
                let live = state.available(excluding: refused, at: now)
                guard let a = live.randomElement() else { return nil }
                let b = live.filter { $0 != a }.randomElement() ?? a
                return state.freeSlabs[a] >= state.freeSlabs[b] ? a : b
            }
            guard let daemon = candidate else { return nil }
            if let mapped = mapSlab(on: daemon) { return mapped }
            refused.insert(daemon)
        }
    }

    /// Gives a slab back to its daemon (its free count grows), if the daemon is alive in the
    /// slab's epoch: a rejoined daemon's same slab id may be another slab now. False if not,
    /// or if the unmap failed (logged: the daemon takes the slab back at its deadline anyway).
    @discardableResult
    public func unmapSlab(_ mapped: MappedSlab) -> Bool {
        let client: DaemonClient? = state.withLock { state in
            state.isCurrent(mapped.daemon, epoch: mapped.epoch) ? members.withLock { $0[mapped.daemon] } : nil
        }
        guard let client else { return false }
        do throws(RemoteError) {
            try client.unmapSlab(mapped.slab)
            state.withLock { if $0.epoch[mapped.daemon] == mapped.epoch { $0.freeSlabs[mapped.daemon] += 1 } }
            return true
        } catch {
            logger.warning("could not give a slab back; the daemon takes it back at its deadline", metadata: [
                "tier": "\(tier)", "daemon": "\(name(mapped.daemon))", "slab": "\(mapped.slab)", "error": "\(error)",
            ])
            return false
        }
    }

    /// Pings every live daemon (one that does not answer is dead) and retries the dead ones
    /// whose backoff has passed (`rejoin`).
    public func heartbeat() {
        for (daemon, client) in clients.enumerated() {
            guard let client, isAlive(daemon) else { continue }
            if let reason = client.ping() { markDead(daemon, reason: reason) }
        }
        rejoin()
        publishStates()
    }

    /// Tries to reconnect the dead daemons whose retry time has come; one that answers (and
    /// lends slabs of the fleet's size) rejoins as a fresh member under a new epoch.
    public func rejoin(now: UInt64 = monotonicNanoseconds()) {
        let due = state.withLock { state in
            state.alive.indices.filter { !state.alive[$0] && state.registered[$0] && state.retryAt[$0] <= now }
        }
        for daemon in due {
            guard let endpoint = endpoints.withLock({ $0[daemon] }) else { continue }
            do throws(RemoteError) {
                let client = try connect(endpoint)
                guard Int(client.welcome.slabSize) == slabSize else {
                    client.close()
                    throw .protocolViolation("it lends slabs of \(client.welcome.slabSize) bytes, the fleet's are \(slabSize)")
                }
                // Client and epoch change together (under the state lock, as `mapSlab` reads them).
                let (epoch, old) = state.withLock { state -> (UInt32, DaemonClient?) in
                    let old = members.withLock { members -> DaemonClient? in
                        defer { members[daemon] = client }
                        return members[daemon]
                    }
                    state.epoch[daemon] &+= 1
                    state.alive[daemon] = true
                    state.freeSlabs[daemon] = Int(client.welcome.freeSlabs)
                    state.suspectUntil[daemon] = 0
                    state.drainUntil[daemon] = 0
                    state.retryDelay[daemon] = 1
                    return (state.epoch[daemon], old)
                }
                old?.close()
                refusals.withLock { $0[daemon] = nil }
                daemonsRejoined.wrappingIncrement(ordering: .relaxed)
                tell(daemon, .live)
                Counter(label: "spillway_fleet_daemons_rejoined", dimensions: [("tier", tier)]).increment()
                logger.notice("daemon rejoined as a fresh member; slabs it lent before are never used", metadata: [
                    "tier": "\(tier)", "daemon": "\(endpoint)", "instance": "\(String(client.welcome.daemonInstance, radix: 16))",
                    "epoch": "\(epoch)", "free_slabs": "\(client.welcome.freeSlabs)",
                ])
            } catch {
                let delay = state.withLock { state -> Double in
                    let delay = state.retryDelay[daemon]
                    state.retryAt[daemon] = now &+ UInt64(delay * 1e9)
                    state.retryDelay[daemon] = min(30, delay * 2)
                    return delay
                }
                logger.debug("dead daemon still unreachable", metadata: ["tier": "\(tier)", "daemon": "\(endpoint)",
                                                                       "error": "\(error)", "next_try_s": "\(delay)"])
            }
        }
    }

    /// A daemon joined (or is still in) the cluster's registry: it takes its slot, or the
    /// first empty one, and is connected now. One at the same address with another instance
    /// than the one this fleet talks to has restarted: the old one is dead, the new one
    /// rejoins under a new epoch. Nil if every slot is taken (logged).
    @discardableResult
    public func join(_ endpoint: Endpoint, failureDomain: String? = nil, instance: UInt64? = nil) -> Int? {
        let slot = endpoints.withLock { slots -> Int? in
            if let index = slots.firstIndex(of: endpoint) { return index }
            guard let free = slots.firstIndex(where: { $0 == nil }) else { return nil }
            slots[free] = endpoint
            return free
        }
        guard let daemon = slot else {
            logger.warning("a daemon joined but every slot of the tier is taken; it is not used", metadata: [
                "tier": "\(tier)", "daemon": "\(endpoint)", "slots": "\(count)"])
            return nil
        }
        state.withLock { state in
            if !state.registered[daemon] || !state.alive[daemon] { state.retryAt[daemon] = 0 }
            state.registered[daemon] = true
            state.failureDomains[daemon] = failureDomain ?? endpoint.description
        }
        if let instance, isAlive(daemon), let client = members.withLock({ $0[daemon] }), client.welcome.daemonInstance != instance {
            markDead(daemon, reason: "restarted: the registry lists instance \(String(instance, radix: 16))")
            state.withLock { $0.retryAt[daemon] = 0 }
        }
        if !isAlive(daemon) { rejoin() }
        return daemon
    }

    /// A daemon left the cluster's registry (its lease expired, or it withdrew): it is dead,
    /// and not retried until it joins again.
    public func leave(_ endpoint: Endpoint, reason: String) {
        guard let daemon = endpoints.withLock({ $0.firstIndex(of: endpoint) }) else { return }
        state.withLock { $0.registered[daemon] = false }
        markDead(daemon, reason: reason)
    }

    /// Daemons whose connection failed or that said goodbye since the last check: marked dead.
    public func noticeFailures() {
        for (daemon, client) in clients.enumerated() where client?.failed.load(ordering: .relaxed) == true {
            markDead(daemon, reason: "daemon said goodbye or its connection failed")
        }
    }

    /// The reclaim notices the live daemons sent since the last call (reads idle connections first).
    public func takeReclaims() -> [Reclaim] {
        var reclaims: [Reclaim] = []
        for (daemon, client) in clients.enumerated() {
            guard let client, isAlive(daemon) else { continue }
            client.pollNotices()
            for notice in client.takeReclaims() { reclaims.append(Reclaim(daemon: daemon, slab: notice.slab)) }
        }
        return reclaims
    }

    /// Gives `mapped` slabs back (so the daemons need not hold them for the lease) and closes
    /// every connection, in bounded time: each daemon's unmaps run on their own thread, and
    /// whatever a hung daemon has not answered after `within` seconds is left to its lease.
    public func close(unmapping mapped: [MappedSlab], within seconds: Double = 1) {
        var byDaemon: [Int: [MappedSlab]] = [:]
        for slab in mapped where isCurrent(slab.daemon, epoch: slab.epoch) { byDaemon[slab.daemon, default: []].append(slab) }
        let finished = Locked(0)
        let workers = byDaemon.values.map { slabs in
            BackgroundThread { [self] in
                for slab in slabs { unmapSlab(slab) }
                finished.withLock { $0 += 1 }
            }
        }
        let deadline = monotonicNanoseconds() &+ UInt64(seconds * 1e9)
        while finished.withLock({ $0 }) < workers.count && monotonicNanoseconds() < deadline { usleep(1000) }
        let late = workers.count - finished.withLock { $0 }
        for worker in workers { worker.detach() }
        if late > 0 {
            logger.warning("daemons did not take their slabs back in time; their leases will", metadata: [
                "tier": "\(tier)", "daemons": "\(late)", "waited_s": "\(seconds)"])
        }
        for client in clients { client?.close() }
    }
}
