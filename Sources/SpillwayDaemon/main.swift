import ArgumentParser
import Dispatch
import Logging
import Metrics
import Prometheus
import ServiceLifecycle
import Spillway
import SpillwayCluster
import SpillwayCommandSupport
import SpillwayRemote
import SpillwayServer
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `spillwayd`: the remote-memory daemon that lends spare DRAM in slabs (see
/// docs/operations.md). Runs until SIGTERM or SIGINT, then stops accepting, tells clients
/// (`goodbye`), drains in-flight requests and exits 0.
struct SpillwayDaemon: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "spillwayd",
        abstract: "Lend this machine's spare DRAM to Spillway clients (remote memory tier).",
        discussion: """
        Options may also come from --config FILE (TOML, keys = long option names); command-line options win.
        Every client authenticates. Without --token-file the daemon listens on loopback only and
        generates a random token in a 0600 file in a 0700 per-user runtime directory (its path is
        printed and in the startup JSON as "token_file"); spillway commands of the same user find
        it by the daemon's address. SIGHUP reloads --token-file.
        """,
        version: SpillwayVersion.current)

    @Option(help: "HOST:PORT to listen on (default 127.0.0.1:7450; port 0 picks one and prints it).")
    var listen: String?

    @Option(help: "Memory to lend, e.g. 8g (default 1g).")
    var capacity: SizeArgument?

    @Option(name: .customLong("slab-size"), help: "Unit of lending (default 64m).")
    var slabSize: SizeArgument?

    @Option(name: .customLong("token-file"), help: "Tenant tokens: lines 'NAME TOKEN'.")
    var tokenFile: String?

    @Option(help: "PORT or HOST:PORT for Prometheus /metrics (off unless given; a bare port binds 127.0.0.1).")
    var metrics: String?

    @Option(name: .customLong("max-connections"), help: "Connections in all (default 4096; the open-file limit is raised to fit).")
    var maxConnections: Int?

    @Option(name: .customLong("max-unauthenticated"), help: "Connections still in the handshake; a newcomer evicts the oldest (default 64).")
    var maxUnauthenticated: Int?

    @Option(name: .customLong("handshake-timeout"), help: "Seconds for a whole handshake (default 5).")
    var handshakeTimeout: Double?

    @Option(name: .customLong("send-timeout"), help: "Seconds a reply may wait on a client that stopped reading before it is disconnected (default 10).")
    var sendTimeout: Double?

    @Option(help: "Free host memory to keep for the host itself; below it slabs are reclaimed (default 10% of RAM, at most 8g; 0 = reclaim off).")
    var headroom: SizeArgument?

    @Option(help: "Seconds a disconnected client keeps its slabs (default 30).")
    var lease: Double?

    @Option(name: .customLong("reclaim-deadline"), help: "Seconds a client gets to give a reclaimed slab back (default 5).")
    var reclaimDeadline: Double?

    @Option(name: .customLong("memory-info"), help: "Where to read MemAvailable (default /proc/meminfo; a container may point elsewhere).")
    var memoryInfo: String?

    @Option(name: .customLong("poll-us"), help: "Microseconds a worker polls for events after the last one before sleeping (default \(DaemonConfiguration.defaultPollMicroseconds); 0 = never poll).")
    var pollMicroseconds: Int?

    @Option(help: "Event-loop threads serving connections (default min(cores, 8)).")
    var workers: Int?

    @Option(help: "Page transports: auto (RMA through libfabric when a provider is usable, plus TCP), rma (fail without one) or tcp (default auto).")
    var transport: String?

    @Option(name: .customLong("fabric-provider"), help: "libfabric provider for RMA, e.g. verbs, efa, tcp (default: verbs or efa when present).")
    var fabricProvider: String?

    @Option(help: "etcd endpoints (http://HOST:2379[,…]): register this daemon in a cluster's registry under a lease (with --cluster).")
    var etcd: String?

    @Option(help: "Cluster name in the registry (with --etcd).")
    var cluster: String?

    @Option(name: .customLong("failure-domain"), help: "Failure domain (rack, host, zone) clients keep a stripe's splits apart by (default: this host's name, so daemons sharing a host share a domain; erasure coding needs at least ceil((k+r)/r) domains).")
    var failureDomain: String?

    @Option(name: .customLong("etcd-lease-ttl"), help: "Seconds the registration outlives a daemon that stopped renewing it (default 10).")
    var etcdLeaseTTL: Int?

    @Option(help: "HOST:PORT clients should use, when --listen is a wildcard address (default: the --listen host and bound port).")
    var advertise: String?

    @Flag(name: .customLong("enable-test-faults"), help: .hidden)
    var enableTestFaults = false

    @Option(name: .customLong("test-delay-us"), help: .hidden)
    var testDelayMicroseconds: Int?

    @Option(name: .customLong("log-level"), help: "Log level on stderr (default info).")
    var logLevel: LogLevelArgument?

    @Option(help: "TOML file with these options as keys.")
    var config: String?

    static let optionKeys: Set<String> = ["listen", "capacity", "slab-size", "token-file", "metrics", "headroom", "lease", "reclaim-deadline", "memory-info", "poll-us", "log-level", "max-connections", "max-unauthenticated", "handshake-timeout", "send-timeout", "workers", "transport", "fabric-provider", "etcd", "cluster", "failure-domain", "etcd-lease-ttl", "advertise"]

    func run() throws {
        let file = try CommandConfigFile(path: config, optionKeys: Self.optionKeys)
        let level = try logLevel ?? (file.string("log-level").map { name in
            guard let level = LogLevelArgument(rawValue: name) else { throw SpillwayError.invalidConfiguration("log-level '\(name)'") }
            return level
        }) ?? .info
        bootstrapLogging(level.level)
        let logger = Logger(label: "spillwayd")
        let endpoint = try Endpoint(parsing: listen ?? file.string("listen") ?? "127.0.0.1:7450")
        var daemon = DaemonConfiguration(listen: endpoint, capacity: try capacity?.bytes ?? file.size("capacity") ?? 1 << 30)
        daemon.slabSize = try slabSize?.bytes ?? file.size("slab-size") ?? 64 << 20
        daemon.lease = try lease ?? file.double("lease") ?? 30
        daemon.reclaimDeadline = try reclaimDeadline ?? file.double("reclaim-deadline") ?? 5
        daemon.memoryInfoPath = try memoryInfo ?? file.string("memory-info") ?? "/proc/meminfo"
        // Protects the host by default: 10 % of RAM (at most 8 GiB) stays free, or slabs are reclaimed.
        daemon.headroom = try headroom?.bytes ?? file.size("headroom") ?? DaemonConfiguration.defaultHeadroom(memoryInfoPath: daemon.memoryInfoPath)
        daemon.pollMicroseconds = try pollMicroseconds ?? file.int("poll-us") ?? DaemonConfiguration.defaultPollMicroseconds
        daemon.maxConnections = try maxConnections ?? file.int("max-connections") ?? 4096
        daemon.workers = try workers ?? file.int("workers") ?? 0
        daemon.maxUnauthenticated = try maxUnauthenticated ?? file.int("max-unauthenticated") ?? 64
        daemon.handshakeTimeout = try handshakeTimeout ?? file.double("handshake-timeout") ?? 5
        daemon.sendTimeout = try sendTimeout ?? file.double("send-timeout") ?? 10
        daemon.transport = try TransportMode.parse(transport ?? file.string("transport") ?? "auto")
        daemon.fabricProvider = try fabricProvider ?? file.string("fabric-provider")
        // Test faults: a corruption opcode and a per-reply delay, for fault tests and Bench only.
        daemon.enableTestFaults = enableTestFaults
        daemon.testDelayMicroseconds = testDelayMicroseconds ?? 0
        if daemon.testDelayMicroseconds > 0 && !enableTestFaults {
            throw SpillwayError.invalidConfiguration("--test-delay-us needs --enable-test-faults")
        }
        if enableTestFaults { logger.warning("test faults are ON: clients may corrupt their own slabs; replies are delayed", metadata: ["delay_us": "\(daemon.testDelayMicroseconds)"]) }
        guard (0...10_000).contains(daemon.pollMicroseconds) else { throw SpillwayError.invalidConfiguration("poll-us must be 0…10000") }
        let configuredTokenFile = try tokenFile ?? file.string("token-file")
        if let configuredTokenFile {
            daemon.tokens = try TokenFile.load(configuredTokenFile, logger: logger)
        } else if !endpoint.isLoopback {
            throw SpillwayError.invalidConfiguration("without --token-file the daemon only listens on loopback (asked: \(endpoint))")
        }
        let metricsEndpoint = try (metrics ?? file.string("metrics")).map(Self.metricsEndpoint(parsing:))
        let server = try RemoteMemoryServer(daemon, logger: logger)
        try server.start()
        // No token file: a generated one, named after the address actually bound (port 0).
        var generatedTokenFile: String?
        if configuredTokenFile == nil {
            let created = try LocalTokens.create(for: Endpoint(host: endpoint.host, port: server.port))
            server.reloadTokens(created.tokens, counted: false)
            generatedTokenFile = created.path
            logger.notice("no --token-file: generated a token for this user's clients", metadata: ["token_file": "\(created.path)"])
        }
        defer { if let generatedTokenFile { unlink(generatedTokenFile) } }
        // SIGHUP: reload the token file (new tenants admitted, removed tenants disconnected).
        signal(SIGHUP, SIG_IGN)
        let hangup = DispatchSource.makeSignalSource(signal: SIGHUP)
        hangup.setEventHandler {
            guard let configuredTokenFile else {
                logger.notice("SIGHUP: no --token-file to reload (the generated token stays)")
                return
            }
            do {
                server.reloadTokens(try TokenFile.load(configuredTokenFile, logger: logger))
            } catch {
                logger.error("SIGHUP: token file not reloaded; the old one stays in force", metadata: ["error": "\(error)"])
            }
        }
        hangup.resume()
        var services: [any Service] = []
        var metricsPort: UInt16?
        if let metricsEndpoint {
            let registry = PrometheusCollectorRegistry()
            // Library metrics (swift-metrics) land in the same registry.
            MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
            let exporter = DaemonMetricsExporter(registry: registry, server: server)
            let endpoint = try MetricsEndpoint(listen: metricsEndpoint, logger: logger, render: exporter.render)
            metricsPort = endpoint.port
            services.append(MetricsService(endpoint: endpoint))
        }
        // Cluster mode: registered once serving (etcd unreachable now is an error); the
        // registration is the last service, so a shutdown withdraws it before draining.
        if let registry = try ClusterTarget.from(etcd: etcd ?? file.string("etcd"), cluster: cluster ?? file.string("cluster")) {
            let listenHost = endpoint.host
            let advertised = try advertise ?? file.string("advertise") ?? {
                guard listenHost != "0.0.0.0", listenHost != "::" else {
                    throw SpillwayError.invalidConfiguration("--listen \(endpoint) is a wildcard: say which address clients use (--advertise HOST:PORT)")
                }
                return "\(listenHost):\(server.port)"
            }()
            var hostName = [CChar](repeating: 0, count: 256)
            gethostname(&hostName, hostName.count)
            let domain = try failureDomain ?? file.string("failure-domain") ?? String(cString: hostName)
            let ttl = try etcdLeaseTTL ?? file.int("etcd-lease-ttl") ?? 10
            services.append(try ClusterRegistrationService.start(
                etcd: registry.etcd, cluster: registry.cluster, ttl: ttl, server: server, address: advertised,
                failureDomain: domain, logger: logger))
        }
        // Scripts and tests that ask for port 0 read the bound addresses from stdout.
        let metricsField = metricsPort.map { ", \"metrics\": \"\(metricsEndpoint!.host):\($0)\"" } ?? ""
        let tokenField = generatedTokenFile.map { ", \"token_file\": \(JSONValue.string($0).serialized())" } ?? ""
        let announcement = "{\"listen\": \"\(endpoint.host):\(server.port)\"\(metricsField)\(tokenField), \"pid\": \(getpid())}"
        services.append(RemoteMemoryService(server: server, drain: 5, announcement: announcement, logger: logger))
        // swift-service-lifecycle turns SIGTERM/SIGINT into a graceful shutdown of the services,
        // in reverse order: the daemon drains first, then the metrics endpoint stops.
        let group = ServiceGroup(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        // A maintenance drain (cluster mode) ends with the daemon empty: it leaves the
        // cluster and exits as on SIGTERM.
        let drainWatch = Task {
            while !Task.isCancelled {
                try await Task.sleep(for: .milliseconds(500))
                if server.maintenanceDrained {
                    logger.notice("maintenance drain complete: no slab lent; leaving the cluster and exiting")
                    await group.triggerGracefulShutdown()
                    return
                }
            }
        }
        defer { drainWatch.cancel() }
        let finished = DispatchSemaphore(value: 0)
        let failure = Locked<String?>(nil)
        Task {
            do {
                try await group.run()
            } catch {
                failure.withLock { $0 = "\(error)" }
            }
            finished.signal()
        }
        finished.wait()
        hangup.cancel()
        if let failure = failure.withLock({ $0 }) { throw SpillwayError.invalidConfiguration("service group failed: \(failure)") }
    }

    /// `--metrics`: a bare port binds loopback (scrapes reveal tenants' activity, so the
    /// network sees them only when asked to); HOST:PORT binds where told.
    static func metricsEndpoint(parsing text: String) throws(SpillwayError) -> Endpoint {
        if let port = UInt16(text) { return Endpoint(host: "127.0.0.1", port: port) }
        return try Endpoint(parsing: text)
    }
}

