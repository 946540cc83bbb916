import Foundation
import Glibc
import Testing
@testable import SpillwayCore
@testable import SpillwayProtocol
@testable import SpillwayRemote
@testable import SpillwayServer
import SpillwayTestSupport

// The event-driven daemon engine (issue 14): a fixed worker pool serves hundreds of
// connections, the lock-free page path refuses bad slab ids and ranges with typed errors, and
// a tenant's token-file size caps what it may hold.

/// Sends one read of `range` on a raw, authenticated connection.
private func sendRead(_ connection: FrameConnection, _ range: Wire.SlabRange, id: UInt64) throws {
    var writer = WireWriter()
    range.encode(into: &writer)
    try connection.send(.read, requestID: id, meta: writer.bytes)
}

/// Receives a read's reply: the page bytes, or the error reply.
private func receiveRead(_ connection: FrameConnection, count: Int) throws -> Result<[UInt8], Wire.ErrorReply> {
    let header = try connection.receiveHeader()
    if header.opcode == .error {
        let bytes = try connection.receiveSmall(header)
        return .failure(try #require(WireReader.decode(bytes, with: Wire.ErrorReply.decode)))
    }
    let (_, register) = try connection.receiveMeta(header)
    var page = [UInt8](repeating: 0, count: header.dataLength)
    let final = try page.withUnsafeMutableBytes { try connection.receiveData(into: $0.baseAddress!, count: header.dataLength, register: register) }
    #expect(~final == header.payloadChecksum)
    #expect(header.dataLength == count)
    return .success(page)
}

@Suite(.serialized, .timeLimit(.minutes(3))) struct EngineTests {
    @Test func fiveHundredConnectionsAreServedByAFixedPoolOfThreads() throws {
        var limit = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        if limit.rlim_cur < 4096 {
            limit.rlim_cur = min(4096, limit.rlim_max)
            setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
        try #require(limit.rlim_cur >= 1200, "RLIMIT_NOFILE \(limit.rlim_cur) is too low for 512 connections")
        let tokenPath = NSTemporaryDirectory() + "spillway-engine-\(getpid()).tokens"
        defer { unlink(tokenPath) }
        try "alice \(aliceToken)\n".write(toFile: tokenPath, atomically: true, encoding: .utf8)
        chmod(tokenPath, 0o600)
        let daemon = try DaemonProcess(arguments: ["--token-file", tokenPath, "--max-unauthenticated", "600"])
        defer { daemon.kill9() }
        let owner = try DaemonClient(endpoint: daemon.endpoint, credentials: alice)
        let slab = try owner.mapSlab()
        var page = pattern(14, 4096)
        #expect(transfer(owner, write: true, slab: slab, offset: 8192, &page) == 0)

        let count = 512
        var connections: [FrameConnection] = []
        for _ in 0..<count {
            let connection = try rawConnection(daemon.endpoint, ioTimeout: 20)
            _ = try rawAuthenticate(connection, tenant: "alice", token: Array(aliceToken.utf8))
            connections.append(connection)
        }
        // All 512 connected and authenticated: each does a few reads, 8 client threads at once.
        let failures = Locked(0)
        let expected = page
        let all = connections
        let threads = (0..<8).map { part in
            BackgroundThread {
                for round in 0..<3 {
                    for index in stride(from: part, to: count, by: 8) {
                        do {
                            try sendRead(all[index], Wire.SlabRange(slab: slab, offset: 8192, length: 4096), id: UInt64(round + 10))
                        } catch { failures.withLock { $0 += 1 } }
                    }
                    for index in stride(from: part, to: count, by: 8) {
                        guard case .success(let bytes)? = try? receiveRead(all[index], count: 4096), bytes == expected else {
                            failures.withLock { $0 += 1 }
                            continue
                        }
                    }
                }
            }
        }
        for thread in threads { thread.join() }
        #expect(failures.withLock { $0 } == 0)
        let threadCount = try #require(daemon.threadCount)
        let cores = sysconf(Int32(_SC_NPROCESSORS_ONLN))
        print("spillwayd threads with \(count) connected clients: \(threadCount) (cores \(cores))")
        #expect(threadCount <= cores + 8, "spillwayd runs \(threadCount) threads for \(count) connections")
        let stats = try owner.stats()
        #expect(stats.contains("\"connections\":\(count + 1)") || stats.contains("\"connections\": \(count + 1)"), "\(stats.prefix(400))")
        for connection in connections { connection.socket.close() }
    }

    @Test func badSlabIdsAndRangesGetTypedErrorsAndTheConnectionLives() throws {
        let server = try startDaemon(capacity: 4 << 20, slabSize: 1 << 20)
        defer { server.shutdown(drain: 0) }
        let owner = try DaemonClient(endpoint: endpoint(server), credentials: bob)
        let bobs = try owner.mapSlab()
        let connection = try rawConnection(endpoint(server))
        _ = try rawAuthenticate(connection, tenant: "alice", token: Array(aliceToken.utf8))
        let client = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        let mine = try client.mapSlab()
        let cases: [(Wire.SlabRange, WireErrorCode)] = [
            (Wire.SlabRange(slab: 0xFFFF_FFFF, offset: 0, length: 4096), .unknownSlab),
            (Wire.SlabRange(slab: 0, offset: 0, length: 4096), .unknownSlab),
            (Wire.SlabRange(slab: bobs, offset: 0, length: 4096), .notOwner),
            (Wire.SlabRange(slab: mine, offset: 1 << 20, length: 1), .outOfBounds),
            (Wire.SlabRange(slab: mine, offset: (1 << 20) - 4095, length: 4096), .outOfBounds),
            (Wire.SlabRange(slab: mine, offset: .max, length: 4096), .outOfBounds),
            (Wire.SlabRange(slab: mine, offset: .max, length: .max), .tooLarge),
            (Wire.SlabRange(slab: mine, offset: 0, length: UInt32(WireProtocol.maxDataLength) + 1), .tooLarge),
        ]
        for (index, (range, code)) in cases.enumerated() {
            try sendRead(connection, range, id: UInt64(100 + index))
            let reply = try receiveRead(connection, count: 0)
            guard case .failure(let error) = reply else {
                Issue.record("read of \(range) was served")
                continue
            }
            #expect(error.code == code, "\(range): \(error)")
        }
        // A write to a bad slab: typed, its data dropped, the stream intact.
        var writer = WireWriter()
        Wire.SlabRange(slab: 0x7FFF_FFF0, offset: 0, length: 4096).encode(into: &writer)
        let data = [UInt8](repeating: 7, count: 4096)
        try writer.bytes.withUnsafeBytes { meta in
            try data.withUnsafeBytes { try connection.send(.write, requestID: 200, meta: meta, data: $0) }
        }
        let (opcode, bytes) = try rawReceive(connection)
        #expect(opcode == .error)
        #expect(WireReader.decode(bytes, with: Wire.ErrorReply.decode)?.code == .unknownSlab)
        // A stale id (the slot remapped, a new generation) never reaches the new mapping.
        try client.unmapSlab(mine)
        let again = try client.mapSlab()
        #expect(again != mine)
        try sendRead(connection, Wire.SlabRange(slab: mine, offset: 0, length: 4096), id: 300)
        guard case .failure(let stale) = try receiveRead(connection, count: 0) else {
            Issue.record("a stale slab id was served")
            return
        }
        #expect(stale.code == .unknownSlab)
        // And the connection still serves its tenant.
        try connection.send(.heartbeat, requestID: 301, meta: [])
        #expect(try rawReceive(connection).0 == .heartbeat)
        #expect(server.counters.refusedAccesses.load(ordering: .relaxed) >= 6)
    }

    /// Batched frames: a batch mixing the tenant's slab, another tenant's, an unmapped one and
    /// an out-of-range offset is served range by range. Refused ranges get their own typed
    /// status (their write bytes dropped, never landing anywhere), served ones their bytes,
    /// and the counters count only what was served.
    @Test func batchedFramesAreServedRangeByRange() throws {
        let server = try startDaemon(capacity: 4 << 20, slabSize: 1 << 20)
        defer { server.shutdown(drain: 0) }
        let other = try DaemonClient(endpoint: endpoint(server), credentials: bob)
        let bobs = try other.mapSlab()
        let client = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        let mine = try client.mapSlab()
        let gone = try client.mapSlab()
        try client.unmapSlab(gone)
        // 24 pages of 1 KiB: one batched frame each way (PageFrames.maxOperations = 32).
        let count = 24
        func target(_ index: Int) -> (slab: UInt32, offset: UInt64, expected: Int32) {
            switch index % 4 {
            case 1: (bobs, UInt64(index) * 1024, EACCES)
            case 2 where index % 8 == 2: (gone, UInt64(index) * 1024, ENXIO)
            case 2: (mine, (1 << 20) - 512, EINVAL)
            default: (mine, UInt64(index) * 1024, 0)
            }
        }
        let buffers = UnsafeMutableRawPointer.allocate(byteCount: count * 1024, alignment: 64)
        defer { buffers.deallocate() }
        for index in 0..<count { memset(buffers + index * 1024, Int32(index + 1), 1024) }
        var writes = (0..<count).map { index in
            RemoteOperation(write: true, slab: target(index).slab, offset: target(index).offset, length: 1024, buffer: buffers + index * 1024)
        }
        let writesBefore = server.counters.writes.load(ordering: .relaxed)
        #expect(writes.withUnsafeMutableBufferPointer { client.execute($0) } == nil)
        for index in 0..<count { #expect(writes[index].status == target(index).expected, "write \(index)") }
        let servedCount = (0..<count).filter { target($0).expected == 0 }.count
        #expect(server.counters.writes.load(ordering: .relaxed) - writesBefore == servedCount)
        memset(buffers, 0, count * 1024)
        var reads = writes
        for index in 0..<count { reads[index].write = false }
        #expect(reads.withUnsafeMutableBufferPointer { client.execute($0) } == nil)
        for index in 0..<count {
            #expect(reads[index].status == target(index).expected, "read \(index)")
            if target(index).expected == 0 {
                #expect(UnsafeRawBufferPointer(start: buffers + index * 1024, count: 1024).allSatisfy { $0 == UInt8(index + 1) })
            }
        }
        // Bob's slab never received Alice's dropped bytes.
        var page = [UInt8](repeating: 0xEE, count: 1024)
        #expect(transfer(other, write: false, slab: bobs, offset: 1024, &page) == 0)
        #expect(page.allSatisfy { $0 == 0 })
    }

    /// The lock-free page path under churn: one tenant reads its slab while it is unmapped and
    /// the slot lent to another tenant who writes it at once. Every read returns the reader's
    /// own bytes or a refusal, never the other tenant's bytes (a retired slot pinned by a
    /// reply is not lent again until the reply is out; a stale id never reaches the new
    /// mapping).
    @Test func readsRacingUnmapAndRemapNeverSeeAnotherTenantsBytes() throws {
        let server = try startDaemon(capacity: 2 << 20, slabSize: 1 << 20)
        defer { server.shutdown(drain: 0) }
        let reader = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        let owner = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        let other = try DaemonClient(endpoint: endpoint(server), credentials: bob)
        let current = Locked<UInt32?>(nil)
        let stop = ManagedAtomicFlag()
        let wrong = Locked(0)
        let served = Locked(0)
        let refused = Locked(0)
        let readers = (0..<3).map { _ in
            BackgroundThread {
                while !stop.isSet {
                    guard let slab = current.withLock({ $0 }) else { continue }
                    var page = [UInt8](repeating: 0x11, count: 4096)
                    if transfer(reader, write: false, slab: slab, offset: 0, &page) == 0 {
                        if page.allSatisfy({ $0 == 0xAA }) { served.withLock { $0 += 1 } } else { wrong.withLock { $0 += 1 } }
                    } else {
                        refused.withLock { $0 += 1 }
                    }
                }
            }
        }
        let intruder = BackgroundThread {
            while !stop.isSet {
                guard let slab = try? other.mapSlab() else { continue }
                var page = [UInt8](repeating: 0xBB, count: 4096)
                _ = transfer(other, write: true, slab: slab, offset: 0, &page)
                try? other.unmapSlab(slab)
            }
        }
        let deadline = monotonicNanoseconds() + 2_000_000_000
        while monotonicNanoseconds() < deadline {
            guard let slab = try? owner.mapSlab() else { continue }
            var page = [UInt8](repeating: 0xAA, count: 4096)
            guard transfer(owner, write: true, slab: slab, offset: 0, &page) == 0 else { continue }
            current.withLock { $0 = slab }
            usleep(2000)
            try owner.unmapSlab(slab)  // readers now race the retire and bob's remap
            usleep(500)
        }
        stop.set()
        for thread in readers { thread.join() }
        intruder.join()
        print("racing reads: \(served.withLock { $0 }) served, \(refused.withLock { $0 }) refused, \(wrong.withLock { $0 }) wrong")
        #expect(wrong.withLock { $0 } == 0)
        #expect(served.withLock { $0 } > 0 && refused.withLock { $0 } > 0)
    }

    @Test func aStrangerSendingMoreThanAHandshakeMayIsCutOff() throws {
        let server = try startDaemon()
        defer { server.shutdown(drain: 0) }
        let socket = try TCPSocket.connect(to: endpoint(server), ioTimeout: 5)
        // A hello that announces 1 MiB of data: no handshake frame carries data, and the
        // daemon never buffers it; it answers tooLarge and closes.
        var header = [UInt8](repeating: 0, count: WireProtocol.headerSize)
        header.withUnsafeMutableBytes {
            FrameHeader(opcode: .hello, requestID: 1, metaLength: 0, dataLength: 1 << 20, payloadChecksum: 0).encode(into: $0.baseAddress!)
        }
        try header.withUnsafeMutableBytes { raw in
            var vector = iovec(iov_base: raw.baseAddress, iov_len: raw.count)
            try withUnsafeMutablePointer(to: &vector) { try socket.send(UnsafeMutableBufferPointer(start: $0, count: 1)) }
        }
        let connection = FrameConnection(socket: socket)
        let (opcode, bytes) = try rawReceive(connection)
        #expect(opcode == .error)
        #expect(WireReader.decode(bytes, with: Wire.ErrorReply.decode)?.code == .tooLarge)
        #expect(throws: RemoteError.self) { _ = try connection.receiveHeader() }
        #expect(server.snapshot().connections == 0 || eventually { server.snapshot().connections == 0 })
    }

    @Test func theDefaultHeadroomIsATenthOfRAMAtMostEightGiB() throws {
        let path = NSTemporaryDirectory() + "spillway-meminfo-\(getpid())"
        defer { unlink(path) }
        try "MemTotal:       16777216 kB\nMemAvailable:    8388608 kB\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(DaemonConfiguration.defaultHeadroom(memoryInfoPath: path) == (16 << 30) / 10)
        try "MemTotal:       268435456 kB\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(DaemonConfiguration.defaultHeadroom(memoryInfoPath: path) == 8 << 30)
        #expect(DaemonConfiguration.defaultHeadroom(memoryInfoPath: path + ".missing") == 0)
        #expect(DaemonConfiguration(capacity: 1 << 30).maxConnections >= 4096)
    }

    @Test func tokenFileSizesParseInEitherOrderWithAdmin() throws {
        let file = try TokenFile.parse("""
            a token-aaaaaaaaaaaaaaaa 64g
            b token-bbbbbbbbbbbbbbbb admin 2m
            c token-cccccccccccccccc 512MiB admin
            d token-dddddddddddddddd admin
            e token-eeeeeeeeeeeeeeee
            """)
        #expect(file.limits == ["a": 64 << 30, "b": 2 << 20, "c": 512 << 20])
        #expect(file.admins == ["b", "c", "d"])
        #expect(try TokenFile.parse(file.text) == file)
        for bad in ["x token-xxxxxxxxxxxxxxxx 64q", "x token-xxxxxxxxxxxxxxxx admin admin", "x token-xxxxxxxxxxxxxxxx 1g 2g",
                    "x token-xxxxxxxxxxxxxxxx 0", "x token-xxxxxxxxxxxxxxxx admin 1g extra"]
        {
            #expect(throws: SpillwayError.self, "\(bad)") { try TokenFile.parse(bad) }
        }
    }

    @Test func aTenantsSizeLimitCapsItsSlabsWithAClearError() throws {
        let limited = TokenFile(tokens: [("alice", aliceToken), ("bob", bobToken)], limits: ["alice": 2 << 20])
        let server = try startDaemon(capacity: 8 << 20, slabSize: 1 << 20, tokens: limited)
        defer { server.shutdown(drain: 0) }
        let client = try DaemonClient(endpoint: endpoint(server), credentials: alice)
        let first = try client.mapSlab()
        _ = try client.mapSlab()
        let error = #expect(throws: RemoteError.self) { _ = try client.mapSlab() }
        guard case .refused(let reply)? = error else { Issue.record("expected a refusal, got \(String(describing: error))"); return }
        #expect(reply.code == .noCapacity)
        #expect(reply.message.contains("alice") && reply.message.contains("limit of 2MiB"), "\(reply.message)")
        #expect(error?.errno == ENOSPC)
        #expect("\(error!)".contains("limit"))
        // Another tenant is not held to it, and a slab given back makes room again.
        let other = try DaemonClient(endpoint: endpoint(server), credentials: bob)
        for _ in 0..<3 { _ = try other.mapSlab() }
        try client.unmapSlab(first)
        _ = try client.mapSlab()
        // SIGHUP semantics: a reload that lifts the limit applies to the next mapping.
        server.reloadTokens(TokenFile(tokens: [("alice", aliceToken), ("bob", bobToken)]), counted: false)
        _ = try client.mapSlab()
    }
}

/// Measurement aid (skipped unless SPILLWAY_HOLD_CLIENTS=HOST:PORT,TENANT,TOKEN[,COUNT[,SECONDS]]
/// is set): holds COUNT (256) authenticated connections to a running daemon for SECONDS (5),
/// so its thread count can be read from /proc while they are connected.
@Suite struct HoldClients {
    @Test(.enabled(if: ProcessInfo.processInfo.environment["SPILLWAY_HOLD_CLIENTS"] != nil))
    func holdAuthenticatedClients() throws {
        let fields = ProcessInfo.processInfo.environment["SPILLWAY_HOLD_CLIENTS"]!.split(separator: ",").map(String.init)
        let endpoint = try Endpoint(parsing: fields[0])
        let count = fields.count > 3 ? Int(fields[3]) ?? 256 : 256
        let seconds = fields.count > 4 ? Double(fields[4]) ?? 5 : 5
        var connections: [FrameConnection] = []
        for _ in 0..<count {
            let connection = try rawConnection(endpoint, ioTimeout: 20)
            _ = try rawAuthenticate(connection, tenant: fields[1], token: Array(fields[2].utf8))
            connections.append(connection)
        }
        print("holding \(count) authenticated connections for \(seconds) s")
        usleep(UInt32(seconds * 1e6))
        for connection in connections { connection.socket.close() }
    }
}
