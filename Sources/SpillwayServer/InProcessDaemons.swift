import Logging
import SpillwayCore
import SpillwayRemote

/// The `InProcessDaemonLauncher` the CLI and tests pass to `TieredStore.open(_:daemons:)`:
/// starts `RemoteMemoryServer`s on loopback ports in this process, and remembers them by tier
/// name so a benchmark can stop or slow one down (`servers(ofTier:)`) to measure degraded reads.
public final class InProcessDaemons: InProcessDaemonLauncher {
    /// Daemons started so far, by tier name. `@unchecked`-free: behind a `Locked`.
    private let started = Locked<[String: [RemoteMemoryServer]]>([:])

    public init() {}

    public func launch(tier: String, count: Int, capacity: Int, slabSize: Int, tokens: TokenFile, logger: Logger)
        throws(SpillwayError) -> InProcessDaemonGroup
    {
        var servers: [RemoteMemoryServer] = []
        do {
            for _ in 0..<max(1, count) {
                let server = try RemoteMemoryServer(
                    DaemonConfiguration(listen: Endpoint(host: "127.0.0.1", port: 0), capacity: capacity, slabSize: slabSize, tokens: tokens),
                    logger: logger)
                try server.start()
                servers.append(server)
            }
        } catch {
            for server in servers { server.shutdown(drain: 0) }
            throw error
        }
        started.withLock { $0[tier, default: []].append(contentsOf: servers) }
        let running = servers
        return InProcessDaemonGroup(endpoints: servers.map { Endpoint(host: "127.0.0.1", port: $0.port) }) {
            for server in running { server.shutdown(drain: 0) }
        }
    }

    /// The daemons started for the tier called `tier`, in endpoint order.
    public func servers(ofTier tier: String) -> [RemoteMemoryServer] {
        started.withLock { $0[tier] ?? [] }
    }
}
