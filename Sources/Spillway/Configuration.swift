import Logging
import TOMLKit

/// One tier of a configured store.
public struct TierConfiguration: Sendable, Equatable {
    public var name: String
    public var kind: TierKind
    /// Capacity in bytes; rounded down to whole slots.
    public var capacity: Int
    public var watermarks: Watermarks
    /// Verify CRC32C on every read from this tier; nil = the tier's default.
    public var verifyReads: Bool?
    /// Fault the tier's memory in at start-up (memory tiers).
    public var prefault: Bool
    /// NVMe: the file or block device (default: `<name>.nvme` in the per-user directory
    /// `NVMeTier.defaultDirectory`, never a file shared between users or with the benchmarks).
    public var path: String?
    /// NVMe: use the page cache instead of O_DIRECT (only where the filesystem refuses O_DIRECT).
    public var bufferedIO: Bool
    /// NVMe: `interrupt`, `iopoll` or `sqpoll`; nil probes IOPOLL and falls back (logged).
    public var pollMode: NVMePollMode?
    /// NVMe: ignore what the file holds and start empty (benchmarks' scratch files).
    public var reformat: Bool
    /// NVMe: what an acknowledged put or remove survives (TOML `durability = "process" | "power"`).
    public var durability: NVMeDurability = .process
    /// Remote: daemons as HOST:PORT; empty = in-process daemons on loopback, which only a
    /// caller passing an `InProcessDaemonLauncher` gets (the CLI's embedded default:
    /// `embeddedDaemons` of them, each lending the tier's capacity); otherwise an error.
    public var servers: [String] = []
    /// Remote and erasure-coded: find the daemons in a cluster's etcd registry instead of
    /// `servers` (TOML `etcd` = "http://HOST:2379[,…]", `cluster` = NAME), and follow it while
    /// the tier is open: daemons that register join, those whose record goes away leave.
    public var etcd: String?
    public var cluster: String?
    /// Remote: the client's token file (its first line is used).
    public var tokenFile: String?
    public var embeddedDaemons: Int = 2
    /// Remote: microseconds a connection polls for a reply before sleeping (TOML `poll-us`).
    public var pollMicroseconds: Int = 20
    /// Remote: page transport (TOML `transport` = "auto" | "rma" | "tcp") and libfabric
    /// provider (TOML `fabric-provider`, e.g. "verbs", "efa", "tcp").
    public var transport: TransportMode = .auto
    public var fabricProvider: String?
    /// Erasure-coded (`kind = "ec"`): RS(k, r), late binding Δ, placement (TOML `k`, `r`,
    /// `late-binding-delta`, `placement` = "coding-sets" | "random"). With no `servers`,
    /// k+r in-process daemons on loopback.
    public var k: Int = 4
    public var r: Int = 2
    public var lateBindingDelta: Int = 1
    public var placement: CodingPlacement = .codingSets(slack: 1)
    /// Erasure-coded: each server's failure domain, in `servers` order (TOML `failure-domains`
    /// = "rack1,rack1,rack2,…"); empty: every daemon its own. See `ErasureCodedTierConfiguration`.
    public var failureDomains: [String] = []
    /// Erasure-coded: when a write is acknowledged (TOML `write-quorum` = "all" | k+1…k+r) and
    /// how long it waits for a slow member before counting it missing (`write-deadline-ms`).
    /// See docs/erasure-coding.md for what each setting survives.
    public var writeQuorum: ErasureWriteQuorum = .all
    public var writeDeadlineMilliseconds: Int = 500
    /// Remote and erasure-coded: milliseconds between canary rounds (TOML `canary-interval-ms`,
    /// 0 = none) and seconds a daemon that failed them is drained (`drain-seconds`).
    public var canaryIntervalMilliseconds: Int = 2000
    public var drainSeconds: Int = 30
    /// Opt-in compression of the pages this tier holds (TOML `compression = "lz4"`; volatile
    /// tiers only) and the ratio its virtual capacity assumes (`compression-ratio`, default 2).
    public var compression: String?
    public var compressionRatio: Double = 2

