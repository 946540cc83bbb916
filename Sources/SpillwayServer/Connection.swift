import SpillwayCore
import SpillwayProtocol
import SpillwayRemote

#if canImport(Glibc)
import Glibc
#endif

/// One client connection of the event-driven daemon: a non-blocking socket, a bounded input
/// buffer, and an output queue. Owned by one worker thread; the few fields others read are
/// marked "under the server's lock".
///
/// The output queue is a list of segments: small bytes (headers, meta, error replies) in one
/// growable buffer, and page data straight from slabs, each pinned until it has been sent (so
/// a reply never copies page data, and a slab that is unmapped while a reply is in flight is
/// freed only after it; see `SlabTable`). A peer that stops reading leaves its queue full:
/// the worker stops reading its requests and, after `sendTimeout` without progress, cuts it off.
///
/// `@unchecked Sendable`: owned by its worker; shared fields are under the server's lock.
final class Connection: @unchecked Sendable {
    let socket: TCPSocket
    let peer: Endpoint
    let acceptedAt: Double
    let worker: Int

    // Under the server's lock.
    /// False once the worker deregistered it (its descriptor may be closed): nobody may
    /// shut it down any more.
    var open = true

    // Owned by the worker.
    enum Phase {
        case hello
        case authenticate(tenant: String, nonce: [UInt8], agreed: Wire.Capabilities, helloID: UInt64)
        case serving
    }

    var phase = Phase.hello
    var tenantID: UInt32 = 0
    var tenantName = ""
    /// `Wire.Capabilities.rma` agreed: slabs mapped on this connection are registered with
    /// the daemon's fabric endpoint and their grants sent in the map reply.
    var rma = false
    var tenantCounters: TenantCounters?

    /// Received bytes not consumed yet: `input[inputStart..<inputEnd]`.
    var input: UnsafeMutableRawPointer
    var inputCapacity: Int
    var inputStart = 0
    var inputEnd = 0
    static let initialInput = 32 << 10
    /// A frame without page data going to a slab (everything but a write's data) must fit here.
    static let maxInput = WireProtocol.headerSize + WireProtocol.maxMetaLength + (64 << 10)

    /// Small output bytes (headers, meta); segments point into it by offset.
    var small: UnsafeMutableRawPointer
    var smallCapacity: Int
    var smallEnd = 0
    static let initialSmall = 4 << 10

    struct Segment {
        /// Pinned slab slot of `pointer`, or -1 for bytes in `small` at `offset`.
        var slot: Int
        var pointer: UnsafeRawPointer?
        var offset: Int
        var length: Int
    }

    var segments: [Segment] = []
    var segmentHead = 0
    /// Bytes queued and not yet sent.
    var pending = 0
    /// When the output last made progress (or became non-empty): a peer that lets it sit for
    /// `sendTimeout` is cut off.
    var lastProgress: Double = 0
    /// A write frame whose data is still arriving.
    var write: WriteInProgress?
    /// Test faults: page requests wait until then (monotonic ns); `delayTaken` marks that the
    /// request at the head of the input has served its delay.
    var pausedUntil: UInt64 = 0
    var delayTaken = false
    /// Requests left unread because the queue was over the limit (served once it drains).
    var backlogged = false
    /// When bytes last arrived (a write stalled mid-data with slabs pinned is cut off).
    var lastInput: Double = 0
    /// Close as soon as the output queue is empty (after a fatal error reply, or stopping).
    var closeAfterFlush = false
    /// epoll events registered.
    var interest: UInt32 = 0
    /// Registered with its worker's epoll set and not closed yet.
    var live = false
    /// Tenant name for the stuck-peer log, once known.
    var label: String { tenantName.isEmpty ? "-" : tenantName }

    struct Target {
        var slot: Int
        var pointer: UnsafeMutableRawPointer
        var length: Int
    }

    /// A write (or batched write) receiving its data.
    struct WriteInProgress {
        var opcode: Opcode
        var requestID: UInt64
        var dataLength: Int
        var payloadChecksum: UInt32
        /// CRC register after the meta and the data received so far.
        var register: UInt32
        /// Refused before the data arrived: the data is read and dropped, then this is the reply.
        var refusal: Wire.ErrorReply?
        var received = 0
        var target = 0
        var targetOffset = 0
        var ranges: Int
        /// Ranges not refused (all of a single write that was not refused).
        var served: Int
    }

