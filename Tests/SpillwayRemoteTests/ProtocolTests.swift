import Logging
import Testing
import SpillwayCore
@testable import SpillwayProtocol
@testable import SpillwayRemote
import SpillwayTestSupport

private func header(_ mutate: (UnsafeMutableRawPointer) -> Void = { _ in }, fixCRC: Bool = true) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: WireProtocol.headerSize)
    bytes.withUnsafeMutableBytes { raw in
        FrameHeader(opcode: .read, requestID: 7, metaLength: 16, dataLength: 0, payloadChecksum: 0).encode(into: raw.baseAddress!)
        mutate(raw.baseAddress!)
        if fixCRC {
            raw.storeBytes(of: WireChecksum.crc32c(UnsafeRawBufferPointer(rebasing: raw[0..<28])).littleEndian, toByteOffset: 28, as: UInt32.self)
        }
    }
    return bytes
}

private func decode(_ bytes: [UInt8]) -> Result<FrameHeader, FrameError> {
    bytes.withUnsafeBytes { FrameHeader.decode($0) }
}

@Suite struct ProtocolTests {
    @Test func headerRoundTrips() throws {
        let decoded = try decode(header()).get()
        #expect(decoded == FrameHeader(opcode: .read, requestID: 7, metaLength: 16, dataLength: 0, payloadChecksum: 0))
    }

    @Test func everyMalformedHeaderIsRejected() {
        #expect(decode(Array(header().prefix(20))) == .failure(.truncated))
        #expect(decode(header { $0.storeBytes(of: UInt32(0xDEAD_BEEF), as: UInt32.self) }) == .failure(.badMagic(0xDEAD_BEEF)))
        #expect(decode(header({ $0.storeBytes(of: UInt8(9), toByteOffset: 5, as: UInt8.self) }, fixCRC: false)) == .failure(.badHeaderChecksum))
        #expect(decode(header { $0.storeBytes(of: UInt8(99), toByteOffset: 4, as: UInt8.self) }) == .failure(.unsupportedVersion(99)))
        #expect(decode(header { $0.storeBytes(of: UInt8(200), toByteOffset: 5, as: UInt8.self) }) == .failure(.unknownOpcode(200)))
        #expect(decode(header { $0.storeBytes(of: UInt32(1 << 30), toByteOffset: 16, as: UInt32.self) }) == .failure(.metaTooLong(1 << 30)))
        #expect(decode(header { $0.storeBytes(of: UInt32.max, toByteOffset: 20, as: UInt32.self) }) == .failure(.dataTooLong(Int(UInt32.max))))
    }

    @Test func fieldDecodersRefuseTruncationAndAbsurdCounts() {
        var writer = WireWriter()
        writer.write(UInt16(3))  // three ranges announced, one present
        Wire.SlabRange(slab: 1, offset: 0, length: 4096).encode(into: &writer)
        writer.bytes.withUnsafeBytes { raw in
            var reader = WireReader(raw)
            #expect(Wire.decodeBatch(&reader) == nil)
        }
        let hello = Wire.Hello(tenant: "alice").encode()
        for cut in 0..<hello.count {
            Array(hello.prefix(cut)).withUnsafeBytes { raw in
                var reader = WireReader(raw)
                #expect(Wire.Hello.decode(&reader) == nil)
            }
        }
        hello.withUnsafeBytes { raw in
            var reader = WireReader(raw)
            #expect(Wire.Hello.decode(&reader) == Wire.Hello(tenant: "alice"))
        }
    }

    @Test func arbitraryBytesNeverCrashTheDecoderAndSealedFramesAlwaysDecode() {
        // Valid frames with random mutations plus pure noise; the fuzzer (tools/fuzz-protocol.sh)
        // runs millions of these, this keeps a few thousand in every test run. Half the
        // mutated frames are re-sealed (valid magic, version, opcode, CRC32Cs), so they must
        // decode as exactly one frame whatever their fields say; the rest may decode at most
        // as many frames as fit in them.
        let seed = TestSeed.derive(1)
        var generator = SplitMix(seed: seed)
        var sealedDecoded = 0
        for round in 0..<20_000 {
            let metaLength = Int(generator.next() % 96)
            var bytes = [UInt8](repeating: 0, count: WireProtocol.headerSize + metaLength)
            for index in WireProtocol.headerSize..<bytes.count { bytes[index] = UInt8(truncatingIfNeeded: generator.next()) }
            let opcode = Opcode.allCases[Int(generator.next() % UInt64(Opcode.allCases.count))]
            let sealed = round % 2 == 0
            bytes.withUnsafeMutableBytes { raw in
                let payload = WireChecksum.crc32c(UnsafeRawBufferPointer(rebasing: raw[WireProtocol.headerSize...]))
                FrameHeader(opcode: opcode, requestID: generator.next(), metaLength: metaLength, dataLength: 0,
                            payloadChecksum: payload).encode(into: raw.baseAddress!)
                if !sealed {
                    for _ in 0..<3 { raw[Int(generator.next() % UInt64(raw.count))] = UInt8(truncatingIfNeeded: generator.next()) }
                }
            }
            let frames = bytes.withUnsafeBytes { WireProtocol.decodeEverything($0) }
            if sealed {
                #expect(frames == 1, "round \(round): a sealed \(opcode) frame did not decode; \(TestSeed.note(seed))")
                if frames == 1 { sealedDecoded += 1 }
            } else {
                #expect(frames <= 1, "round \(round): \(frames) frames out of \(bytes.count) bytes; \(TestSeed.note(seed))")
            }
        }
        #expect(sealedDecoded == 10_000)
    }

