import Logging
import Spillway

#if canImport(Glibc)
import Glibc
#endif

/// `spillway bench remote --clients N --tenants T`: many clients against the daemons at
/// `--servers`, as a daemon serving a cluster sees them. The first T tenants of the token file
/// each open their own connections (one `DaemonClient` per tenant and daemon) and share the
/// working set (`--size`: each tenant maps and prefills size/T bytes, spread over the
/// daemons); N connections in all (connection c belongs to tenant c mod T, daemon (c / T)
/// mod S), each with exactly one 4 KiB random read outstanding, driven by min(cores, N)
/// threads (thread i owns the connections c ≡ i mod threads and keeps one request in flight
/// on each through `MultiDaemonExchange`, window 1). `iops` is the total of all connections;
/// latency is each read's own (its reply's time minus the previous reply's on its connection,
/// i.e. send to reply). While the clients run, the thread count of each daemon that is a
/// local process (found by its listening port in /proc) is read from /proc/PID/status.
public enum RemoteClientsBench {
    public struct Options: Sendable {
        public var servers: [String]
        public var tokenFile: String
        public var clients: Int
        public var tenants: Int
        public var size: Int
        public var blockSize = 4096
        public var durationSeconds: Double
        public var seed: UInt64 = 42

        public init(servers: [String], tokenFile: String, clients: Int, tenants: Int, size: Int, durationSeconds: Double) {
            self.servers = servers
            self.tokenFile = tokenFile
            self.clients = clients
            self.tenants = tenants
            self.size = size
            self.durationSeconds = durationSeconds
        }
    }

    /// Reads per connection per exchange round (one outstanding at a time).
    static let readsPerRound = 128

    /// One (tenant, daemon) pair: its client, its slabs, its share of the working set.
    final class Pair: @unchecked Sendable {
        let tenant: Int
        let client: DaemonClient
        var slabs: [UInt32] = []
        var pages = 0
        let slabPages: Int

        init(tenant: Int, client: DaemonClient, slabPages: Int) {
            self.tenant = tenant
            self.client = client
            self.slabPages = slabPages
        }

        func location(ofPage page: Int) -> (slab: UInt32, offset: UInt64) {
            (slabs[page / slabPages], UInt64(page % slabPages))
        }
    }

    /// What one driving thread owns: its connections' legs, their operations and buffers,
    /// and the latencies it measured.
    final class Worker: @unchecked Sendable {
        let pairs: [Pair]
        let legs: UnsafeMutableBufferPointer<ExchangeLeg>
        let operations: UnsafeMutableBufferPointer<RemoteOperation>
        let buffers: UnsafeMutableRawPointer
        let lastReply: UnsafeMutableBufferPointer<UInt64>
        var latencies: [UInt64] = []
        var ops = 0
        var errors = 0
        var random: SplitMix64

        init(pairs: [Pair], blockSize: Int, seed: UInt64) {
            self.pairs = pairs
            let count = pairs.count
            legs = .allocate(capacity: count)
            operations = .allocate(capacity: count * RemoteClientsBench.readsPerRound)
            buffers = .allocate(byteCount: max(1, count) * blockSize, alignment: 4096)
            lastReply = .allocate(capacity: count)
            lastReply.initialize(repeating: 0)
            random = SplitMix64(seed: seed)
            for (leg, pair) in pairs.enumerated() {
                let buffer = buffers + leg * blockSize
                for index in 0..<RemoteClientsBench.readsPerRound {
                    operations.initializeElement(at: leg * RemoteClientsBench.readsPerRound + index,
                                                 to: RemoteOperation(write: false, slab: 0, offset: 0, length: blockSize, buffer: buffer))
                }
                legs.initializeElement(at: leg, to: ExchangeLeg(
                    client: pair.client,
                    operations: UnsafeMutableBufferPointer(rebasing: operations[(leg * RemoteClientsBench.readsPerRound)..<((leg + 1) * RemoteClientsBench.readsPerRound)])))
            }
            latencies.reserveCapacity(1 << 20)
        }

        deinit {
            legs.deinitialize()
            legs.deallocate()
            operations.deallocate()
            buffers.deallocate()
            lastReply.deallocate()
        }

