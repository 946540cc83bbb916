import Atomics
import DequeModule
import Dispatch
import Logging
import SpillwayCore
import SpillwayPolicy

#if canImport(Glibc)
import Glibc
#endif

/// Staging buffers for moves between two tiers that are not host memory (e.g. device ↔ NVMe).
/// At most `limit` exist, each `bufferBytes` long, allocated on first need and reused; a
/// mover that finds none free yields until one is.
final class StagingPool: Sendable {
    private let bufferBytes: Int
    private let limit = 2
    private let state = Locked<(free: [UInt], created: Int)>(([], 0))

    init(bufferBytes: Int) { self.bufferBytes = bufferBytes }

    deinit {
        state.withLock { state in
            for address in state.free { UnsafeMutableRawPointer(bitPattern: address)?.deallocate() }
        }
    }

    func withBuffer<R>(_ body: (UnsafeMutableRawPointer) -> R) -> R {
        var address: UInt = 0
        while address == 0 {
            address = state.withLock { state -> UInt in
                if let free = state.free.popLast() { return free }
                guard state.created < limit else { return 0 }
                state.created += 1
                return UInt(bitPattern: UnsafeMutableRawPointer.allocate(byteCount: bufferBytes, alignment: 4096))
            }
            if address == 0 { sched_yield() }
        }
        defer { state.withLock { $0.free.append(address) } }
        return body(UnsafeMutableRawPointer(bitPattern: address)!)
    }
}