    /// Destinations of the current write (slots pinned), reused between frames. In a batched
    /// write, a refused range's target has slot -1: its bytes are received and dropped.
    var targets: [Target] = []
    /// Per-range statuses of the current batched request (`WireErrorCode` raw values, 0 =
    /// served): the reply's meta. Allocated on the first batch (most connections never send one).
    private var rangeStatuses: UnsafeMutablePointer<UInt8>?
    var statusBuffer: UnsafeMutablePointer<UInt8> {
        if let rangeStatuses { return rangeStatuses }
        let buffer = UnsafeMutablePointer<UInt8>.allocate(capacity: WireProtocol.maxBatchItems)
        rangeStatuses = buffer
        return buffer
    }
    /// The current batch's ranges, decoded (allocated with the statuses).
    private var batchRanges: UnsafeMutablePointer<Wire.SlabRange>?
    var rangeBuffer: UnsafeMutableBufferPointer<Wire.SlabRange> {
        if let batchRanges { return UnsafeMutableBufferPointer(start: batchRanges, count: WireProtocol.maxBatchItems) }
        let buffer = UnsafeMutablePointer<Wire.SlabRange>.allocate(capacity: WireProtocol.maxBatchItems)
        batchRanges = buffer
        return UnsafeMutableBufferPointer(start: buffer, count: WireProtocol.maxBatchItems)
    }

    init(socket: TCPSocket, peer: Endpoint, acceptedAt: Double, worker: Int) {
        self.socket = socket
        self.peer = peer
        self.acceptedAt = acceptedAt
        self.worker = worker
        inputCapacity = Self.initialInput
        input = .allocate(byteCount: inputCapacity, alignment: 64)
        smallCapacity = Self.initialSmall
        small = .allocate(byteCount: smallCapacity, alignment: 16)
    }

    deinit {
        input.deallocate()
        small.deallocate()
        rangeStatuses?.deallocate()
        batchRanges?.deallocate()
    }

    var descriptor: Int32 { socket.descriptor }
    var buffered: Int { inputEnd - inputStart }

