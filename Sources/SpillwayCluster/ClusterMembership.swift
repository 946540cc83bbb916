import Logging
import Synchronization

/// A change in the set of registered daemons, as a client sees it.
public enum MembershipEvent: Sendable, Equatable {
    /// A daemon registered (or was present when the watch started).
    case joined(DaemonRecord)
    /// A registered daemon rewrote its record (free slabs changed, or it re-registered under
    /// a new lease after an etcd outage).
    case updated(DaemonRecord)
    /// A daemon's record is gone: it stopped (lease revoked) or its lease expired.
    case left(instance: String)
}

/// The client side of cluster mode: which daemons are registered now, and a stream of joins,
/// updates and leaves. Built on etcd's own watch (no membership protocol of our own): the
/// stream starts with the current members as `.joined`, then follows etcd's events. When the
/// watch breaks (etcd restarted, connection lost) it reconnects from the last revision seen
/// with bounded backoff, so no event is missed; if etcd compacted that history meanwhile, it
/// re-reads the membership and reports the difference.
public final class ClusterMembership: Sendable {
    public let keys: ClusterKeys
    private let client: EtcdClient
    private let logger: Logger
    /// The longest wait between reconnect attempts.
    public let maxBackoff: Duration
    private let counters = Mutex((reconnects: 0, skippedRecords: 0))

    public init(client: EtcdClient, keys: ClusterKeys, maxBackoff: Duration = .seconds(2),
                logger: Logger = Logger(label: "spillway.cluster.membership"))
    {
        self.client = client
        self.keys = keys
        self.maxBackoff = maxBackoff
        self.logger = logger
    }

    /// Watch reconnections so far (over all `watch()` streams of this object).
    public var reconnects: Int { counters.withLock { $0.reconnects } }
    /// Records that could not be decoded and were ignored (logged).
    public var skippedRecords: Int { counters.withLock { $0.skippedRecords } }

    /// The registered daemons now, keyed by instance, and the etcd revision of that read.
    public func snapshot() async throws(EtcdError) -> (daemons: [DaemonRecord], revision: Int64) {
        let (members, revision) = try await read()
        return (members.keys.sorted().compactMap { members[$0] }, revision)
    }

    private func read() async throws(EtcdError) -> ([String: DaemonRecord], Int64) {
        let result = try await client.range(prefix: keys.daemonsPrefix)
        var members: [String: DaemonRecord] = [:]
        for entry in result.entries {
            if let record = decode(key: entry.key, value: entry.value) { members[record.instance] = record }
        }
        return (members, result.revision)
    }

    /// A record whose key and content agree, or nil (logged, counted) for anything else.
    private func decode(key: String, value: [UInt8]) -> DaemonRecord? {
        guard let instance = keys.instance(fromKey: key, prefix: keys.daemonsPrefix) else {
            skip(key, "key is not /spillway/<cluster>/daemons/<hex instance>")
            return nil
        }
        do {
            let record = try DaemonRecord.decode(value)
            guard record.instance == instance else {
                skip(key, "record names instance \(record.instance)")
                return nil
            }
            return record
        } catch {
            skip(key, "\(error)")
            return nil
        }
    }

    private func skip(_ key: String, _ reason: String) {
        counters.withLock { $0.skippedRecords += 1 }
        logger.warning("ignoring a registry entry", metadata: ["key": "\(key)", "reason": "\(reason)"])
    }

