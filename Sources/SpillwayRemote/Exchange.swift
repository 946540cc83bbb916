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

    struct LegState {
        var connection: FrameConnection?
        var next = 0
        var inFlight = 0
        var slotBase = 0
        var busyPollUntil: UInt64 = 0
    }

    /// - Parameters:
    ///   - window: requests outstanding per connection (≤ 256).
    ///   - onReply: called with (leg, operation) after each answered operation.
    ///   - stop: called with the monotonic time after each reply and at least every
    ///     millisecond; true ends the exchange.
    public static func run(_ legs: UnsafeMutableBufferPointer<ExchangeLeg>, window: Int = 64,
                           onReply: (Int, Int) -> Void, stop: (UInt64) -> Bool)
    {
        let window = max(1, min(window, 256))
        guard !legs.isEmpty else { return }
        let states = UnsafeMutableBufferPointer<LegState>.allocate(capacity: legs.count)
        states.initialize(repeating: LegState())
        // Per leg, `window` reply slots: (request id, operation index or -1).
        let slots = UnsafeMutableBufferPointer<(id: UInt64, index: Int)>.allocate(capacity: legs.count * window)
        slots.initialize(repeating: (0, -1))
        let pollSet = UnsafeMutableBufferPointer<pollfd>.allocate(capacity: legs.count)
        let pollLegs = UnsafeMutableBufferPointer<Int>.allocate(capacity: legs.count)
        let meta = UnsafeMutableRawPointer.allocate(byteCount: Wire.SlabRange.encodedSize, alignment: 8)
        defer {
            states.deallocate()
            slots.deallocate()
            pollSet.deallocate()
            pollLegs.deallocate()
            meta.deallocate()
        }

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
            let index = states[leg].next
            states[leg].next += 1
            let operation = operations[index]
            let id = legs[leg].client.nextRequestID() << 8 | UInt64(slot)
            slots[states[leg].slotBase + slot] = (id, index)
            Wire.SlabRange(slab: operation.slab, offset: operation.offset, length: UInt32(operation.length)).encode(into: meta)
            try states[leg].connection!.send(operation.write ? .write : .read, requestID: id,
                                             meta: UnsafeRawBufferPointer(start: meta, count: Wire.SlabRange.encodedSize),
                                             data: operation.write ? UnsafeRawBufferPointer(start: operation.buffer, count: operation.length)
                                                 : UnsafeRawBufferPointer(start: nil, count: 0))
            states[leg].inFlight += 1
        }

        // Send every leg's first window.
        for leg in 0..<legs.count {
            states[leg].slotBase = leg * window
            let operations = legs[leg].operations
            for index in 0..<operations.count { operations[index].status = pending }
            guard !operations.isEmpty else { continue }
            do {
                states[leg].connection = try legs[leg].client.borrow()
                var slot = 0
                while slot < window && states[leg].next < operations.count {
                    try start(leg, slot: slot)
                    slot += 1
                }
            } catch {
                fail(leg, error)
            }
        }

        /// Receives one reply on `leg`'s connection and starts its next request.
        func receiveOne(_ leg: Int) throws(RemoteError) {
            let connection = states[leg].connection!
            let client = legs[leg].client
            let header = try client.receiveReply(connection)
            let slot = Int(header.requestID & 0xFF)
            guard slot < window, slots[states[leg].slotBase + slot].id == header.requestID, slots[states[leg].slotBase + slot].index >= 0
            else { throw .protocolViolation("reply to unknown request \(header.requestID)") }
            let index = slots[states[leg].slotBase + slot].index
            let operations = legs[leg].operations
            operations[index].status = try DaemonClient.completeReply(header, on: connection, for: operations[index])
            slots[states[leg].slotBase + slot].index = -1
            states[leg].inFlight -= 1
            onReply(leg, index)
            if states[leg].next < operations.count { try start(leg, slot: slot) }
        }

        var busyPollUntil: UInt64 = 0
        while true {
            var outstanding = 0
            for leg in 0..<legs.count { outstanding += states[leg].inFlight }
            if outstanding == 0 { break }
            if stop(monotonicNanoseconds()) { break }
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
                let result = poll(pollSet.baseAddress, nfds_t(watched), now < busyPollUntil ? 0 : 1)
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
            guard let connection = states[leg].connection else { continue }
            connection.owedReplies += states[leg].inFlight
            legs[leg].client.giveBack(connection)
        }
    }
}
