import CSpillwayEpoll
import Logging
import SpillwayCore
import SpillwayProtocol
import SpillwayRemote

#if canImport(Glibc)
import Glibc
#endif

/// One event-loop thread of the daemon: its own epoll set (level-triggered), the connections
/// assigned to it, and a mailbox (new connections, notices from the janitor) woken through an
/// eventfd. A worker never blocks on a peer: sockets are non-blocking, a reply that does not
/// fit the socket waits in the connection's queue, and a connection whose queue is over
/// `outputLimit` is not read until it drains.
///
/// `@unchecked Sendable`: everything but `mailbox` is touched by the worker's thread only.
final class Worker: @unchecked Sendable {
    let index: Int
    let epoll: Int32
    let wake: Int32
    /// Strong while running (the server lives as long as its workers, as it did with its
    /// connection threads); `shutdown` drops the workers after joining them.
    let server: RemoteMemoryServer
    private var connections: [ObjectIdentifier: Connection] = [:]
    private var paused: [Connection] = []
    /// Closed during this batch of events: kept alive until the batch is done (events refer
    /// to connections by unretained pointer).
    private var closedInBatch: [Connection] = []
    private let events: UnsafeMutablePointer<epoll_event>
    private static let eventCapacity = 256
    let vectors: UnsafeMutableBufferPointer<iovec>
    /// Messages from other threads.
    enum Message {
        case add(Connection)
        case notice(Connection, Opcode, [UInt8])
        case stop(deadline: Double)
    }

    private let mailbox = Locked<[Message]>([])
    private var thread: BackgroundThread?
    private var stopDeadline: Double?
    private var lastScan: Double = 0
    /// Queued reply bytes past which a connection's requests are not read until it drains.
    static let outputLimit = 4 << 20

    init(index: Int, server: RemoteMemoryServer) throws(SpillwayError) {
        self.index = index
        self.server = server
        epoll = spillway_epoll_create()
        wake = spillway_eventfd()
        guard epoll >= 0, wake >= 0 else {
            throw .invalidConfiguration("cannot create an event loop: \(String(cString: strerror(errno)))")
        }
        events = .allocate(capacity: Self.eventCapacity)
        vectors = .allocate(capacity: 64)
        var event = epoll_event()
        event.events = EPOLLIN.rawValue
        event.data.u64 = 0
        epoll_ctl(epoll, EPOLL_CTL_ADD, wake, &event)
    }

    deinit {
        Glibc.close(epoll)
        Glibc.close(wake)
        events.deallocate()
        vectors.deallocate()
    }

    func start() {
        thread = BackgroundThread { [self] in run() }
    }

    func join() { thread?.join() }

    func post(_ message: Message) {
        mailbox.withLock { $0.append(message) }
        var one: UInt64 = 1
        _ = Glibc.write(wake, &one, 8)
    }

    // MARK: The loop

