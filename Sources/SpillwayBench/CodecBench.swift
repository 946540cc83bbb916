import Spillway

#if canImport(Glibc)
import Glibc
#endif

/// `spillway bench ec-encode`: the erasure-coded tier's encoder alone, for comparison with a
/// raw ISA-L loop (Bench/isal_encode_reference.c) on the same sizes. Two numbers: the
/// `ReedSolomonCode.encode` call (what ISA-L's loop does), and the tier's whole per-page
/// encode step (copy into the split buffer, encode, CRC32C of every split).
public enum CodecBench {
    public static func run(k: Int, r: Int, blockSize: Int, durationSeconds: Double) throws(SpillwayError) -> JSONValue {
        let code = try ReedSolomonCode(k: k, r: r)
        let n = k + r
        let split = ((blockSize + k - 1) / k + 63) / 64 * 64
        let page = UnsafeMutableRawPointer.allocate(byteCount: blockSize, alignment: 64)
        let splits = UnsafeMutableRawPointer.allocate(byteCount: n * split, alignment: 64)
        let pointers = UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>.allocate(capacity: n)
        defer {
            page.deallocate()
            splits.deallocate()
            pointers.deallocate()
        }
        var generator = SplitMix64(seed: 7)
        for offset in stride(from: 0, to: blockSize, by: 8) { page.storeBytes(of: generator.next(), toByteOffset: offset, as: UInt64.self) }
        memcpy(splits, page, blockSize)
        for i in 0..<n { pointers[i] = (splits + i * split).assumingMemoryBound(to: UInt8.self) }

        func measure(_ body: () -> Void) -> Double {
            let deadline = monotonicNanoseconds() &+ UInt64(durationSeconds * 1e9)
            let started = monotonicNanoseconds()
            var pages = 0
            while true {
                for _ in 0..<64 { body() }
                pages += 64
                if monotonicNanoseconds() >= deadline { break }
            }
            return Double(pages * blockSize) / (Double(monotonicNanoseconds() &- started) / 1e9)
        }
        let encodeOnly = measure { code.encode(data: pointers, parity: pointers + k, length: split) }
        var checksum: UInt32 = 0
        let pipeline = measure {
            memcpy(splits, page, blockSize)
            memset(splits + blockSize, 0, k * split - blockSize)
            code.encode(data: pointers, parity: pointers + k, length: split)
            for i in 0..<n { checksum ^= CRC32C.checksum(UnsafeRawBufferPointer(start: splits + i * split, count: split)) }
        }
        return .object([
            ("tier", .string("ec-encode")), ("k", .int(k)), ("r", .int(r)), ("block_size", .int(blockSize)), ("split_size", .int(split)),
            ("bytes_per_s", .double(encodeOnly)), ("pipeline_bytes_per_s", .double(pipeline)),
            ("checksum", .int(Int(checksum))),
        ])
    }
}