    public init(name: String? = nil, kind: TierKind, capacity: Int, watermarks: Watermarks = Watermarks(),
                verifyReads: Bool? = nil, prefault: Bool = true, path: String? = nil, bufferedIO: Bool = false,
                pollMode: NVMePollMode? = nil, reformat: Bool = false)
    {
        self.name = name ?? kind.rawValue
        self.kind = kind
        self.capacity = capacity
        self.watermarks = watermarks
        self.verifyReads = verifyReads
        self.prefault = prefault
        self.path = path
        self.bufferedIO = bufferedIO
        self.pollMode = pollMode
        self.reformat = reformat
    }

    /// The NVMe file this tier uses.
    public var resolvedPath: String { path ?? "\(NVMeTier.defaultDirectory)/\(name).nvme" }
}

/// Everything needed to open a store: the pool geometry, the policy and the tiers, top first.
///
/// Built in Swift, or parsed from TOML whose keys are the CLI's long option names:
///
/// ```toml
/// slot-size = "4k"          # 4KiB … 2MiB, power of two
/// max-page-size = "16m"
/// policy = "prefix-lru"    # eviction/admission; see StorePolicy.names
/// demotion = "cost-aware"   # or "next-tier"
///
/// [[tier]]
/// kind = "device"           # device | dram | nvme | remote | ec
/// capacity = "64m"
/// high-watermark = 0.9
/// low-watermark = 0.8
///
/// [[tier]]
/// kind = "dram"
/// capacity = "256m"
/// ```
public struct SpillwayConfiguration: Sendable, Equatable {
    public var slotSize: Int
    public var maxPageSize: Int
    public var policy: String
    /// Where pages leaving a tier go (`DemotionRule`: "cost-aware" or "next-tier").
    public var demotion: String = DemotionRule.costAware.rawValue
    public var tiers: [TierConfiguration]
    public var backgroundIntervalMilliseconds: Int
    public var prefetchQueueLimit: Int
    /// Submitted batches in flight at most, and the threads running them (TOML
    /// `async-batch-limit`, `async-workers`; `StoreOptions`).
    public var asyncBatchLimit: Int = 8
    public var asyncWorkers: Int = 2

    public init(slotSize: Int = 4096, maxPageSize: Int? = nil, policy: String = StorePolicy.defaultName, tiers: [TierConfiguration],
                backgroundIntervalMilliseconds: Int = 20, prefetchQueueLimit: Int = 4096)
    {
        self.slotSize = slotSize
        self.maxPageSize = maxPageSize ?? min(16 << 20, tiers.map(\.capacity).min() ?? slotSize)
        self.policy = policy
        self.tiers = tiers
        self.backgroundIntervalMilliseconds = backgroundIntervalMilliseconds
        self.prefetchQueueLimit = prefetchQueueLimit
    }

    /// The library's default (`spillway_store_open(NULL)`, Python `Store()`): a 64 MiB
    /// device tier over 256 MiB of DRAM over a 1 GiB NVMe file; 4 KiB slots. No remote
    /// tier: local DRAM behind loopback sockets is a demonstration, not a tier, and a library
    /// must not open listening sockets and threads nobody asked for.
    public static let libraryDefault = SpillwayConfiguration(
        slotSize: 4096,
        tiers: [
            TierConfiguration(kind: .device, capacity: 64 << 20),
            TierConfiguration(kind: .dram, capacity: 256 << 20),
            TierConfiguration(kind: .nvme, capacity: 1 << 30),
        ])

    /// The CLI's demonstration default (`spillway bench` with no configuration): the library
    /// default with 256 MiB of erasure-coded remote memory (RS(4,2)) between DRAM and NVMe,
    /// lent by six in-process daemons on loopback, each with a fresh in-memory token.
    public static let embeddedDefault = SpillwayConfiguration(
        slotSize: 4096,
        tiers: [
            TierConfiguration(kind: .device, capacity: 64 << 20),
            TierConfiguration(kind: .dram, capacity: 256 << 20),
            TierConfiguration(kind: .erasureCoded, capacity: 256 << 20),
            TierConfiguration(kind: .nvme, capacity: 1 << 30),
        ])

