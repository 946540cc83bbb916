import Atomics
import Logging
import Metrics
import SpillwayCore
import SpillwayFabric
import SpillwayProtocol

#if canImport(Glibc)
import Glibc
#endif

/// Who the client is to a daemon.
public struct ClientCredentials: Sendable {
    public var tenant: String
    /// Nil: use the generated token file of a same-host `spillwayd` started without
    /// `--token-file` (`LocalTokens`), found by the daemon's address.
    public var token: [UInt8]?
    /// Refuse a daemon that cannot prove it holds the token (one without the mutual
    /// authentication capability). Only for talking to a pre-mutual `spillwayd`.
    public var requireDaemonProof = true

    public init(tenant: String, token: [UInt8]?) {
        self.tenant = tenant
        self.token = token
    }

    /// The first line of a token file (a client's file holds its one line).
    public init(tokenFile: TokenFile) {
        let name = tokenFile.names[0]
        self.init(tenant: name, token: tokenFile.tokens[name])
    }
}

/// One page transfer against a daemon: `length` bytes at `offset` of `slab`, from or into
/// `buffer`. `status` is 0 or an errno once executed.
public struct RemoteOperation: Sendable {
    public var write: Bool
    public var slab: UInt32
    public var offset: UInt64
    public var length: Int
    public var bufferAddress: UInt
    public var status: Int32 = 0

    public init(write: Bool, slab: UInt32, offset: UInt64, length: Int, buffer: UnsafeRawPointer) {
        self.write = write
        self.slab = slab
        self.offset = offset
        self.length = length
        bufferAddress = UInt(bitPattern: buffer)
    }

    var buffer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: bufferAddress)! }
}

/// A client of one daemon: a small pool of authenticated connections (one borrowed per batch,
/// so concurrent callers do not share a socket), pipelined page I/O, slab mapping, heartbeat.
///
/// `@unchecked Sendable`: the pool and notices are behind locks; `welcome` is written once in
/// `init`; each borrowed connection is used by one thread at a time.
public final class DaemonClient: @unchecked Sendable {
    public let endpoint: Endpoint
    public let credentials: ClientCredentials
    public private(set) var welcome: Wire.Welcome
    public let maxConnections: Int
    /// Microseconds a connection polls for a reply before sleeping (see
    /// `FrameConnection.pollNanoseconds`): at queue depth 1 on loopback this halves the round
    /// trip, because most of it is the thread wake-up.
    public let pollMicroseconds: Int
    private let ioTimeout: Double
    private let pool = Locked<(idle: [FrameConnection], open: Int)>(([], 0))
    /// The owing connections `laggingReplies` is reaping (kept for its capacity).
    private let reaping = Locked<[FrameConnection]>([])
    private let nextRequest = ManagedAtomic<UInt64>(1)
    private let logger: Logger
    /// Reclaim notices received and not yet handled.
    public let reclaims = Locked<[Wire.Reclaim]>([])
    /// Set when the daemon said goodbye or a connection failed.
    public let failed = ManagedAtomic<Bool>(false)
    /// The page transport negotiated with this daemon ("rma" or "tcp") and why.
    public private(set) var transport = "tcp"
    public private(set) var transportReason = ""
    /// The capabilities this client asks for in every hello.
    private let requested: Wire.Capabilities
    /// The one-sided path, when RMA was negotiated.
    let rma: RMAChannel?

