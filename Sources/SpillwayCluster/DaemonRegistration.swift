import Logging
import Synchronization

/// Keeps one daemon listed in etcd for as long as it runs: its `DaemonRecord` under a lease
/// kept alive every TTL/3, rewritten when it changes (free slabs move), removed at once by
/// `stop()` (lease revoked) or within one TTL if the daemon dies (lease expires).
///
/// etcd is not on the daemon's data path: if etcd goes away after `start()`, the daemon keeps
/// serving the tenants it has; this loop logs the outage once, keeps retrying, and when etcd
/// answers again registers under a NEW lease (the record is rewritten onto the new lease before
/// the old one is revoked, so watchers see an update, not a leave). A new lease is taken even
/// when the old one survived, because after an outage the daemon cannot know whether clients
/// have already seen it expire.
public final class DaemonRegistration: Sendable {
    public let keys: ClusterKeys
    public let ttl: Int64
    /// How often the record is re-read from the closure and rewritten if it changed.
    public let refreshInterval: Duration

    private let client: EtcdClient
    private let record: @Sendable () -> DaemonRecord
    /// Called on each refresh with the health state clients recorded for this daemon
    /// (`/spillway/<cluster>/state/<instance>`; nil: none), e.g. `draining` set by
    /// `spillway cluster drain`. Set before `start`.
    public let onHealthState = Mutex<(@Sendable (HealthState?) -> Void)?>(nil)
    private let logger: Logger
    private let state = Mutex(State())

    private struct State {
        var lease: Int64 = 0
        var written: [UInt8] = []
        var key = ""
        var loop: Task<Void, Never>?
        var started = false
        var stopped = false
        var inOutage = false
        var outages = 0
        var reRegistrations = 0
        var keepAlives = 0
        var recordWrites = 0
    }

    /// `record` is called on every refresh; it must be cheap and must keep returning the same
    /// `instance`.
    public init(client: EtcdClient, keys: ClusterKeys, ttl: Int64 = 10, refreshInterval: Duration = .seconds(3),
                logger: Logger = Logger(label: "spillway.cluster.registration"),
                record: @escaping @Sendable () -> DaemonRecord) throws(EtcdError)
    {
        guard ttl >= 2 else { throw .invalidConfiguration("lease TTL \(ttl) s is below the 2 s minimum") }
        self.client = client
        self.keys = keys
        self.ttl = ttl
        self.refreshInterval = refreshInterval
        self.logger = logger
        self.record = record
    }

    /// Outages seen: periods in which etcd did not answer (each logged once).
    public var outages: Int { state.withLock { $0.outages } }
    /// Registrations under a new lease after the first (after an outage or a lost lease).
    public var reRegistrations: Int { state.withLock { $0.reRegistrations } }
    /// Successful lease renewals.
    public var keepAlives: Int { state.withLock { $0.keepAlives } }
    /// Writes of the record (the first registration included).
    public var recordWrites: Int { state.withLock { $0.recordWrites } }
    /// The lease currently held, 0 when none (during an outage after it was lost).
    public var lease: Int64 { state.withLock { $0.lease } }
    /// The key the record lives under.
    public var key: String { state.withLock { $0.key } }

    var keepAliveInterval: Duration { .milliseconds(ttl * 1000 / 3) }

    /// Registers once and starts the keep-alive loop. Throws `.unreachable` (naming the
    /// endpoints) if etcd cannot be reached now, so a misconfigured daemon fails at startup
    /// instead of running unlisted; `ClusterError` if the record's instance is invalid.
    public func start() async throws {
        let alreadyStarted = state.withLock { state in
            defer { state.started = true }
            return state.started || state.stopped
        }
        guard !alreadyStarted else { throw EtcdError.invalidConfiguration("registration already started (or stopped)") }
        let current = record()
        do {
            let key = try keys.daemonKey(instance: current.instance)
            state.withLock { $0.key = key }
            try await register(current, key: key, replacing: 0)
        } catch {
            state.withLock { $0.started = false }  // a later start() may try again
            throw error
        }
        logger.info("registered in etcd", metadata: ["key": "\(self.key)", "lease": "\(lease)", "ttl": "\(ttl)"])
        let task = Task.detached(executorPreference: ClusterExecutor.shared) { [self] in await self.run() }
        // A stop() that ran while we registered found no loop and no lease: undo it here.
        let stoppedMeanwhile = state.withLock { state in
            if !state.stopped { state.loop = task }
            return state.stopped
        }
        if stoppedMeanwhile {
            task.cancel()
            await task.value
            let lease = state.withLock { state in
                defer { state.lease = 0 }
                return state.lease
            }
            if lease != 0 { try? await client.revoke(lease: lease) }
        }
    }

