// libFuzzer entry point for the wire-protocol decoder (built by tools/fuzz-protocol.sh).
//
// Each input is decoded twice: as is (the header CRC32C rejects almost everything), and with
// its CRC32Cs repaired, so the fuzzer reaches the length checks and every field decoder
// behind them instead of stopping at the checksum.
@_cdecl("LLVMFuzzerTestOneInput")
public func spillwayFuzzProtocol(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    _ = WireProtocol.decodeEverything(UnsafeRawBufferPointer(start: data, count: size))
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