    /// The current members as `.joined`, then every change, until the consumer stops iterating.
    /// The stream throws only if the first read fails (etcd unreachable when the watch starts);
    /// later outages are retried (backoff up to `maxBackoff`) and invisible to the consumer
    /// except as delay.
    public func watch() -> AsyncThrowingStream<MembershipEvent, Error> {
        let (stream, continuation) = AsyncThrowingStream<MembershipEvent, Error>.makeStream(bufferingPolicy: .unbounded)
        let task = Task(executorPreference: ClusterExecutor.shared) { [self] in
            do {
                try await self.follow(continuation)
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }

    private func follow(_ continuation: AsyncThrowingStream<MembershipEvent, Error>.Continuation) async throws(EtcdError) {
        var (members, revision) = try await read()
        for instance in members.keys.sorted() { continuation.yield(.joined(members[instance]!)) }
        var backoff = Duration.milliseconds(100)
        var needsResync = false
        while !Task.isCancelled {
            do {
                if needsResync {
                    let (fresh, freshRevision) = try await read()
                    for event in Self.difference(from: members, to: fresh) { continuation.yield(event) }
                    members = fresh
                    revision = freshRevision
                    needsResync = false
                }
                for try await event in client.watch(prefix: keys.daemonsPrefix, fromRevision: revision + 1) {
                    backoff = .milliseconds(100)
                    revision = max(revision, event.revision)
                    switch event.kind {
                    case .put:
                        guard let record = decode(key: event.key, value: event.value) else { continue }
                        let known = members.updateValue(record, forKey: record.instance) != nil
                        continuation.yield(known ? .updated(record) : .joined(record))
                    case .delete:
                        guard let instance = keys.instance(fromKey: event.key, prefix: keys.daemonsPrefix) else { continue }
                        if members.removeValue(forKey: instance) != nil { continuation.yield(.left(instance: instance)) }
                    }
                }
                if Task.isCancelled { return }
            } catch EtcdError.compacted(let compactRevision) {
                logger.warning("membership watch history compacted: re-reading", metadata: ["compact_revision": "\(compactRevision)"])
                needsResync = true
            } catch {
                if Task.isCancelled { return }
                logger.warning("membership watch lost: reconnecting", metadata: ["error": "\(error)", "revision": "\(revision)", "backoff": "\(backoff)"])
            }
            counters.withLock { $0.reconnects += 1 }
            do {
                try await Task.sleep(for: backoff)
            } catch {
                return
            }
            backoff = min(backoff * 2, maxBackoff)
        }
    }

    /// The events that turn membership `old` into `new` (after a compacted watch history):
    /// joins and changed records in instance order, then leaves.
    static func difference(from old: [String: DaemonRecord], to new: [String: DaemonRecord]) -> [MembershipEvent] {
        var events: [MembershipEvent] = []
        for (instance, record) in new.sorted(by: { $0.key < $1.key }) {
            if let previous = old[instance] {
                if previous != record { events.append(.updated(record)) }
            } else {
                events.append(.joined(record))
            }
        }
        for instance in old.keys.sorted() where new[instance] == nil { events.append(.left(instance: instance)) }
        return events
    }

    // MARK: Health state

    /// Records a client's verdict on a daemon (no lease: the verdict outlives the judge).
    public func setHealthState(_ health: HealthState, instance: String) async throws {
        try await client.put(key: try keys.stateKey(instance: instance), value: Array(health.rawValue.utf8))
    }

    /// The recorded verdict on a daemon; nil if none was written.
    public func healthState(instance: String) async throws -> HealthState? {
        guard let entry = try await client.get(key: try keys.stateKey(instance: instance)) else { return nil }
        guard let health = HealthState(rawValue: String(decoding: entry.value, as: UTF8.self)) else {
            throw EtcdError.badResponse("health state of \(instance) is not live|suspect|draining|dead")
        }
        return health
    }

    /// Every recorded verdict, by instance, in one prefix range (not one GET per daemon: a
    /// tier's open at 1,000 daemons would be 1,000 requests). Unreadable entries are skipped
    /// (logged, counted).
    public func healthStates() async throws -> [String: HealthState] {
        let result = try await client.range(prefix: keys.statePrefix)
        var states: [String: HealthState] = [:]
        for entry in result.entries {
            guard let instance = keys.instance(fromKey: entry.key, prefix: keys.statePrefix),
                  let health = HealthState(rawValue: String(decoding: entry.value, as: UTF8.self))
            else {
                skip(entry.key, "not a health state of a daemon instance")
                continue
            }
            states[instance] = health
        }
        return states
    }

    /// Removes a verdict (e.g. once a dead daemon's record and pages are gone).
    public func clearHealthState(instance: String) async throws {
        try await client.delete(key: try keys.stateKey(instance: instance))
    }
}
