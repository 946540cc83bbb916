#if canImport(Glibc)
import Glibc
#endif
import SpillwayCore
import Synchronization

/// A thread that keeps a serving endpoint progressing until stopped (or deinit).
///
/// Why: with a manual-progress provider (`tcp`: `FabricProvider.requiresManualProgress`) a
/// daemon's endpoint, which never issues transfers of its own, serves peers' reads and writes
/// only while something reads its completion queue. On an endpoint opened with
/// `waitableCompletions` the thread blocks in `fi_cq_sread` (no spinning: the provider wakes it
/// when a peer's request arrives); otherwise it polls with a 50 µs pause; `polling: true` spins,
/// for the lowest latency at the cost of a core. Providers with automatic progress (RDMA NICs)
/// do not need one; starting it there is harmless.
public final class FabricProgressThread: Sendable {
    /// The stop flag the worker reads; separate from `self` so the worker does not keep the
    /// progress thread alive.
    private final class StopFlag: Sendable {
        let value = Atomic<Bool>(false)
    }

    private let flag = StopFlag()
    private let worker: Mutex<BackgroundThread?>

    /// Starts driving `endpoint`.
    /// - Parameter polling: spin on `fi_cq_read` rather than block or pause (needs a core).
    public init(endpoint: FabricEndpoint, polling: Bool = false) {
        let flag = self.flag
        let blocking = endpoint.waitable && !polling
        worker = Mutex(BackgroundThread {
            while !flag.value.load(ordering: .acquiring) {
                if blocking {
                    if !endpoint.progress(waitMilliseconds: 20) { usleep(50) }
                } else {
                    endpoint.progress()
                    if !polling { usleep(50) }
                }
            }
        })
    }

    /// Stops and joins the thread. Idempotent.
    public func stop() {
        flag.value.store(true, ordering: .releasing)
        let thread = worker.withLock { (current: inout BackgroundThread?) -> BackgroundThread? in
            defer { current = nil }
            return current
        }
        thread?.join()
    }

    deinit { stop() }
}
