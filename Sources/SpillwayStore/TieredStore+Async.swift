import Atomics
import Dispatch
import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// The outcome of a batch submitted with `TieredStore.submitGet` / `submitPut`: how many of
/// its pages succeeded, once the batch has run (each request carries its own length or error
/// and latency, as for the synchronous batch calls).
public final class StoreTicket: Sendable {
    private let done = DispatchSemaphore(value: 0)
    private let result = ManagedAtomic<Int>(-1)

    init() {}

    func finish(_ succeeded: Int) {
        result.store(succeeded, ordering: .releasing)
        done.signal()
    }

    /// Whether the batch has run (its requests may be read).
    public var isDone: Bool { result.load(ordering: .acquiring) >= 0 }

    /// Waits for the batch; returns how many pages succeeded.
    public func wait() -> Int {
        if !isDone {
            done.wait()
            done.signal()  // later waits return at once
        }
        return result.load(ordering: .acquiring)
    }

    /// `wait()`, bounded: nil if the batch has not run within `seconds`.
    public func wait(timeout seconds: Double) -> Int? {
        if isDone { return result.load(ordering: .acquiring) }
        guard done.wait(timeout: .now() + seconds) == .success else { return nil }
        done.signal()
        return result.load(ordering: .acquiring)
    }
}

/// Runs submitted batches on a fixed set of worker threads, at most `limit` batches in flight
/// (queued or running) per store: a caller that submits more waits for room (back-pressure),
/// never an unbounded queue. Two workers let one batch's device reads overlap the previous
/// batch's checksums, journal write and directory commits, so a caller submitting batch after
/// batch keeps a queueing tier (NVMe) busy across calls.
final class AsyncBatches: Sendable {
    /// A submitted batch. `@unchecked Sendable`: the request buffers belong to the caller, who
    /// promises (by submitting) not to touch them until the ticket completes; only the worker
    /// that pops the job reads or writes them meanwhile.
    struct Job: @unchecked Sendable {
        enum Requests {
            case gets(UnsafeMutableBufferPointer<PageRead>)
            case puts(UnsafeMutableBufferPointer<PageWrite>)
        }
        var requests: Requests
        var queueDepth: Int
        var ticket: StoreTicket
        var completion: (@Sendable (Int) -> Void)?
    }

    let limit: Int
    let workerCount: Int
    private let room: DispatchSemaphore
    private let ready = DispatchSemaphore(value: 0)
    private let queue: Locked<(jobs: [Job?], head: Int, count: Int, stopping: Bool)>
    private let workers = Locked<(threads: [BackgroundThread], stopped: Bool)>(([], false))
    /// Batches submitted and not yet finished.
    let inFlight = ManagedAtomic<Int>(0)

    init(limit: Int, workers: Int) {
        self.limit = limit
        workerCount = workers
        room = DispatchSemaphore(value: limit)
        queue = Locked((Array(repeating: nil, count: limit), 0, 0, false))
    }

    /// Queues `job`, waiting for room if `limit` batches are in flight. False once stopping.
    func submit(_ job: Job, run: @escaping @Sendable (Job) -> Int) -> Bool {
        guard startWorkers(run) else { return false }
        room.wait()
        let accepted = queue.withLock { queue -> Bool in
            guard !queue.stopping else { return false }
            // Room was reserved above, so the ring has a free place.
            queue.jobs[(queue.head + queue.count) % limit] = job
            queue.count += 1
            return true
        }
        guard accepted else {
            room.signal()
            return false
        }
        inFlight.wrappingIncrement(ordering: .relaxed)
        ready.signal()
        return true
    }

    /// Starts the workers at the first submit; false once stopped.
    private func startWorkers(_ run: @escaping @Sendable (Job) -> Int) -> Bool {
        workers.withLock { workers -> Bool in
            guard !workers.stopped else { return false }
            guard workers.threads.isEmpty else { return true }
            for _ in 0..<workerCount {
                workers.threads.append(BackgroundThread { [self] in
                    while let job = next() {
                        let succeeded = run(job)
                        // The callback first: once `wait()` returns, it has run.
                        job.completion?(succeeded)
                        job.ticket.finish(succeeded)
                        inFlight.wrappingDecrement(ordering: .relaxed)
                        room.signal()
                    }
                })
            }
            return true
        }
    }

    /// The next job, or nil once stopping and drained.
    private func next() -> Job? {
        while true {
            ready.wait()
            let (job, stop) = queue.withLock { queue -> (Job?, Bool) in
                guard queue.count > 0 else { return (nil, queue.stopping) }
                let job = queue.jobs[queue.head]
                queue.jobs[queue.head] = nil
                queue.head = (queue.head + 1) % limit
                queue.count -= 1
                return (job, false)
            }
            if let job { return job }
            if stop {
                ready.signal()  // wake the next worker to stop too
                return nil
            }
        }
    }

    /// Refuses new batches, runs the queued ones, and (with `join`) waits for the workers to
    /// end. Idempotent. A store's deinit passes `join: false`: it may run on a worker.
    func stop(join: Bool = true) {
        queue.withLock { $0.stopping = true }
        ready.signal()
        let threads = workers.withLock { workers -> [BackgroundThread] in
            defer {
                workers.threads = []
                workers.stopped = true
            }
            return workers.threads
        }
        for thread in threads {
            if join { thread.join() } else { thread.detach() }
        }
    }
}

