import Atomics
import Logging
import SpillwayCore
import SpillwayProtocol
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
    public var headroom: Int
    /// Seconds a client gets to give a reclaimed slab back.
    public var reclaimDeadline: Double
    /// Connections in all, authenticated or not.
    public var maxConnections: Int
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
    /// Microseconds each connection's thread polls for the next request before sleeping
    /// (0 = sleep at once). Saves a thread wake-up per request at low queue depth, at the
    /// cost of a busy core per active connection for that long.
    public var pollMicroseconds: Int = 0
    /// Test faults (`spillwayd --enable-test-faults`): accept `corruptForTest` and delay every
    /// page reply by `testDelayMicroseconds` (a slow daemon). Never on in production.
    public var enableTestFaults = false
    public var testDelayMicroseconds = 0

    public init(listen: Endpoint = Endpoint(host: "127.0.0.1", port: 7450), capacity: Int, slabSize: Int = 64 << 20,
                tokens: TokenFile = .random(), lease: Double = 30, headroom: Int = 0, reclaimDeadline: Double = 5,
                maxConnections: Int = 256, memoryInfoPath: String = "/proc/meminfo", checkInterval: Double = 0.5)
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

/// `spillwayd`'s engine: lends DRAM in slabs to authenticated tenants over TCP.
///
/// - One thread per connection (bounded by `maxConnections`) reads a request, checks it, and
///   answers; page data is received straight into the slab and sent straight from it.
/// - Every client authenticates (HMAC challenge–response; with the mutual capability the daemon
///   proves the token too). A handshake has a total deadline, and unauthenticated connections
///   have their own small quota whose oldest member a newcomer evicts. Sends are bounded by
///   `sendTimeout`; notices never wait.
/// - A slab belongs to one tenant. Every access is checked against the owner and the slab's
///   bounds under the slab table's lock; the slab's user count keeps it mapped while a copy
///   runs, so an unmap or revoke never pulls memory from under a transfer.
/// - Slabs are fresh anonymous mappings (zero-filled by the kernel) mapped when lent and
///   unmapped when returned, so no tenant can read another's old bytes, and memory is only
///   used while lent.
/// - A tenant without connections keeps its slabs for `lease` seconds.
/// - Below `headroom` of MemAvailable the daemon sends reclaim notices and revokes the slabs
///   of clients that miss the deadline.
///
/// `@unchecked Sendable`: mutable state lives in `state` (its lock) and atomics.
public final class RemoteMemoryServer: @unchecked Sendable {
    public let configuration: DaemonConfiguration
    public let counters = DaemonCounters()
    /// Test faults only: delay before each page request is served (a slow daemon); starts at
    /// `configuration.testDelayMicroseconds` (which `spillwayd` accepts only with
    /// `--enable-test-faults`); in-process tests and benchmarks may change it while running.
    public let testDelayMicroseconds = ManagedAtomic<Int>(0)
    public let instance = UInt64.random(in: 1 ... .max)
    private let logger: Logger
    private var listener: TCPSocket?
    private let stopping = ManagedAtomic<Bool>(false)
    private let state: Locked<ServerState>
    private var acceptThread: BackgroundThread?
    private var janitorThread: BackgroundThread?

    struct Slab {
        var base: UnsafeMutableRawPointer
        var owner: String
        var users = 0
        /// Unmapped or revoked: freed when the last user leaves; refused to new accesses.
        var retired = false
        var revoked = false
        var reclaimDeadline: Double?
        var mappedAt: Double
    }

    struct Tenant {
        var slabs: Set<UInt32> = []
        /// Slabs revoked while their tenant is connected keep a pending notice.
        var connections: [ObjectIdentifier: FrameConnection] = [:]
        var disconnectedAt: Double?
        let counters = TenantCounters()
    }

    /// A connection still in its handshake.
    struct Pending {
        let connection: FrameConnection
        let acceptedAt: Double
    }

    struct ServerState {
        var slabs: [UInt32: Slab] = [:]
        var nextSlab: UInt32 = 1
        /// Slabs lent to tenants (what `stats` reports as lent).
        var lentSlabs = 0
        /// Slabs whose memory is mapped: lent ones plus retired ones a transfer still pins.
        /// Capacity is checked against this, so a stuck transfer can never make the daemon
        /// map more than `capacity`.
        var mappedSlabs = 0
        var pending: [ObjectIdentifier: Pending] = [:]
        var tokens: TokenFile
        var tenants: [String: Tenant] = [:]
        var connections: [ObjectIdentifier: FrameConnection] = [:]
        var revokedFor: [String: Set<UInt32>] = [:]
    }

    public init(_ configuration: DaemonConfiguration, logger: Logger = Logger(label: "spillwayd")) throws(SpillwayError) {
        try configuration.validate()
        self.configuration = configuration
        self.logger = logger
        state = Locked(ServerState(tokens: configuration.tokens))
        testDelayMicroseconds.store(configuration.testDelayMicroseconds, ordering: .relaxed)
    }

    deinit {
        state.withLock { state in
            for slab in state.slabs.values { munmap(slab.base, configuration.slabSize) }
            state.mappedSlabs = 0
            state.slabs.removeAll()
        }
    }

    public var totalSlabs: Int { configuration.capacity / configuration.slabSize }

    /// Credentials of the token file's first tenant: what an in-process client of this daemon
    /// (the CLI's embedded daemons, tests) connects with.
    public var clientCredentials: ClientCredentials { ClientCredentials(tokenFile: state.withLock { $0.tokens }) }

