import ArgumentParser
import Foundation
import Logging
import Spillway
import SpillwayCluster
import SpillwayCommandSupport

/// `spillway cluster`: the central view of a cluster registered in etcd.
struct ClusterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster",
        abstract: "Inspect a Spillway cluster registered in etcd (spillwayd --etcd URL --cluster NAME).",
        subcommands: [ClusterStatusCommand.self, ClusterDrainCommand.self])
}

/// `spillway cluster status`: every registered daemon with its failure domain, capacity, free
/// slabs, health state (as the clients judging it recorded it in etcd; none recorded = live)
/// and transports; with a token file, also each daemon's load and the transport this client
/// negotiates with it. A daemon whose lease expired is no longer registered, so not listed.
struct ClusterStatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Membership, failure domains, capacity, free slabs, health state, load and transport of a cluster's daemons.",
        discussion: """
        With --json, prints {"cluster": NAME, "daemons": [{"address", "state" (live|suspect|draining|dead), \
        "failure_domain", "capacity", "free_slabs", "slab_size", "transport", "instance", and with \
        --token-file "reachable" and "load" (the daemon's stats: connections, ops) or "error"}]}.
        """)

    @OptionGroup var registry: ClusterOptions

    @Option(name: .customLong("token-file"), help: "A client token file: also read each daemon's load and the transport negotiated with it.")
    var tokenFile: String?

    @Flag(help: "Print exactly one JSON object on stdout.")
    var json = false

    @Option(name: .customLong("log-level"), help: "Log level on stderr (default error).")
    var logLevel: LogLevelArgument?

    func run() throws {
        bootstrapLogging(logLevel?.level ?? .error)
        let logger = Logger(label: "spillway.cluster")
        guard let target = try registry.target else { throw SpillwayError.invalidArgument("cluster status needs --etcd URL and --cluster NAME") }
        let members = try target.members(logger: logger)
        let credentials = try tokenFile.map { ClientCredentials(tokenFile: try TokenFile.load($0, logger: logger)) }
        var entries: [JSONValue] = []
        var rows: [[String]] = [["daemon", "state", "failure domain", "capacity", "free slabs", "transport", "connections", "reads", "writes"]]
        for (record, state) in members {
            var fields: [(String, JSONValue)] = [
                ("address", .string(record.address)), ("state", .string((state ?? .live).rawValue)),
                ("failure_domain", .string(record.failureDomain)), ("capacity", .int(Int(record.capacity))),
                ("free_slabs", .int(Int(record.freeSlabs))), ("slab_size", .int(Int(record.slabSize))),
                ("transport", .string(record.transports.joined(separator: ","))), ("instance", .string(record.instance)),
            ]
            var load = ["-", "-", "-"]
            var transport = record.transports.joined(separator: ",")
            if let credentials {
                do {
                    let client = try DaemonClient(endpoint: try Endpoint(parsing: record.address), credentials: credentials, maxConnections: 1,
                                                  ioTimeout: 5, logger: logger)
                    let stats = try JSONValue.parse(Array(try client.stats().utf8))
                    transport = client.transport
                    client.close()
                    fields[6] = ("transport", .string(transport))
                    fields.append(("reachable", .bool(true)))
                    fields.append(("load", stats))
                    let ops = stats["ops"]
                    load = ["\(stats["connections"]?.intValue ?? 0)", "\(ops?["reads"]?.intValue ?? 0)", "\(ops?["writes"]?.intValue ?? 0)"]
                } catch {
                    fields.append(("reachable", .bool(false)))
                    fields.append(("error", .string("\(error)")))
                    load = ["unreachable", "-", "-"]
                }
            }
            entries.append(.object(fields))
            rows.append([record.address, (state ?? .live).rawValue, record.failureDomain, ByteCount.format(Int(record.capacity)),
                         "\(record.freeSlabs)", transport] + load)
        }
        if json {
            printLine(JSONValue.object([("cluster", .string(target.cluster)), ("daemons", .array(entries))]).serialized())
        } else {
            printLine(StatusCommand.table(rows))
            if members.isEmpty { printLine("(no daemon registered in cluster '\(target.cluster)')") }
        }
    }
}