    /// Grants a lease, writes the record under it, and (after an outage) revokes the old one.
    private func register(_ current: DaemonRecord, key: String, replacing old: Int64) async throws(EtcdError) {
        let lease = try await client.grantLease(ttl: ttl)
        let bytes = current.encoded()
        do {
            try await client.put(key: key, value: bytes, lease: lease)
        } catch {
            try? await client.revoke(lease: lease)
            throw error
        }
        state.withLock {
            $0.lease = lease
            $0.written = bytes
            $0.recordWrites += 1
        }
        if old != 0 && old != lease {
            // Best effort: the key now belongs to the new lease, so revoking deletes nothing;
            // if etcd already dropped the old lease this fails harmlessly.
            do {
                try await client.revoke(lease: old)
            } catch {
                logger.debug("revoking the previous lease \(old): \(error)")
            }
        }
    }

    private func run() async {
        var nextKeepAlive = ContinuousClock.now + keepAliveInterval
        var nextRefresh = ContinuousClock.now + refreshInterval
        var retryDelay = Duration.milliseconds(200)
        while !Task.isCancelled {
            let (lease, outage) = state.withLock { ($0.lease, $0.inOutage) }
            // In an outage retry with backoff; with the lease lost (expired) re-register at once.
            let wake = outage ? ContinuousClock.now + retryDelay : lease == 0 ? ContinuousClock.now : min(nextKeepAlive, nextRefresh)
            do {
                try await Task.sleep(until: wake, clock: .continuous)
            } catch {
                return
            }
            if Task.isCancelled { return }
            let key = state.withLock { $0.key }
            do {
                if outage || lease == 0 {
                    // etcd was away (or the lease was lost): take a new lease and rewrite.
                    try await register(record(), key: key, replacing: lease)
                    let newLease = state.withLock { state in
                        state.inOutage = false
                        state.reRegistrations += 1
                        return state.lease
                    }
                    logger.notice(outage ? "etcd answers again: re-registered under a new lease" : "re-registered under a new lease",
                                  metadata: ["key": "\(key)", "lease": "\(newLease)"])
                    retryDelay = .milliseconds(200)
                    nextKeepAlive = ContinuousClock.now + keepAliveInterval
                    nextRefresh = ContinuousClock.now + refreshInterval
                    continue
                }
                if ContinuousClock.now >= nextKeepAlive {
                    _ = try await client.keepAlive(lease: lease)
                    state.withLock { $0.keepAlives += 1 }
                    nextKeepAlive = ContinuousClock.now + keepAliveInterval
                }
                if ContinuousClock.now >= nextRefresh {
                    if let observe = onHealthState.withLock({ $0 }) {
                        let entry = try await client.get(key: try keys.stateKey(instance: record().instance))
                        observe(entry.flatMap { HealthState(rawValue: String(decoding: $0.value, as: UTF8.self)) })
                    }
                    let bytes = record().encoded()
                    if bytes != state.withLock({ $0.written }) {
                        try await client.put(key: key, value: bytes, lease: lease)
                        state.withLock {
                            $0.written = bytes
                            $0.recordWrites += 1
                        }
                    }
                    nextRefresh = ContinuousClock.now + refreshInterval
                }
            } catch EtcdError.leaseExpired {
                if Task.isCancelled { return }
                logger.warning("etcd lease \(lease) expired: re-registering", metadata: ["key": "\(key)"])
                state.withLock { $0.lease = 0 }
            } catch {
                if Task.isCancelled { return }
                let first = state.withLock { state in
                    defer { state.inOutage = true }
                    if !state.inOutage { state.outages += 1 }
                    return !state.inOutage
                }
                if first {
                    logger.warning("etcd unreachable: still serving, will re-register when it answers", metadata: ["key": "\(key)", "error": "\(error)"])
                }
                retryDelay = min(retryDelay * 2, keepAliveInterval)
            }
        }
    }

    /// Stops the loop and revokes the lease so the daemon disappears from the cluster at once.
    /// Final: a stopped registration does not start again. Bounded: the loop's in-flight request is cancelled, and the revoke is one request
    /// (`requestTimeout` per endpoint). If etcd is unreachable the record stays until the
    /// lease expires (at most `ttl` seconds); that error is returned, not thrown, for logging.
    @discardableResult
    public func stop() async -> EtcdError? {
        let (task, alreadyStopped) = state.withLock { state in
            defer {
                state.loop = nil
                state.stopped = true
            }
            return (state.loop, state.stopped)
        }
        task?.cancel()
        await task?.value
        // The loop has ended, so the lease read now is the last one it took.
        let lease = state.withLock { state in
            defer { state.lease = 0 }
            return alreadyStopped ? 0 : state.lease
        }
        guard lease != 0 else { return nil }
        do {
            try await client.revoke(lease: lease)
            logger.info("left the cluster (lease revoked)", metadata: ["key": "\(key)"])
            // The health state clients recorded (no lease) would outlive this incarnation.
            if let stateKey = try? keys.stateKey(instance: record().instance) { try? await client.delete(key: stateKey) }
            return nil
        } catch {
            logger.warning("could not revoke the etcd lease; the record expires within \(ttl) s", metadata: ["error": "\(error)"])
            return error
        }
    }
}
