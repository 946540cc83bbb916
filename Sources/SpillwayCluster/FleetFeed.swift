import Atomics
import Dispatch
import Logging
import SpillwayCore
import SpillwayRemote
import Synchronization

/// Runs `body` on the cluster executor and waits for it (at most `timeout` seconds, then a
/// typed error): the tiers, the commands and `spillwayd` are synchronous, the etcd client is
/// async.
public func runBlocking<T: Sendable>(timeout: Double, _ what: String,
                                     _ body: @escaping @Sendable () async throws -> T) throws -> T
{
    let done = DispatchSemaphore(value: 0)
    let result = Mutex<Result<T, any Error>?>(nil)
    let task = Task(executorPreference: ClusterExecutor.shared) {
        do {
            let value = try await body()
            result.withLock { $0 = .success(value) }
        } catch {
            result.withLock { $0 = .failure(error) }
        }
        done.signal()
    }
    guard done.wait(timeout: .now() + timeout) == .success else {
        task.cancel()
        throw SpillwayError.invalidConfiguration("\(what): no answer within \(Int(timeout)) s")
    }
    return try result.withLock { $0! }.get()
}

/// A cluster's registry read once: the daemons registered in `cluster` at `etcd` and the
/// health states clients recorded for them (nil: none recorded, which means live), sorted by
/// address.
public enum ClusterDirectory {
    public static func members(etcd: String, cluster: String, logger: Logger) throws -> [(record: DaemonRecord, state: HealthState?)] {
        try withMembership(etcd: etcd, cluster: cluster, logger: logger) { membership in
            let daemons = try await membership.snapshot().daemons
            let states = try await membership.healthStates()
            return daemons.sorted { $0.address < $1.address }.map { ($0, states[$0.instance]) }
        }
    }

    /// Records `health` for daemon `instance` (as `spillway cluster drain` does with `draining`).
    public static func setHealthState(_ health: HealthState, instance: String, etcd: String, cluster: String, logger: Logger) throws {
        try withMembership(etcd: etcd, cluster: cluster, logger: logger) { membership in
            try await membership.setHealthState(health, instance: instance)
        }
    }

    /// Runs `body` with a membership view of the registry on a fresh etcd client, closed after.
    private static func withMembership<T: Sendable>(etcd: String, cluster: String, logger: Logger,
                                                    _ body: @escaping @Sendable (ClusterMembership) async throws -> T) throws -> T
    {
        let keys = try ClusterKeys(cluster: cluster)
        let endpoints = EtcdClient.endpoints(etcd)
        return try runBlocking(timeout: 15, "etcd at \(etcd)") {
            let client = try EtcdClient(endpoints: endpoints, logger: logger)
            do {
                let result = try await body(ClusterMembership(client: client, keys: keys, logger: logger))
                await client.shutdown()
                return result
            } catch {
                await client.shutdown()
                throw error
            }
        }
    }

    /// The daemons a tier should use: registered and not draining or dead, with their
    /// failure domains; none is an error naming the cluster.
    public static func usable(etcd: String, cluster: String, logger: Logger) throws -> [DaemonRecord] {
        let usable = try members(etcd: etcd, cluster: cluster, logger: logger)
            .filter { $0.state != .draining && $0.state != .dead }.map(\.record)
        guard !usable.isEmpty else {
            throw SpillwayError.invalidConfiguration("cluster '\(cluster)' at \(etcd): no live daemon registered")
        }
        return usable
    }
}

