import Foundation
import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// One tensor of a safetensors file.
public struct TensorInfo: Sendable, Equatable {
    public var name: String
    public var dtype: String
    public var shape: [Int]
    /// Byte range within the file (absolute, not relative to the data section).
    public var fileOffset: Int
    public var byteCount: Int
    /// The transformer layer it belongs to (`…layers.N.…`, `…h.N.…`, `…blocks.N.…`), or nil
    /// for shared tensors (embeddings, final norm, LM head).
    public var layer: Int?
}

/// A parsed safetensors file (https://github.com/huggingface/safetensors, "Format"): an
/// 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
/// `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the byte after the
/// header) plus an optional `__metadata__` map of strings, then the data.
///
/// Everything is checked: the header fits the file and a limit, every tensor's dtype is
/// known, its byte count equals shape × dtype size, its range lies inside the data section,
/// and ranges do not overlap. A malformed file is an `invalidArgument` naming the problem.
public struct SafetensorsFile: Sendable {
    public let path: String
    public let fileSize: Int
    public let dataOffset: Int
    public let tensors: [TensorInfo]
    public let metadata: [String: String]

    public static let maximumHeaderBytes = 100 << 20
    public static let dtypeSizes: [String: Int] = [
        "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8,
        "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    ]

    public init(path: String) throws(SpillwayError) {
        self.path = path
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw .invalidArgument("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0 else { throw .invalidArgument("cannot stat \(path)") }
        fileSize = Int(status.st_size)
        guard fileSize >= 8 else { throw .invalidArgument("\(path): \(fileSize) bytes is too short for a safetensors file") }
        var lengthBytes = [UInt8](repeating: 0, count: 8)
        guard pread(descriptor, &lengthBytes, 8, 0) == 8 else { throw .invalidArgument("\(path): cannot read the header length") }
        let rawLength = lengthBytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        let headerLength = rawLength > UInt64(Int.max) ? Int.max : Int(rawLength)
        guard headerLength > 0, headerLength <= Self.maximumHeaderBytes, headerLength <= fileSize - 8 else {
            throw .invalidArgument("\(path): header length \(headerLength) does not fit the file (\(fileSize) bytes) or the \(Self.maximumHeaderBytes)-byte limit")
        }
        var header = [UInt8](repeating: 0, count: headerLength)
        guard pread(descriptor, &header, headerLength, 8) == headerLength else { throw .invalidArgument("\(path): short read of the header") }
        dataOffset = 8 + headerLength
        let parsed = try Self.parse(header, path: path, dataOffset: dataOffset, fileSize: fileSize)
        tensors = parsed.tensors
        metadata = parsed.metadata
    }

    static func parse(_ header: [UInt8], path: String, dataOffset: Int, fileSize: Int) throws(SpillwayError)
        -> (tensors: [TensorInfo], metadata: [String: String])
    {
        guard let object = try? JSONSerialization.jsonObject(with: Data(header)) as? [String: Any] else {
            throw .invalidArgument("\(path): the header is not a JSON object")
        }
        var tensors: [TensorInfo] = []
        var metadata: [String: String] = [:]
        for (name, value) in object {
            if name == "__metadata__" {
                guard let map = value as? [String: Any] else { throw .invalidArgument("\(path): __metadata__ is not an object") }
                for (key, entry) in map {
                    guard let text = entry as? String else { throw .invalidArgument("\(path): __metadata__.\(key) is not a string") }
                    metadata[key] = text
                }
                continue
            }
            guard let entry = value as? [String: Any], let dtype = entry["dtype"] as? String,
                  let shapeValues = entry["shape"] as? [Any], let offsets = entry["data_offsets"] as? [Any], offsets.count == 2
            else { throw .invalidArgument("\(path): tensor '\(name)' lacks dtype, shape or data_offsets") }
            guard let size = dtypeSizes[dtype] else { throw .invalidArgument("\(path): tensor '\(name)' has unknown dtype \(dtype)") }
            var shape: [Int] = []
            for dimension in shapeValues {
                guard let number = dimension as? NSNumber, number.int64Value >= 0, number.int64Value <= Int64(Int32.max) else {
                    throw .invalidArgument("\(path): tensor '\(name)' has a bad shape")
                }
                shape.append(number.intValue)
            }
            guard let begin = (offsets[0] as? NSNumber)?.int64Value, let end = (offsets[1] as? NSNumber)?.int64Value,
                  begin >= 0, end >= begin, end <= Int64(fileSize - dataOffset)
            else { throw .invalidArgument("\(path): tensor '\(name)' data_offsets lie outside the data section") }
            var elements = 1
            for dimension in shape {
                let (product, overflow) = elements.multipliedReportingOverflow(by: dimension)
                guard !overflow else { throw .invalidArgument("\(path): tensor '\(name)' shape overflows") }
                elements = product
            }
            guard Int64(elements) * Int64(size) == end - begin else {
                throw .invalidArgument("\(path): tensor '\(name)' has \(end - begin) bytes, its shape \(shape) × \(dtype) needs \(elements * size)")
            }
            tensors.append(TensorInfo(name: name, dtype: dtype, shape: shape, fileOffset: dataOffset + Int(begin),
                                      byteCount: Int(end - begin), layer: layerIndex(name)))
        }
        tensors.sort { $0.fileOffset < $1.fileOffset }
        for index in tensors.indices.dropFirst() where tensors[index].fileOffset < tensors[index - 1].fileOffset + tensors[index - 1].byteCount {
            throw .invalidArgument("\(path): tensors '\(tensors[index - 1].name)' and '\(tensors[index].name)' overlap")
        }
        return (tensors, metadata)
    }

    /// The layer number in a tensor name: the number after `layers.`, `h.`, `blocks.` or
    /// `layer.` (the conventions of Llama/Mistral, GPT-2, BLOOM/Falcon and BERT checkpoints).
    static func layerIndex(_ name: String) -> Int? {
        let parts = name.split(separator: ".")
        for (index, part) in parts.enumerated() where index + 1 < parts.count {
            if ["layers", "h", "blocks", "layer"].contains(part), let number = Int(parts[index + 1]) { return number }
        }
        return nil
    }

    /// Layers present, ascending.
    public var layers: [Int] { Array(Set(tensors.compactMap(\.layer))).sorted() }

    /// Writes a safetensors file (tests and the weights benchmark's synthetic model):
    /// tensors in the given order, each filled by `fill(name, buffer)`.
    public static func write(path: String, tensors: [(name: String, dtype: String, shape: [Int])],
                             metadata: [String: String] = [:], fill: (String, UnsafeMutableRawBufferPointer) -> Void) throws(SpillwayError)
    {
        var entries: [String: Any] = [:]
        if !metadata.isEmpty { entries["__metadata__"] = metadata }
        var offset = 0
        var layout: [(String, Int, Int)] = []
        for tensor in tensors {
            guard let size = dtypeSizes[tensor.dtype] else { throw .invalidArgument("unknown dtype \(tensor.dtype)") }
            let bytes = tensor.shape.reduce(1, *) * size
            entries[tensor.name] = ["dtype": tensor.dtype, "shape": tensor.shape, "data_offsets": [offset, offset + bytes]] as [String: Any]
            layout.append((tensor.name, offset, bytes))
            offset += bytes
        }
        guard var header = try? JSONSerialization.data(withJSONObject: entries, options: [.sortedKeys]) else {
            throw .invalidArgument("cannot encode the header")
        }
        // Pad the header with spaces to a multiple of 8 bytes (as the reference writer does).
        while header.count % 8 != 0 { header.append(0x20) }
        let descriptor = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard descriptor >= 0 else { throw .invalidArgument("cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(descriptor) }
        var length = UInt64(header.count).littleEndian
        var written = withUnsafeBytes(of: &length) { pwrite(descriptor, $0.baseAddress, 8, 0) }
        written += header.withUnsafeBytes { pwrite(descriptor, $0.baseAddress, header.count, 8) }
        guard written == 8 + header.count else { throw .invalidArgument("short write of \(path)") }
        let base = 8 + header.count
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 64)
        defer { buffer.deallocate() }
        for (name, start, bytes) in layout {
            var done = 0
            let whole = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, bytes), alignment: 64)
            defer { whole.deallocate() }
            fill(name, UnsafeMutableRawBufferPointer(rebasing: whole[0..<bytes]))
            while done < bytes {
                let piece = min(chunk, bytes - done)
                guard pwrite(descriptor, whole.baseAddress! + done, piece, off_t(base + start + done)) == piece else {
                    throw .invalidArgument("short write of \(path)")
                }
                done += piece
            }
        }
    }
}