    /// Replaces the tenants (SIGHUP): new tenants are admitted from now on; connections of
    /// tenants no longer in the file are closed at once (their slabs follow the lease rules).
    /// Returns how many connections were closed.
    @discardableResult
    public func reloadTokens(_ tokens: TokenFile, counted: Bool = true) -> Int {
        let closing = state.withLock { state -> [FrameConnection] in
            state.tokens = tokens
            var closing: [FrameConnection] = []
            for (name, tenant) in state.tenants where tokens.tokens[name] == nil {
                closing += tenant.connections.values
            }
            return closing
        }
        for connection in closing { connection.socket.shutdown() }
        guard counted else { return closing.count }
        counters.tokenReloads.wrappingIncrement(ordering: .relaxed)
        counters.removedTenantConnections.wrappingIncrement(by: closing.count, ordering: .relaxed)
        logger.notice("token file reloaded", metadata: ["tenants": "\(tokens.names.count)", "closed_connections": "\(closing.count)"])
        return closing.count
    }

    /// The port actually bound (after `start` on port 0).
    public private(set) var port: UInt16 = 0

    /// Binds and starts serving on background threads.
    public func start() throws(SpillwayError) {
        let socket: TCPSocket
        do {
            socket = try TCPSocket.listen(on: configuration.listen)
        } catch {
            throw .invalidConfiguration("cannot listen on \(configuration.listen): \(error)")
        }
        listener = socket
        port = socket.localPort
        let transport = TransportSelection.choose(for: "spillwayd", logger: logger)
        logger.info("spillwayd serving", metadata: [
            "listen": "\(configuration.listen.host):\(port)", "capacity": "\(ByteCount.format(configuration.capacity))",
            "slab": "\(ByteCount.format(configuration.slabSize))", "transport": "\(transport)",
        ])
        acceptThread = BackgroundThread { [self] in acceptLoop(socket) }
        janitorThread = BackgroundThread { [self] in janitorLoop() }
    }

    /// Stops accepting, tells every client (`goodbye`), lets in-flight requests finish for up
    /// to `drain` seconds, then closes every connection.
    public func shutdown(drain: Double = 5) {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        acceptThread?.join()
        janitorThread?.join()
        listener?.close()
        let connections = state.withLock { Array($0.connections.values) }
        var goodbye = WireWriter()
        goodbye.write(string: "daemon shutting down")
        for connection in connections {
            // Never waits: a tenant that stopped reading just misses its goodbye (and is cut
            // off below with everyone else once the drain time is over).
            if connection.trySendNotice(.goodbye, meta: goodbye.bytes) == .broken { connection.socket.shutdown() }
        }
        let deadline = Self.now() + drain
        while Self.now() < deadline && state.withLock({ !$0.connections.isEmpty }) {
            // Handlers stop after the request they are in; a peer idle in receive is woken by
            // the shutdown below once the drain time is over.
            usleep(10_000)
            for connection in state.withLock({ Array($0.connections.values) }) {
                _ = Glibc.shutdown(connection.socket.descriptor, Int32(SHUT_RD))
            }
        }
        for connection in state.withLock({ Array($0.connections.values) }) { connection.socket.shutdown() }
        logger.info("spillwayd stopped")
    }

    /// Monotonic seconds (leases and deadlines).
    static func now() -> Double { Double(monotonicNanoseconds()) / 1e9 }

    // MARK: Accepting

    private func acceptLoop(_ listener: TCPSocket) {
        while !stopping.load(ordering: .relaxed) {
            let accepted: (TCPSocket, Endpoint)?
            do {
                accepted = try listener.accept(timeout: 0.1)
            } catch {
                logger.error("accept failed", metadata: ["error": "\(error)"])
                usleep(10_000)
                continue
            }
            guard let (socket, peer) = accepted else { continue }
            let connection = FrameConnection(socket: socket)
            connection.pollNanoseconds = UInt64(configuration.pollMicroseconds * 1000)
            // Bounded from the first byte: the whole handshake must fit in the deadline (the
            // janitor enforces it in total; this bounds each receive and send).
            socket.setTimeout(configuration.handshakeTimeout)
            let (admitted, evicted) = admit(connection)
            if let evicted {
                counters.handshakeEvictions.wrappingIncrement(ordering: .relaxed)
                evicted.socket.shutdown()
            }
            guard admitted else {
                logger.warning("connection limit reached; refusing", metadata: ["peer": "\(peer)"])
                _ = connection.trySendNotice(.error, meta: Wire.ErrorReply(.noCapacity, "connection limit reached").encode())
                continue
            }
            counters.connections.wrappingIncrement(ordering: .relaxed)
            BackgroundThread { [self] in serve(connection, peer: peer) }.detach()
        }
    }

    /// Admits a new connection as unauthenticated. If the unauthenticated quota is full, or
    /// all connections are in use, the oldest unauthenticated connection makes room (returned,
    /// for the caller to shut down): a flood of strangers that never finish a handshake only
    /// ever evicts each other, never a tenant. Refused only when every slot is a tenant's.
    private func admit(_ connection: FrameConnection) -> (admitted: Bool, evicted: FrameConnection?) {
        state.withLock { state in
            var evicted: FrameConnection?
            if state.pending.count >= configuration.maxUnauthenticated || state.connections.count >= configuration.maxConnections,
               let oldest = state.pending.min(by: { $0.value.acceptedAt < $1.value.acceptedAt })
            {
                state.pending[oldest.key] = nil
                state.connections[oldest.key] = nil
                evicted = oldest.value.connection
            }
            guard state.connections.count < configuration.maxConnections else { return (false, evicted) }
            let id = ObjectIdentifier(connection)
            state.connections[id] = connection
            state.pending[id] = Pending(connection: connection, acceptedAt: Self.now())
            return (true, evicted)
        }
    }

