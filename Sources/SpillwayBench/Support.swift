import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// Monotonic nanoseconds (vDSO `clock_gettime`, ~20 ns).
@inline(__always)
public func monotonicNanoseconds() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_MONOTONIC, &spec)
    return UInt64(spec.tv_sec) &* 1_000_000_000 &+ UInt64(spec.tv_nsec)
}

/// A minimal JSON value with a deterministic serializer: integers stay integers, doubles are
/// printed with enough digits, keys keep insertion order.
public indirect enum JSONValue: Sendable, Equatable {
    case int(Int)
    case double(Double)
    case string(String)
    case bool(Bool)
    case array([JSONValue])
    case object([(String, JSONValue)])

    public static func == (lhs: JSONValue, rhs: JSONValue) -> Bool { lhs.serialized() == rhs.serialized() }

    public func serialized() -> String {
        var out = ""
        write(into: &out)
        return out
    }

    private func write(into out: inout String) {
        switch self {
        case .int(let value): out += String(value)
        case .double(let value):
            if value.isFinite {
                out += value == value.rounded() && abs(value) < 1e15 ? String(format1: value) : "\(value)"
            } else {
                out += "0"
            }
        case .string(let value): Self.writeString(value, into: &out)
        case .bool(let value): out += value ? "true" : "false"
        case .array(let values):
            out += "["
            for (index, value) in values.enumerated() {
                if index > 0 { out += ", " }
                value.write(into: &out)
            }
            out += "]"
        case .object(let members):
            out += "{"
            for (index, member) in members.enumerated() {
                if index > 0 { out += ", " }
                Self.writeString(member.0, into: &out)
                out += ": "
                member.1.write(into: &out)
            }
            out += "}"
        }
    }

    private static func writeString(_ value: String, into out: inout String) {
        out += "\""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        out += "\""
    }
}

extension String {
    /// "12.0" for whole doubles, so a float field always looks like a float.
    init(format1 value: Double) { self = "\(Int(value)).0" }
}

/// A one-line progress bar on stderr, drawn only when stderr is a terminal.
public final class ProgressBar {
    private let label: String
    private let enabled: Bool
    private var lastDraw: UInt64 = 0

    public init(label: String) {
        self.label = label
        enabled = isatty(STDERR_FILENO) != 0
    }

    /// `fraction` in 0…1; redraws at most every 100 ms.
    public func update(fraction: Double, detail: String) {
        guard enabled else { return }
        let now = monotonicNanoseconds()
        guard now - lastDraw > 100_000_000 else { return }
        lastDraw = now
        let width = 30
        let filled = max(0, min(width, Int(fraction * Double(width))))
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        writeFully(STDERR_FILENO, "\r\(label) [\(bar)] \(Int(fraction * 100))% \(detail)\u{1B}[K")
    }

    public func finish() {
        guard enabled else { return }
        writeFully(STDERR_FILENO, "\r\u{1B}[K")
    }
}

