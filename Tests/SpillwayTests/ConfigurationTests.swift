import Testing
@testable import Spillway

@Suite struct ConfigurationTests {
    @Test func parsesAFullDocument() throws {
        let configuration = try SpillwayConfiguration(toml: """
            slot-size = "8k"
            max-page-size = "1MiB"
            policy = "lru"
            background-interval-ms = 50

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
        let store = try TieredStore.open(configuration)
        defer { store.close() }
        #expect(store.tiers.map(\.descriptor.name) == ["hbm0", "dram"])
        #expect(store.tiers[1].descriptor.verifiesReads)
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

    @Test func validationCatchesInconsistentStores() throws {
        let dram = TierConfiguration(kind: .dram, capacity: 1 << 20)
        let device = TierConfiguration(kind: .device, capacity: 1 << 20)
        #expect(throws: SpillwayError.self) { try SpillwayConfiguration(slotSize: 3000, tiers: [dram]).validate() }
        #expect(throws: SpillwayError.self) { try SpillwayConfiguration(tiers: []).validate() }
        #expect(throws: SpillwayError.self) { try SpillwayConfiguration(policy: "mru", tiers: [dram]).validate() }
        #expect(throws: SpillwayError.self) { try SpillwayConfiguration(tiers: [dram, device]).validate() }
        var badCode = TierConfiguration(kind: .erasureCoded, capacity: 1 << 20)
        badCode.r = 0
        #expect(throws: SpillwayError.self) { try SpillwayConfiguration(tiers: [badCode]).validate() }
        badCode.r = 2
        badCode.lateBindingDelta = 3
        #expect(throws: SpillwayError.self) { try SpillwayConfiguration(tiers: [badCode]).validate() }
        #expect(throws: SpillwayError.self) { try SpillwayConfiguration(slotSize: 1 << 20, tiers: [TierConfiguration(kind: .dram, capacity: 4096)]).validate() }
        try SpillwayConfiguration.embeddedDefault.validate()
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
        let store = try TieredStore.open(try ec("write-quorum = 6\nwrite-deadline-ms = 250"))
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
        #expect(throws: SpillwayError.self) { _ = try SpillwayConfiguration(contentsOfFile: "/nonexistent/spillway.toml") }
    }
}
