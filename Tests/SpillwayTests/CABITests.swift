import Foundation
import Testing

/// Compiles Tests/c/abi_test.c against include/spillway.h and libSpillwayC.so (built by
/// `swift build`, next to the test binary) with gcc, and runs it.
@Suite struct CABITests {
    @Test func theCHeaderWorksFromC() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        var libraryDirectory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        if !FileManager.default.fileExists(atPath: libraryDirectory.appendingPathComponent("libSpillwayC.so").path) {
            libraryDirectory = libraryDirectory.deletingLastPathComponent()
        }
        try #require(FileManager.default.fileExists(atPath: libraryDirectory.appendingPathComponent("libSpillwayC.so").path),
                     "libSpillwayC.so not found next to the tests: run `swift build` first")
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("spillway-abi-\(getpid())")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: scratch) }
        let binary = scratch.appendingPathComponent("abi_test").path
        let config = scratch.appendingPathComponent("abi.toml").path
        try """
        slot-size = "4k"
        max-page-size = "64k"
        [[tier]]
        kind = "dram"
        capacity = "16m"
        """.write(toFile: config, atomically: true, encoding: .utf8)
        let compile = try run("/usr/bin/gcc", ["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-I", root.appendingPathComponent("include").path,
                                               root.appendingPathComponent("Tests/c/abi_test.c").path, "-L", libraryDirectory.path, "-lSpillwayC",
                                               "-Wl,-rpath,\(libraryDirectory.path)", "-o", binary])
        #expect(compile.status == 0, "gcc: \(compile.output)")
        guard compile.status == 0 else { return }
        let result = try run(binary, [config])
        #expect(result.status == 0, "\(result.output)")
        #expect(result.output.contains("0 failure(s)"), "\(result.output)")
    }

    func run(_ path: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }
}
