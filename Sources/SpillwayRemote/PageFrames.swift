import SpillwayCore
import SpillwayProtocol

#if canImport(Glibc)
import Glibc
#endif

/// How page operations become frames on Spillway's TCP protocol: consecutive operations of one
/// kind travel together as one `readBatch`/`writeBatch` frame (up to `maxOperations` and
/// `maxBytes`; a lone or large operation as a plain `read`/`write`), so a batch costs the
/// daemon and the client one frame and one system call per group instead of one per page. The
/// daemon answers a batch with one status byte per range, so one refused range (a reclaimed
/// slab among several) fails only its own operation. Shared by `DaemonClient.execute` and
/// `MultiDaemonExchange`, which pipeline these frames.
public enum PageFrames {
    /// Operations in one frame at most (also bounds the gather vectors of a write).
    public static let maxOperations = 32
    /// Page bytes in one batched frame at most: small enough that a large batch still splits
    /// into several frames the daemon serves while the client receives the previous one.
    public static let maxBytes = 64 << 10
    /// Meta scratch a sender needs: a batch header and `maxOperations` ranges.
    public static let metaCapacity = 2 + maxOperations * Wire.SlabRange.encodedSize

    /// The end of the frame that starts at `start`: the run of operations of the same kind
    /// after it, within the limits.
    @inline(__always)
    static func frameEnd(_ operations: UnsafeMutableBufferPointer<RemoteOperation>, from start: Int, limit: Int = maxOperations) -> Int {
        let write = operations[start].write
        var bytes = operations[start].length
        var end = start + 1
        while end < operations.count, end - start < limit, operations[end].write == write,
              bytes + operations[end].length <= maxBytes
        {
            bytes += operations[end].length
            end += 1
        }
        return end
    }

    /// Sends `operations[range]` as one frame with request id `id`; `meta` is scratch of
    /// `metaCapacity` bytes.
    static func send(_ operations: UnsafeMutableBufferPointer<RemoteOperation>, _ range: Range<Int>, id: UInt64,
                     on connection: FrameConnection, meta: UnsafeMutableRawPointer) throws(RemoteError)
    {
        let write = operations[range.lowerBound].write
        if range.count == 1 {
            let operation = operations[range.lowerBound]
            Wire.SlabRange(slab: operation.slab, offset: operation.offset, length: UInt32(operation.length)).encode(into: meta)
            try connection.send(write ? .write : .read, requestID: id,
                                meta: UnsafeRawBufferPointer(start: meta, count: Wire.SlabRange.encodedSize),
                                data: write ? UnsafeRawBufferPointer(start: operation.buffer, count: operation.length)
                                    : UnsafeRawBufferPointer(start: nil, count: 0))
            return
        }
        meta.storeBytes(of: UInt16(range.count).littleEndian, as: UInt16.self)
        var cursor = meta + 2
        for index in range {
            let operation = operations[index]
            Wire.SlabRange(slab: operation.slab, offset: operation.offset, length: UInt32(operation.length)).encode(into: cursor)
            cursor += Wire.SlabRange.encodedSize
        }
        try connection.send(write ? .writeBatch : .readBatch, requestID: id,
                            meta: UnsafeRawBufferPointer(start: meta, count: 2 + range.count * Wire.SlabRange.encodedSize),
                            pagesOf: operations, range: range, data: write)
    }

    /// Receives the rest of the reply to the frame of `operations[range]` (`header` already
    /// read) and sets each operation's status: 0, the errno of a refusal (of the frame, or of
    /// that range in a batch), or `EBADMSG` for read data that failed the frame's CRC32C. Read
    /// data lands straight in each operation's buffer. Throws only what breaks the connection.
    static func complete(_ header: FrameHeader, on connection: FrameConnection,
                         _ operations: UnsafeMutableBufferPointer<RemoteOperation>, _ range: Range<Int>) throws(RemoteError)
    {
        if header.opcode == .error {
            let status = RemoteError.refused(DaemonClient.decodeError(try connection.receiveSmall(header))).errno
            for index in range { operations[index].status = status }
            return
        }
        let write = operations[range.lowerBound].write
        if range.count == 1 {
            operations[range.lowerBound].status = try completeSingle(header, on: connection, for: operations[range.lowerBound])
            return
        }
        guard header.opcode == (write ? .writeBatch : .readBatch), header.metaLength == range.count else {
            throw .protocolViolation("\(header.opcode) reply with \(header.metaLength) statuses to a batch of \(range.count)")
        }
        // The statuses stay in the connection's meta buffer while the data is received (only
        // `receiveMeta`/`receiveSmall` reuse it); the operations get theirs only once all of
        // it is in, so a connection failing midway leaves them all unanswered.
        let (statuses, start) = try connection.receiveMeta(header)
        var expected = 0
        if !write {
            for (position, index) in range.enumerated() where statuses[position] == 0 { expected += operations[index].length }
        }
        guard header.dataLength == expected else {
            throw .protocolViolation("\(header.opcode) reply of \(header.dataLength) data bytes, \(expected) expected")
        }
        var register = start
        for (position, index) in range.enumerated() where !write && statuses[position] == 0 {
            register = try connection.receiveData(into: operations[index].buffer, count: operations[index].length, register: register)
        }
        let intact = ~register == header.payloadChecksum
        if write && !intact { throw .protocolViolation("batch reply failed its CRC32C") }
        for (position, index) in range.enumerated() {
            let code = statuses[position]
            if code == 0 {
                operations[index].status = intact ? 0 : EBADMSG
            } else {
                let reason = WireErrorCode(rawValue: UInt16(code)) ?? .internalError
                operations[index].status = RemoteError.refused(Wire.ErrorReply(reason, "")).errno
            }
        }
    }

    /// `complete` for a plain `read`/`write` frame of one operation: its status, 0 or
    /// `EBADMSG` for read data that failed its CRC32C. Read data lands straight in the
    /// operation's buffer.
    private static func completeSingle(_ header: FrameHeader, on connection: FrameConnection, for operation: RemoteOperation) throws(RemoteError)
        -> Int32
    {
        // (An `error` reply was handled by `complete`.)
        if operation.write {
            guard header.opcode == .write, header.dataLength == 0 else { throw .protocolViolation("\(header.opcode) reply to a write") }
            _ = try connection.receiveSmall(header)
            return 0
        }
        guard header.opcode == .read, header.metaLength == 0, header.dataLength == operation.length else {
            throw .protocolViolation("read reply of \(header.dataLength) bytes for \(operation.length)")
        }
        let (_, register) = try connection.receiveMeta(header)
        let final = try connection.receiveData(into: operation.buffer, count: operation.length, register: register)
        return ~final == header.payloadChecksum ? 0 : EBADMSG
    }
}
