import Glibc
import Testing
@testable import SpillwayCore
@testable import SpillwayMemoryTiers
@testable import SpillwayProtocol
@testable import SpillwayRemote
@testable import SpillwayServer
@testable import SpillwayStore
import SpillwayTestSupport

let aliceToken = "alice-token-0123456789"
let bobToken = "bob-token-9876543210ab"
let tokens = TokenFile(tokens: [("alice", aliceToken), ("bob", bobToken)])
let alice = ClientCredentials(tenant: "alice", token: Array(aliceToken.utf8))
let bob = ClientCredentials(tenant: "bob", token: Array(bobToken.utf8))

/// An in-process daemon on an ephemeral loopback port.
func startDaemon(capacity: Int = 8 << 20, slabSize: Int = 1 << 20, tokens: TokenFile = tokens, lease: Double = 30,
                 headroom: Int = 0, memoryInfoPath: String = "/proc/meminfo", reclaimDeadline: Double = 5) throws -> RemoteMemoryServer
{
    let server = try RemoteMemoryServer(DaemonConfiguration(
        listen: Endpoint(host: "127.0.0.1", port: 0), capacity: capacity, slabSize: slabSize, tokens: tokens, lease: lease,
        headroom: headroom, reclaimDeadline: reclaimDeadline, memoryInfoPath: memoryInfoPath, checkInterval: 0.05))
    try server.start()
    return server
}

func endpoint(_ server: RemoteMemoryServer) -> Endpoint { Endpoint(host: "127.0.0.1", port: server.port) }

func pattern(_ seed: UInt64, _ count: Int) -> [UInt8] {
    var generator = SplitMix(seed: seed)
    return (0..<count).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
}

/// Runs one operation; returns its status.
func transfer(_ client: DaemonClient, write: Bool, slab: UInt32, offset: UInt64, _ buffer: inout [UInt8]) -> Int32 {
    let count = buffer.count
    return buffer.withUnsafeMutableBytes { raw in
        var operation = RemoteOperation(write: write, slab: slab, offset: offset, length: count, buffer: raw.baseAddress!)
        return withUnsafeMutablePointer(to: &operation) { pointer in
            client.execute(UnsafeMutableBufferPointer(start: pointer, count: 1))
            return pointer.pointee.status
        }
    }
}