    /// Connects and authenticates one connection (more are opened on demand).
    public init(endpoint: Endpoint, credentials: ClientCredentials, maxConnections: Int = 4, ioTimeout: Double = 5,
                pollMicroseconds: Int = 20, transport mode: TransportMode = .auto, fabricProvider: String? = nil,
                rmaArenaBytes: Int = 4 << 20, logger: Logger = Logger(label: "spillway.remote")) throws(RemoteError)
    {
        self.pollMicroseconds = pollMicroseconds
        self.endpoint = endpoint
        // No token given: a same-host daemon's generated token file, if this user has one.
        let credentials = credentials.token == nil ? (LocalTokens.credentials(for: endpoint, logger: logger) ?? credentials) : credentials
        self.credentials = credentials
        self.maxConnections = maxConnections
        self.ioTimeout = ioTimeout
        self.logger = logger
        // Ask for RMA only when this side could use it: a provider named, or (auto/rma) a local
        // RDMA/EFA provider to match the daemon's.
        var reason = ""
        var wantRMA = false
        switch mode {
        case .tcp: reason = "--transport tcp"
        case .auto, .rma:
            if fabricProvider != nil {
                wantRMA = true
            } else if TransportSelection.localRDMAProvider != nil {
                wantRMA = true
            } else {
                reason = TransportSelection.noRDMAReason
                if mode == .rma {
                    throw .transportUnavailable("--transport rma to \(endpoint): \(reason)")
                }
            }
        }
        requested = wantRMA ? Wire.Capabilities.supported : Wire.Capabilities.supported.subtracting(.rma)
        let (connection, welcome) = try Self.open(endpoint, credentials: credentials, ioTimeout: ioTimeout, pollMicroseconds: pollMicroseconds,
                                                  capabilities: requested)
        self.welcome = welcome
        var channel: RMAChannel?
        if wantRMA {
            if var advert = welcome.fabric {
                advert.provider = String(advert.provider.split(separator: ";").first ?? "")
                if let named = fabricProvider.map({ String($0.split(separator: ";").first ?? "") }), named != advert.provider {
                    reason = "provider mismatch: the daemon serves RMA on '\(advert.provider)', this client was told '\(named)'"
                } else if fabricProvider == nil, mode == .auto, !TransportMode.rdmaProviders.contains(advert.provider) {
                    reason = "the daemon's provider '\(advert.provider)' is not an RDMA/EFA one; name it (--fabric-provider \(advert.provider)) to use it"
                } else {
                    do {
                        channel = try RMAChannel(provider: advert.provider, daemonAddress: advert.address,
                                                 node: endpoint.isLoopback ? "127.0.0.1" : nil, arenaBytes: rmaArenaBytes,
                                                 timeout: ioTimeout, logger: logger)
                        reason = fabricProvider != nil ? "provider '\(advert.provider)' named and served by the daemon"
                            : "RDMA provider '\(advert.provider)' on both sides"
                    } catch {
                        reason = "libfabric provider '\(advert.provider)' refused or registration failed: \(error)"
                    }
                }
            } else {
                reason = "peer TCP-only: the daemon at \(endpoint) does not serve RMA (spillwayd --transport auto|rma with a usable --fabric-provider)"
            }
            if channel == nil && mode == .rma {
                connection.socket.close()
                throw .transportUnavailable("--transport rma to \(endpoint): \(reason)")
            }
        }
        rma = channel
        transport = channel == nil ? "tcp" : "rma"
        transportReason = reason
        logger.notice("remote transport chosen", metadata: ["daemon": "\(endpoint)", "transport": "\(transport)", "reason": "\(reason)"])
        Counter(label: "spillway_transport_connections", dimensions: [("transport", transport)]).increment()
        pool.withLock {
            $0.idle.append(connection)
            $0.open = 1
        }
    }

    deinit {
        pool.withLock { pool in
            for connection in pool.idle { connection.socket.close() }
        }
    }

