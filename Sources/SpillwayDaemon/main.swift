import ArgumentParser
import Spillway
import SpillwayCommandSupport

#if canImport(Glibc)
import Glibc
#endif

/// `spillwayd`: the remote-memory daemon that lends spare DRAM in slabs.
///
/// This build parses and validates its options; serving (slabs, the wire protocol, tenants,
/// reclaim) is the "remote memory" issue's work.
struct SpillwayDaemon: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "spillwayd",
        abstract: "Lend this machine's spare DRAM to Spillway clients (remote memory tier).",
        version: "0.1.0")

    @Option(help: "HOST:PORT to listen on (default 127.0.0.1:7450).")
    var listen: String?

    @Option(help: "Memory to lend, e.g. 8g.")
    var capacity: SizeArgument?

    @Option(name: .customLong("slab-size"), help: "Unit of lending (default 64m).")
    var slabSize: SizeArgument?

    @Option(name: .customLong("token-file"), help: "Tenant tokens: lines 'NAME TOKEN'.")
    var tokenFile: String?

    @Option(help: "HOST:PORT for Prometheus /metrics (off unless given).")
    var metrics: String?

    @Option(help: "Free host memory to keep for the host itself (default 0 = reclaim off).")
    var headroom: SizeArgument?

    @Option(help: "Seconds a disconnected client keeps its slabs (default 30).")
    var lease: Double?

    @Option(name: .customLong("log-level"), help: "Log level on stderr (default info).")
    var logLevel: String?

    @Option(help: "TOML file with these options as keys.")
    var config: String?

    func validate() throws {
        if let listen, listen.split(separator: ":").count != 2 || UInt16(listen.split(separator: ":").last ?? "") == nil {
            throw ValidationError("--listen '\(listen)' must be HOST:PORT")
        }
    }

    func run() throws {
        throw SpillwayError.invalidConfiguration("serving remote memory is not built yet; this build only validates options")
    }
}

runMain(SpillwayDaemon.self, name: "spillwayd")
