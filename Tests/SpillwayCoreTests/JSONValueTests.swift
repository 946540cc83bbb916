import Testing
@testable import SpillwayCore

@Suite struct JSONValueParseTests {
    @Test func parsesEveryKindAndRoundTripsThroughTheSerializer() throws {
        let text = #"{"a": 1, "b": [true, false, null, -2.5, 1e3], "c": "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00", "d": {}, "e": [], "f": -0}"#
        let value = try JSONValue.parse(text)
        #expect(value["a"]?.intValue == 1)
        #expect(value["b"]?.arrayValue?.count == 5)
        #expect(value["b"]?.arrayValue?[2] == .null)
        #expect(value["b"]?.arrayValue?[3] == .double(-2.5))
        #expect(value["b"]?.arrayValue?[4] == .double(1000))
        #expect(value["c"]?.stringValue == "x\"\\/\u{8}\u{c}\n\r\té😀")
        #expect(value["d"]?.objectValue?.isEmpty == true)
        #expect(value["f"]?.intValue == 0)
        #expect(value["missing"] == nil)
        // The serializer's output parses back to the same value.
        #expect(try JSONValue.parse(value.serialized()) == value)
        #expect(try JSONValue.parse("  \n\"s\"\t ") == .string("s"))
        #expect(try JSONValue.parse("9223372036854775807") == .int(Int.max))
        #expect(try JSONValue.parse("9223372036854775808") == .double(9223372036854775808))
    }

    @Test(arguments: [
        "", " ", "{", "[", "[1,]", "{\"a\":1,}", "{a:1}", "{\"a\" 1}", "01", "-", "1.", ".5", "1e", "+1",
        "NaN", "Infinity", "tru", "nul", "[1 2]", "\"abc", "\"\\x\"", "\"\\u12\"", "\"\\ud800\"", "\"\\udc00\"",
        "\"\\ud800\\u0041\"", "\"a\u{1}b\"", "1 2", "{} x", "// c\n1", "'a'", "1e999",
    ])
    func rejectsMalformedInput(_ text: String) {
        #expect(throws: JSONParseError.self) { try JSONValue.parse(text) }
    }

    @Test func rejectsInvalidUTF8AndReportsTheOffset() throws {
        let bytes: [UInt8] = Array("[\"ok\", \"".utf8) + [0xC3, 0x28] + Array("\"]".utf8)
        #expect(throws: JSONParseError.self) { try JSONValue.parse(bytes) }
        do {
            _ = try JSONValue.parse("[1, x]")
            Issue.record("parsed an invalid document")
        } catch {
            #expect(error.offset == 4)
        }
    }

    @Test func nestingIsBounded() throws {
        let ok = String(repeating: "[", count: 64) + String(repeating: "]", count: 64)
        #expect(try JSONValue.parse(ok).arrayValue != nil)
        let deep = String(repeating: "[", count: 65) + String(repeating: "]", count: 65)
        #expect(throws: JSONParseError.self) { try JSONValue.parse(deep) }
        // A hostile depth far past the limit fails fast instead of overflowing the stack.
        let hostile = String(repeating: "{\"a\":", count: 100_000)
        #expect(throws: JSONParseError.self) { try JSONValue.parse(hostile) }
        #expect(throws: JSONParseError.self) { try JSONValue.parse(Array("[1]".utf8), maxBytes: 2) }
    }
}
