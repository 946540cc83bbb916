// The conventions every `spillway` and `spillwayd` command follows (sizes, logging to stderr,
// one-line errors, --config files), shared by both executables.
import ArgumentParser
import Logging
import Spillway

#if canImport(Glibc)
import Glibc
#endif

/// A size option: bare bytes or k/m/g/t (binary), optionally followed by i, iB or B.
public struct SizeArgument: ExpressibleByArgument, Equatable, Sendable {
    public var bytes: Int

    public init(bytes: Int) { self.bytes = bytes }

    public init?(argument: String) {
        guard let bytes = ByteCount.parse(argument) else { return nil }
        self.bytes = bytes
    }

    public var defaultValueDescription: String { ByteCount.format(bytes) }
}

/// Log level option shared by every command; logs always go to stderr.
public enum LogLevelArgument: String, ExpressibleByArgument, CaseIterable, Sendable {
    case trace, debug, info, notice, warning, error, critical

    public var level: Logger.Level { Logger.Level(rawValue: rawValue)! }
}

public func bootstrapLogging(_ level: Logger.Level) {
    LoggingSystem.bootstrap { label in
        var handler = StreamLogHandler.standardError(label: label)
        handler.logLevel = level
        return handler
    }
}

/// Writes `text` and a newline to stdout with write(2): nothing buffered, nothing else.
public func printLine(_ text: String) {
    writeFully(STDOUT_FILENO, text + "\n")
}

/// Runs a root command with the conventions every Spillway tool follows: help and version go
/// to stdout with exit 0; any failure is one line on stderr and a non-zero exit.
public func runMain<Command: ParsableCommand>(_ type: Command.Type, name: String) -> Never {
    do {
        var command = try type.parseAsRoot()
        try command.run()
        exit(0)
    } catch let exitCode as ExitCode {
        // The command already said what went wrong (e.g. `status` with an unreachable daemon).
        exit(exitCode.rawValue)
    } catch {
        let code = type.exitCode(for: error)
        if code == .success { type.exit(withError: error) }
        let message: String
        if let error = error as? SpillwayError {
            message = error.description
        } else {
            message = type.message(for: error).split(separator: "\n", omittingEmptySubsequences: true).first.map(String.init) ?? "\(error)"
        }
        writeFully(STDERR_FILENO, "\(name): error: \(message)\n")
        exit(code.rawValue == 0 ? 1 : code.rawValue)
    }
}

/// Reads a `--config` TOML file for a command whose options are `optionKeys`.
public struct CommandConfigFile {
    public let table: TOMLTable?
    public let store: SpillwayConfiguration?

    public init(path: String?, optionKeys: Set<String>) throws {
        guard let path else {
            table = nil
            store = nil
            return
        }
        let text = try readTextFile(path)
        let table: TOMLTable
        do {
            table = try TOMLTable(string: text)
        } catch let error as TOMLParseError {
            throw SpillwayError.invalidConfiguration("\(path): \(error.description) at \(error.source.begin.debugDescription)")
        }
        self.table = table
        let configuration = try SpillwayConfiguration(table: table, extraKeys: optionKeys)
        store = configuration.tiers.isEmpty ? nil : configuration
    }

    public func string(_ key: String) throws -> String? { try table.flatMap { table throws(SpillwayError) in try TOMLReader.string(table, key) } }
    public func int(_ key: String) throws -> Int? { try table.flatMap { table throws(SpillwayError) in try TOMLReader.int(table, key) } }
    public func double(_ key: String) throws -> Double? { try table.flatMap { table throws(SpillwayError) in try TOMLReader.double(table, key) } }
    public func bool(_ key: String) throws -> Bool? { try table.flatMap { table throws(SpillwayError) in try TOMLReader.bool(table, key) } }
    public func size(_ key: String) throws -> Int? { try table.flatMap { table throws(SpillwayError) in try TOMLReader.size(table, key) } }
}

import TOMLKit