@Suite(.serialized, .timeLimit(.minutes(3))) struct DaemonTests {
    @Test func authenticatedTenantWritesAndReadsItsSlab() throws {
        let server = try startDaemon()
        defer { server.shutdown(drain: 0) }
        let client = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        #expect(client.welcome.slabSize == 1 << 20)
        let slab = try client.mapSlab()
        var page = pattern(1, 4096)
        #expect(transfer(client, write: true, slab: slab, offset: 8192, &page) == 0)
        var back = [UInt8](repeating: 0, count: 4096)
        #expect(transfer(client, write: false, slab: slab, offset: 8192, &back) == 0)
        #expect(back == page)
        // A fresh slab reads as zeros: nobody's old bytes.
        #expect(transfer(client, write: false, slab: slab, offset: 0, &back) == 0)
        #expect(back == [UInt8](repeating: 0, count: 4096))
    }

    @Test func wrongOrMissingTokensAreRefusedAndCounted() throws {
        let server = try startDaemon()
        defer { server.shutdown(drain: 0) }
        let forged = ClientCredentials(tenant: "alice", token: Array("not-alices-token-at-all".utf8))
        #expect(throws: RemoteError.self) { _ = try DaemonClient(endpoint: endpoint(server), credentials: forged) }
        #expect(throws: RemoteError.self) {
            _ = try DaemonClient(endpoint: endpoint(server), credentials: ClientCredentials(tenant: "alice", token: nil))
        }
        let stranger = ClientCredentials(tenant: "mallory", token: Array(aliceToken.utf8))
        #expect(throws: RemoteError.self) { _ = try DaemonClient(endpoint: endpoint(server), credentials: stranger) }
        #expect(server.counters.authFailures.load(ordering: .relaxed) == 2)
    }

    @Test func crossTenantAndOutOfBoundsAccessesAreRefused() throws {
        let server = try startDaemon()
        defer { server.shutdown(drain: 0) }
        let a = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        let b = try DaemonClient(endpoint: endpoint(server), credentials: bob)
        let slab = try a.mapSlab()
        var secret = pattern(2, 4096)
        #expect(transfer(a, write: true, slab: slab, offset: 0, &secret) == 0)
        var stolen = [UInt8](repeating: 0, count: 4096)
        #expect(transfer(b, write: false, slab: slab, offset: 0, &stolen) == EACCES)
        #expect(stolen == [UInt8](repeating: 0, count: 4096))
        var overwrite = [UInt8](repeating: 0xFF, count: 4096)
        #expect(transfer(b, write: true, slab: slab, offset: 0, &overwrite) == EACCES)
        // Past the end, straddling the end, and an absurd offset.
        var page = [UInt8](repeating: 1, count: 4096)
        #expect(transfer(a, write: true, slab: slab, offset: UInt64(1 << 20), &page) == EINVAL)
        #expect(transfer(a, write: false, slab: slab, offset: UInt64((1 << 20) - 100), &page) == EINVAL)
        #expect(transfer(a, write: false, slab: slab, offset: UInt64.max - 10, &page) == EINVAL)
        #expect(transfer(a, write: false, slab: 999, offset: 0, &page) == ENXIO)
        #expect(throws: RemoteError.self) { try b.unmapSlab(slab) }
        // Alice's bytes are untouched and the connection still works after refusals.
        var back = [UInt8](repeating: 0, count: 4096)
        #expect(transfer(a, write: false, slab: slab, offset: 0, &back) == 0)
        #expect(back == secret)
        #expect(server.counters.refusedAccesses.load(ordering: .relaxed) >= 6)
    }

    @Test func capacityIsEnforcedAndSlabsAreZeroedWhenLentAgain() throws {
        let server = try startDaemon(capacity: 2 << 20)
        defer { server.shutdown(drain: 0) }
        let a = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        let first = try a.mapSlab()
        _ = try a.mapSlab()
        #expect(throws: RemoteError.refused(Wire.ErrorReply(.noCapacity, "all 2 slabs are lent"))) { _ = try a.mapSlab() }
        var page = pattern(3, 4096)
        #expect(transfer(a, write: true, slab: first, offset: 0, &page) == 0)
        try a.unmapSlab(first)
        let b = try DaemonClient(endpoint: endpoint(server), credentials: bob)
        let reused = try b.mapSlab()
        var back = [UInt8](repeating: 7, count: 4096)
        #expect(transfer(b, write: false, slab: reused, offset: 0, &back) == 0)
        #expect(back == [UInt8](repeating: 0, count: 4096))
    }

    @Test func leaseKeepsSlabsAcrossAReconnectThenExpires() throws {
        let server = try startDaemon(lease: 0.3)
        defer { server.shutdown(drain: 0) }
        var page = pattern(4, 4096)
        var slab: UInt32 = 0
        do {
            let a = try DaemonClient(endpoint: endpoint(server), credentials: alice)
            slab = try a.mapSlab()
            #expect(transfer(a, write: true, slab: slab, offset: 0, &page) == 0)
            a.close()
        }
        let again = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        #expect(again.welcome.heldSlabs == [slab])
        var back = [UInt8](repeating: 0, count: 4096)
        #expect(transfer(again, write: false, slab: slab, offset: 0, &back) == 0)
        #expect(back == page)
        again.close()
        let expired = eventually(10) { server.snapshot().slabsLent == 0 }
        #expect(expired)
        #expect(server.counters.expiredLeases.load(ordering: .relaxed) == 1)
    }

    @Test func pipelinedRepliesAreMatchedByIdInAnyOrder() throws {
        // A fake daemon that answers pipelined reads in reverse order: 80 pages go out as three
        // batched frames (32 + 32 + 16 ranges, `PageFrames.maxOperations`); the fake refuses the
        // range at offset 256 × 40 alone (a per-range status), which must fail only that page.
        let listener = try TCPSocket.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        let port = listener.localPort
        let count = 80
        let refusedIndex = 40
        let frames = Locked<[Int]>([])
        let fake = BackgroundThread {
            guard let (socket, _) = try? listener.accept(timeout: 5) else { return }
            let connection = FrameConnection(socket: socket)
            do {
                try fakeDaemonHandshake(connection, token: Array(aliceToken.utf8))
                var requests: [(UInt64, [Wire.SlabRange])] = []
                var received = 0
                while received < count {
                    let header = try connection.receiveHeader()
                    let meta = try connection.receiveSmall(header)
                    let ranges = meta.withUnsafeBytes { raw -> [Wire.SlabRange] in
                        var reader = WireReader(raw)
                        return header.opcode == .readBatch ? Wire.decodeBatch(&reader)! : [Wire.SlabRange.decode(&reader)!]
                    }
                    received += ranges.count
                    frames.withLock { $0.append(ranges.count) }
                    requests.append((header.requestID, ranges))
                }
                for (id, ranges) in requests.reversed() {
                    var statuses: [UInt8] = []
                    var data: [UInt8] = []
                    for range in ranges {
                        if range.offset == UInt64(refusedIndex * 256) {
                            statuses.append(UInt8(WireErrorCode.outOfBounds.rawValue))
                        } else {
                            statuses.append(0)
                            data += pattern(range.offset, 256)
                        }
                    }
                    try statuses.withUnsafeBytes { meta in
                        try data.withUnsafeBytes { data in
                            try connection.send(ranges.count == 1 ? .read : .readBatch, flags: .response, requestID: id,
                                                meta: ranges.count == 1 ? UnsafeRawBufferPointer(start: nil, count: 0) : meta, data: data)
                        }
                    }
                }
                _ = try? connection.receiveHeader()  // until the client hangs up
            } catch {}
        }
        let client = try DaemonClient(endpoint: Endpoint(host: "127.0.0.1", port: port), credentials: alice)
        let buffers = UnsafeMutableRawPointer.allocate(byteCount: 256 * count, alignment: 64)
        defer { buffers.deallocate() }
        var operations = (0..<count).map {
            RemoteOperation(write: false, slab: 1, offset: UInt64($0 * 256), length: 256, buffer: buffers + $0 * 256)
        }
        let failure = operations.withUnsafeMutableBufferPointer { client.execute($0, window: count) }
        #expect(failure == nil)
        for index in 0..<count where index != refusedIndex {
            #expect(operations[index].status == 0)
            #expect(Array(UnsafeRawBufferPointer(start: buffers + index * 256, count: 256)) == pattern(UInt64(index * 256), 256))
        }
        #expect(operations[refusedIndex].status == EINVAL)
        client.close()
        fake.join()
        #expect(frames.withLock { $0 } == [32, 32, 16])
    }

    @Test func reclaimNoticeReachesTheClientAndAMissedDeadlineRevokes() throws {
        // MemAvailable is read from a file the test controls.
        let memoryInfo = try MemoryInfoFile("spillway-test")
        defer { memoryInfo.remove() }
        let path = memoryInfo.path
        func setAvailable(_ kilobytes: Int) throws { try memoryInfo.set(availableKilobytes: kilobytes) }
        try setAvailable(1 << 30)
        let server = try startDaemon(headroom: 512 << 20, memoryInfoPath: path, reclaimDeadline: 0.3)
        defer { server.shutdown(drain: 0) }
        let a = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        let slab = try a.mapSlab()
        try setAvailable(100 << 10)  // 100 MiB available, headroom 512 MiB
        // Notices arrive between replies: heartbeat until one has come.
        let noticed = eventually(10) {
            try? a.heartbeat()
            return !a.reclaims.withLock { $0 }.isEmpty
        }
        #expect(noticed)
        #expect(a.reclaims.withLock { $0 }.map(\.slab) == [slab])
        // The client ignores the deadline: the daemon revokes the slab.
        let revoked = eventually(10) { server.counters.revokedSlabs.load(ordering: .relaxed) == 1 }
        #expect(revoked)
        var page = [UInt8](repeating: 0, count: 4096)
        #expect(transfer(a, write: false, slab: slab, offset: 0, &page) == ENXIO)
        #expect(server.counters.revokedSlabs.load(ordering: .relaxed) == 1)
    }
}