    private func run() {
        let pollNanoseconds = UInt64(server.configuration.pollMicroseconds * 1000)
        var lastEvent = monotonicNanoseconds()
        while true {
            let now = monotonicNanoseconds()
            var timeout: Int32 = 100
            if let earliest = paused.map(\.pausedUntil).min() {
                timeout = earliest <= now ? 0 : min(timeout, Int32((earliest - now) / 1_000_000) + 1)
            }
            // Busy polling (`pollMicroseconds`) right after activity: no sleep, no wake-up. One
            // worker of the daemon polls at a time (the poller token), and it yields the core
            // between empty polls, so on a crowded host (clients, other daemons) polling costs
            // its neighbours a scheduler turn, not a core each.
            var polling = false
            if pollNanoseconds > 0 && now &- lastEvent < pollNanoseconds && timeout > 0 {
                polling = server.poller.compareExchange(expected: -1, desired: index, ordering: .acquiring).original == -1
                    || server.poller.load(ordering: .relaxed) == index
                if polling { timeout = 0 }
            }
            if !polling && server.poller.load(ordering: .relaxed) == index { server.poller.store(-1, ordering: .releasing) }
            let count = epoll_wait(epoll, events, Int32(Self.eventCapacity), timeout)
            if count > 0 {
                lastEvent = monotonicNanoseconds()
            } else if polling {
                sched_yield()
            }
            for slot in 0..<max(0, Int(count)) {
                let event = events[slot]
                if event.data.u64 == 0 {
                    var value: UInt64 = 0
                    _ = Glibc.read(wake, &value, 8)
                    drainMailbox()
                    continue
                }
                let connection = Unmanaged<Connection>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(event.data.u64))!).takeUnretainedValue()
                guard connection.live else { continue }  // closed earlier in this batch
                handle(connection, events: event.events)
            }
            if !paused.isEmpty { resumePaused() }
            closedInBatch.removeAll(keepingCapacity: true)
            let seconds = RemoteMemoryServer.now()
            if seconds - lastScan >= 0.1 {
                lastScan = seconds
                scan(now: seconds)
            }
            if let stopDeadline {
                if connections.isEmpty { return }
                if seconds >= stopDeadline {
                    for connection in Array(connections.values) { close(connection) }
                    return
                }
            }
        }
    }

    private func drainMailbox() {
        let messages = mailbox.withLock { box -> [Message] in
            defer { box.removeAll(keepingCapacity: true) }
            return box
        }
        for message in messages {
            switch message {
            case .add(let connection):
                connections[ObjectIdentifier(connection)] = connection
                connection.live = true
                connection.interest = EPOLLIN.rawValue
                var event = epoll_event()
                event.events = connection.interest
                event.data.u64 = UInt64(UInt(bitPattern: Unmanaged.passUnretained(connection).toOpaque()))
                if epoll_ctl(epoll, EPOLL_CTL_ADD, connection.descriptor, &event) != 0 {
                    server.logger.error("epoll_ctl failed", metadata: ["error": "\(String(cString: strerror(errno)))"])
                    close(connection)
                } else if stopDeadline != nil {
                    connection.closeAfterFlush = true
                    afterIO(connection)
                }
            case .notice(let connection, let opcode, let meta):
                guard connections[ObjectIdentifier(connection)] != nil else { continue }
                // Never waits on the tenant: a queue over the limit means it is not reading, so the
                // notice is dropped (a reclaim's deadline still applies).
                guard connection.pending < Self.outputLimit else {
                    server.logger.notice("notice not delivered (the tenant is not reading)",
                                         metadata: ["tenant": "\(connection.label)", "notice": "\(opcode)"])
                    continue
                }
                connection.queue(opcode, flags: .notice, requestID: 0, meta: meta)
                afterIO(connection)
            case .stop(let deadline):
                stopDeadline = deadline
                for connection in Array(connections.values) {
                    connection.closeAfterFlush = true
                    afterIO(connection)
                }
            }
        }
    }

    private func handle(_ connection: Connection, events: UInt32) {
        // Both directions shut (our shutdown from another thread: an eviction, a deadline, a
        // removed tenant) or a socket error: nothing more can be said.
        if events & (EPOLLHUP.rawValue | EPOLLERR.rawValue) != 0 {
            close(connection)
            return
        }
        if events & EPOLLOUT.rawValue != 0 || connection.pending > 0 {
            switch connection.flush(vectors: vectors, slabs: server.slabs) {
            case .broken:
                close(connection)
                return
            case .done, .blocked: break
            }
        }
        if events & EPOLLIN.rawValue != 0 && !connection.closeAfterFlush {
            guard receive(connection) else {
                close(connection)
                return
            }
        }
        afterIO(connection)
    }

    /// Reads what the socket holds (once, or again while it fills the buffer) and serves
    /// every complete frame. False: the peer is gone or broke the protocol beyond a reply.
    private func receive(_ connection: Connection) -> Bool {
        // A receive that did not fill the buffer emptied the socket: once the frames it brought
        // are served, wait for the next event instead of a receive that would say EAGAIN.
        var drained = false
        while true {
            if connection.closeAfterFlush || connection.pausedUntil != 0 { return true }
            if connection.pending >= Self.outputLimit {
                connection.backlogged = true
                return true
            }
            if connection.write != nil {
                switch server.continueWrite(connection) {
                case .closed: return false
                case .needMore: return true  // the socket had nothing more for now
                case .done: break
                }
                continue
            }
            switch server.serveBuffered(connection) {
            case .closed: return false
            case .paused:
                paused.append(connection)
                return true
            case .needMore: if drained { return true }
            case .progress: continue
            }
            // Room for what the next frame needs, then one receive.
            if connection.inputEnd == connection.inputCapacity {
                connection.reserveInput(min(Connection.maxInput, connection.buffered * 2))
            }
            let space = connection.inputCapacity - connection.inputEnd
            guard space > 0 else { return false }  // cannot happen: a frame that fits is served first
            let got = recv(connection.descriptor, connection.input + connection.inputEnd, space, Int32(MSG_DONTWAIT))
            if got < 0 {
                if errno == EINTR { continue }
                return errno == EAGAIN || errno == EWOULDBLOCK
            }
            if got == 0 { return false }
            drained = got < space
            connection.inputEnd += got
            connection.lastInput = RemoteMemoryServer.now()
        }
    }

    /// Flushes, and matches the epoll interest to the connection's state.
    func afterIO(_ connection: Connection) {
        if connection.pending > 0 {
            if connection.flush(vectors: vectors, slabs: server.slabs) == .broken {
                close(connection)
                return
            }
        }
        if connection.pending == 0 && connection.closeAfterFlush {
            close(connection)
            return
        }
        var wanted: UInt32 = 0
        if connection.pending > 0 { wanted |= EPOLLOUT.rawValue }
        if connection.pending < Self.outputLimit && !connection.closeAfterFlush && connection.pausedUntil == 0 { wanted |= EPOLLIN.rawValue }
        if wanted != connection.interest {
            connection.interest = wanted
            var event = epoll_event()
            event.events = wanted
            event.data.u64 = UInt64(UInt(bitPattern: Unmanaged.passUnretained(connection).toOpaque()))
            epoll_ctl(epoll, EPOLL_CTL_MOD, connection.descriptor, &event)
        }
        // Drained below the limit with requests still buffered: serve them now (no event
        // will come for bytes already read).
        if connection.backlogged && connection.pending < Self.outputLimit {
            connection.backlogged = false
            handle(connection, events: EPOLLIN.rawValue)
        }
    }

    private func resumePaused() {
        let now = monotonicNanoseconds()
        var still: [Connection] = []
        let due = paused
        paused.removeAll()
        for connection in due {
            guard connection.live else { continue }
            if connection.pausedUntil > now {
                still.append(connection)
                continue
            }
            connection.pausedUntil = 0
            handle(connection, events: EPOLLIN.rawValue)
        }
        paused += still
    }

    /// Peers that stopped reading (no send progress for `sendTimeout`), and writers that
    /// stopped mid-frame with slabs pinned, are cut off.
    private func scan(now: Double) {
        let timeout = server.configuration.sendTimeout
        for connection in Array(connections.values) {
            if connection.pending > 0 && now - connection.lastProgress >= timeout {
                server.counters.stuckPeers.wrappingIncrement(ordering: .relaxed)
                server.logger.warning("tenant stopped reading replies; disconnecting it",
                                      metadata: ["peer": "\(connection.peer)", "tenant": "\(connection.label)"])
                close(connection)
            } else if connection.write != nil && now - connection.lastInput >= timeout {
                server.logger.warning("write frame stalled mid-data; disconnecting",
                                      metadata: ["peer": "\(connection.peer)", "tenant": "\(connection.label)"])
                close(connection)
            }
        }
    }

    func close(_ connection: Connection) {
        guard connection.live else { return }
        connection.live = false
        server.deregister(connection)
        epoll_ctl(epoll, EPOLL_CTL_DEL, connection.descriptor, nil)
        connection.interest = 0
        connection.releaseAll(slabs: server.slabs)
        connections[ObjectIdentifier(connection)] = nil
        closedInBatch.append(connection)
        connection.socket.close()
    }
}
