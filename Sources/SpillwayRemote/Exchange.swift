import SpillwayCore
import SpillwayProtocol

#if canImport(Glibc)
import Glibc
#endif

/// One daemon's share of a `MultiDaemonExchange`.
public struct ExchangeLeg {
    public let client: DaemonClient
    public let operations: UnsafeMutableBufferPointer<RemoteOperation>

    public init(client: DaemonClient, operations: UnsafeMutableBufferPointer<RemoteOperation>) {
        self.client = client
        self.operations = operations
    }
}

/// Page transfers against several daemons at once, driven by one thread: every leg's requests
/// go out pipelined on a borrowed connection of its daemon, then replies are taken from
/// whichever connection has one (`poll(2)`, after a short busy-poll), so the caller can stop
/// as soon as it has *enough* answers (late-binding reads: the first k of k+Δ splits; writes:
/// k+1 of k+r once a straggler's grace time is over).
///
/// Operations answered get status 0 or an errno, exactly as `DaemonClient.execute`. Those
/// still unanswered when the exchange stops keep `MultiDaemonExchange.pending`; their
/// connection goes back to its pool owing the replies, which the next borrower discards
/// (so a late reply never lands in a buffer the caller has reused). A leg whose connection
/// fails gets the connection's errno on its unanswered operations and its client is marked
/// failed.
public enum MultiDaemonExchange {
    /// Status of an operation no reply has answered (yet).
    public static let pending: Int32 = -1

    /// - Parameters:
    ///   - window: frames outstanding per connection (≤ 256); each frame carries up to
    ///     `PageFrames.maxOperations` operations of the leg.
    ///   - frameOperations: operations per frame at most (1: every operation its own
    ///     request, as a benchmark of one outstanding request per connection needs).
    ///   - skipBusy: a lagging daemon (no clean idle connection, idle ones still owing
    ///     replies: a straggler, or a host gone silent) is not waited for: its requests wait,
    ///     without blocking the others, until one of its connections is clean again, and when
    ///     `stop` ends the exchange first they fail with `EAGAIN`. For callers with redundancy (the
    ///     erasure-coded tier reads and writes other splits instead); without it, the
    ///     exchange waits for a connection (`DaemonClient.borrow`).
    ///   - onReply: called with (leg, operation) after each answered operation.
    ///   - stop: called with the monotonic time after each reply and at least every
    ///     millisecond; true ends the exchange.
    public static func run(_ legs: UnsafeMutableBufferPointer<ExchangeLeg>, window: Int = 64,
                           frameOperations: Int = PageFrames.maxOperations, skipBusy: Bool = false,
                           onReply: (Int, Int) -> Void, stop: (UInt64) -> Bool)
    {
        let window = max(1, min(window, 256))
        let frameOperations = max(1, min(frameOperations, PageFrames.maxOperations))
        guard !legs.isEmpty else { return }
        ExchangeScratch.withCurrent(legs: legs.count, window: window) { scratch in
            run(legs, window: window, frameOperations: frameOperations, skipBusy: skipBusy, scratch: scratch,
                onReply: onReply, stop: stop)
        }
    }