    /// Keys this type reads from a TOML document's top level.
    public static let topLevelKeys: Set<String> = [
        "slot-size", "max-page-size", "policy", "demotion", "tier", "background-interval-ms", "prefetch-queue-limit",
        "async-batch-limit", "async-workers",
    ]
    static let tierKeys: Set<String> = [
        "name", "kind", "capacity", "high-watermark", "low-watermark", "verify-reads", "prefault", "servers", "token-file",
        "path", "buffered-io", "poll-mode", "reformat", "poll-us", "transport", "fabric-provider", "k", "r", "late-binding-delta", "placement", "compression", "compression-ratio",
        "write-quorum", "write-deadline-ms", "durability", "failure-domains", "etcd", "cluster", "canary-interval-ms", "drain-seconds",
    ]

    /// Parses a TOML document. Unknown keys are errors (a typo must not silently change
    /// behaviour) unless listed in `extraKeys` (options of the command that read the file).
    public init(toml text: String, extraKeys: Set<String> = []) throws(SpillwayError) {
        let table: TOMLTable
        do {
            table = try TOMLTable(string: text)
        } catch let error as TOMLParseError {
            throw .invalidConfiguration("TOML: \(error.description) at \(error.source.begin.debugDescription)")
        } catch {
            throw .invalidConfiguration("TOML: \(error)")
        }
        try self.init(table: table, extraKeys: extraKeys)
    }

    public init(table: TOMLTable, extraKeys: Set<String> = []) throws(SpillwayError) {
        for key in table.keys where !Self.topLevelKeys.contains(key) && !extraKeys.contains(key) {
            throw .invalidConfiguration("unknown key '\(key)'")
        }
        let slotSize = try TOMLReader.size(table, "slot-size") ?? 4096
        let policy = try TOMLReader.string(table, "policy") ?? StorePolicy.defaultName
        let demotion = try TOMLReader.string(table, "demotion") ?? DemotionRule.costAware.rawValue
        var tiers: [TierConfiguration] = []
        if let value = table["tier"] {
            guard let array = value.array else { throw .invalidConfiguration("'tier' must be an array of tables ([[tier]])") }
            for (index, element) in array.enumerated() {
                guard let tierTable = element.table else { throw .invalidConfiguration("tier \(index + 1) is not a table") }
                tiers.append(try Self.parseTier(tierTable, index: index))
            }
        }
        self.init(
            slotSize: slotSize, maxPageSize: try TOMLReader.size(table, "max-page-size"), policy: policy, tiers: tiers,
            backgroundIntervalMilliseconds: try TOMLReader.int(table, "background-interval-ms") ?? 20,
            prefetchQueueLimit: try TOMLReader.int(table, "prefetch-queue-limit") ?? 4096)
        self.demotion = demotion
        if let limit = try TOMLReader.int(table, "async-batch-limit") {
            guard (1...1024).contains(limit) else { throw .invalidConfiguration("async-batch-limit must be 1…1024") }
            asyncBatchLimit = limit
        }
        if let workers = try TOMLReader.int(table, "async-workers") {
            guard (1...64).contains(workers) else { throw .invalidConfiguration("async-workers must be 1…64") }
            asyncWorkers = workers
        }
    }