/// Keeps a tier's `DaemonFleet` in step with its cluster's registry while the tier is open:
/// a daemon that registers joins the fleet (a free slot, connected at once), one whose record
/// goes away (its lease expired, or it withdrew) leaves it (dead, not retried), and one that
/// re-registers with a new instance id (restarted) replaces its old incarnation under a new
/// epoch. The watch runs on the cluster executor and resumes by itself after etcd outages
/// (`ClusterMembership.watch`); it stops with the tier.
public final class FleetFeed: Sendable {
    private let fleet: DaemonFleet
    private let client: EtcdClient
    private let membership: ClusterMembership
    private let logger: Logger
    private let task = Mutex<Task<Void, Never>?>(nil)
    /// Registered daemons: instance → address (leaves name only the instance; verdicts only
    /// the address).
    private let addresses = Mutex<[String: Endpoint]>([:])
    /// Verdicts recorded in the registry, and those that failed to be.
    public let verdictsRecorded = ManagedAtomic<Int>(0)
    /// Registry events applied: joins (and updates), leaves.
    public let joins = ManagedAtomic<Int>(0)
    public let leaves = ManagedAtomic<Int>(0)

    public init(fleet: DaemonFleet, etcd: String, cluster: String, logger: Logger) throws {
        let endpoints = EtcdClient.endpoints(etcd)
        self.fleet = fleet
        client = try EtcdClient(endpoints: endpoints, logger: logger)
        membership = ClusterMembership(client: client, keys: try ClusterKeys(cluster: cluster), logger: logger)
        self.logger = logger
    }

    /// Starts following the registry, and recording there what this client concludes about
    /// the daemons it uses (`suspect`, `dead`; cleared when one rejoins), so that
    /// `spillway cluster status` shows it.
    public func start() {
        let membership = self.membership
        let logger = self.logger
        fleet.setVerdictHandler { [weak self] endpoint, judged, verdict in
            guard let self else { return }
            // Only daemons still registered: a record that went away needs no verdict.
            let instance = String(judged, radix: 16)
            guard self.addresses.withLock({ $0[instance] != nil }) else { return }
            Task(executorPreference: ClusterExecutor.shared) {
                do {
                    // An operator's drain outranks a client's verdict: the daemon is leaving.
                    if try await membership.healthState(instance: instance) == .draining { return }
                    switch verdict {
                    case .live: try await membership.clearHealthState(instance: instance)
                    case .suspect: try await membership.setHealthState(.suspect, instance: instance)
                    case .dead: try await membership.setHealthState(.dead, instance: instance)
                    }
                    self.verdictsRecorded.wrappingIncrement(ordering: .relaxed)
                } catch {
                    logger.warning("could not record a daemon's health state in the registry", metadata: [
                        "daemon": "\(endpoint)", "state": "\(verdict)", "error": "\(error)"])
                }
            }
        }
        let started = Task(executorPreference: ClusterExecutor.shared) { [self] in
            while !Task.isCancelled {
                do {
                    for try await event in membership.watch() {
                        switch event {
                        case .joined(let record), .updated(let record):
                            guard let endpoint = try? Endpoint(parsing: record.address) else {
                                logger.warning("registry record with an unusable address skipped", metadata: ["address": "\(record.address)"])
                                continue
                            }
                            addresses.withLock { $0[record.instance] = endpoint }
                            fleet.join(endpoint, failureDomain: record.failureDomain, instance: UInt64(record.instance, radix: 16))
                            joins.wrappingIncrement(ordering: .relaxed)
                        case .left(let instance):
                            guard let endpoint = addresses.withLock({ $0.removeValue(forKey: instance) }) else { continue }
                            // Another instance at the same address (a restart) keeps it.
                            guard !addresses.withLock({ $0.values.contains(endpoint) }) else { continue }
                            fleet.leave(endpoint, reason: "left the cluster registry (lease expired or withdrawn)")
                            leaves.wrappingIncrement(ordering: .relaxed)
                        }
                    }
                } catch {
                    if Task.isCancelled { return }
                    logger.warning("cluster registry watch ended; restarting it", metadata: ["error": "\(error)"])
                }
                try? await Task.sleep(for: .seconds(1))
            }
        }
        task.withLock { $0 = started }
    }

    /// Stops following (bounded: at most a few seconds for the etcd client to close).
    public func stop() {
        task.withLock { $0?.cancel() }
        let client = self.client
        _ = try? runBlocking(timeout: 5, "closing the etcd client") { await client.shutdown() }
    }
}
