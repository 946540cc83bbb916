import Foundation
import Glibc
import SpillwayCore
import SpillwayRemote

// Shared by the test targets that start real processes: finding the built executables and
// running `spillwayd` on an ephemeral loopback port.

/// The built executable `name` next to the test bundle (`swift build` puts it there).
public func builtExecutable(_ name: String) throws -> URL {
    let directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for candidate in [directory.appendingPathComponent(name), directory.deletingLastPathComponent().appendingPathComponent(name)]
        where FileManager.default.fileExists(atPath: candidate.path)
    {
        return candidate
    }
    throw SpillwayError.invalidConfiguration("\(name) not found next to \(directory.path): run `swift build` first")
}

/// Runs the built `spillway` binary (tools/test.sh builds it before `swift test`), optionally
/// without some environment variables; its exit status and both outputs.
public func runSpillway(_ arguments: [String], removingEnvironment removed: Set<String> = []) throws
    -> (status: Int32, stdout: String, stderr: String)
{
    let process = Process()
    process.executableURL = try builtExecutable("spillway")
    process.arguments = arguments
    if !removed.isEmpty { process.environment = ProcessInfo.processInfo.environment.filter { !removed.contains($0.key) } }
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    let errData = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: outData, as: UTF8.self), String(decoding: errData, as: UTF8.self))
}

/// A `/proc/meminfo` stand-in a test controls, for a daemon started with `memoryInfoPath` /
/// `--memory-info`: a private scratch file, rewritten atomically (the daemon may read it at
/// any moment), removed with `remove()`.
public struct MemoryInfoFile {
    public let path: String

    public init(_ name: String) throws {
        path = try ScratchDirectory.file("\(name)-\(getpid())-meminfo")
    }

    /// Says the host has `availableKilobytes` available of `totalKilobytes`.
    public func set(availableKilobytes: Int, totalKilobytes: Int = 100_000) throws {
        try "MemTotal: \(totalKilobytes) kB\nMemAvailable: \(availableKilobytes) kB\n".write(toFile: path, atomically: true, encoding: .utf8)
    }

    public func remove() { unlink(path) }
}

/// Tokens shared by a test process's in-process daemons and their clients (tenant `t`, admin,
/// and `carol`): in-process daemons otherwise each get their own random token.
public let testTokens = TokenFile(tokens: [("t", "test-token-0123456789abcdef"), ("carol", "carol-token-0123456789abcdef")],
                                  admins: ["t"])
public let testCredentials = ClientCredentials(tokenFile: testTokens)

/// Reads one line from `descriptor` within `seconds`; nil on timeout or end of file.
public func readLine(from descriptor: Int32, seconds: Double) -> String? {
    let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
    var line: [UInt8] = []
    while true {
        let now = monotonicNanoseconds()
        guard now < deadline else { return nil }
        var entry = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        guard poll(&entry, 1, Int32((deadline - now) / 1_000_000) + 1) == 1 else { continue }
        var byte: UInt8 = 0
        let got = read(descriptor, &byte, 1)
        if got < 0 && errno == EINTR { continue }
        if got <= 0 { return nil }
        if byte == 0x0A { return String(decoding: line, as: UTF8.self) }
        line.append(byte)
    }
}

/// A `spillwayd` child process on an ephemeral loopback port. Without `--token-file` among
/// the arguments it generates its token file (`tokenFile`), which clients of this user find
/// by the daemon's address.
public final class DaemonProcess: Sendable {
    public let process = Process()
    public let port: UInt16
    /// The generated token file the daemon announced, if it made one.
    public let tokenFile: String?

