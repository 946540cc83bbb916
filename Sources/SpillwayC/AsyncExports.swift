import Dispatch
import Spillway

#if canImport(Glibc)
import Glibc
#endif

// Asynchronous store batches through the C ABI (`spillway_store_submit_get/put`,
// `spillway_batch_wait`): `TieredStore.submitGet/submitPut` with the caller's
// `spillway_page_io` array as requests and results.

/// The C layout of `spillway_page_io` (include/spillway.h).
struct CPageIO {
    var key: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8)
    var buffer: UnsafeMutableRawPointer?
    var length: Int
    var status: Int32
    var latencyNanoseconds: UInt64
}

/// A batch submitted through the C ABI: its results are copied back into the caller's
/// `spillway_page_io` array when the store's batch is done (the store owns the requests
/// meanwhile: `TieredStore.submitGet/submitPut` with an array). `@unchecked Sendable`: the
/// caller's array stays valid until then (the header's contract) and only the batch worker
/// writes it; waiters read `succeeded` after the semaphore publishes it.
final class SubmittedBatch: @unchecked Sendable {
    let ios: UnsafeMutablePointer<CPageIO>
    let count: Int
    let callback: (@convention(c) (UnsafeMutableRawPointer?, UInt64, Int) -> Void)?
    let context: UnsafeMutableRawPointer?
    private let finished = DispatchSemaphore(value: 0)
    private(set) var succeeded = 0
    var handle: UInt64 = 0

    init(ios: UnsafeMutablePointer<CPageIO>, count: Int, callback: (@convention(c) (UnsafeMutableRawPointer?, UInt64, Int) -> Void)?,
         context: UnsafeMutableRawPointer?)
    {
        self.ios = ios
        self.count = count
        self.callback = callback
        self.context = context
    }

    func key(_ index: Int) -> PageKey { withUnsafeBytes(of: ios[index].key) { readKey($0.baseAddress!.assumingMemoryBound(to: UInt8.self)) } }

    /// Reads: each page's length, status and latency back into the caller's array.
    func finish(_ reads: UnsafeMutableBufferPointer<PageRead>, _ succeeded: Int) {
        for index in 0..<count {
            ios[index].length = reads[index].error == nil ? reads[index].length : 0
            ios[index].status = reads[index].error?.code ?? 0
            ios[index].latencyNanoseconds = reads[index].latencyNanoseconds
        }
        done(succeeded)
    }

    /// Writes: each page's status and latency back into the caller's array.
    func finish(_ writes: UnsafeMutableBufferPointer<PageWrite>, _ succeeded: Int) {
        for index in 0..<count {
            ios[index].status = writes[index].error?.code ?? 0
            ios[index].latencyNanoseconds = writes[index].latencyNanoseconds
        }
        done(succeeded)
    }

    /// Calls the caller back, then wakes waiters.
    private func done(_ succeeded: Int) {
        self.succeeded = succeeded
        callback?(context, handle, succeeded)
        finished.signal()
    }

    /// True once done (within `seconds`; negative: however long it takes).
    func wait(_ seconds: Double) -> Bool {
        if seconds < 0 {
            finished.wait()
        } else if finished.wait(timeout: .now() + seconds) != .success {
            return false
        }
        finished.signal()
        return true
    }
}

private func submit(_ storeHandle: UInt64, _ ios: UnsafeMutableRawPointer?, _ count: Int, _ queueDepth: UInt32, write: Bool,
                    _ done: (@convention(c) (UnsafeMutableRawPointer?, UInt64, Int) -> Void)?, _ context: UnsafeMutableRawPointer?,
                    _ ticket: UnsafeMutablePointer<UInt64>?) -> Int32
{
    entry { () throws(CError) in
        let store = try handles.store(storeHandle)
        guard let ticket else { throw .spillway(.invalidArgument("ticket is NULL")) }
        try argument(count > 0 && count <= 1 << 20, "page count \(count) (1…1048576)")
        guard let ios else { throw .spillway(.invalidArgument("ios is NULL")) }
        let pages = ios.bindMemory(to: CPageIO.self, capacity: count)
        for index in 0..<count {
            try argument(pages[index].buffer != nil || pages[index].length == 0, "page \(index): buffer is NULL")
            try argument(pages[index].length >= 0, "page \(index): negative length")
        }
        let batch = SubmittedBatch(ios: pages, count: count, callback: done, context: context)
        batch.handle = handles.insert(.batch(batch))
        ticket.pointee = batch.handle
        if write {
            let writes = (0..<count).map { PageWrite(key: batch.key($0), bytes: UnsafeRawBufferPointer(start: pages[$0].buffer, count: pages[$0].length)) }
            store.submitPut(writes, queueDepth: Int(queueDepth)) { batch.finish($0, $1) }
        } else {
            let reads = (0..<count).map { PageRead(key: batch.key($0), buffer: UnsafeMutableRawBufferPointer(start: pages[$0].buffer, count: pages[$0].length)) }
            store.submitGet(reads, queueDepth: Int(queueDepth)) { batch.finish($0, $1) }
        }
        return CStatus.ok
    }
}

@_cdecl("spillway_store_submit_get")
public func spillway_store_submit_get(_ store: UInt64, _ ios: UnsafeMutableRawPointer?, _ count: Int, _ queueDepth: UInt32,
                                      _ done: (@convention(c) (UnsafeMutableRawPointer?, UInt64, Int) -> Void)?,
                                      _ context: UnsafeMutableRawPointer?, _ ticket: UnsafeMutablePointer<UInt64>?) -> Int32
{
    submit(store, ios, count, queueDepth, write: false, done, context, ticket)
}

@_cdecl("spillway_store_submit_put")
public func spillway_store_submit_put(_ store: UInt64, _ ios: UnsafeMutableRawPointer?, _ count: Int, _ queueDepth: UInt32,
                                      _ done: (@convention(c) (UnsafeMutableRawPointer?, UInt64, Int) -> Void)?,
                                      _ context: UnsafeMutableRawPointer?, _ ticket: UnsafeMutablePointer<UInt64>?) -> Int32
{
    submit(store, ios, count, queueDepth, write: true, done, context, ticket)
}

@_cdecl("spillway_batch_wait")
public func spillway_batch_wait(_ ticket: UInt64, _ timeoutSeconds: Double, _ succeeded: UnsafeMutablePointer<Int>?) -> Int32 {
    entry { () throws(CError) in
        guard case .batch(let batch) = handles.entries.withLock({ $0[ticket] }) else {
            throw .handle("no submitted batch with ticket \(ticket)")
        }
        guard batch.wait(timeoutSeconds) else {
            setLastError("batch \(ticket) still running after \(timeoutSeconds) s")
            return CStatus.timedOut
        }
        // Freed once: a second wait on the same ticket is an invalid handle.
        guard handles.entries.withLock({ $0.removeValue(forKey: ticket) }) != nil else {
            throw .handle("batch \(ticket) was already waited for")
        }
        succeeded?.pointee = batch.succeeded
        guard batch.succeeded == batch.count else {
            setLastError("\(batch.count - batch.succeeded) of \(batch.count) pages failed; see each page's status")
            return CStatus.partial
        }
        return CStatus.ok
    }
}
