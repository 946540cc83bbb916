import SpillwayTestSupport
import Testing
@testable import SpillwayCore
@testable import SpillwayErasure

/// Splits of `length` bytes, filled from a seed.
func randomSplits(_ count: Int, _ length: Int, seed: UInt64) -> [[UInt8]] {
    var state = seed
    return (0..<count).map { _ in
        (0..<length).map { _ in
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return UInt8(truncatingIfNeeded: state >> 33)
        }
    }
}

/// Copies `arrays` into C memory, runs `body` on the pointer array, copies back.
func withPointers<R>(_ arrays: inout [[UInt8]], _ body: (UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>) -> R) -> R {
    let pointers = UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>.allocate(capacity: max(1, arrays.count))
    let buffers = arrays.map { array -> UnsafeMutablePointer<UInt8> in
        let buffer = UnsafeMutablePointer<UInt8>.allocate(capacity: max(1, array.count))
        buffer.initialize(from: array, count: array.count)
        return buffer
    }
    defer {
        for buffer in buffers { buffer.deallocate() }
        pointers.deallocate()
    }
    for (index, buffer) in buffers.enumerated() { pointers[index] = buffer }
    let result = body(pointers)
    for index in arrays.indices { arrays[index] = Array(UnsafeBufferPointer(start: buffers[index], count: arrays[index].count)) }
    return result
}

@Suite struct ReedSolomonTests {
    @Test(arguments: [(4, 2), (6, 3), (10, 4), (2, 1)])
    func anyKOfTheSplitsRebuildTheOthers(k: Int, r: Int) throws {
        let code = try ReedSolomonCode(k: k, r: r)
        let length = 1024
        // All randomness (split bytes, which patterns, which sources) from one seed, named
        // in every failure message.
        let seed = TestSeed.derive(UInt64(k * 31 + r))
        var random = SplitMix64(seed: seed)
        var data = randomSplits(k, length, seed: random.next())
        var parity = [[UInt8]](repeating: [UInt8](repeating: 0, count: length), count: r)
        withPointers(&data) { dataPointers in withPointers(&parity) { code.encode(data: dataPointers, parity: $0, length: length) } }
        let all = data + parity
        // Every erasure pattern of up to r splits (sampled for the bigger codes).
        var patterns: [[Int]] = []
        func choose(_ start: Int, _ picked: [Int]) {
            if !picked.isEmpty { patterns.append(picked) }
            guard picked.count < r else { return }
            for index in start..<(k + r) { choose(index + 1, picked + [index]) }
        }
        choose(0, [])
        if patterns.count > 400 { patterns = Array(patterns.shuffled(using: &random).prefix(400)) }
        for lost in patterns {
            let available = (0..<(k + r)).filter { !lost.contains($0) }
            let sources = Array(available.shuffled(using: &random).prefix(k)).sorted()
            let plan = try #require(code.plan(sources: sources, targets: lost), "seed \(seed)")
            var sourceBytes = plan.sources.map { all[$0] }
            var rebuilt = [[UInt8]](repeating: [UInt8](repeating: 0xEE, count: length), count: plan.targets.count)
            withPointers(&sourceBytes) { s in withPointers(&rebuilt) { code.decode(plan, sources: s, targets: $0, length: length) } }
            for (position, target) in plan.targets.enumerated() {
                #expect(rebuilt[position] == all[target], "RS(\(k),\(r)) lost \(lost) sources \(sources): split \(target) differs (seed \(seed))")
            }
        }
        #expect(code.cachedPlans > 0)
    }

    @Test func impossiblePatternsAndParametersAreRefused() throws {
        let code = try ReedSolomonCode(k: 4, r: 2)
        #expect(code.plan(sources: [0, 1, 2], targets: [3]) == nil)         // fewer than k sources
        #expect(code.plan(sources: [0, 1, 2, 3], targets: [3]) == nil)      // a target is a source
        #expect(code.plan(sources: [0, 1, 2, 9], targets: [3]) == nil)      // out of range
        #expect(code.plan(sources: [0, 0, 1, 2], targets: [3]) == nil)      // duplicate
        #expect(throws: SpillwayError.self) { _ = try ReedSolomonCode(k: 0, r: 2) }
        #expect(throws: SpillwayError.self) { _ = try ReedSolomonCode(k: 30, r: 4) }
    }
}
