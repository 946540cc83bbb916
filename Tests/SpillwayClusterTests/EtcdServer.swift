import Foundation
import Glibc
import SpillwayCluster
import SpillwayCore
import SpillwayTestSupport
import Synchronization

/// A real etcd (Debian etcd-server) on loopback for one test: free ports, a private data
/// directory, started with ChildProcess (so the pid is ours until reaped), killed and its
/// data removed by `stop()`. `restart()` keeps the data directory and ports, like a host
/// rebooting etcd.
final class EtcdServer {
    static let binary: String? = {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        for directory in path.split(separator: ":") + ["/usr/bin", "/usr/local/bin"] {
            let candidate = "\(directory)/etcd"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }()
    static let missingReason = "the etcd binary is not installed (Debian etcd-server; tools/install-deps.sh installs it)"

    let clientPort: UInt16
    let peerPort: UInt16
    let dataDirectory: String
    private let scratch: String
    private(set) var process: ChildProcess?

    var endpoint: String { "http://127.0.0.1:\(clientPort)" }

    init(_ name: String) async throws {
        guard let binary = Self.binary else { throw EtcdError.invalidConfiguration(Self.missingReason) }
        clientPort = try freePort()
        var peer = try freePort()
        while peer == clientPort { peer = try freePort() }
        peerPort = peer
        scratch = try ScratchDirectory.file("etcd-\(name)-\(getpid())-\(clientPort)")
        // etcd fsyncs its WAL on every write: on the test machine's disk, busy with the NVMe
        // tests' O_DIRECT I/O, one fsync can take longer than a test lease's 2 s TTL. Memory
        // (tmpfs) when there is one; the tests are about the protocol, not etcd's durability.
        let memory = "/dev/shm"
        dataDirectory = access(memory, W_OK) == 0 ? "\(memory)/spillway-test-etcd-\(name)-\(getpid())-\(clientPort)" : scratch + ".data"
        try? FileManager.default.removeItem(atPath: dataDirectory)
        _ = binary
        try await launch()
    }

    private func launch() async throws {
        let arguments = [
            "--name", "default", "--data-dir", dataDirectory,
            "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
            "--listen-peer-urls", "http://127.0.0.1:\(peerPort)", "--initial-advertise-peer-urls", "http://127.0.0.1:\(peerPort)",
            "--initial-cluster", "default=http://127.0.0.1:\(peerPort)",
            "--log-level", "warn",
        ]
        let child = try ChildProcess(executable: Self.binary!, arguments: arguments, scratch: scratch)
        process = child
        // Ready when a range answers; bounded at 10 s.
        let probe = try EtcdClient(endpoints: [endpoint], requestTimeout: .milliseconds(500))
        do {
            try await waitUntilReady(child, probe)
            await probe.shutdown()
        } catch {
            await probe.shutdown()
            throw error
        }
    }

    private func waitUntilReady(_ child: ChildProcess, _ probe: EtcdClient) async throws {
        let deadline = ContinuousClock.now + .seconds(10)
        var last = "not tried"
        while ContinuousClock.now < deadline {
            if child.wait(seconds: 0) != nil {
                throw EtcdError.invalidConfiguration("etcd exited at start: \(child.standardError.suffix(2000))")
            }
            do {
                _ = try await probe.range(prefix: "/probe")
                return
            } catch {
                last = "\(error)"
            }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw EtcdError.invalidConfiguration("etcd did not answer within 10 s: \(last); stderr: \(child.standardError.suffix(2000))")
    }

    /// SIGKILL, as a crash would.
    func kill() {
        process?.kill9()
        _ = process?.wait(seconds: 10)
    }

    /// Starts etcd again on the same ports and data directory.
    func restart() async throws {
        try await launch()
    }

    func stop() {
        kill()
        process = nil
        try? FileManager.default.removeItem(atPath: dataDirectory)
    }

    deinit { stop() }
}

/// A loopback TCP port nobody listens on right now (bound, then closed).
func freePort() throws -> UInt16 {
    let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard descriptor >= 0 else { throw SystemCallError(call: "socket", errno: errno) }
    defer { close(descriptor) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, length) == 0 && getsockname(descriptor, $0, &length) == 0 }
    }
    guard bound else { throw SystemCallError(call: "bind", errno: errno) }
    return UInt16(bigEndian: address.sin_port)
}

/// Collects what a stream delivers, for polling with a deadline from the test.
/// The tests' own executor (a dedicated thread, like the product's background tasks): the
/// full suite's synchronous tests hold the cooperative pool's two threads for seconds at a
/// time, which stalled these tests' keep-alives past their 2 s leases and their watchers past
/// their bounded waits.
let testExecutor = ClusterExecutor()

/// Runs a test body on `testExecutor`.
func onTestExecutor<T: Sendable>(_ body: () async throws -> T) async throws -> T {
    try await withTaskExecutorPreference(testExecutor, operation: body)
}

final class Collected<Element: Sendable>: Sendable {
    private let state = Mutex<(items: [Element], arrivals: [ContinuousClock.Instant], failure: String?, ended: Bool)>(([], [], nil, false))
    private let task = Mutex<Task<Void, Never>?>(nil)

    init(_ stream: AsyncThrowingStream<Element, Error>) {
        let started = Task(executorPreference: testExecutor) { [self] in
            do {
                for try await item in stream {
                    let now = ContinuousClock.now
                    self.state.withLock {
                        $0.items.append(item)
                        $0.arrivals.append(now)
                    }
                }
                self.state.withLock { $0.ended = true }
            } catch {
                self.state.withLock {
                    $0.failure = "\(error)"
                    $0.ended = true
                }
            }
        }
        task.withLock { $0 = started }
    }

    var items: [Element] { state.withLock { $0.items } }
    /// When each item arrived (same order as `items`), for latency figures.
    var arrivals: [ContinuousClock.Instant] { state.withLock { $0.arrivals } }
    var failure: String? { state.withLock { $0.failure } }
    var ended: Bool { state.withLock { $0.ended } }

    func cancel() { task.withLock { $0?.cancel() } }
}

/// Polls `condition` until it holds or `limit` passes; whether it held. No fixed sleeps
/// decide an outcome: only this deadline bounds the wait.
func eventually(within limit: Duration, _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + limit
    while true {
        if try await condition() { return true }
        if ContinuousClock.now >= deadline { return false }
        try? await Task.sleep(for: .milliseconds(20))
    }
}

/// Runs `body` with a client for `endpoints`, shutting the client down however it ends.
func withClient<T>(_ endpoints: [String], timeout: Duration = .seconds(2), _ body: (EtcdClient) async throws -> T) async throws -> T {
    let client = try EtcdClient(endpoints: endpoints, requestTimeout: timeout)
    do {
        let result = try await body(client)
        await client.shutdown()
        return result
    } catch {
        await client.shutdown()
        throw error
    }
}

func record(_ instance: String, port: Int = 7000, freeSlabs: UInt64 = 10, domain: String = "rack-a") throws -> DaemonRecord {
    try DaemonRecord(address: "127.0.0.1:\(port)", transports: ["tcp"], capacity: 1 << 30, freeSlabs: freeSlabs, slabSize: 1 << 20,
                     failureDomain: domain, instance: instance, registeredAt: 1_790_000_000)
}
