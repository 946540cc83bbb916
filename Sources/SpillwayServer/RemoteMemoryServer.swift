import Atomics
import Logging
import SpillwayCore
import SpillwayFabric
import SpillwayProtocol
import SpillwayRemote

#if canImport(Glibc)
import Glibc
#endif

/// `spillwayd`'s engine: lends DRAM in slabs to authenticated tenants over TCP.
///
/// - **Slab table** (`SlabTable`): one reservation of `capacity` bytes cut into fixed slots at
///   start; owner (an integer tenant id) and slab id (slot + generation) in one atomic word
///   per slot. The page path checks that word and the range's bounds and copies — no lock.
///   Mapping, unmapping, reclaim and leases take the server's lock (`state`).
/// - **Event-driven connections** (`Worker`): a fixed pool of `min(cores, 8)` threads, each
///   with its own epoll set; connections are assigned round robin by the accept thread.
///   Sockets are non-blocking; input is bounded (a frame's header and meta, at most the
///   protocol's limits; a write's data lands straight in the slab); replies queue, page data
///   straight from pinned slabs, and a peer that stops reading is not read from and, after
///   `sendTimeout`, cut off. Notices (reclaim, goodbye) are posted to the worker and never wait.
/// - Every client authenticates (HMAC challenge–response; with the mutual capability the daemon
///   proves the token too). A handshake has a total deadline, and unauthenticated connections
///   have their own small quota whose oldest member a newcomer evicts.
/// - Slab memory is zero-filled by the kernel when lent (a returned slab's pages are dropped
///   with `MADV_DONTNEED`), so no tenant can read another's old bytes, and memory is only used
///   while lent. A tenant's token-file SIZE caps the slabs it may hold.
/// - A tenant without connections keeps its slabs for `lease` seconds.
/// - Below `headroom` of MemAvailable the daemon sends reclaim notices and revokes the slabs
///   of clients that miss the deadline (the janitor thread).
///
/// `@unchecked Sendable`: mutable state lives in `state` (its lock), atomics, and the workers.
public final class RemoteMemoryServer: @unchecked Sendable {
    public let configuration: DaemonConfiguration
    public let counters = DaemonCounters()
    /// The worker busy-polling right now (-1: none); see `Worker.run`.
    let poller = ManagedAtomic<Int>(-1)
    /// Test faults only: delay before each page request is served (a slow daemon); starts at
    /// `configuration.testDelayMicroseconds` (which `spillwayd` accepts only with
    /// `--enable-test-faults`); in-process tests and benchmarks may change it while running.
    /// The connection waits; its worker serves others meanwhile.
    public let testDelayMicroseconds = ManagedAtomic<Int>(0)
    public let instance = UInt64.random(in: 1 ... .max)
    let logger: Logger
    let slabs: SlabTable
    private var listener: TCPSocket?
    private let stopping = ManagedAtomic<Bool>(false)
    private let state: Locked<ServerState>
    private var acceptThread: BackgroundThread?
    private var janitorThread: BackgroundThread?
    private var workers: [Worker] = []
    /// The libfabric endpoint RMA clients read and write slabs through (nil: TCP only), and
    /// the thread that keeps it progressing.
    public private(set) var fabric: FabricEndpoint?
    private var fabricProgress: FabricProgressThread?
    /// The provider's core name as asked for (`tcp`, `verbs`; libfabric reports `tcp;ofi_rxm`).
    private var fabricProviderName = ""
    /// Why RMA is or is not served (logged at start, in `stats`).
    public private(set) var transportReason = "not started"

    /// What the lock keeps about a slot (the page path reads only the slot's atomic word).
    struct SlotInfo {
        var lent = false
        var tenant: UInt32 = 0
        var slab: UInt32 = 0
        var generation: UInt32 = 0
        var reclaimDeadline: Double?
        var mappedAt: Double = 0
        /// The slab's memory region for its tenant (RMA), closed when the slab is retired.
        var region: FabricMemoryRegion?
    }

    struct Tenant {
        let id: UInt32
        var slabs: Set<UInt32> = []
        var connections: [ObjectIdentifier: Connection] = [:]
        var disconnectedAt: Double?
        let counters = TenantCounters()
    }

    struct ServerState {
        var slots: [SlotInfo]
        /// Free slots (a stack), and retired ones a reply or write still pins.
        var free: [Int]
        var draining: [Int] = []
        /// Slabs lent to tenants (what `stats` reports as lent).
        var lentSlabs = 0
        var pending: [ObjectIdentifier: Connection] = [:]
        var tokens: TokenFile
        var tenants: [String: Tenant] = [:]
        /// Integer ids of tenant names (stable for the daemon's life; 0 is nobody).
        var tenantIDs: [String: UInt32] = [:]
        var tenantNames: [String] = []
        var connections: [ObjectIdentifier: Connection] = [:]
        var revokedFor: [String: Set<UInt32>] = [:]
        /// Maintenance drain (`beginMaintenanceDrain`): since when (nil: not draining), and when
        /// the tenants were last asked to move their slabs.
        var maintenanceSince: Double?
        var maintenanceNoticeAt: Double = 0

        mutating func id(of tenant: String) -> UInt32 {
            if let id = tenantIDs[tenant] { return id }
            tenantNames.append(tenant)
            let id = UInt32(tenantNames.count)
            tenantIDs[tenant] = id
            return id
        }

        func name(of id: UInt32) -> String { tenantNames[Int(id) - 1] }
    }

    public init(_ configuration: DaemonConfiguration, logger: Logger = Logger(label: "spillwayd")) throws(SpillwayError) {
        try configuration.validate()
        self.configuration = configuration
        self.logger = logger
        slabs = try SlabTable(capacity: configuration.capacity, slabSize: configuration.slabSize)
        state = Locked(ServerState(slots: Array(repeating: SlotInfo(), count: slabs.count), free: Array((0..<slabs.count).reversed()),
                                   tokens: configuration.tokens))
        testDelayMicroseconds.store(configuration.testDelayMicroseconds, ordering: .relaxed)
    }

    public var totalSlabs: Int { slabs.count }

    /// Credentials of the token file's first tenant: what an in-process client of this daemon
    /// (the CLI's embedded daemons, tests) connects with.
    public var clientCredentials: ClientCredentials { ClientCredentials(tokenFile: state.withLock { $0.tokens }) }