    /// Cuts off handshakes older than the deadline (a peer trickling bytes resets no timer).
    private func expireHandshakes() {
        let cutoff = Self.now() - configuration.handshakeTimeout
        let expired = state.withLock { state -> [FrameConnection] in
            let old = state.pending.filter { $0.value.acceptedAt <= cutoff }
            for key in old.keys { state.pending[key] = nil }
            return old.values.map(\.connection)
        }
        for connection in expired {
            counters.handshakeTimeouts.wrappingIncrement(ordering: .relaxed)
            connection.socket.shutdown()
        }
    }

    // MARK: One connection

    private func serve(_ connection: FrameConnection, peer: Endpoint) {
        let id = ObjectIdentifier(connection)
        var tenantName: String?
        defer {
            state.withLock { state in
                state.connections[id] = nil
                state.pending[id] = nil
                if let tenantName, var tenant = state.tenants[tenantName] {
                    tenant.connections[id] = nil
                    if tenant.connections.isEmpty { tenant.disconnectedAt = Self.now() }
                    state.tenants[tenantName] = tenant
                }
            }
            connection.socket.close()
        }
        do {
            tenantName = try handshake(connection, peer: peer)
        } catch {
            logger.notice("handshake failed", metadata: ["peer": "\(peer)", "error": "\(error)"])
            return
        }
        guard let tenantName, let tenantCounters = state.withLock({ $0.tenants[tenantName]?.counters }) else { return }
        // An authenticated connection may idle between requests, but a reply never waits
        // longer than `sendTimeout` for a peer that stopped reading.
        connection.socket.setReceiveTimeout(0)
        connection.socket.setSendTimeout(configuration.sendTimeout)
        while !stopping.load(ordering: .relaxed) {
            let header: FrameHeader
            do {
                header = try connection.receiveHeader()
            } catch {
                if case .frame(let frameError) = error {
                    counters.malformedFrames.wrappingIncrement(ordering: .relaxed)
                    logger.warning("malformed frame; closing", metadata: ["peer": "\(peer)", "error": "\(frameError)"])
                    try? connection.sendError(Wire.ErrorReply(.malformedFrame, "\(frameError)"), requestID: 0)
                }
                return
            }
            do {
                try handle(header, on: connection, tenant: tenantName, counters: tenantCounters)
            } catch {
                if case .frame = error { counters.malformedFrames.wrappingIncrement(ordering: .relaxed) }
                if case .system(let failure) = error, failure.errno == EAGAIN || failure.errno == EWOULDBLOCK {
                    counters.stuckPeers.wrappingIncrement(ordering: .relaxed)
                    logger.warning("tenant stopped reading replies; disconnecting it", metadata: ["peer": "\(peer)", "tenant": "\(tenantName)"])
                }
                logger.notice("connection closed", metadata: ["peer": "\(peer)", "tenant": "\(tenantName)", "reason": "\(error)"])
                return
            }
        }
    }

    /// hello → challenge → (authenticate) → welcome. Returns the tenant's name.
    private func handshake(_ connection: FrameConnection, peer: Endpoint) throws(RemoteError) -> String {
        let header = try connection.receiveHeader()
        guard header.opcode == .hello else {
            try? connection.sendError(Wire.ErrorReply(.authenticationRequired, "say hello first"), requestID: header.requestID)
            throw .protocolViolation("first frame was \(header.opcode)")
        }
        let bytes = try connection.receiveSmall(header)
        let hello = WireReader.decode(bytes, with: Wire.Hello.decode)
        guard let hello else {
            try? connection.sendError(Wire.ErrorReply(.malformedFrame, "bad hello"), requestID: header.requestID)
            throw .protocolViolation("bad hello")
        }
        // Version: the highest both speak; none in common is a clear refusal naming ours.
        let version = min(hello.maximumVersion, WireProtocol.maximumVersion)
        guard version >= max(hello.minimumVersion, WireProtocol.minimumVersion) else {
            try? connection.sendError(Wire.ErrorReply(.unsupportedVersion,
                "daemon speaks versions \(WireProtocol.minimumVersion)...\(WireProtocol.maximumVersion), client \(hello.minimumVersion)...\(hello.maximumVersion)"),
                requestID: header.requestID)
            throw .protocolViolation("no common version")
        }
        let nonce = Authenticator.nonce()
        // Mutual authentication when the client asks for it; version 1's one-way handshake
        // otherwise (docs/protocol.md). Authentication itself is never optional.
        let agreed = Wire.Capabilities(rawValue: hello.capabilities).intersection(.supported)
        try connection.send(.challenge, flags: .response, requestID: header.requestID,
                            meta: Wire.Challenge(version: version, authenticationRequired: true, capabilities: agreed.rawValue,
                                                 nonce: nonce).encode())
        let proofHeader = try connection.receiveHeader()
        let proofBytes = try connection.receiveSmall(proofHeader)
        let proof = WireReader.decode(proofBytes, with: Wire.Authenticate.decode)
        let tokens = state.withLock { $0.tokens }
        // An unknown tenant is checked against a dummy token, so timing does not say which
        // names exist.
        let token = tokens.tokens[hello.tenant] ?? Array(repeating: 0, count: 32)
        let expected = Authenticator.proof(token: token, nonce: nonce, tenant: hello.tenant)
        guard proofHeader.opcode == .authenticate, let proof, tokens.tokens[hello.tenant] != nil,
              Authenticator.constantTimeEqual(proof.mac, expected),
              agreed.contains(.mutualAuthentication) == (proof.clientNonce != nil)
        else {
            counters.authFailures.wrappingIncrement(ordering: .relaxed)
            logger.warning("authentication failed", metadata: ["peer": "\(peer)", "tenant": "\(hello.tenant)"])
            try? connection.sendError(Wire.ErrorReply(.authenticationFailed, "authentication failed"), requestID: proofHeader.requestID)
            throw .refused(Wire.ErrorReply(.authenticationFailed, "authentication failed"))
        }
        let daemonProof = proof.clientNonce.map {
            Authenticator.daemonProof(token: token, clientNonce: $0, daemonNonce: nonce, tenant: hello.tenant, instance: instance)
        }
        let tenantName = hello.tenant
        let welcome = state.withLock { state -> Wire.Welcome? in
            // The tenant may have been removed (SIGHUP) while this handshake ran.
            guard state.tokens.tokens[tenantName] != nil else { return nil }
            state.pending[ObjectIdentifier(connection)] = nil
            var tenant = state.tenants[tenantName] ?? Tenant()
            tenant.connections[ObjectIdentifier(connection)] = connection
            tenant.disconnectedAt = nil
            state.tenants[tenantName] = tenant
            return Wire.Welcome(slabSize: UInt64(configuration.slabSize), capacity: UInt64(configuration.capacity),
                                freeSlabs: UInt32(max(0, totalSlabs - state.mappedSlabs)), heldSlabs: tenant.slabs.sorted(),
                                daemonInstance: instance, daemonProof: daemonProof)
        }
        guard let welcome else {
            try? connection.sendError(Wire.ErrorReply(.authenticationFailed, "authentication failed"), requestID: proofHeader.requestID)
            throw .refused(Wire.ErrorReply(.authenticationFailed, "tenant removed"))
        }
        try connection.send(.welcome, flags: .response, requestID: header.requestID, meta: welcome.encode())
        logger.debug("client authenticated", metadata: ["peer": "\(peer)", "tenant": "\(tenantName)",
                                                        "mutual": "\(daemonProof != nil)"])
        return tenantName
    }

