import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// HOST:PORT (IPv4 address or `localhost`).
public struct Endpoint: Hashable, Sendable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    /// Parses "HOST:PORT"; throws `invalidArgument` with the reason.
    public init(parsing text: String) throws(SpillwayError) {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else {
            throw .invalidArgument("'\(text)' is not HOST:PORT")
        }
        let host = String(text[..<colon])
        guard !host.isEmpty, Endpoint.address(of: host) != nil else {
            throw .invalidArgument("'\(text)': host must be an IPv4 address or localhost")
        }
        self.init(host: host, port: port)
    }

    public var description: String { "\(host):\(port)" }

    /// Loopback (127.0.0.0/8 or localhost).
    public var isLoopback: Bool {
        guard let address = Endpoint.address(of: host) else { return false }
        return UInt32(bigEndian: address.s_addr) >> 24 == 127
    }

    static func address(of host: String) -> in_addr? {
        var address = in_addr()
        let text = host == "localhost" ? "127.0.0.1" : host
        guard inet_pton(AF_INET, text, &address) == 1 else { return nil }
        return address
    }

    func socketAddress() -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr = Endpoint.address(of: host)!
        return address
    }
}

/// A TCP socket: owns its descriptor. Plain blocking sockets, not SwiftNIO: a page request is
/// one `writev` and its reply is read straight into the caller's buffer on the caller's thread,
/// with no event-loop hop (see docs/protocol.md, "Transport").
///
/// `@unchecked Sendable`: the descriptor is immutable; sending is serialized by whoever owns
/// the connection (a borrowed client connection, or the daemon's one handler thread), and
/// `shutdown` may be called from any thread (the kernel orders it).
public final class TCPSocket: @unchecked Sendable {
    public let descriptor: Int32
    private let closed = Locked(false)

    init(descriptor: Int32) { self.descriptor = descriptor }

    deinit { close() }

    /// Connects with a timeout; sets TCP_NODELAY and `ioTimeout` (seconds, 0 = none) on sends
    /// and receives so a dead peer becomes `EAGAIN` instead of a hang.
    public static func connect(to endpoint: Endpoint, timeout: Double = 2, ioTimeout: Double = 0) throws(SystemCallError) -> TCPSocket {
        let descriptor = try systemCall("socket") { Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        let created = TCPSocket(descriptor: descriptor)
        // Non-blocking connect, then poll, so an unreachable address fails within `timeout`.
        let flags = fcntl(descriptor, F_GETFL)
        _ = fcntl(descriptor, F_SETFL, flags | O_NONBLOCK)
        var address = endpoint.socketAddress()
        let status = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        if status != 0 {
            guard errno == EINPROGRESS else { throw SystemCallError(call: "connect \(endpoint)", errno: errno) }
            var entry = pollfd(fd: descriptor, events: Int16(POLLOUT), revents: 0)
            let ready = try systemCall("poll") { poll(&entry, 1, Int32(timeout * 1000)) }
            guard ready == 1 else { throw SystemCallError(call: "connect \(endpoint)", errno: ETIMEDOUT) }
            var error: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(descriptor, SOL_SOCKET, SO_ERROR, &error, &length)
            guard error == 0 else { throw SystemCallError(call: "connect \(endpoint)", errno: error) }
        }
        _ = fcntl(descriptor, F_SETFL, flags)
        created.setNoDelay()
        if ioTimeout > 0 { created.setTimeout(ioTimeout) }
        return created
    }

    /// A listening socket (SO_REUSEADDR). Port 0 picks an ephemeral port: see `localPort`.
    public static func listen(on endpoint: Endpoint, backlog: Int32 = 128) throws(SystemCallError) -> TCPSocket {
        let descriptor = try systemCall("socket") { Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        let created = TCPSocket(descriptor: descriptor)
        var one: Int32 = 1
        setsockopt(descriptor, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = endpoint.socketAddress()
        _ = try systemCall("bind \(endpoint)") {
            withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
        }
        _ = try systemCall("listen \(endpoint)") { Glibc.listen(descriptor, backlog) }
        return created
    }

    /// The bound port (after listening on port 0).
    public var localPort: UInt16 {
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &length) }
        }
        return UInt16(bigEndian: address.sin_port)
    }