    static func open(_ endpoint: Endpoint, credentials: ClientCredentials, ioTimeout: Double, pollMicroseconds: Int,
                     capabilities: Wire.Capabilities = Wire.Capabilities.supported.subtracting(.rma)) throws(RemoteError)
        -> (FrameConnection, Wire.Welcome)
    {
        let socket: TCPSocket
        do {
            socket = try TCPSocket.connect(to: endpoint, timeout: 2, ioTimeout: ioTimeout)
        } catch {
            throw .system(error)
        }
        let connection = FrameConnection(socket: socket)
        connection.pollNanoseconds = UInt64(max(0, pollMicroseconds)) * 1000
        try connection.send(.hello, requestID: 1, meta: Wire.Hello(capabilities: capabilities.rawValue,
                                                                   tenant: credentials.tenant).encode())
        let challengeHeader = try connection.receiveHeader()
        let challengeBytes = try connection.receiveSmall(challengeHeader)
        if challengeHeader.opcode == .error { throw .refused(Self.decodeError(challengeBytes)) }
        guard challengeHeader.opcode == .challenge,
              let challenge = WireReader.decode(challengeBytes, with: Wire.Challenge.decode)
        else { throw .protocolViolation("expected a challenge, got \(challengeHeader.opcode)") }
        // A daemon that does not authenticate its clients cannot prove anything either: it
        // gets no pages.
        guard challenge.authenticationRequired else {
            throw .daemonNotAuthenticated("the daemon at \(endpoint) runs without authentication")
        }
        guard let token = credentials.token else {
            throw .refused(Wire.ErrorReply(.authenticationRequired,
                "the daemon at \(endpoint) requires a token (--token-file), and no generated token file of it was found"))
        }
        let mutual = Wire.Capabilities(rawValue: challenge.capabilities).contains(.mutualAuthentication)
        if !mutual && credentials.requireDaemonProof {
            throw .daemonNotAuthenticated("the daemon at \(endpoint) cannot prove it holds the token (no mutual authentication)")
        }
        let clientNonce = mutual ? Authenticator.nonce() : nil
        let proof = Authenticator.proof(token: token, nonce: challenge.nonce, tenant: credentials.tenant)
        try connection.send(.authenticate, requestID: 2, meta: Wire.Authenticate(mac: proof, clientNonce: clientNonce).encode())
        let header = try connection.receiveHeader()
        let bytes = try connection.receiveSmall(header)
        if header.opcode == .error { throw .refused(Self.decodeError(bytes)) }
        guard header.opcode == .welcome,
              let welcome = WireReader.decode(bytes, with: { Wire.Welcome.decode(&$0, agreed: Wire.Capabilities(rawValue: challenge.capabilities)) })
        else { throw .protocolViolation("expected welcome, got \(header.opcode)") }
        if let clientNonce {
            let expected = Authenticator.daemonProof(token: token, clientNonce: clientNonce, daemonNonce: challenge.nonce,
                                                     tenant: credentials.tenant, instance: welcome.daemonInstance)
            guard let daemonProof = welcome.daemonProof, Authenticator.constantTimeEqual(daemonProof, expected) else {
                throw .daemonNotAuthenticated("the daemon at \(endpoint) failed to prove it holds the token")
            }
        }
        return (connection, welcome)
    }

    static func decodeError(_ bytes: [UInt8]) -> Wire.ErrorReply {
        WireReader.decode(bytes, with: Wire.ErrorReply.decode) ?? Wire.ErrorReply(.malformedFrame, "undecodable error reply")
    }

    /// Runs `body` on a connection of the pool (opening one if none is idle and the pool has
    /// room, else waiting). A connection whose use failed is closed, not returned.
    public func withConnection<R>(_ body: (FrameConnection) throws(RemoteError) -> R) throws(RemoteError) -> R {
        let borrowed = try borrow()
        do {
            let result = try body(borrowed)
            giveBack(borrowed)
            return result
        } catch {
            giveBack(borrowed, failedWith: error)
            throw error
        }
    }

    /// Replies idle connections still owe (a straggling daemon): late-binding readers steer
    /// around a daemon while it lags. Reaps, without waiting, the owed replies that arrived.
    /// Allocates nothing: the owing connections move through a reused list (`reaping`); if
    /// another thread is reaping, this one counts what the idle connections owe.
    public func laggingReplies() -> Int {
        // The common case, no connection owing anything, without touching the list.
        guard pool.withLock({ pool in pool.idle.contains { $0.owedReplies > 0 } }) else { return 0 }
        let reaped = reaping.withTryLock { taken -> Int in
            pool.withLock { pool in
                var index = 0
                while index < pool.idle.count {
                    if pool.idle[index].owedReplies > 0 {
                        pool.idle.swapAt(index, pool.idle.count - 1)
                        taken.append(pool.idle.removeLast())
                    } else {
                        index += 1
                    }
                }
            }
            var owed = 0
            var kept = 0
            for position in 0..<taken.count {
                let connection = taken[position]
                do throws(RemoteError) {
                    try drainArrivedReplies(connection)
                    owed += connection.owedReplies
                    taken[kept] = connection
                    kept += 1
                } catch {
                    giveBack(connection, failedWith: error)
                }
            }
            taken.removeLast(taken.count - kept)
            pool.withLock { $0.idle.append(contentsOf: taken) }
            taken.removeAll(keepingCapacity: true)
            return owed
        }
        if let reaped { return reaped }
        return pool.withLock { pool in pool.idle.reduce(0) { $0 + $1.owedReplies } }
    }

    /// Drains the owed replies that have already arrived, without waiting for the rest.
    private func drainArrivedReplies(_ connection: FrameConnection) throws(RemoteError) {
        while connection.owedReplies > 0 && (connection.hasBufferedInput || connection.socket.isReadable) {
            let header = try receiveReply(connection)
            let (_, register) = try connection.receiveMeta(header)
            _ = try connection.discardData(count: header.dataLength, register: register)
            connection.owedReplies -= 1
        }
    }

