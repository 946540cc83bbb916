import SpillwayCore
import SpillwayProtocol

#if canImport(Glibc)
import Glibc
#endif

/// What can go wrong talking to a peer.
public enum RemoteError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The socket failed (reset, timeout as `EAGAIN`, refused).
    case system(SystemCallError)
    /// The peer sent a frame that does not decode; the connection is closed.
    case frame(FrameError)
    /// The peer answered with an error frame.
    case refused(Wire.ErrorReply)
    /// The peer broke the protocol in a way the header checks cannot see.
    case protocolViolation(String)
    /// A frame this side was asked to send exceeds the protocol's limits (nothing was sent).
    case oversized(String)
    /// The daemon did not prove it holds the tenant's token (mutual authentication), or runs
    /// without authentication: it gets no pages.
    case daemonNotAuthenticated(String)
    /// A reconnect reached a different daemon instance (it restarted): the slab ids held
    /// before mean nothing there, so nothing may be read or written through them.
    case daemonRestarted(previous: UInt64, now: UInt64)
    /// `--transport rma` could not be honoured (a TCP-only daemon, no usable provider): why.
    case transportUnavailable(String)

    public var description: String {
        switch self {
        case .system(let error): "\(error)"
        case .frame(let error): "malformed frame: \(error)"
        case .refused(let reply): "refused (\(reply.code)): \(reply.message)"
        case .protocolViolation(let reason): "protocol violation: \(reason)"
        case .oversized(let what): "not sent: \(what)"
        case .daemonNotAuthenticated(let reason): "daemon not authenticated: \(reason)"
        case .transportUnavailable(let reason): "RMA transport unavailable: \(reason)"
        case .daemonRestarted(let previous, let now):
            "daemon restarted (instance \(String(previous, radix: 16)) is now \(String(now, radix: 16))): its old slabs are gone"
        }
    }

    /// The errno a tier reports for this error.
    public var errno: Int32 {
        switch self {
        case .system(let error): error.errno
        case .frame, .protocolViolation: EPROTO
        case .oversized: EMSGSIZE
        case .daemonNotAuthenticated: EACCES
        case .daemonRestarted: ESTALE
        case .transportUnavailable: EPROTONOSUPPORT
        case .refused(let reply):
            switch reply.code {
            case .noCapacity: ENOSPC
            case .notOwner, .authenticationFailed, .authenticationRequired: EACCES
            case .outOfBounds, .tooLarge: EINVAL
            case .checksumMismatch: EBADMSG
            case .shuttingDown: ESHUTDOWN
            case .slabRevoked, .unknownSlab: ENXIO
            default: EPROTO
            }
        }
    }
}

/// Frames over one TCP socket: a header, meta and data sent with one `writev` (data straight
/// from the caller's memory), and received in three steps so data can land straight in the
/// caller's buffer. Not thread-safe: one sender and one receiver at a time, arranged by the
/// owner (`sendLock` serializes senders when notices share the socket).
///
/// `@unchecked Sendable`: the buffers are used by the thread that currently owns the
/// connection; `sendLock` orders concurrent senders.
public final class FrameConnection: @unchecked Sendable {
    public let socket: TCPSocket
    let sendLock = Locked(())
    private let headerOut: UnsafeMutableRawPointer
    private let headerIn: UnsafeMutableRawPointer
    /// Received meta lands here (at most `WireProtocol.maxMetaLength`).
    private let metaIn: UnsafeMutableRawPointer
    private let scratch: UnsafeMutableRawPointer
    private let vectors: UnsafeMutableBufferPointer<iovec>
    private static let scratchSize = 64 << 10
    /// Received bytes not consumed yet: `input[inputStart..<inputEnd]`. One `recv` takes
    /// whatever has arrived (a header with its meta and a small page, or several pipelined
    /// frames), so a 4 KiB request costs one system call on each side instead of two or three.
    /// Page data beyond what is buffered is received straight into the caller's memory.
    private let input: UnsafeMutableRawPointer
    private var inputStart = 0
    private var inputEnd = 0
    private static let inputSize = WireProtocol.headerSize + WireProtocol.maxMetaLength + (64 << 10)
    /// Nanoseconds to poll the socket (non-blocking receives) before sleeping in a blocking
    /// one. A reply that arrives within it costs no thread wake-up, which is most of a
    /// loopback or LAN round trip at queue depth 1; the price is one core busy for at most
    /// this long per wait. 0 = always block. Set by the owner before use.
    public var pollNanoseconds: UInt64 = 0
    /// Replies to requests an exchange stopped waiting for (late binding, a straggler): the
    /// next borrower receives and discards them before using the connection, so they never
    /// land in anyone's buffer. Owned by whoever holds the connection.
    public var owedReplies = 0 {
        didSet {
            if owedReplies == 0 {
                owedSince = 0
            } else if oldValue == 0 {
                owedSince = monotonicNanoseconds()
            }
        }
    }
    /// When the connection began owing replies (monotonic ns); 0 while it owes none. A
    /// connection owing for long belongs to a lagging daemon (`DaemonClient.tryBorrow`).
    public private(set) var owedSince: UInt64 = 0

