import Atomics
import CSpillwayLZ4
import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// An opt-in compressing wrapper around a volatile tier (DRAM, remote, erasure-coded): pages
/// spilled to it are LZ4-compressed, so the tier holds more of them.
///
/// The store sees a tier of `virtualCapacity` slots (the inner capacity times an expected
/// ratio) and allocates uncompressed-sized extents in that virtual space. A write compresses
/// the page, allocates just enough *physical* slots of the inner tier for
/// [u32 length | u32 compressed bytes | payload] and remembers the mapping; a read fetches the
/// physical bytes and decompresses straight into the caller's buffer. A page whose compressed
/// form would not save a slot is stored raw, headerless, straight from and into the caller's
/// buffer (a flag in the mapping says so). When the inner tier is physically full a
/// write fails with `ENOSPC` (the store then keeps the page where it was or reports the put as
/// failed): the expected ratio is a promise the data may not keep.
///
/// Not for persistent tiers: a recovered NVMe page would come back compressed, so the
/// configuration refuses it there.
///
/// `@unchecked Sendable`: a virtual slot's mapping is written only by the write that owns the
/// extent and read only by reads the store orders after it (the directory publishes pages
/// under its locks), exactly as for any tier's slot contents.
public final class CompressedTier: Tier, @unchecked Sendable {
    public let descriptor: TierDescriptor
    public let inner: any Tier
    private let virtualSlots: SlotAllocator
    /// Per virtual first slot: physical first slot (high 32 bits), a raw flag (bit 31: stored
    /// uncompressed, without a header) and physical slot count + 1 (bits 0…30; 0 = unmapped).
    private let mapping: UnsafeMutablePointer<UInt64>
    private let innerSlot: Int
    public let bytesIn = ManagedAtomic<Int>(0)
    public let bytesStored = ManagedAtomic<Int>(0)
    public let incompressiblePages = ManagedAtomic<Int>(0)
    public let physicalFull = ManagedAtomic<Int>(0)

    static let headerBytes = 8

    public init(wrapping inner: any Tier, expectedRatio: Double) throws(SpillwayError) {
        let descriptor = inner.descriptor
        guard expectedRatio >= 1, expectedRatio <= 8 else {
            throw .invalidConfiguration("tier '\(descriptor.name)': compression ratio \(expectedRatio) must be 1…8")
        }
        guard !descriptor.recordsPageMetadata else {
            throw .invalidConfiguration("tier '\(descriptor.name)': compression is for volatile tiers (a persistent tier would recover compressed pages)")
        }
        self.inner = inner
        innerSlot = descriptor.slotSize
        let capacity = Int(Double(descriptor.capacitySlots) * expectedRatio)
        virtualSlots = SlotAllocator(capacity: capacity)
        mapping = .allocate(capacity: max(1, capacity))
        mapping.initialize(repeating: 0, count: max(1, capacity))
        var view = descriptor
        view.capacitySlots = capacity
        view.completesInline = true
        view.verifiesReads = true
        self.descriptor = view
    }

    deinit { mapping.deallocate() }

    public func allocate(slotCount: Int) -> Extent? { virtualSlots.allocate(count: slotCount) }

    public func release(_ extent: Extent) {
        unmap(Int(extent.firstSlot))
        virtualSlots.release(extent)
    }

    static let rawFlag: UInt64 = 1 << 31
    static let countMask: UInt64 = (1 << 31) - 1

    private func unmap(_ slot: Int) {
        let entry = mapping[slot]
        guard entry & Self.countMask != 0 else { return }
        inner.release(Extent(firstSlot: UInt32(entry >> 32), slotCount: UInt32(entry & Self.countMask) - 1))
        mapping[slot] = 0
    }

    public var usedSlots: Int { virtualSlots.usedSlots }
    public var hostMemory: UnsafeMutableRawBufferPointer? { nil }
    public var recoveredPages: [RecoveredPage] { [] }
    public func persistReleases() {}
    public func close() { inner.close() }

    /// Compressed bytes stored per byte given (1 = no gain).
    public var storedFraction: Double {
        let given = bytesIn.load(ordering: .relaxed)
        return given == 0 ? 1 : Double(bytesStored.load(ordering: .relaxed)) / Double(given)
    }

