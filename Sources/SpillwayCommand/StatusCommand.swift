import ArgumentParser
import Foundation
import Logging
import Spillway
import SpillwayCommandSupport

/// `spillway status`: asks each daemon for its `stats` and prints them (a table, or JSON).
/// Exits non-zero if any daemon could not be reached, so it also serves as a health check.
struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show each spillwayd's version, capacity, slabs, tenants, ops, errors and transport.",
        discussion: """
        With --json, prints {"daemons": [{"server": "HOST:PORT", "reachable": true, "stats": {...}} | \
        {"server": ..., "reachable": false, "error": "..."}]}; "stats" is the daemon's stats reply \
        (docs/protocol.md). Exit status 1 if any daemon is unreachable or refuses the credentials.
        """)

    @Option(help: "Daemons as HOST:PORT[,HOST:PORT…] (default 127.0.0.1:7450).")
    var servers: String?

    @Option(name: .customLong("token-file"), help: "The client's token file (line 'NAME TOKEN').")
    var tokenFile: String?

    @Option(help: "Tenant name when no token file is given (default status).")
    var tenant: String?

    @OptionGroup var registry: ClusterOptions

    @Flag(help: "Print exactly one JSON object on stdout.")
    var json = false

    @Option(name: .customLong("log-level"), help: "Log level on stderr (default error).")
    var logLevel: LogLevelArgument?

    func run() throws {
        bootstrapLogging(logLevel?.level ?? .error)
        let logger = Logger(label: "spillway.status")
        let credentials = try tokenFile.map { ClientCredentials(tokenFile: try TokenFile.load($0, logger: logger)) }
            ?? ClientCredentials(tenant: tenant ?? "status", token: nil)
        let endpoints = try (registry.servers(or: servers, logger: logger) ?? ["127.0.0.1:7450"]).map {
            try Endpoint(parsing: $0.trimmingCharacters(in: .whitespaces))
        }
        var entries: [String] = []
        var rows: [[String]] = []
        var unreachable = 0
        for endpoint in endpoints {
            do {
                let client = try DaemonClient(endpoint: endpoint, credentials: credentials, maxConnections: 1, ioTimeout: 5, logger: logger)
                let text = try client.stats()
                client.close()
                guard let stats = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else {
                    throw RemoteError.protocolViolation("stats reply is not a JSON object")
                }
                entries.append("{\"server\": \(JSONValue.string(endpoint.description).serialized()), \"reachable\": true, \"stats\": \(text)}")
                rows.append(Self.row(endpoint, stats))
            } catch {
                unreachable += 1
                entries.append("{\"server\": \(JSONValue.string(endpoint.description).serialized()), \"reachable\": false, "
                    + "\"error\": \(JSONValue.string("\(error)").serialized())}")
                rows.append([endpoint.description, "unreachable: \(error)"])
            }
        }
        if json {
            printLine("{\"daemons\": [\(entries.joined(separator: ", "))]}")
        } else {
            let header = ["daemon", "version", "transport", "capacity", "slabs lent/free", "tenants", "reads", "writes", "errors"]
            printLine(Self.table([header] + rows))
        }
        if unreachable > 0 { throw ExitCode(1) }
    }

    static func row(_ endpoint: Endpoint, _ stats: [String: Any]) -> [String] {
        func int(_ value: Any?) -> Int { (value as? NSNumber)?.intValue ?? 0 }
        let ops = stats["ops"] as? [String: Any] ?? [:]
        let errors = stats["errors"] as? [String: Any] ?? [:]
        let tenants = (stats["tenants"] as? [[String: Any]] ?? []).map { "\($0["name"] as? String ?? "?")(\(int($0["slabs"])))" }
        let errorCount = errors.values.reduce(0) { $0 + int($1) }
        return [endpoint.description, stats["version"] as? String ?? "?", stats["transport"] as? String ?? "?",
                ByteCount.format(int(stats["capacity"])), "\(int(stats["slabs_lent"]))/\(int(stats["slabs_free"]))",
                tenants.isEmpty ? "-" : tenants.joined(separator: " "), "\(int(ops["reads"]))", "\(int(ops["writes"]))",
                errorCount == 0 ? "0" : errors.filter { int($0.value) > 0 }.map { "\($0.key)=\(int($0.value))" }.sorted().joined(separator: " ")]
    }

    static func table(_ rows: [[String]]) -> String {
        let columns = rows.map(\.count).max() ?? 0
        var widths = [Int](repeating: 0, count: columns)
        for row in rows where row.count == columns {
            for (index, cell) in row.enumerated() { widths[index] = max(widths[index], cell.count) }
        }
        return rows.map { row in
            row.count == columns
                ? row.enumerated().map { $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }.joined(separator: "  ")
                : row.joined(separator: "  ")
        }.joined(separator: "\n")
    }
}