    public init(socket: TCPSocket) {
        self.socket = socket
        headerOut = .allocate(byteCount: WireProtocol.headerSize, alignment: 8)
        headerIn = .allocate(byteCount: WireProtocol.headerSize, alignment: 8)
        metaIn = .allocate(byteCount: WireProtocol.maxMetaLength, alignment: 8)
        scratch = .allocate(byteCount: Self.scratchSize, alignment: 8)
        vectors = .allocate(capacity: 2 + PageFrames.maxOperations)
        input = .allocate(byteCount: Self.inputSize, alignment: 64)
    }

    deinit {
        headerOut.deallocate()
        headerIn.deallocate()
        metaIn.deallocate()
        scratch.deallocate()
        vectors.deallocate()
        input.deallocate()
    }

    /// Bytes received and not yet consumed (a notice may be waiting here, not in the socket).
    public var hasBufferedInput: Bool { inputEnd > inputStart }

    /// Makes at least `count` (≤ `inputSize`) unconsumed bytes available in `input`.
    private func fill(_ count: Int) throws(RemoteError) {
        precondition(count <= Self.inputSize)
        guard inputEnd - inputStart < count else { return }
        if Self.inputSize - inputStart < count {
            let held = inputEnd - inputStart
            memmove(input, input + inputStart, held)
            inputStart = 0
            inputEnd = held
        }
        var pollUntil: UInt64 = 0
        while inputEnd - inputStart < count {
            var got: Int
            do throws(SystemCallError) {
                if pollNanoseconds > 0, let available = try socket.receiveAvailable(into: input + inputEnd, capacity: Self.inputSize - inputEnd) {
                    got = available
                } else if pollNanoseconds > 0 && (pollUntil == 0 || monotonicNanoseconds() < pollUntil) {
                    if pollUntil == 0 { pollUntil = monotonicNanoseconds() &+ pollNanoseconds }
                    continue
                } else {
                    got = try socket.receiveSome(into: input + inputEnd, capacity: Self.inputSize - inputEnd)
                }
            } catch {
                throw .system(error)
            }
            if got == 0 { throw .system(SystemCallError(call: "receive", errno: ECONNRESET)) }
            inputEnd += got
        }
    }

    /// Moves up to `count` buffered bytes to `destination`; how many.
    private func takeBuffered(_ destination: UnsafeMutableRawPointer, _ count: Int) -> Int {
        let taken = min(count, inputEnd - inputStart)
        if taken > 0 {
            memcpy(destination, input + inputStart, taken)
            inputStart += taken
            if inputStart == inputEnd {
                inputStart = 0
                inputEnd = 0
            }
        }
        return taken
    }

