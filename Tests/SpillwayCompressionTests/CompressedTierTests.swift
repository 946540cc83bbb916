import Glibc
import Testing
@testable import SpillwayCompression
@testable import SpillwayCore
@testable import SpillwayMemoryTiers
@testable import SpillwayStore

/// fp16 values of a normal distribution (KV-cache-like activations), as raw bytes.
func fp16Normal(_ count: Int, seed: UInt64, scale: Float = 1) -> [UInt8] {
    var generator = SplitMix64(seed: seed)
    var bytes = [UInt8]()
    bytes.reserveCapacity(count * 2)
    for _ in 0..<count {
        let u1 = Float(generator.next() >> 40 | 1) / Float(1 << 24)
        let u2 = Float(generator.next() >> 40) / Float(1 << 24)
        let value = Float16(scale * (-2 * log(u1)).squareRoot() * cos(2 * .pi * u2))
        withUnsafeBytes(of: value.bitPattern.littleEndian) { bytes += $0 }
    }
    return bytes
}

@Suite struct CompressedTierTests {
    @Test func pagesRoundTripThroughACompressedSpillTier() throws {
        let inner = try DRAMTier(name: "spill", slotSize: 4096, capacitySlots: 64, prefault: false)
        let compressed = try CompressedTier(wrapping: inner, expectedRatio: 3)
        #expect(compressed.descriptor.capacitySlots == 192)
        let store = try TieredStore(tiers: [try DRAMTier(name: "top", slotSize: 4096, capacitySlots: 4, prefault: false), compressed],
                                    options: StoreOptions(maxPageSize: 8192, backgroundWorker: false))
        defer { store.close() }
        var expected: [PageKey: [UInt8]] = [:]
        for value in 0..<60 {
            // Mostly-zero pages (padding, masked positions) compress well; fp16 noise does not.
            let page: [UInt8] = value % 3 == 0 ? fp16Normal(2048, seed: UInt64(value))
                : [UInt8](repeating: 0, count: 6000) + Array(fp16Normal(100, seed: UInt64(value)))
            try store.put(PageKey(UInt64(value)), bytes: page)
            expected[PageKey(UInt64(value))] = page
        }
        #expect(store.stats().tiers[1].pages > 40, "most pages spilled to the compressed tier")
        #expect(compressed.storedFraction < 0.6)
        #expect(compressed.incompressiblePages.load(ordering: .relaxed) > 0, "fp16 noise is stored raw")
        // Sixty pages of up to two slots each in 64 physical slots: only because of compression.
        for (key, page) in expected { #expect(try store.get(key) == page) }
    }

    @Test func aPhysicallyFullTierRefusesWritesAndLosesNothing() throws {
        let inner = try DRAMTier(name: "spill", slotSize: 4096, capacitySlots: 8, prefault: false)
        let compressed = try CompressedTier(wrapping: inner, expectedRatio: 4)
        let store = try TieredStore(tiers: [compressed], options: StoreOptions(maxPageSize: 4096, backgroundWorker: false))
        defer { store.close() }
        var stored: [PageKey: [UInt8]] = [:]
        var refused = 0
        for value in 0..<32 {
            let page = fp16Normal(2048, seed: UInt64(value))  // incompressible: one physical slot each
            do throws(SpillwayError) {
                try store.put(PageKey(UInt64(value)), bytes: page)
                stored[PageKey(UInt64(value))] = page
            } catch {
                // The one acceptable refusal: the wrapped tier has no physical slot (ENOSPC).
                guard case .tierIO(tier: "spill", operation: "write", errno: ENOSPC) = error else {
                    Issue.record("page \(value): expected the physical tier to be full (ENOSPC), got \(error)")
                    continue
                }
                refused += 1
            }
        }
        #expect(refused > 0)
        #expect(compressed.physicalFull.load(ordering: .relaxed) == refused, "every refusal was a full physical tier")
        for (key, page) in stored { #expect(try store.get(key) == page) }
    }

    @Test func invalidCompressionSettingsAreRefused() throws {
        let inner = try DRAMTier(slotSize: 4096, capacitySlots: 8, prefault: false)
        for ratio in [0.5, 9] {
            let error = #expect(throws: SpillwayError.self) { _ = try CompressedTier(wrapping: inner, expectedRatio: ratio) }
            guard case .invalidConfiguration(let message) = error else {
                Issue.record("ratio \(ratio): expected invalidConfiguration, got \(String(describing: error))")
                continue
            }
            #expect(message.contains("compression ratio"), "\(message)")
        }
    }
}
