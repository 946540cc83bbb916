import Foundation
import Glibc
import Testing
@testable import SpillwayCore
@testable import SpillwayProtocol
@testable import SpillwayRemote
@testable import SpillwayServer
import SpillwayTestSupport

// The daemon as an attacker or a crash would meet it: strangers, floods, oversized replies,
// tenants that stop reading, fake daemons, restarts. Each test fails on the code before the
// hardening issue.

/// A raw connection (no handshake) to `endpoint`, with bounded I/O.
func rawConnection(_ endpoint: Endpoint, ioTimeout: Double = 5) throws -> FrameConnection {
    FrameConnection(socket: try TCPSocket.connect(to: endpoint, ioTimeout: ioTimeout))
}

/// hello → challenge by hand.
func rawHello(_ connection: FrameConnection, tenant: String, capabilities: Wire.Capabilities = []) throws -> Wire.Challenge {
    try connection.send(.hello, requestID: 1, meta: Wire.Hello(capabilities: capabilities.rawValue, tenant: tenant).encode())
    let header = try connection.receiveHeader()
    let bytes = try connection.receiveSmall(header)
    try #require(header.opcode == .challenge, "expected a challenge, got \(header.opcode)")
    return try #require(WireReader.decode(bytes, with: Wire.Challenge.decode))
}

/// The next frame's opcode and meta.
func rawReceive(_ connection: FrameConnection) throws -> (Opcode, [UInt8]) {
    let header = try connection.receiveHeader()
    return (header.opcode, try connection.receiveSmall(header))
}

/// A version-1 (one-way) handshake by hand; returns the welcome.
func rawAuthenticate(_ connection: FrameConnection, tenant: String, token: [UInt8]) throws -> Wire.Welcome {
    let challenge = try rawHello(connection, tenant: tenant)
    try connection.send(.authenticate, requestID: 2,
                        meta: Wire.Authenticate(mac: Authenticator.proof(token: token, nonce: challenge.nonce, tenant: tenant)).encode())
    let (opcode, bytes) = try rawReceive(connection)
    try #require(opcode == .welcome, "expected welcome, got \(opcode)")
    return try #require(WireReader.decode(bytes, with: Wire.Welcome.decode))
}

