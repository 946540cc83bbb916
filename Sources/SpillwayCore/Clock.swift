#if canImport(Glibc)
import Glibc
#endif

/// Monotonic nanoseconds (vDSO `clock_gettime`, ~20 ns).
@inline(__always)
public func monotonicNanoseconds() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_MONOTONIC, &spec)
    return UInt64(spec.tv_sec) &* 1_000_000_000 &+ UInt64(spec.tv_nsec)
}