    /// What `tryBorrow` found.
    public enum BorrowAttempt {
        case connection(FrameConnection)
        /// No clean idle connection, and an idle one has owed replies for more than
        /// `laggingAfter`: the daemon lags (a straggler, or a host gone silent); waiting
        /// would stall the caller.
        case lagging
        /// No clean idle connection, and an idle one owes replies, for less than
        /// `laggingAfter` (late binding left them, they are on their way, or the host has
        /// just gone silent): `borrow` would wait for them, up to the I/O timeout.
        case owing
        /// Every connection is borrowed by other threads: `borrow` opens one or waits for a
        /// return.
        case busy
    }

    /// A connection without waiting: an idle one that owes no replies (after reaping, without
    /// waiting, the owed replies that have arrived), or why there is none.
    public func tryBorrow() -> BorrowAttempt {
        if pool.withLock({ pool in pool.idle.contains { $0.owedReplies > 0 } && !pool.idle.contains { $0.owedReplies == 0 } }) {
            _ = laggingReplies()
        }
        return pool.withLock { pool -> BorrowAttempt in
            if let index = pool.idle.lastIndex(where: { $0.owedReplies == 0 }) { return .connection(pool.idle.remove(at: index)) }
            // Replies owed only briefly (late binding left them, they are on their way): a
            // new connection or a short wait (`borrow`). Owed for longer: the daemon lags.
            var oldest = UInt64.max
            for connection in pool.idle where connection.owedReplies > 0 { oldest = min(oldest, connection.owedSince) }
            guard oldest != .max else { return .busy }
            return monotonicNanoseconds() &- oldest > Self.laggingAfter ? .lagging : .owing
        }
    }

    /// How long an idle connection may owe replies before its daemon counts as lagging.
    static let laggingAfter: UInt64 = 10_000_000

    /// Takes a connection from the pool: an idle one that owes no replies (after reaping the
    /// owed replies that have arrived), else a new one if the pool has room, else an idle one
    /// after waiting for the replies it owes, else waits.
    public func borrow() throws(RemoteError) -> FrameConnection {
        if pool.withLock({ pool in pool.idle.contains { $0.owedReplies > 0 } && !pool.idle.contains { $0.owedReplies == 0 } }) {
            _ = laggingReplies()
        }
        while true {
            let (idle, mayOpen) = pool.withLock { pool -> (FrameConnection?, Bool) in
                if let clean = pool.idle.lastIndex(where: { $0.owedReplies == 0 }) { return (pool.idle.remove(at: clean), false) }
                if pool.open < maxConnections {
                    pool.open += 1
                    return (nil, true)
                }
                return (pool.idle.popLast(), false)
            }
            if let idle {
                if idle.owedReplies > 0 {
                    do {
                        try drainOwedReplies(idle)
                    } catch {
                        giveBack(idle, failedWith: error)
                        throw error
                    }
                }
                return idle
            }
            if mayOpen {
                do throws(RemoteError) {
                    let (connection, reached) = try Self.open(endpoint, credentials: credentials, ioTimeout: ioTimeout,
                                                              pollMicroseconds: pollMicroseconds, capabilities: requested)
                    // A restarted daemon numbers its slabs from 1 again: a write through an old
                    // slab id could land in memory that now holds other pages. Never use it.
                    guard reached.daemonInstance == welcome.daemonInstance else {
                        connection.socket.close()
                        failed.store(true, ordering: .relaxed)
                        logger.error("daemon restarted under us; treating it as dead", metadata: [
                            "daemon": "\(endpoint)", "instance": "\(String(reached.daemonInstance, radix: 16))"])
                        throw .daemonRestarted(previous: welcome.daemonInstance, now: reached.daemonInstance)
                    }
                    return connection
                } catch {
                    pool.withLock { $0.open -= 1 }
                    throw error
                }
            }
            sched_yield()
        }
    }

    /// Returns a borrowed connection; with an error it is closed instead (and, unless the
    /// daemon merely refused a request, the daemon counts as failed).
    public func giveBack(_ connection: FrameConnection, failedWith error: RemoteError? = nil) {
        guard let error else {
            pool.withLock { $0.idle.append(connection) }
            return
        }
        connection.socket.close()
        pool.withLock { $0.open -= 1 }
        if case .refused = error {} else { failed.store(true, ordering: .relaxed) }
    }

