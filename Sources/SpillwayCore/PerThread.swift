#if canImport(Glibc)
import Glibc
#endif

/// One object per thread, made on a thread's first use and released when the thread exits
/// (a `pthread_key_t` destructor): hot-path scratch (a thread's reusable batch, a page
/// exchange's slot tables) that must be neither allocated per call nor shared under a lock.
/// Meant for `static let`s: each instance holds one of the process's ~1024 keys for good.
public final class PerThread<Value: AnyObject>: Sendable {
    private let key: pthread_key_t
    private let make: @Sendable () -> Value

    public init(_ make: @escaping @Sendable () -> Value) {
        var key = pthread_key_t()
        let status = pthread_key_create(&key) { pointer in
            guard let pointer else { return }
            // Retained as the concrete class below; a release needs no type.
            Unmanaged<AnyObject>.fromOpaque(pointer).release()
        }
        precondition(status == 0, "pthread_key_create failed: \(status)")
        self.key = key
        self.make = make
    }

    /// The calling thread's object.
    @inline(__always)
    public var value: Value {
        if let pointer = pthread_getspecific(key) { return Unmanaged<Value>.fromOpaque(pointer).takeUnretainedValue() }
        let made = make()
        pthread_setspecific(key, Unmanaged.passRetained(made).toOpaque())
        return made
    }
}
