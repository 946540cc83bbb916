import CSpillwayCopy
import CSpillwayISAL

/// The Spillway remote-memory wire protocol, version 1 (docs/protocol.md is the prose version).
///
/// Every message is a frame: a fixed 32-byte header, then `metaLength` bytes of fields, then
/// `dataLength` bytes of page data. The header carries its own CRC32C, so corrupt lengths are
/// caught before anything is read on their strength, and the CRC32C of meta + data, so page
/// bytes are checked on every hop. Integers are little-endian.
///
/// ```
///  0  magic "SPWR"   4  version  5  opcode  6  flags  8  request id
/// 16  meta length   20  data length   24  payload CRC32C   28  header CRC32C
/// ```
public enum WireProtocol {
    public static let magic: UInt32 = 0x5257_5053  // "SPWR"
    /// Versions this build speaks; the hello exchange settles on the highest common one.
    public static let minimumVersion: UInt8 = 1
    public static let maximumVersion: UInt8 = 1
    public static let headerSize = 32
    /// Limits: a frame over them is refused before its body is read.
    public static let maxMetaLength = 64 << 10
    public static let maxDataLength = 16 << 20
    /// Items in one batched read or write.
    public static let maxBatchItems = 1024
}

public enum Opcode: UInt8, Sendable, CaseIterable {
    case hello = 1
    case challenge = 2
    case authenticate = 3
    case welcome = 4
    case mapSlab = 5
    case unmapSlab = 6
    case read = 7
    case write = 8
    case readBatch = 9
    case writeBatch = 10
    case reclaim = 11
    case heartbeat = 12
    case stats = 13
    case error = 14
    case goodbye = 15
    /// Test-only: flip the bytes of a range of one of the caller's slabs (simulated memory
    /// corruption). Refused with `unknownOpcode` unless the daemon runs with
    /// `--enable-test-faults`.
    case corruptForTest = 16
}

/// Frame flags.
public struct FrameFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// A reply to the request with the same id.
    public static let response = FrameFlags(rawValue: 1)
    /// Sent by the daemon unprompted (reclaim, goodbye); request id 0.
    public static let notice = FrameFlags(rawValue: 2)
}

/// Why the daemon refused a request (the `error` frame's code) or a frame was rejected.
public enum WireErrorCode: UInt16, Sendable, CaseIterable {
    case malformedFrame = 1
    case unsupportedVersion = 2
    case authenticationRequired = 3
    case authenticationFailed = 4
    case unknownOpcode = 5
    case notOwner = 6
    case outOfBounds = 7
    case noCapacity = 8
    case checksumMismatch = 9
    case tooLarge = 10
    case shuttingDown = 11
    case slabRevoked = 12
    case unknownSlab = 13
    case internalError = 14
}

/// Why a header was rejected (the connection is then closed: lengths cannot be trusted).
public enum FrameError: Error, Equatable, Sendable {
    case truncated
    case badMagic(UInt32)
    case badHeaderChecksum
    case unsupportedVersion(UInt8)
    case unknownOpcode(UInt8)
    case metaTooLong(Int)
    case dataTooLong(Int)
    case badPayloadChecksum
}

public struct FrameHeader: Equatable, Sendable {
    public var version: UInt8
    public var opcode: Opcode
    public var flags: FrameFlags
    public var requestID: UInt64
    public var metaLength: Int
    public var dataLength: Int
    public var payloadChecksum: UInt32

    public init(version: UInt8 = WireProtocol.maximumVersion, opcode: Opcode, flags: FrameFlags = [], requestID: UInt64,
                metaLength: Int, dataLength: Int, payloadChecksum: UInt32)
    {
        self.version = version
        self.opcode = opcode
        self.flags = flags
        self.requestID = requestID
        self.metaLength = metaLength
        self.dataLength = dataLength
        self.payloadChecksum = payloadChecksum
    }

    public static func == (a: FrameHeader, b: FrameHeader) -> Bool {
        a.version == b.version && a.opcode == b.opcode && a.flags.rawValue == b.flags.rawValue && a.requestID == b.requestID
            && a.metaLength == b.metaLength && a.dataLength == b.dataLength && a.payloadChecksum == b.payloadChecksum
    }