    /// Receives and drops the replies a connection owes.
    private func drainOwedReplies(_ connection: FrameConnection) throws(RemoteError) {
        while connection.owedReplies > 0 {
            let header = try receiveReply(connection)
            let (_, register) = try connection.receiveMeta(header)
            _ = try connection.discardData(count: header.dataLength, register: register)
            connection.owedReplies -= 1
        }
    }

    /// Receives the next reply, handling notices that arrive in between.
    func receiveReply(_ connection: FrameConnection) throws(RemoteError) -> FrameHeader {
        while true {
            let header = try connection.receiveHeader()
            guard header.flags.contains(.notice) else { return header }
            try handleNotice(header, bytes: connection.receiveSmall(header))
        }
    }

    private func handleNotice(_ header: FrameHeader, bytes: [UInt8]) throws(RemoteError) {
        switch header.opcode {
        case .reclaim:
            guard let notice = WireReader.decode(bytes, with: Wire.Reclaim.decode) else {
                throw .protocolViolation("undecodable reclaim notice")
            }
            logger.notice("daemon reclaims a slab", metadata: ["daemon": "\(endpoint)", "slab": "\(notice.slab)"])
            reclaims.withLock { $0.append(notice) }
        case .goodbye:
            logger.notice("daemon is shutting down", metadata: ["daemon": "\(endpoint)"])
            failed.store(true, ordering: .relaxed)
        case .error:
            throw .refused(Self.decodeError(bytes))
        default:
            throw .protocolViolation("unexpected notice \(header.opcode)")
        }
    }

    /// Reads the notices waiting on idle connections: the daemon sends a reclaim notice on
    /// one of the tenant's connections, which may be one nobody is reading. A connection that
    /// turns out closed or sends anything but a notice is dropped (and the daemon counts as
    /// failed, as on any connection failure).
    public func pollNotices() {
        let idle = pool.withLock { pool -> [FrameConnection] in
            defer { pool.idle.removeAll() }
            return pool.idle
        }
        var kept: [FrameConnection] = []
        for connection in idle {
            do throws(RemoteError) {
                while connection.hasBufferedInput || connection.socket.isReadable {
                    let header = try connection.receiveHeader()
                    if header.flags.contains(.notice) {
                        try handleNotice(header, bytes: connection.receiveSmall(header))
                    } else if connection.owedReplies > 0 {
                        // A late reply an exchange stopped waiting for: drop it.
                        let (_, register) = try connection.receiveMeta(header)
                        _ = try connection.discardData(count: header.dataLength, register: register)
                        connection.owedReplies -= 1
                    } else {
                        throw .protocolViolation("unsolicited \(header.opcode) frame")
                    }
                }
                kept.append(connection)
            } catch {
                connection.socket.close()
                pool.withLock { $0.open -= 1 }
                if case .refused = error {} else { failed.store(true, ordering: .relaxed) }
                logger.warning("idle daemon connection failed", metadata: ["daemon": "\(endpoint)", "error": "\(error)"])
            }
        }
        pool.withLock { $0.idle.append(contentsOf: kept) }
    }

    /// Takes the reclaim notices received so far.
    public func takeReclaims() -> [Wire.Reclaim] {
        reclaims.withLock { notices in
            defer { notices.removeAll() }
            return notices
        }
    }

