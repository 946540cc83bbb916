import Glibc
import Testing
@testable import SpillwayCore
@testable import SpillwayFabric
@testable import SpillwayProtocol
@testable import SpillwayRemote
@testable import SpillwayServer
import SpillwayTestSupport

/// An in-process daemon serving RMA over libfabric's tcp provider as well as TCP.
func startRMADaemon(transport: TransportMode = .auto, provider: String? = "tcp", capacity: Int = 8 << 20) throws -> RemoteMemoryServer {
    var configuration = DaemonConfiguration(listen: Endpoint(host: "127.0.0.1", port: 0), capacity: capacity, slabSize: 1 << 20,
                                            tokens: tokens, checkInterval: 0.05)
    configuration.transport = transport
    configuration.fabricProvider = provider
    let server = try RemoteMemoryServer(configuration)
    try server.start()
    return server
}

@Suite(.serialized, .timeLimit(.minutes(3))) struct RMATransportTests {
    static let fabricAvailable = FabricProvider.isAvailable("tcp", node: "127.0.0.1")

    @Test(.enabled(if: fabricAvailable)) func pagesMoveByRMAAndARevokedKeyFailsTyped() throws {
        let server = try startRMADaemon()
        defer { server.shutdown(drain: 0) }
        #expect(server.fabric != nil)
        let a = try DaemonClient(endpoint: endpoint(server), credentials: alice, transport: .rma, fabricProvider: "tcp")
        #expect(a.transport == "rma")
        #expect(a.welcome.fabric?.provider == "tcp")
        let slab = try a.mapSlab()
        let grant = try #require(a.rmaGrant(for: slab))
        #expect(grant.length == 1 << 20)
        let readsBefore = server.counters.reads.load(ordering: .relaxed)
        var page = pattern(7, 4096)
        #expect(transfer(a, write: true, slab: slab, offset: 12288, &page) == 0)
        var back = [UInt8](repeating: 0, count: 4096)
        #expect(transfer(a, write: false, slab: slab, offset: 12288, &back) == 0)
        #expect(back == page)
        // The bytes moved one-sided: the daemon's TCP page path served nothing.
        #expect(server.counters.reads.load(ordering: .relaxed) == readsBefore)
        #expect(server.counters.writes.load(ordering: .relaxed) == 0)

        // A TCP client of the same tenant sees the bytes written over RMA (one daemon, both transports).
        let plain = try DaemonClient(endpoint: endpoint(server), credentials: alice, transport: .tcp)
        #expect(plain.transport == "tcp")
        var viaTCP = [UInt8](repeating: 0, count: 4096)
        #expect(transfer(plain, write: false, slab: slab, offset: 12288, &viaTCP) == 0)
        #expect(viaTCP == page)

        // Unmap (revocation closes the region): the old key reads nothing, and bob, lent the
        // same memory next with a key of his own, never has his bytes read through it.
        try a.unmapSlab(slab)
        let b = try DaemonClient(endpoint: endpoint(server), credentials: bob, transport: .rma, fabricProvider: "tcp")
        let bobSlab = try b.mapSlab()
        var secret = pattern(99, 4096)
        #expect(transfer(b, write: true, slab: bobSlab, offset: 12288, &secret) == 0)
        let bobGrant = try #require(b.rmaGrant(for: bobSlab))
        #expect(bobGrant.key != grant.key)
        // alice's stale grant, straight on the fabric: refused, typed.
        let probe = try FabricEndpoint(provider: FabricProvider.discover(provider: "tcp", node: "127.0.0.1"))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        let local = try probe.register(buffer, access: .local)
        let peer = try probe.insertPeer(address: try #require(a.welcome.fabric).address)
        let stale = FabricTransfer(localOffset: 0, remote: FabricRemoteRegion(peer: peer, grant: grant), remoteOffset: 12288, length: 4096)
        let outcome = try? probe.read([stale], into: local, timeout: .seconds(5))
        #expect(outcome == nil || outcome?.succeeded == false)
        #expect(!buffer.elementsEqual(secret))
        local.close()
        // Through the client: the fabric refuses, the daemon's TCP answer types it (unknown slab).
        var leak = [UInt8](repeating: 0, count: 4096)
        a.rma?.setGrant(grant, for: slab)  // as if the unmap had not been seen
        let status = transfer(a, write: false, slab: slab, offset: 12288, &leak)
        #expect(status != 0)
        #expect(leak != secret)
        // And the client still works over RMA afterwards (its endpoint was reopened).
        let fresh = try a.mapSlab()
        var again = pattern(8, 4096)
        #expect(transfer(a, write: true, slab: fresh, offset: 0, &again) == 0)
        var check = [UInt8](repeating: 0, count: 4096)
        #expect(transfer(a, write: false, slab: fresh, offset: 0, &check) == 0)
        #expect(check == again)
    }

    @Test(.enabled(if: fabricAvailable)) func reclaimRevocationClosesTheRegionAndTheTierSeesENXIO() throws {
        let memoryInfo = try MemoryInfoFile("spillway-rma-test")
        defer { memoryInfo.remove() }
        let path = memoryInfo.path
        func setAvailable(_ kilobytes: Int) throws { try memoryInfo.set(availableKilobytes: kilobytes) }
        try setAvailable(1 << 30)
        var configuration = DaemonConfiguration(listen: Endpoint(host: "127.0.0.1", port: 0), capacity: 8 << 20, slabSize: 1 << 20,
                                                tokens: tokens, headroom: 512 << 20, reclaimDeadline: 0.3,
                                                memoryInfoPath: path, checkInterval: 0.05)
        configuration.fabricProvider = "tcp"
        let server = try RemoteMemoryServer(configuration)
        try server.start()
        defer { server.shutdown(drain: 0) }
        let a = try DaemonClient(endpoint: endpoint(server), credentials: alice, transport: .rma, fabricProvider: "tcp")
        let slab = try a.mapSlab()
        var page = pattern(3, 4096)
        #expect(transfer(a, write: true, slab: slab, offset: 0, &page) == 0)
        try setAvailable(100 << 10)
        let revoked = eventually(10) { server.counters.revokedSlabs.load(ordering: .relaxed) == 1 }
        #expect(revoked)
        var back = [UInt8](repeating: 0, count: 4096)
        #expect(transfer(a, write: false, slab: slab, offset: 0, &back) == ENXIO)
        #expect(back != page)
    }

    @Test(.enabled(if: fabricAvailable)) func autoFallsBackToTCPAgainstATCPOnlyDaemonAndForcedRMAFailsClearly() throws {
        let server = try startRMADaemon(transport: .tcp)
        defer { server.shutdown(drain: 0) }
        #expect(server.fabric == nil)
        let client = try DaemonClient(endpoint: endpoint(server), credentials: alice, transport: .auto, fabricProvider: "tcp")
        #expect(client.transport == "tcp")
        #expect(client.transportReason.contains("peer TCP-only"))
        let slab = try client.mapSlab()
        var page = pattern(5, 4096)
        #expect(transfer(client, write: true, slab: slab, offset: 0, &page) == 0)
        do {
            _ = try DaemonClient(endpoint: endpoint(server), credentials: alice, transport: .rma, fabricProvider: "tcp")
            Issue.record("forced RMA against a TCP-only daemon connected")
        } catch {
            guard case .transportUnavailable(let reason) = error else { throw error }
            #expect(reason.contains("peer TCP-only"))
        }
    }

    @Test(.enabled(if: fabricAvailable)) func autoWithoutANamedProviderKeepsTheTCPProviderOff() throws {
        let server = try startRMADaemon()
        defer { server.shutdown(drain: 0) }
        // No RDMA provider here: auto stays on TCP unless tcp is named.
        let client = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        if TransportSelection.localRDMAProvider == nil {
            #expect(client.transport == "tcp")
            #expect(client.transportReason.contains("no RDMA"))
        }
    }

    @Test func forcedRMAWithNoUsableProviderFailsClearly() throws {
        #expect(throws: SpillwayError.self) { _ = try startRMADaemon(transport: .rma, provider: "no-such-provider") }
        let server = try startDaemon()
        defer { server.shutdown(drain: 0) }
        do {
            _ = try DaemonClient(endpoint: endpoint(server), credentials: alice, transport: .rma, fabricProvider: "no-such-provider")
            Issue.record("forced RMA connected")
        } catch {
            guard case .transportUnavailable(let reason) = error else { throw error }
            #expect(reason.contains("--transport rma"))
        }
        if TransportSelection.localRDMAProvider == nil {
            #expect(throws: RemoteError.self) { _ = try DaemonClient(endpoint: endpoint(server), credentials: alice, transport: .rma) }
        }
    }

    @Test func welcomeAndMapReplyKeepTheirOldFormsWithoutRMA() throws {
        let plain = Wire.Welcome(slabSize: 1 << 20, capacity: 8 << 20, freeSlabs: 8, heldSlabs: [3], daemonInstance: 9,
                                 daemonProof: Array(repeating: 1, count: 32))
        #expect(WireReader.decode(plain.encode(), with: Wire.Welcome.decode) == plain)
        var rma = plain
        rma.fabric = Wire.FabricAdvert(provider: "tcp", address: [1, 2, 3, 4])
        #expect(WireReader.decode(rma.encode(), with: { Wire.Welcome.decode(&$0, agreed: [.mutualAuthentication, .rma]) }) == rma)
        #expect(Wire.MapReply(slab: 5).encode() == Wire.encodeSlab(5))
        let granted = Wire.MapReply(slab: 5, grant: (1, 2, 3))
        #expect(WireReader.decode(granted.encode(), with: Wire.MapReply.decode) == granted)
    }
}
