import SpillwayCore

/// One batch's page operations for several daemons, laid out daemon by daemon in one buffer
/// (count them, `layOut`, then `place` them), each with its owner (two integers the caller
/// defines: a batch index and a slab, a unit and a split), and the `MultiDaemonExchange` legs
/// over them. Grown to the largest batch and reused: the remote and erasure-coded tiers plan
/// a batch in it without allocating.
///
/// The remote tier uses the calling thread's (`withCurrent`); the erasure-coded tier keeps
/// one in its own per-thread scratch.
public final class FanOut {
    public struct Owner {
        public var first: Int32
        public var second: Int32

        public init(_ first: Int, _ second: Int) {
            self.first = Int32(truncatingIfNeeded: first)
            self.second = Int32(truncatingIfNeeded: second)
        }
    }

    public private(set) var operations: UnsafeMutablePointer<RemoteOperation>
    public private(set) var owners: UnsafeMutablePointer<Owner>
    /// Per daemon: operations counted, where its run starts, where the next is placed.
    public private(set) var counts: UnsafeMutablePointer<Int>
    public private(set) var starts: UnsafeMutablePointer<Int>
    private var cursor: UnsafeMutablePointer<Int>
    /// Uninitialized outside `withLegs`.
    private var legs: UnsafeMutablePointer<ExchangeLeg>
    /// The daemon of each leg (valid inside `withLegs`).
    public private(set) var legDaemons: UnsafeMutablePointer<Int>
    public private(set) var daemons = 0
    /// Operations laid out (after `layOut`).
    public private(set) var total = 0
    private var operationCapacity = 1
    private var daemonCapacity = 1

    private static let perThread = ThreadScratch { FanOut() }

    public init() {
        operations = .allocate(capacity: 1)
        owners = .allocate(capacity: 1)
        counts = .allocate(capacity: 1)
        starts = .allocate(capacity: 1)
        cursor = .allocate(capacity: 1)
        legs = .allocate(capacity: 1)
        legDaemons = .allocate(capacity: 1)
    }

    deinit {
        operations.deallocate()
        owners.deallocate()
        counts.deallocate()
        starts.deallocate()
        cursor.deallocate()
        legs.deallocate()
        legDaemons.deallocate()
    }

    /// Empties the plan for `daemons` daemons and up to `capacity` operations.
    public func reset(daemons: Int, capacity: Int) {
        if capacity > operationCapacity {
            operationCapacity = max(capacity, operationCapacity * 2)
            operations.deallocate()
            owners.deallocate()
            operations = .allocate(capacity: operationCapacity)
            owners = .allocate(capacity: operationCapacity)
        }
        if daemons > daemonCapacity {
            daemonCapacity = max(daemons, daemonCapacity * 2)
            for pointer in [counts, starts, cursor, legDaemons] { pointer.deallocate() }
            counts = .allocate(capacity: daemonCapacity)
            starts = .allocate(capacity: daemonCapacity)
            cursor = .allocate(capacity: daemonCapacity)
            legDaemons = .allocate(capacity: daemonCapacity)
            legs.deallocate()
            legs = .allocate(capacity: daemonCapacity)
        }
        self.daemons = daemons
        total = 0
        counts.update(repeating: 0, count: daemons)
    }

    /// Counts one operation for `daemon` (before `layOut`).
    @inline(__always) public func count(_ daemon: Int) { counts[daemon] += 1 }

    /// Fixes each daemon's run from the counts; returns the total.
    @discardableResult
    public func layOut() -> Int {
        var total = 0
        for daemon in 0..<daemons {
            starts[daemon] = total
            cursor[daemon] = total
            total += counts[daemon]
        }
        precondition(total <= operationCapacity, "more operations placed than reserved")  // our own arithmetic
        self.total = total
        return total
    }

    /// Places the next operation of `daemon` (after `layOut`, at most `counts[daemon]` times).
    @inline(__always)
    public func place(_ daemon: Int, _ operation: RemoteOperation, owner: Owner) {
        let position = cursor[daemon]
        cursor[daemon] += 1
        operations[position] = operation
        owners[position] = owner
    }

    /// The positions of `daemon`'s operations.
    @inline(__always) public func run(of daemon: Int) -> Range<Int> { starts[daemon]..<(starts[daemon] + counts[daemon]) }

    /// The position of operation `index` of `leg` (inside `withLegs`).
    @inline(__always) public func position(leg: Int, index: Int) -> Int { starts[legDaemons[leg]] + index }

    /// Runs `body` with one exchange leg per daemon that has operations and passes `include`
    /// (daemons with a client).
    public func withLegs<R>(clients: [DaemonClient?], include: (Int) -> Bool = { _ in true },
                            _ body: (UnsafeMutableBufferPointer<ExchangeLeg>) -> R) -> R
    {
        var count = 0
        for daemon in 0..<daemons where counts[daemon] > 0 && include(daemon) {
            guard let client = clients[daemon] else { continue }
            (legs + count).initialize(to: ExchangeLeg(client: client, operations: UnsafeMutableBufferPointer(
                start: operations + starts[daemon], count: counts[daemon])))
            legDaemons[count] = daemon
            count += 1
        }
        defer { legs.deinitialize(count: count) }
        return body(UnsafeMutableBufferPointer(start: legs, count: count))
    }

    /// Runs `body` with the calling thread's plan (a fresh one if the thread's is in use).
    public static func withCurrent<R>(_ body: (FanOut) -> R) -> R {
        perThread.with(body)
    }
}