    /// Connects to every daemon of a tier: a client per reachable one (nil for the others,
    /// logged), and the slab size they all lend. A daemon that refuses the credentials is a
    /// configuration error; fewer than `minimumLive` reachable daemons is a tier I/O error;
    /// daemons lending different slab sizes cannot be mixed. Used by the remote tiers.
    public static func connectAll(tier name: String, servers: [Endpoint], credentials: ClientCredentials, minimumLive: Int,
                                  connectionsPerDaemon: Int, ioTimeout: Double, pollMicroseconds: Int,
                                  transport: TransportMode = .auto, fabricProvider: String? = nil, logger: Logger)
        throws(SpillwayError) -> (clients: [DaemonClient?], welcomes: [Wire.Welcome?], slabSize: Int)
    {
        var clients: [DaemonClient?] = []
        var welcomes: [Wire.Welcome?] = []
        for endpoint in servers {
            do {
                let client = try DaemonClient(endpoint: endpoint, credentials: credentials, maxConnections: connectionsPerDaemon,
                                              ioTimeout: ioTimeout, pollMicroseconds: pollMicroseconds, transport: transport,
                                              fabricProvider: fabricProvider, logger: logger)
                clients.append(client)
                welcomes.append(client.welcome)
            } catch {
                if case .transportUnavailable(let reason) = error {
                    throw .invalidConfiguration("tier '\(name)': \(reason)")
                }
                if case .refused(let reply) = error, reply.code == .authenticationFailed || reply.code == .authenticationRequired {
                    throw .invalidConfiguration("tier '\(name)': daemon \(endpoint) refused the credentials: \(reply.message)")
                }
                logger.error("daemon unreachable; continuing without it", metadata: ["tier": "\(name)", "daemon": "\(endpoint)", "error": "\(error)"])
                clients.append(nil)
                welcomes.append(nil)
            }
        }
        let live = welcomes.compactMap { $0 }
        guard live.count >= max(1, minimumLive), let first = live.first else {
            throw .tierIO(tier: name, operation: "connect to \(max(1, minimumLive)) of \(servers.map(\.description).joined(separator: ","))",
                          errno: ECONNREFUSED)
        }
        guard live.allSatisfy({ $0.slabSize == first.slabSize }) else {
            throw .invalidConfiguration("tier '\(name)': the daemons lend slabs of different sizes")
        }
        return (clients, welcomes, Int(first.slabSize))
    }

    /// A fresh request id (shifted left 8 by pipelined users, whose low byte names a slot).
    public func nextRequestID() -> UInt64 { nextRequest.loadThenWrappingIncrement(ordering: .relaxed) }

    /// A request without page data whose reply has none either.
    private func call(_ opcode: Opcode, meta: [UInt8]) throws(RemoteError) -> [UInt8] {
        try withConnection { connection throws(RemoteError) in
            let id = nextRequest.loadThenWrappingIncrement(ordering: .relaxed)
            try connection.send(opcode, requestID: id, meta: meta)
            let header = try receiveReply(connection)
            let bytes = try connection.receiveSmall(header)
            guard header.requestID == id else { throw .protocolViolation("reply to \(header.requestID), expected \(id)") }
            if header.opcode == .error { throw .refused(Self.decodeError(bytes)) }
            guard header.opcode == opcode else { throw .protocolViolation("\(header.opcode) reply to \(opcode)") }
            return bytes
        }
    }

    public func mapSlab() throws(RemoteError) -> UInt32 {
        let bytes = try call(.mapSlab, meta: [])
        guard let reply = WireReader.decode(bytes, with: Wire.MapReply.decode) else {
            throw .protocolViolation("map reply of \(bytes.count) bytes")
        }
        if reply.hasGrant, let rma {
            rma.setGrant(FabricRegionGrant(base: reply.grantBase, length: Int(reply.grantLength), key: reply.grantKey), for: reply.slab)
        }
        return reply.slab
    }

    public func unmapSlab(_ slab: UInt32) throws(RemoteError) {
        rma?.setGrant(nil, for: slab)
        _ = try call(.unmapSlab, meta: Wire.encodeSlab(slab))
    }

    /// The grant the daemon handed out for `slab` (RMA negotiated and the slab registered).
    public func rmaGrant(for slab: UInt32) -> FabricRegionGrant? { rma?.grant(for: slab) }

    public func heartbeat() throws(RemoteError) {
        _ = try call(.heartbeat, meta: [])
    }

    /// A tier's liveness check: nil while the daemon answers, else why it counts as dead
    /// (no answer, or it said goodbye / a connection failed). A refused ping is an answer.
    public func ping() -> String? {
        do {
            try heartbeat()
        } catch {
            if case .refused = error {} else { return "heartbeat: \(error)" }
        }
        return failed.load(ordering: .relaxed) ? "daemon said goodbye or its connection failed" : nil
    }

    /// Test-only: asks a daemon started with `--enable-test-faults` to flip the bytes of a
    /// range of one of our slabs.
    public func corruptForTest(slab: UInt32, offset: UInt64, length: Int) throws(RemoteError) {
        var writer = WireWriter()
        Wire.SlabRange(slab: slab, offset: offset, length: UInt32(length)).encode(into: &writer)
        _ = try call(.corruptForTest, meta: writer.bytes)
    }

    /// The daemon's `stats` JSON.
    public func stats() throws(RemoteError) -> String {
        String(decoding: try call(.stats, meta: []), as: UTF8.self)
    }

