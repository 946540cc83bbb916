import CSpillwayISAL

/// CRC32C (Castagnoli, the iSCSI polynomial) via ISA-L's `crc32_iscsi`, which picks the
/// fastest implementation for the CPU at run time (SSE4.2 `crc32`, PCLMUL folding).
///
/// ISA-L's function takes and returns the raw register; the standard CRC32C is the
/// complement of the register seeded with all ones. `CRC32C.checksum("123456789")` is
/// `0xE3069283`, the published check value.
public enum CRC32C {
    /// The CRC32C of `bytes`.
    @inlinable
    public static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        ~update(register: 0xFFFF_FFFF, bytes)
    }

    /// Continues a running register (seed `0xFFFF_FFFF`, complement at the end) over `bytes`.
    /// ISA-L takes an `int` length, so very large buffers are fed in chunks.
    @inlinable
    public static func update(register: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard var cursor = bytes.baseAddress, !bytes.isEmpty else { return register }
        var remaining = bytes.count
        var state = register
        let chunk = 1 << 30
        while remaining > 0 {
            let length = min(remaining, chunk)
            state = crc32_iscsi(
                UnsafeMutablePointer(mutating: cursor.assumingMemoryBound(to: UInt8.self)),
                Int32(length), state)
            cursor += length
            remaining -= length
        }
        return state
    }

    /// Convenience for tests and small inputs.
    public static func checksum(_ bytes: some Sequence<UInt8>) -> UInt32 {
        let array = Array(bytes)
        return array.withUnsafeBytes { checksum($0) }
    }
}
