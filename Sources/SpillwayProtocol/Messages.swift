/// The fields of each frame's meta section. Decoders take a `WireReader` and return nil on any
/// truncation or out-of-range value (the daemon answers with `malformedFrame`).
public enum Wire {
    /// A byte range inside one slab.
    public struct SlabRange: Equatable, Sendable {
        public var slab: UInt32
        public var offset: UInt64
        public var length: UInt32
        public static let encodedSize = 16

        public init(slab: UInt32, offset: UInt64, length: UInt32) {
            self.slab = slab
            self.offset = offset
            self.length = length
        }

        public func encode(into pointer: UnsafeMutableRawPointer) {
            pointer.storeBytes(of: slab.littleEndian, toByteOffset: 0, as: UInt32.self)
            pointer.storeBytes(of: length.littleEndian, toByteOffset: 4, as: UInt32.self)
            pointer.storeBytes(of: offset.littleEndian, toByteOffset: 8, as: UInt64.self)
        }

        public func encode(into writer: inout WireWriter) {
            writer.write(slab)
            writer.write(length)
            writer.write(offset)
        }

        public static func decode(_ reader: inout WireReader) -> SlabRange? {
            guard let slab = reader.read(UInt32.self), let length = reader.read(UInt32.self), let offset = reader.read(UInt64.self)
            else { return nil }
            return SlabRange(slab: slab, offset: offset, length: length)
        }
    }

