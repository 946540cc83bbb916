import Foundation
import SpillwayCore

/// A Mooncake-format KV trace (one JSON object per line: `timestamp`, `input_length`,
/// `output_length`, `hash_ids`), flattened for replay: every request's block ids in order in
/// one array, and each request's range in it. The ids are chained prefix hashes (equal id =
/// equal prefix up to and including that block), so the block before an id in its request is
/// its parent in the prefix tree.
public struct BlockTrace: Sendable {
    public struct Request: Sendable, Equatable {
        public var timestamp: Double
        public var inputLength: Int
        public var outputLength: Int
        /// This request's block ids: `references[blocks]`.
        public var blocks: Range<Int>
    }

    public private(set) var requests: [Request] = []
    public private(set) var references: [UInt64] = []
    public private(set) var uniqueBlocks = 0

    public init() {}

    public func hashIDs(of request: Request) -> ArraySlice<UInt64> { references[request.blocks] }

    /// The record as the file spells it; unknown keys are ignored, `hash_ids` is required and
    /// must hold non-negative integers (JSONDecoder rejects fractions, negatives, strings).
    private struct Record: Decodable {
        var timestamp: Double?
        var input_length: Int?
        var output_length: Int?
        var hash_ids: [UInt64]
    }

    /// Parses trace text. Blank lines are skipped; any other line that is not a trace record
    /// is an error naming `source` and its 1-based line number. `limit` stops after that many
    /// requests.
    public static func parse(_ text: String, source: String = "trace", limit: Int? = nil) throws(SpillwayError) -> BlockTrace {
        var trace = BlockTrace()
        var seen = Set<UInt64>()
        let decoder = JSONDecoder()
        var lineNumber = 0
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            if let limit, trace.requests.count >= limit { break }
            if line.allSatisfy({ $0.isWhitespace }) { continue }
            let record: Record
            do {
                record = try decoder.decode(Record.self, from: Data(line.utf8))
            } catch {
                throw .invalidArgument("\(source):\(lineNumber): not a trace record (\(describe(error)))")
            }
            if let input = record.input_length, input < 0 { throw .invalidArgument("\(source):\(lineNumber): negative input_length") }
            if let output = record.output_length, output < 0 { throw .invalidArgument("\(source):\(lineNumber): negative output_length") }
            if let timestamp = record.timestamp, !timestamp.isFinite { throw .invalidArgument("\(source):\(lineNumber): bad timestamp") }
            let start = trace.references.count
            trace.references.append(contentsOf: record.hash_ids)
            for id in record.hash_ids { seen.insert(id) }
            trace.requests.append(Request(timestamp: record.timestamp ?? 0, inputLength: record.input_length ?? record.hash_ids.count * 512,
                                          outputLength: record.output_length ?? 0, blocks: start..<trace.references.count))
        }
        trace.uniqueBlocks = seen.count
        return trace
    }

    public static func load(_ path: String, limit: Int? = nil) throws(SpillwayError) -> BlockTrace {
        guard let data = FileManager.default.contents(atPath: path) else { throw .invalidArgument("cannot read trace \(path)") }
        guard let text = String(data: data, encoding: .utf8) else { throw .invalidArgument("\(path): not UTF-8 text") }
        return try parse(text, source: path, limit: limit)
    }

    /// A one-line reason from a DecodingError (its default description is a multi-line dump).
    private static func describe(_ error: any Error) -> String {
        switch error as? DecodingError {
        case .keyNotFound(let key, _): return "needs \(key.stringValue)"
        case .typeMismatch(_, let context), .valueNotFound(_, let context):
            let path = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: "")
            return "wrong type at \(path.isEmpty ? "top level" : path)"
        case .dataCorrupted(let context):
            let path = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: "")
            return path.isEmpty ? "not valid JSON" : "bad value at \(path)"
        default: return "not valid JSON"
        }
    }
}
