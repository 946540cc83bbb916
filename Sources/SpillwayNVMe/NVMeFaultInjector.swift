import Atomics
import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// Injectable I/O failures for the NVMe tier, in the spirit of swift-system's
/// `Internals/Mocking.swift`: tests arm rules, and the tier rewrites the result of matching real
/// completions before interpreting them, so every error path (short transfers, `EINTR`,
/// `EAGAIN`, `EIO`, `ENOSPC`) runs the production code. Disarmed, it costs one relaxed load per
/// completion.
public final class NVMeFaultInjector: Sendable {
    public enum Operation: Sendable, Equatable {
        /// Page reads and page writes.
        case read, write
        /// Writes of journal, index and checkpoint blocks (the tier's metadata).
        case metadataWrite
        case any
    }

    public enum Effect: Sendable, Equatable {
        /// The I/O fails with this errno.
        case error(Int32)
        /// The I/O transfers only part of what was asked (half, in whole 4 KiB blocks).
        case shortTransfer
        /// `EINTR`: the tier must resubmit.
        case interrupted
        /// `EAGAIN`: the tier must resubmit (a bounded number of times).
        case wouldBlock
    }

    private struct Rule {
        var operation: Operation
        var effect: Effect
        var remaining: Int
    }

    private let rules = Locked<[Rule]>([])
    private let openFailure = Locked<Int32?>(nil)
    private let armed = ManagedAtomic<Bool>(false)
    private let fired = ManagedAtomic<Int>(0)

    public init() {}

    /// The next `times` completions of `operation` get `effect`.
    public func inject(_ effect: Effect, on operation: Operation, times: Int = 1) {
        rules.withLock { $0.append(Rule(operation: operation, effect: effect, remaining: times)) }
        armed.store(true, ordering: .releasing)
    }

    /// The tier's next `open(2)` fails with `errno` (e.g. `EINVAL`, what a filesystem without
    /// O_DIRECT support returns) instead of running.
    public func failNextOpen(errno: Int32) {
        openFailure.withLock { $0 = errno }
    }

    /// The armed open failure, consumed.
    func takeOpenFailure() -> Int32? {
        openFailure.withLock { failure in
            defer { failure = nil }
            return failure
        }
    }

    public func clear() {
        rules.withLock { $0.removeAll() }
        armed.store(false, ordering: .releasing)
    }

    /// How many completions were rewritten so far.
    public var firedCount: Int { fired.load(ordering: .relaxed) }

    @inline(__always)
    var isArmed: Bool { armed.load(ordering: .relaxed) }

    /// The result the tier should see for a real completion of `result` bytes (or -errno).
    func apply(_ operation: Operation, result: Int32) -> Int32 {
        rules.withLock { rules -> Int32 in
            guard let index = rules.firstIndex(where: { $0.operation == .any || $0.operation == operation }) else {
                return result
            }
            let effect = rules[index].effect
            // A short transfer of one block would be unaligned (O_DIRECT refuses it): such a
            // completion is left alone and the rule waits for a longer one, so `firedCount`
            // counts only faults that really happened.
            if effect == .shortTransfer && result <= Int32(NVMeFormat.blockSize) { return result }
            rules[index].remaining -= 1
            if rules[index].remaining <= 0 { rules.remove(at: index) }
            if rules.isEmpty { armed.store(false, ordering: .releasing) }
            fired.wrappingIncrement(ordering: .relaxed)
            switch effect {
            case .error(let errno): return -errno
            case .interrupted: return -EINTR
            case .wouldBlock: return -EAGAIN
            case .shortTransfer:
                return max(Int32(NVMeFormat.blockSize), result / 2 / Int32(NVMeFormat.blockSize) * Int32(NVMeFormat.blockSize))
            }
        }
    }
}
