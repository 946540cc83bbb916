import Foundation
import SpillwayTestSupport
import Testing
@testable import SpillwayBench

/// `spillway bench kv`: the JSON it prints and the errors it gives (no timing assertions).
@Suite(.serialized, .timeLimit(.minutes(5))) struct KVBenchCommandTests {
    @Test func presetsArePinned() throws {
        let expected: [(String, Int, Int)] = [("llama-3-8b", 65_536, 32 * 65_536), ("llama-3-70b", 65_536, 80 * 65_536), ("qwen2.5-7b", 32_768, 28 * 32_768)]
        for (name, layerBytes, blockBytes) in expected {
            let geometry = try KVBenchGeometry.resolve(name)
            #expect(geometry.tokensPerBlock == 16 && geometry.dtype == "bf16", "\(name)")
            #expect(geometry.layerBytes == layerBytes, "\(name)")
            #expect(geometry.blockBytes == blockBytes, "\(name)")
            #expect(geometry.slotSize == layerBytes, "\(name): one layer page per slot")
        }
    }

    func benchKV(_ arguments: [String]) throws -> [String: Any] {
        let result = try runSpillway(["bench", "kv"] + arguments)
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.hasSuffix("}\n"))
        #expect(result.stdout.filter { $0 == "\n" }.count == 1, "exactly one line: \(result.stdout)")
        return try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
    }

    func checkSchema(_ object: [String: Any], tier: String, geometry: String, layerBytes: Int, blockBytes: Int) {
        #expect(object["tier"] as? String == tier)
        #expect(object["geometry"] as? String == geometry)
        #expect(object["layer_bytes"] as? Int == layerBytes)
        #expect(object["block_bytes"] as? Int == blockBytes)
        for key in ["save_bytes_per_s", "load_bytes_per_s"] {
            let value = (object[key] as? Double) ?? (object[key] as? Int).map(Double.init)
            #expect((value ?? 0) > 0, "\(key) must be a positive number")
        }
        let latency = object["layer_latency_ns"] as? [String: Any]
        for key in ["p50", "p99"] { #expect((latency?[key] as? Int ?? 0) > 0, "layer_latency_ns.\(key) must be a positive integer") }
        #expect(object["errors"] as? Int == 0)
        #expect((object["verified_layers"] as? Int ?? 0) > 0, "loaded layers are checked")
    }

    @Test func qwenOnDRAMPrintsOneObject() throws {
        let object = try benchKV(["--geometry", "qwen2.5-7b", "--tier", "dram", "--working-set", "64m", "--duration", "0.3", "--json"])
        checkSchema(object, tier: "dram", geometry: "qwen2.5-7b", layerBytes: 32_768, blockBytes: 28 * 32_768)
        #expect(object["working_set_bytes"] as? Int == (64 << 20) / (28 * 32_768) * 28 * 32_768)
    }

    @Test func customGeometryRuns() throws {
        let object = try benchKV(["--geometry", "custom", "--tokens-per-block", "16", "--layers", "4", "--kv-heads", "2",
                                  "--head-dim", "64", "--dtype", "fp16", "--tier", "dram", "--working-set", "1m",
                                  "--duration", "0.1", "--json"])
        // 2 (K and V) × 16 tokens × 2 heads × 64 × 2 B = 8192 B per layer; 4 layers.
        checkSchema(object, tier: "dram", geometry: "custom", layerBytes: 8192, blockBytes: 4 * 8192)
    }

    @Test(arguments: [
        (["--geometry", "custom", "--tokens-per-block", "0", "--layers", "32", "--kv-heads", "8", "--head-dim", "128"], "--tokens-per-block 0 must be between 1 and 4096"),
        (["--geometry", "custom", "--tokens-per-block", "16", "--layers", "32", "--head-dim", "128"], "--geometry custom needs --kv-heads"),
        (["--geometry", "custom", "--tokens-per-block", "16", "--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--dtype", "fp8"], "--dtype 'fp8' (fp16 or bf16)"),
        (["--geometry", "custom", "--tokens-per-block", "4096", "--layers", "32", "--kv-heads", "1024", "--head-dim", "1024"], "at most 16777216"),
        (["--geometry", "llama-3-9b"], "--geometry 'llama-3-9b' (one of llama-3-8b, llama-3-70b, qwen2.5-7b, custom)"),
        (["--geometry", "llama-3-8b", "--layers", "4"], "go with --geometry custom"),
        (["--geometry", "llama-3-8b", "--working-set", "2m"], "must hold at least 2 blocks of 2097152 bytes"),
        (["--geometry", "qwen2.5-7b", "--tier", "floppy", "--working-set", "2m"], "--tier 'floppy'"),
    ])
    func badArgumentsFailClearly(arguments: [String], message: String) throws {
        let result = try runSpillway(["bench", "kv", "--json", "--duration", "0.1"] + arguments)
        #expect(result.status != 0)
        #expect(result.stdout.isEmpty)
        #expect(result.stderr.contains(message), "stderr: \(result.stderr)")
    }
}
