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

/// A `spillwayd` child process on an ephemeral loopback port.
public final class DaemonProcess {
    public let process = Process()
    public let port: UInt16

    public init(arguments: [String] = []) throws {
        process.executableURL = try builtExecutable("spillwayd")
        process.arguments = ["--listen", "127.0.0.1:0", "--capacity", "32m", "--slab-size", "1m", "--log-level", "error"] + arguments
        let out = Pipe()
        process.standardOutput = out
        try process.run()
        // The first stdout line names the bound address.
        var line = Data()
        while true {
            let byte = out.fileHandleForReading.readData(ofLength: 1)
            if byte.isEmpty || byte == Data([0x0A]) { break }
            line.append(byte)
        }
        let text = String(decoding: line, as: UTF8.self)
        guard let range = text.range(of: "127.0.0.1:"), let port = UInt16(text[range.upperBound...].prefix { $0.isNumber }) else {
            process.terminate()
            throw SpillwayError.invalidConfiguration("spillwayd did not report its port: '\(text)'")
        }
        self.port = port
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

    public func kill(_ signal: Int32) { Glibc.kill(process.processIdentifier, signal) }

    /// Waits up to `seconds` for the process to exit; its status, or nil if it is still running.
    public func wait(seconds: Double) -> Int32? {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        return process.isRunning ? nil : process.terminationStatus
    }

    /// SIGKILL and reap.
    public func kill9() {
        kill(SIGKILL)
        process.waitUntilExit()
    }

    deinit {
        if process.isRunning {
            kill(SIGKILL)
            process.waitUntilExit()
        }
    }
}
