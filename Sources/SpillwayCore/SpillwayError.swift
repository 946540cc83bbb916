#if canImport(Glibc)
import Glibc
#endif

/// The one error type of Spillway's public API.
///
/// Every case is something a caller can cause or a tier can report; none of them crash the
/// process. `code` is stable and is what the C ABI returns.
public enum SpillwayError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The named tier has no free extent of the requested size (and nothing could be moved out).
    case tierFull(tier: String)
    /// No tier can take the page: every candidate is pinned or the pool is exhausted.
    case storeFull(requiredSlots: Int)
    /// The page is longer than the pool's maximum page size.
    case pageTooLarge(length: Int, limit: Int)
    /// No visible page has this key (never written, removed, evicted or still being written).
    case unknownKey(PageKey)
    /// The caller's buffer cannot hold the page.
    case bufferTooSmall(required: Int, available: Int)
    /// Bytes read back from a tier do not match the CRC32C recorded when they were stored.
    /// The page is dropped from the directory: a cache never serves bytes it cannot vouch for.
    case checksumMismatch(key: PageKey, tier: String, expected: UInt32, actual: UInt32)
    /// A tier reported an I/O failure (`errno` is the POSIX error number).
    case tierIO(tier: String, operation: String, errno: Int32)
    /// The page is pinned: it cannot be removed or overwritten until unpinned.
    case pagePinned(PageKey)
    /// `unpin` without a matching `pin`.
    case notPinned(PageKey)
    /// The store has been closed.
    case closed
    /// A configuration value is out of range or inconsistent.
    case invalidConfiguration(String)
    /// A caller-supplied argument is malformed.
    case invalidArgument(String)
    /// A network transport (libfabric RMA) failed: `operation` is the call or the work item
    /// (`fi_read`, `fi_mr_reg`, ...), `errno` the positive error number the provider reported and
    /// `reason` its text (`fi_strerror`, plus a hint where one helps, e.g. raising `ulimit -l`).
    case transport(provider: String, operation: String, errno: Int32, reason: String)

    /// Stable numeric codes (the C ABI's `spillway_status`).
    public var code: Int32 {
        switch self {
        case .tierFull: 1
        case .storeFull: 2
        case .pageTooLarge: 3
        case .unknownKey: 4
        case .bufferTooSmall: 5
        case .checksumMismatch: 6
        case .tierIO: 7
        case .pagePinned: 8
        case .notPinned: 9
        case .closed: 10
        case .invalidConfiguration: 11
        case .invalidArgument: 12
        case .transport: 13
        }
    }

    public var description: String {
        switch self {
        case .tierFull(let tier): "tier '\(tier)' is full"
        case .storeFull(let slots): "no tier can take a page of \(slots) slot(s): every tier is full or pinned"
        case .pageTooLarge(let length, let limit): "page of \(length) bytes exceeds the limit of \(limit) bytes"
        case .unknownKey(let key): "no page with key \(key)"
        case .bufferTooSmall(let required, let available): "buffer of \(available) bytes cannot hold a page of \(required) bytes"
        case .checksumMismatch(let key, let tier, let expected, let actual):
            "checksum mismatch for page \(key) on tier '\(tier)': expected crc32c \(hex(expected)), read \(hex(actual))"
        case .tierIO(let tier, let operation, let errno):
            "\(operation) on tier '\(tier)' failed: \(String(cString: strerror(errno))) (errno \(errno))"
        case .pagePinned(let key): "page \(key) is pinned"
        case .notPinned(let key): "page \(key) is not pinned"
        case .closed: "the store is closed"
        case .invalidConfiguration(let reason): "invalid configuration: \(reason)"
        case .invalidArgument(let reason): "invalid argument: \(reason)"
        case .transport(let provider, let operation, let errno, let reason):
            "\(operation) over provider '\(provider)' failed: \(reason) (errno \(errno))"
        }
    }
}

private func hex(_ value: UInt32) -> String {
    let digits = String(value, radix: 16)
    return "0x" + String(repeating: "0", count: 8 - digits.count) + digits
}
