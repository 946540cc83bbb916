import CSpillwayURing
import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// How the rings drive the device.
public enum NVMePollMode: String, Sendable, CaseIterable {
    /// Interrupt-driven completions (works everywhere).
    case interrupt
    /// `IORING_SETUP_IOPOLL`: completions are polled from the device queue (needs O_DIRECT and
    /// a block driver with poll queues).
    case iopoll
    /// `IORING_SETUP_SQPOLL`: a kernel thread polls the submission queue (costs a core).
    case sqpoll
}

/// One io_uring with the tier's file registered as fixed file 0, and its bounce buffers and
/// journal blocks registered as fixed buffers (the index mirror is not registered: the kernel
/// caps a registered buffer at 1 GiB, which a large tier's index exceeds). Owned by one submitter at a time (the tier's
/// ring pool hands it out), so nothing in it is shared.
///
/// `@unchecked Sendable`: a context is only used by the thread that took it from the pool,
/// and the pool's lock orders the hand-over.
final class URingContext: @unchecked Sendable {
    let ring: UnsafeMutablePointer<io_uring>
    let entries: Int
    /// `bounceCount` aligned buffers of `bounceBytes` each, registered as buffers 0..<count.
    let bounce: UnsafeMutableRawPointer
    let bounceBytes: Int
    let bounceCount: Int
    /// `journalCount` 4 KiB blocks where a batch encodes its journal blocks, registered as
    /// buffers bounceCount..<bounceCount + journalCount.
    let journal: UnsafeMutableRawPointer
    let journalCount: Int
    /// Set when a submission failed: I/Os may still be queued or in flight, so the ring must
    /// not be handed to another caller (the pool drops it instead).
    var broken = false

    init(entries: Int, mode: NVMePollMode, fd: Int32, bounceBytes: Int, bounceCount: Int, journalCount: Int = 32) throws(SystemCallError)
    {
        ring = .allocate(capacity: 1)
        ring.initialize(to: io_uring())
        var params = io_uring_params()
        switch mode {
        case .interrupt: break
        case .iopoll: params.flags |= UInt32(IORING_SETUP_IOPOLL)
        case .sqpoll:
            params.flags |= UInt32(IORING_SETUP_SQPOLL)
            params.sq_thread_idle = 50
        }
        let status = io_uring_queue_init_params(UInt32(entries), ring, &params)
        guard status == 0 else {
            ring.deallocate()
            throw SystemCallError(call: "io_uring_queue_init_params(\(mode.rawValue))", errno: -status)
        }
        self.entries = entries
        self.bounceBytes = bounceBytes
        self.bounceCount = bounceCount
        let bounce = UnsafeMutableRawPointer.allocate(byteCount: bounceBytes * bounceCount, alignment: NVMeFormat.blockSize)
        memset(bounce, 0, bounceBytes * bounceCount)
        self.bounce = bounce
        self.journalCount = journalCount
        let journal = UnsafeMutableRawPointer.allocate(byteCount: NVMeFormat.blockSize * journalCount, alignment: NVMeFormat.blockSize)
        memset(journal, 0, NVMeFormat.blockSize * journalCount)
        self.journal = journal
        var vectors = (0..<bounceCount).map { iovec(iov_base: bounce + $0 * bounceBytes, iov_len: bounceBytes) }
        vectors += (0..<journalCount).map { iovec(iov_base: journal + $0 * NVMeFormat.blockSize, iov_len: NVMeFormat.blockSize) }
        var registerStatus = io_uring_register_buffers(ring, &vectors, UInt32(vectors.count))
        if registerStatus == 0 {
            var files = [fd]
            registerStatus = io_uring_register_files(ring, &files, 1)
        }
        guard registerStatus == 0 else {
            io_uring_queue_exit(ring)
            ring.deallocate()
            bounce.deallocate()
            journal.deallocate()
            throw SystemCallError(call: "io_uring_register", errno: -registerStatus)
        }
    }

    deinit {
        io_uring_queue_exit(ring)
        ring.deallocate()
        bounce.deallocate()
        journal.deallocate()
    }

    func bounceBuffer(_ index: Int) -> UnsafeMutableRawPointer { bounce + index * bounceBytes }
    func journalBlock(_ index: Int) -> UnsafeMutableRawPointer { journal + index * NVMeFormat.blockSize }
    func journalFixedBuffer(_ index: Int) -> Int32 { Int32(bounceCount + index) }

    /// Queues one read or write on fixed file 0. `fixedBuffer` ≥ 0 uses that registered buffer.
    /// Returns false when the submission queue is full (the caller submits and retries).
    /// `rwFlags`: per-write flags (`RWF_DSYNC` for journal and checkpoint writes of a tier with
    /// `durability = "power"`).
    func prepare(write: Bool, buffer: UnsafeMutableRawPointer, length: Int, offset: Int, fixedBuffer: Int32, tag: UInt64,
                 rwFlags: Int32 = 0) -> Bool {
        guard let sqe = io_uring_get_sqe(ring) else { return false }
        if fixedBuffer >= 0 {
            if write {
                io_uring_prep_write_fixed(sqe, 0, buffer, UInt32(length), UInt64(offset), fixedBuffer)
            } else {
                io_uring_prep_read_fixed(sqe, 0, buffer, UInt32(length), UInt64(offset), fixedBuffer)
            }
        } else if write {
            io_uring_prep_write(sqe, 0, buffer, UInt32(length), UInt64(offset))
        } else {
            io_uring_prep_read(sqe, 0, buffer, UInt32(length), UInt64(offset))
        }
        spillway_io_uring_sqe_use_fixed_file(sqe)
        if rwFlags != 0 { spillway_io_uring_sqe_set_rw_flags(sqe, rwFlags) }
        io_uring_sqe_set_data64(sqe, tag)
        return true
    }

    /// Submits everything queued and waits for at least `waitFor` completions. A failure marks
    /// the ring broken.
    func submit(waitFor: Int) -> Int32 {
        while true {
            let status = io_uring_submit_and_wait(ring, UInt32(waitFor))
            if status == -EINTR { continue }
            if status < 0 { broken = true }
            return status < 0 ? status : 0
        }
    }

    /// Pushes queued SQEs to the kernel without waiting.
    func flush() {
        if io_uring_submit(ring) < 0 { broken = true }
    }

    /// Queues an SQE, pushing queued ones to the kernel while the submission queue is full.
    /// False if the ring failed.
    func prepareOrFlush(write: Bool, buffer: UnsafeMutableRawPointer, length: Int, offset: Int, fixedBuffer: Int32, tag: UInt64,
                        rwFlags: Int32 = 0) -> Bool {
        while !prepare(write: write, buffer: buffer, length: length, offset: offset, fixedBuffer: fixedBuffer, tag: tag,
                       rwFlags: rwFlags) {
            if submit(waitFor: 0) < 0 { return false }
        }
        return true
    }

    /// Hands every available completion to `body` (tag, result), then marks them seen.
    func reap(_ body: (UInt64, Int32) -> Void) -> Int {
        var reaped = 0
        while true {
            var cqe: UnsafeMutablePointer<io_uring_cqe>?
            guard io_uring_peek_cqe(ring, &cqe) == 0, let completion = cqe else { return reaped }
            body(io_uring_cqe_get_data64(completion), completion.pointee.res)
            io_uring_cqe_seen(ring, completion)
            reaped += 1
        }
    }
}