    /// Sends one frame; `data` is sent from where it lies. A frame over the protocol's limits is
    /// refused here with `.oversized` (never a trap: its size may come from what peers did).
    /// The socket's send timeout bounds how long a peer that stops reading can hold the caller.
    public func send(_ opcode: Opcode, flags: FrameFlags = [], requestID: UInt64, meta: UnsafeRawBufferPointer,
                     data: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0)) throws(RemoteError)
    {
        guard meta.count <= WireProtocol.maxMetaLength, data.count <= WireProtocol.maxDataLength else {
            throw .oversized("\(opcode) frame with \(meta.count) meta and \(data.count) data bytes")
        }
        try sendLock.withLock { _ throws(RemoteError) in
            try sendLocked(opcode, flags: flags, requestID: requestID, meta: meta, data: data)
        }
    }

    /// Sends one frame whose data is the buffers of `operations` (a batched write), gathered
    /// straight from where they lie; a read batch passes `data: false` (no data).
    func send(_ opcode: Opcode, requestID: UInt64, meta: UnsafeRawBufferPointer,
              pagesOf operations: UnsafeMutableBufferPointer<RemoteOperation>, range: Range<Int>, data: Bool) throws(RemoteError)
    {
        var total = 0
        if data { for index in range { total += operations[index].length } }
        guard meta.count <= WireProtocol.maxMetaLength, total <= WireProtocol.maxDataLength, range.count <= PageFrames.maxOperations else {
            throw .oversized("\(opcode) frame with \(meta.count) meta and \(total) data bytes in \(range.count) pieces")
        }
        try sendLock.withLock { _ throws(RemoteError) in
            var crc = WireChecksum.update(0xFFFF_FFFF, meta)
            var count = 1
            if meta.count > 0 {
                vectors[count] = iovec(iov_base: UnsafeMutableRawPointer(mutating: meta.baseAddress!), iov_len: meta.count)
                count += 1
            }
            if data {
                for index in range where operations[index].length > 0 {
                    let piece = UnsafeRawBufferPointer(start: operations[index].buffer, count: operations[index].length)
                    crc = WireChecksum.update(crc, piece)
                    vectors[count] = iovec(iov_base: operations[index].buffer, iov_len: piece.count)
                    count += 1
                }
            }
            FrameHeader(opcode: opcode, flags: [], requestID: requestID, metaLength: meta.count, dataLength: total,
                        payloadChecksum: ~crc).encode(into: headerOut)
            vectors[0] = iovec(iov_base: headerOut, iov_len: WireProtocol.headerSize)
            do throws(SystemCallError) {
                try socket.send(UnsafeMutableBufferPointer(rebasing: vectors[0..<count]))
            } catch {
                throw .system(error)
            }
        }
    }

    /// What became of a notice sent without waiting.
    public enum NoticeOutcome: Sendable, Equatable {
        case sent
        /// Not sent: the connection's owner is mid-send or the peer's receive window is full.
        case busy
        /// Part of the frame went out: the stream is broken; the caller must close it.
        case broken
    }

    /// Sends a small notice (reclaim, goodbye) from a thread that does not own the connection,
    /// without ever waiting: if the owner is mid-send (it holds the send lock, perhaps blocked
    /// on a peer that stopped reading) or the socket buffer is full, nothing is sent. The
    /// janitor and a shutdown must never block behind a tenant that does not read.
    public func trySendNotice(_ opcode: Opcode, meta: [UInt8]) -> NoticeOutcome {
        guard meta.count <= WireProtocol.maxMetaLength else { return .busy }
        return meta.withUnsafeBytes { raw -> NoticeOutcome in
            sendLock.withTryLock { _ -> NoticeOutcome in
                let count = prepare(.notice, opcode: opcode, requestID: 0, meta: raw, data: UnsafeRawBufferPointer(start: nil, count: 0))
                let sent = socket.sendWithoutWaiting(UnsafeMutableBufferPointer(rebasing: vectors[0..<count]))
                if sent == WireProtocol.headerSize + raw.count { return .sent }
                return sent <= 0 ? .busy : .broken
            } ?? .busy
        }
    }

    /// Encodes the header and points `vectors` at header, meta and data (under the send
    /// lock); returns how many vectors are in use.
    private func prepare(_ flags: FrameFlags, opcode: Opcode, requestID: UInt64, meta: UnsafeRawBufferPointer,
                         data: UnsafeRawBufferPointer) -> Int
    {
        var crc = WireChecksum.update(0xFFFF_FFFF, meta)
        crc = ~WireChecksum.update(crc, data)
        FrameHeader(opcode: opcode, flags: flags, requestID: requestID, metaLength: meta.count, dataLength: data.count,
                    payloadChecksum: crc).encode(into: headerOut)
        vectors[0] = iovec(iov_base: headerOut, iov_len: WireProtocol.headerSize)
        var count = 1
        if meta.count > 0 {
            vectors[count] = iovec(iov_base: UnsafeMutableRawPointer(mutating: meta.baseAddress!), iov_len: meta.count)
            count += 1
        }
        if data.count > 0 {
            vectors[count] = iovec(iov_base: UnsafeMutableRawPointer(mutating: data.baseAddress!), iov_len: data.count)
            count += 1
        }
        return count
    }

    private func sendLocked(_ opcode: Opcode, flags: FrameFlags, requestID: UInt64, meta: UnsafeRawBufferPointer,
                            data: UnsafeRawBufferPointer) throws(RemoteError)
    {
        let count = prepare(flags, opcode: opcode, requestID: requestID, meta: meta, data: data)
        do throws(SystemCallError) {
            try socket.send(UnsafeMutableBufferPointer(rebasing: vectors[0..<count]))
        } catch {
            throw .system(error)
        }
    }

    public func send(_ opcode: Opcode, flags: FrameFlags = [], requestID: UInt64, meta: [UInt8]) throws(RemoteError) {
        do {
            try meta.withUnsafeBytes { bytes in try send(opcode, flags: flags, requestID: requestID, meta: bytes) }
        } catch let error as RemoteError {
            throw error
        } catch {
            throw .protocolViolation("\(error)")
        }
    }

    /// Sends an error reply to `requestID`.
    public func sendError(_ reply: Wire.ErrorReply, requestID: UInt64) throws(RemoteError) {
        try send(.error, flags: .response, requestID: requestID, meta: reply.encode())
    }

    /// Receives and validates the next header.
    public func receiveHeader() throws(RemoteError) -> FrameHeader {
        try fill(WireProtocol.headerSize)
        _ = takeBuffered(headerIn, WireProtocol.headerSize)
        switch FrameHeader.decode(UnsafeRawBufferPointer(start: headerIn, count: WireProtocol.headerSize)) {
        case .success(let header): return header
        case .failure(let error): throw .frame(error)
        }
    }

    /// Receives the frame's meta (valid until the next receive) and returns it with the running
    /// payload CRC register, to be continued over the data and checked with `finishChecksum`.
    public func receiveMeta(_ header: FrameHeader) throws(RemoteError) -> (meta: UnsafeRawBufferPointer, register: UInt32) {
        precondition(header.metaLength <= WireProtocol.maxMetaLength)  // FrameHeader.decode refused longer
        try fill(header.metaLength)
        _ = takeBuffered(metaIn, header.metaLength)
        let meta = UnsafeRawBufferPointer(start: metaIn, count: header.metaLength)
        return (meta, WireChecksum.update(0xFFFF_FFFF, meta))
    }

    /// Receives `count` data bytes into `buffer`; returns the CRC register continued over them.
    public func receiveData(into buffer: UnsafeMutableRawPointer, count: Int, register: UInt32) throws(RemoteError) -> UInt32 {
        let buffered = takeBuffered(buffer, count)
        if buffered < count {
            do {
                try socket.receive(into: buffer + buffered, count: count - buffered)
            } catch {
                throw .system(error)
            }
        }
        return WireChecksum.update(register, UnsafeRawBufferPointer(start: buffer, count: count))
    }

    /// Reads and drops `count` data bytes (a refused write's payload), continuing the register.
    public func discardData(count: Int, register: UInt32) throws(RemoteError) -> UInt32 {
        var register = register
        var remaining = count
        while remaining > 0 {
            let piece = min(remaining, Self.scratchSize)
            register = try receiveData(into: scratch, count: piece, register: register)
            remaining -= piece
        }
        return register
    }

    /// Receives a whole small frame's meta and data (handshake, notices, replies without page
    /// data) and checks its payload CRC32C.
    public func receiveSmall(_ header: FrameHeader) throws(RemoteError) -> [UInt8] {
        guard header.dataLength <= Self.scratchSize else {
            throw .protocolViolation("unexpected \(header.dataLength) data bytes in a \(header.opcode) frame")
        }
        let (meta, register) = try receiveMeta(header)
        let copy = Array(meta)
        let final = try receiveData(into: scratch, count: header.dataLength, register: register)
        guard ~final == header.payloadChecksum else { throw .frame(.badPayloadChecksum) }
        return copy
    }
}
