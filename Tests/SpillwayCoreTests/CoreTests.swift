import Glibc
import Testing
import SpillwayTestSupport
@testable import SpillwayCore

@Suite struct PageKeyTests {
    @Test func hexRoundTrip() {
        let key = PageKey(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210)
        #expect(key.description == "0123456789abcdeffedcba9876543210")
        #expect(PageKey(hex: key.description) == key)
        #expect(PageKey(hex: "xyz") == nil)
        #expect(PageKey(hex: String(repeating: "g", count: 32)) == nil)
    }

    @Test func orderingAndHashSpread() {
        #expect(PageKey(high: 0, low: 5) < PageKey(high: 1, low: 0))
        // Sequential keys must spread over all 64 shards.
        var shards = Set<Int>()
        for value in 0..<1000 { shards.insert(PageDirectory.shardIndex(PageKey(UInt64(value)).mixedHash)) }
        #expect(shards.count == PageDirectory.shardCount)
    }
}

@Suite struct ByteCountTests {
    @Test(arguments: [
        ("4096", 4096), ("0", 0), ("4k", 4096), ("4K", 4096), ("4KiB", 4096), ("4kib", 4096), ("4ki", 4096), ("4kB", 4096),
        ("256m", 256 << 20), ("1g", 1 << 30), ("1GiB", 1 << 30), ("2t", 2 << 40), ("64M", 64 << 20),
    ])
    func parsesValidSizes(text: String, bytes: Int) {
        #expect(ByteCount.parse(text) == bytes)
    }

    @Test(arguments: ["", "k", "-4k", "4.5k", "4x", "4 k", "4kk", "4096b", "ib", "4kibb", "99999999999999999999t", "1e3"])
    func rejectsInvalidSizes(text: String) {
        #expect(ByteCount.parse(text) == nil)
    }

    @Test func formats() {
        #expect(ByteCount.format(4096) == "4KiB")
        #expect(ByteCount.format(1536) == "1536B")
        #expect(ByteCount.format(3 << 30) == "3GiB")
    }
}

@Suite struct CRC32CTests {
    @Test func publishedCheckValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8]()) == 0)
    }

    @Test func incrementalEqualsOneShot() {
        let seed = TestSeed.derive(101)
        var generator = SplitMix(seed: seed)
        let bytes = (0..<10_000).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let whole = CRC32C.checksum(bytes)
        let split = bytes.withUnsafeBytes { raw in
            let first = CRC32C.update(register: 0xFFFF_FFFF, UnsafeRawBufferPointer(rebasing: raw[0..<3333]))
            return ~CRC32C.update(register: first, UnsafeRawBufferPointer(rebasing: raw[3333...]))
        }
        #expect(split == whole, "\(TestSeed.note(seed))")
        var flipped = bytes
        flipped[5000] ^= 1
        #expect(CRC32C.checksum(flipped) != whole, "\(TestSeed.note(seed))")
    }

    /// The fused copy (streaming stores, 64-byte ones where the CPU has AVX-512F) copies every
    /// byte and returns the source's CRC32C, for lengths around chunk and line boundaries and
    /// sources and destinations at every alignment the paths distinguish.
    @Test func copyStreamingCopiesEveryByteAndChecksumsTheSource() {
        let seed = TestSeed.derive(102)
        var generator = SplitMix(seed: seed)
        let capacity = 80 << 10
        let source = UnsafeMutableRawPointer.allocate(byteCount: capacity + 128, alignment: 4096)
        let destination = UnsafeMutableRawPointer.allocate(byteCount: capacity + 128, alignment: 4096)
        defer { source.deallocate(); destination.deallocate() }
        for offset in 0..<(capacity + 128) { source.storeBytes(of: UInt8.random(in: 0...255, using: &generator), toByteOffset: offset, as: UInt8.self) }
        let lengths = [0, 1, 63, 64, 65, 127, 4096, 4097, 16 << 10, (16 << 10) + 1, 65536, 65536 + 17, (64 << 10) + (16 << 10) - 1]
        for length in lengths {
            for (sourceShift, destinationShift) in [(0, 0), (16, 0), (1, 0), (0, 16), (0, 64), (3, 5)] {
                memset(destination, 0xEE, capacity + 128)
                let from = UnsafeRawPointer(source + sourceShift)
                let checksum = CRC32C.copyStreaming(to: destination + destinationShift, from: from, length: length)
                let context = "length \(length), shifts \(sourceShift)/\(destinationShift), \(TestSeed.note(seed))"
                #expect(checksum == CRC32C.checksum(UnsafeRawBufferPointer(start: from, count: length)), "\(context)")
                #expect(memcmp(destination + destinationShift, from, length) == 0, "\(context)")
                #expect(destination.load(fromByteOffset: destinationShift + length, as: UInt8.self) == 0xEE, "wrote past the end: \(context)")
                if destinationShift > 0 {
                    #expect(destination.load(fromByteOffset: destinationShift - 1, as: UInt8.self) == 0xEE, "wrote before the start: \(context)")
                }
            }
        }
    }
}