/// The daemon as a service: serves until graceful shutdown, then stops accepting, says
/// goodbye to clients and drains in-flight requests.
struct RemoteMemoryService: Service {
    let server: RemoteMemoryServer
    let drain: Double
    /// Printed once the service group traps the signals, so a SIGTERM right after the line
    /// is a graceful shutdown, never the default kill.
    let announcement: String
    let logger: Logger

    func run() async throws {
        printLine(announcement)
        try? await gracefulShutdown()
        logger.info("shutdown requested; draining", metadata: ["drain_seconds": "\(drain)"])
        // The drain blocks for up to `drain` seconds: keep it off the cooperative pool.
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let server = self.server
            let drain = self.drain
            BackgroundThread {
                server.shutdown(drain: drain)
                continuation.resume()
            }.detach()
        }
    }
}

/// The daemon's entry in its cluster's etcd registry, as a service: registered (under a lease,
/// kept alive, its free slabs refreshed) before the daemon announces itself, withdrawn first
/// at shutdown so clients stop choosing it before it drains. etcd lost later: the daemon keeps
/// serving the tenants it has and re-registers when etcd answers again (logged, counted).
struct ClusterRegistrationService: Service {
    let registration: DaemonRegistration
    let client: EtcdClient
    let logger: Logger

    static func start(etcd: String, cluster: String, ttl: Int, server: RemoteMemoryServer, address: String, failureDomain: String,
                      logger: Logger) throws -> ClusterRegistrationService
    {
        let keys = try ClusterKeys(cluster: cluster)
        let endpoints = EtcdClient.endpoints(etcd)
        let capacity = UInt64(server.configuration.capacity)
        let slabSize = UInt64(server.configuration.slabSize)
        let transports = server.fabric == nil ? ["tcp"] : ["tcp", "rma"]
        let instance = String(server.instance, radix: 16)
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let registeredAt = Int64(now.tv_sec)
        // Validated once here, so the refresh closure below cannot fail.
        _ = try DaemonRecord(address: address, transports: transports, capacity: capacity, freeSlabs: 0, slabSize: slabSize,
                             failureDomain: failureDomain, instance: instance, registeredAt: registeredAt)
        let client = try EtcdClient(endpoints: endpoints, logger: logger)
        // Every record rewrite is an event for every watching client, so the free count in it
        // moves only in steps of 1/16 of the daemon's slabs (or when it reaches or leaves 0):
        // slab churn does not become watch traffic (docs/operations.md, Scale).
        let totalSlabs = Int(capacity / max(1, slabSize))
        let reported = Mutex(server.snapshot().slabsFree)
        let registration = try DaemonRegistration(client: client, keys: keys, ttl: Int64(ttl), logger: logger) {
            let free = reported.withLock { last -> Int in
                let now = server.snapshot().slabsFree
                if abs(now - last) >= max(1, totalSlabs / 16) || (now == 0) != (last == 0) || (now == totalSlabs) != (last == totalSlabs) { last = now }
                return last
            }
            // Cannot fail: the same fields were validated above; only the free count changes.
            return try! DaemonRecord(address: address, transports: transports, capacity: capacity,
                                     freeSlabs: UInt64(free), slabSize: slabSize, failureDomain: failureDomain,
                                     instance: instance, registeredAt: registeredAt)
        }
        // `spillway cluster drain` marks the daemon `draining` in the registry: it stops
        // lending and asks its tenants to move their slabs, then leaves once empty.
        registration.onHealthState.withLock {
            $0 = { health in if health == .draining { server.beginMaintenanceDrain() } }
        }
        do {
            try runBlocking(timeout: Double(ttl) + 10, "registering in cluster '\(cluster)' at \(etcd)") { try await registration.start() }
        } catch {
            _ = try? runBlocking(timeout: 5, "closing the etcd client") { await client.shutdown() }
            throw SpillwayError.invalidConfiguration("cannot register in cluster '\(cluster)' at \(etcd): \(error)")
        }
        logger.notice("registered in the cluster", metadata: ["cluster": "\(cluster)", "address": "\(address)",
                                                             "failure_domain": "\(failureDomain)", "instance": "\(instance)",
                                                             "lease_ttl_s": "\(ttl)"])
        return ClusterRegistrationService(registration: registration, client: client, logger: logger)
    }

    func run() async throws {
        try? await gracefulShutdown()
        if let error = await registration.stop() {
            logger.warning("could not withdraw the cluster registration; it expires with its lease", metadata: ["error": "\(error)"])
        }
        await client.shutdown()
    }
}

/// The Prometheus endpoint as a service: stopped after the daemon has drained.
struct MetricsService: Service {
    let endpoint: MetricsEndpoint

    func run() async throws {
        try? await gracefulShutdown()
        endpoint.stop()
    }
}

runMain(SpillwayDaemon.self, name: "spillwayd")