    /// Replaces the tenants (SIGHUP): new tenants are admitted from now on; connections of
    /// tenants no longer in the file are closed at once (their slabs follow the lease rules).
    /// Returns how many connections were closed.
    @discardableResult
    public func reloadTokens(_ tokens: TokenFile, counted: Bool = true) -> Int {
        let closed = state.withLock { state -> Int in
            state.tokens = tokens
            var closed = 0
            for (name, tenant) in state.tenants where tokens.tokens[name] == nil {
                for connection in tenant.connections.values where connection.open {
                    connection.socket.shutdown()
                    closed += 1
                }
            }
            return closed
        }
        guard counted else { return closed }
        counters.tokenReloads.wrappingIncrement(ordering: .relaxed)
        counters.removedTenantConnections.wrappingIncrement(by: closed, ordering: .relaxed)
        logger.notice("token file reloaded", metadata: ["tenants": "\(tokens.names.count)", "closed_connections": "\(closed)"])
        return closed
    }

    /// The port actually bound (after `start` on port 0).
    public private(set) var port: UInt16 = 0

    /// Binds and starts serving on background threads.
    public func start() throws(SpillwayError) {
        raiseDescriptorLimit()
        let socket: TCPSocket
        do {
            socket = try TCPSocket.listen(on: configuration.listen, backlog: 1024)
        } catch {
            throw .invalidConfiguration("cannot listen on \(configuration.listen): \(error)")
        }
        listener = socket
        port = socket.localPort
        for index in 0..<configuration.workerCount { workers.append(try Worker(index: index, server: self)) }
        for worker in workers { worker.start() }
        try openFabric()
        let transport = fabric == nil ? "tcp" : "tcp+rma(\(fabric!.provider.name))"
        logger.info("spillwayd serving", metadata: [
            "listen": "\(configuration.listen.host):\(port)", "capacity": "\(ByteCount.format(configuration.capacity))",
            "slab": "\(ByteCount.format(configuration.slabSize))", "transport": "\(transport)", "workers": "\(workers.count)",
            "max_connections": "\(configuration.maxConnections)",
        ])
        acceptThread = BackgroundThread { [self] in acceptLoop(socket) }
        janitorThread = BackgroundThread { [self] in janitorLoop() }
    }

    /// Opens the RMA endpoint per `configuration.transport` / `fabricProvider`, or says why not.
    private func openFabric() throws(SpillwayError) {
        let mode = configuration.transport
        guard mode != .tcp else {
            transportReason = "--transport tcp"
            return
        }
        let named = configuration.fabricProvider
        let candidate = named ?? ["verbs", "efa"].first { FabricProvider.isAvailable($0) }
        guard let candidate else {
            let devices = TransportSelection.rdmaDevices()
            transportReason = devices.isEmpty
                ? "no RDMA device (libibverbs found none) and no libfabric verbs/efa provider; name one with --fabric-provider (e.g. tcp)"
                : "RDMA devices \(devices.joined(separator: ",")) present but libfabric's verbs/efa providers refused them (fi_info)"
            if mode == .rma { throw .invalidConfiguration("--transport rma: \(transportReason)") }
            logger.notice("serving TCP only", metadata: ["reason": "\(transportReason)"])
            return
        }
        do {
            // Bound to the listen address unless that is a wildcard (then the provider picks).
            let host = configuration.listen.host
            let node: String? = host == "0.0.0.0" || host == "::" || host.isEmpty ? nil : host
            let provider = try FabricProvider.discover(provider: candidate, node: node)
            let endpoint = try FabricEndpoint(provider: provider, options: .init(maxInFlight: 64, waitableCompletions: true))
            fabric = endpoint
            fabricProviderName = candidate
            fabricProgress = FabricProgressThread(endpoint: endpoint)
            transportReason = named != nil ? "provider \(candidate) named (--fabric-provider)" : "RDMA provider \(candidate) found"
            logger.notice("serving RMA and TCP", metadata: ["provider": "\(provider.name)", "domain": "\(provider.domainName)",
                                                           "reason": "\(transportReason)"])
        } catch {
            transportReason = "libfabric provider \(candidate) refused: \(error)"
            if mode == .rma { throw .invalidConfiguration("--transport rma: \(transportReason)") }
            logger.warning("serving TCP only", metadata: ["reason": "\(transportReason)"])
        }
    }