    @Test func handshakeMessagesRoundTripAndMutualFieldsAreOptional() {
        let nonce = [UInt8](repeating: 9, count: 32)
        let plain = Wire.Authenticate(mac: nonce)
        let mutual = Wire.Authenticate(mac: nonce, clientNonce: [UInt8](repeating: 4, count: 32))
        #expect(WireReader.decode(plain.encode(), with: Wire.Authenticate.decode) == plain)
        #expect(WireReader.decode(mutual.encode(), with: Wire.Authenticate.decode) == mutual)
        #expect(WireReader.decode(plain.encode() + [1, 2, 3], with: Wire.Authenticate.decode) == nil)
        let welcome = Wire.Welcome(slabSize: 1 << 20, capacity: 1 << 30, freeSlabs: 3, heldSlabs: [4, 5], daemonInstance: 77)
        var proven = welcome
        proven.daemonProof = nonce
        #expect(WireReader.decode(welcome.encode(), with: Wire.Welcome.decode) == welcome)
        #expect(WireReader.decode(proven.encode(), with: Wire.Welcome.decode) == proven)
        #expect(WireReader.decode(welcome.encode() + [1], with: Wire.Welcome.decode) == nil)
        let hello = Wire.Hello(capabilities: Wire.Capabilities.mutualAuthentication.rawValue, tenant: "alice")
        #expect(WireReader.decode(hello.encode(), with: Wire.Hello.decode) == hello)
        // The daemon's proof binds every input and differs from the client's.
        let token = Array("abcdefghijklmnop".utf8)
        let proof = Authenticator.daemonProof(token: token, clientNonce: nonce, daemonNonce: nonce, tenant: "alice", instance: 1)
        #expect(proof != Authenticator.daemonProof(token: token, clientNonce: nonce, daemonNonce: nonce, tenant: "alice", instance: 2))
        #expect(proof != Authenticator.proof(token: token, nonce: nonce, tenant: "alice"))
    }

    @Test func tokenFilesFollowTheStatedRules() throws {
        let file = try TokenFile.parse("# tenants\r\n\nalice\tabcdefghijklmnop1234\r\n  bob   0123456789abcdef# trailing comment\n")
        #expect(file.names == ["alice", "bob"])
        #expect(file.tokens["bob"] == Array("0123456789abcdef".utf8))
        #expect(throws: SpillwayError.self) { try TokenFile.parse("alice short") }
        #expect(throws: SpillwayError.self) { try TokenFile.parse("alice abcdefghijklmnop extra") }
        #expect(throws: SpillwayError.self) { try TokenFile.parse("# nothing\n") }
        #expect(throws: SpillwayError.self) { try TokenFile.parse("alice abcdefghijklmnop\u{7F}") }
        let admins = try TokenFile.parse("root abcdefghijklmnop1234 admin\nalice abcdefghijklmnop5678\n")
        #expect(admins.admins == ["root"])
        #expect(try TokenFile.parse(admins.text) == admins)
        #expect(throws: SpillwayError.self) { try TokenFile.parse("root abcdefghijklmnop1234 superuser") }
        #expect(throws: SpillwayError.self) { try TokenFile.parse("ro\u{01}ot abcdefghijklmnop1234") }
    }

    @Test func proofsDependOnTokenNonceAndTenant() {
        let token = Array("abcdefghijklmnop".utf8)
        let nonce = Authenticator.nonce()
        let proof = Authenticator.proof(token: token, nonce: nonce, tenant: "alice")
        #expect(Authenticator.constantTimeEqual(proof, Authenticator.proof(token: token, nonce: nonce, tenant: "alice")))
        #expect(!Authenticator.constantTimeEqual(proof, Authenticator.proof(token: token, nonce: nonce, tenant: "bob")))
        #expect(!Authenticator.constantTimeEqual(proof, Authenticator.proof(token: token, nonce: Authenticator.nonce(), tenant: "alice")))
        #expect(!Authenticator.constantTimeEqual(proof, Authenticator.proof(token: Array("abcdefghijklmnoq".utf8), nonce: nonce, tenant: "alice")))
    }
}

struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite struct TransportSelectionTests {
    @Test func rdmaIsDetectedThroughLibibverbsAndTheFallbackToTCPIsExplicit() throws {
        // Asks libibverbs for devices for real. These machines have none; on a machine with
        // one, the fallback reason changes (this build has no verbs transport yet).
        let devices = TransportSelection.rdmaDevices()
        let (probed, reason) = TransportSelection.probe
        #expect(probed == devices)
        #expect(reason == TransportSelection.fallbackReason(devices: devices))
        // Both branches, whatever this machine has.
        #expect(TransportSelection.fallbackReason(devices: []) == "no-rdma-device")
        #expect(TransportSelection.fallbackReason(devices: ["mlx5_0"]) == "verbs-transport-not-built")
        #expect(TransportSelection.choose(for: "test", logger: Logger(label: "test")) == "tcp")
    }
}
