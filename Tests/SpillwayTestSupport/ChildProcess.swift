import Foundation
import Glibc
import SpillwayCore

/// A child process started with posix_spawn and reaped only by `wait`, so its pid cannot be
/// reused while this object may still signal it (Foundation's `Process` reaps on its own
/// thread, after which a signal could hit an unrelated process). stdout and stderr go to
/// files, read after it exits.
public final class ChildProcess {
    public let pid: pid_t
    public let stdoutPath: String
    public let stderrPath: String
    private var status: Int32?

    public init(executable: String, arguments: [String], scratch: String) throws {
        stdoutPath = scratch + ".stdout"
        stderrPath = scratch + ".stderr"
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 1, stdoutPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, stderrPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var child: pid_t = 0
        let result = posix_spawn(&child, executable, &actions, nil, argv, environ)
        guard result == 0 else { throw SystemCallError(call: "posix_spawn \(executable)", errno: result) }
        pid = child
    }

    /// SIGKILL, only while the child has not been reaped (so the pid is still ours).
    public func kill9() {
        guard status == nil else { return }
        Glibc.kill(pid, SIGKILL)
    }

    /// Waits up to `seconds` for the child to exit; its wait status, or nil if still running.
    public func wait(seconds: Double) -> Int32? {
        if let status { return status }
        let deadline = Date().addingTimeInterval(seconds)
        while true {
            var raw: Int32 = 0
            let reaped = waitpid(pid, &raw, WNOHANG)
            if reaped == pid {
                status = raw
                return raw
            }
            if reaped < 0 && errno != EINTR { return nil }
            if Date() >= deadline { return nil }
            usleep(5_000)
        }
    }

    /// The exit code if the child exited normally; nil if killed by a signal or still running.
    public var exitCode: Int32? {
        guard let status, status & 0x7F == 0 else { return nil }
        return (status >> 8) & 0xFF
    }

    public var wasKilled: Bool { status.map { $0 & 0x7F == SIGKILL } ?? false }

    public var standardOutput: String { (try? String(contentsOfFile: stdoutPath, encoding: .utf8)) ?? "" }
    public var standardError: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }

    deinit {
        if status == nil {
            kill9()
            _ = wait(seconds: 10)
        }
        unlink(stdoutPath)
        unlink(stderrPath)
    }
}