    private func handle(_ header: FrameHeader, on connection: FrameConnection, tenant: String, counters tenantCounters: TenantCounters)
        throws(RemoteError)
    {
        let id = header.requestID
        switch header.opcode {
        case .read, .readBatch:
            if case let delay = testDelayMicroseconds.load(ordering: .relaxed), delay > 0 { usleep(UInt32(delay)) }
            let (meta, register) = try connection.receiveMeta(header)
            guard header.dataLength == 0, ~register == header.payloadChecksum else {
                try refuse(connection, id, .checksumMismatch, "bad payload checksum", tenant: tenant)
                return
            }
            var reader = WireReader(meta)
            if header.opcode == .read {
                // The page path: one range, served from a stack value (no arrays).
                guard var range = Wire.SlabRange.decode(&reader), reader.remaining == 0 else {
                    try refuse(connection, id, .malformedFrame, "bad read fields", tenant: tenant)
                    return
                }
                try withUnsafeMutablePointer(to: &range) { pointer throws(RemoteError) in
                    try serveRead(UnsafeBufferPointer(start: pointer, count: 1), opcode: .read, id: id, on: connection, tenant: tenant,
                                  counters: tenantCounters)
                }
                return
            }
            guard let ranges = Wire.decodeBatch(&reader), reader.remaining == 0 else {
                try refuse(connection, id, .malformedFrame, "bad \(header.opcode) fields", tenant: tenant)
                return
            }
            try ranges.withUnsafeBufferPointer { buffer throws(RemoteError) in
                try serveRead(buffer, opcode: header.opcode, id: id, on: connection, tenant: tenant, counters: tenantCounters)
            }

        case .write, .writeBatch:
            if case let delay = testDelayMicroseconds.load(ordering: .relaxed), delay > 0 { usleep(UInt32(delay)) }
            let (meta, register) = try connection.receiveMeta(header)
            var reader = WireReader(meta)
            if header.opcode == .write {
                guard var range = Wire.SlabRange.decode(&reader), reader.remaining == 0, Int(range.length) == header.dataLength else {
                    _ = try connection.discardData(count: header.dataLength, register: register)
                    try refuse(connection, id, .malformedFrame, "bad write fields", tenant: tenant)
                    return
                }
                try withUnsafeMutablePointer(to: &range) { pointer throws(RemoteError) in
                    try serveWrite(UnsafeBufferPointer(start: pointer, count: 1), header: header, register: register, on: connection,
                                   tenant: tenant, counters: tenantCounters)
                }
                return
            }
            let ranges = Wire.decodeBatch(&reader)
            guard let ranges, reader.remaining == 0, ranges.reduce(0, { $0 + Int($1.length) }) == header.dataLength else {
                _ = try connection.discardData(count: header.dataLength, register: register)
                try refuse(connection, id, .malformedFrame, "bad \(header.opcode) fields", tenant: tenant)
                return
            }
            try ranges.withUnsafeBufferPointer { buffer throws(RemoteError) in
                try serveWrite(buffer, header: header, register: register, on: connection, tenant: tenant, counters: tenantCounters)
            }

        case .mapSlab:
            _ = try connection.receiveSmall(header)
            switch mapSlab(for: tenant) {
            case .success(let slab): try connection.send(.mapSlab, flags: .response, requestID: id, meta: Wire.encodeSlab(slab))
            case .failure(let reply): try refuse(connection, id, reply.code, reply.message, tenant: tenant)
            }

        case .unmapSlab:
            let bytes = try connection.receiveSmall(header)
            guard bytes.count == 4 else {
                try refuse(connection, id, .malformedFrame, "unmap takes a slab id", tenant: tenant)
                return
            }
            let slab = bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)) }
            if let reply = unmapSlab(slab, for: tenant) {
                try refuse(connection, id, reply.code, reply.message, tenant: tenant)
            } else {
                try connection.send(.unmapSlab, flags: .response, requestID: id, meta: [])
            }

        case .heartbeat:
            _ = try connection.receiveSmall(header)
            try connection.send(.heartbeat, flags: .response, requestID: id, meta: [])

        case .stats:
            _ = try connection.receiveSmall(header)
            try connection.send(.stats, flags: .response, requestID: id, meta: Array(statsJSON(for: tenant).utf8))

        case .corruptForTest:
            let bytes = try connection.receiveSmall(header)
            guard configuration.enableTestFaults else {
                try refuse(connection, id, .unknownOpcode, "test faults are off (spillwayd --enable-test-faults)", tenant: tenant)
                return
            }
            guard let range = WireReader.decode(bytes, with: Wire.SlabRange.decode) else {
                try refuse(connection, id, .malformedFrame, "corruptForTest takes a slab range", tenant: tenant)
                return
            }
            var target = range
            let refusal = withUnsafePointer(to: &target) { pointer in
                withUnsafeTemporaryAllocation(of: UnsafeMutableRawPointer.self, capacity: 1) { bases -> Wire.ErrorReply? in
                    let ranges = UnsafeBufferPointer(start: pointer, count: 1)
                    if let reply = acquire(ranges, into: bases, tenant: tenant) { return reply }
                    // Pinned while the bytes are flipped: a concurrent unmap cannot free the slab.
                    let base = bases[0].assumingMemoryBound(to: UInt8.self)
                    for index in 0..<Int(range.length) { base[index] ^= 0xFF }
                    releaseSlabs(ranges)
                    return nil
                }
            }
            if let refusal {
                try refuse(connection, id, refusal.code, refusal.message, tenant: tenant)
            } else {
                logger.warning("test fault: corrupted slab bytes", metadata: ["tenant": "\(tenant)", "slab": "\(range.slab)",
                                                                           "offset": "\(range.offset)", "length": "\(range.length)"])
                try connection.send(.corruptForTest, flags: .response, requestID: id, meta: [])
            }

        case .hello, .challenge, .authenticate, .welcome, .reclaim, .error, .goodbye:
            _ = try connection.receiveSmall(header)
            try refuse(connection, id, .malformedFrame, "\(header.opcode) is not a request here", tenant: tenant)
        }
    }

    private func refuse(_ connection: FrameConnection, _ id: UInt64, _ code: WireErrorCode, _ message: String,
                        tenant: String) throws(RemoteError)
    {
        switch code {
        case .notOwner, .outOfBounds, .unknownSlab, .slabRevoked:
            counters.refusedAccesses.wrappingIncrement(ordering: .relaxed)
            state.withLock { $0.tenants[tenant]?.counters.refused.wrappingIncrement(ordering: .relaxed) }
        case .checksumMismatch: counters.checksumFailures.wrappingIncrement(ordering: .relaxed)
        case .malformedFrame: counters.malformedFrames.wrappingIncrement(ordering: .relaxed)
        default: break
        }
        try connection.sendError(Wire.ErrorReply(code, message), requestID: id)
    }

    /// Checks owner and bounds of every range and pins their slabs (users += 1). Returns the
    /// base addresses, or the refusal.
    /// Checks owner and bounds of every range and pins their slabs (users += 1), writing each
    /// range's address into `bases`. Returns the refusal, if any (then nothing is pinned).
    private func acquire(_ ranges: UnsafeBufferPointer<Wire.SlabRange>, into bases: UnsafeMutableBufferPointer<UnsafeMutableRawPointer>,
                         tenant: String) -> Wire.ErrorReply?
    {
        state.withLock { state in
            for (index, range) in ranges.enumerated() {
                switch check(range, tenant: tenant, in: &state) {
                case .success(let base): bases[index] = base
                case .failure(let reply): return reply
                }
            }
            for range in ranges { state.slabs[range.slab]!.users += 1 }
            return nil
        }
    }

    /// Owner and bounds of one range (under the state lock): its address, or the refusal.
    private func check(_ range: Wire.SlabRange, tenant: String, in state: inout ServerState) -> Result<UnsafeMutableRawPointer, Wire.ErrorReply> {
        guard let slab = state.slabs[range.slab], !slab.retired else {
            if state.revokedFor[tenant]?.contains(range.slab) == true {
                return .failure(Wire.ErrorReply(.slabRevoked, "slab \(range.slab) was reclaimed"))
            }
            return .failure(Wire.ErrorReply(.unknownSlab, "no slab \(range.slab)"))
        }
        guard slab.owner == tenant else {
            return .failure(Wire.ErrorReply(.notOwner, "slab \(range.slab) belongs to another tenant"))
        }
        guard range.offset <= UInt64(configuration.slabSize), UInt64(range.length) <= UInt64(configuration.slabSize) - range.offset else {
            return .failure(Wire.ErrorReply(.outOfBounds,
                "range \(range.offset)+\(range.length) is outside slab \(range.slab) (\(configuration.slabSize) bytes)"))
        }
        return .success(slab.base + Int(range.offset))
    }

    /// `acquire` for one range, without arrays (the per-page path).
    private func releaseSlabs(_ ranges: UnsafeBufferPointer<Wire.SlabRange>) {
        state.withLock { state in
            for range in ranges { unpin(range.slab, in: &state) }
        }
    }

    /// Drops one user of a slab; a retired slab is freed by its last user.
    private func unpin(_ id: UInt32, in state: inout ServerState) {
        guard var slab = state.slabs[id] else { return }
        slab.users -= 1
        if slab.retired && slab.users == 0 {
            munmap(slab.base, configuration.slabSize)
            state.mappedSlabs -= 1
            state.slabs[id] = nil
        } else {
            state.slabs[id] = slab
        }
    }

    private func serveRead(_ ranges: UnsafeBufferPointer<Wire.SlabRange>, opcode: Opcode, id: UInt64, on connection: FrameConnection,
                           tenant: String, counters tenantCounters: TenantCounters) throws(RemoteError)
    {
        let total = ranges.reduce(0) { $0 + Int($1.length) }
        guard total <= WireProtocol.maxDataLength else {
            try refuse(connection, id, .tooLarge, "read of \(total) bytes exceeds \(WireProtocol.maxDataLength)", tenant: tenant)
            return
        }
        // Bases on the stack for a page (and small batches), so the page path allocates nothing.
        try withUnsafeTemporaryAllocation(of: UnsafeMutableRawPointer.self, capacity: ranges.count) { bases throws(RemoteError) in
            if let reply = acquire(ranges, into: bases, tenant: tenant) {
                try refuse(connection, id, reply.code, reply.message, tenant: tenant)
                return
            }
            defer { releaseSlabs(ranges) }
            // Counted before the reply, so whoever saw it also sees the count.
            counters.reads.wrappingIncrement(by: ranges.count, ordering: .relaxed)
            counters.bytesRead.wrappingIncrement(by: total, ordering: .relaxed)
            tenantCounters.reads.wrappingIncrement(by: ranges.count, ordering: .relaxed)
            tenantCounters.bytesRead.wrappingIncrement(by: total, ordering: .relaxed)
            if ranges.count == 1 {
                try connection.send(opcode, flags: .response, requestID: id, meta: UnsafeRawBufferPointer(start: nil, count: 0),
                                    data: UnsafeRawBufferPointer(start: bases[0], count: Int(ranges[0].length)))
            } else {
                // Batched: the ranges are sent back to back (copied into one buffer: the frame's
                // CRC32C covers them all; a scatter send would need one pass anyway).
                let buffer = UnsafeMutableRawPointer.allocate(byteCount: max(1, total), alignment: 64)
                defer { buffer.deallocate() }
                var offset = 0
                for (index, range) in ranges.enumerated() {
                    memcpy(buffer + offset, bases[index], Int(range.length))
                    offset += Int(range.length)
                }
                try connection.send(opcode, flags: .response, requestID: id, meta: UnsafeRawBufferPointer(start: nil, count: 0),
                                    data: UnsafeRawBufferPointer(start: buffer, count: total))
            }
        }
    }

    private func serveWrite(_ ranges: UnsafeBufferPointer<Wire.SlabRange>, header: FrameHeader, register: UInt32,
                            on connection: FrameConnection, tenant: String, counters tenantCounters: TenantCounters) throws(RemoteError)
    {
        try withUnsafeTemporaryAllocation(of: UnsafeMutableRawPointer.self, capacity: ranges.count) { bases throws(RemoteError) in
            if let reply = acquire(ranges, into: bases, tenant: tenant) {
                _ = try connection.discardData(count: header.dataLength, register: register)
                try refuse(connection, header.requestID, reply.code, reply.message, tenant: tenant)
                return
            }
            defer { releaseSlabs(ranges) }
            // Straight into the slab. The bytes land before their CRC32C is checked; a mismatch is
            // refused, and the client never makes that location visible (it writes fresh
            // locations and publishes only acknowledged ones).
            var running = register
            for (index, range) in ranges.enumerated() {
                running = try connection.receiveData(into: bases[index], count: Int(range.length), register: running)
            }
            guard ~running == header.payloadChecksum else {
                try refuse(connection, header.requestID, .checksumMismatch, "payload CRC32C mismatch", tenant: tenant)
                return
            }
            // Counted before the acknowledgement, so whoever saw it also sees the count.
            counters.writes.wrappingIncrement(by: ranges.count, ordering: .relaxed)
            counters.bytesWritten.wrappingIncrement(by: header.dataLength, ordering: .relaxed)
            tenantCounters.writes.wrappingIncrement(by: ranges.count, ordering: .relaxed)
            tenantCounters.bytesWritten.wrappingIncrement(by: header.dataLength, ordering: .relaxed)
            try connection.send(header.opcode, flags: .response, requestID: header.requestID, meta: UnsafeRawBufferPointer(start: nil, count: 0))
        }
    }

    // MARK: Slabs

    private func mapSlab(for tenant: String) -> Result<UInt32, Wire.ErrorReply> {
        state.withLock { state in
            // Mapped, not lent: a retired slab that a stuck transfer still pins holds memory too.
            guard state.mappedSlabs < totalSlabs else {
                return .failure(Wire.ErrorReply(.noCapacity, "all \(totalSlabs) slabs are lent"))
            }
            // Every slab a tenant holds is listed in its welcome, which must fit in one frame.
            guard (state.tenants[tenant]?.slabs.count ?? 0) < Wire.Welcome.maxHeldSlabs else {
                return .failure(Wire.ErrorReply(.noCapacity, "a tenant may hold at most \(Wire.Welcome.maxHeldSlabs) slabs of one daemon"))
            }
            // A fresh anonymous mapping: zero-filled, and memory is committed only as written.
            let base = mmap(nil, configuration.slabSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            guard let base, base != MAP_FAILED else {
                return .failure(Wire.ErrorReply(.noCapacity, "mmap of a slab failed: \(String(cString: strerror(errno)))"))
            }
            let id = state.nextSlab
            state.nextSlab &+= 1
            if state.nextSlab == 0 { state.nextSlab = 1 }
            state.slabs[id] = Slab(base: base, owner: tenant, mappedAt: Self.now())
            state.lentSlabs += 1
            state.mappedSlabs += 1
            state.tenants[tenant, default: Tenant()].slabs.insert(id)
            return .success(id)
        }
    }

    private func unmapSlab(_ id: UInt32, for tenant: String) -> Wire.ErrorReply? {
        state.withLock { state in
            guard let slab = state.slabs[id], !slab.retired else { return Wire.ErrorReply(.unknownSlab, "no slab \(id)") }
            guard slab.owner == tenant else { return Wire.ErrorReply(.notOwner, "slab \(id) belongs to another tenant") }
            retire(id, in: &state)
            return nil
        }
    }

    /// Takes a slab out of service: freed now, or by its last user.
    private func retire(_ id: UInt32, in state: inout ServerState) {
        guard var slab = state.slabs[id], !slab.retired else { return }
        slab.retired = true
        state.lentSlabs -= 1
        state.tenants[slab.owner]?.slabs.remove(id)
        if slab.users == 0 {
            munmap(slab.base, configuration.slabSize)
            state.mappedSlabs -= 1
            state.slabs[id] = nil
        } else {
            state.slabs[id] = slab
        }
    }

    // MARK: Leases, reclaim

    private func janitorLoop() {
        while !stopping.load(ordering: .relaxed) {
            usleep(UInt32(configuration.checkInterval * 1_000_000))
            expireHandshakes()
            expireLeases()
            enforceDeadlines()
            if configuration.headroom > 0 { checkHeadroom() }
        }
    }

    private func expireLeases() {
        let now = Self.now()
        state.withLock { state in
            for (name, tenant) in state.tenants where tenant.connections.isEmpty {
                guard let since = tenant.disconnectedAt, now - since >= configuration.lease else { continue }
                if !tenant.slabs.isEmpty {
                    logger.info("lease expired; freeing the tenant's slabs", metadata: ["tenant": "\(name)", "slabs": "\(tenant.slabs.count)"])
                    counters.expiredLeases.wrappingIncrement(ordering: .relaxed)
                }
                for id in tenant.slabs { retire(id, in: &state) }
                state.tenants[name] = nil
            }
        }
    }

    private func enforceDeadlines() {
        let now = Self.now()
        // Memory back above the headroom (a slab given back, or the host freed memory): the
        // pending reclaims are no longer needed, so nobody loses pages for them.
        if configuration.headroom > 0, let available = availableMemory(), available >= configuration.headroom {
            let cancelled = state.withLock { state -> Int in
                var cancelled = 0
                for (id, slab) in state.slabs where slab.reclaimDeadline != nil && !slab.retired {
                    state.slabs[id]!.reclaimDeadline = nil
                    cancelled += 1
                }
                return cancelled
            }
            if cancelled > 0 {
                counters.cancelledReclaims.wrappingIncrement(by: cancelled, ordering: .relaxed)
                logger.notice("memory back above the headroom; pending reclaims cancelled", metadata: ["slabs": "\(cancelled)"])
            }
            return
        }
        state.withLock { state in
            for (id, slab) in state.slabs where !slab.retired {
                guard let deadline = slab.reclaimDeadline, now >= deadline else { continue }
                logger.warning("reclaim deadline missed; revoking slab", metadata: ["tenant": "\(slab.owner)", "slab": "\(id)"])
                counters.revokedSlabs.wrappingIncrement(ordering: .relaxed)
                state.revokedFor[slab.owner, default: []].insert(id)
                retire(id, in: &state)
            }
        }
    }

    /// MemAvailable from `memoryInfoPath`, in bytes.
    func availableMemory() -> Int? {
        guard let file = fopen(configuration.memoryInfoPath, "r") else { return nil }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), file) != nil {
            let text = String(cString: line)
            guard text.hasPrefix("MemAvailable:") else { continue }
            let fields = text.split(whereSeparator: { $0 == " " || $0 == "\n" })
            guard fields.count >= 2, let kilobytes = Int(fields[1]) else { return nil }
            return kilobytes * 1024
        }
        return nil
    }

    /// Below headroom: ask owners to give back enough slabs (newest first), each with a deadline.
    private func checkHeadroom() {
        guard let available = availableMemory(), available < configuration.headroom else { return }
        let shortfall = configuration.headroom - available
        let now = Self.now()
        let notices: [(FrameConnection?, UInt32)] = state.withLock { state in
            let pending = state.slabs.values.filter { $0.reclaimDeadline != nil && !$0.retired }.count * configuration.slabSize
            guard pending < shortfall else { return [] }
            var needed = shortfall - pending
            var chosen: [(FrameConnection?, UInt32)] = []
            for (id, slab) in state.slabs.sorted(by: { $0.value.mappedAt > $1.value.mappedAt })
                where !slab.retired && slab.reclaimDeadline == nil && needed > 0
            {
                state.slabs[id]!.reclaimDeadline = now + configuration.reclaimDeadline
                chosen.append((state.tenants[slab.owner]?.connections.values.first, id))
                needed -= configuration.slabSize
            }
            return chosen
        }
        for (connection, slab) in notices {
            counters.reclaimNotices.wrappingIncrement(ordering: .relaxed)
            logger.notice("memory below headroom; reclaiming slab", metadata: [
                "slab": "\(slab)", "available": "\(ByteCount.format(available))", "headroom": "\(ByteCount.format(configuration.headroom))",
            ])
            let notice = Wire.Reclaim(slab: slab, deadlineMilliseconds: UInt32(configuration.reclaimDeadline * 1000))
            // Never waits on the tenant: unsent, the notice is simply missed and the deadline
            // revokes the slab; a half-sent frame breaks the stream, so that peer is cut off.
            switch connection?.trySendNotice(.reclaim, meta: notice.encode()) {
            case .broken?:
                counters.stuckPeers.wrappingIncrement(ordering: .relaxed)
                connection?.socket.shutdown()
            case .busy?:
                logger.notice("reclaim notice not delivered (the tenant is not reading); the deadline still applies",
                              metadata: ["slab": "\(slab)"])
            case .sent?, nil: break
            }
        }
    }

    // MARK: Stats

    public struct TenantSnapshot: Sendable {
        public var name: String
        public var slabs: Int
        public var connections: Int
        public var reads: Int
        public var writes: Int
        public var bytesRead: Int
        public var bytesWritten: Int
        public var refused: Int
    }

    public struct Snapshot: Sendable {
        public var slabsLent: Int
        public var slabsFree: Int
        public var bytesLent: Int
        public var connections: Int
        /// Slabs asked back whose deadline has not come yet.
        public var pendingReclaims: Int
        /// By name.
        public var tenants: [TenantSnapshot]
    }

    public func snapshot() -> Snapshot {
        state.withLock { state in
            Snapshot(slabsLent: state.lentSlabs, slabsFree: max(0, totalSlabs - state.mappedSlabs),
                     bytesLent: state.lentSlabs * configuration.slabSize, connections: state.connections.count,
                     pendingReclaims: state.slabs.values.filter { $0.reclaimDeadline != nil && !$0.retired }.count,
                     tenants: state.tenants.keys.sorted().map { name in
                         let tenant = state.tenants[name]!
                         let c = tenant.counters
                         return TenantSnapshot(name: name, slabs: tenant.slabs.count, connections: tenant.connections.count,
                                               reads: c.reads.load(ordering: .relaxed), writes: c.writes.load(ordering: .relaxed),
                                               bytesRead: c.bytesRead.load(ordering: .relaxed),
                                               bytesWritten: c.bytesWritten.load(ordering: .relaxed),
                                               refused: c.refused.load(ordering: .relaxed))
                     })
        }
    }

    /// Most bytes of tenant entries one `stats` reply carries (the rest of the reply is small
    /// and fixed; the whole must fit in a frame's meta section).
    static let statsTenantBudget = WireProtocol.maxMetaLength - 4096

    /// The `stats` reply: one JSON object (also what `spillway status` prints). A tenant sees
    /// its own entry; an admin tenant (token file) or nil (the daemon itself) sees every
    /// tenant, as many as fit in one frame, and `tenants_omitted` says how many did not.
    public func statsJSON(for viewer: String? = nil) -> String {
        let snap = snapshot()
        let c = counters
        func load(_ counter: ManagedAtomic<Int>) -> JSONValue { .int(counter.load(ordering: .relaxed)) }
        let seesAll = viewer == nil || state.withLock { $0.tokens.admins.contains(viewer!) }
        var tenants: [JSONValue] = []
        var budget = Self.statsTenantBudget
        var omitted = 0
        for tenant in snap.tenants where seesAll || tenant.name == viewer {
            let entry = JSONValue.object([
                ("name", .string(tenant.name)), ("slabs", .int(tenant.slabs)), ("connections", .int(tenant.connections)),
                ("reads", .int(tenant.reads)), ("writes", .int(tenant.writes)), ("bytes_read", .int(tenant.bytesRead)),
                ("bytes_written", .int(tenant.bytesWritten)), ("refused", .int(tenant.refused))])
            let size = entry.serialized().utf8.count + 1
            guard size <= budget else {
                omitted += 1
                continue
            }
            budget -= size
            tenants.append(entry)
        }
        return JSONValue.object([
            ("version", .string(SpillwayVersion.current)), ("protocol", .int(Int(WireProtocol.maximumVersion))),
            ("transport", .string("tcp")), ("capacity", .int(configuration.capacity)), ("slab_size", .int(configuration.slabSize)),
            ("slabs_lent", .int(snap.slabsLent)), ("slabs_free", .int(snap.slabsFree)), ("bytes_lent", .int(snap.bytesLent)),
            ("connections", .int(snap.connections)), ("tenants", .array(tenants)), ("tenants_omitted", .int(omitted)),
            ("ops", .object([("reads", load(c.reads)), ("writes", load(c.writes)), ("bytes_read", load(c.bytesRead)),
                             ("bytes_written", load(c.bytesWritten))])),
            ("errors", .object([("auth_failures", load(c.authFailures)), ("refused_accesses", load(c.refusedAccesses)),
                                ("malformed_frames", load(c.malformedFrames)), ("checksum_failures", load(c.checksumFailures)),
                                ("revoked_slabs", load(c.revokedSlabs)), ("expired_leases", load(c.expiredLeases)),
                                ("handshake_timeouts", load(c.handshakeTimeouts)), ("handshake_evictions", load(c.handshakeEvictions)),
                                ("stuck_peers", load(c.stuckPeers))])),
            ("reclaim_notices", load(c.reclaimNotices)), ("reclaims_pending", .int(snap.pendingReclaims)),
            ("reclaims_cancelled", load(c.cancelledReclaims)),
        ]).serialized()
    }
}

/// The version the daemon and CLI report.
public enum SpillwayVersion {
    public static let current = "0.2.0"
}
