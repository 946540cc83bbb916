#if canImport(Glibc)
import Glibc
#endif
import SpillwayCore
@testable import SpillwayFabric
import Testing

/// A page-aligned buffer the test owns (registered regions never own their memory).
final class TestBuffer {
    let bytes: UnsafeMutableRawBufferPointer
    init(_ count: Int, fill: UInt8 = 0) {
        bytes = .allocate(byteCount: count, alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: fill)
    }
    deinit { bytes.deallocate() }
    func page(_ index: Int, size: Int = 4096) -> [UInt8] { Array(bytes[index * size ..< (index + 1) * size]) }
    func page(_ index: Int, isAll byte: UInt8, size: Int = 4096) -> Bool {
        bytes[index * size ..< (index + 1) * size].allSatisfy { $0 == byte }
    }
    func fillPage(_ index: Int, seed: Int, size: Int = 4096) {
        for offset in 0..<size { bytes[index * size + offset] = UInt8(truncatingIfNeeded: seed &* 31 &+ offset &* 7 &+ (offset >> 8)) }
    }
}

/// A "daemon" endpoint (driven by a progress thread, as spillwayd would) and a "client"
/// endpoint in one process, over a provider on loopback.
final class Pair {
    let provider: FabricProvider
    let daemon: FabricEndpoint
    let progress: FabricProgressThread
    let client: FabricEndpoint
    let peer: FabricPeer

    init(provider name: String = "tcp", node: String? = "127.0.0.1", maxInFlight: Int = 256) throws {
        provider = try FabricProvider.discover(provider: name, node: node)
        daemon = try FabricEndpoint(provider: provider, options: .init(waitableCompletions: true))
        progress = FabricProgressThread(endpoint: daemon)
        client = try FabricEndpoint(provider: provider, options: .init(maxInFlight: maxInFlight))
        peer = try client.insertPeer(address: daemon.address)
    }

    deinit { progress.stop() }

    /// A fresh client endpoint (the tcp provider drops a connection whose peer refused an access).
    func newClient() throws -> (FabricEndpoint, FabricPeer) {
        let client = try FabricEndpoint(provider: provider)
        return (client, try client.insertPeer(address: daemon.address))
    }
}

enum FabricTestEnvironment {
    /// An RDMA device the verbs provider can open (a NIC or SoftRoCE `rxe0`).
    static let hasVerbsDevice: Bool = {
        var entries = 0
        if let directory = opendir("/sys/class/infiniband") {
            while let entry = readdir(directory) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if !name.hasPrefix(".") { entries += 1 }
            }
            closedir(directory)
        }
        return entries > 0 && FabricProvider.isAvailable("verbs")
    }()
}

/// Writes `pages` 4 KiB pages from the client to the daemon's slab and reads them back into a
/// second buffer; checks the slab and the read-back bytes.
func roundTrip(_ pair: Pair, pages: Int, slabPages: Int = 256) throws {
    let pageSize = 4096
    let slab = TestBuffer(slabPages * pageSize)
    let source = TestBuffer(pages * pageSize)
    let sink = TestBuffer(pages * pageSize, fill: 0xEE)
    for page in 0..<pages { source.fillPage(page, seed: page + 1) }
    defer { withExtendedLifetime((slab, source, sink)) {} }  // outlive their registrations
    let slabRegion = try pair.daemon.register(slab.bytes, access: .remote)
    let sourceRegion = try pair.client.register(source.bytes, access: .local)
    let sinkRegion = try pair.client.register(sink.bytes, access: .local)
    defer { sinkRegion.close(); sourceRegion.close(); slabRegion.close() }

    let remote = FabricRemoteRegion(peer: pair.peer, grant: slabRegion.grant)
    // Scattered remote placement: page i goes to slab page (slabPages - 1 - 3i) mod slabPages.
    let slot = { (page: Int) in ((slabPages - 1 - 3 * page) % slabPages + slabPages) % slabPages }
    let writes = (0..<pages).map { FabricTransfer(localOffset: $0 * pageSize, remote: remote, remoteOffset: slot($0) * pageSize, length: pageSize) }
    let written = try pair.client.write(writes, from: sourceRegion, timeout: .seconds(10))
    try written.check()
    #expect(written.completed == pages)
    if pair.provider.writesCompleteOnDelivery {
        let misplaced = (0..<pages).filter { slab.page(slot($0)) != source.page($0) }
        #expect(misplaced.isEmpty, "pages not in the slab when their writes completed: \(misplaced)")
    }

    let reads = (0..<pages).map { FabricTransfer(localOffset: $0 * pageSize, remote: remote, remoteOffset: slot($0) * pageSize, length: pageSize) }
    let read = try pair.client.read(reads, into: sinkRegion, timeout: .seconds(10))
    try read.check()
    #expect(read.completed == pages)
    let wrong = (0..<pages).filter { sink.page($0) != source.page($0) }
    #expect(wrong.isEmpty, "pages read back wrong: \(wrong)")
}

