#if canImport(Glibc)
import Glibc
#endif

/// Anonymous memory mapped once, advised onto transparent huge pages, unmapped on deinit.
///
/// Used for everything touched at random on a hot path (tier arenas, directory tables): with
/// THP in `madvise` mode (the common distribution default) plain `malloc` memory stays on 4 KiB
/// pages and every random access risks a TLB miss.
///
/// `@unchecked Sendable`: the mapping itself never changes after init; users coordinate access
/// to the bytes (locks, atomics, slot ownership).
public final class MappedRegion: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let byteCount: Int
    /// Whether the kernel accepted `MADV_HUGEPAGE`.
    public let hugePages: Bool

    public init(byteCount: Int, prefault: Bool) throws(SystemCallError) {
        precondition(byteCount > 0)
        guard let mapping = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              mapping != MAP_FAILED
        else {
            throw SystemCallError(call: "mmap(\(byteCount))", errno: errno)
        }
        #if os(Linux)
        // Advise first, then fault in: pages faulted after the advice come as 2 MiB pages directly.
        hugePages = madvise(mapping, byteCount, MADV_HUGEPAGE) == 0
        #else
        hugePages = false
        #endif
        if prefault {
            // MADV_POPULATE_WRITE (Linux 5.14) faults everything in one call; older kernels get
            // one write per page.
            let populateWrite: Int32 = 23
            if madvise(mapping, byteCount, populateWrite) != 0 {
                var offset = 0
                while offset < byteCount {
                    mapping.storeBytes(of: 0, toByteOffset: offset, as: UInt8.self)
                    offset += 4096
                }
            }
        }
        base = mapping
        self.byteCount = byteCount
    }

    deinit { munmap(base, byteCount) }
}
