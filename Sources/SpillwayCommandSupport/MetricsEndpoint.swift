import Atomics
import Logging
import Spillway

#if canImport(Glibc)
import Glibc
#endif

/// The Prometheus scrape endpoint: a minimal HTTP/1.1 server answering `GET /metrics` with
/// what `render` returns (text exposition format).
///
/// Why not SwiftNIO's HTTP server: a scrape every few seconds needs none of it, and the
/// daemon already owns a plain-socket transport. The server is deliberately strict: one
/// request per connection, a request head of at most 8 KiB, `404` for other paths, `405` for
/// other methods, and a total deadline per request (`requestDeadline`, reading and writing
/// together: a client trickling bytes is cut off all the same). Up to `maxConcurrent`
/// requests are served at once, each on its own short-lived thread, so one slow scraper
/// cannot stall the others; beyond that a newcomer gets `503` without waiting.
public final class MetricsEndpoint: Sendable {
    public let port: UInt16
    public static let requestDeadline = 2.0
    public static let maxConcurrent = 4
    private let listener: TCPSocket
    private let stopping = ManagedAtomic<Bool>(false)
    private let active = ManagedAtomic<Int>(0)
    private let thread: Locked<BackgroundThread?> = Locked(nil)

    public init(listen endpoint: Endpoint, logger: Logger, render: @escaping @Sendable () -> [UInt8]) throws(SpillwayError) {
        do {
            listener = try TCPSocket.listen(on: endpoint, backlog: 16)
        } catch {
            throw .invalidConfiguration("cannot listen for metrics on \(endpoint): \(error)")
        }
        port = listener.localPort
        let listener = self.listener
        let stopping = self.stopping
        let active = self.active
        thread.withLock {
            $0 = BackgroundThread {
                while !stopping.load(ordering: .relaxed) {
                    guard let (connection, _) = try? listener.accept(timeout: 0.2) else { continue }
                    guard active.loadThenWrappingIncrement(ordering: .acquiringAndReleasing) < Self.maxConcurrent else {
                        active.wrappingDecrement(ordering: .acquiringAndReleasing)
                        connection.setTimeout(0.1)
                        Self.respond(connection, status: "503 Service Unavailable", body: Array("too many scrapes at once\n".utf8))
                        connection.close()
                        continue
                    }
                    BackgroundThread {
                        Self.serve(connection, render: render)
                        connection.close()
                        active.wrappingDecrement(ordering: .acquiringAndReleasing)
                    }.detach()
                }
            }
        }
        if !endpoint.isLoopback {
            logger.notice("metrics endpoint is reachable from the network", metadata: ["listen": "\(endpoint.host):\(port)"])
        }
        logger.info("metrics endpoint serving", metadata: ["listen": "\(endpoint.host):\(port)", "path": "/metrics"])
    }

    public func stop() {
        stopping.store(true, ordering: .relaxed)
        thread.withLock { $0?.join() }
        listener.close()
    }

    static func serve(_ connection: TCPSocket, render: () -> [UInt8]) {
        let deadline = monotonicNanoseconds() + UInt64(requestDeadline * 1e9)
        /// Seconds left of the request's deadline (each receive and the send get only that).
        func remaining() -> Double { Double(Int64(bitPattern: deadline &- monotonicNanoseconds())) / 1e9 }
        let capacity = 8192
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 1)
        defer { buffer.deallocate() }
        var filled = 0
        var headEnd: Int?
        while headEnd == nil && filled < capacity {
            guard remaining() > 0.001 else { return }
            connection.setTimeout(remaining())
            guard let got = try? connection.receiveSome(into: buffer + filled, capacity: capacity - filled), got > 0 else { return }
            filled += got
            let bytes = UnsafeRawBufferPointer(start: buffer, count: filled)
            headEnd = (0..<max(0, filled - 3)).first { bytes[$0] == 13 && bytes[$0 + 1] == 10 && bytes[$0 + 2] == 13 && bytes[$0 + 3] == 10 }
        }
        guard let headEnd else {
            respond(connection, status: "431 Request Header Fields Too Large", body: Array("request head too large\n".utf8))
            return
        }
        let head = String(decoding: UnsafeRawBufferPointer(start: buffer, count: headEnd), as: UTF8.self)
        let requestLine = head.split(separator: "\r\n", maxSplits: 1).first.map(String.init) ?? ""
        let parts = requestLine.split(separator: " ")
        guard parts.count == 3, parts[2].hasPrefix("HTTP/1.") else {
            respond(connection, status: "400 Bad Request", body: Array("bad request line\n".utf8))
            return
        }
        guard parts[0] == "GET" || parts[0] == "HEAD" else {
            respond(connection, status: "405 Method Not Allowed", body: Array("only GET /metrics\n".utf8))
            return
        }
        let path = parts[1].split(separator: "?", maxSplits: 1).first.map(String.init) ?? ""
        guard path == "/metrics" else {
            respond(connection, status: "404 Not Found", body: Array("only /metrics is served\n".utf8))
            return
        }
        let body = render()
        guard remaining() > 0.001 else { return }
        connection.setTimeout(remaining())
        respond(connection, status: "200 OK", body: body, contentType: "text/plain; version=0.0.4; charset=utf-8",
                headOnly: parts[0] == "HEAD")
    }

    static func respond(_ connection: TCPSocket, status: String, body: [UInt8], contentType: String = "text/plain; charset=utf-8",
                        headOnly: Bool = false)
    {
        var response = Array("HTTP/1.1 \(status)\r\nContent-Type: \(contentType)\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n".utf8)
        if !headOnly { response += body }
        response.withUnsafeMutableBytes { raw in
            var vector = iovec(iov_base: raw.baseAddress, iov_len: raw.count)
            try? withUnsafeMutablePointer(to: &vector) { try connection.send(UnsafeMutableBufferPointer(start: $0, count: 1)) }
        }
    }
}