/// `spillway cluster drain DAEMON`: maintenance. Marks the daemon `draining` in the registry;
/// the daemon sees it at its next refresh (every 3 s), lends no new slab and asks each tenant
/// to move its slabs elsewhere (reclaim notices, never a revocation: nothing is lost), and
/// leaves the cluster and exits once it lends nothing. The command waits for that (bounded by
/// `--timeout`) and reports how long it took, or fails saying how many slabs are still lent.
struct ClusterDrainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drain",
        abstract: "Empty a daemon for maintenance: its tenants move their pages elsewhere, then it leaves the cluster.",
        discussion: """
        DAEMON is the address (HOST:PORT) or instance id a `cluster status` lists. The daemon \
        must be running a version that follows its registry state. Tenants move their slabs to \
        other daemons (an erasure-coded tier regenerates its splits elsewhere); a tenant with \
        nowhere to move hands its pages to its store's next tier. With --json, prints \
        {"daemon", "instance", "drained" (bool), "seconds", "slabs_lent"}.
        """)

    @Argument(help: "The daemon: HOST:PORT or its instance id.")
    var daemon: String

    @OptionGroup var registry: ClusterOptions

    @Option(help: "Seconds to wait for the daemon to empty and leave (0: mark it and return).")
    var timeout: Double = 300

    @Flag(help: "Print exactly one JSON object on stdout.")
    var json = false

    @Option(name: .customLong("log-level"), help: "Log level on stderr (default error).")
    var logLevel: LogLevelArgument?

    func run() throws {
        bootstrapLogging(logLevel?.level ?? .error)
        let logger = Logger(label: "spillway.cluster")
        guard let target = try registry.target else { throw SpillwayError.invalidArgument("cluster drain needs --etcd URL and --cluster NAME") }
        guard timeout >= 0, timeout <= 86_400 else { throw SpillwayError.invalidArgument("--timeout must be 0…86400 seconds") }
        let members = try target.members(logger: logger)
        guard let (record, _) = members.first(where: { $0.record.address == daemon || $0.record.instance == daemon.lowercased() }) else {
            let listed = members.map { "\($0.record.address) (\($0.record.instance))" }.joined(separator: ", ")
            throw SpillwayError.invalidArgument("no daemon '\(daemon)' registered in cluster '\(target.cluster)'; registered: \(listed.isEmpty ? "none" : listed)")
        }
        try ClusterDirectory.setHealthState(.draining, instance: record.instance, etcd: target.etcd, cluster: target.cluster, logger: logger)
        let started = monotonicNanoseconds()
        func lent(_ record: DaemonRecord) -> Int { max(0, Int(record.capacity / max(1, record.slabSize)) - Int(record.freeSlabs)) }
        var remaining = lent(record)
        if !json { printLine("\(record.address): marked draining; \(remaining) slabs lent") }
        var drained = false
        let deadline = started &+ UInt64(timeout * 1e9)
        while timeout > 0 && monotonicNanoseconds() < deadline {
            usleep(500_000)
            guard let current = try target.members(logger: logger).first(where: { $0.record.instance == record.instance })?.record else {
                drained = true
                break
            }
            if lent(current) != remaining {
                remaining = lent(current)
                if !json { printLine("\(record.address): \(remaining) slabs lent") }
            }
        }
        let seconds = Double(monotonicNanoseconds() &- started) / 1e9
        if drained { remaining = 0 }
        if json {
            printLine(JSONValue.object([("daemon", .string(record.address)), ("instance", .string(record.instance)), ("drained", .bool(drained)),
                                        ("seconds", .double(seconds)), ("slabs_lent", .int(remaining))]).serialized())
        } else if drained {
            printLine("\(record.address): drained and left the cluster after \(String(format: "%.1f", seconds)) s")
        } else if timeout > 0 {
            printLine("\(record.address): still registered after \(Int(timeout)) s with \(remaining) slabs lent")
        }
        if !drained && timeout > 0 {
            throw SpillwayError.invalidArgument("daemon \(record.address) did not empty within \(Int(timeout)) s (\(remaining) slabs still lent: are its tenants running, and do they have room elsewhere?)")
        }
    }
}