        /// Exchange rounds until `stop` says so; `measuring` says whether to count them.
        func run(blockSize: Int, stop: Locked<Int>) {
            let perRound = RemoteClientsBench.readsPerRound
            while true {
                let phase = stop.withLock { $0 }
                if phase == 2 { return }
                for leg in 0..<pairs.count {
                    let pair = pairs[leg]
                    for index in 0..<perRound {
                        let page = Int(random.next() % UInt64(pair.pages))
                        let (slab, slot) = pair.location(ofPage: page)
                        operations[leg * perRound + index].slab = slab
                        operations[leg * perRound + index].offset = slot * UInt64(blockSize)
                    }
                }
                let started = monotonicNanoseconds()
                for leg in 0..<pairs.count { lastReply[leg] = started }
                let measuring = phase == 1
                // One request outstanding per connection: no batching into frames.
                MultiDaemonExchange.run(legs, window: 1, frameOperations: 1, onReply: { leg, _ in
                    let now = monotonicNanoseconds()
                    if measuring && latencies.count < (8 << 20) { latencies.append(now &- lastReply[leg]) }
                    lastReply[leg] = now
                }, stop: { _ in false })
                if measuring {
                    ops += pairs.count * perRound
                    for index in 0..<operations.count where operations[index].status != 0 { errors += 1 }
                }
            }
        }
    }