    public func submit(_ batch: TierBatch) {
        defer { for index in 0..<batch.count { batch.finish(index) } }
        let count = batch.count
        guard count > 0 else { return }
        // Staging: one buffer per I/O, as large as the worst case.
        let widest = (0..<count).map { Int(LZ4_compressBound(Int32(batch[$0].length))) + Self.headerBytes }.max() ?? 0
        let stride = (widest + innerSlot - 1) / innerSlot * innerSlot
        let staging = UnsafeMutableRawPointer.allocate(byteCount: max(1, stride * count), alignment: 4096)
        defer { staging.deallocate() }
        let innerBatch = TierBatch(capacity: count)
        var owners: [Int] = []
        for index in 0..<count {
            let io = batch[index]
            guard io.operation != .discard, io.length > 0, let buffer = io.buffer else { continue }
            let slot = Int(io.extent.firstSlot)
            let area = staging + index * stride
            if io.operation == .write {
                let compressed = LZ4_compress_default(buffer.assumingMemoryBound(to: CChar.self), (area + Self.headerBytes).assumingMemoryBound(to: CChar.self),
                                                      Int32(io.length), Int32(stride - Self.headerBytes))
                let plainSlots = (io.length + innerSlot - 1) / innerSlot
                let packedSlots = compressed > 0 ? (Self.headerBytes + Int(compressed) + innerSlot - 1) / innerSlot : Int.max
                // Compressed only if it saves a slot; otherwise raw, headerless, from the caller.
                let raw = packedSlots >= plainSlots
                let physicalSlots = raw ? plainSlots : packedSlots
                if raw {
                    incompressiblePages.wrappingIncrement(ordering: .relaxed)
                } else {
                    area.storeBytes(of: UInt32(io.length).littleEndian, toByteOffset: 0, as: UInt32.self)
                    area.storeBytes(of: UInt32(compressed).littleEndian, toByteOffset: 4, as: UInt32.self)
                }
                unmap(slot)
                guard let physical = inner.allocate(slotCount: physicalSlots) else {
                    physicalFull.wrappingIncrement(ordering: .relaxed)
                    batch.setStatus(index, ENOSPC)
                    continue
                }
                mapping[slot] = UInt64(physical.firstSlot) << 32 | (raw ? Self.rawFlag : 0) | UInt64(physicalSlots + 1)
                innerBatch.append(raw ? TierIO(operation: .write, extent: physical, buffer: buffer, length: io.length)
                                      : TierIO(operation: .write, extent: physical, buffer: area, length: Self.headerBytes + Int(compressed)))
                bytesIn.wrappingIncrement(by: io.length, ordering: .relaxed)
                bytesStored.wrappingIncrement(by: raw ? io.length : Self.headerBytes + Int(compressed), ordering: .relaxed)
            } else {
                let entry = mapping[slot]
                guard entry & Self.countMask != 0 else {
                    batch.setStatus(index, EIO)
                    continue
                }
                let physicalSlots = Int(entry & Self.countMask) - 1
                let physical = Extent(firstSlot: UInt32(entry >> 32), slotCount: UInt32(physicalSlots))
                if entry & Self.rawFlag != 0 {
                    // Stored raw: straight into the caller's buffer.
                    innerBatch.append(TierIO(operation: .read, extent: physical, buffer: buffer, length: io.length))
                } else {
                    innerBatch.append(TierIO(operation: .read, extent: physical, buffer: area, length: min(stride, physicalSlots * innerSlot)))
                }
            }
            owners.append(index)
        }
        guard innerBatch.count > 0 else { return }
        innerBatch.run(on: inner, inline: inner.descriptor.completesInline)
        for (position, index) in owners.enumerated() {
            let status = innerBatch[position].status
            let io = batch[index]
            if status != 0 {
                batch.setStatus(index, status)
                if io.operation == .write { unmap(Int(io.extent.firstSlot)) }
                continue
            }
            guard io.operation == .read, let buffer = io.buffer, mapping[Int(io.extent.firstSlot)] & Self.rawFlag == 0 else { continue }
            let area = staging + index * stride
            let length = Int(UInt32(littleEndian: area.load(fromByteOffset: 0, as: UInt32.self)))
            let stored = Int(UInt32(littleEndian: area.load(fromByteOffset: 4, as: UInt32.self)))
            guard length == io.length, stored > 0, stored <= stride - Self.headerBytes else {
                batch.setStatus(index, EIO)
                continue
            }
            let produced = LZ4_decompress_safe((area + Self.headerBytes).assumingMemoryBound(to: CChar.self),
                                               buffer.assumingMemoryBound(to: CChar.self), Int32(stored), Int32(io.length))
            if Int(produced) != io.length { batch.setStatus(index, EIO) }
        }
    }
}

/// LZ4 on its own, for measurement (`spillway bench compression`).
public enum LZ4Codec {
    /// Byte shuffle (Blosc's filter): element byte j of every element goes to plane j, so the
    /// sign/exponent bytes of fp16 values, which repeat a lot, sit together.
    public static func shuffle(_ input: UnsafeRawPointer, _ output: UnsafeMutableRawPointer, count: Int, elementSize: Int) {
        let elements = count / elementSize
        for element in 0..<elements {
            for byte in 0..<elementSize {
                output.storeBytes(of: input.load(fromByteOffset: element * elementSize + byte, as: UInt8.self),
                                  toByteOffset: byte * elements + element, as: UInt8.self)
            }
        }
        let tail = elements * elementSize
        if tail < count { memcpy(output + tail, input + tail, count - tail) }
    }

