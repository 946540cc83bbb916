import Testing
@testable import Spillway
@testable import SpillwayBench
@testable import SpillwayPolicy
@testable import SpillwayRemote
import SpillwayTestSupport

// The text decoders added by the hardening and policy work (trace lines, the soak's ack log,
// token files) meet files a person or a crash wrote. Random mutations of valid inputs must
// give a result or a typed error that says where, never a trap. (The wire protocol has its
// libFuzzer target: tools/fuzz-protocol.sh.)

/// Valid text with a few random bytes replaced, inserted or deleted.
private func mutate(_ text: String, _ generator: inout SplitMix64) -> String {
    var bytes = Array(text.utf8)
    for _ in 0..<Int(generator.next() % 4 + 1) {
        let position = bytes.isEmpty ? 0 : Int(generator.next() % UInt64(bytes.count))
        let byte = [UInt8(ascii: "\n"), UInt8(ascii: " "), UInt8(ascii: "\""), UInt8(ascii: "9"), UInt8(ascii: "-"),
                    UInt8(ascii: "{"), 0, 0xFF, UInt8(truncatingIfNeeded: generator.next())][Int(generator.next() % 9)]
        switch generator.next() % 3 {
        case 0 where !bytes.isEmpty: bytes[position] = byte
        case 1: bytes.insert(byte, at: position)
        default: if !bytes.isEmpty { bytes.remove(at: position) }
        }
    }
    return String(decoding: bytes, as: UTF8.self)
}

@Suite struct DecoderFuzzTests {
    @Test func traceLinesParseOrNameTheLine() {
        let seed = TestSeed.derive(41)
        var generator = SplitMix64(seed: seed)
        let valid = """
        {"timestamp": 0, "input_length": 1024, "output_length": 10, "hash_ids": [1, 2]}
        {"timestamp": 5, "input_length": 1536, "output_length": 3, "hash_ids": [1, 2, 3]}

        {"timestamp": 9, "input_length": 512, "output_length": 1, "hash_ids": [7]}
        """
        for round in 0..<3000 {
            let text = mutate(valid, &generator)
            do {
                let trace = try BlockTrace.parse(text, source: "t")
                #expect(trace.requests.count <= 4, "round \(round); \(TestSeed.note(seed))")
            } catch {
                guard case .invalidArgument(let reason) = error else {
                    Issue.record("round \(round): \(error); \(TestSeed.note(seed))")
                    continue
                }
                #expect(reason.hasPrefix("t:"), "round \(round): '\(reason)' names no line; \(TestSeed.note(seed))")
            }
        }
    }

    @Test func ackLogsParseOrNameTheLine() {
        let seed = TestSeed.derive(42)
        var generator = SplitMix64(seed: seed)
        let valid = "put 1 1\nput 2 1\nremove 1\nput 1 2\nput 3 7\n"
        for round in 0..<3000 {
            let text = mutate(valid, &generator)
            do {
                _ = try StoreSoak.parseAckLog(text)
            } catch {
                guard case .invalidArgument(let reason) = error else {
                    Issue.record("round \(round): \(error); \(TestSeed.note(seed))")
                    continue
                }
                #expect(reason.hasPrefix("ack log line "), "round \(round): '\(reason)'; \(TestSeed.note(seed))")
            }
        }
    }

    @Test func tokenFilesParseOrNameTheLine() {
        let seed = TestSeed.derive(43)
        var generator = SplitMix64(seed: seed)
        let valid = "# tenants\nalice abcdefghijklmnop1234\nroot 0123456789abcdef0123 admin\n"
        for round in 0..<3000 {
            let text = mutate(valid, &generator)
            do {
                let file = try TokenFile.parse(text, source: "tokens")
                #expect(!file.names.isEmpty && file.names.allSatisfy { file.tokens[$0] != nil }, "round \(round); \(TestSeed.note(seed))")
            } catch {
                guard case .invalidConfiguration(let reason) = error else {
                    Issue.record("round \(round): \(error); \(TestSeed.note(seed))")
                    continue
                }
                #expect(reason.hasPrefix("tokens"), "round \(round): '\(reason)'; \(TestSeed.note(seed))")
            }
        }
    }
}
