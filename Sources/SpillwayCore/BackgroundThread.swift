#if canImport(Glibc)
import Glibc
#endif

/// A joinable OS thread running one closure (the store's background worker, the daemon's
/// connection handlers). A dedicated thread rather than a Swift task: it blocks on I/O and
/// must not starve the cooperative pool of an engine that links Spillway.
public final class BackgroundThread: Sendable {
    private final class Box {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }

    private let thread: pthread_t

    public init(_ body: @escaping @Sendable () -> Void) {
        var thread = pthread_t()
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        let status = pthread_create(&thread, nil, { argument in
            let box = Unmanaged<Box>.fromOpaque(argument!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        precondition(status == 0, "pthread_create failed: \(status)")
        self.thread = thread
    }

    /// Lets the thread run on its own; its resources go when it ends.
    public func detach() {
        pthread_detach(thread)
    }

    /// Waits for the thread to finish; from the thread itself (a store whose last reference
    /// was dropped by its own worker) it detaches instead, since a thread cannot join itself.
    public func join() {
        if pthread_equal(thread, pthread_self()) != 0 {
            pthread_detach(thread)
        } else {
            pthread_join(thread, nil)
        }
    }
}
