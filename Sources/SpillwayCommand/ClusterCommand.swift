import ArgumentParser
import Logging
import Spillway
import SpillwayCluster
import SpillwayCommandSupport

/// `spillway cluster`: the central view of a cluster registered in etcd.
struct ClusterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster",
        abstract: "Inspect a Spillway cluster registered in etcd (spillwayd --etcd URL --cluster NAME).",
        subcommands: [ClusterStatusCommand.self])
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