    public static func run(_ options: Options, logger: Logger = Logger(label: "spillway.bench")) throws(SpillwayError) -> JSONValue {
        guard options.clients >= 1, options.clients <= 65536 else { throw .invalidArgument("--clients must be between 1 and 65536") }
        guard options.tenants >= 1, options.tenants <= options.clients else {
            throw .invalidArgument("--tenants must be between 1 and --clients (\(options.clients))")
        }
        guard !options.servers.isEmpty else { throw .invalidArgument("--clients needs --servers (spillwayd daemons) and --token-file") }
        let endpoints = try options.servers.map { (text: String) throws(SpillwayError) -> Endpoint in try Endpoint(parsing: text) }
        let tokens = try TokenFile.load(options.tokenFile, logger: logger)
        guard tokens.names.count >= options.tenants else {
            throw .invalidArgument("--tenants \(options.tenants): the token file \(options.tokenFile) names only \(tokens.names.count) tenant(s)")
        }
        let blockSize = options.blockSize
        let cores = max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        let threads = min(cores, options.clients)
        let servers = endpoints.count

        // Connections per (tenant, daemon).
        var connections = [[Int]](repeating: [Int](repeating: 0, count: servers), count: options.tenants)
        for connection in 0..<options.clients {
            connections[connection % options.tenants][(connection / options.tenants) % servers] += 1
        }
        var pairs = [[Pair?]](repeating: [Pair?](repeating: nil, count: servers), count: options.tenants)
        var all: [Pair] = []
        defer {
            for pair in all {
                for slab in pair.slabs { try? pair.client.unmapSlab(slab) }
                pair.client.close()
            }
        }
        let pagesPerTenant = max(1, options.size / options.tenants / blockSize)
        for tenant in 0..<options.tenants {
            let name = tokens.names[tenant]
            let used = (0..<servers).filter { connections[tenant][$0] > 0 }
            for (position, server) in used.enumerated() {
                let client: DaemonClient
                do {
                    client = try DaemonClient(endpoint: endpoints[server], credentials: ClientCredentials(tenant: name, token: tokens.tokens[name]),
                                              maxConnections: connections[tenant][server], ioTimeout: 10, pollMicroseconds: 0, logger: logger)
                } catch {
                    throw .invalidArgument("tenant '\(name)' could not connect to \(endpoints[server]): \(error)")
                }
                let slabSize = Int(client.welcome.slabSize)
                let pair = Pair(tenant: tenant, client: client, slabPages: slabSize / blockSize)
                all.append(pair)
                // This daemon's share of the tenant's pages (the first ones take the remainder).
                pair.pages = max(1, pagesPerTenant / used.count + (position < pagesPerTenant % used.count ? 1 : 0))
                let slabCount = (pair.pages + pair.slabPages - 1) / pair.slabPages
                for _ in 0..<slabCount {
                    do {
                        pair.slabs.append(try client.mapSlab())
                    } catch {
                        throw .invalidArgument("tenant '\(name)' could not map a slab on \(endpoints[server]): \(error)")
                    }
                }
                pairs[tenant][server] = pair
            }
        }

        // Prefill (untimed): every page's content derives from (tenant, daemon, page).
        let chunk = 64
        let prefill = UnsafeMutableRawPointer.allocate(byteCount: chunk * blockSize, alignment: 4096)
        defer { prefill.deallocate() }
        let writes = UnsafeMutableBufferPointer<RemoteOperation>.allocate(capacity: chunk)
        defer { writes.deallocate() }
        for (index, pair) in all.enumerated() {
            var page = 0
            while page < pair.pages {
                let count = min(chunk, pair.pages - page)
                for offset in 0..<count {
                    let buffer = UnsafeMutableRawBufferPointer(start: prefill + offset * blockSize, count: blockSize)
                    BenchRunner.fillPage(buffer, key: Self.key(pair: index, page: page + offset), seed: options.seed)
                    let (slab, slot) = pair.location(ofPage: page + offset)
                    writes.initializeElement(at: offset, to: RemoteOperation(write: true, slab: slab, offset: slot * UInt64(blockSize),
                                                                            length: blockSize, buffer: buffer.baseAddress!))
                }
                let operations = UnsafeMutableBufferPointer(rebasing: writes[0..<count])
                if let error = pair.client.execute(operations, window: 32) {
                    throw .invalidArgument("prefill on \(pair.client.endpoint) failed: \(error)")
                }
                if let failed = operations.first(where: { $0.status != 0 }) {
                    throw .tierIO(tier: "remote", operation: "prefill write", errno: failed.status)
                }
                page += count
            }
        }

        // Connections to threads: thread i drives connections i, i + threads, …
        var owned = [[Pair]](repeating: [], count: threads)
        for connection in 0..<options.clients {
            let pair = pairs[connection % options.tenants][(connection / options.tenants) % servers]!
            owned[connection % threads].append(pair)
        }
        let workers = owned.enumerated().map { thread, pairs in
            Worker(pairs: pairs, blockSize: blockSize, seed: options.seed &+ UInt64(thread) &* 0x9E37_79B9_7F4A_7C15)
        }
        // 0 = warming up (connections open, first replies), 1 = measuring, 2 = stop.
        let phase = Locked(0)
        let running = workers.map { worker in BackgroundThread { worker.run(blockSize: blockSize, stop: phase) } }
        usleep(UInt32(min(1.0, options.durationSeconds / 4) * 1e6))
        phase.withLock { $0 = 1 }
        let start = monotonicNanoseconds()
        // Read the daemons' thread counts halfway, while every connection is busy.
        usleep(UInt32(options.durationSeconds / 2 * 1e6))
        let daemons = endpoints.map { DaemonProcessInfo.find(listeningOn: $0) }
        let remaining = options.durationSeconds - Double(monotonicNanoseconds() - start) / 1e9
        if remaining > 0 { usleep(UInt32(remaining * 1e6)) }
        phase.withLock { $0 = 2 }
        for thread in running { thread.join() }
        // The rounds in flight when the clock stopped are counted whole (as their time is).
        let seconds = Double(monotonicNanoseconds() - start) / 1e9

        // Check a sample: each read page holds its prefill.
        var verified = 0
        let readBack = UnsafeMutableRawPointer.allocate(byteCount: blockSize, alignment: 4096)
        let expected = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 4096)
        defer { readBack.deallocate(); expected.deallocate() }
        var random = SplitMix64(seed: options.seed &+ 1)
        for (index, pair) in all.enumerated() {
            for _ in 0..<min(pair.pages, 64) {
                let page = Int(random.next() % UInt64(pair.pages))
                let (slab, slot) = pair.location(ofPage: page)
                var read = RemoteOperation(write: false, slab: slab, offset: slot * UInt64(blockSize), length: blockSize, buffer: readBack)
                _ = withUnsafeMutablePointer(to: &read) { pair.client.execute(UnsafeMutableBufferPointer(start: $0, count: 1)) }
                BenchRunner.fillPage(expected, key: Self.key(pair: index, page: page), seed: options.seed)
                guard read.status == 0, memcmp(readBack, expected.baseAddress!, blockSize) == 0 else {
                    throw .invalidArgument("verification failed: tenant \(tokens.names[pair.tenant]) page \(page) on \(pair.client.endpoint) (status \(read.status))")
                }
                verified += 1
            }
        }

