// Cluster mode for the commands: `--etcd URL --cluster NAME` in place of `--servers`, and a way
// for the synchronous commands to wait for the asynchronous etcd client.
import ArgumentParser
import Logging
import Spillway
import SpillwayCluster

/// A cluster's registry: etcd endpoints and the cluster's name.
public struct ClusterTarget: Sendable {
    public let etcd: String
    public let cluster: String

    /// Cluster mode if both are given, nil if neither; one without the other is an error
    /// naming the missing one.
    public static func from(etcd: String?, cluster: String?) throws(SpillwayError) -> ClusterTarget? {
        switch (etcd, cluster) {
        case (nil, nil): return nil
        case (.some(let etcd), .some(let cluster)): return ClusterTarget(etcd: etcd, cluster: cluster)
        case (.some, nil): throw .invalidArgument("--etcd needs --cluster NAME")
        case (nil, .some): throw .invalidArgument("--cluster needs --etcd URL")
        }
    }

    /// The registered daemons' records and the states clients recorded for them (nil: none
    /// recorded, which means live), sorted by address.
    public func members(logger: Logger) throws -> [(record: DaemonRecord, state: HealthState?)] {
        try ClusterDirectory.members(etcd: etcd, cluster: cluster, logger: logger)
    }

    /// The daemons to use (registered, not draining or dead) and their failure domains; none
    /// is an error naming the cluster.
    public func daemons(logger: Logger) throws -> (servers: [String], failureDomains: [String]) {
        let usable = try ClusterDirectory.usable(etcd: etcd, cluster: cluster, logger: logger)
        logger.info("daemons found in the cluster registry", metadata: [
            "cluster": "\(cluster)", "daemons": "\(usable.map { "\($0.address)@\($0.failureDomain)" }.joined(separator: ","))"])
        return (usable.map(\.address), usable.map(\.failureDomain))
    }
}

/// `--etcd URL[,URL…] --cluster NAME`: find the daemons in a cluster's registry instead of a
/// `--servers` list.
public struct ClusterOptions: ParsableArguments, Sendable {
    @Option(help: "etcd endpoints (http://HOST:2379[,…]) of a cluster's registry, instead of --servers (with --cluster).")
    public var etcd: String?

    @Option(help: "Cluster name in the registry (with --etcd).")
    public var cluster: String?

    public init() {}

    public var target: ClusterTarget? { get throws { try ClusterTarget.from(etcd: etcd, cluster: cluster) } }

    /// `--servers` or the cluster's usable daemons (not both), or nil when neither was given.
    public func servers(or list: String?, logger: Logger) throws -> [String]? {
        guard let target = try target else { return list.map { $0.split(separator: ",").map(String.init) } }
        guard list == nil else { throw SpillwayError.invalidArgument("give --servers or --etcd/--cluster, not both") }
        return try target.daemons(logger: logger).servers
    }
}
