import Spillway

#if canImport(Glibc)
import Glibc
#endif

/// `spillway bench compression`: LZ4 on KV-cache-like fp16 data, page by page, as the
/// compressed spill tier does it: ratio and throughput for several data shapes.
public enum CompressionBench {
    /// fp16 bit patterns of a normal distribution with standard deviation `scale`, with a
    /// fraction `zeros` of exact zeros (masked or padded positions).
    public static func fp16Pages(count: Int, pageBytes: Int, scale: Float, zeros: Double, seed: UInt64) -> [[UInt8]] {
        var generator = SplitMix64(seed: seed)
        return (0..<count).map { _ in
            var page = [UInt8](repeating: 0, count: pageBytes)
            for index in stride(from: 0, to: pageBytes - 1, by: 2) {
                let pick = Double(generator.next() >> 11) / Double(1 << 53)
                var bits: UInt16 = 0
                if pick >= zeros {
                    let u1 = Float(generator.next() >> 40 | 1) / Float(1 << 24)
                    let u2 = Float(generator.next() >> 40) / Float(1 << 24)
                    bits = Float16(scale * (-2 * log(u1)).squareRoot() * cos(2 * .pi * u2)).bitPattern
                }
                page[index] = UInt8(truncatingIfNeeded: bits)
                page[index + 1] = UInt8(truncatingIfNeeded: bits >> 8)
            }
            return page
        }
    }

    public static func run(pageBytes: Int, seconds: Double) -> JSONValue {
        let shapes: [(String, Float, Double)] = [
            ("fp16 normal (dense KV)", 1, 0), ("fp16 normal, small values (std 0.05)", 0.05, 0),
            ("fp16 normal, 50% zeros (padding/masked)", 1, 0.5), ("all zeros", 1, 1),
        ]
        let rows: [JSONValue] = shapes.map { name, scale, zeros in
            let pages = fp16Pages(count: 256, pageBytes: pageBytes, scale: scale, zeros: zeros, seed: 11)
            let (ratio, compress, decompress) = LZ4Codec.measure(pages, seconds: seconds)
            let shuffled = LZ4Codec.measureShuffled(pages, elementSize: 2, seconds: seconds)
            return .object([("data", .string(name)), ("ratio", .double(ratio)), ("compress_bytes_per_s", .double(compress)),
                             ("decompress_bytes_per_s", .double(decompress)),
                             ("shuffled", .object([("ratio", .double(shuffled.ratio)), ("compress_bytes_per_s", .double(shuffled.compress)),
                                                   ("decompress_bytes_per_s", .double(shuffled.decompress))]))])
        }
        return .object([("tier", .string("compression")), ("codec", .string("lz4")), ("page_bytes", .int(pageBytes)), ("results", .array(rows))])
    }
}
