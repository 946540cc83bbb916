import Foundation
import Testing

/// Compiles the C programs in Tests/c against include/spillway.h and libSpillwayC.so (built by
/// `swift build`, next to the test binary) with gcc, and runs them.
@Suite struct CABITests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The directory holding libSpillwayC.so: beside the test binary, or one level up.
    static func libraryDirectory() throws -> URL {
        var directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        if !FileManager.default.fileExists(atPath: directory.appendingPathComponent("libSpillwayC.so").path) {
            directory = directory.deletingLastPathComponent()
        }
        try #require(FileManager.default.fileExists(atPath: directory.appendingPathComponent("libSpillwayC.so").path),
                     "libSpillwayC.so not found next to the tests: run `swift build` first")
        return directory
    }

    /// A fresh scratch directory with a small DRAM-only configuration in it.
    static func scratch(_ name: String) throws -> (directory: URL, config: String) {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("spillway-\(name)-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let config = directory.appendingPathComponent("abi.toml").path
        try """
        slot-size = "4k"
        max-page-size = "64k"
        [[tier]]
        kind = "dram"
        capacity = "16m"
        """.write(toFile: config, atomically: true, encoding: .utf8)
        return (directory, config)
    }

    /// Compiles Tests/c/`source` into `directory`; returns the binary's path.
    static func compile(_ source: String, into directory: URL, extraFlags: [String] = []) throws -> String {
        let library = try libraryDirectory()
        let binary = directory.appendingPathComponent((source as NSString).deletingPathExtension).path
        let compile = try run("/usr/bin/gcc", ["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-pthread"] + extraFlags + [
            "-I", root.appendingPathComponent("include").path, root.appendingPathComponent("Tests/c/\(source)").path,
            "-L", library.path, "-lSpillwayC", "-Wl,-rpath,\(library.path)", "-o", binary,
        ])
        try #require(compile.status == 0, "gcc \(source): \(compile.output)")
        return binary
    }

    @Test func theCHeaderWorksFromC() throws {
        let (scratch, config) = try Self.scratch("abi")
        defer { try? FileManager.default.removeItem(at: scratch) }
        let binary = try Self.compile("abi_test.c", into: scratch)
        let result = try Self.run(binary, [config, scratch.path])
        #expect(result.status == 0, "\(result.output)")
        #expect(result.output.contains("0 failure(s)"), "\(result.output)")
    }

    /// Put/get/async stores on several threads while another closes the store; per-thread
    /// last error (Tests/c/abi_threads_test.c).
    @Test func closingUnderConcurrentCallsFailsCleanlyFromC() throws {
        let (scratch, config) = try Self.scratch("abi-threads")
        defer { try? FileManager.default.removeItem(at: scratch) }
        let binary = try Self.compile("abi_threads_test.c", into: scratch)
        let result = try Self.run(binary, [config])
        #expect(result.status == 0, "\(result.output)")
        #expect(result.output.contains("0 failure(s)"), "\(result.output)")
    }

    /// The same program built with gcc's ThreadSanitizer against the ordinary library. Only the
    /// C program is instrumented: the Swift library is not built with -sanitize=thread, so TSan
    /// sees it only through the libc calls it intercepts (locks, malloc/free, memcpy). That
    /// checks the program's own accesses and the hand-offs visible at the ABI (per-thread error
    /// strings, buffers), not races inside the library (that is `swift test --sanitize=thread`).
    /// The Swift runtime orders frees and lock destruction with reference-count atomics TSan
    /// cannot see; Tests/c/tsan-suppressions.txt silences exactly those false reports.
    @Test(.enabled(if: CABITests.threadSanitizerWorks, CABITests.threadSanitizerSkipReason))
    func closingUnderConcurrentCallsIsRaceFreeUnderThreadSanitizer() throws {
        let (scratch, config) = try Self.scratch("abi-tsan")
        defer { try? FileManager.default.removeItem(at: scratch) }
        let binary = try Self.compile("abi_threads_test.c", into: scratch, extraFlags: ["-fsanitize=thread", "-g"])
        let suppressions = Self.root.appendingPathComponent("Tests/c/tsan-suppressions.txt").path
        let result = try Self.run(binary, [config], environment: ["TSAN_OPTIONS": "halt_on_error=1 exitcode=66 suppressions=\(suppressions)"])
        #expect(result.status == 0, "\(result.output)")
        #expect(!result.output.contains("WARNING: ThreadSanitizer"), "\(result.output)")
    }

    static let threadSanitizerSkipReason: Comment = "gcc's ThreadSanitizer runtime (libtsan) is not usable here"
    /// Whether gcc can build and run a trivial -fsanitize=thread program on this machine
    /// (libtsan installed, and a kernel address layout TSan accepts).
    static let threadSanitizerWorks: Bool = {
        do {
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("spillway-tsan-probe-\(getpid())")
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(at: directory) }
            let source = directory.appendingPathComponent("probe.c").path
            try "int main(void) { return 0; }\n".write(toFile: source, atomically: true, encoding: .utf8)
            let binary = directory.appendingPathComponent("probe").path
            guard try run("/usr/bin/gcc", ["-fsanitize=thread", source, "-o", binary]).status == 0 else { return false }
            return try run(binary, []).status == 0
        } catch {
            return false
        }
    }()

    static func run(_ path: String, _ arguments: [String], environment: [String: String] = [:]) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        // Bounded: a hung program is terminated after 5 minutes (and then fails its test).
        let pid = process.processIdentifier
        let watchdog = DispatchWorkItem { kill(pid, SIGKILL) }
        DispatchQueue.global().asyncAfter(deadline: .now() + 300, execute: watchdog)
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        watchdog.cancel()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }
}
