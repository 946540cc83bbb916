#if canImport(Glibc)
import Glibc
#endif

/// A failed system call: which call and its errno.
public struct SystemCallError: Error, Sendable, Equatable, CustomStringConvertible {
    public var call: String
    public var errno: Int32

    public init(call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }

    public var description: String { "\(call): \(String(cString: strerror(errno))) (errno \(errno))" }
}

/// The one place system calls are made from (modelled on NIOPosix's `System.swift`):
/// `EINTR` is retried, `EFAULT` and `EBADF` are programming errors and trap (continuing would
/// risk writing through a wild pointer or into someone else's descriptor), and everything
/// else becomes a typed `SystemCallError`.
@inlinable
public func systemCall<T: FixedWidthInteger>(_ name: @autoclosure () -> String, _ body: () -> T) throws(SystemCallError) -> T {
    while true {
        let result = body()
        if result != -1 { return result }
        let error = errno
        switch error {
        case EINTR: continue
        case EFAULT, EBADF: preconditionFailure("\(name()) failed with errno \(error): a Spillway bug")
        default: throw SystemCallError(call: name(), errno: error)
        }
    }
}

/// Writes all of `text` to `descriptor` (stdout/stderr for the tools), retrying EINTR and short
/// writes; gives up silently on other errors (a closed pipe must not crash a tool).
public func writeFully(_ descriptor: Int32, _ text: String) {
    var text = text
    text.withUTF8 { bytes in
        var offset = 0
        while offset < bytes.count {
            let written = write(descriptor, bytes.baseAddress! + offset, bytes.count - offset)
            if written < 0 && errno == EINTR { continue }
            if written <= 0 { return }
            offset += written
        }
    }
}