    /// Room for `maxConnections` sockets: the soft RLIMIT_NOFILE is raised (up to the hard
    /// limit) if it is lower, with a log line if even the hard limit is too low.
    private func raiseDescriptorLimit() {
        let needed = rlim_t(configuration.maxConnections + 128)
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < needed else { return }
        let wanted = min(needed, limit.rlim_max)
        limit.rlim_cur = wanted
        if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) != 0 || wanted < needed {
            logger.warning("cannot raise the open-file limit to fit --max-connections; raise `ulimit -n` (or LimitNOFILE=)", metadata: [
                "needed": "\(needed)", "soft": "\(limit.rlim_cur)", "hard": "\(limit.rlim_max)",
                "max_connections": "\(configuration.maxConnections)",
            ])
        }
    }

    /// Stops accepting, tells every client (`goodbye`), lets queued replies go out for up to
    /// `drain` seconds, then closes every connection. Never waits on a peer beyond `drain`.
    public func shutdown(drain: Double = 5) {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        acceptThread?.join()
        janitorThread?.join()
        listener?.close()
        var goodbye = WireWriter()
        goodbye.write(string: "daemon shutting down")
        for connection in state.withLock({ Array($0.connections.values) }) {
            workers[connection.worker].post(.notice(connection, .goodbye, goodbye.bytes))
        }
        let deadline = Self.now() + drain
        for worker in workers { worker.post(.stop(deadline: deadline)) }
        for worker in workers { worker.join() }
        workers.removeAll()
        fabricProgress?.stop()
        state.withLock { state in
            for index in state.slots.indices {
                state.slots[index].region?.close()
                state.slots[index].region = nil
            }
        }
        logger.info("spillwayd stopped")
    }

    /// Monotonic seconds (leases and deadlines).
    static func now() -> Double { Double(monotonicNanoseconds()) / 1e9 }

    // MARK: Accepting

    private func acceptLoop(_ listener: TCPSocket) {
        var next = 0
        var lastAcceptError = -Double.infinity
        let vectors = UnsafeMutableBufferPointer<iovec>.allocate(capacity: 4)
        defer { vectors.deallocate() }
        while !stopping.load(ordering: .relaxed) {
            let accepted: (TCPSocket, Endpoint)?
            do {
                accepted = try listener.accept(timeout: 0.1)
            } catch {
                // Out of descriptors (EMFILE/ENFILE) repeats until a connection closes: logged
                // at most once a second, not once per retry.
                let now = Self.now()
                if now - lastAcceptError >= 1 {
                    lastAcceptError = now
                    logger.error("accept failed", metadata: ["error": "\(error)", "hint": "raise the open-file limit or lower --max-connections"])
                }
                usleep(50_000)
                continue
            }
            guard let (socket, peer) = accepted else { continue }
            let flags = fcntl(socket.descriptor, F_GETFL)
            _ = fcntl(socket.descriptor, F_SETFL, flags | O_NONBLOCK)
            let connection = Connection(socket: socket, peer: peer, acceptedAt: Self.now(), worker: next)
            guard admit(connection) else {
                logger.warning("connection limit reached; refusing", metadata: ["peer": "\(peer)"])
                connection.queue(.error, flags: .notice, requestID: 0,
                                 meta: Wire.ErrorReply(.noCapacity, "connection limit reached").encode())
                _ = connection.flush(vectors: vectors, slabs: slabs)  // best effort, never waits
                socket.close()
                continue
            }
            counters.connections.wrappingIncrement(ordering: .relaxed)
            workers[next].post(.add(connection))
            next = (next + 1) % workers.count
        }
    }

    /// Admits a new connection as unauthenticated. If the unauthenticated quota is full, or
    /// all connections are in use, the oldest unauthenticated connection makes room (shut
    /// down here; its worker closes it): a flood of strangers that never finish a handshake
    /// only ever evicts each other, never a tenant. Refused only when every slot is a tenant's.
    private func admit(_ connection: Connection) -> Bool {
        state.withLock { state in
            if state.pending.count >= configuration.maxUnauthenticated || state.connections.count >= configuration.maxConnections,
               let oldest = state.pending.min(by: { $0.value.acceptedAt < $1.value.acceptedAt })
            {
                state.pending[oldest.key] = nil
                state.connections[oldest.key] = nil
                counters.handshakeEvictions.wrappingIncrement(ordering: .relaxed)
                if oldest.value.open { oldest.value.socket.shutdown() }
            }
            guard state.connections.count < configuration.maxConnections else { return false }
            let id = ObjectIdentifier(connection)
            state.connections[id] = connection
            state.pending[id] = connection
            return true
        }
    }

    /// Cuts off handshakes older than the deadline (a peer trickling bytes resets no timer).
    private func expireHandshakes() {
        let cutoff = Self.now() - configuration.handshakeTimeout
        state.withLock { state in
            for (key, connection) in state.pending where connection.acceptedAt <= cutoff {
                state.pending[key] = nil
                counters.handshakeTimeouts.wrappingIncrement(ordering: .relaxed)
                if connection.open { connection.socket.shutdown() }
            }
        }
    }

    /// The worker closes a connection: it leaves every table (its descriptor is closed next).
    func deregister(_ connection: Connection) {
        state.withLock { state in
            connection.open = false
            let id = ObjectIdentifier(connection)
            state.connections[id] = nil
            state.pending[id] = nil
            if !connection.tenantName.isEmpty, var tenant = state.tenants[connection.tenantName], tenant.connections[id] != nil {
                tenant.connections[id] = nil
                if tenant.connections.isEmpty { tenant.disconnectedAt = Self.now() }
                state.tenants[connection.tenantName] = tenant
            }
        }
    }

    // MARK: Frames

    enum Served { case progress, needMore, paused, closed }

    /// Serves the complete frames buffered on `connection` (one per call). A write's data is
    /// then received by `continueWrite`.
    func serveBuffered(_ connection: Connection) -> Served {
        guard connection.buffered >= WireProtocol.headerSize else { return .needMore }
        let header: FrameHeader
        switch FrameHeader.decode(UnsafeRawBufferPointer(start: connection.input + connection.inputStart, count: WireProtocol.headerSize)) {
        case .success(let decoded): header = decoded
        case .failure(let error):
            counters.malformedFrames.wrappingIncrement(ordering: .relaxed)
            logger.warning("malformed frame; closing", metadata: ["peer": "\(connection.peer)", "error": "\(error)"])
            connection.queue(.error, flags: .response, requestID: 0, meta: Wire.ErrorReply(.malformedFrame, "\(error)").encode())
            connection.closeAfterFlush = true
            return .progress
        }
        let serving: Bool
        if case .serving = connection.phase { serving = true } else { serving = false }
        let isWrite = serving && (header.opcode == .write || header.opcode == .writeBatch)
        // A frame's data goes to a slab only for writes; anything else must fit the input buffer.
        guard isWrite || header.dataLength <= 64 << 10 else {
            refuse(connection, header.requestID, .tooLarge, "unexpected \(header.dataLength) data bytes in a \(header.opcode) frame")
            connection.closeAfterFlush = true
            return .progress
        }
        let needed = WireProtocol.headerSize + header.metaLength + (isWrite ? 0 : header.dataLength)
        if connection.inputCapacity < needed { connection.reserveInput(needed) }
        guard connection.buffered >= needed else { return .needMore }
        if serving, header.opcode == .read || header.opcode == .readBatch || isWrite,
           case let delay = testDelayMicroseconds.load(ordering: .relaxed), delay > 0
        {
            if !connection.delayTaken {
                connection.delayTaken = true
                connection.pausedUntil = monotonicNanoseconds() + UInt64(delay) * 1000
                return .paused
            }
            connection.delayTaken = false
        }
        let base = connection.input + connection.inputStart + WireProtocol.headerSize
        let meta = UnsafeRawBufferPointer(start: base, count: header.metaLength)
        let register = WireChecksum.update(0xFFFF_FFFF, meta)
        if isWrite {
            beginWrite(connection, header, meta: meta, register: register)
            connection.consume(needed)
            return .progress
        }
        let data = UnsafeRawBufferPointer(start: base + header.metaLength, count: header.dataLength)
        let checksumOK = ~WireChecksum.update(register, data) == header.payloadChecksum
        let keep: Bool
        switch connection.phase {
        case .hello: keep = checksumOK && hello(connection, header, meta)
        case .authenticate(let tenant, let nonce, let agreed, let helloID):
            keep = checksumOK && authenticate(connection, header, meta, tenant: tenant, nonce: nonce, agreed: agreed, helloID: helloID)
        case .serving: keep = request(connection, header, meta, checksumOK: checksumOK)
        }
        connection.consume(needed)
        return keep ? .progress : .closed
    }

    /// hello → challenge. False closes the connection.
    private func hello(_ connection: Connection, _ header: FrameHeader, _ meta: UnsafeRawBufferPointer) -> Bool {
        guard header.opcode == .hello else {
            connection.queue(.error, flags: .response, requestID: header.requestID,
                             meta: Wire.ErrorReply(.authenticationRequired, "say hello first").encode())
            connection.closeAfterFlush = true
            logger.notice("handshake failed", metadata: ["peer": "\(connection.peer)", "error": "first frame was \(header.opcode)"])
            return true
        }
        var reader = WireReader(meta)
        guard let hello = Wire.Hello.decode(&reader) else {
            connection.queue(.error, flags: .response, requestID: header.requestID, meta: Wire.ErrorReply(.malformedFrame, "bad hello").encode())
            connection.closeAfterFlush = true
            return true
        }
        // Version: the highest both speak; none in common is a clear refusal naming ours.
        let version = min(hello.maximumVersion, WireProtocol.maximumVersion)
        guard version >= max(hello.minimumVersion, WireProtocol.minimumVersion) else {
            connection.queue(.error, flags: .response, requestID: header.requestID, meta: Wire.ErrorReply(.unsupportedVersion,
                "daemon speaks versions \(WireProtocol.minimumVersion)...\(WireProtocol.maximumVersion), client \(hello.minimumVersion)...\(hello.maximumVersion)").encode())
            connection.closeAfterFlush = true
            return true
        }
        let nonce = Authenticator.nonce()
        // Mutual authentication when the client asks for it; version 1's one-way handshake
        // otherwise (docs/protocol.md). Authentication itself is never optional.
        let served: Wire.Capabilities = fabric == nil ? Wire.Capabilities.supported.subtracting(.rma) : .supported
        let agreed = Wire.Capabilities(rawValue: hello.capabilities).intersection(served)
        connection.queue(.challenge, flags: .response, requestID: header.requestID,
                         meta: Wire.Challenge(version: version, authenticationRequired: true, capabilities: agreed.rawValue,
                                              nonce: nonce).encode())
        connection.phase = .authenticate(tenant: hello.tenant, nonce: nonce, agreed: agreed, helloID: header.requestID)
        return true
    }

    /// authenticate → welcome (the connection now serves its tenant). False closes it.
    private func authenticate(_ connection: Connection, _ header: FrameHeader, _ meta: UnsafeRawBufferPointer, tenant tenantName: String,
                              nonce: [UInt8], agreed: Wire.Capabilities, helloID: UInt64) -> Bool
    {
        var reader = WireReader(meta)
        let proof = header.opcode == .authenticate ? Wire.Authenticate.decode(&reader) : nil
        let tokens = state.withLock { $0.tokens }
        // An unknown tenant is checked against a dummy token, so timing does not say which
        // names exist.
        let token = tokens.tokens[tenantName] ?? Array(repeating: 0, count: 32)
        let expected = Authenticator.proof(token: token, nonce: nonce, tenant: tenantName)
        guard let proof, tokens.tokens[tenantName] != nil, Authenticator.constantTimeEqual(proof.mac, expected),
              agreed.contains(.mutualAuthentication) == (proof.clientNonce != nil)
        else {
            counters.authFailures.wrappingIncrement(ordering: .relaxed)
            logger.warning("authentication failed", metadata: ["peer": "\(connection.peer)", "tenant": "\(tenantName)"])
            connection.queue(.error, flags: .response, requestID: header.requestID,
                             meta: Wire.ErrorReply(.authenticationFailed, "authentication failed").encode())
            connection.closeAfterFlush = true
            return true
        }
        let daemonProof = proof.clientNonce.map {
            Authenticator.daemonProof(token: token, clientNonce: $0, daemonNonce: nonce, tenant: tenantName, instance: instance)
        }
        let admitted = state.withLock { state -> (Wire.Welcome, UInt32, TenantCounters)? in
            // The tenant may have been removed (SIGHUP) while this handshake ran, or the
            // connection cut off meanwhile.
            guard state.tokens.tokens[tenantName] != nil, connection.open else { return nil }
            state.pending[ObjectIdentifier(connection)] = nil
            let id = state.id(of: tenantName)
            var tenant = state.tenants[tenantName] ?? Tenant(id: id)
            tenant.connections[ObjectIdentifier(connection)] = connection
            tenant.disconnectedAt = nil
            state.tenants[tenantName] = tenant
            connection.tenantName = tenantName
            return (Wire.Welcome(slabSize: UInt64(configuration.slabSize), capacity: UInt64(configuration.capacity),
                                 freeSlabs: UInt32(state.free.count), heldSlabs: tenant.slabs.sorted(),
                                 daemonInstance: instance, daemonProof: daemonProof,
                                 fabric: agreed.contains(.rma) ? fabric.map { Wire.FabricAdvert(provider: fabricProviderName, address: $0.address) } : nil),
                    id, tenant.counters)
        }
        guard let (welcome, id, tenantCounters) = admitted else {
            connection.queue(.error, flags: .response, requestID: header.requestID,
                             meta: Wire.ErrorReply(.authenticationFailed, "authentication failed").encode())
            connection.closeAfterFlush = true
            return true
        }
        connection.tenantID = id
        connection.tenantCounters = tenantCounters
        connection.phase = .serving
        connection.rma = agreed.contains(.rma) && fabric != nil
        connection.queue(.welcome, flags: .response, requestID: helloID, meta: welcome.encode())
        logger.debug("client authenticated", metadata: ["peer": "\(connection.peer)", "tenant": "\(tenantName)",
                                                        "mutual": "\(daemonProof != nil)"])
        return true
    }

    /// One request of an authenticated tenant (all but writes). False closes the connection.
    private func request(_ connection: Connection, _ header: FrameHeader, _ meta: UnsafeRawBufferPointer, checksumOK: Bool) -> Bool {
        let id = header.requestID
        let tenant = connection.tenantID
        switch header.opcode {
        case .read, .readBatch:
            guard header.dataLength == 0, checksumOK else {
                refuse(connection, id, .checksumMismatch, "bad payload checksum")
                return true
            }
            var reader = WireReader(meta)
            if header.opcode == .read {
                // The page path: one range, no arrays.
                guard var range = Wire.SlabRange.decode(&reader), reader.remaining == 0 else {
                    refuse(connection, id, .malformedFrame, "bad read fields")
                    return true
                }
                withUnsafeMutablePointer(to: &range) { pointer in
                    serveRead(connection, UnsafeBufferPointer(start: pointer, count: 1), opcode: .read, id: id)
                }
                return true
            }
            let buffer = connection.rangeBuffer
            guard let count = Wire.decodeBatch(&reader, into: buffer), reader.remaining == 0 else {
                refuse(connection, id, .malformedFrame, "bad \(header.opcode) fields")
                return true
            }
            serveReadBatch(connection, UnsafeBufferPointer(start: buffer.baseAddress, count: count), id: id)
            return true
        default: break
        }
        // Control frames: a bad payload checksum breaks the connection (as before the event loop).
        guard checksumOK else {
            counters.malformedFrames.wrappingIncrement(ordering: .relaxed)
            return false
        }
        switch header.opcode {
        case .mapSlab:
            switch mapSlab(for: connection.tenantName, id: tenant, rma: connection.rma) {
            case .success(let reply): connection.queue(.mapSlab, flags: .response, requestID: id, meta: reply.encode())
            case .failure(let reply): refuse(connection, id, reply.code, reply.message)
            }

        case .unmapSlab:
            guard meta.count == 4 else {
                refuse(connection, id, .malformedFrame, "unmap takes a slab id")
                return true
            }
            let slab = UInt32(littleEndian: meta.loadUnaligned(as: UInt32.self))
            if let reply = unmapSlab(slab, tenant: tenant) {
                refuse(connection, id, reply.code, reply.message)
            } else {
                connection.queue(.unmapSlab, flags: .response, requestID: id, meta: [])
            }

        case .heartbeat:
            connection.queue(.heartbeat, flags: .response, requestID: id, meta: [])

        case .stats:
            connection.queue(.stats, flags: .response, requestID: id, meta: Array(statsJSON(for: connection.tenantName).utf8))

        case .corruptForTest:
            guard configuration.enableTestFaults else {
                refuse(connection, id, .unknownOpcode, "test faults are off (spillwayd --enable-test-faults)")
                return true
            }
            var reader = WireReader(meta)
            guard let range = Wire.SlabRange.decode(&reader) else {
                refuse(connection, id, .malformedFrame, "corruptForTest takes a slab range")
                return true
            }
            guard let slot = slabs.pin(range.slab, tenant: tenant) else {
                let reply = refusal(for: range.slab, tenant: tenant, name: connection.tenantName)
                refuse(connection, id, reply.code, reply.message)
                return true
            }
            defer { slabs.unpin(slot) }
            guard slabs.inBounds(offset: range.offset, length: range.length) else {
                refuse(connection, id, .outOfBounds, outOfBoundsMessage(range))
                return true
            }
            let base = slabs.address(slot, Int(range.offset)).assumingMemoryBound(to: UInt8.self)
            for index in 0..<Int(range.length) { base[index] ^= 0xFF }
            logger.warning("test fault: corrupted slab bytes", metadata: ["tenant": "\(connection.tenantName)", "slab": "\(range.slab)",
                                                                       "offset": "\(range.offset)", "length": "\(range.length)"])
            connection.queue(.corruptForTest, flags: .response, requestID: id, meta: [])

        case .hello, .challenge, .authenticate, .welcome, .reclaim, .error, .goodbye, .read, .readBatch, .write, .writeBatch:
            refuse(connection, id, .malformedFrame, "\(header.opcode) is not a request here")
        }
        return true
    }

    /// Queues an error reply and counts it.
    func refuse(_ connection: Connection, _ id: UInt64, _ code: WireErrorCode, _ message: String) {
        count(refusal: code, connection)
        connection.queue(.error, flags: .response, requestID: id, meta: Wire.ErrorReply(code, message).encode())
    }

    /// Counts a refusal (of a whole request, or of one range of a batch).
    private func count(refusal code: WireErrorCode, _ connection: Connection) {
        switch code {
        case .notOwner, .outOfBounds, .unknownSlab, .slabRevoked:
            counters.refusedAccesses.wrappingIncrement(ordering: .relaxed)
            connection.tenantCounters?.refused.wrappingIncrement(ordering: .relaxed)
        case .checksumMismatch: counters.checksumFailures.wrappingIncrement(ordering: .relaxed)
        case .malformedFrame: counters.malformedFrames.wrappingIncrement(ordering: .relaxed)
        default: break
        }
    }

    private func outOfBoundsMessage(_ range: Wire.SlabRange) -> String {
        "range \(range.offset)+\(range.length) is outside slab \(range.slab) (\(configuration.slabSize) bytes)"
    }

    /// Why `tenant` may not touch `slab` (the slow path, after the atomic check failed).
    private func refusal(for slab: UInt32, tenant: UInt32, name: String) -> Wire.ErrorReply {
        state.withLock { state in
            if let index = slabs.index(of: slab), state.slots[index].lent, state.slots[index].slab == slab, state.slots[index].tenant != tenant {
                return Wire.ErrorReply(.notOwner, "slab \(slab) belongs to another tenant")
            }
            if state.revokedFor[name]?.contains(slab) == true {
                return Wire.ErrorReply(.slabRevoked, "slab \(slab) was reclaimed")
            }
            return Wire.ErrorReply(.unknownSlab, "no slab \(slab)")
        }
    }

    enum PinnedRange {
        case pinned(Connection.Target)
        case refused(WireErrorCode)
    }

    /// Pins one range's slot after the owner and bounds checks, or says which refused it
    /// (then nothing stays pinned).
    private func pinRange(_ connection: Connection, _ range: Wire.SlabRange) -> PinnedRange {
        guard let slot = slabs.pin(range.slab, tenant: connection.tenantID) else {
            return .refused(refusal(for: range.slab, tenant: connection.tenantID, name: connection.tenantName).code)
        }
        guard slabs.inBounds(offset: range.offset, length: range.length) else {
            slabs.unpin(slot)
            return .refused(.outOfBounds)
        }
        return .pinned(Connection.Target(slot: slot, pointer: slabs.address(slot, Int(range.offset)), length: Int(range.length)))
    }

    /// A batch's ranges, each on its own: a served range's slot is pinned into
    /// `connection.targets`, a refused one gets a target with slot -1 (its bytes, for a write,
    /// are dropped) and its code in `connection.statusBuffer` (0 = served). Returns how many
    /// were served. One bad range never fails the others (a reclaimed slab among several).
    private func pinBatch(_ connection: Connection, _ ranges: UnsafeBufferPointer<Wire.SlabRange>) -> Int {
        connection.targets.removeAll(keepingCapacity: true)
        let statuses = connection.statusBuffer
        var served = 0
        for (index, range) in ranges.enumerated() {
            switch pinRange(connection, range) {
            case .pinned(let target):
                connection.targets.append(target)
                statuses[index] = 0
                served += 1
            case .refused(let code):
                count(refusal: code, connection)
                connection.targets.append(Connection.Target(slot: -1, pointer: connection.input, length: Int(range.length)))
                statuses[index] = UInt8(truncatingIfNeeded: code.rawValue)
            }
        }
        return served
    }

    /// Pins every range's slot into `connection.targets` after the owner and bounds checks;
    /// the refusal if any fails (then nothing stays pinned).
    private func pinRanges(_ connection: Connection, _ ranges: UnsafeBufferPointer<Wire.SlabRange>) -> Wire.ErrorReply? {
        connection.targets.removeAll(keepingCapacity: true)
        for range in ranges {
            guard let slot = slabs.pin(range.slab, tenant: connection.tenantID) else {
                for target in connection.targets { slabs.unpin(target.slot) }
                connection.targets.removeAll(keepingCapacity: true)
                return refusal(for: range.slab, tenant: connection.tenantID, name: connection.tenantName)
            }
            guard slabs.inBounds(offset: range.offset, length: range.length) else {
                slabs.unpin(slot)
                for target in connection.targets { slabs.unpin(target.slot) }
                connection.targets.removeAll(keepingCapacity: true)
                return Wire.ErrorReply(.outOfBounds, outOfBoundsMessage(range))
            }
            connection.targets.append(Connection.Target(slot: slot, pointer: slabs.address(slot, Int(range.offset)), length: Int(range.length)))
        }
        return nil
    }

    /// A batched read: the reply's meta holds one status byte per range (0 = served, else the
    /// `WireErrorCode` that refused it) and its data the served ranges' bytes, in order.
    private func serveReadBatch(_ connection: Connection, _ ranges: UnsafeBufferPointer<Wire.SlabRange>, id: UInt64) {
        // `decodeBatch` bounds the count and the total length.
        let served = pinBatch(connection, ranges)
        let statuses = UnsafeRawBufferPointer(start: connection.statusBuffer, count: ranges.count)
        var register = WireChecksum.update(0xFFFF_FFFF, statuses)
        var total = 0
        for target in connection.targets where target.slot >= 0 {
            register = WireChecksum.update(register, UnsafeRawBufferPointer(start: target.pointer, count: target.length))
            total += target.length
        }
        counters.reads.wrappingIncrement(by: served, ordering: .relaxed)
        counters.bytesRead.wrappingIncrement(by: total, ordering: .relaxed)
        connection.tenantCounters?.reads.wrappingIncrement(by: served, ordering: .relaxed)
        connection.tenantCounters?.bytesRead.wrappingIncrement(by: total, ordering: .relaxed)
        connection.queueDataHeader(.readBatch, requestID: id, meta: statuses, dataLength: total, checksum: ~register)
        for target in connection.targets where target.slot >= 0 {
            if target.length > 0 {
                connection.queueData(slot: target.slot, pointer: target.pointer, length: target.length)
            } else {
                slabs.unpin(target.slot)
            }
        }
        connection.targets.removeAll(keepingCapacity: true)
    }

    private func serveRead(_ connection: Connection, _ ranges: UnsafeBufferPointer<Wire.SlabRange>, opcode: Opcode, id: UInt64) {
        var total = 0
        for range in ranges { total += Int(range.length) }
        guard total <= WireProtocol.maxDataLength else {
            refuse(connection, id, .tooLarge, "read of \(total) bytes exceeds \(WireProtocol.maxDataLength)")
            return
        }
        if let reply = pinRanges(connection, ranges) {
            refuse(connection, id, reply.code, reply.message)
            return
        }
        var register: UInt32 = 0xFFFF_FFFF
        for target in connection.targets {
            register = WireChecksum.update(register, UnsafeRawBufferPointer(start: target.pointer, count: target.length))
        }
        // Counted before the reply, so whoever saw it also sees the count.
        counters.reads.wrappingIncrement(by: ranges.count, ordering: .relaxed)
        counters.bytesRead.wrappingIncrement(by: total, ordering: .relaxed)
        connection.tenantCounters?.reads.wrappingIncrement(by: ranges.count, ordering: .relaxed)
        connection.tenantCounters?.bytesRead.wrappingIncrement(by: total, ordering: .relaxed)
        connection.queueDataHeader(opcode, requestID: id, dataLength: total, checksum: ~register)
        // Page data goes out straight from the slabs; each stays pinned until it is sent.
        for target in connection.targets {
            if target.length > 0 {
                connection.queueData(slot: target.slot, pointer: target.pointer, length: target.length)
            } else {
                slabs.unpin(target.slot)
            }
        }
        connection.targets.removeAll(keepingCapacity: true)
    }

    // MARK: Writes

    /// A write's header and meta are in: checks and pins its ranges; its data follows.
    private func beginWrite(_ connection: Connection, _ header: FrameHeader, meta: UnsafeRawBufferPointer, register: UInt32) {
        var reader = WireReader(meta)
        var refusal: Wire.ErrorReply?
        var count = 1
        var served = 1
        if header.opcode == .write {
            if var range = Wire.SlabRange.decode(&reader), reader.remaining == 0, Int(range.length) == header.dataLength {
                refusal = withUnsafeMutablePointer(to: &range) { pinRanges(connection, UnsafeBufferPointer(start: $0, count: 1)) }
            } else {
                refusal = Wire.ErrorReply(.malformedFrame, "bad write fields")
            }
        } else if case let buffer = connection.rangeBuffer, let decoded = Wire.decodeBatch(&reader, into: buffer), reader.remaining == 0,
                  case let ranges = UnsafeBufferPointer(start: buffer.baseAddress, count: decoded),
                  ranges.reduce(0, { $0 + Int($1.length) }) == header.dataLength
        {
            count = decoded
            served = pinBatch(connection, ranges)
        } else {
            refusal = Wire.ErrorReply(.malformedFrame, "bad \(header.opcode) fields")
        }
        connection.lastInput = Self.now()
        connection.write = Connection.WriteInProgress(opcode: header.opcode, requestID: header.requestID, dataLength: header.dataLength,
                                                      payloadChecksum: header.payloadChecksum, register: register, refusal: refusal,
                                                      ranges: count, served: served)
    }

    enum WriteProgress { case done, needMore, closed }

    /// Receives a write's data: buffered bytes first, then straight into the slab (or dropped,
    /// for a refused write); answers once all of it is in.
    func continueWrite(_ connection: Connection) -> WriteProgress {
        guard var write = connection.write else { return .done }
        while write.received < write.dataLength {
            let remaining = write.dataLength - write.received
            if connection.buffered > 0 {
                let count = min(remaining, connection.buffered)
                if write.refusal == nil { land(connection, &write, from: connection.input + connection.inputStart, count: count) }
                connection.consume(count)
                write.received += count
                continue
            }
            // Nothing buffered: receive straight into the slab (or into the buffer, to drop).
            let destination: UnsafeMutableRawPointer
            let room: Int
            if write.refusal == nil {
                while connection.targets[write.target].length == write.targetOffset {
                    write.target += 1
                    write.targetOffset = 0
                }
                let target = connection.targets[write.target]
                if target.slot >= 0 {
                    destination = target.pointer + write.targetOffset
                    room = target.length - write.targetOffset
                } else {
                    // A refused range of a batch: its bytes go to the input buffer, dropped.
                    destination = connection.input
                    room = min(target.length - write.targetOffset, connection.inputCapacity)
                }
            } else {
                destination = connection.input
                room = min(remaining, connection.inputCapacity)
            }
            let got = recv(connection.descriptor, destination, room, Int32(MSG_DONTWAIT))
            if got < 0 {
                if errno == EINTR { continue }
                connection.write = write
                return errno == EAGAIN || errno == EWOULDBLOCK ? .needMore : .closed
            }
            if got == 0 {
                connection.write = write
                return .closed
            }
            connection.lastInput = Self.now()
            if write.refusal == nil {
                // The CRC runs as bytes land (dropped ones included), so it covers the frame.
                write.register = WireChecksum.update(write.register, UnsafeRawBufferPointer(start: destination, count: got))
                write.targetOffset += got
            }
            write.received += got
        }
        let finished = write
        connection.write = nil
        if let refusal = finished.refusal {
            refuse(connection, finished.requestID, refusal.code, refusal.message)
            return .done
        }
        // The bytes landed before their CRC32C is checked; a mismatch is refused, and the client
        // never makes that location visible (it writes fresh locations and publishes only
        // acknowledged ones).
        var written = 0
        for target in connection.targets where target.slot >= 0 {
            written += target.length
            slabs.unpin(target.slot)
        }
        connection.targets.removeAll(keepingCapacity: true)
        guard ~finished.register == finished.payloadChecksum else {
            refuse(connection, finished.requestID, .checksumMismatch, "payload CRC32C mismatch")
            return .done
        }
        // Counted before the acknowledgement, so whoever saw it also sees the count.
        counters.writes.wrappingIncrement(by: finished.served, ordering: .relaxed)
        counters.bytesWritten.wrappingIncrement(by: written, ordering: .relaxed)
        connection.tenantCounters?.writes.wrappingIncrement(by: finished.served, ordering: .relaxed)
        connection.tenantCounters?.bytesWritten.wrappingIncrement(by: written, ordering: .relaxed)
        // A batched write answers with one status byte per range (0 = written).
        let statuses = finished.opcode == .writeBatch ? UnsafeRawBufferPointer(start: connection.statusBuffer, count: finished.ranges)
            : UnsafeRawBufferPointer(start: nil, count: 0)
        connection.queue(finished.opcode, flags: .response, requestID: finished.requestID, meta: statuses)
        return .done
    }

    /// Copies `count` received bytes to the write's targets, in order.
    private func land(_ connection: Connection, _ write: inout Connection.WriteInProgress, from source: UnsafeMutableRawPointer, count: Int) {
        var source = source
        var left = count
        while left > 0 {
            while connection.targets[write.target].length == write.targetOffset {
                write.target += 1
                write.targetOffset = 0
            }
            let target = connection.targets[write.target]
            let piece = min(left, target.length - write.targetOffset)
            write.register = WireChecksum.update(write.register, UnsafeRawBufferPointer(start: source, count: piece))
            if target.slot >= 0 { memcpy(target.pointer + write.targetOffset, source, piece) }
            write.targetOffset += piece
            source += piece
            left -= piece
        }
    }

    // MARK: Slabs

    private func mapSlab(for tenant: String, id: UInt32, rma: Bool) -> Result<Wire.MapReply, Wire.ErrorReply> {
        state.withLock { state in
            sweepDraining(&state)
            guard state.maintenanceSince == nil else {
                return .failure(Wire.ErrorReply(.noCapacity, "the daemon is draining for maintenance: it lends no new slabs"))
            }
            // Free, not merely unlent: a retired slab that a reply still pins holds memory too.
            guard let index = state.free.last else {
                return .failure(Wire.ErrorReply(.noCapacity, "all \(totalSlabs) slabs are lent"))
            }
            let held = state.tenants[tenant]?.slabs.count ?? 0
            // Every slab a tenant holds is listed in its welcome, which must fit in one frame.
            guard held < Wire.Welcome.maxHeldSlabs else {
                return .failure(Wire.ErrorReply(.noCapacity, "a tenant may hold at most \(Wire.Welcome.maxHeldSlabs) slabs of one daemon"))
            }
            if let limit = state.tokens.limits[tenant], (held + 1) * configuration.slabSize > limit {
                return .failure(Wire.ErrorReply(.noCapacity,
                    "tenant '\(tenant)' is at its limit of \(ByteCount.format(limit)) on this daemon (token file): it holds \(held) slabs of \(ByteCount.format(configuration.slabSize))"))
            }
            state.free.removeLast()
            var generation = state.slots[index].generation &+ 1
            if generation == 0 || generation > slabs.maxGeneration { generation = 1 }
            let slab = slabs.slabID(index: index, generation: generation)
            state.slots[index] = SlotInfo(lent: true, tenant: id, slab: slab, generation: generation, mappedAt: Self.now())
            slabs.lend(index, slab: slab, tenant: id)
            state.lentSlabs += 1
            state.tenants[tenant, default: Tenant(id: id)].slabs.insert(slab)
            // RMA: a region of this slab for this tenant, registered only now (after
            // authentication) and closed when the slab is retired, so its key dies with the
            // mapping. Registration failing leaves the slab on the TCP path.
            guard rma, let fabric else { return .success(Wire.MapReply(slab: slab)) }
            do {
                let region = try fabric.register(UnsafeMutableRawBufferPointer(start: slabs.address(index, 0), count: configuration.slabSize),
                                                 access: .remote)
                state.slots[index].region = region
                let grant = region.grant
                return .success(Wire.MapReply(slab: slab, grant: (grant.base, UInt64(grant.length), grant.key)))
            } catch {
                logger.warning("slab registration failed; this slab is served over TCP only", metadata: [
                    "tenant": "\(tenant)", "slab": "\(slab)", "error": "\(error)"])
                return .success(Wire.MapReply(slab: slab))
            }
        }
    }

    private func unmapSlab(_ slab: UInt32, tenant: UInt32) -> Wire.ErrorReply? {
        state.withLock { state in
            guard let index = slabs.index(of: slab), state.slots[index].lent, state.slots[index].slab == slab else {
                return Wire.ErrorReply(.unknownSlab, "no slab \(slab)")
            }
            guard state.slots[index].tenant == tenant else { return Wire.ErrorReply(.notOwner, "slab \(slab) belongs to another tenant") }
            retire(index, in: &state)
            return nil
        }
    }

    /// Takes a slot out of service: free now, or once the replies and writes pinning it end.
    private func retire(_ index: Int, in state: inout ServerState) {
        guard state.slots[index].lent else { return }
        let info = state.slots[index]
        state.slots[index].lent = false
        state.slots[index].reclaimDeadline = nil
        // Revoke the tenant's key before the pages can go to anyone else.
        state.slots[index].region?.close()
        state.slots[index].region = nil
        state.lentSlabs -= 1
        state.tenants[state.name(of: info.tenant)]?.slabs.remove(info.slab)
        if slabs.retire(index) {
            state.free.append(index)
        } else {
            state.draining.append(index)
        }
    }

    private func sweepDraining(_ state: inout ServerState) {
        guard !state.draining.isEmpty else { return }
        var still: [Int] = []
        for index in state.draining {
            if slabs.drained(index) { state.free.append(index) } else { still.append(index) }
        }
        state.draining = still
    }

    // MARK: Leases, reclaim

    private func janitorLoop() {
        while !stopping.load(ordering: .relaxed) {
            usleep(UInt32(configuration.checkInterval * 1_000_000))
            expireHandshakes()
            state.withLock { sweepDraining(&$0) }
            expireLeases()
            enforceDeadlines()
            if configuration.headroom > 0 { checkHeadroom() }
            remindDrainingTenants()
        }
    }

    // MARK: Maintenance drain

    /// Starts a maintenance drain (an operator's `spillway cluster drain`, seen through the
    /// registry): the daemon lends no new slab and asks every tenant to move each slab it
    /// holds elsewhere (a reclaim notice per slab, repeated every `drainReminder` seconds for
    /// the slabs still lent). Unlike a memory-pressure reclaim nothing is revoked: the pages
    /// stay served until their tenant has moved them, so a drain loses nothing. The daemon is
    /// empty (`maintenanceDrained`) once no slab is lent. Idempotent.
    public func beginMaintenanceDrain() {
        let started = state.withLock { state -> Bool in
            guard state.maintenanceSince == nil else { return false }
            state.maintenanceSince = Self.now()
            state.maintenanceNoticeAt = 0
            return true
        }
        guard started else { return }
        logger.notice("maintenance drain: lending no new slabs; asking tenants to move theirs", metadata: [
            "slabs_lent": "\(snapshot().slabsLent)"])
        remindDrainingTenants()
    }

    /// Seconds between the reminders a maintenance drain sends for slabs still lent.
    static let drainReminder: Double = 5

    /// Whether a maintenance drain is under way, and whether it is done (no slab lent).
    public var maintenanceDraining: Bool { state.withLock { $0.maintenanceSince != nil } }
    public var maintenanceDrained: Bool { state.withLock { $0.maintenanceSince != nil && $0.lentSlabs == 0 } }

    /// During a maintenance drain: a reclaim notice for every slab still lent, at most every
    /// `drainReminder` seconds (a tenant that had nowhere to move it may have room now).
    private func remindDrainingTenants() {
        let now = Self.now()
        let notices: [(Connection, UInt32)] = state.withLock { state in
            guard state.maintenanceSince != nil, now - state.maintenanceNoticeAt >= Self.drainReminder else { return [] }
            state.maintenanceNoticeAt = now
            var notices: [(Connection, UInt32)] = []
            for slot in state.slots where slot.lent {
                if let connection = state.tenants[state.name(of: slot.tenant)]?.connections.values.first {
                    notices.append((connection, slot.slab))
                }
            }
            return notices
        }
        for (connection, slab) in notices where !stopping.load(ordering: .relaxed) {
            counters.reclaimNotices.wrappingIncrement(ordering: .relaxed)
            // The deadline the notice names is advisory here: a drain never revokes.
            let notice = Wire.Reclaim(slab: slab, deadlineMilliseconds: UInt32(Self.drainReminder * 1000))
            workers[connection.worker].post(.notice(connection, .reclaim, notice.encode()))
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
                for slab in tenant.slabs {
                    if let index = slabs.index(of: slab) { retire(index, in: &state) }
                }
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
                for index in state.slots.indices where state.slots[index].lent && state.slots[index].reclaimDeadline != nil {
                    state.slots[index].reclaimDeadline = nil
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
            for index in state.slots.indices where state.slots[index].lent {
                guard let deadline = state.slots[index].reclaimDeadline, now >= deadline else { continue }
                let info = state.slots[index]
                let owner = state.name(of: info.tenant)
                logger.warning("reclaim deadline missed; revoking slab", metadata: ["tenant": "\(owner)", "slab": "\(info.slab)"])
                counters.revokedSlabs.wrappingIncrement(ordering: .relaxed)
                state.revokedFor[owner, default: []].insert(info.slab)
                retire(index, in: &state)
            }
        }
    }

    /// MemAvailable from `memoryInfoPath`, in bytes.
    func availableMemory() -> Int? { MemoryInfo.read("MemAvailable:", from: configuration.memoryInfoPath) }

    /// Below headroom: ask owners to give back enough slabs (newest first), each with a deadline.
    private func checkHeadroom() {
        guard let available = availableMemory(), available < configuration.headroom else { return }
        let shortfall = configuration.headroom - available
        let now = Self.now()
        let notices: [(Connection?, UInt32)] = state.withLock { state in
            let pending = state.slots.filter { $0.lent && $0.reclaimDeadline != nil }.count * configuration.slabSize
            guard pending < shortfall else { return [] }
            var needed = shortfall - pending
            var chosen: [(Connection?, UInt32)] = []
            let candidates = state.slots.indices.filter { state.slots[$0].lent && state.slots[$0].reclaimDeadline == nil }
                .sorted { state.slots[$0].mappedAt > state.slots[$1].mappedAt }
            for index in candidates where needed > 0 {
                state.slots[index].reclaimDeadline = now + configuration.reclaimDeadline
                let info = state.slots[index]
                chosen.append((state.tenants[state.name(of: info.tenant)]?.connections.values.first, info.slab))
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
            // Never waits on the tenant: its worker queues the notice unless the tenant's queue
            // is full (then it is missed and the deadline revokes the slab).
            if let connection, !stopping.load(ordering: .relaxed) {
                workers[connection.worker].post(.notice(connection, .reclaim, notice.encode()))
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
            Snapshot(slabsLent: state.lentSlabs, slabsFree: state.free.count,
                     bytesLent: state.lentSlabs * configuration.slabSize, connections: state.connections.count,
                     pendingReclaims: state.slots.filter { $0.lent && $0.reclaimDeadline != nil }.count,
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
            ("reclaims_cancelled", load(c.cancelledReclaims)), ("draining", .bool(maintenanceDraining)),
        ]).serialized()
    }
}

/// The version the daemon and CLI report.
public enum SpillwayVersion {
    public static let current = "0.2.0"
}