/// The daemon's side of a mutually authenticated handshake, for fake daemons in tests: reads
/// hello and authenticate and proves `token` in the welcome (or a wrong proof if asked).
func fakeDaemonHandshake(_ connection: FrameConnection, token: [UInt8], forgeProof: Bool = false, instance: UInt64 = 1) throws {
    let helloHeader = try connection.receiveHeader()
    let hello = try #require(WireReader.decode(try connection.receiveSmall(helloHeader), with: Wire.Hello.decode))
    let nonce = [UInt8](repeating: 1, count: 32)
    try connection.send(.challenge, flags: .response, requestID: helloHeader.requestID,
                        meta: Wire.Challenge(version: 1, authenticationRequired: true,
                                             capabilities: Wire.Capabilities.mutualAuthentication.rawValue, nonce: nonce).encode())
    let authHeader = try connection.receiveHeader()
    let proof = try #require(WireReader.decode(try connection.receiveSmall(authHeader), with: Wire.Authenticate.decode))
    let clientNonce = try #require(proof.clientNonce)
    var daemonProof = Authenticator.daemonProof(token: token, clientNonce: clientNonce, daemonNonce: nonce, tenant: hello.tenant,
                                                instance: instance)
    if forgeProof { daemonProof[0] ^= 1 }
    try connection.send(.welcome, flags: .response, requestID: helloHeader.requestID,
                        meta: Wire.Welcome(slabSize: 1 << 20, capacity: 1 << 20, freeSlabs: 1, heldSlabs: [], daemonInstance: instance,
                                           daemonProof: daemonProof).encode())
}
