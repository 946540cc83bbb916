import Atomics
import SpillwayCore
import SpillwayRemote

#if canImport(Glibc)
import Glibc
#endif

/// How a daemon lends memory.
public struct DaemonConfiguration: Sendable {
    public var listen: Endpoint
    public var capacity: Int
    public var slabSize: Int
    /// The tenants and their tokens. Always present: a daemon never serves unauthenticated
    /// clients. In-process daemons get `TokenFile.random()` (in memory only); `spillwayd`
    /// without `--token-file` generates one (`LocalTokens`).
    public var tokens: TokenFile
    /// Seconds a tenant with no connection keeps its slabs.
    public var lease: Double
    /// Free host memory (MemAvailable) to keep; below it, slabs are reclaimed. 0 = off.
    /// `spillwayd` defaults to `DaemonConfiguration.defaultHeadroom()` (10 % of RAM, at most
    /// 8 GiB); in-process daemons (tests, the CLI's demonstration daemons) to 0.
    public var headroom: Int
    /// Seconds a client gets to give a reclaimed slab back.
    public var reclaimDeadline: Double
    /// Connections in all, authenticated or not (default 4096; the daemon raises its
    /// RLIMIT_NOFILE soft limit to fit, and logs if it cannot).
    public var maxConnections: Int
    /// Event-loop threads serving connections (0 = `min(cores, 8)`). Connections are assigned
    /// round robin; each worker has its own epoll set.
    public var workers: Int = 0
    /// Connections still in the handshake: when this many are waiting, a new connection
    /// evicts the oldest of them, so strangers can never crowd out tenants.
    public var maxUnauthenticated: Int = 64
    /// Seconds a connection gets for the whole handshake (not per receive: a peer sending a
    /// byte now and then is cut off all the same).
    public var handshakeTimeout: Double = 5
    /// Seconds a reply may wait for a peer that stopped reading before the connection is
    /// dropped (the daemon's threads never block on a stuck tenant for longer).
    public var sendTimeout: Double = 10
    /// Where MemAvailable is read (tests point it at a file they control).
    public var memoryInfoPath: String
    /// Seconds between lease, deadline and headroom checks.
    public var checkInterval: Double
    /// Microseconds a worker polls its epoll set (non-blocking waits) after its last event
    /// before sleeping in `epoll_wait` (0 = sleep at once). Saves the thread wake-up that is
    /// most of a queue-depth-1 round trip (on loopback here: p50 68 → 12 µs). One worker per
    /// daemon polls at a time and yields the core between empty polls; an idle daemon sleeps.
    public static let defaultPollMicroseconds = 50
    public var pollMicroseconds: Int = defaultPollMicroseconds
    /// Test faults (`spillwayd --enable-test-faults`): accept `corruptForTest` and delay every
    /// page reply by `testDelayMicroseconds` (a slow daemon). Never on in production.
    public var enableTestFaults = false
    /// Page transports served (`--transport`): `auto` opens a libfabric endpoint when a
    /// provider is usable (the one named by `fabricProvider`, else `verbs` or `efa`) and
    /// serves RMA and TCP clients at once; `rma` fails to start without one; `tcp` never opens one.
    public var transport: TransportMode = .auto
    /// The libfabric provider to serve RMA on (`--fabric-provider`, e.g. `tcp`, `verbs`).
    public var fabricProvider: String?
    public var testDelayMicroseconds = 0

    public init(listen: Endpoint = Endpoint(host: "127.0.0.1", port: 7450), capacity: Int, slabSize: Int = 64 << 20,
                tokens: TokenFile = .random(), lease: Double = 30, headroom: Int = 0, reclaimDeadline: Double = 5,
                maxConnections: Int = 4096, memoryInfoPath: String = "/proc/meminfo", checkInterval: Double = 0.5)
    {
        self.listen = listen
        self.capacity = capacity
        self.slabSize = slabSize
        self.tokens = tokens
        self.lease = lease
        self.headroom = headroom
        self.reclaimDeadline = reclaimDeadline
        self.maxConnections = maxConnections
        self.memoryInfoPath = memoryInfoPath
        self.checkInterval = checkInterval
    }