@Suite(.serialized)
struct FabricTests {
    @Test func discoversTheTCPProviderOnLoopback() throws {
        let provider = try FabricProvider.discover(provider: "tcp", node: "127.0.0.1")
        #expect(provider.name.hasPrefix("tcp"))
        #expect(FabricMRMode.supported.isSuperset(of: provider.mrMode))
        #expect(provider.transmitQueueSize > 0)
        #expect(provider.keySize > 0)
        #expect(provider.writesCompleteOnDelivery)
    }

    @Test func anUnknownProviderIsATypedErrorWithLibfabricsText() {
        #expect {
            _ = try FabricProvider.discover(provider: "no-such-provider")
        } throws: { error in
            guard case .transport(let provider, let operation, let errno, let reason) = error as? SpillwayError else { return false }
            return provider == "no-such-provider" && operation == "fi_getinfo" && errno == ENODATA && reason.contains("No data available")
        }
    }

    @Test func writesAPageAndReadsItBack() throws {
        try roundTrip(Pair(), pages: 1)
    }

    @Test func aBatchOf64PagesRoundTrips() throws {
        try roundTrip(Pair(), pages: 64)
    }

    @Test func inFlightIsBoundedByTheEndpointAndTheProvider() throws {
        let pair = try Pair(maxInFlight: 4)
        #expect(pair.client.maxInFlight == 4)
        #expect(pair.daemon.maxInFlight <= pair.provider.transmitQueueSize)
        try roundTrip(pair, pages: 64)
    }

    @Test func aRevokedKeyFailsTypedAndReadsNoBytes() throws {
        let pair = try Pair()
        let slab = TestBuffer(16 * 4096, fill: 0x5A)
        let sink = TestBuffer(4096, fill: 0xEE)
        defer { withExtendedLifetime((slab, sink)) {} }  // outlive their registrations
        let slabRegion = try pair.daemon.register(slab.bytes, access: .remote)
        let sinkRegion = try pair.client.register(sink.bytes, access: .local)
        defer { sinkRegion.close() }
        let remote = FabricRemoteRegion(peer: pair.peer, grant: slabRegion.grant)
        let transfer = [FabricTransfer(localOffset: 0, remote: remote, remoteOffset: 4096, length: 4096)]
        try pair.client.read(transfer, into: sinkRegion, timeout: .seconds(10)).check()
        #expect(sink.page(0, isAll: 0x5A))

        slabRegion.close()  // revoke
        #expect(slabRegion.isClosed)
        sink.bytes.initializeMemory(as: UInt8.self, repeating: 0xEE)
        let result = try pair.client.read(transfer, into: sinkRegion, timeout: .seconds(10))
        #expect(result.completed == 0)
        #expect(result.failures.count == 1)
        let failure = try #require(result.failures.first)
        #expect(failure.index == 0)
        guard case .transport(_, let operation, let errno, _) = failure.error else {
            Issue.record("expected a transport error, got \(failure.error)")
            return
        }
        #expect(operation == "fi_read")
        #expect(errno != 0)
        #expect(sink.page(0, isAll: 0xEE), "a revoked key returned bytes")
        #expect(throws: SpillwayError.self) { try result.check() }

        // A key never issued fails the same way, on a new connection (tcp drops the old one).
        let other = try pair.daemon.register(slab.bytes, access: .remote)
        defer { other.close() }
        let (client, peer) = try pair.newClient()
        let sink2 = try client.register(sink.bytes, access: .local)
        defer { sink2.close() }
        var forged = other.grant
        forged.key = other.grant.key ^ 0x5DEE_CE66_D1CE_4E5B
        let forgedResult = try client.read([FabricTransfer(localOffset: 0, remote: .init(peer: peer, grant: forged), remoteOffset: 0, length: 4096)],
                                           into: sink2, timeout: .seconds(10))
        #expect(forgedResult.failures.count == 1)
        #expect(sink.page(0, isAll: 0xEE), "a forged key returned bytes")

        // The daemon keeps serving other clients with valid keys.
        let (fresh, freshPeer) = try pair.newClient()
        let sink3 = try fresh.register(sink.bytes, access: .local)
        defer { sink3.close() }
        try fresh.read([FabricTransfer(localOffset: 0, remote: .init(peer: freshPeer, grant: other.grant), remoteOffset: 0, length: 4096)],
                       into: sink3, timeout: .seconds(10)).check()
        #expect(sink.page(0, isAll: 0x5A))
    }

    @Test func readingOutsideTheGrantIsRefusedBeforePosting() throws {
        let pair = try Pair()
        let slab = TestBuffer(4 * 4096, fill: 0x11)
        let sink = TestBuffer(2 * 4096, fill: 0xEE)
        defer { withExtendedLifetime((slab, sink)) {} }
        let slabRegion = try pair.daemon.register(slab.bytes, access: .remote)
        let sinkRegion = try pair.client.register(sink.bytes, access: .local)
        defer { sinkRegion.close(); slabRegion.close() }
        let remote = FabricRemoteRegion(peer: pair.peer, grant: slabRegion.grant)
        for (remoteOffset, length) in [(3 * 4096 + 1, 4096), (4 * 4096, 1), (-4096, 4096), (0, 0)] {
            #expect {
                _ = try pair.client.read([FabricTransfer(localOffset: 0, remote: remote, remoteOffset: remoteOffset, length: length)],
                                         into: sinkRegion, timeout: .seconds(5))
            } throws: { error in
                guard case .invalidArgument = error as? SpillwayError else { return false }
                return true
            }
        }
        // Local side too: past the registered page buffer.
        #expect(throws: SpillwayError.self) {
            _ = try pair.client.read([FabricTransfer(localOffset: 4096 + 1, remote: remote, remoteOffset: 0, length: 4096)],
                                     into: sinkRegion, timeout: .seconds(5))
        }
        #expect(sink.page(0, isAll: 0xEE))
    }

    @Test func theTargetRefusesAddressesOutsideTheRegistrationEvenWithAForgedGrant() throws {
        let pair = try Pair()
        let slab = TestBuffer(8 * 4096, fill: 0x22)
        let sink = TestBuffer(4096, fill: 0xEE)
        defer { withExtendedLifetime((slab, sink)) {} }
        // Register only the first 4 pages; the forged grant claims all 8.
        let slabRegion = try pair.daemon.register(UnsafeMutableRawBufferPointer(rebasing: slab.bytes[0 ..< 4 * 4096]), access: .remote)
        let sinkRegion = try pair.client.register(sink.bytes, access: .local)
        defer { sinkRegion.close(); slabRegion.close() }
        var forged = slabRegion.grant
        forged.length = 8 * 4096
        let result = try pair.client.read([FabricTransfer(localOffset: 0, remote: .init(peer: pair.peer, grant: forged), remoteOffset: 6 * 4096, length: 4096)],
                                          into: sinkRegion, timeout: .seconds(10))
        #expect(result.completed == 0)
        let failure = try #require(result.failures.first)
        guard case .transport(_, "fi_read", _, _) = failure.error else {
            Issue.record("expected a transport error from fi_read, got \(failure.error)")
            return
        }
        #expect(sink.page(0, isAll: 0xEE), "bytes beyond the registration were returned")
    }

    @Test func aVanishedPeerFailsTypedWithinTheDeadline() throws {
        let provider = try FabricProvider.discover(provider: "tcp", node: "127.0.0.1")
        var address: [UInt8]
        var grant: FabricRegionGrant
        do {
            let gone = try FabricEndpoint(provider: provider)
            let slab = TestBuffer(4096)
            let region = try gone.register(slab.bytes, access: .remote)
            address = gone.address
            grant = region.grant
            region.close()
        }
        let client = try FabricEndpoint(provider: provider)
        let peer = try client.insertPeer(address: address)
        let sink = TestBuffer(4096, fill: 0xEE)
        defer { withExtendedLifetime(sink) {} }
        let sinkRegion = try client.register(sink.bytes, access: .local)
        defer { sinkRegion.close() }
        let start = ContinuousClock.now
        do {
            let result = try client.read([FabricTransfer(localOffset: 0, remote: .init(peer: peer, grant: grant), remoteOffset: 0, length: 4096)],
                                         into: sinkRegion, timeout: .seconds(2))
            #expect(!result.succeeded)
        } catch {
            guard case .transport = error else {
                Issue.record("expected a transport error, got \(error)")
                return
            }
        }
        #expect(ContinuousClock.now - start < .seconds(5))
        #expect(sink.page(0, isAll: 0xEE))
    }

    @Test(.enabled(if: FabricTestEnvironment.hasVerbsDevice,
                   "no RDMA device: /sys/class/infiniband is empty or the verbs provider finds none (SoftRoCE: rdma link add rxe0 type rxe netdev IFACE)"))
    func theVerbsProviderRoundTripsOnAnRDMADevice() throws {
        try roundTrip(Pair(provider: "verbs", node: nil), pages: 64)
    }
}