    /// Capability bits of `hello` and `challenge`. A daemon echoes in its challenge the bits
    /// of the client's hello it supports; what both set is in force for the connection.
    public struct Capabilities: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// Mutual authentication: the client's `authenticate` carries a client nonce after its
        /// MAC, and the daemon's `welcome` ends with the daemon's proof of the same token
        /// (`Authenticator.daemonProof`), so a client never hands pages to a daemon that does
        /// not hold the tenant's token. Without the bit, version 1's one-way handshake.
        public static let mutualAuthentication = Capabilities(rawValue: 1 << 0)
        /// One-sided RMA through libfabric: a client sets it when it can move pages by
        /// `fi_read`/`fi_write`; a daemon echoes it when it serves RMA. With the bit agreed the
        /// `welcome` ends with the daemon's fabric provider and address (`Welcome.fabric`) and
        /// each `mapSlab` reply carries the slab's memory-region grant (`MapReply.grant`).
        /// Page data may still travel as `read`/`write` frames on the same connection.
        public static let rma = Capabilities(rawValue: 1 << 1)
        /// What this build understands.
        public static let supported: Capabilities = [.mutualAuthentication, .rma]
    }

    public struct Hello: Equatable, Sendable {
        public var minimumVersion: UInt8
        public var maximumVersion: UInt8
        public var capabilities: UInt32
        public var tenant: String

        public init(minimumVersion: UInt8 = WireProtocol.minimumVersion, maximumVersion: UInt8 = WireProtocol.maximumVersion,
                    capabilities: UInt32 = 0, tenant: String)
        {
            self.minimumVersion = minimumVersion
            self.maximumVersion = maximumVersion
            self.capabilities = capabilities
            self.tenant = tenant
        }

        public func encode() -> [UInt8] {
            var writer = WireWriter()
            writer.write(minimumVersion)
            writer.write(maximumVersion)
            writer.write(capabilities)
            writer.write(string: tenant)
            return writer.bytes
        }

        public static func decode(_ reader: inout WireReader) -> Hello? {
            guard let low = reader.read(UInt8.self), let high = reader.read(UInt8.self), low <= high,
                  let capabilities = reader.read(UInt32.self), let tenant = reader.readString(), tenant.utf8.count <= 256
            else { return nil }
            return Hello(minimumVersion: low, maximumVersion: high, capabilities: capabilities, tenant: tenant)
        }
    }

    public struct Challenge: Equatable, Sendable {
        public var version: UInt8
        public var authenticationRequired: Bool
        public var capabilities: UInt32
        public var nonce: [UInt8]
        public static let nonceSize = 32

        public init(version: UInt8, authenticationRequired: Bool, capabilities: UInt32, nonce: [UInt8]) {
            self.version = version
            self.authenticationRequired = authenticationRequired
            self.capabilities = capabilities
            self.nonce = nonce
        }

        public func encode() -> [UInt8] {
            var writer = WireWriter()
            writer.write(version)
            writer.write(UInt8(authenticationRequired ? 1 : 0))
            writer.write(capabilities)
            writer.write(bytes: nonce)
            return writer.bytes
        }

        public static func decode(_ reader: inout WireReader) -> Challenge? {
            guard let version = reader.read(UInt8.self), let required = reader.read(UInt8.self), required <= 1,
                  let capabilities = reader.read(UInt32.self), let nonce = reader.readBytes(nonceSize)
            else { return nil }
            return Challenge(version: version, authenticationRequired: required == 1, capabilities: capabilities, nonce: nonce)
        }
    }

    /// The client's proof: HMAC-SHA256(token, "spillway-auth-v1" ‖ nonce ‖ tenant); with
    /// mutual authentication, followed by the client's own 32-byte nonce for the daemon to sign.
    public struct Authenticate: Equatable, Sendable {
        public var mac: [UInt8]
        public var clientNonce: [UInt8]?
        public static let macSize = 32

        public init(mac: [UInt8], clientNonce: [UInt8]? = nil) {
            self.mac = mac
            self.clientNonce = clientNonce
        }

        public func encode() -> [UInt8] { mac + (clientNonce ?? []) }

        public static func decode(_ reader: inout WireReader) -> Authenticate? {
            guard let mac = reader.readBytes(macSize) else { return nil }
            // Version 1 without mutual authentication ends here; anything else must be a nonce.
            if reader.remaining == 0 { return Authenticate(mac: mac) }
            guard let nonce = reader.readBytes(Challenge.nonceSize), reader.remaining == 0 else { return nil }
            return Authenticate(mac: mac, clientNonce: nonce)
        }
    }

    public struct Welcome: Equatable, Sendable {
        public var slabSize: UInt64
        public var capacity: UInt64
        public var freeSlabs: UInt32
        /// Slabs this tenant already holds (kept through a disconnect, within the lease).
        public var heldSlabs: [UInt32]
        public var daemonInstance: UInt64
        /// With mutual authentication: the daemon's proof (`Authenticator.daemonProof`) that it
        /// holds the tenant's token, binding both nonces and `daemonInstance`.
        public var daemonProof: [UInt8]?
        /// With `Capabilities.rma` agreed: the daemon's libfabric provider name and endpoint
        /// address (`fi_getname`), appended after the proof.
        public var fabric: FabricAdvert?
        /// Most slab ids one welcome lists: the daemon refuses to map more to one tenant, so a
        /// welcome always fits in a frame's meta section.
        public static let maxHeldSlabs = (WireProtocol.maxMetaLength - 64) / 4

        public init(slabSize: UInt64, capacity: UInt64, freeSlabs: UInt32, heldSlabs: [UInt32], daemonInstance: UInt64,
                    daemonProof: [UInt8]? = nil, fabric: FabricAdvert? = nil)
        {
            self.fabric = fabric
            self.slabSize = slabSize
            self.capacity = capacity
            self.freeSlabs = freeSlabs
            self.heldSlabs = heldSlabs
            self.daemonInstance = daemonInstance
            self.daemonProof = daemonProof
        }

        public func encode() -> [UInt8] {
            var writer = WireWriter()
            writer.write(slabSize)
            writer.write(capacity)
            writer.write(freeSlabs)
            writer.write(daemonInstance)
            writer.write(UInt32(heldSlabs.count))
            for slab in heldSlabs { writer.write(slab) }
            if let daemonProof { writer.write(bytes: daemonProof) }
            if let fabric {
                writer.write(string: fabric.provider)
                writer.write(UInt16(fabric.address.count))
                writer.write(bytes: fabric.address)
            }
            return writer.bytes
        }

        /// Decodes a welcome given the capabilities agreed in the challenge: with `.rma` the
        /// proof is present exactly when mutual authentication was agreed, and the fabric
        /// advert follows it.
        public static func decode(_ reader: inout WireReader, agreed: Capabilities) -> Welcome? {
            guard agreed.contains(.rma) else { return decode(&reader) }
            guard var welcome = decodeFixedPart(&reader) else { return nil }
            if agreed.contains(.mutualAuthentication) {
                guard let bytes = reader.readBytes(Authenticate.macSize) else { return nil }
                welcome.daemonProof = bytes
            }
            guard let provider = reader.readString(), provider.utf8.count <= 64,
                  let length = reader.read(UInt16.self), length <= 1024, let address = reader.readBytes(Int(length)),
                  reader.remaining == 0
            else { return nil }
            welcome.fabric = FabricAdvert(provider: provider, address: address)
            return welcome
        }

        public static func decode(_ reader: inout WireReader) -> Welcome? {
            guard var welcome = decodeFixedPart(&reader) else { return nil }
            if reader.remaining > 0 {
                guard let bytes = reader.readBytes(Authenticate.macSize), reader.remaining == 0 else { return nil }
                welcome.daemonProof = bytes
            }
            return welcome
        }

        /// The part every welcome starts with: sizes, instance and the held slabs (bounded by
        /// what the frame holds before anything is allocated).
        private static func decodeFixedPart(_ reader: inout WireReader) -> Welcome? {
            guard let slabSize = reader.read(UInt64.self), let capacity = reader.read(UInt64.self),
                  let free = reader.read(UInt32.self), let instance = reader.read(UInt64.self),
                  let count = reader.read(UInt32.self), Int(count) * 4 <= reader.remaining
            else { return nil }
            var held: [UInt32] = []
            for _ in 0..<count {
                guard let slab = reader.read(UInt32.self) else { return nil }
                held.append(slab)
            }
            return Welcome(slabSize: slabSize, capacity: capacity, freeSlabs: free, heldSlabs: held, daemonInstance: instance)
        }
    }

    /// A daemon's libfabric endpoint as a welcome advertises it.
    public struct FabricAdvert: Equatable, Sendable {
        public var provider: String
        public var address: [UInt8]

        public init(provider: String, address: [UInt8]) {
            self.provider = provider
            self.address = address
        }
    }

    /// The `mapSlab` reply: the slab id, and with `Capabilities.rma` agreed the memory-region
    /// grant the daemon registered for this tenant and slab (base, length, key; 24 bytes
    /// appended). A reply without a grant is the 4-byte form of every earlier version.
    public struct MapReply: Equatable, Sendable {
        public var slab: UInt32
        public var grantBase: UInt64
        public var grantLength: UInt64
        public var grantKey: UInt64
        public var hasGrant: Bool

        public init(slab: UInt32, grant: (base: UInt64, length: UInt64, key: UInt64)? = nil) {
            self.slab = slab
            grantBase = grant?.base ?? 0
            grantLength = grant?.length ?? 0
            grantKey = grant?.key ?? 0
            hasGrant = grant != nil
        }

        public func encode() -> [UInt8] {
            var writer = WireWriter()
            writer.write(slab)
            if hasGrant {
                writer.write(grantBase)
                writer.write(grantLength)
                writer.write(grantKey)
            }
            return writer.bytes
        }

        public static func decode(_ reader: inout WireReader) -> MapReply? {
            guard let slab = reader.read(UInt32.self) else { return nil }
            if reader.remaining == 0 { return MapReply(slab: slab) }
            guard let base = reader.read(UInt64.self), let length = reader.read(UInt64.self), let key = reader.read(UInt64.self),
                  reader.remaining == 0
            else { return nil }
            return MapReply(slab: slab, grant: (base, length, key))
        }
    }

    /// A batched read or write: up to `maxBatchItems` ranges; the data section is their bytes
    /// back to back.
    public static func decodeBatch(_ reader: inout WireReader) -> [SlabRange]? {
        var ranges = [SlabRange](repeating: SlabRange(slab: 0, offset: 0, length: 0), count: WireProtocol.maxBatchItems)
        guard let count = ranges.withUnsafeMutableBufferPointer({ decodeBatch(&reader, into: $0) }) else { return nil }
        ranges.removeLast(ranges.count - count)
        return ranges
    }

    /// A batch's ranges decoded into `ranges` (room for `WireProtocol.maxBatchItems`), without
    /// allocating; their count, or nil if the batch is malformed, too long, or over
    /// `WireProtocol.maxDataLength` in total.
    public static func decodeBatch(_ reader: inout WireReader, into ranges: UnsafeMutableBufferPointer<SlabRange>) -> Int? {
        guard let count = reader.read(UInt16.self), Int(count) <= min(WireProtocol.maxBatchItems, ranges.count),
              Int(count) * SlabRange.encodedSize <= reader.remaining
        else { return nil }
        var total = 0
        for index in 0..<Int(count) {
            guard let range = SlabRange.decode(&reader) else { return nil }
            total += Int(range.length)
            guard total <= WireProtocol.maxDataLength else { return nil }
            ranges[index] = range
        }
        return Int(count)
    }

    public static func encodeBatch(_ ranges: [SlabRange]) -> [UInt8] {
        var writer = WireWriter(capacity: 2 + ranges.count * SlabRange.encodedSize)
        writer.write(UInt16(ranges.count))
        for range in ranges { range.encode(into: &writer) }
        return writer.bytes
    }

    public struct Reclaim: Equatable, Sendable {
        public var slab: UInt32
        public var deadlineMilliseconds: UInt32

        public init(slab: UInt32, deadlineMilliseconds: UInt32) {
            self.slab = slab
            self.deadlineMilliseconds = deadlineMilliseconds
        }

        public func encode() -> [UInt8] {
            var writer = WireWriter()
            writer.write(slab)
            writer.write(deadlineMilliseconds)
            return writer.bytes
        }

        public static func decode(_ reader: inout WireReader) -> Reclaim? {
            guard let slab = reader.read(UInt32.self), let deadline = reader.read(UInt32.self) else { return nil }
            return Reclaim(slab: slab, deadlineMilliseconds: deadline)
        }
    }

    public struct ErrorReply: Equatable, Sendable, Error {
        public var code: WireErrorCode
        public var message: String

        public init(_ code: WireErrorCode, _ message: String) {
            self.code = code
            self.message = message
        }

        public func encode() -> [UInt8] {
            var writer = WireWriter()
            writer.write(code.rawValue)
            writer.write(string: message)
            return writer.bytes
        }

        public static func decode(_ reader: inout WireReader) -> ErrorReply? {
            guard let raw = reader.read(UInt16.self), let code = WireErrorCode(rawValue: raw), let message = reader.readString()
            else { return nil }
            return ErrorReply(code, message)
        }
    }

    public static func encodeSlab(_ slab: UInt32) -> [UInt8] {
        var writer = WireWriter()
        writer.write(slab)
        return writer.bytes
    }
}

