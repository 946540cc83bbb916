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
