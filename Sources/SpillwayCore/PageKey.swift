/// A 128-bit page key.
///
/// Serving engines address pages by content: prefix hashes of KV blocks, tensor ids of weights.
/// The key is opaque to Spillway; it is never interpreted, only hashed for sharding.
public struct PageKey: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var high: UInt64
    public var low: UInt64

    @inlinable
    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// A key whose high half is zero: convenient for tests and benchmarks (`PageKey(42)`).
    @inlinable
    public init(_ low: UInt64) {
        self.init(high: 0, low: low)
    }

    /// Parses exactly 32 hexadecimal digits (the form `description` prints).
    public init?(hex: some StringProtocol) {
        guard hex.utf8.count == 32,
              let high = UInt64(hex.prefix(16), radix: 16),
              let low = UInt64(hex.suffix(16), radix: 16)
        else { return nil }
        self.init(high: high, low: low)
    }

    /// 32 lowercase hexadecimal digits, high half first.
    public var description: String {
        func hex16(_ value: UInt64) -> String {
            let digits = String(value, radix: 16)
            return String(repeating: "0", count: 16 - digits.count) + digits
        }
        return hex16(high) + hex16(low)
    }

    @inlinable
    public static func < (lhs: PageKey, rhs: PageKey) -> Bool {
        (lhs.high, lhs.low) < (rhs.high, rhs.low)
    }

    /// The id a store policy tracks this key by: its mixed hash with bit 63 cleared (the
    /// policy's event rings use it as a flag), never 0 (0 marks an empty ring entry and "no
    /// parent" in `PageHints`).
    @inline(__always)
    public var policyID: UInt64 {
        let value = mixedHash & 0x7FFF_FFFF_FFFF_FFFF
        return value == 0 ? 1 : value
    }

    /// A well-mixed 64-bit hash used for shard and bucket selection. Keys are often already
    /// hashes, but tests and benchmarks use small integers, so both halves go through a
    /// finalizer (murmur3 fmix64) to spread sequential keys evenly.
    @inlinable
    public var mixedHash: UInt64 {
        var value = high &* 0x9E37_79B9_7F4A_7C15 ^ low
        value ^= value >> 33
        value &*= 0xFF51_AFD7_ED55_8CCD
        value ^= value >> 33
        value &*= 0xC4CE_B9FE_1A85_EC53
        value ^= value >> 33
        return value
    }
}