    private static func run(_ legs: UnsafeMutableBufferPointer<ExchangeLeg>, window: Int, frameOperations: Int, skipBusy: Bool,
                            scratch: ExchangeScratch, onReply: (Int, Int) -> Void, stop: (UInt64) -> Bool)
    {
        let states = scratch.legs
        let slots = scratch.slots
        let pollSet = scratch.pollSet
        let pollLegs = scratch.pollLegs
        for leg in 0..<legs.count { states[leg] = ExchangeScratch.LegState() }

        func fail(_ leg: Int, _ error: RemoteError) {
            let operations = legs[leg].operations
            // Requests already sent or never sent alike fail with the connection's errno, and
            // the caller hears of each (so it can stop waiting for them).
            for index in 0..<operations.count where operations[index].status == pending {
                operations[index].status = error.errno == 0 ? EIO : error.errno
                onReply(leg, index)
            }
            if let connection = states[leg].connection { legs[leg].client.giveBack(connection, failedWith: error) }
            states[leg].connection = nil
            states[leg].inFlight = 0
            states[leg].next = operations.count
        }

        func start(_ leg: Int, slot: Int) throws(RemoteError) {
            let operations = legs[leg].operations
            let first = states[leg].next
            let end = PageFrames.frameEnd(operations, from: first, limit: frameOperations)
            states[leg].next = end
            let id = legs[leg].client.nextRequestID() << 8 | UInt64(slot)
            slots[states[leg].slotBase + slot] = ExchangeScratch.Slot(id: id, start: first, end: end)
            try PageFrames.send(operations, first..<end, id: id, on: states[leg].connection!, meta: scratch.meta)
            states[leg].inFlight += 1
        }

        /// Takes `leg` a connection and sends its first window; with `skipBusy`, a lagging
        /// daemon's leg is left waiting (`deferred`) instead.
        func open(_ leg: Int) {
            let operations = legs[leg].operations
            do {
                if skipBusy {
                    switch legs[leg].client.tryBorrow() {
                    case .connection(let connection): states[leg].connection = connection
                    case .lagging, .owing:
                        // Not waited for here: `borrow` would wait for the owed replies, up to
                        // the I/O timeout if the host just went silent, before any other leg
                        // is even sent. The leg is tried again on every turn of the loop.
                        states[leg].deferred = true
                        return
                    case .busy: states[leg].connection = try legs[leg].client.borrow()
                    }
                } else {
                    states[leg].connection = try legs[leg].client.borrow()
                }
                states[leg].deferred = false
                var slot = 0
                while slot < window && states[leg].next < operations.count {
                    try start(leg, slot: slot)
                    slot += 1
                }
            } catch {
                states[leg].deferred = false
                fail(leg, error)
            }
        }

        // Send every leg's first window.
        var deferred = 0
        for leg in 0..<legs.count {
            states[leg].slotBase = leg * window
            let operations = legs[leg].operations
            for index in 0..<operations.count { operations[index].status = pending }
            guard !operations.isEmpty else { continue }
            open(leg)
            if states[leg].deferred { deferred += 1 }
        }

        /// Set once `stop` ended the exchange: replies are still taken, no frame is sent.
        var stopping = false

        /// Receives one reply on `leg`'s connection and starts its next frame.
        func receiveOne(_ leg: Int) throws(RemoteError) {
            let connection = states[leg].connection!
            let client = legs[leg].client
            let header = try client.receiveReply(connection)
            let slot = Int(header.requestID & 0xFF)
            let entry = states[leg].slotBase + slot
            guard slot < window, slots[entry].id == header.requestID, slots[entry].start >= 0
            else { throw .protocolViolation("reply to unknown request \(header.requestID)") }
            let range = slots[entry].start..<slots[entry].end
            let operations = legs[leg].operations
            try PageFrames.complete(header, on: connection, operations, range)
            slots[entry].start = -1
            states[leg].inFlight -= 1
            for index in range { onReply(leg, index) }
            if !stopping && states[leg].next < operations.count { try start(leg, slot: slot) }
        }

        var busyPollUntil: UInt64 = 0
        while true {
            // Lagging daemons' legs: start as soon as one of their connections is clean.
            if deferred > 0 {
                for leg in 0..<legs.count where states[leg].deferred {
                    open(leg)
                    if !states[leg].deferred { deferred -= 1 }
                }
            }
            var outstanding = 0
            for leg in 0..<legs.count { outstanding += states[leg].inFlight }
            if outstanding == 0 && deferred == 0 { break }
            if stop(monotonicNanoseconds()) {
                // Take the replies that have already arrived (a leg that stalled the exchange
                // must not cost the answers waiting behind it), sending nothing more.
                stopping = true
                for leg in 0..<legs.count where states[leg].inFlight > 0 {
                    guard let connection = states[leg].connection else { continue }
                    while states[leg].inFlight > 0 && (connection.hasBufferedInput || connection.socket.isReadable) {
                        do { try receiveOne(leg) } catch {
                            fail(leg, error)
                            break
                        }
                    }
                }
                break
            }
            if outstanding == 0 {
                // Only lagging legs left: look again in a millisecond (until `stop` says enough).
                usleep(1000)
                continue
            }
            // Buffered replies first, then wait on the sockets.
            var ready = -1
            var watched = 0
            for leg in 0..<legs.count where states[leg].inFlight > 0 {
                let connection = states[leg].connection!
                if connection.hasBufferedInput {
                    ready = leg
                    break
                }
                pollSet[watched] = pollfd(fd: connection.socket.descriptor, events: Int16(POLLIN), revents: 0)
                pollLegs[watched] = leg
                watched += 1
            }
            if ready < 0 {
                let now = monotonicNanoseconds()
                if busyPollUntil == 0 { busyPollUntil = now &+ UInt64(legs[0].client.pollMicroseconds) * 1000 }
                let result = poll(pollSet, nfds_t(watched), now < busyPollUntil ? 0 : 1)
                if result <= 0 { continue }
                for entry in 0..<watched where pollSet[entry].revents != 0 {
                    let leg = pollLegs[entry]
                    do { try receiveOne(leg) } catch { fail(leg, error) }
                }
                busyPollUntil = 0
                continue
            }
            do { try receiveOne(ready) } catch { fail(ready, error) }
            busyPollUntil = 0
        }
        for leg in 0..<legs.count {
            if states[leg].deferred {
                // Never sent: the daemon lagged throughout.
                states[leg].deferred = false
                fail(leg, .system(SystemCallError(call: "borrow (the daemon's connections all owe replies)", errno: EAGAIN)))
                continue
            }
            guard let connection = states[leg].connection else { continue }
            connection.owedReplies += states[leg].inFlight
            legs[leg].client.giveBack(connection)
            states[leg].connection = nil
        }
    }
}