@Suite struct SlotAllocatorTests {
    @Test func singleSlotsUntilFull() {
        let allocator = SlotAllocator(capacity: 130)
        var seen = Set<UInt32>()
        for _ in 0..<130 {
            let extent = allocator.allocate(count: 1)
            #expect(extent != nil)
            if let extent { #expect(seen.insert(extent.firstSlot).inserted) }
        }
        #expect(allocator.allocate(count: 1) == nil)
        #expect(allocator.usedSlots == 130)
        allocator.release(Extent(firstSlot: 77, slotCount: 1))
        #expect(allocator.allocate(count: 1) == Extent(firstSlot: 77, slotCount: 1))
    }

    @Test func contiguousRunsAndFragmentation() {
        let allocator = SlotAllocator(capacity: 64)
        let run = allocator.allocate(count: 10)
        #expect(run?.slotCount == 10)
        // Fragment: allocate everything else in singles, free every other one.
        var singles: [Extent] = []
        while let single = allocator.allocate(count: 1) { singles.append(single) }
        for (index, single) in singles.enumerated() where index % 2 == 0 { allocator.release(single) }
        #expect(allocator.allocate(count: 2) == nil, "no two adjacent free slots exist")
        allocator.release(run!)
        let again = allocator.allocate(count: 10)
        #expect(again == run)
        #expect(allocator.allocate(count: 65) == nil)
        #expect(allocator.allocate(count: 0) == nil)
    }

    @Test func randomAllocationsNeverOverlap() {
        let allocator = SlotAllocator(capacity: 1000)
        let seed = TestSeed.derive(102)
        var generator = SplitMix(seed: seed)
        var live: [Extent] = []
        var owned = Set<UInt32>()
        for step in 0..<20_000 {
            if live.isEmpty || generator.next() % 3 != 0 {
                let count = Int(generator.next() % 8) + 1
                if let extent = allocator.allocate(count: count) {
                    for slot in extent.firstSlot..<extent.endSlot {
                        #expect(owned.insert(slot).inserted, "slot \(slot) handed out twice at step \(step), \(TestSeed.note(seed))")
                    }
                    live.append(extent)
                }
            } else {
                let extent = live.remove(at: Int(generator.next() % UInt64(live.count)))
                for slot in extent.firstSlot..<extent.endSlot { owned.remove(slot) }
                allocator.release(extent)
            }
            #expect(allocator.usedSlots == owned.count, "step \(step), \(TestSeed.note(seed))")
        }
    }
}

@Suite struct TierBatchTests {
    @Test func inlineAndAsynchronousCompletion() async {
        let batch = TierBatch(capacity: 4)
        for slot in 0..<3 {
            batch.append(TierIO(operation: .read, extent: Extent(firstSlot: UInt32(slot), slotCount: 1), buffer: nil, length: 0))
        }
        batch.beginSubmission(inline: true)
        for index in 0..<3 { batch.complete(index, status: 0) }
        batch.wait()
        #expect(batch.firstFailure == nil)

        batch.beginSubmission(inline: false)
        let done = Task.detached {
            for index in 0..<3 { batch.complete(index, status: index == 1 ? 5 : 0) }
        }
        batch.wait()
        await done.value
        #expect(batch.firstFailure?.index == 1)
        #expect(batch.firstFailure?.status == 5)
    }
}

/// Deterministic generator for tests: SpillwayCore's SplitMix64.
typealias SplitMix = SplitMix64