    /// Makes room for `count` contiguous unconsumed bytes (≤ `maxInput`).
    func reserveInput(_ count: Int) {
        if inputStart > 0 && inputCapacity - inputStart < count {
            let held = buffered
            memmove(input, input + inputStart, held)
            inputStart = 0
            inputEnd = held
        }
        if inputCapacity < count {
            let grown = UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 64)
            memcpy(grown, input + inputStart, buffered)
            input.deallocate()
            input = grown
            inputEnd -= inputStart
            inputStart = 0
            inputCapacity = count
        }
    }

    func consume(_ count: Int) {
        inputStart += count
        if inputStart == inputEnd {
            inputStart = 0
            inputEnd = 0
        }
    }

    // MARK: Output

    /// Room for `count` more small bytes; their offset.
    private func reserveSmall(_ count: Int) -> Int {
        if smallEnd + count > smallCapacity {
            var capacity = smallCapacity * 2
            while capacity < smallEnd + count { capacity *= 2 }
            let grown = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 16)
            memcpy(grown, small, smallEnd)
            small.deallocate()
            small = grown
            smallCapacity = capacity
        }
        let offset = smallEnd
        smallEnd += count
        return offset
    }

    private func appendSmallSegment(offset: Int, length: Int) {
        if pending == 0 { lastProgress = RemoteMemoryServer.now() }
        pending += length
        if segments.count > segmentHead, let last = segments.last, last.slot < 0, last.offset + last.length == offset {
            segments[segments.count - 1].length += length
        } else {
            segments.append(Segment(slot: -1, pointer: nil, offset: offset, length: length))
        }
    }

    /// Queues a frame without page data.
    func queue(_ opcode: Opcode, flags: FrameFlags, requestID: UInt64, meta: UnsafeRawBufferPointer) {
        let offset = reserveSmall(WireProtocol.headerSize + meta.count)
        if meta.count > 0 { memcpy(small + offset + WireProtocol.headerSize, meta.baseAddress!, meta.count) }
        let crc = WireChecksum.crc32c(meta)
        FrameHeader(opcode: opcode, flags: flags, requestID: requestID, metaLength: meta.count, dataLength: 0, payloadChecksum: crc)
            .encode(into: small + offset)
        appendSmallSegment(offset: offset, length: WireProtocol.headerSize + meta.count)
    }

    func queue(_ opcode: Opcode, flags: FrameFlags, requestID: UInt64, meta: [UInt8]) {
        meta.withUnsafeBytes { queue(opcode, flags: flags, requestID: requestID, meta: $0) }
    }

    /// Queues a reply header (and `meta`) for `dataLength` bytes of page data that follow as
    /// `queueData`; `checksum` covers meta and data.
    func queueDataHeader(_ opcode: Opcode, requestID: UInt64, meta: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0),
                         dataLength: Int, checksum: UInt32)
    {
        let offset = reserveSmall(WireProtocol.headerSize + meta.count)
        if meta.count > 0 { memcpy(small + offset + WireProtocol.headerSize, meta.baseAddress!, meta.count) }
        FrameHeader(opcode: opcode, flags: .response, requestID: requestID, metaLength: meta.count, dataLength: dataLength,
                    payloadChecksum: checksum).encode(into: small + offset)
        appendSmallSegment(offset: offset, length: WireProtocol.headerSize + meta.count)
    }

    /// Queues page data from a pinned slot (the pin passes to the queue).
    func queueData(slot: Int, pointer: UnsafeRawPointer, length: Int) {
        if pending == 0 { lastProgress = RemoteMemoryServer.now() }
        pending += length
        segments.append(Segment(slot: slot, pointer: pointer, offset: 0, length: length))
    }

    /// What a flush came to.
    enum FlushOutcome { case done, blocked, broken }

    /// Sends what the queue holds without waiting; unpins slots whose data went out.
    func flush(vectors: UnsafeMutableBufferPointer<iovec>, slabs: SlabTable) -> FlushOutcome {
        while segmentHead < segments.count {
            var count = 0
            var index = segmentHead
            while index < segments.count && count < vectors.count {
                let segment = segments[index]
                let base = segment.slot < 0 ? UnsafeMutableRawPointer(small + segment.offset)
                    : UnsafeMutableRawPointer(mutating: segment.pointer!)
                vectors[count] = iovec(iov_base: base, iov_len: segment.length)
                count += 1
                index += 1
            }
            var message = msghdr()
            message.msg_iov = vectors.baseAddress
            message.msg_iovlen = count
            let sent = sendmsg(descriptor, &message, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            if sent < 0 {
                if errno == EINTR { continue }
                return errno == EAGAIN || errno == EWOULDBLOCK ? .blocked : .broken
            }
            if sent > 0 { lastProgress = RemoteMemoryServer.now() }
            pending -= sent
            var left = sent
            while left > 0 {
                let length = segments[segmentHead].length
                if length <= left {
                    left -= length
                    if segments[segmentHead].slot >= 0 { slabs.unpin(segments[segmentHead].slot) }
                    segmentHead += 1
                } else {
                    if segments[segmentHead].slot < 0 {
                        segments[segmentHead].offset += left
                    } else {
                        segments[segmentHead].pointer! += left
                    }
                    segments[segmentHead].length -= left
                    left = 0
                }
            }
        }
        segments.removeAll(keepingCapacity: segments.capacity <= 4096)
        segmentHead = 0
        smallEnd = 0
        if smallCapacity > 1 << 20 {
            small.deallocate()
            smallCapacity = Self.initialSmall
            small = .allocate(byteCount: smallCapacity, alignment: 16)
        }
        return .done
    }

    /// Drops everything queued or pinned (the connection is closing).
    func releaseAll(slabs: SlabTable) {
        for index in segmentHead..<segments.count where segments[index].slot >= 0 { slabs.unpin(segments[index].slot) }
        segments.removeAll()
        segmentHead = 0
        pending = 0
        smallEnd = 0
        if write != nil {
            for target in targets where target.slot >= 0 { slabs.unpin(target.slot) }
            targets.removeAll()
            write = nil
        }
    }
}