    /// Runs `operations` pipelined on one connection, at most `window` in flight; replies are
    /// matched by request id (in any order), read data lands straight in each operation's
    /// buffer and is checked against the frame's CRC32C. Each operation gets a status: 0, the
    /// errno of a refusal, or, if the connection fails, the connection's errno (for those not
    /// completed). Returns the connection error, if any.
    ///
    /// With RMA negotiated, pages move by `fi_read`/`fi_write` (`RMAChannel`); what the fabric
    /// cannot do (no grant, or a fabric failure such as a revoked key) goes over TCP, whose
    /// answer gives the operation its typed status.
    @discardableResult
    public func execute(_ operations: UnsafeMutableBufferPointer<RemoteOperation>, window: Int = 32) -> RemoteError? {
        guard !operations.isEmpty else { return nil }
        guard let rma else { return executeTCP(operations, window: window) }
        var retry: [Int] = []
        rma.execute(operations, retry: &retry)
        guard !retry.isEmpty else { return nil }
        let again = UnsafeMutableBufferPointer<RemoteOperation>.allocate(capacity: retry.count)
        defer { again.deallocate() }
        for (position, index) in retry.enumerated() { again.initializeElement(at: position, to: operations[index]) }
        let failure = executeTCP(again, window: window)
        for (position, index) in retry.enumerated() { operations[index].status = again[position].status }
        return failure
    }

    /// Whether page I/O to this daemon goes over RMA (the multi-daemon exchange, which
    /// pipelines TCP frames, leaves such daemons to `execute`).
    public var usesRMA: Bool { rma != nil }

    /// `execute` over Spillway's TCP protocol: the operations go out as `PageFrames` (runs of
    /// one kind batched into one frame), at most `window` frames in flight.
    func executeTCP(_ operations: UnsafeMutableBufferPointer<RemoteOperation>, window: Int = 32) -> RemoteError? {
        guard !operations.isEmpty else { return nil }
        let window = max(1, min(window, 256))
        // Not yet answered: an operation the connection fails under must be told apart from
        // one acknowledged before the failure (that one keeps its status 0).
        for index in 0..<operations.count { operations[index].status = Self.unanswered }
        do {
            try withConnection { connection throws(RemoteError) in
                try ExchangeScratch.withCurrent(legs: 1, window: window) { scratch throws(RemoteError) in
                    let slots = scratch.slots
                    var next = 0
                    var inFlight = 0
                    func start(_ slot: Int) throws(RemoteError) {
                        let end = PageFrames.frameEnd(operations, from: next)
                        // The low byte names the slot, so a reply finds its slot without a scan.
                        let id = nextRequest.loadThenWrappingIncrement(ordering: .relaxed) << 8 | UInt64(slot)
                        slots[slot] = ExchangeScratch.Slot(id: id, start: next, end: end)
                        try PageFrames.send(operations, next..<end, id: id, on: connection, meta: scratch.meta)
                        next = end
                    }
                    while inFlight < window && next < operations.count {
                        try start(inFlight)
                        inFlight += 1
                    }
                    while inFlight > 0 {
                        let header = try receiveReply(connection)
                        let slot = Int(header.requestID & 0xFF)
                        guard slot < window, slots[slot].id == header.requestID, slots[slot].start >= 0
                        else { throw .protocolViolation("reply to unknown request \(header.requestID)") }
                        try PageFrames.complete(header, on: connection, operations, slots[slot].start..<slots[slot].end)
                        slots[slot].start = -1
                        inFlight -= 1
                        if next < operations.count {
                            try start(slot)
                            inFlight += 1
                        }
                    }
                }
            }
            return nil
        } catch {
            // Everything not known to have completed fails with the connection's errno.
            for index in 0..<operations.count where operations[index].status == Self.unanswered {
                operations[index].status = error.errno == 0 ? EIO : error.errno
            }
            logger.warning("daemon connection failed", metadata: ["daemon": "\(endpoint)", "error": "\(error)"])
            return error
        }
    }

    /// The status of an operation sent but not answered yet (never an errno).
    static let unanswered: Int32 = -1

    /// Closes every idle connection.
    public func close() {
        pool.withLock { pool in
            for connection in pool.idle { connection.socket.close() }
            pool.open -= pool.idle.count
            pool.idle.removeAll()
        }
    }
}