    public static func unshuffle(_ input: UnsafeRawPointer, _ output: UnsafeMutableRawPointer, count: Int, elementSize: Int) {
        let elements = count / elementSize
        for element in 0..<elements {
            for byte in 0..<elementSize {
                output.storeBytes(of: input.load(fromByteOffset: byte * elements + element, as: UInt8.self),
                                  toByteOffset: element * elementSize + byte, as: UInt8.self)
            }
        }
        let tail = elements * elementSize
        if tail < count { memcpy(output + tail, input + tail, count - tail) }
    }

    /// Like `measure`, with a byte shuffle of `elementSize`-byte elements before LZ4 (and the
    /// unshuffle after decompressing, both timed).
    public static func measureShuffled(_ pages: [[UInt8]], elementSize: Int, seconds: Double) -> (ratio: Double, compress: Double, decompress: Double) {
        let widest = pages.map(\.count).max() ?? 0
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: max(1, widest), alignment: 64)
        defer { scratch.deallocate() }
        let shuffled = pages.map { page -> [UInt8] in
            var out = [UInt8](repeating: 0, count: page.count)
            page.withUnsafeBytes { source in out.withUnsafeMutableBytes { shuffle(source.baseAddress!, $0.baseAddress!, count: page.count, elementSize: elementSize) } }
            return out
        }
        let plain = measure(shuffled, seconds: seconds)
        // Shuffle cost per byte, measured on the same pages.
        func rate(_ body: ([UInt8]) -> Void) -> Double {
            let started = monotonicNanoseconds()
            var bytes = 0
            repeat {
                for page in pages { body(page); bytes += page.count }
            } while Double(monotonicNanoseconds() &- started) / 1e9 < seconds / 4
            return Double(bytes) / (Double(monotonicNanoseconds() &- started) / 1e9)
        }
        let shuffleRate = rate { page in page.withUnsafeBytes { shuffle($0.baseAddress!, scratch, count: page.count, elementSize: elementSize) } }
        let unshuffleRate = rate { page in page.withUnsafeBytes { unshuffle($0.baseAddress!, scratch, count: page.count, elementSize: elementSize) } }
        // Rates combine as harmonic sums (time per byte adds up).
        return (plain.ratio, 1 / (1 / plain.compress + 1 / shuffleRate), 1 / (1 / plain.decompress + 1 / unshuffleRate))
    }

    /// Compression ratio (input / output), and compress and decompress throughput in input
    /// bytes per second, over `pages` (each compressed on its own, as the tier does).
    public static func measure(_ pages: [[UInt8]], seconds: Double) -> (ratio: Double, compress: Double, decompress: Double) {
        let widest = pages.map { Int(LZ4_compressBound(Int32($0.count))) }.max() ?? 0
        let output = UnsafeMutablePointer<CChar>.allocate(capacity: max(1, widest) * pages.count)
        let restored = UnsafeMutablePointer<CChar>.allocate(capacity: max(1, pages.map(\.count).max() ?? 0))
        defer {
            output.deallocate()
            restored.deallocate()
        }
        var sizes = [Int32](repeating: 0, count: pages.count)
        var input = 0
        var stored = 0
        for (index, page) in pages.enumerated() {
            sizes[index] = page.withUnsafeBytes {
                LZ4_compress_default($0.baseAddress!.assumingMemoryBound(to: CChar.self), output + index * widest, Int32(page.count), Int32(widest))
            }
            input += page.count
            stored += Int(sizes[index])
        }
        func rate(_ body: () -> Void) -> Double {
            let started = monotonicNanoseconds()
            var rounds = 0
            repeat {
                body()
                rounds += 1
            } while Double(monotonicNanoseconds() &- started) / 1e9 < seconds
            return Double(rounds * input) / (Double(monotonicNanoseconds() &- started) / 1e9)
        }
        let compress = rate {
            for (index, page) in pages.enumerated() {
                _ = page.withUnsafeBytes {
                    LZ4_compress_default($0.baseAddress!.assumingMemoryBound(to: CChar.self), output + index * widest, Int32(page.count), Int32(widest))
                }
            }
        }
        let decompress = rate {
            for (index, page) in pages.enumerated() {
                _ = LZ4_decompress_safe(output + index * widest, restored, sizes[index], Int32(page.count))
            }
        }
        return (Double(input) / Double(max(1, stored)), compress, decompress)
    }
}
