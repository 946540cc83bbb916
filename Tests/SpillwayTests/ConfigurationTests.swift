import Foundation
import Testing
@testable import Spillway
@testable import SpillwayServer

@Suite struct ConfigurationTests {
    @Test func parsesAFullDocument() throws {
        let configuration = try SpillwayConfiguration(toml: """
            slot-size = "8k"
            max-page-size = "1MiB"
            policy = "lru"
            background-interval-ms = 50
            async-batch-limit = 3
            async-workers = 1

            [[tier]]
            kind = "device"
            name = "hbm0"
            capacity = "16m"
            high-watermark = 0.85
            low-watermark = 0.5

            [[tier]]
            kind = "dram"
            capacity = 33554432
            verify-reads = true
            prefault = false
            """)
        #expect(configuration.slotSize == 8192)
        #expect(configuration.maxPageSize == 1 << 20)
        #expect(configuration.backgroundIntervalMilliseconds == 50)
        #expect(configuration.tiers == [
            TierConfiguration(name: "hbm0", kind: .device, capacity: 16 << 20, watermarks: Watermarks(high: 0.85, low: 0.5)),
            TierConfiguration(kind: .dram, capacity: 32 << 20, verifyReads: true, prefault: false),
        ])
        let store = try TieredStore.open(configuration, daemons: InProcessDaemons())
        defer { store.close() }
        #expect(store.tiers.map(\.descriptor.name) == ["hbm0", "dram"])
        #expect(store.tiers[1].descriptor.verifiesReads)
        #expect(store.options.asyncBatchLimit == 3 && store.options.asyncWorkers == 1)
        try store.put(PageKey(1), bytes: [1, 2, 3])
        #expect(try store.get(PageKey(1)) == [1, 2, 3])
    }

    @Test(arguments: [
        ("slot-size = \"4k\"\nbogus = 1\n[[tier]]\nkind = \"dram\"\ncapacity = \"1m\"", "unknown key 'bogus'"),
        ("[[tier]]\nkind = \"dram\"\ncapacity = \"1m\"\ncolour = 1", "unknown key 'colour'"),
        ("[[tier]]\ncapacity = \"1m\"", "'kind' is required"),
        ("[[tier]]\nkind = \"tape\"\ncapacity = \"1m\"", "unknown kind 'tape'"),
        ("[[tier]]\nkind = \"dram\"", "'capacity' is required"),
        ("[[tier]]\nkind = \"dram\"\ncapacity = \"lots\"", "must be a size"),
        ("slot-size = true\n[[tier]]\nkind = \"dram\"\ncapacity = \"1m\"", "must be a size"),
        ("policy = 7\n[[tier]]\nkind = \"dram\"\ncapacity = \"1m\"", "must be a string"),
        ("tier = 3", "array of tables"),
        ("async-batch-limit = 0\n[[tier]]\nkind = \"dram\"\ncapacity = \"1m\"", "async-batch-limit must be 1…1024"),
        ("async-workers = 100\n[[tier]]\nkind = \"dram\"\ncapacity = \"1m\"", "async-workers must be 1…64"),
        ("slot-size = [", "TOML"),
    ])
    func rejectsBadDocuments(text: String, message: String) {
        #expect {
            _ = try SpillwayConfiguration(toml: text)
        } throws: { error in
            guard case SpillwayError.invalidConfiguration(let reason) = error else { return false }
            return reason.contains(message)
        }
    }

    /// Expects `body` to throw `SpillwayError.invalidConfiguration` whose reason contains `fragment`.
    func expectInvalidConfiguration(_ fragment: String, sourceLocation: SourceLocation = #_sourceLocation,
                                    _ body: () throws -> Void) {
        let error = #expect(throws: SpillwayError.self, sourceLocation: sourceLocation) { try body() }
        guard case .invalidConfiguration(let reason) = error else {
            Issue.record("expected invalidConfiguration(…\(fragment)…), got \(String(describing: error))", sourceLocation: sourceLocation)
            return
        }
        #expect(reason.contains(fragment), "reason: \(reason)", sourceLocation: sourceLocation)
    }

    @Test func policyKeySelectsThePolicyInUse() throws {
        let dram = "[[tier]]\nkind = \"dram\"\ncapacity = \"1m\"\nprefault = false"
        let byDefault = try SpillwayConfiguration(toml: dram)
        #expect(byDefault.policy == "prefix-lru")
        for name in ["lru", "class-aware-lru", "prefix-lru", "s3fifo", "s3fifo-prefix", "tinylfu"] {
            let configuration = try SpillwayConfiguration(toml: "policy = \"\(name)\"\n" + dram)
            let store = try TieredStore.open(configuration, daemons: InProcessDaemons())
            defer { store.close() }
            #expect(store.policy.name == name)
            #expect(store.stats().policy == name)
        }
        let unknown = try SpillwayConfiguration(toml: "policy = \"arc\"\n" + dram)
        expectInvalidConfiguration("unknown policy 'arc' (available: prefix-lru, class-aware-lru, lru, s3fifo, s3fifo-prefix, tinylfu)") { _ = try TieredStore.open(unknown) }
    }

    @Test func validationCatchesInconsistentStores() throws {
        let dram = TierConfiguration(kind: .dram, capacity: 1 << 20)
        let device = TierConfiguration(kind: .device, capacity: 1 << 20)
        expectInvalidConfiguration("slot-size 3000 must be a power of two between 4KiB and 2MiB") {
            try SpillwayConfiguration(slotSize: 3000, tiers: [dram]).validate()
        }
        expectInvalidConfiguration("no tiers configured") { try SpillwayConfiguration(tiers: []).validate() }
        expectInvalidConfiguration("unknown policy 'mru' (available: prefix-lru, class-aware-lru, lru, s3fifo, s3fifo-prefix, tinylfu)") {
            try SpillwayConfiguration(policy: "mru", tiers: [dram]).validate()
        }
        expectInvalidConfiguration("the device tier must be the top (first) tier") { try SpillwayConfiguration(tiers: [dram, device]).validate() }
        var badCode = TierConfiguration(kind: .erasureCoded, capacity: 1 << 20)
        badCode.r = 0
        expectInvalidConfiguration("RS(4, 0) with late-binding delta") { try SpillwayConfiguration(tiers: [badCode]).validate() }
        badCode.r = 2
        badCode.lateBindingDelta = 3
        expectInvalidConfiguration("RS(4, 2) with late-binding delta 3") { try SpillwayConfiguration(tiers: [badCode]).validate() }
        expectInvalidConfiguration("capacity 4096 is smaller than one slot (1048576)") {
            try SpillwayConfiguration(slotSize: 1 << 20, tiers: [TierConfiguration(kind: .dram, capacity: 4096)]).validate()
        }
        var compressedNVMe = TierConfiguration(kind: .nvme, capacity: 1 << 20)
        compressedNVMe.compression = "lz4"
        expectInvalidConfiguration("compression is for the volatile spill tiers") { try SpillwayConfiguration(tiers: [compressedNVMe]).validate() }
        try SpillwayConfiguration.embeddedDefault.validate()
    }

    /// Every tier kind a TOML file can name opens through `TieredStore.open` and holds a page:
    /// nvme (a file in a temporary directory), remote and ec with no `servers` (in-process
    /// daemons on loopback), and an lz4-compressed dram tier.
    @Test(arguments: [
        ("nvme", "kind = \"nvme\"\ncapacity = \"4m\"\npath = \"@DIR@/tier.nvme\""),
        ("remote", "kind = \"remote\"\ncapacity = \"4m\""),
        ("ec", "kind = \"ec\"\ncapacity = \"4m\""),
        ("compressed", "kind = \"dram\"\ncapacity = \"4m\"\ncompression = \"lz4\""),
    ])
    func eachConfiguredTierKindOpensAndHoldsAPage(kind: String, tier: String) throws {
        let directory = NSTemporaryDirectory() + "spillway-config-\(kind)-\(getpid())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let configuration = try SpillwayConfiguration(toml: "slot-size = \"4k\"\nmax-page-size = \"64k\"\n[[tier]]\n"
            + tier.replacingOccurrences(of: "@DIR@", with: directory))
        let store = try TieredStore.open(configuration, daemons: InProcessDaemons())
        defer { store.close() }
        #expect(store.tiers.count == 1)
        switch kind {
        case "nvme": #expect(store.tiers[0] is NVMeTier)
        case "remote": #expect(store.tiers[0] is RemoteTier)
        case "ec": #expect(store.tiers[0] is ErasureCodedTier)
        default: #expect(store.tiers[0] is CompressedTier)
        }
        let page = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 % 97) }
        try store.put(PageKey(7), bytes: page)
        #expect(try store.get(PageKey(7)) == page)
        if kind == "nvme" { #expect(FileManager.default.fileExists(atPath: directory + "/tier.nvme")) }
    }

    @Test func parsesTheErasureCodedWriteQuorum() throws {
        func ec(_ lines: String) throws -> SpillwayConfiguration {
            try SpillwayConfiguration(toml: "[[tier]]\nkind = \"ec\"\ncapacity = \"4m\"\n" + lines)
        }
        #expect(try ec("").tiers[0].writeQuorum == .all, "every live member is the default")
        #expect(try ec("").tiers[0].writeDeadlineMilliseconds == 500)
        let numeric = try ec("write-quorum = 5\nwrite-deadline-ms = 200")
        #expect(numeric.tiers[0].writeQuorum == .splits(5) && numeric.tiers[0].writeDeadlineMilliseconds == 200)
        try numeric.validate()
        #expect(try ec("write-quorum = \"all\"").tiers[0].writeQuorum == .all)
        #expect {
            _ = try ec("write-quorum = \"most\"")
        } throws: { error in
            guard case SpillwayError.invalidConfiguration(let reason) = error else { return false }
            return reason.contains("write-quorum")
        }
        // RS(4,2): k+1…k+r = 5…6.
        for bad in ["write-quorum = 4", "write-quorum = 7", "write-deadline-ms = 0"] {
            #expect {
                try ec(bad).validate()
            } throws: { error in
                guard case SpillwayError.invalidConfiguration(let reason) = error else { return false }
                return reason.contains(bad.prefix { $0 != " " })
            }
        }
        // The settings reach the tier (k+r in-process daemons).
        let store = try TieredStore.open(try ec("write-quorum = 6\nwrite-deadline-ms = 250"), daemons: InProcessDaemons())
        defer { store.close() }
        let coded = try #require(store.tiers.first as? ErasureCodedTier)
        #expect(coded.configuration.writeQuorum == .splits(6) && coded.configuration.writeDeadline == 0.25)
        try store.put(PageKey(1), bytes: [1, 2, 3])
        #expect(try store.get(PageKey(1)) == [1, 2, 3])
    }

    @Test func extraKeysAreAllowedWhenDeclared() throws {
        let configuration = try SpillwayConfiguration(toml: "pattern = \"randread\"\n[[tier]]\nkind = \"dram\"\ncapacity = \"1m\"", extraKeys: ["pattern"])
        #expect(configuration.tiers.count == 1)
    }

    @Test func missingFileIsAClearError() {
        expectInvalidConfiguration("cannot open '/nonexistent/spillway.toml': No such file or directory") {
            _ = try SpillwayConfiguration(contentsOfFile: "/nonexistent/spillway.toml")
        }
    }
}
