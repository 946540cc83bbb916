#if canImport(Glibc)
import Glibc
#endif
import Logging
import SpillwayCore

/// A fixed block of host memory mapped once and never resized: the backing of the DRAM tier
/// and of the host backend of the device tier.
///
/// `mmap` (anonymous, private), `MADV_HUGEPAGE` when the kernel has transparent huge pages
/// (fewer TLB misses on random slot access), optionally pre-faulted (`MAP_POPULATE`) so the first
/// touch of a slot is not a page fault inside a benchmark or a serving step, optionally
/// `mlock`ed (device-like pinned memory; refused locks are logged, not fatal).
///
/// `@unchecked Sendable`: the mapping is immutable after init; concurrent access to the bytes
/// is coordinated by the tier's slot allocator and the page directory's reader counts.
public final class HostArena: @unchecked Sendable {
    public let region: MappedRegion
    public let locked: Bool

    public var base: UnsafeMutableRawPointer { region.base }
    public var byteCount: Int { region.byteCount }
    public var hugePages: Bool { region.hugePages }

    public convenience init(byteCount: Int, prefault: Bool, lock: Bool, label: String, logger: Logger) throws(SpillwayError) {
        try self.init(byteCount: byteCount, prefault: prefault, lock: lock, label: label, logger: logger, locker: HostArena.systemLock)
    }

    /// `mlock`: 0, or the errno of the refusal.
    static func systemLock(_ base: UnsafeMutableRawPointer, _ byteCount: Int) -> Int32 {
        mlock(base, byteCount) == 0 ? 0 : errno
    }

    /// `locker` pins the mapping (0, or an errno): `mlock` outside tests. Tests pass one that
    /// refuses, because the refusal cannot be provoked reliably for real (root, which the test
    /// machines run as, has CAP_IPC_LOCK and ignores RLIMIT_MEMLOCK).
    init(byteCount: Int, prefault: Bool, lock: Bool, label: String, logger: Logger,
         locker: (UnsafeMutableRawPointer, Int) -> Int32) throws(SpillwayError)
    {
        guard byteCount > 0 else { throw .invalidConfiguration("\(label): arena size must be positive") }
        do {
            region = try MappedRegion(byteCount: byteCount, prefault: prefault)
        } catch {
            throw .tierIO(tier: label, operation: "mmap of \(ByteCount.format(byteCount))", errno: error.errno)
        }
        if !region.hugePages {
            logger.info("transparent huge pages unavailable for arena", metadata: ["tier": "\(label)"])
        }
        if lock {
            let refusal = locker(region.base, byteCount)
            if refusal == 0 {
                locked = true
            } else {
                locked = false
                logger.warning(
                    "mlock refused; continuing with unpinned memory (raise RLIMIT_MEMLOCK or run as root)",
                    metadata: ["tier": "\(label)", "bytes": "\(byteCount)", "errno": "\(refusal)"])
            }
        } else {
            locked = false
        }
    }

    deinit {
        if locked { munlock(region.base, region.byteCount) }
    }
}