    public init(arguments: [String] = [], listen: String = "127.0.0.1:0", environment: [String: String]? = nil) throws {
        process.executableURL = try builtExecutable("spillwayd")
        process.arguments = ["--listen", listen, "--capacity", "32m", "--slab-size", "1m", "--log-level", "error"] + arguments
        if let environment { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        let out = Pipe()
        process.standardOutput = out
        try process.run()
        // The first stdout line names the bound address; a daemon that says nothing in 20 s
        // is a failure, not a hang.
        let text = readLine(from: out.fileHandleForReading.fileDescriptor, seconds: 20) ?? ""
        guard let range = text.range(of: "127.0.0.1:"), let port = UInt16(text[range.upperBound...].prefix { $0.isNumber }) else {
            Glibc.kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            throw SpillwayError.invalidConfiguration("spillwayd did not report its port: '\(text)'")
        }
        self.port = port
        if let range = text.range(of: "\"token_file\": \"") {
            tokenFile = String(text[range.upperBound...].prefix { $0 != "\"" })
        } else {
            tokenFile = nil
        }
        if let range = text.range(of: "\"metrics\": \"127.0.0.1:") {
            metricsPort = UInt16(text[range.upperBound...].prefix { $0.isNumber })
        } else {
            metricsPort = nil
        }
    }

    public let metricsPort: UInt16?

    /// `GET path` on the metrics endpoint: (status line, body).
    public func scrape(_ path: String = "/metrics") throws -> (String, String) {
        let socket = try TCPSocket.connect(to: Endpoint(host: "127.0.0.1", port: metricsPort!), ioTimeout: 5)
        var request = Array("GET \(path) HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
        try request.withUnsafeMutableBytes { raw in
            var vector = iovec(iov_base: raw.baseAddress, iov_len: raw.count)
            try withUnsafeMutablePointer(to: &vector) { try socket.send(UnsafeMutableBufferPointer(start: $0, count: 1)) }
        }
        var response: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let got = try chunk.withUnsafeMutableBytes { try socket.receiveSome(into: $0.baseAddress!, capacity: $0.count) }
            if got == 0 { break }
            response += chunk[0..<got]
        }
        let text = String(decoding: response, as: UTF8.self)
        let parts = text.components(separatedBy: "\r\n\r\n")
        return (text.components(separatedBy: "\r\n")[0], parts.dropFirst().joined(separator: "\r\n\r\n"))
    }

    public var endpoint: Endpoint { Endpoint(host: "127.0.0.1", port: port) }

    /// Signals the daemon unless it has already been reaped (its pid may belong to another
    /// process by then).
    public func kill(_ signal: Int32) {
        guard process.isRunning else { return }
        Glibc.kill(process.processIdentifier, signal)
    }

    /// Waits up to `seconds` for the process to exit; its status, or nil if it is still running.
    public func wait(seconds: Double) -> Int32? {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        return process.isRunning ? nil : process.terminationStatus
    }

    /// SIGKILL and reap (bounded: SIGKILL cannot be ignored); removes the generated token file
    /// the daemon had no chance to remove.
    public func kill9() {
        kill(SIGKILL)
        process.waitUntilExit()
        if let tokenFile { unlink(tokenFile) }
    }

    /// Whether every thread of the daemon is stopped (SIGSTOP takes effect asynchronously:
    /// `kill` returns before the threads halt).
    public var isStopped: Bool {
        guard process.isRunning,
              let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(process.processIdentifier)/task")
        else { return false }
        return tasks.allSatisfy { task in
            guard let stat = try? String(contentsOfFile: "/proc/\(process.processIdentifier)/task/\(task)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")")
            else { return false }
            let state = stat[stat.index(close, offsetBy: 2)]
            return state == "T" || state == "t"
        }
    }

    /// The daemon's threads (`/proc/PID/task`), or nil once it has exited.
    public var threadCount: Int? {
        guard process.isRunning else { return nil }
        return (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(process.processIdentifier)/task"))?.count
    }

    deinit {
        if process.isRunning { kill9() }
    }
}

/// The one place random tests take their seed from: `SPILLWAY_TEST_SEED` (decimal or 0x-hex)
/// to replay a failure, else a fixed default so CI is repeatable. Tests derive per-case seeds
/// from it and print the seed in every failure message (`TestSeed.note(seed)`).
public enum TestSeed {
    public static let base: UInt64 = {
        if let text = ProcessInfo.processInfo.environment["SPILLWAY_TEST_SEED"] {
            if text.hasPrefix("0x"), let value = UInt64(text.dropFirst(2), radix: 16) { return value }
            if let value = UInt64(text) { return value }
        }
        return 0x5EED_5EED
    }()

    /// A per-case seed: the base mixed with the case's own number.
    public static func derive(_ value: UInt64) -> UInt64 { base &+ value &* 0x9E37_79B9_7F4A_7C15 }

    /// What failure messages say so a run can be replayed.
    public static func note(_ seed: UInt64) -> String {
        "seed \(seed) (replay with SPILLWAY_TEST_SEED=\(base))"
    }
}

/// Polls `condition` every 10 ms until it holds or `seconds` pass; whether it held. The one
/// way tests wait for background work or another process: the wait ends as soon as the
/// condition is true, and never lasts longer than `seconds`.
public func eventually(_ seconds: Double = 10, _ condition: () throws -> Bool) rethrows -> Bool {
    try secondsUntil(seconds, condition) != nil
}

/// `eventually`, saying how long the condition took to hold (for tests that report it), or
/// nil if it did not within `seconds`.
public func secondsUntil(_ seconds: Double, _ condition: () throws -> Bool) rethrows -> Double? {
    let start = monotonicNanoseconds()
    let deadline = start + UInt64(seconds * 1e9)
    while monotonicNanoseconds() < deadline {
        if try condition() { return Double(monotonicNanoseconds() - start) / 1e9 }
        usleep(10_000)
    }
    return try condition() ? Double(monotonicNanoseconds() - start) / 1e9 : nil
}

/// Deterministic page contents for a seed (SplitMix64 bytes).
public func pattern(_ seed: UInt64, _ count: Int) -> [UInt8] {
    var generator = SplitMix64(seed: seed)
    return (0..<count).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
}