    public func encode(into header: UnsafeMutableRawPointer) {
        precondition(metaLength <= WireProtocol.maxMetaLength && dataLength <= WireProtocol.maxDataLength)
        header.storeBytes(of: WireProtocol.magic.littleEndian, toByteOffset: 0, as: UInt32.self)
        header.storeBytes(of: version, toByteOffset: 4, as: UInt8.self)
        header.storeBytes(of: opcode.rawValue, toByteOffset: 5, as: UInt8.self)
        header.storeBytes(of: flags.rawValue.littleEndian, toByteOffset: 6, as: UInt16.self)
        header.storeBytes(of: requestID.littleEndian, toByteOffset: 8, as: UInt64.self)
        header.storeBytes(of: UInt32(metaLength).littleEndian, toByteOffset: 16, as: UInt32.self)
        header.storeBytes(of: UInt32(dataLength).littleEndian, toByteOffset: 20, as: UInt32.self)
        header.storeBytes(of: payloadChecksum.littleEndian, toByteOffset: 24, as: UInt32.self)
        header.storeBytes(of: WireChecksum.crc32c(UnsafeRawBufferPointer(start: header, count: 28)).littleEndian,
                          toByteOffset: 28, as: UInt32.self)
    }

    /// Decodes and validates a header (magic, header CRC32C, version range, opcode, length
    /// limits). `bytes` must hold at least `WireProtocol.headerSize` bytes, else `.truncated`.
    public static func decode(_ bytes: UnsafeRawBufferPointer) -> Result<FrameHeader, FrameError> {
        guard bytes.count >= WireProtocol.headerSize, let base = bytes.baseAddress else { return .failure(.truncated) }
        let magic = UInt32(littleEndian: base.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
        guard magic == WireProtocol.magic else { return .failure(.badMagic(magic)) }
        guard UInt32(littleEndian: base.loadUnaligned(fromByteOffset: 28, as: UInt32.self))
            == WireChecksum.crc32c(UnsafeRawBufferPointer(start: base, count: 28))
        else { return .failure(.badHeaderChecksum) }
        let version = base.load(fromByteOffset: 4, as: UInt8.self)
        guard version >= WireProtocol.minimumVersion, version <= WireProtocol.maximumVersion else {
            return .failure(.unsupportedVersion(version))
        }
        let rawOpcode = base.load(fromByteOffset: 5, as: UInt8.self)
        guard let opcode = Opcode(rawValue: rawOpcode) else { return .failure(.unknownOpcode(rawOpcode)) }
        let meta = Int(UInt32(littleEndian: base.loadUnaligned(fromByteOffset: 16, as: UInt32.self)))
        let data = Int(UInt32(littleEndian: base.loadUnaligned(fromByteOffset: 20, as: UInt32.self)))
        guard meta <= WireProtocol.maxMetaLength else { return .failure(.metaTooLong(meta)) }
        guard data <= WireProtocol.maxDataLength else { return .failure(.dataTooLong(data)) }
        return .success(FrameHeader(
            version: version, opcode: opcode,
            flags: FrameFlags(rawValue: UInt16(littleEndian: base.loadUnaligned(fromByteOffset: 6, as: UInt16.self))),
            requestID: UInt64(littleEndian: base.loadUnaligned(fromByteOffset: 8, as: UInt64.self)),
            metaLength: meta, dataLength: data,
            payloadChecksum: UInt32(littleEndian: base.loadUnaligned(fromByteOffset: 24, as: UInt32.self))))
    }
}

/// CRC32C through ISA-L (the same function as `SpillwayCore.CRC32C`; this module depends on
/// ISA-L alone so the fuzzer can build it with swiftc).
public enum WireChecksum {
    @inlinable
    public static func crc32c(_ bytes: UnsafeRawBufferPointer, register: UInt32 = 0xFFFF_FFFF) -> UInt32 {
        ~update(register, bytes)
    }

    /// Running register (seed 0xFFFF_FFFF; complement once at the end).
    @inlinable
    public static func update(_ register: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard let base = bytes.baseAddress, !bytes.isEmpty else { return register }
        let result = crc32_iscsi(UnsafeMutablePointer(mutating: base.assumingMemoryBound(to: UInt8.self)), Int32(bytes.count), register)
        // ISA-L picks AVX-512 code here: leave no AVX-512 state in use (CSpillwayCopy says why).
        spillway_vector_state_reset()
        return result
    }
}
