/// Bounds-checked reading of a frame's meta fields: every read checks the remaining length
/// first and fails with `nil` instead of reading past the buffer.
public struct WireReader {
    private let bytes: UnsafeRawBufferPointer
    public private(set) var offset = 0

    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    public var remaining: Int { bytes.count - offset }

    public mutating func read<T: FixedWidthInteger>(_: T.Type) -> T? {
        let size = MemoryLayout<T>.size
        guard remaining >= size, let base = bytes.baseAddress else { return nil }
        defer { offset += size }
        return T(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: T.self))
    }

    public mutating func readBytes(_ count: Int) -> [UInt8]? {
        guard count >= 0, remaining >= count else { return nil }
        defer { offset += count }
        return Array(UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + count)]))
    }

    /// Runs one field decoder (e.g. `Wire.Hello.decode`) over a received meta section.
    public static func decode<T>(_ bytes: [UInt8], with decoder: (inout WireReader) -> T?) -> T? {
        bytes.withUnsafeBytes { raw in
            var reader = WireReader(raw)
            return decoder(&reader)
        }
    }

    /// A string prefixed by its UInt16 length; nil if truncated or not UTF-8.
    public mutating func readString() -> String? {
        guard let count = read(UInt16.self), let raw = readBytes(Int(count)) else { return nil }
        return String(validating: raw, as: UTF8.self)
    }
}

/// Builds a frame's meta fields.
public struct WireWriter {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }

    public mutating func write<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    public mutating func write(bytes more: some Collection<UInt8>) { bytes.append(contentsOf: more) }

    public mutating func write(string: String) {
        let utf8 = Array(string.utf8.prefix(Int(UInt16.max)))
        write(UInt16(utf8.count))
        bytes.append(contentsOf: utf8)
    }
}