    private static func parseTier(_ table: TOMLTable, index: Int) throws(SpillwayError) -> TierConfiguration {
        for key in table.keys where !tierKeys.contains(key) {
            throw .invalidConfiguration("tier \(index + 1): unknown key '\(key)'")
        }
        guard let kindName = try TOMLReader.string(table, "kind") else { throw .invalidConfiguration("tier \(index + 1): 'kind' is required") }
        guard let kind = TierKind(rawValue: kindName) else {
            throw .invalidConfiguration("tier \(index + 1): unknown kind '\(kindName)' (one of \(TierKind.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        guard let capacity = try TOMLReader.size(table, "capacity") else { throw .invalidConfiguration("tier \(index + 1): 'capacity' is required") }
        let defaults = Watermarks()
        let pollName = try TOMLReader.string(table, "poll-mode")
        var pollMode: NVMePollMode?
        if let pollName {
            guard let mode = NVMePollMode(rawValue: pollName) else {
                throw .invalidConfiguration("tier \(index + 1): poll-mode '\(pollName)' (one of interrupt, iopoll, sqpoll)")
            }
            pollMode = mode
        }
        var tier = TierConfiguration(
            name: try TOMLReader.string(table, "name"), kind: kind, capacity: capacity,
            watermarks: Watermarks(high: try TOMLReader.double(table, "high-watermark") ?? defaults.high,
                                   low: try TOMLReader.double(table, "low-watermark") ?? defaults.low),
            verifyReads: try TOMLReader.bool(table, "verify-reads"), prefault: try TOMLReader.bool(table, "prefault") ?? true,
            path: try TOMLReader.string(table, "path"), bufferedIO: try TOMLReader.bool(table, "buffered-io") ?? false,
            pollMode: pollMode, reformat: try TOMLReader.bool(table, "reformat") ?? false)
        if let servers = try TOMLReader.string(table, "servers") {
            tier.servers = servers.split(separator: ",").map { String($0) }
        }
        if let domains = try TOMLReader.string(table, "failure-domains") {
            tier.failureDomains = domains.split(separator: ",").map { String($0) }
        }
        tier.etcd = try TOMLReader.string(table, "etcd")
        tier.cluster = try TOMLReader.string(table, "cluster")
        if let durability = try TOMLReader.string(table, "durability") {
            guard let mode = NVMeDurability(rawValue: durability) else {
                throw .invalidConfiguration("tier '\(tier.name)': durability '\(durability)' (process or power)")
            }
            tier.durability = mode
        }
        tier.tokenFile = try TOMLReader.string(table, "token-file")
        tier.compression = try TOMLReader.string(table, "compression")
        if let ratio = try TOMLReader.double(table, "compression-ratio") { tier.compressionRatio = ratio }
        if let k = try TOMLReader.int(table, "k") { tier.k = k }
        if let r = try TOMLReader.int(table, "r") { tier.r = r }
        if let delta = try TOMLReader.int(table, "late-binding-delta") { tier.lateBindingDelta = delta }
        if let placement = try TOMLReader.string(table, "placement") {
            switch placement {
            case "coding-sets": tier.placement = .codingSets(slack: 1)
            case "random": tier.placement = .random
            default: throw .invalidConfiguration("tier '\(tier.name)': placement '\(placement)' (coding-sets or random)")
            }
        }
        if let quorum = table["write-quorum"] {
            // "all", or a number of splits (validated against k and r in `validate`).
            if let count = quorum.int {
                tier.writeQuorum = .splits(count)
            } else if quorum.string == "all" {
                tier.writeQuorum = .all
            } else {
                throw .invalidConfiguration("tier '\(tier.name)': write-quorum must be \"all\" or a number of splits (k+1…k+r)")
            }
        }
        if let deadline = try TOMLReader.int(table, "write-deadline-ms") { tier.writeDeadlineMilliseconds = deadline }
        if let interval = try TOMLReader.int(table, "canary-interval-ms") {
            guard (0...3_600_000).contains(interval) else { throw .invalidConfiguration("tier '\(tier.name)': canary-interval-ms must be 0…3600000") }
            tier.canaryIntervalMilliseconds = interval
        }
        if let drain = try TOMLReader.int(table, "drain-seconds") {
            guard (1...86_400).contains(drain) else { throw .invalidConfiguration("tier '\(tier.name)': drain-seconds must be 1…86400") }
            tier.drainSeconds = drain
        }
        if let transport = try TOMLReader.string(table, "transport") { tier.transport = try TransportMode.parse(transport) }
        if let provider = try TOMLReader.string(table, "fabric-provider") { tier.fabricProvider = provider }
        if let poll = try TOMLReader.int(table, "poll-us") {
            guard (0...10_000).contains(poll) else { throw .invalidConfiguration("tier '\(tier.name)': poll-us must be 0…10000") }
            tier.pollMicroseconds = poll
        }
        return tier
    }

    /// Reads and parses a TOML file.
    public init(contentsOfFile path: String, extraKeys: Set<String> = []) throws(SpillwayError) {
        try self.init(toml: try readTextFile(path), extraKeys: extraKeys)
    }

    /// Checks everything that does not need the tiers themselves.
    /// The store policy `policy` and `demotion` name.
    public func storePolicy() throws(SpillwayError) -> StorePolicy {
        guard let rule = DemotionRule(rawValue: demotion) else {
            throw .invalidConfiguration("unknown demotion '\(demotion)' (\(DemotionRule.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        return try StorePolicy.named(policy, demotion: rule)
    }

    public func validate() throws(SpillwayError) {
        guard slotSize >= 4096, slotSize <= 2 << 20, slotSize & (slotSize - 1) == 0 else {
            throw .invalidConfiguration("slot-size \(slotSize) must be a power of two between 4KiB and 2MiB")
        }
        guard !tiers.isEmpty else { throw .invalidConfiguration("no tiers configured") }
        _ = try storePolicy()
        for tier in tiers {
            guard tier.capacity >= slotSize else {
                throw .invalidConfiguration("tier '\(tier.name)': capacity \(tier.capacity) is smaller than one slot (\(slotSize))")
            }
            if let compression = tier.compression {
                guard compression == "lz4" else { throw .invalidConfiguration("tier '\(tier.name)': compression '\(compression)' (available: lz4)") }
                guard [.dram, .remote, .erasureCoded].contains(tier.kind) else {
                    throw .invalidConfiguration("tier '\(tier.name)': compression is for the volatile spill tiers (dram, remote, ec)")
                }
                guard tier.compressionRatio >= 1, tier.compressionRatio <= 8 else {
                    throw .invalidConfiguration("tier '\(tier.name)': compression-ratio must be 1…8")
                }
            }
            if tier.kind == .erasureCoded {
                guard (1...32).contains(tier.k), (1...16).contains(tier.r), tier.k + tier.r <= 32,
                      (0...tier.r).contains(tier.lateBindingDelta)
                else {
                    throw .invalidConfiguration("tier '\(tier.name)': RS(\(tier.k), \(tier.r)) with late-binding delta \(tier.lateBindingDelta) (need 1 ≤ k, 1 ≤ r ≤ 16, k + r ≤ 32, 0 ≤ delta ≤ r)")
                }
                if case .splits(let quorum) = tier.writeQuorum, !(tier.k + 1...tier.k + tier.r).contains(quorum) {
                    throw .invalidConfiguration("tier '\(tier.name)': write-quorum \(quorum) must be \"all\" or k+1…k+r (\(tier.k + 1)…\(tier.k + tier.r))")
                }
                guard (1...60_000).contains(tier.writeDeadlineMilliseconds) else {
                    throw .invalidConfiguration("tier '\(tier.name)': write-deadline-ms must be 1…60000")
                }
            }
            try tier.watermarks.validate(tier: tier.name)
        }
        if let device = tiers.firstIndex(where: { $0.kind == .device }), device != 0 {
            throw .invalidConfiguration("the device tier must be the top (first) tier")
        }
    }
}

extension TieredStore {
    /// Builds the tiers a configuration names and opens a store over them.
    ///
    /// - Parameter daemons: starts in-process daemons for remote and erasure-coded tiers that
    ///   name no `servers` (the CLI passes `SpillwayServer.InProcessDaemons`); without one such
    ///   a tier is an `invalidConfiguration` error: the library ships no server.
    public static func open(_ configuration: SpillwayConfiguration, daemons: (any InProcessDaemonLauncher)? = nil,
                            logger: Logger = Logger(label: "spillway")) throws(SpillwayError) -> TieredStore
    {
        try configuration.validate()
        var tiers: [any Tier] = []
        for tier in configuration.tiers {
            let slots = tier.capacity / configuration.slotSize
            switch tier.kind {
            case .device:
                tiers.append(try DeviceTier(
                    name: tier.name, slotSize: configuration.slotSize, capacitySlots: slots,
                    memory: HostDeviceMemory(prefault: tier.prefault, logger: logger)))
            case .dram:
                tiers.append(try DRAMTier(
                    name: tier.name, slotSize: configuration.slotSize, capacitySlots: slots, prefault: tier.prefault,
                    verifiesReads: tier.verifyReads ?? false, logger: logger))
            case .nvme:
                if tier.path == nil { try NVMeTier.createDefaultDirectory() }
                tiers.append(try NVMeTier(
                    NVMeTierConfiguration(name: tier.name, path: tier.resolvedPath, slotSize: configuration.slotSize,
                                          capacitySlots: slots, bufferedIO: tier.bufferedIO, pollMode: tier.pollMode,
                                          reformat: tier.reformat, durability: tier.durability),
                    logger: logger))
            case .remote:
                tiers.append(try RemoteTier.open(tier, slotSize: configuration.slotSize, daemons: daemons, logger: logger))
            case .erasureCoded:
                tiers.append(try ErasureCodedTier.open(tier, slotSize: configuration.slotSize, daemons: daemons, logger: logger))
            }
            if tier.compression != nil, let plain = tiers.popLast() {
                tiers.append(try CompressedTier(wrapping: plain, expectedRatio: tier.compressionRatio))
            }
        }
        var options = StoreOptions(
            maxPageSize: configuration.maxPageSize, watermarks: configuration.tiers.map(\.watermarks),
            prefetchQueueLimit: configuration.prefetchQueueLimit,
            backgroundIntervalMilliseconds: configuration.backgroundIntervalMilliseconds)
        options.asyncBatchLimit = configuration.asyncBatchLimit
        options.asyncWorkers = configuration.asyncWorkers
        return try TieredStore(tiers: tiers, policy: try configuration.storePolicy(), options: options, logger: logger)
    }
}

/// Typed accessors over TOMLKit values: a wrong type is a clear error, not a silent default.
public enum TOMLReader {
    public static func string(_ table: TOMLTable, _ key: String) throws(SpillwayError) -> String? {
        guard let value = table[key] else { return nil }
        guard let string = value.string else { throw .invalidConfiguration("'\(key)' must be a string") }
        return string
    }

    public static func int(_ table: TOMLTable, _ key: String) throws(SpillwayError) -> Int? {
        guard let value = table[key] else { return nil }
        guard let int = value.int else { throw .invalidConfiguration("'\(key)' must be an integer") }
        return int
    }

    public static func double(_ table: TOMLTable, _ key: String) throws(SpillwayError) -> Double? {
        guard let value = table[key] else { return nil }
        if let double = value.double { return double }
        if let int = value.int { return Double(int) }
        throw .invalidConfiguration("'\(key)' must be a number")
    }

    public static func bool(_ table: TOMLTable, _ key: String) throws(SpillwayError) -> Bool? {
        guard let value = table[key] else { return nil }
        guard let bool = value.bool else { throw .invalidConfiguration("'\(key)' must be true or false") }
        return bool
    }

    /// A size: an integer byte count or a string such as "4k", "256MiB".
    public static func size(_ table: TOMLTable, _ key: String) throws(SpillwayError) -> Int? {
        guard let value = table[key] else { return nil }
        if let int = value.int, int >= 0 { return int }
        if let string = value.string, let bytes = ByteCount.parse(string) { return bytes }
        throw .invalidConfiguration("'\(key)' must be a size such as 4096, \"4k\" or \"256MiB\"")
    }
}

/// Reads a whole text file with plain POSIX calls (no Foundation in the library).
public func readTextFile(_ path: String) throws(SpillwayError) -> String {
    let descriptor = open(path, O_RDONLY | O_CLOEXEC)
    guard descriptor >= 0 else { throw .invalidConfiguration("cannot open '\(path)': \(String(cString: strerror(errno)))") }
    defer { close(descriptor) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
        if count == 0 { break }
        if count < 0 {
            if errno == EINTR { continue }
            throw .invalidConfiguration("cannot read '\(path)': \(String(cString: strerror(errno)))")
        }
        bytes.append(contentsOf: chunk[0..<count])
        guard bytes.count <= 16 << 20 else { throw .invalidConfiguration("'\(path)' is larger than 16MiB") }
    }
    return String(decoding: bytes, as: UTF8.self)
}

#if canImport(Glibc)
import Glibc
#endif

/// In-process daemons for a tier that names no servers, or the error saying why there are none.
private func launchInProcessDaemons(for tier: TierConfiguration, count: Int, capacity: Int, slabSize: Int, tokens: TokenFile,
                                    daemons: (any InProcessDaemonLauncher)?, logger: Logger) throws(SpillwayError) -> InProcessDaemonGroup
{
    guard let daemons else {
        throw .invalidConfiguration("tier '\(tier.name)' (\(tier.kind.rawValue)) names no servers: start spillwayd and list it in `servers` (in-process daemons are the spillway CLI's demonstration default, not the library's)")
    }
    return try daemons.launch(tier: tier.name, count: count, capacity: capacity, slabSize: slabSize, tokens: tokens, logger: logger)
}

/// A tier configured with `etcd` and `cluster`: the registry's usable daemons now (servers
/// and failure domains), slots to spare for daemons joining later, and the feed to attach
/// once the tier is open. Nil for a tier without them; both or neither, and not with `servers`.
private func registryDaemons(for tier: TierConfiguration, logger: Logger) throws(SpillwayError)
    -> (servers: [Endpoint], failureDomains: [String], slots: Int)?
{
    switch (tier.etcd, tier.cluster) {
    case (nil, nil): return nil
    case (.some, nil), (nil, .some):
        throw .invalidConfiguration("tier '\(tier.name)': `etcd` and `cluster` go together")
    case (.some(let etcd), .some(let cluster)):
        guard tier.servers.isEmpty else { throw .invalidConfiguration("tier '\(tier.name)': `servers` or `etcd`/`cluster`, not both") }
        let records: [DaemonRecord]
        do {
            records = try ClusterDirectory.usable(etcd: etcd, cluster: cluster, logger: logger)
        } catch let error as SpillwayError {
            throw error
        } catch {
            throw .invalidConfiguration("tier '\(tier.name)': cluster '\(cluster)' at \(etcd): \(error)")
        }
        var servers: [Endpoint] = []
        for record in records { servers.append(try Endpoint(parsing: record.address)) }
        // Room for the cluster to grow to twice its size (at least 64 daemons) while open.
        return (servers, records.map(\.failureDomain), max(64, 2 * servers.count))
    }
}

/// Starts following the registry for an open tier's fleet; stopped when the tier closes.
private func attachFeed(_ tier: TierConfiguration, fleet: DaemonFleet, logger: Logger) throws(SpillwayError) -> FleetFeed? {
    guard let etcd = tier.etcd, let cluster = tier.cluster else { return nil }
    do {
        let feed = try FleetFeed(fleet: fleet, etcd: etcd, cluster: cluster, logger: logger)
        feed.start()
        logger.info("following the cluster registry", metadata: ["tier": "\(tier.name)", "cluster": "\(cluster)"])
        return feed
    } catch {
        throw .invalidConfiguration("tier '\(tier.name)': cannot follow cluster '\(cluster)' at \(etcd): \(error)")
    }
}

extension RemoteTier {
    /// Opens a configured remote tier: against `servers`, or, when none are given, against
    /// daemons `daemons` starts in this process (the CLI's embedded default), stopped when the
    /// tier closes.
    static func open(_ tier: TierConfiguration, slotSize: Int, daemons: (any InProcessDaemonLauncher)?, logger: Logger)
        throws(SpillwayError) -> RemoteTier
    {
        var endpoints: [Endpoint] = []
        var group: InProcessDaemonGroup?
        var credentials = ClientCredentials(tenant: "spillway", token: nil)
        if let path = tier.tokenFile { credentials = ClientCredentials(tokenFile: try TokenFile.load(path, logger: logger)) }
        let registry = try registryDaemons(for: tier, logger: logger)
        if let registry {
            endpoints = registry.servers
        } else if tier.servers.isEmpty {
            // In-process daemons authenticate like any other: a fresh random token, in memory
            // only, shared with this tier and nobody else (loopback is not a user boundary).
            let tokens = TokenFile.random()
            credentials = ClientCredentials(tokenFile: tokens)
            // Slabs of 16 MiB unless the capacity is tiny; each daemon can hold the whole tier.
            let slab = min(16 << 20, max(1 << 20, 1 << (Int.bitWidth - (tier.capacity / 4).leadingZeroBitCount - 1)))
            let capacity = (tier.capacity + slab - 1) / slab * slab + slab
            let started = try launchInProcessDaemons(for: tier, count: max(1, tier.embeddedDaemons), capacity: capacity, slabSize: slab,
                                                     tokens: tokens, daemons: daemons, logger: logger)
            group = started
            endpoints = started.endpoints
        } else {
            for server in tier.servers { endpoints.append(try Endpoint(parsing: server.trimmingCharacters(in: " "))) }
        }
        do {
            var configuration = RemoteTierConfiguration(name: tier.name, servers: endpoints, credentials: credentials,
                                                        capacity: tier.capacity, slotSize: slotSize)
            configuration.pollMicroseconds = tier.pollMicroseconds
            configuration.transport = tier.transport
            configuration.fabricProvider = tier.fabricProvider
            configuration.slots = registry?.slots ?? 0
            configuration.canaryInterval = Double(tier.canaryIntervalMilliseconds) / 1000
            configuration.drainSeconds = Double(tier.drainSeconds)
            let remote = try RemoteTier(configuration, logger: logger)
            remote.inProcessDaemons = group
            if let feed = try attachFeed(tier, fleet: remote.fleet, logger: logger) { remote.stopOnClose.append { feed.stop() } }
            return remote
        } catch {
            group?.stop()
            throw error
        }
    }
}

extension ErasureCodedTier {
    /// Opens a configured erasure-coded tier: against `servers`, or, when none are given,
    /// against k+r daemons `daemons` starts in this process, stopped when the tier closes.
    static func open(_ tier: TierConfiguration, slotSize: Int, daemons: (any InProcessDaemonLauncher)?, logger: Logger)
        throws(SpillwayError) -> ErasureCodedTier
    {
        var endpoints: [Endpoint] = []
        var group: InProcessDaemonGroup?
        var credentials = ClientCredentials(tenant: "spillway", token: nil)
        if let path = tier.tokenFile { credentials = ClientCredentials(tokenFile: try TokenFile.load(path, logger: logger)) }
        let registry = try registryDaemons(for: tier, logger: logger)
        if let registry {
            endpoints = registry.servers
        } else if tier.servers.isEmpty {
            // In-process daemons authenticate like any other (see RemoteTier.open).
            let tokens = TokenFile.random()
            credentials = ClientCredentials(tokenFile: tokens)
            // Each daemon holds one split of every stripe: capacity/k of splits, plus a slab of slack.
            let perDaemon = tier.capacity / max(1, tier.k) + (tier.capacity / max(1, tier.k)) / 8
            let slab = min(16 << 20, max(1 << 20, 1 << (Int.bitWidth - (max(1, perDaemon) / 4).leadingZeroBitCount - 1)))
            let capacity = (perDaemon + slab - 1) / slab * slab + 2 * slab
            let started = try launchInProcessDaemons(for: tier, count: tier.k + tier.r, capacity: capacity, slabSize: slab,
                                                     tokens: tokens, daemons: daemons, logger: logger)
            group = started
            endpoints = started.endpoints
        } else {
            for server in tier.servers { endpoints.append(try Endpoint(parsing: server.trimmingCharacters(in: " "))) }
        }
        do {
            var configuration = ErasureCodedTierConfiguration(servers: endpoints, credentials: credentials, capacity: tier.capacity,
                                                              slotSize: slotSize)
            configuration.name = tier.name
            configuration.k = tier.k
            configuration.r = tier.r
            configuration.lateBindingDelta = tier.lateBindingDelta
            configuration.placement = tier.placement
            // The registry's domains; in-process daemons (no servers): each its own.
            configuration.failureDomains = registry?.failureDomains ?? (tier.servers.isEmpty ? [] : tier.failureDomains)
            configuration.slots = registry?.slots ?? 0
            configuration.writeQuorum = tier.writeQuorum
            configuration.writeDeadline = Double(tier.writeDeadlineMilliseconds) / 1000
            configuration.pollMicroseconds = tier.pollMicroseconds
            configuration.canaryInterval = Double(tier.canaryIntervalMilliseconds) / 1000
            configuration.drainSeconds = Double(tier.drainSeconds)
            let coded = try ErasureCodedTier(configuration, logger: logger)
            coded.inProcessDaemons = group
            if let feed = try attachFeed(tier, fleet: coded.fleet, logger: logger) { coded.stopOnClose.append { feed.stop() } }
            return coded
        } catch {
            group?.stop()
            throw error
        }
    }
}

extension String {
    fileprivate func trimmingCharacters(in character: Character) -> String {
        String(drop(while: { $0 == character }).reversed().drop(while: { $0 == character }).reversed())
    }
}
