import Logging
import SpillwayCore

/// Starts memory daemons inside this process for a remote or erasure-coded tier configured
/// without `servers`: the `spillway` CLI's demonstration default (local tiers plus daemons on
/// loopback, no cluster).
///
/// Why a protocol here: the daemon engine lives in `SpillwayServer`, which only the CLI,
/// `spillwayd` and tests link. The library (and `libSpillwayC.so`) ships no server, so a
/// serving engine always talks to real daemons; whoever wants in-process ones passes a
/// launcher to `TieredStore.open(_:daemons:)` (`SpillwayServer.InProcessDaemons`).
public protocol InProcessDaemonLauncher: Sendable {
    /// Starts `count` daemons on loopback ports for the tier called `tier`, each lending
    /// `capacity` bytes in `slabSize` slabs to the tenants of `tokens`.
    func launch(tier: String, count: Int, capacity: Int, slabSize: Int, tokens: TokenFile, logger: Logger)
        throws(SpillwayError) -> InProcessDaemonGroup
}

/// Daemons a launcher started: where they listen, and how to stop them (the tier that uses
/// them runs `stop` when it closes).
public struct InProcessDaemonGroup: Sendable {
    public var endpoints: [Endpoint]
    public var stop: @Sendable () -> Void

    public init(endpoints: [Endpoint], stop: @escaping @Sendable () -> Void) {
        self.endpoints = endpoints
        self.stop = stop
    }
}