extension WireProtocol {
    /// Decodes anything a peer could send, the way the daemon and client do, and discards the
    /// result: the libFuzzer target (tools/fuzz-protocol.sh) calls this with arbitrary bytes.
    /// Returns how many frames decoded completely.
    @discardableResult
    public static func decodeEverything(_ bytes: UnsafeRawBufferPointer) -> Int {
        var cursor = 0
        var frames = 0
        while bytes.count - cursor >= headerSize {
            let rest = UnsafeRawBufferPointer(rebasing: bytes[cursor...])
            guard case .success(let header) = FrameHeader.decode(rest) else { return frames }
            let payloadLength = header.metaLength + header.dataLength
            guard rest.count - headerSize >= payloadLength else { return frames }
            let payload = UnsafeRawBufferPointer(rebasing: rest[headerSize..<(headerSize + payloadLength)])
            guard WireChecksum.crc32c(payload) == header.payloadChecksum else { return frames }
            var reader = WireReader(UnsafeRawBufferPointer(rebasing: payload[0..<header.metaLength]))
            switch header.opcode {
            case .hello: _ = Wire.Hello.decode(&reader)
            case .challenge: _ = Wire.Challenge.decode(&reader)
            case .authenticate: _ = Wire.Authenticate.decode(&reader)
            case .welcome:
                var copy = reader
                _ = Wire.Welcome.decode(&reader)
                _ = Wire.Welcome.decode(&copy, agreed: [.mutualAuthentication, .rma])
            case .read, .write, .corruptForTest: _ = Wire.SlabRange.decode(&reader)
            case .readBatch, .writeBatch: _ = Wire.decodeBatch(&reader)
            case .reclaim: _ = Wire.Reclaim.decode(&reader)
            case .error: _ = Wire.ErrorReply.decode(&reader)
            case .mapSlab: _ = Wire.MapReply.decode(&reader)
            case .unmapSlab: _ = reader.read(UInt32.self)
            case .goodbye: _ = reader.readString()
            case .heartbeat, .stats: _ = reader.readBytes(reader.remaining)
            }
            frames += 1
            cursor += headerSize + payloadLength
        }
        return frames
    }
}