    /// Waits up to `timeout` seconds for a connection; nil on timeout (so the accept loop can
    /// notice a shutdown).
    public func accept(timeout: Double) throws(SystemCallError) -> (TCPSocket, Endpoint)? {
        var entry = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        let ready = try systemCall("poll") { poll(&entry, 1, Int32(timeout * 1000)) }
        guard ready == 1 else { return nil }
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let client = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.accept(descriptor, $0, &length) }
        }
        if client < 0 {
            if errno == EAGAIN || errno == EINTR || errno == ECONNABORTED { return nil }
            throw SystemCallError(call: "accept", errno: errno)
        }
        _ = fcntl(client, F_SETFD, FD_CLOEXEC)
        let socket = TCPSocket(descriptor: client)
        socket.setNoDelay()
        var text = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
        inet_ntop(AF_INET, &address.sin_addr, &text, socklen_t(INET_ADDRSTRLEN))
        return (socket, Endpoint(host: String(cString: text), port: UInt16(bigEndian: address.sin_port)))
    }

    func setNoDelay() {
        var one: Int32 = 1
        setsockopt(descriptor, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Send and receive timeouts (a peer that stops answering becomes `EAGAIN`).
    public func setTimeout(_ seconds: Double) {
        setReceiveTimeout(seconds)
        setSendTimeout(seconds)
    }

    /// Receive timeout alone (0 = wait forever: an idle authenticated connection).
    public func setReceiveTimeout(_ seconds: Double) {
        var value = Self.timeValue(seconds)
        setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &value, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Send timeout alone: a peer that stops reading fails the send with `EAGAIN` after this
    /// long instead of holding the sending thread (and everything waiting on it) forever.
    public func setSendTimeout(_ seconds: Double) {
        var value = Self.timeValue(seconds)
        setsockopt(descriptor, SOL_SOCKET, SO_SNDTIMEO, &value, socklen_t(MemoryLayout<timeval>.size))
    }

    private static func timeValue(_ seconds: Double) -> timeval {
        timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1_000_000))
    }

    /// One non-blocking `sendmsg`: the bytes sent (0 if the buffer is full, -1 on error).
    /// For notices that must never wait (see `FrameConnection.trySendNotice`).
    public func sendWithoutWaiting(_ vectors: UnsafeMutableBufferPointer<iovec>) -> Int {
        var message = msghdr()
        message.msg_iov = vectors.baseAddress
        message.msg_iovlen = vectors.count
        while true {
            let sent = sendmsg(descriptor, &message, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
            if sent >= 0 { return sent }
            if errno == EINTR { continue }
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1
        }
    }

    /// Sends every byte of `vectors` (retrying short writes and EINTR; never raises SIGPIPE).
    public func send(_ vectors: UnsafeMutableBufferPointer<iovec>) throws(SystemCallError) {
        var first = 0
        var count = vectors.count
        while count > 0 {
            // sendmsg with MSG_NOSIGNAL, not writev: a peer that vanished must be an EPIPE
            // error here, not a SIGPIPE that kills the host process.
            var message = msghdr()
            message.msg_iov = vectors.baseAddress! + first
            message.msg_iovlen = min(count, 1024)
            let sent = sendmsg(descriptor, &message, Int32(MSG_NOSIGNAL))
            if sent < 0 {
                if errno == EINTR { continue }
                throw SystemCallError(call: "send", errno: errno)
            }
            var remaining = sent
            while count > 0 && remaining >= vectors[first].iov_len {
                remaining -= vectors[first].iov_len
                first += 1
                count -= 1
            }
            if count > 0 && remaining > 0 {
                vectors[first].iov_base += remaining
                vectors[first].iov_len -= remaining
            }
        }
    }

    /// Fills `count` bytes at `buffer`. Throws `ECONNRESET` if the peer closed first, `EAGAIN`
    /// on a receive timeout.
    public func receive(into buffer: UnsafeMutableRawPointer, count: Int) throws(SystemCallError) {
        var done = 0
        while done < count {
            let got = recv(descriptor, buffer + done, count - done, 0)
            if got < 0 {
                if errno == EINTR { continue }
                throw SystemCallError(call: "receive", errno: errno)
            }
            if got == 0 { throw SystemCallError(call: "receive", errno: ECONNRESET) }
            done += got
        }
    }

    /// Receives what is there, up to `capacity` bytes (at least one, waiting for it): the count,
    /// 0 at end of stream. For line protocols (the metrics endpoint's HTTP).
    public func receiveSome(into buffer: UnsafeMutableRawPointer, capacity: Int) throws(SystemCallError) -> Int {
        while true {
            let got = recv(descriptor, buffer, capacity, 0)
            if got >= 0 { return got }
            if errno != EINTR { throw SystemCallError(call: "receive", errno: errno) }
        }
    }

    /// Like `receiveSome`, but never waits: nil when nothing has arrived yet.
    public func receiveAvailable(into buffer: UnsafeMutableRawPointer, capacity: Int) throws(SystemCallError) -> Int? {
        while true {
            let got = recv(descriptor, buffer, capacity, Int32(MSG_DONTWAIT))
            if got >= 0 { return got }
            if errno == EAGAIN || errno == EWOULDBLOCK { return nil }
            if errno != EINTR { throw SystemCallError(call: "receive", errno: errno) }
        }
    }

    /// Whether a receive would not block now (data or end of stream waiting).
    public var isReadable: Bool {
        var entry = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        return poll(&entry, 1, 0) > 0
    }

    /// Stops both directions (wakes a thread blocked in receive); the descriptor stays open
    /// until `close`.
    public func shutdown() {
        _ = Glibc.shutdown(descriptor, Int32(SHUT_RDWR))
    }

    public func close() {
        let wasOpen = closed.withLock { closed -> Bool in
            defer { closed = true }
            return !closed
        }
        if wasOpen { Glibc.close(descriptor) }
    }
}
