import Foundation
import Glibc
import Testing
import SpillwayPolicy
@testable import SpillwayCore
@testable import SpillwayMemoryTiers
@testable import SpillwayNVMe
@testable import SpillwayProtocol
@testable import SpillwayRemote
@testable import SpillwayServer
@testable import SpillwayStore
import SpillwayTestSupport


func remoteStore(_ servers: [Endpoint], credentials: ClientCredentials = ClientCredentials(tenant: "t", token: nil),
                 dramSlots: Int = 0, capacity: Int = 8 << 20) throws -> (TieredStore, RemoteTier)
{
    let remote = try RemoteTier(RemoteTierConfiguration(servers: servers, credentials: credentials, capacity: capacity,
                                                        slotSize: 4096, ioTimeout: 2, heartbeatInterval: 0.2))
    var tiers: [any Tier] = []
    if dramSlots > 0 { tiers.append(try DRAMTier(slotSize: 4096, capacitySlots: dramSlots, prefault: false)) }
    tiers.append(remote)
    return (try TieredStore(tiers: tiers, options: StoreOptions(maxPageSize: 3 * 4096, backgroundWorker: false)), remote)
}

@Suite(.serialized, .timeLimit(.minutes(5))) struct RemoteTierTests {
    @Test func storeSpillsDRAMToRemoteMemoryAndBack() throws {
        let servers = try (0..<2).map { _ in try startDaemon(tokens: testTokens) }
        defer { for server in servers { server.shutdown(drain: 0) } }
        let (store, remote) = try remoteStore(servers.map(endpoint), credentials: testCredentials, dramSlots: 8)
        var generator = SplitMix(seed: 5)
        var expected: [PageKey: [UInt8]] = [:]
        for step in 0..<600 {
            let key = PageKey(generator.next() % 80)
            switch generator.next() % 4 {
            case 0, 1:
                let page = pattern(UInt64(step), Int(generator.next() % 9000) + 1)
                try store.put(key, bytes: page)
                expected[key] = page
            case 2:
                if let page = expected[key] { #expect(try store.get(key) == page) }
            default:
                if expected[key] != nil {
                    try store.remove(key)
                    expected[key] = nil
                }
            }
        }
        for (key, page) in expected { #expect(try store.get(key) == page) }
        #expect(store.stats().tiers[0].demotionsOut > 0 && store.stats().tiers[1].hits > 0)
        #expect(store.stats().checksumFailures == 0)
        #expect(servers.reduce(0) { $0 + $1.snapshot().slabsLent } > 0)
        #expect(remote.liveDaemons == 2)
        store.close()
        // Closing gives the slabs back (no lease wait).
        let returned = eventually(5) { servers.reduce(0) { $0 + $1.snapshot().slabsLent } == 0 }
        #expect(returned)
    }

    @Test func aKilledDaemonMakesItsPagesUnavailableNeverWrong() throws {
        let daemons = try (0..<2).map { _ in try DaemonProcess() }
        let (store, remote) = try remoteStore(daemons.map(\.endpoint))
        defer { store.close() }
        var expected: [PageKey: [UInt8]] = [:]
        for value in 0..<300 {
            let page = pattern(UInt64(value), 4096)
            try store.put(PageKey(UInt64(value)), bytes: page)
            expected[PageKey(UInt64(value))] = page
        }
        daemons[0].kill(SIGKILL)
        _ = daemons[0].wait(seconds: 5)
        var served = 0
        var unavailable = 0
        for (key, page) in expected {
            do {
                let got = try store.get(key)
                #expect(got == page, "a read returned bytes other than those written")
                served += 1
            } catch {
                guard case .tierIO = error else {
                    Issue.record("unexpected error \(error)")
                    continue
                }
                unavailable += 1
            }
        }
        #expect(served > 0 && unavailable > 0, "served \(served), unavailable \(unavailable)")
        #expect(remote.liveDaemons == 1)
        // New writes go to the survivor.
        for value in 1000..<1100 {
            try store.put(PageKey(UInt64(value)), bytes: pattern(UInt64(value), 4096))
            #expect(try store.get(PageKey(UInt64(value))) == pattern(UInt64(value), 4096))
        }
    }

    /// A daemon restarted on the same port (a new instance, numbering its slabs from 1 again)
    /// rejoins as a fresh member once its backoff passes: new pages go to it again, while the
    /// pages it held before stay unavailable (typed) and its old slab ids are never sent to the
    /// new instance — not for reads, writes or unmaps.
    @Test func aRestartedDaemonRejoinsFreshAndItsOldSlabsAreNeverUsed() throws {
        let survivor = try startDaemon(tokens: testTokens)
        defer { survivor.shutdown(drain: 0) }
        let first = try startDaemon(tokens: testTokens)
        let port = first.port
        let remote = try RemoteTier(RemoteTierConfiguration(servers: [endpoint(survivor), endpoint(first)], credentials: testCredentials,
                                                            capacity: 8 << 20, slotSize: 4096, ioTimeout: 2, heartbeatInterval: 0))
        let store = try TieredStore(tiers: [remote], options: StoreOptions(maxPageSize: 4096, backgroundWorker: false))
        defer { store.close() }
        var expected: [PageKey: [UInt8]] = [:]
        for value in 0..<600 {
            try store.put(PageKey(UInt64(value)), bytes: pattern(UInt64(value), 4096))
            expected[PageKey(UInt64(value))] = pattern(UInt64(value), 4096)
        }
        #expect(first.snapshot().slabsLent > 0)
        first.shutdown(drain: 0)
        remote.heartbeat()
        #expect(remote.liveDaemons == 1)
        // Restarted on the same port: a new instance.
        let again = try RemoteMemoryServer(DaemonConfiguration(listen: Endpoint(host: "127.0.0.1", port: port), capacity: 8 << 20,
                                                               slabSize: 1 << 20, tokens: testTokens, checkInterval: 0.05))
        try again.start()
        defer { again.shutdown(drain: 0) }
        #expect(again.instance != first.instance)
        // Not before its backoff (1 s) has passed; then it rejoins (the test moves the clock).
        remote.fleet.rejoin()
        #expect(remote.liveDaemons == 1)
        remote.fleet.rejoin(now: monotonicNanoseconds() + 2_000_000_000)
        #expect(remote.liveDaemons == 2)
        #expect(remote.fleet.daemonsRejoined.load(ordering: .relaxed) == 1)
        // The old pages: served correctly from the survivor, unavailable from the restarted one.
        var served = 0
        var unavailable = 0
        for (key, page) in expected {
            do {
                #expect(try store.get(key) == page, "a read returned bytes other than those written")
                served += 1
            } catch {
                guard case .tierIO = error else {
                    Issue.record("unexpected error \(error)")
                    continue
                }
                unavailable += 1
            }
        }
        #expect(served > 0 && unavailable > 0, "served \(served), unavailable \(unavailable)")
        // New pages go to both daemons again, and read back.
        for value in 1000..<1600 {
            try store.put(PageKey(UInt64(value)), bytes: pattern(UInt64(value), 4096))
        }
        for value in 1000..<1600 { #expect(try store.get(PageKey(UInt64(value))) == pattern(UInt64(value), 4096)) }
        #expect(again.snapshot().slabsLent > 0, "the rejoined daemon is used for new slabs")
        // No old slab id ever reached the new instance: it refused nothing.
        #expect(again.counters.refusedAccesses.load(ordering: .relaxed) == 0)
    }

    /// A batch spanning both daemons goes to both at once; each page gets its own latency;
    /// with one daemon killed, the same batch serves the survivor's pages and fails the dead
    /// one's, typed, never with wrong bytes.
    @Test func aBatchSpanningDaemonsFansOutAndSurvivesALostDaemon() throws {
        let daemons = try (0..<2).map { _ in try DaemonProcess() }
        let (store, _) = try remoteStore(daemons.map(\.endpoint))
        defer { store.close() }
        // Slabs are 1 MiB (256 pages): 1,000 pages take four, spread over both daemons.
        let count = 1000
        let pages = (0..<count).map { pattern(UInt64($0) &+ 99, 4096) }
        let sources = pages.map { page -> UnsafeMutableRawBufferPointer in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 64)
            buffer.copyBytes(from: page)
            return buffer
        }
        let sinks = (0..<count).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 64) }
        defer { for buffer in sources + sinks { buffer.deallocate() } }
        var writes = (0..<count).map { PageWrite(key: PageKey(UInt64($0)), bytes: UnsafeRawBufferPointer(sources[$0])) }
        #expect(writes.withUnsafeMutableBufferPointer { store.put(batch: $0, queueDepth: 32) } == count)
        var reads = (0..<count).map { PageRead(key: PageKey(UInt64($0)), buffer: sinks[$0]) }
        #expect(reads.withUnsafeMutableBufferPointer { store.get(batch: $0, queueDepth: 32) } == count)
        for index in 0..<count {
            #expect(Array(sinks[index]) == pages[index], "page \(index)")
            #expect(reads[index].latencyNanoseconds > 0, "page \(index) has its own latency")
        }
        daemons[0].kill(SIGKILL)
        _ = daemons[0].wait(seconds: 5)
        for sink in sinks { sink.initializeMemory(as: UInt8.self, repeating: 0) }
        let served = reads.withUnsafeMutableBufferPointer { store.get(batch: $0, queueDepth: 32) }
        var failed = 0
        for index in 0..<count {
            if let error = reads[index].error {
                guard case .tierIO = error else {
                    Issue.record("page \(index): unexpected \(error)")
                    continue
                }
                failed += 1
            } else {
                #expect(Array(sinks[index]) == pages[index], "page \(index): bytes other than those written")
            }
        }
        #expect(served > 0 && failed > 0 && served + failed == count, "served \(served), failed \(failed)")
    }

    @Test func reclaimMovesPagesToAnotherDaemonWithNoLoss() throws {
        // The pressured daemon reads MemAvailable from a file the test controls.
        let memoryInfo = try MemoryInfoFile("spillway-test-reclaim")
        defer { memoryInfo.remove() }
        let path = memoryInfo.path
        func setAvailable(_ kilobytes: Int) throws { try memoryInfo.set(availableKilobytes: kilobytes, totalKilobytes: 100_000_000) }
        try setAvailable(8 << 20)  // 8 GiB free
        let pressured = try DaemonProcess(arguments: ["--headroom", "1g", "--memory-info", path, "--reclaim-deadline", "5"])
        let spare = try DaemonProcess()
        let (store, remote) = try remoteStore([pressured.endpoint, spare.endpoint])
        defer { store.close() }
        var expected: [PageKey: [UInt8]] = [:]
        for value in 0..<1500 {
            let page = pattern(UInt64(value) &* 7919, 4096)
            try store.put(PageKey(UInt64(value)), bytes: page)
            expected[PageKey(UInt64(value))] = page
        }
        func slabsLent(_ client: DaemonClient) throws -> Int {
            let stats = try client.stats()
            guard let range = stats.range(of: "\"slabs_lent\": ") ?? stats.range(of: "\"slabs_lent\":") else { return -1 }
            return Int(stats[range.upperBound...].prefix { $0.isNumber }) ?? -1
        }
        let before = try slabsLent(remote.clients[0]!)
        try #require(before > 0, "the pressured daemon should hold some of the tier's slabs")
        try setAvailable(100 << 10)  // 100 MiB free, headroom 1 GiB: every slab is reclaimed
        let gaveBack = eventually(15) { (try? slabsLent(remote.clients[0]!)) == 0 }
        #expect(gaveBack, "the tier gave every reclaimed slab back")
        #expect(remote.migratedSlabs.load(ordering: .relaxed) == before)
        #expect(remote.failedMigrations.load(ordering: .relaxed) == 0)
        #expect(remote.liveDaemons == 2)
        // No page was lost: every one reads back from the spare daemon.
        for (key, page) in expected { #expect(try store.get(key) == page) }
        // New writes keep working (on the spare daemon).
        try store.put(PageKey(99_999), bytes: pattern(1, 4096))
        #expect(try store.get(PageKey(99_999)) == pattern(1, 4096))
    }

    @Test func aReclaimNobodyCanHonourLosesOnlyThatSlabsPages() throws {
        let path = "/tmp/spillway-test-\(getpid())-lost-meminfo"
        defer { unlink(path) }
        try "MemAvailable: 8388608 kB\n".write(toFile: path, atomically: true, encoding: .utf8)
        // One daemon: nowhere to move to, so the slab is revoked at the deadline.
        let daemon = try DaemonProcess(arguments: ["--headroom", "1g", "--memory-info", path, "--reclaim-deadline", "0.5"])
        let (store, remote) = try remoteStore([daemon.endpoint], dramSlots: 0)
        defer { store.close() }
        // Three slabs' worth of pages (256 slots of 4 KiB per 1 MiB slab).
        let slabSlots = remote.slabSize / 4096
        let count = 2 * slabSlots + slabSlots / 2
        for value in 0..<count { try store.put(PageKey(UInt64(value)), bytes: pattern(UInt64(value), 4096)) }
        let slabs = Set((0..<count).compactMap { store.location(of: PageKey(UInt64($0)))?.extent.firstSlot }.map { Int($0) / slabSlots })
        try #require(slabs.count == 3, "pages span \(slabs.count) slabs")
        // A shortfall of half a slab: the daemon asks for exactly one slab (its newest) back.
        try "MemAvailable: \((1 << 20) - 512) kB\n".write(toFile: path, atomically: true, encoding: .utf8)
        let client = try #require(remote.clients[0])
        func statistic(_ name: String) -> Int {
            guard let stats = try? client.stats(), let range = stats.range(of: "\"\(name)\": ") else { return -1 }
            return Int(stats[range.upperBound...].prefix { $0.isNumber }) ?? -1
        }
        func revoked() -> Int { statistic("revoked_slabs") }
        let didRevoke = eventually(15) { revoked() >= 1 }
        try #require(didRevoke, "the daemon never revoked the slab")
        // The revoked slab's memory is back: the daemon must not take another one.
        try "MemAvailable: 8388608 kB\n".write(toFile: path, atomically: true, encoding: .utf8)
        // A reclaim the daemon had already asked for is called off, not carried out.
        let settled = eventually(10) { statistic("reclaims_pending") == 0 }
        #expect(settled)
        #expect(revoked() == 1, "one slab reclaimed, not all")
        var lostSlabs: Set<Int> = []
        var served = 0
        for value in 0..<count {
            let key = PageKey(UInt64(value))
            let slab = Int(try #require(store.location(of: key)).extent.firstSlot) / slabSlots
            do {
                #expect(try store.get(key) == pattern(UInt64(value), 4096), "a read returned bytes other than those written")
                served += 1
            } catch {
                guard case .tierIO = error else {
                    Issue.record("unexpected error \(error)")
                    continue
                }
                lostSlabs.insert(slab)
            }
        }
        #expect(lostSlabs.count == 1, "pages were lost from slabs \(lostSlabs)")
        #expect(served >= 2 * slabSlots - slabSlots / 2, "the other slabs' pages are all served (\(served))")
    }

    @Test func aReclaimWithNoOtherDaemonMovesPagesDownToNVMe() throws {
        let path = "/tmp/spillway-test-\(getpid())-evacuate-meminfo"
        let nvmePath = "/tmp/spillway-test-\(getpid())-evacuate.nvme"
        defer {
            unlink(path)
            unlink(nvmePath)
        }
        try "MemAvailable: 8388608 kB\n".write(toFile: path, atomically: true, encoding: .utf8)
        let daemon = try DaemonProcess(arguments: ["--headroom", "1g", "--memory-info", path, "--reclaim-deadline", "5"])
        let remote = try RemoteTier(RemoteTierConfiguration(servers: [daemon.endpoint], credentials: ClientCredentials(tenant: "t", token: nil),
                                                            capacity: 4 << 20, slotSize: 4096, ioTimeout: 2, heartbeatInterval: 0.2))
        let tiers: [any Tier] = [try DRAMTier(slotSize: 4096, capacitySlots: 16, prefault: false), remote,
                                 try NVMeTier(NVMeTierConfiguration(path: nvmePath, slotSize: 4096, capacitySlots: 2048))]
        // Next-tier demotion: DRAM's overflow must land on the remote tier (cost-aware demotion
        // may send pages never read again straight to NVMe, which is cheaper to write).
        let store = try TieredStore(tiers: tiers, policy: try StorePolicy.named(StorePolicy.defaultName, demotion: .nextTier),
                                    options: StoreOptions(maxPageSize: 4096, backgroundWorker: false))
        defer { store.close() }
        for value in 0..<400 { try store.put(PageKey(UInt64(value)), bytes: pattern(UInt64(value) &+ 11, 4096)) }
        let onRemote = store.directory.pageCount(tier: 1)
        try #require(onRemote > 0)
        try "MemAvailable: 1024 kB\n".write(toFile: path, atomically: true, encoding: .utf8)
        let movedDown = eventually(15) { store.directory.pageCount(tier: 1) == 0 }
        #expect(movedDown, "every remote page moved down")
        #expect(remote.evacuatedSlabs.load(ordering: .relaxed) > 0)
        #expect(remote.failedMigrations.load(ordering: .relaxed) == 0)
        for value in 0..<400 { #expect(try store.get(PageKey(UInt64(value))) == pattern(UInt64(value) &+ 11, 4096)) }
    }

    @Test func prometheusEndpointReportsSlabsOpsAndTenants() throws {
        let daemon = try DaemonProcess(arguments: ["--metrics", "127.0.0.1:0"])
        // No token given: the daemon's generated token file (tenant "spillway") is found by address.
        let client = try DaemonClient(endpoint: daemon.endpoint, credentials: ClientCredentials(tenant: "carol", token: nil))
        #expect(client.credentials.tenant == "spillway")
        let slab = try client.mapSlab()
        var page = pattern(3, 4096)
        for offset in 0..<5 { #expect(transfer(client, write: true, slab: slab, offset: UInt64(offset * 4096), &page) == 0) }
        #expect(transfer(client, write: false, slab: slab, offset: 0, &page) == 0)
        #expect(transfer(client, write: false, slab: slab, offset: 1 << 30, &page) == EINVAL)  // out of bounds: refused, counted
        let (status, body) = try daemon.scrape()
        #expect(status == "HTTP/1.1 200 OK")
        let lines = Set(body.split(separator: "\n").map(String.init))
        #expect(lines.contains("spillwayd_slabs_lent 1.0"))
        #expect(lines.contains("spillwayd_writes_total 5"))
        #expect(lines.contains("spillwayd_refused_accesses_total 1"))
        #expect(lines.contains("spillwayd_tenant_writes_total{tenant=\"spillway\"} 5"))
        #expect(lines.contains("spillwayd_tenant_reads_total{tenant=\"spillway\"} 1"))
        #expect(lines.contains("spillwayd_tenant_written_bytes_total{tenant=\"spillway\"} 20480"))
        #expect(lines.contains("# TYPE spillwayd_writes_total counter"))
        // Counters stay monotonic across scrapes.
        #expect(transfer(client, write: true, slab: slab, offset: 0, &page) == 0)
        #expect(Set(try daemon.scrape().1.split(separator: "\n").map(String.init)).contains("spillwayd_writes_total 6"))
        #expect(try daemon.scrape("/other").0 == "HTTP/1.1 404 Not Found")
        daemon.kill(SIGTERM)
        #expect(daemon.wait(seconds: 10) == 0)
    }

    @Test func sigtermWithRequestsInFlightDrainsAndExitsZero() throws {
        let daemon = try DaemonProcess()
        let client = try DaemonClient(endpoint: daemon.endpoint, credentials: ClientCredentials(tenant: "t", token: nil), ioTimeout: 5)
        let observer = try DaemonClient(endpoint: daemon.endpoint, credentials: ClientCredentials(tenant: "t", token: nil), ioTimeout: 5)
        let slab = try client.mapSlab()
        // A long pipelined stream of writes (32 in flight at a time) runs while SIGTERM lands.
        let count = 200_000
        let statuses = Locked<[Int32]>([])
        let writer = BackgroundThread {
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 64)
            defer { buffer.deallocate() }
            memset(buffer, 0x5A, 4096)
            let operations = UnsafeMutableBufferPointer<RemoteOperation>.allocate(capacity: count)
            defer { operations.deallocate() }
            for index in 0..<count {
                operations[index] = RemoteOperation(write: true, slab: slab, offset: UInt64(index % 256) * 4096, length: 4096, buffer: buffer)
            }
            client.execute(operations, window: 32)
            statuses.withLock { $0 = operations.map(\.status) }
        }
        func writesServed() -> Int {
            guard let stats = try? observer.stats(), let range = stats.range(of: "\"writes\": ") else { return 0 }
            return Int(stats[range.upperBound...].prefix { $0.isNumber }) ?? 0
        }
        let streaming = eventually(10) { writesServed() >= 1000 }
        try #require(streaming, "the write stream never got going")
        daemon.kill(SIGTERM)
        #expect(daemon.wait(seconds: 10) == 0)
        writer.join()
        let outcome = statuses.withLock { $0 }
        let succeeded = outcome.filter { $0 == 0 }.count
        // In flight when the daemon went: acknowledged, or a typed connection error; never a hang.
        #expect(succeeded >= 1000 && succeeded < count, "\(succeeded) of \(count) writes acknowledged")
        #expect(outcome.allSatisfy { [0, ECONNRESET, EPIPE, ESHUTDOWN, EAGAIN].contains($0) },
                "unexpected statuses \(Set(outcome))")
        // The daemon is gone: a typed error, not a hang.
        var back = [UInt8](repeating: 0, count: 4096)
        #expect(transfer(client, write: false, slab: slab, offset: 0, &back) != 0)
    }

    @Test func aStoppedDaemonFailsReadsWithinTheTimeoutAndRecoversAfterSIGCONT() throws {
        let daemon = try DaemonProcess()
        defer { daemon.kill9() }
        let client = try DaemonClient(endpoint: daemon.endpoint, credentials: ClientCredentials(tenant: "t", token: nil), ioTimeout: 1)
        let slab = try client.mapSlab()
        var page = pattern(21, 4096)
        #expect(transfer(client, write: true, slab: slab, offset: 0, &page) == 0)
        daemon.kill(SIGSTOP)
        let halted = eventually(5) { daemon.isStopped }
        try #require(halted, "SIGSTOP did not stop the daemon")
        var back = [UInt8](repeating: 0, count: 4096)
        let started = monotonicNanoseconds()
        let stopped = transfer(client, write: false, slab: slab, offset: 0, &back)
        let waited = Double(monotonicNanoseconds() - started) / 1e9
        #expect(stopped == EAGAIN, "a read from a stopped daemon fails with the timeout's errno, got \(stopped)")
        #expect(waited < 5, "bounded by the 1 s I/O timeout (took \(waited) s)")
        daemon.kill(SIGCONT)
        // The timed-out connection was dropped; a new one serves the same bytes.
        back = [UInt8](repeating: 0, count: 4096)
        #expect(transfer(client, write: false, slab: slab, offset: 0, &back) == 0)
        #expect(back == page)
    }

    @Test func spillwaydRefusesToListenBeyondLoopbackWithoutATokenFile() throws {
        // A generated token only reaches this host's users, so without --token-file the
        // daemon must not be reachable from the network.
        let error = #expect(throws: SpillwayError.self) { _ = try DaemonProcess(listen: "0.0.0.0:0") }
        #expect("\(String(describing: error))".contains("did not report its port"))
    }
}
