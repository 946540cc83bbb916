import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import SpillwayCore
import Synchronization

/// Why an etcd call failed. Typed so callers can tell "etcd is gone" (keep serving, retry)
/// from "etcd answered something we cannot use" (a bug or a hostile peer, never a crash)
/// from "the lease is gone" (re-register).
public enum EtcdError: Error, Sendable, Equatable, CustomStringConvertible {
    /// No endpoint answered; `reason` is the last transport error.
    case unreachable(endpoints: [String], reason: String)
    /// An answer that is not the JSON etcd's gateway sends (malformed, wrong types, bad base64).
    case badResponse(String)
    /// The lease no longer exists (expired or revoked): its keys are gone.
    case leaseExpired(Int64)
    /// etcd answered with a non-200 HTTP status; the second value is its message.
    case httpStatus(Int, String)
    /// A watch was cancelled by etcd because `compactRevision` compacted the history it asked
    /// for: the caller must take a fresh `range` and watch from its revision.
    case compacted(Int64)
    /// The client was configured with something it cannot use (e.g. an https:// endpoint).
    case invalidConfiguration(String)

    public var description: String {
        switch self {
        case .unreachable(let endpoints, let reason): "etcd unreachable at \(endpoints.joined(separator: ",")): \(reason)"
        case .badResponse(let detail): "bad response from etcd: \(detail)"
        case .leaseExpired(let lease): "etcd lease \(lease) expired or was revoked"
        case .httpStatus(let status, let message): "etcd answered HTTP \(status): \(message)"
        case .compacted(let revision): "etcd compacted the watched history (compact revision \(revision))"
        case .invalidConfiguration(let detail): "invalid etcd configuration: \(detail)"
        }
    }
}

/// One change seen by `EtcdClient.watch`. Deletes carry no value; a lease expiry arrives as
/// a delete of every key attached to the lease.
public struct EtcdEvent: Sendable, Equatable {
    public enum Kind: Sendable, Equatable { case put, delete }
    public let kind: Kind
    public let key: String
    public let value: [UInt8]
    /// The key's mod_revision: resume a broken watch from `revision + 1`.
    public let revision: Int64

    public init(kind: Kind, key: String, value: [UInt8], revision: Int64) {
        self.kind = kind
        self.key = key
        self.value = value
        self.revision = revision
    }
}

/// A small client for etcd's v3 API through its JSON gateway (`POST /v3/...`, keys and values
/// base64, int64s as strings), over async-http-client. Chosen over gRPC stubs because it needs
/// no generated code and no protobuf plugin build; the price is one HTTP request per call and
/// one long-lived HTTP response per watch. It does what cluster mode needs — leases, put,
/// prefix range, delete, prefix watch — and nothing more (no txn, no auth).
///
/// Endpoints are tried in order starting from the last one that answered, so a dead member
/// costs one failed attempt, then the client sticks to a live one. Every attempt is bounded:
/// `requestTimeout` for the connection and reply head, and again for the reply body, per
/// endpoint tried. Only `http://` is spoken (see docs/operations.md for TLS).
///
/// Call `shutdown()` when done: the underlying HTTP client must be shut down before release.
public final class EtcdClient: Sendable {
    public let endpoints: [String]
    public let requestTimeout: Duration
    private let http: HTTPClient
    private let preferred = Mutex(0)
    private let logger: Logger

    /// The largest reply body (or watch line) accepted; etcd replies for cluster mode are small.
    static let maxBodyBytes = 16 << 20

    /// The endpoints of a comma-separated list ("http://a:2379, http://b:2379"), as the CLI
    /// options, `spillwayd` and a tier's TOML `etcd` key give them.
    public static func endpoints(_ list: String) -> [String] {
        list.split(separator: ",").map { $0.filter { $0 != " " } }.filter { !$0.isEmpty }
    }