/// A thread's scratch for page exchanges (slot tables, poll set, meta encoding), grown to the
/// largest exchange the thread ran and reused, so an exchange allocates nothing.
///
/// Each thread has its own (`ThreadScratch`); an exchange nested inside another on one thread
/// (a callback that starts one) gets a fresh instance for its duration instead.
public final class ExchangeScratch {
    struct Slot {
        var id: UInt64 = 0
        /// First operation of the frame; -1 once answered.
        var start = -1
        var end = 0
    }

    struct LegState {
        var connection: FrameConnection?
        var next = 0
        var inFlight = 0
        var slotBase = 0
        /// Waiting for a clean connection of a lagging daemon (`skipBusy`).
        var deferred = false
    }

    private(set) var legs: UnsafeMutablePointer<LegState>
    private(set) var slots: UnsafeMutablePointer<Slot>
    private(set) var pollSet: UnsafeMutablePointer<pollfd>
    private(set) var pollLegs: UnsafeMutablePointer<Int>
    let meta: UnsafeMutableRawPointer
    private var legCapacity = 0
    private var slotCapacity = 0

    private static let perThread = ThreadScratch { ExchangeScratch() }

    init() {
        legs = .allocate(capacity: 1)
        legs.initialize(to: LegState())
        slots = .allocate(capacity: 1)
        pollSet = .allocate(capacity: 1)
        pollLegs = .allocate(capacity: 1)
        meta = .allocate(byteCount: PageFrames.metaCapacity, alignment: 8)
        legCapacity = 1
        slotCapacity = 1
    }

    deinit {
        legs.deinitialize(count: legCapacity)
        legs.deallocate()
        slots.deallocate()
        pollSet.deallocate()
        pollLegs.deallocate()
        meta.deallocate()
    }

    private func reserve(legs count: Int, window: Int) {
        if count > legCapacity {
            legs.deinitialize(count: legCapacity)
            legs.deallocate()
            pollSet.deallocate()
            pollLegs.deallocate()
            legCapacity = max(count, legCapacity * 2)
            legs = .allocate(capacity: legCapacity)
            legs.initialize(repeating: LegState(), count: legCapacity)
            pollSet = .allocate(capacity: legCapacity)
            pollLegs = .allocate(capacity: legCapacity)
        }
        if count * window > slotCapacity {
            slots.deallocate()
            slotCapacity = max(count * window, slotCapacity * 2)
            slots = .allocate(capacity: slotCapacity)
        }
        slots.initialize(repeating: Slot(), count: count * window)
    }

    /// Runs `body` with the calling thread's scratch, sized for `legs` × `window` slots.
    static func withCurrent<R, E: Error>(legs: Int, window: Int, _ body: (ExchangeScratch) throws(E) -> R) throws(E) -> R {
        try perThread.with { (scratch) throws(E) -> R in
            scratch.reserve(legs: legs, window: window)
            return try body(scratch)
        }
    }
}
