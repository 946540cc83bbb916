import SpillwayCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The thread the cluster code's background tasks run on (lease keep-alive, record refresh,
/// membership watch), instead of the process's cooperative pool: that pool has one thread per
/// core and is the host's — a serving engine (or a test runner) that blocks its threads would
/// otherwise stall keep-alives until the daemon's lease expires and it vanishes from the
/// registry. A task preferring this executor runs its jobs here, one at a time.
///
/// `@unchecked Sendable`: the job queue is behind `jobs`' mutex; the thread is the only
/// consumer.
public final class ClusterExecutor: TaskExecutor, @unchecked Sendable {
    public static let shared = ClusterExecutor()

    private let jobs = Mutex<[UnownedJob]>([])
    private let ready = Semaphore()

    public init() {
        BackgroundThread { [self] in
            while true {
                ready.wait()
                let batch = jobs.withLock { jobs -> [UnownedJob] in
                    defer { jobs.removeAll(keepingCapacity: true) }
                    return jobs
                }
                for job in batch { job.runSynchronously(on: asUnownedTaskExecutor()) }
            }
        }.detach()
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        jobs.withLock { $0.append(job) }
        ready.signal()
    }
}

/// A counting semaphore on a pthread mutex and condition variable.
/// `@unchecked Sendable`: every field is used under `mutex`.
private final class Semaphore: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var condition = pthread_cond_t()
    private var count = 0

    init() {
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&condition, nil)
    }

    func signal() {
        pthread_mutex_lock(&mutex)
        count += 1
        pthread_cond_signal(&condition)
        pthread_mutex_unlock(&mutex)
    }

    func wait() {
        pthread_mutex_lock(&mutex)
        while count == 0 { pthread_cond_wait(&condition, &mutex) }
        count = 0
        pthread_mutex_unlock(&mutex)
    }
}
