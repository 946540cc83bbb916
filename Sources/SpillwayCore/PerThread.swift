#if canImport(Glibc)
import Glibc
#endif

/// One object per thread, made on a thread's first use and released when the thread exits
/// (a `pthread_key_t` destructor): hot-path scratch (a thread's reusable batch, a page
/// exchange's slot tables) that must be neither allocated per call nor shared under a lock.
/// Meant for `static let`s: each instance holds one of the process's ~1024 keys for good.
public final class PerThread<Value: AnyObject>: Sendable {
    private let key: pthread_key_t
    private let make: @Sendable () -> Value

    public init(_ make: @escaping @Sendable () -> Value) {
        var key = pthread_key_t()
        let status = pthread_key_create(&key) { pointer in
            guard let pointer else { return }
            // Retained as the concrete class below; a release needs no type.
            Unmanaged<AnyObject>.fromOpaque(pointer).release()
        }
        precondition(status == 0, "pthread_key_create failed: \(status)")
        self.key = key
        self.make = make
    }

    /// The calling thread's object.
    @inline(__always)
    public var value: Value {
        if let pointer = pthread_getspecific(key) { return Unmanaged<Value>.fromOpaque(pointer).takeUnretainedValue() }
        let made = make()
        pthread_setspecific(key, Unmanaged.passRetained(made).toOpaque())
        return made
    }
}

/// Scratch buffers of trivial types for one call, without allocating: like
/// `withUnsafeTemporaryAllocation`, whose stack space ends at 1 KiB (32 page snapshots already
/// go to the heap), but taken from the calling thread's own regions, grown once and reused.
/// Nested uses on one thread get the next region (up to `depth`); deeper ones, or types
/// that are not trivial, fall back to `withUnsafeTemporaryAllocation`.
public enum TemporaryBuffer {
    final class Regions {
        var bytes: [UnsafeMutableRawPointer?] = Array(repeating: nil, count: TemporaryBuffer.depth)
        var capacity: [Int] = Array(repeating: 0, count: TemporaryBuffer.depth)
        var inUse = 0

        deinit { for region in bytes { region?.deallocate() } }
    }

    static let depth = 4
    private static let regions = PerThread { Regions() }

    /// Runs `body` with `count` uninitialized elements of `type` (trivial types: no
    /// deinitialization is needed, and none is done).
    @inline(__always)
    public static func with<T, R>(_ type: T.Type, count: Int, _ body: (UnsafeMutableBufferPointer<T>) -> R) -> R {
        let bytes = MemoryLayout<T>.stride * max(count, 1)
        guard _isPOD(T.self), bytes > 1024 else { return withUnsafeTemporaryAllocation(of: T.self, capacity: count, body) }
        let regions = regions.value
        let level = regions.inUse
        guard level < depth else { return withUnsafeTemporaryAllocation(of: T.self, capacity: count, body) }
        if regions.capacity[level] < bytes {
            regions.bytes[level]?.deallocate()
            let capacity = max(bytes, regions.capacity[level] * 2)
            regions.bytes[level] = .allocate(byteCount: capacity, alignment: 64)
            regions.capacity[level] = capacity
        }
        regions.inUse += 1
        defer { regions.inUse -= 1 }
        let typed = regions.bytes[level]!.bindMemory(to: T.self, capacity: count)
        return body(UnsafeMutableBufferPointer(start: typed, count: count))
    }
}

/// A reusable scratch object per thread, lent for one call: the calling thread's own, or a
/// fresh one when that is already lent further up the same thread's stack (a callback that
/// starts another exchange). What the hot paths' plans and tables live in.
public final class ThreadScratch<Value: AnyObject>: Sendable {
    private final class Slot {
        let value: Value
        var lent = false
        init(_ value: Value) { self.value = value }
    }

    private let make: @Sendable () -> Value
    private let slots: PerThread<Slot>

    public init(_ make: @escaping @Sendable () -> Value) {
        self.make = make
        slots = PerThread { Slot(make()) }
    }

    /// Runs `body` with the thread's object (or a fresh one if it is lent already).
    @inline(__always)
    public func with<R, E: Error>(_ body: (Value) throws(E) -> R) throws(E) -> R {
        let slot = slots.value
        guard !slot.lent else { return try body(make()) }
        slot.lent = true
        defer { slot.lent = false }
        return try body(slot.value)
    }
}