    /// `endpoints` are base URLs such as `http://127.0.0.1:2379`.
    public init(endpoints: [String], requestTimeout: Duration = .seconds(2),
                logger: Logger = Logger(label: "spillway.etcd")) throws(EtcdError)
    {
        guard !endpoints.isEmpty else { throw .invalidConfiguration("no etcd endpoints") }
        var normalized: [String] = []
        for endpoint in endpoints {
            var base = endpoint.trimmingCharacters(in: .whitespaces)
            while base.hasSuffix("/") { base.removeLast() }
            if base.hasPrefix("https://") {
                throw .invalidConfiguration("\(endpoint): https is not supported yet (plain http:// only; see docs/operations.md)")
            }
            guard base.hasPrefix("http://"), let url = URL(string: base), let host = url.host, !host.isEmpty, url.path.isEmpty else {
                throw .invalidConfiguration("\(endpoint) is not an http://HOST:PORT URL")
            }
            normalized.append(base)
        }
        self.endpoints = normalized
        self.requestTimeout = requestTimeout
        self.logger = logger
        var configuration = HTTPClient.Configuration()
        configuration.timeout = .init(connect: .nanoseconds(Int64(requestTimeout.nanoseconds)))
        configuration.redirectConfiguration = .disallow
        // One connection per watch stays open for the watch's life; leave room for many.
        configuration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 64)
        configuration.decompression = .disabled
        http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }

    /// Closes connections and ends open watches. Required before the client is released.
    public func shutdown() async {
        do {
            try await http.shutdown()
        } catch {
            logger.debug("etcd client shutdown: \(error)")
        }
    }

    // MARK: Leases

    /// Grants a lease of `ttl` seconds; its id.
    public func grantLease(ttl: Int64) async throws(EtcdError) -> Int64 {
        let body = try await call("/v3/lease/grant", .object([("TTL", .string(String(ttl)))]))
        return try EtcdWire.parseLeaseGrant(body)
    }

    /// Renews `lease` once; its remaining TTL in seconds. A lease etcd no longer knows throws
    /// `.leaseExpired` (its keys are already gone).
    public func keepAlive(lease: Int64) async throws(EtcdError) -> Int64 {
        let body = try await call("/v3/lease/keepalive", .object([("ID", .string(String(lease)))]), lease: lease)
        return try EtcdWire.parseKeepAlive(body, lease: lease)
    }

    /// Revokes `lease`, deleting its keys at once. An already expired lease throws `.leaseExpired`.
    public func revoke(lease: Int64) async throws(EtcdError) {
        let body = try await call("/v3/lease/revoke", .object([("ID", .string(String(lease)))]), lease: lease)
        _ = try EtcdWire.parseHeaderRevision(body)
    }

    // MARK: Keys

    /// Writes `key`; attached to `lease` (deleted when it ends) unless `lease` is 0. Returns the
    /// store revision of the write.
    @discardableResult
    public func put(key: String, value: [UInt8], lease: Int64 = 0) async throws(EtcdError) -> Int64 {
        var members: [(String, JSONValue)] = [("key", .string(EtcdWire.base64(Array(key.utf8)))), ("value", .string(EtcdWire.base64(value)))]
        if lease != 0 { members.append(("lease", .string(String(lease)))) }
        let body = try await call("/v3/kv/put", .object(members), lease: lease == 0 ? nil : lease)
        return try EtcdWire.parseHeaderRevision(body)
    }

    /// Every key starting with `prefix` (all keys for ""), in key order, and the store revision
    /// the read saw: watch from `revision + 1` to miss nothing.
    public func range(prefix: String) async throws(EtcdError)
        -> (entries: [(key: String, value: [UInt8], modRevision: Int64)], revision: Int64)
    {
        let (start, end) = EtcdWire.prefixRange(prefix)
        let body = try await call("/v3/kv/range", .object([("key", .string(EtcdWire.base64(start))), ("range_end", .string(EtcdWire.base64(end)))]))
        return try EtcdWire.parseRange(body)
    }

    /// One key's value and mod revision, or nil if absent.
    public func get(key: String) async throws(EtcdError) -> (value: [UInt8], modRevision: Int64)? {
        let body = try await call("/v3/kv/range", .object([("key", .string(EtcdWire.base64(Array(key.utf8))))]))
        let result = try EtcdWire.parseRange(body)
        guard let entry = result.entries.first(where: { $0.key == key }) else { return nil }
        return (entry.value, entry.modRevision)
    }

    /// Deletes `key`; how many keys were deleted (0 or 1).
    @discardableResult
    public func delete(key: String) async throws(EtcdError) -> Int64 {
        let body = try await call("/v3/kv/deleterange", .object([("key", .string(EtcdWire.base64(Array(key.utf8))))]))
        return try EtcdWire.parseDeleted(body)
    }

    // MARK: Watch

    /// Streams puts and deletes under `prefix` from `fromRevision` (0: from now). The stream
    /// ends by throwing: `.unreachable` when the connection drops or no endpoint answers,
    /// `.compacted` when the history asked for is gone, `.badResponse` on garbage. It never
    /// ends without an error unless the consumer stops iterating (which closes the connection).
    /// `progress_notify` is requested, so a silent watch still gets etcd's periodic progress
    /// notifications (every 10 minutes by default in etcd 3.4).
    public func watch(prefix: String, fromRevision: Int64 = 0) -> AsyncThrowingStream<EtcdEvent, Error> {
        let (start, end) = EtcdWire.prefixRange(prefix)
        var create: [(String, JSONValue)] = [
            ("key", .string(EtcdWire.base64(start))), ("range_end", .string(EtcdWire.base64(end))),
            ("progress_notify", .bool(true)),
        ]
        if fromRevision > 0 { create.append(("start_revision", .string(String(fromRevision)))) }
        let request = JSONValue.object([("create_request", .object(create))])
        let (stream, continuation) = AsyncThrowingStream<EtcdEvent, Error>.makeStream(bufferingPolicy: .unbounded)
        let task = Task(executorPreference: ClusterExecutor.shared) { [self] in
            do {
                try await self.runWatch(request, continuation: continuation)
            } catch {
                continuation.finish(throwing: error)
            }
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }

    private func runWatch(_ request: JSONValue, continuation: AsyncThrowingStream<EtcdEvent, Error>.Continuation) async throws(EtcdError) {
        let (response, endpoint) = try await open("/v3/watch", request)
        guard response.status == .ok else {
            let body = try? await withTimeout(requestTimeout) { try await response.body.collect(upTo: 64 << 10) }
            throw .httpStatus(Int(response.status.code), EtcdWire.errorMessage(body.map { Array($0.readableBytesView) } ?? []))
        }
        var line: [UInt8] = []
        var created = false
        do {
            for try await chunk in response.body {
                for byte in chunk.readableBytesView {
                    if byte != 0x0A {
                        line.append(byte)
                        guard line.count <= Self.maxBodyBytes else { throw EtcdError.badResponse("watch message longer than \(Self.maxBodyBytes) bytes") }
                        continue
                    }
                    defer { line.removeAll(keepingCapacity: true) }
                    if line.allSatisfy({ $0 == 0x20 || $0 == 0x0D || $0 == 0x09 }) { continue }
                    let message = try EtcdWire.parseWatchMessage(line)
                    created = created || message.created
                    for event in message.events { continuation.yield(event) }
                }
            }
        } catch let error as EtcdError {
            throw error
        } catch {
            if Task.isCancelled { continuation.finish(); return }
            throw .unreachable(endpoints: [endpoint], reason: "watch stream broke: \(error)")
        }
        if Task.isCancelled { continuation.finish(); return }
        throw .unreachable(endpoints: [endpoint], reason: created ? "watch stream closed by etcd" : "watch stream closed before it was created")
    }

    // MARK: Transport

    /// POSTs `body` to `path` on the first endpoint that answers and returns the reply body.
    /// A 404 "lease not found" for a lease call becomes `.leaseExpired(lease)`.
    private func call(_ path: String, _ body: JSONValue, lease: Int64? = nil) async throws(EtcdError) -> JSONValue {
        let (response, endpoint) = try await open(path, body)
        let bytes: ByteBuffer
        do {
            bytes = try await withTimeout(requestTimeout) { try await response.body.collect(upTo: Self.maxBodyBytes) }
        } catch {
            throw .unreachable(endpoints: [endpoint], reason: "reading the reply to \(path): \(error)")
        }
        let status = Int(response.status.code)
        guard status == 200 else {
            let message = EtcdWire.errorMessage(Array(bytes.readableBytesView))
            if let lease, status == 404, message.contains("lease not found") { throw .leaseExpired(lease) }
            throw .httpStatus(status, message)
        }
        do {
            return try JSONValue.parse(Array(bytes.readableBytesView))
        } catch {
            throw .badResponse("\(path): \(error)")
        }
    }

    /// Sends the request to each endpoint in turn (starting from the one that last answered)
    /// until one returns a response head; the response and the endpoint that answered.
    private func open(_ path: String, _ body: JSONValue) async throws(EtcdError) -> (HTTPClientResponse, String) {
        let payload = body.serialized()
        let first = preferred.withLock { $0 }
        var lastReason = "no attempt"
        for attempt in 0..<endpoints.count {
            if Task.isCancelled { throw .unreachable(endpoints: endpoints, reason: "cancelled") }
            let index = (first + attempt) % endpoints.count
            var request = HTTPClientRequest(url: endpoints[index] + path)
            request.method = .POST
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(string: payload))
            do {
                let response = try await http.execute(request, timeout: .nanoseconds(Int64(requestTimeout.nanoseconds)))
                if attempt > 0 { preferred.withLock { $0 = index } }
                return (response, endpoints[index])
            } catch {
                lastReason = "\(endpoints[index]): \(error)"
                logger.debug("etcd request failed", metadata: ["path": "\(path)", "error": "\(lastReason)"])
            }
        }
        throw .unreachable(endpoints: endpoints, reason: lastReason)
    }
}

extension Duration {
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
}

struct TimeoutError: Error, CustomStringConvertible {
    let limit: Duration
    var description: String { "no reply within \(limit)" }
}

/// Runs `operation`, cancelling it and throwing `TimeoutError` if it takes longer than `limit`.
func withTimeout<T: Sendable>(_ limit: Duration, _ operation: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await operation() }
        group.addTask {
            try await Task.sleep(for: limit)
            return nil
        }
        defer { group.cancelAll() }
        guard let first = try await group.next(), let value = first else {
            throw TimeoutError(limit: limit)
        }
        return value
    }
}
