import CSpillwayCopy
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
        // ISA-L picks AVX-512 code here: leave no AVX-512 state in use (CSpillwayCopy says why).
        spillway_vector_state_reset()
        return state
    }

    /// Copies `length` bytes from `source` into a host-memory tier's `destination` with
    /// streaming stores and returns the source's CRC32C, in one pass over the source: each
    /// 16 KiB chunk is checksummed right after it was copied, while it is still in L1. Two
    /// passes (checksum every page of a batch, then copy them) read the source from memory
    /// twice once a batch outgrows the caches, which measured as much time as the copy itself
    /// (64 KiB KV pages through the Python connector).
    @inlinable
    public static func copyStreaming(to destination: UnsafeMutableRawPointer, from source: UnsafeRawPointer, length: Int) -> UInt32 {
        let chunk = 16 << 10
        var register: UInt32 = 0xFFFF_FFFF
        var offset = 0
        while offset < length {
            let count = min(chunk, length - offset)
            spillway_copy_streaming(destination + offset, source + offset, count)
            register = update(register: register, UnsafeRawBufferPointer(start: source + offset, count: count))
            offset += count
        }
        return ~register
    }

    /// Convenience for tests and small inputs.
    public static func checksum(_ bytes: some Sequence<UInt8>) -> UInt32 {
        let array = Array(bytes)
        return array.withUnsafeBytes { checksum($0) }
    }
}

/// The AVX/AVX-512 register state, for code that calls ISA-L's vector routines directly.
public enum VectorState {
    /// Returns it to its initial configuration after AVX-512 work, so the thread's context
    /// switches stop saving and restoring it (`spillway_vector_state_reset` says why).
    public static func reset() { spillway_vector_state_reset() }
}
