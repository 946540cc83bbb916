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
/// daemon's slabs. Daemons are indices into `clients` (nil: unreachable at open, never used).
public final class DaemonFleet: Sendable {
    public let tier: String
    public let clients: [DaemonClient?]
    /// Bytes per slab the daemons lend (all of them agree, checked at open).
    public let slabSize: Int
    private let state: Locked<State>
    private let deathHandler = Locked<(@Sendable (Int) -> Void)?>(nil)
    private let logger: Logger
    private let lostCounter: Counter
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

        public func isSuspect(_ daemon: Int, at now: UInt64) -> Bool { now < suspectUntil[daemon] }
        /// Alive daemons with a free slab, not in `excluded`.
        public func available(excluding excluded: Set<Int> = []) -> [Int] {
            alive.indices.filter { alive[$0] && freeSlabs[$0] > 0 && !excluded.contains($0) }
        }
    }

    /// A daemon asked for a slab back (it needs the memory): the tier moves the slab's pages
    /// elsewhere and unmaps it before the deadline, or loses them.
    public struct Reclaim: Sendable, Equatable {
        public var daemon: Int
        public var slab: UInt32
    }

    /// Connects to every server (unreachable ones are kept as nil and logged); at least
    /// `minimumLive` must answer. Wrong credentials anywhere are an error.
    public init(tier: String, servers: [Endpoint], credentials: ClientCredentials, minimumLive: Int, connectionsPerDaemon: Int,
                ioTimeout: Double, pollMicroseconds: Int, transport: TransportMode = .tcp, fabricProvider: String? = nil,
                logger: Logger) throws(SpillwayError)
    {
        // `transport` defaults to TCP: the erasure-coded tier's exchange pipelines TCP frames
        // across daemons; the remote tier passes its configured transport.
        let (clients, welcomes, slabSize) = try DaemonClient.connectAll(
            tier: tier, servers: servers, credentials: credentials, minimumLive: minimumLive,
            connectionsPerDaemon: connectionsPerDaemon, ioTimeout: ioTimeout, pollMicroseconds: pollMicroseconds,
            transport: transport, fabricProvider: fabricProvider, logger: logger)
        self.tier = tier
        self.clients = clients
        self.slabSize = slabSize
        self.logger = logger
        state = Locked(State(alive: clients.map { $0 != nil }, freeSlabs: welcomes.map { Int($0?.freeSlabs ?? 0) },
                             suspectUntil: clients.map { _ in 0 }))
        lostCounter = Counter(label: "spillway_fleet_daemons_lost", dimensions: [("tier", tier)])
        refusals = Locked(clients.map { _ in nil })
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

    public var count: Int { clients.count }

    /// Reads (or updates) the fleet's state under its lock.
    public func withState<R>(_ body: (inout State) -> R) -> R { state.withLock(body) }

    public func snapshot() -> State { state.withLock { $0 } }

    public func isAlive(_ daemon: Int) -> Bool { state.withLock { $0.alive[daemon] } }

    public var liveCount: Int { state.withLock { $0.alive.filter { $0 }.count } }

    /// The daemon's address, for logs.
    public func name(_ daemon: Int) -> String { clients[daemon]?.endpoint.description ?? "?" }

    /// Marks `daemon` dead (logged and counted once) and tells the tier. False if it already was.
    @discardableResult
    public func markDead(_ daemon: Int, reason: String) -> Bool {
        let newly = state.withLock { state -> Bool in
            guard state.alive[daemon] else { return false }
            state.alive[daemon] = false
            return true
        }
        guard newly else { return false }
        daemonsLost.wrappingIncrement(ordering: .relaxed)
        lostCounter.increment()
        logger.error("daemon lost", metadata: ["tier": "\(tier)", "daemon": "\(name(daemon))", "reason": "\(reason)"])
        deathHandler.withLock { $0 }?(daemon)
        return true
    }

    /// Marks `daemon` suspect for `seconds` (missed a deadline). True if it was not suspect.
    @discardableResult
    public func markSuspect(_ daemon: Int, for seconds: Double) -> Bool {
        let now = monotonicNanoseconds()
        return state.withLock { state -> Bool in
            defer { state.suspectUntil[daemon] = now &+ UInt64(max(0, seconds) * 1e9) }
            return !state.isSuspect(daemon, at: now)
        }
    }

    public func isSuspect(_ daemon: Int) -> Bool {
        let now = monotonicNanoseconds()
        return state.withLock { $0.isSuspect(daemon, at: now) }
    }

    /// Maps a fresh slab on `daemon`. A daemon out of capacity counts as having no free slab;
    /// any other failure marks it dead. Nil on failure.
    public func mapSlab(on daemon: Int) -> UInt32? {
        guard let client = clients[daemon] else { return nil }
        do throws(RemoteError) {
            let slab = try client.mapSlab()
            state.withLock { $0.freeSlabs[daemon] -= 1 }
            refusals.withLock { $0[daemon] = nil }
            return slab
        } catch {
            if case .refused(let reply) = error, reply.code == .noCapacity {
                state.withLock { $0.freeSlabs[daemon] = 0 }
                noteRefusal(daemon, reply.message)
            } else {
                markDead(daemon, reason: "\(error)")
            }
            return nil
        }
    }

    /// Maps a fresh slab on a live daemon not in `excluded`, chosen by power of two choices on
    /// free slabs (two random candidates, the freer wins); tries others when one refuses.
    public func mapSlabByTwoChoices(excluding excluded: Set<Int> = []) -> (daemon: Int, slab: UInt32)? {
        var refused = excluded
        while true {
            let candidate: Int? = state.withLock { state in
                let live = state.available(excluding: refused)
                guard let a = live.randomElement() else { return nil }
                let b = live.filter { $0 != a }.randomElement() ?? a
                return state.freeSlabs[a] >= state.freeSlabs[b] ? a : b
            }
            guard let daemon = candidate else { return nil }
            if let slab = mapSlab(on: daemon) { return (daemon, slab) }
            refused.insert(daemon)
        }
    }

    /// Gives a slab back to a live daemon (its free count grows). False if the daemon is dead
    /// or the unmap failed (logged: the daemon takes the slab back at its deadline anyway).
    @discardableResult
    public func unmapSlab(_ slab: UInt32, on daemon: Int) -> Bool {
        guard let client = clients[daemon], isAlive(daemon) else { return false }
        do throws(RemoteError) {
            try client.unmapSlab(slab)
            state.withLock { $0.freeSlabs[daemon] += 1 }
            return true
        } catch {
            logger.warning("could not give a slab back; the daemon takes it back at its deadline", metadata: [
                "tier": "\(tier)", "daemon": "\(name(daemon))", "slab": "\(slab)", "error": "\(error)",
            ])
            return false
        }
    }

    /// Pings every live daemon; one that does not answer is dead.
    public func heartbeat() {
        for (daemon, client) in clients.enumerated() {
            guard let client, isAlive(daemon) else { continue }
            if let reason = client.ping() { markDead(daemon, reason: reason) }
        }
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
    /// every connection.
    public func close(unmapping mapped: [(daemon: Int, slab: UInt32)]) {
        for (daemon, slab) in mapped where isAlive(daemon) { try? clients[daemon]?.unmapSlab(slab) }
        for client in clients { client?.close() }
    }
}
