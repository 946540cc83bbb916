// libFuzzer entry point for the wire-protocol decoder (built by tools/fuzz-protocol.sh).
//
// Each input is decoded twice: as is (the header CRC32C rejects almost everything), and with
// its CRC32Cs repaired, so the fuzzer reaches the length checks and every field decoder
// behind them instead of stopping at the checksum. The handshake messages must also round
// trip (what decodes re-encodes to something that decodes the same), and the input as a
// tenant name must serialize into one well-formed JSON string (the `stats` reply's path).
@_cdecl("LLVMFuzzerTestOneInput")
public func spillwayFuzzProtocol(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    _ = WireProtocol.decodeEverything(input)
    checkHandshakeRoundTrips(input)
    checkStatsString(input)
    guard size >= WireProtocol.headerSize else { return 0 }
    let copy = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
    defer { copy.deallocate() }
    copy.copyMemory(from: data, byteCount: size)
    // Force a valid magic (the version, opcode, flags and lengths stay the fuzzer's) and clamp
    // the lengths into the input so the payload CRC32C can be repaired.
    copy.storeBytes(of: WireProtocol.magic.littleEndian, toByteOffset: 0, as: UInt32.self)
    let available = size - WireProtocol.headerSize
    let meta = min(Int(UInt32(littleEndian: copy.loadUnaligned(fromByteOffset: 16, as: UInt32.self))), available)
    let dataLength = min(Int(UInt32(littleEndian: copy.loadUnaligned(fromByteOffset: 20, as: UInt32.self))), available - meta)
    copy.storeBytes(of: UInt32(meta).littleEndian, toByteOffset: 16, as: UInt32.self)
    copy.storeBytes(of: UInt32(dataLength).littleEndian, toByteOffset: 20, as: UInt32.self)
    let payload = WireChecksum.crc32c(UnsafeRawBufferPointer(start: copy + WireProtocol.headerSize, count: meta + dataLength))
    copy.storeBytes(of: payload.littleEndian, toByteOffset: 24, as: UInt32.self)
    copy.storeBytes(of: WireChecksum.crc32c(UnsafeRawBufferPointer(start: copy, count: 28)).littleEndian, toByteOffset: 28, as: UInt32.self)
    _ = WireProtocol.decodeEverything(UnsafeRawBufferPointer(start: copy, count: size))
    return 0
}

/// Every handshake field decoder: decode(encode(decode(x))) == decode(x).
func checkHandshakeRoundTrips(_ input: UnsafeRawBufferPointer) {
    func roundTrip<T: Equatable>(_ decoder: (inout WireReader) -> T?, _ encode: (T) -> [UInt8], _ name: String) {
        var reader = WireReader(input)
        guard let value = decoder(&reader) else { return }
        let again = WireReader.decode(encode(value), with: decoder)
        if again != value { fatalError("\(name) does not round-trip") }
    }
    roundTrip(Wire.Hello.decode, { $0.encode() }, "hello")
    roundTrip(Wire.Challenge.decode, { $0.encode() }, "challenge")
    roundTrip(Wire.Authenticate.decode, { $0.encode() }, "authenticate")
    roundTrip(Wire.Welcome.decode, { $0.encode() }, "welcome")
    roundTrip(Wire.ErrorReply.decode, { $0.encode() }, "error")
    roundTrip(Wire.Reclaim.decode, { $0.encode() }, "reclaim")
    roundTrip(Wire.decodeBatch, { Wire.encodeBatch($0) }, "batch")
}

/// The input as a tenant name in a `stats` reply: one JSON string, no raw control characters,
/// exactly two unescaped quotes.
func checkStatsString(_ input: UnsafeRawBufferPointer) {
    let name = String(decoding: input.prefix(300), as: UTF8.self)
    let json = JSONValue.object([("name", .string(name))]).serialized()
    var quotes = 0
    var escaped = false
    for scalar in json.unicodeScalars {
        if scalar.value < 0x20 { fatalError("raw control character in stats JSON") }
        if escaped { escaped = false; continue }
        if scalar == "\\" { escaped = true } else if scalar == "\"" { quotes += 1 }
    }
    if quotes != 4 || escaped { fatalError("stats JSON string is not well formed: \(json)") }
}