        var latencies = workers.flatMap(\.latencies)
        latencies.sort()
        func percentile(_ p: Double) -> Int {
            latencies.isEmpty ? 0 : Int(latencies[min(latencies.count - 1, Int(Double(latencies.count) * p / 100))])
        }
        let ops = workers.map(\.ops).reduce(0, +)
        let errors = workers.map(\.errors).reduce(0, +)
        let iops = seconds > 0 ? Double(ops) / seconds : 0
        let found = zip(endpoints, daemons).compactMap { endpoint, info in
            info.map { JSONValue.object([("server", .string(endpoint.description)), ("pid", .int(Int($0.pid))), ("threads", .int($0.threads))]) }
        }
        return .object([
            ("tier", .string("remote")), ("mode", .string("clients")), ("pattern", .string("randread")), ("block_size", .int(blockSize)),
            ("queue_depth", .int(1)), ("clients", .int(options.clients)), ("tenants", .int(options.tenants)),
            ("client_threads", .int(threads)), ("servers", .int(servers)), ("ops", .int(ops)), ("iops", .double(iops)),
            ("bytes_per_s", .double(iops * Double(blockSize))),
            ("latency_ns", .object([
                ("p50", .int(percentile(50))), ("p99", .int(percentile(99))), ("p999", .int(percentile(99.9))),
                ("max", .int(latencies.last.map { Int($0) } ?? 0)),
            ])),
            ("latency_samples", .int(latencies.count)), ("duration_s", .double(seconds)),
            ("working_set_bytes", .int(all.map(\.pages).reduce(0, +) * blockSize)), ("seed", .int(Int(bitPattern: UInt(options.seed)))),
            ("errors", .int(errors)), ("verified_pages", .int(verified)),
            ("daemon_threads", .array(found)),
        ])
    }

    static func key(pair: Int, page: Int) -> UInt64 { UInt64(pair) << 32 | UInt64(page) }
}

/// A local `spillwayd` found by the port it listens on: /proc/net/tcp gives the listening
/// socket's inode, /proc/PID/fd the process holding it, /proc/PID/status its threads.
public enum DaemonProcessInfo {
    public static func find(listeningOn endpoint: Endpoint) -> (pid: Int32, threads: Int)? {
        guard endpoint.isLoopback, let inode = listeningInode(port: endpoint.port) else { return nil }
        let target = "socket:[\(inode)]"
        guard let proc = opendir("/proc") else { return nil }
        defer { closedir(proc) }
        while let entry = readdir(proc) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let pid = Int32(name), let fds = opendir("/proc/\(pid)/fd") else { continue }
            defer { closedir(fds) }
            while let fd = readdir(fds) {
                let fdName = withUnsafeBytes(of: fd.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                guard Int(fdName) != nil else { continue }
                var link = [CChar](repeating: 0, count: 256)
                let length = readlink("/proc/\(pid)/fd/\(fdName)", &link, link.count - 1)
                guard length > 0 else { continue }
                let text = String(decoding: link[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
                if text == target, let threads = threadCount(pid: pid) { return (pid, threads) }
            }
        }
        return nil
    }

    /// `Threads:` of /proc/PID/status.
    public static func threadCount(pid: Int32) -> Int? {
        guard let status = readText("/proc/\(pid)/status") else { return nil }
        for line in status.split(separator: "\n") where line.hasPrefix("Threads:") {
            return Int(line.dropFirst("Threads:".count).trimmingPrefix(while: { $0 == " " || $0 == "\t" }))
        }
        return nil
    }

    static func listeningInode(port: UInt16) -> String? {
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            guard let text = readText(table) else { continue }
            for line in text.split(separator: "\n").dropFirst() {
                let fields = line.split(separator: " ")
                // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                guard fields.count > 9, fields[3] == "0A", let colon = fields[1].lastIndex(of: ":"),
                      UInt16(fields[1][fields[1].index(after: colon)...], radix: 16) == port
                else { continue }
                return String(fields[9])
            }
        }
        return nil
    }

    static func readText(_ path: String) -> String? {
        let descriptor = open(path, O_RDONLY)
        guard descriptor >= 0 else { return nil }
        defer { close(descriptor) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let got = read(descriptor, &chunk, chunk.count)
            if got <= 0 { break }
            bytes += chunk[0..<got]
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
