import SpillwayCore
import SpillwayRemote

/// A thread's scratch for erasure-coded batches: the units (one per page), their splits'
/// bytes, the late-binding counters per daemon, and a `FanOut` (the operations laid out
/// daemon by daemon with each one's unit and split, and the exchange legs). Grown to the largest batch the thread ran and reused, so a batch
/// allocates nothing once the thread has warmed up.
///
/// Each thread has its own (`ThreadScratch`); a batch nested inside another on one thread gets
/// a fresh instance for its duration instead.
final class ErasureScratch {
    private(set) var units: UnsafeMutablePointer<ErasureCodedTier.Unit>
    private(set) var splits: UnsafeMutableRawPointer
    private(set) var owed: UnsafeMutablePointer<Int>
    let fanOut = FanOut()
    /// One pointer per split (encode and decode sources), and decode targets.
    let pointers: UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>
    let targetPointers: UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>
    static let maxSplits = 64

    private var unitCapacity = 0
    private var splitBytes = 0
    private var daemonCapacity = 0

    private static let perThread = ThreadScratch { ErasureScratch() }

    init() {
        units = .allocate(capacity: 1)
        splits = .allocate(byteCount: 64, alignment: 64)
        owed = .allocate(capacity: 1)
        pointers = .allocate(capacity: Self.maxSplits)
        targetPointers = .allocate(capacity: Self.maxSplits)
        unitCapacity = 1
        splitBytes = 64
        daemonCapacity = 1
    }

    deinit {
        units.deallocate()
        splits.deallocate()
        owed.deallocate()
        pointers.deallocate()
        targetPointers.deallocate()
    }

    private func reserve(units count: Int, n: Int, splitSize: Int, daemons: Int) {
        precondition(n <= Self.maxSplits)  // RS(k, r) is checked at open: k + r ≤ 32
        if count > unitCapacity {
            unitCapacity = max(count, unitCapacity * 2)
            units.deallocate()
            units = .allocate(capacity: unitCapacity)
        }
        if count * n * splitSize > splitBytes {
            splitBytes = max(count * n * splitSize, splitBytes * 2)
            splits.deallocate()
            splits = .allocate(byteCount: splitBytes, alignment: 64)
        }
        if daemons > daemonCapacity {
            daemonCapacity = max(daemons, daemonCapacity * 2)
            owed.deallocate()
            owed = .allocate(capacity: daemonCapacity)
        }
    }

    /// Runs `body` with the calling thread's scratch, sized for the batch.
    static func withCurrent<R>(units: Int, n: Int, splitSize: Int, daemons: Int, _ body: (ErasureScratch) -> R) -> R {
        perThread.with { scratch in
            scratch.reserve(units: units, n: n, splitSize: splitSize, daemons: daemons)
            return body(scratch)
        }
    }
}