@Suite(.serialized, .timeLimit(.minutes(3))) struct SecurityTests {
    // MARK: Item 1: nobody gets in without the token

    @Test func strangersAreRefusedWithoutAndWithAWrongToken() throws {
        let server = try startDaemon()
        defer { server.shutdown(drain: 0) }
        // No token: the client refuses to go on, and the daemon never welcomes a raw stranger.
        let missing = #expect(throws: RemoteError.self) {
            _ = try DaemonClient(endpoint: endpoint(server), credentials: ClientCredentials(tenant: "alice", token: nil))
        }
        guard case .refused(let reply)? = missing else { Issue.record("expected a refusal, got \(String(describing: missing))"); return }
        #expect(reply.code == .authenticationRequired)
        let raw = try rawConnection(endpoint(server))
        let challenge = try rawHello(raw, tenant: "alice")
        #expect(challenge.authenticationRequired)
        // Skipping `authenticate` is an error frame, never a welcome.
        try raw.send(.stats, requestID: 2, meta: [])
        let (opcode, bytes) = try rawReceive(raw)
        #expect(opcode == .error)
        #expect(WireReader.decode(bytes, with: Wire.ErrorReply.decode)?.code == .authenticationFailed)
        // A wrong token.
        let wrong = #expect(throws: RemoteError.self) {
            _ = try DaemonClient(endpoint: endpoint(server), credentials: ClientCredentials(tenant: "alice", token: Array("x-wrong-token-0123456789".utf8)))
        }
        guard case .refused(let wrongReply)? = wrong else { Issue.record("expected a refusal, got \(String(describing: wrong))"); return }
        #expect(wrongReply.code == .authenticationFailed)
        let failures = server.counters.authFailures.load(ordering: .relaxed)
        #expect(failures == 2)
    }

    @Test func spillwaydWithoutATokenFileGeneratesAPrivateOneAndRefusesStrangers() throws {
        let daemon = try DaemonProcess()
        let path = try #require(daemon.tokenFile, "the startup JSON names the generated token file")
        var info = stat()
        #expect(lstat(path, &info) == 0)
        #expect(info.st_mode & 0o777 == 0o600, "token file mode \(String(info.st_mode & 0o777, radix: 8))")
        let directory = String(path[..<path.lastIndex(of: "/")!])
        #expect(lstat(directory, &info) == 0)
        #expect(info.st_mode & 0o777 == 0o700, "runtime directory mode \(String(info.st_mode & 0o777, radix: 8))")
        #expect(path.hasSuffix("spillwayd-127.0.0.1-\(daemon.port).token"))
        // The owner's clients find it by address.
        let client = try DaemonClient(endpoint: daemon.endpoint, credentials: ClientCredentials(tenant: "anyone", token: nil))
        #expect(client.credentials.tenant == "spillway")
        _ = try client.mapSlab()
        // Strangers: no token and a wrong one.
        let raw = try rawConnection(daemon.endpoint)
        #expect(try rawHello(raw, tenant: "spillway").authenticationRequired)
        try raw.send(.authenticate, requestID: 2, meta: Wire.Authenticate(mac: [UInt8](repeating: 0, count: 32)).encode())
        let (opcode, _) = try rawReceive(raw)
        #expect(opcode == .error)
        let wrong = ClientCredentials(tenant: "spillway", token: Array("not-the-generated-token-123".utf8))
        #expect(throws: RemoteError.self) { _ = try DaemonClient(endpoint: daemon.endpoint, credentials: wrong) }
        // A clean exit takes the token file with it.
        daemon.kill(SIGTERM)
        #expect(daemon.wait(seconds: 10) == 0)
        #expect(access(path, F_OK) != 0, "the generated token file is removed at exit")
    }

    @Test func generatedTokenFilesOfDeadDaemonsArePruned() throws {
        let directory = NSTemporaryDirectory() + "spillway-prune-\(getpid())"
        try PrivateDirectory.ensure(directory)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // A pid that certainly exited: a child we started and reaped.
        let child = Process()
        child.executableURL = URL(fileURLWithPath: "/bin/true")
        try child.run()
        child.waitUntilExit()
        let dead = "\(directory)/spillwayd-127.0.0.1-1.token"
        let alive = "\(directory)/spillwayd-127.0.0.1-2.token"
        let foreign = "\(directory)/notes.token"
        try "# spillwayd pid \(child.processIdentifier)\nspillway abcdefghijklmnop1234 admin\n".write(toFile: dead, atomically: true, encoding: .utf8)
        try "# spillwayd pid \(getpid())\nspillway abcdefghijklmnop1234 admin\n".write(toFile: alive, atomically: true, encoding: .utf8)
        try "whatever\n".write(toFile: foreign, atomically: true, encoding: .utf8)
        LocalTokens.pruneStale(in: directory)
        #expect(access(dead, F_OK) != 0, "a dead daemon's token file is removed")
        #expect(access(alive, F_OK) == 0, "a live daemon's token file stays")
        #expect(access(foreign, F_OK) == 0, "files that are not generated token files are left alone")
    }

    // MARK: Item 2: strangers cannot hold the door

    @Test func aTricklingHandshakeIsCutOffAtTheTotalDeadline() throws {
        var configuration = DaemonConfiguration(listen: Endpoint(host: "127.0.0.1", port: 0), capacity: 8 << 20, slabSize: 1 << 20,
                                                tokens: tokens, checkInterval: 0.05)
        configuration.handshakeTimeout = 1
        let server = try RemoteMemoryServer(configuration)
        try server.start()
        defer { server.shutdown(drain: 0) }
        // One byte every 200 ms: every receive succeeds, so only a total deadline ends it.
        let socket = try TCPSocket.connect(to: endpoint(server), ioTimeout: 10)
        let start = monotonicNanoseconds()
        var closed = false
        var byte: UInt8 = 0x53
        for _ in 0..<50 {
            var vector = iovec(iov_base: &byte, iov_len: 1)
            let sent = withUnsafeMutablePointer(to: &vector) { pointer -> Bool in
                (try? socket.send(UnsafeMutableBufferPointer(start: pointer, count: 1))) != nil
            }
            if !sent || socket.isReadable {
                closed = true
                break
            }
            usleep(200_000)
        }
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        #expect(closed, "the daemon kept a trickling handshake open for \(seconds) s")
        let timeouts = server.counters.handshakeTimeouts.load(ordering: .relaxed)
        #expect(timeouts == 1)
    }

    @Test func unauthenticatedConnectionsEvictEachOtherNeverATenant() throws {
        var configuration = DaemonConfiguration(listen: Endpoint(host: "127.0.0.1", port: 0), capacity: 8 << 20, slabSize: 1 << 20,
                                                tokens: tokens, maxConnections: 24, checkInterval: 0.05)
        configuration.maxUnauthenticated = 8
        configuration.handshakeTimeout = 30  // only the quota protects the tenant here
        let server = try RemoteMemoryServer(configuration)
        try server.start()
        defer { server.shutdown(drain: 0) }
        let tenant = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        // 200 idle strangers: far more than the connection limit.
        var strangers: [TCPSocket] = []
        for _ in 0..<200 { strangers.append(try TCPSocket.connect(to: endpoint(server), ioTimeout: 5)) }
        let evicted = eventually { server.counters.handshakeEvictions.load(ordering: .relaxed) >= 200 - 8 }
        #expect(evicted)
        // A new tenant connection still gets in, and the old one still works.
        let late = try DaemonClient(endpoint: endpoint(server), credentials: bob)
        _ = try late.mapSlab()
        try tenant.heartbeat()
        #expect(server.snapshot().connections <= 24)
        for socket in strangers { socket.close() }
    }

    // MARK: Item 3: no reply can crash the daemon

    @Test func statsWithHundredsOfLongTenantNamesFitsOneFrameAndShowsOthersOnlyToAdmins() throws {
        let names = (0..<220).map { index in String(repeating: "n", count: 240) + String(format: "%05d", index) }
        var entries = names.map { ($0, "token-\($0.suffix(5))-0123456789") }
        entries.append(("root", "root-token-0123456789"))
        let many = TokenFile(tokens: entries, admins: ["root"])
        let server = try startDaemon(tokens: many)
        defer { server.shutdown(drain: 0) }
        var clients: [DaemonClient] = []
        for (name, token) in entries.prefix(names.count) {
            clients.append(try DaemonClient(endpoint: endpoint(server), credentials: ClientCredentials(tenant: name, token: Array(token.utf8))))
        }
        let admin = try DaemonClient(endpoint: endpoint(server), credentials: ClientCredentials(tenant: "root", token: Array("root-token-0123456789".utf8)))
        let all = try #require(try JSONSerialization.jsonObject(with: Data(try admin.stats().utf8)) as? [String: Any])
        let listed = try #require(all["tenants"] as? [[String: Any]])
        let omitted = try #require(all["tenants_omitted"] as? Int)
        #expect(listed.count + omitted == names.count + 1)
        #expect(omitted > 0, "221 entries of ~330 bytes do not fit in 64 KiB")
        // A tenant sees itself only.
        let own = try #require(try JSONSerialization.jsonObject(with: Data(try clients[7].stats().utf8)) as? [String: Any])
        let ownTenants = try #require(own["tenants"] as? [[String: Any]])
        #expect(ownTenants.map { $0["name"] as? String } == [names[7]])
        // The daemon is still alive for everyone.
        try clients[0].heartbeat()
    }

    @Test func framesOverTheLimitsAreTypedErrorsNotTraps() throws {
        let server = try startDaemon()
        defer { server.shutdown(drain: 0) }
        let connection = try rawConnection(endpoint(server))
        let meta = [UInt8](repeating: 0, count: WireProtocol.maxMetaLength + 1)
        let error = #expect(throws: RemoteError.self) { try connection.send(.hello, requestID: 1, meta: meta) }
        guard case .oversized? = error else { Issue.record("expected .oversized, got \(String(describing: error))"); return }
        #expect(error?.errno == EMSGSIZE)
    }

    @Test func aTenantHoldingTheMostSlabsAWelcomeListsIsRefusedMoreAndStillWelcomed() throws {
        let limit = Wire.Welcome.maxHeldSlabs
        // Address space only (MAP_NORESERVE, never touched).
        let server = try startDaemon(capacity: (limit + 4) << 20, slabSize: 1 << 20)
        defer { server.shutdown(drain: 0) }
        let client = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        for _ in 0..<limit { _ = try client.mapSlab() }
        let refusal = #expect(throws: RemoteError.self) { _ = try client.mapSlab() }
        guard case .refused(let reply)? = refusal else { Issue.record("expected a refusal, got \(String(describing: refusal))"); return }
        #expect(reply.code == .noCapacity)
        client.close()
        let again = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        #expect(again.welcome.heldSlabs.count == limit)
    }

    // MARK: Item 4: a tenant that stops reading is cut off, never the daemon

    @Test func aTenantThatStopsReadingIsDisconnectedAndPinnedSlabsStillCountAgainstCapacity() throws {
        var configuration = DaemonConfiguration(listen: Endpoint(host: "127.0.0.1", port: 0), capacity: 2 << 20, slabSize: 1 << 20,
                                                tokens: tokens, checkInterval: 0.05)
        configuration.sendTimeout = 1
        let server = try RemoteMemoryServer(configuration)
        try server.start()
        var stopped = false
        defer { if !stopped { server.shutdown(drain: 0) } }
        let control = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        let slab = try control.mapSlab()
        _ = try control.mapSlab()
        // A connection of the same tenant asks for 1 MiB reads of that slab and never reads.
        let stuck = try rawConnection(endpoint(server))
        _ = try rawAuthenticate(stuck, tenant: "alice", token: Array(aliceToken.utf8))
        var receiveBuffer: Int32 = 4096
        setsockopt(stuck.socket.descriptor, SOL_SOCKET, SO_RCVBUF, &receiveBuffer, socklen_t(MemoryLayout<Int32>.size))
        // One batched read of 16 MiB (the most a frame carries) from that slab: far more than
        // the socket buffers hold, so the daemon blocks in that send with the slab pinned.
        try stuckRead(stuck, slab: slab)
        // While the daemon is blocked sending to it, the slab is unmapped by another
        // connection: lent drops, but the memory is still mapped, so no third slab is lent.
        try control.unmapSlab(slab)
        let overCapacity = #expect(throws: RemoteError.self) { _ = try control.mapSlab() }
        guard case .refused(let reply)? = overCapacity else { Issue.record("lent beyond capacity: \(String(describing: overCapacity))"); return }
        #expect(reply.code == .noCapacity)
        // Within the send timeout (plus slack) the stuck tenant is cut off, and the slab freed.
        let cutOff = eventually { server.counters.stuckPeers.load(ordering: .relaxed) == 1 }
        #expect(cutOff)
        var freed: UInt32?
        let remapped = eventually {
            freed = try? control.mapSlab()
            return freed != nil
        }
        #expect(remapped, "the pinned slab was freed once the stuck send gave up")
        // Shutdown never blocks on a tenant either (a second stuck connection is in flight).
        let another = try rawConnection(endpoint(server))
        _ = try rawAuthenticate(another, tenant: "alice", token: Array(aliceToken.utf8))
        setsockopt(another.socket.descriptor, SOL_SOCKET, SO_RCVBUF, &receiveBuffer, socklen_t(MemoryLayout<Int32>.size))
        try stuckRead(another, slab: try #require(freed))
        let done = ManagedAtomicFlag()
        let stopper = BackgroundThread {
            server.shutdown(drain: 0)
            done.set()
        }
        #expect(eventually(5) { done.isSet }, "shutdown blocked behind a tenant that does not read")
        stopper.join()
        stopped = true
    }

    // MARK: Item 6: mutual authentication

    @Test func aDaemonThatCannotProveTheTokenGetsNothing() throws {
        for mode in ["forged proof", "no authentication", "no mutual capability"] {
            let listener = try TCPSocket.listen(on: Endpoint(host: "127.0.0.1", port: 0))
            let port = listener.localPort
            let fake = BackgroundThread {
                guard let (socket, _) = try? listener.accept(timeout: 5) else { return }
                let connection = FrameConnection(socket: socket)
                switch mode {
                case "forged proof":
                    try? fakeDaemonHandshake(connection, token: Array(aliceToken.utf8), forgeProof: true)
                default:
                    guard let header = try? connection.receiveHeader(), (try? connection.receiveSmall(header)) != nil else { return }
                    try? connection.send(.challenge, flags: .response, requestID: header.requestID,
                                         meta: Wire.Challenge(version: 1, authenticationRequired: mode == "no mutual capability",
                                                              capabilities: 0, nonce: [UInt8](repeating: 2, count: 32)).encode())
                    // A welcome regardless of what comes next.
                    if mode == "no mutual capability", let proof = try? connection.receiveHeader() { _ = try? connection.receiveSmall(proof) }
                    try? connection.send(.welcome, flags: .response, requestID: header.requestID,
                                         meta: Wire.Welcome(slabSize: 1 << 20, capacity: 1 << 20, freeSlabs: 1, heldSlabs: [], daemonInstance: 9).encode())
                }
                _ = try? connection.receiveHeader()  // until the client hangs up
            }
            let error = #expect(throws: RemoteError.self, "\(mode)") {
                _ = try DaemonClient(endpoint: Endpoint(host: "127.0.0.1", port: port), credentials: alice)
            }
            guard case .daemonNotAuthenticated? = error else {
                Issue.record("\(mode): expected daemonNotAuthenticated, got \(String(describing: error))")
                fake.join()
                continue
            }
            fake.join()
            listener.close()
        }
    }

    @Test func versionOneClientsStillGetTheOneWayHandshakeAndMutualOnesAProof() throws {
        let server = try startDaemon()
        defer { server.shutdown(drain: 0) }
        let old = try rawConnection(endpoint(server))
        let welcome = try rawAuthenticate(old, tenant: "alice", token: Array(aliceToken.utf8))
        #expect(welcome.daemonProof == nil, "a version-1 client gets exactly the version-1 welcome")
        let client = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        #expect(client.welcome.daemonProof?.count == 32)
        #expect(client.welcome.daemonInstance == server.instance)
        // Claiming mutual authentication without having asked for it is refused.
        let confused = try rawConnection(endpoint(server))
        let challenge = try rawHello(confused, tenant: "alice")
        try confused.send(.authenticate, requestID: 2, meta: Wire.Authenticate(
            mac: Authenticator.proof(token: Array(aliceToken.utf8), nonce: challenge.nonce, tenant: "alice"),
            clientNonce: [UInt8](repeating: 3, count: 32)).encode())
        #expect(try rawReceive(confused).0 == .error)
    }

    // MARK: Item 7: a restarted daemon is a new daemon

    @Test func aReconnectToARestartedDaemonIsRefusedNotTrusted() throws {
        let tokenPath = NSTemporaryDirectory() + "spillway-restart-\(getpid()).tokens"
        defer { unlink(tokenPath) }
        try "alice \(aliceToken)\n".write(toFile: tokenPath, atomically: true, encoding: .utf8)
        chmod(tokenPath, 0o600)
        let first = try DaemonProcess(arguments: ["--token-file", tokenPath])
        let client = try DaemonClient(endpoint: first.endpoint, credentials: alice, ioTimeout: 2)
        let slab = try client.mapSlab()
        first.kill9()
        #expect(throws: RemoteError.self) { try client.heartbeat() }
        let second = try DaemonProcess(arguments: ["--token-file", tokenPath], listen: "127.0.0.1:\(first.port)")
        defer { second.kill9() }
        // The slab id means nothing to the new instance (it may even be lent to someone else).
        let error = #expect(throws: RemoteError.self) { try client.heartbeat() }
        guard case .daemonRestarted? = error else { Issue.record("expected daemonRestarted, got \(String(describing: error))"); return }
        var page = [UInt8](repeating: 1, count: 4096)
        #expect(transfer(client, write: true, slab: slab, offset: 0, &page) == ESTALE)
        let failed = client.failed.load(ordering: .relaxed)
        #expect(failed)
    }

    // MARK: SIGHUP

    @Test func sighupReloadsTheTokenFile() throws {
        let tokenPath = NSTemporaryDirectory() + "spillway-reload-\(getpid()).tokens"
        defer { unlink(tokenPath) }
        try "alice \(aliceToken)\nbob \(bobToken)\n".write(toFile: tokenPath, atomically: true, encoding: .utf8)
        chmod(tokenPath, 0o600)
        let daemon = try DaemonProcess(arguments: ["--token-file", tokenPath])
        defer { daemon.kill9() }
        let carolToken = "carol-token-0123456789ab"
        let carol = ClientCredentials(tenant: "carol", token: Array(carolToken.utf8))
        let bobClient = try DaemonClient(endpoint: daemon.endpoint, credentials: bob, ioTimeout: 2)
        #expect(throws: RemoteError.self) { _ = try DaemonClient(endpoint: daemon.endpoint, credentials: carol) }
        try "alice \(aliceToken)\ncarol \(carolToken)\n".write(toFile: tokenPath, atomically: true, encoding: .utf8)
        daemon.kill(SIGHUP)
        #expect(eventually { (try? DaemonClient(endpoint: daemon.endpoint, credentials: carol)) != nil }, "carol admitted after SIGHUP")
        // Bob's connection was closed and bob is no longer admitted.
        #expect(throws: RemoteError.self) { try bobClient.heartbeat() }
        #expect(throws: RemoteError.self) { _ = try DaemonClient(endpoint: daemon.endpoint, credentials: bob) }
        _ = try DaemonClient(endpoint: daemon.endpoint, credentials: alice)
    }
}

/// Asks for 16 MiB of `slab` in one batched read and returns once the daemon has started
/// sending the reply (it is then blocked in that send, with the slab pinned, until the peer
/// reads or the send timeout fires).
func stuckRead(_ connection: FrameConnection, slab: UInt32) throws {
    let ranges = (0..<16).map { _ in Wire.SlabRange(slab: slab, offset: 0, length: 1 << 20) }
    try connection.send(.readBatch, requestID: 77, meta: Wire.encodeBatch(ranges))
    let started = eventually {
        var waiting: Int32 = 0
        return ioctl(connection.socket.descriptor, UInt(FIONREAD), &waiting) == 0 && waiting > 0
    }
    try #require(started, "the daemon never started replying")
}

/// A set-once flag for a thread to tell a waiting test it finished.
final class ManagedAtomicFlag: Sendable {
    private let value = Locked(false)
    func set() { value.withLock { $0 = true } }
    var isSet: Bool { value.withLock { $0 } }
}