    public func validate() throws(SpillwayError) {
        guard slabSize >= 1 << 20, slabSize <= 1 << 30, slabSize & (slabSize - 1) == 0 else {
            throw .invalidConfiguration("slab size must be a power of two between 1m and 1g")
        }
        guard capacity >= slabSize else { throw .invalidConfiguration("capacity must hold at least one slab") }
        guard lease >= 0, reclaimDeadline > 0, maxConnections > 0, maxUnauthenticated > 0, handshakeTimeout > 0, sendTimeout > 0 else {
            throw .invalidConfiguration("lease, reclaim deadline, connection limits and timeouts must be positive")
        }
        guard !tokens.names.isEmpty else { throw .invalidConfiguration("a daemon needs at least one tenant token") }
        guard workers >= 0, workers <= 256 else { throw .invalidConfiguration("workers must be 0 (automatic) to 256") }
    }

    /// Worker threads actually used.
    public var workerCount: Int { workers > 0 ? workers : min(8, max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

    /// The headroom `spillwayd` keeps when not told otherwise: 10 % of MemTotal, at most
    /// 8 GiB, so a daemon lending memory reclaims before its host meets the OOM killer.
    /// 0 if MemTotal cannot be read.
    public static func defaultHeadroom(memoryInfoPath: String = "/proc/meminfo") -> Int {
        guard let total = MemoryInfo.read("MemTotal:", from: memoryInfoPath) else { return 0 }
        return min(total / 10, 8 << 30)
    }
}

/// One tenant's operation counters. A connection looks its tenant's up once, after the
/// handshake, so the request path increments atomics and takes no lock.
public final class TenantCounters: Sendable {
    public let reads = ManagedAtomic<Int>(0)
    public let writes = ManagedAtomic<Int>(0)
    public let bytesRead = ManagedAtomic<Int>(0)
    public let bytesWritten = ManagedAtomic<Int>(0)
    public let refused = ManagedAtomic<Int>(0)

    public init() {}
}

/// Counters a daemon keeps (all atomics, read by `stats` and the metrics endpoint).
public final class DaemonCounters: Sendable {
    public let reads = ManagedAtomic<Int>(0)
    public let writes = ManagedAtomic<Int>(0)
    public let bytesRead = ManagedAtomic<Int>(0)
    public let bytesWritten = ManagedAtomic<Int>(0)
    public let authFailures = ManagedAtomic<Int>(0)
    public let refusedAccesses = ManagedAtomic<Int>(0)
    public let malformedFrames = ManagedAtomic<Int>(0)
    public let checksumFailures = ManagedAtomic<Int>(0)
    public let reclaimNotices = ManagedAtomic<Int>(0)
    public let revokedSlabs = ManagedAtomic<Int>(0)
    public let expiredLeases = ManagedAtomic<Int>(0)
    /// Reclaims called off because memory came back above the headroom before their deadline.
    public let cancelledReclaims = ManagedAtomic<Int>(0)
    public let connections = ManagedAtomic<Int>(0)
    /// Handshakes cut off: past the deadline, or evicted by a newer connection.
    public let handshakeTimeouts = ManagedAtomic<Int>(0)
    public let handshakeEvictions = ManagedAtomic<Int>(0)
    /// Connections dropped because the peer stopped reading (a send timed out or a notice
    /// could not be queued).
    public let stuckPeers = ManagedAtomic<Int>(0)
    /// Token file reloads (SIGHUP) and connections closed because their tenant was removed.
    public let tokenReloads = ManagedAtomic<Int>(0)
    public let removedTenantConnections = ManagedAtomic<Int>(0)
}


/// Fields of /proc/meminfo (or a file in its format).
enum MemoryInfo {
    /// The value of `field` (e.g. "MemAvailable:") in bytes.
    static func read(_ field: String, from path: String) -> Int? {
        guard let file = fopen(path, "r") else { return nil }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), file) != nil {
            let text = String(cString: line)
            guard text.hasPrefix(field) else { continue }
            let fields = text.split(whereSeparator: { $0 == " " || $0 == "\n" })
            guard fields.count >= 2, let kilobytes = Int(fields[1]) else { return nil }
            return kilobytes * 1024
        }
        return nil
    }
}