extension TieredStore {
    /// Submits a batch of reads and returns at once; the batch runs on the store's batch
    /// workers like `get(batch:queueDepth:)`, and `completion` (if any) is called on a worker
    /// thread when it has (before the ticket completes). The caller must leave `requests` and their buffers alone until then.
    /// At most `StoreOptions.asyncBatchLimit` batches are in flight: past that, this waits for
    /// one to finish. A closed store completes the ticket at once with 0 and every request
    /// failing `closed`.
    @discardableResult
    public func submitGet(batch requests: UnsafeMutableBufferPointer<PageRead>, queueDepth: Int = 0,
                          completion: (@Sendable (Int) -> Void)? = nil) -> StoreTicket
    {
        submit(.gets(requests), queueDepth: queueDepth, completion: completion)
    }

    /// Submits a batch of writes (as `put(batch:queueDepth:)`); see `submitGet`. A page is
    /// visible only once its write is durable on its tier, as for every put.
    @discardableResult
    public func submitPut(batch requests: UnsafeMutableBufferPointer<PageWrite>, queueDepth: Int = 0,
                          completion: (@Sendable (Int) -> Void)? = nil) -> StoreTicket
    {
        submit(.puts(requests), queueDepth: queueDepth, completion: completion)
    }

    /// `submitGet(batch:)` for reads given as an array: the store keeps them until the batch
    /// is done and lends them (each with its length or error, and latency) to `completion`,
    /// on a batch worker before the ticket completes, then frees them.
    @discardableResult
    public func submitGet(_ requests: [PageRead], queueDepth: Int = 0,
                          completion: @escaping @Sendable (UnsafeMutableBufferPointer<PageRead>, Int) -> Void) -> StoreTicket
    {
        submitOwning(requests, completion: completion) { submitGet(batch: $0, queueDepth: queueDepth, completion: $1) }
    }

    /// `submitPut(batch:)` for writes given as an array; see `submitGet(_:queueDepth:completion:)`.
    @discardableResult
    public func submitPut(_ requests: [PageWrite], queueDepth: Int = 0,
                          completion: @escaping @Sendable (UnsafeMutableBufferPointer<PageWrite>, Int) -> Void) -> StoreTicket
    {
        submitOwning(requests, completion: completion) { submitPut(batch: $0, queueDepth: queueDepth, completion: $1) }
    }

    /// The array forms' one body: copies `requests` into memory the store owns, submits them
    /// with `submit`, and lends them to `completion` before freeing them.
    private func submitOwning<Request>(
        _ requests: [Request], completion: @escaping @Sendable (UnsafeMutableBufferPointer<Request>, Int) -> Void,
        _ submit: (UnsafeMutableBufferPointer<Request>, @escaping @Sendable (Int) -> Void) -> StoreTicket
    ) -> StoreTicket {
        let owned = OwnedRequests(requests)
        return submit(owned.pages) { succeeded in
            completion(owned.pages, succeeded)
            owned.free()
        }
    }

    /// Batches submitted and not yet finished.
    public var asyncBatchesInFlight: Int { asyncBatches.inFlight.load(ordering: .relaxed) }

    private func submit(_ requests: AsyncBatches.Job.Requests, queueDepth: Int, completion: (@Sendable (Int) -> Void)?) -> StoreTicket {
        let ticket = StoreTicket()
        let job = AsyncBatches.Job(requests: requests, queueDepth: queueDepth, ticket: ticket, completion: completion)
        let accepted = !isClosed && asyncBatches.submit(job) { [weak self] job in
            switch job.requests {
            case .gets(let requests):
                guard let self else { return Self.refuse(requests) }
                return self.get(batch: requests, queueDepth: job.queueDepth)
            case .puts(let requests):
                guard let self else { return Self.refuse(requests) }
                return self.put(batch: requests, queueDepth: job.queueDepth)
            }
        }
        if !accepted {
            switch requests {
            case .gets(let requests): Self.refuse(requests)
            case .puts(let requests): Self.refuse(requests)
            }
            ticket.finish(0)
            completion?(0)
        }
        return ticket
    }

    @discardableResult
    private static func refuse(_ requests: UnsafeMutableBufferPointer<PageRead>) -> Int {
        for index in requests.indices { requests[index].error = .closed }
        return 0
    }

    @discardableResult
    private static func refuse(_ requests: UnsafeMutableBufferPointer<PageWrite>) -> Int {
        for index in requests.indices { requests[index].error = .closed }
        return 0
    }
}

/// Requests a submitted batch owns while it runs (the array forms of `submitGet`/`submitPut`).
/// `@unchecked Sendable`: filled at init by the submitter, then touched only by the batch
/// worker running the batch, whose completion frees them (once).
private final class OwnedRequests<Element>: @unchecked Sendable {
    let pages: UnsafeMutableBufferPointer<Element>

    init(_ requests: [Element]) {
        pages = .allocate(capacity: requests.count)
        _ = pages.initialize(from: requests)
    }

    func free() {
        pages.deinitialize()
        pages.deallocate()
    }
}
