import SpillwayCore
import SpillwayTestSupport
import Testing
@testable import SpillwayPolicy

/// Runs `kind` over a synthetic stream (20 000 accesses, a 256-page cache unless told).
func evaluate(_ prefetcher: any PrefetchPolicy, _ kind: SyntheticStream, seed: UInt64, accesses: Int = 20_000,
              cacheSize: Int = 256) -> PrefetchEvaluationResult
{
    PrefetchEvaluation.run(prefetcher: prefetcher, stream: kind.generate(seed: seed, accesses: accesses), cacheSize: cacheSize)
}

func describe(_ result: PrefetchEvaluationResult) -> String {
    "\(result.prefetcher) on \(result.stream): accuracy \(result.accuracy), coverage \(result.coverage), issued \(result.issued) of \(result.accesses) accesses"
}

@Suite struct PrefetcherTests {
    /// Stride 4 with 20 % random accesses: the majority vote keeps the stride through the noise;
    /// next-N fetches the three pages between strides, and the last delta is wrong after every
    /// random access.
    @Test func leapFindsAStrideThroughNoiseWhereTheBaselinesFail() {
        for round in 0..<3 {
            let seed = TestSeed.derive(500 + UInt64(round))
            let leap = evaluate(LeapPrefetcher(), .noisyStrided, seed: seed)
            let nextN = evaluate(NextNPrefetcher(), .noisyStrided, seed: seed)
            let lastDelta = evaluate(LeapPrefetcher(detection: .lastDelta), .noisyStrided, seed: seed)
            #expect(leap.accuracy > 0.9, "\(describe(leap)); \(TestSeed.note(seed))")
            // 20 % of accesses are random: at most about 80 % of misses can be covered.
            #expect(leap.coverage > 0.7, "\(describe(leap)); \(TestSeed.note(seed))")
            #expect(nextN.accuracy < 0.3, "\(describe(nextN)); \(TestSeed.note(seed))")
            #expect(lastDelta.accuracy < 0.6, "\(describe(lastDelta)); \(TestSeed.note(seed))")
            #expect(leap.issued < nextN.issued / 4, "leap \(leap.issued) vs next-N \(nextN.issued) fetches; \(TestSeed.note(seed))")
        }
    }

    /// The trend needs a strict majority: deltas 3 3 5 7 (3 is half of the last four) give
    /// none; one more 3 makes it 3 of the last five.
    @Test func aTrendNeedsAStrictMajority() {
        let leap = LeapPrefetcher()
        var plan = PrefetchPlan()
        for position: Int64 in [0, 3, 6, 11, 18] { leap.recordAccess(stream: 1, position: position, outcome: .miss, into: &plan) }
        #expect(leap.trend(of: 1) == nil && plan.isEmpty)
        leap.recordAccess(stream: 1, position: 21, outcome: .miss, into: &plan)
        #expect(leap.trend(of: 1) == 3 && Array(plan) == [24], "\(Array(plan))")
    }

    @Test func randomStreamsIssueAlmostNothing() {
        for round in 0..<5 {
            let seed = TestSeed.derive(600 + UInt64(round))
            let leap = evaluate(LeapPrefetcher(), .random, seed: seed)
            #expect(leap.issued * 20 < leap.accesses, "\(describe(leap)); \(TestSeed.note(seed))")
        }
    }

    /// A sequential stream interleaved with a random one (separate ids): the random stream
    /// must not drag accuracy down, nor disturb the sequential one.
    @Test func aRandomStreamBesideASequentialOneKeepsAccuracy() {
        let seed = TestSeed.derive(650)
        var random = SplitMix64(seed: seed)
        var accesses: [PageAccess] = []
        var next: Int64 = 0
        for _ in 0..<20_000 {
            if random.next() % 2 == 0 {
                accesses.append(PageAccess(stream: 1, position: next))
                next += 1
            } else {
                accesses.append(PageAccess(stream: 2, position: Int64(random.next() % (1 << 20))))
            }
        }
        let result = PrefetchEvaluation.run(prefetcher: LeapPrefetcher(), stream: PageStream(name: "mixed", accesses: accesses), cacheSize: 256)
        #expect(result.accuracy > 0.95, "\(describe(result)); \(TestSeed.note(seed))")
        #expect(result.useful > Int(next) * 95 / 100, "\(describe(result)): sequential pages \(next); \(TestSeed.note(seed))")
    }

    /// Every prefetched page hit: the window doubles up to the maximum. Then the prefetches
    /// are lost (reported as misses): it halves down to 1. Then random accesses: no trend and
    /// the window decays to 0.
    @Test func windowGrowsOnHitsAndShrinksOnLosses() {
        let leap = LeapPrefetcher(maxWindow: 16)
        var plan = PrefetchPlan()
        var asked = Set<Int64>()
        var windows: [Int] = []
        for position in Int64(0)..<40 {
            leap.recordAccess(stream: 7, position: position, outcome: asked.contains(position) ? .prefetchHit : .miss, into: &plan)
            asked.formUnion(plan)
            windows.append(leap.window(of: 7) ?? -1)
        }
        #expect(windows.last == 16, "\(windows)")
        #expect(zip(windows, windows.dropFirst()).allSatisfy { $0 <= $1 }, "never shrinks while every prefetch hits: \(windows)")
        #expect(windows.prefix(8).contains { $0 > 1 && $0 < 16 }, "grows in steps: \(windows)")
        #expect(leap.trend(of: 7) == 1)

        windows = []
        for position in Int64(40)..<50 {
            leap.recordAccess(stream: 7, position: position, outcome: .miss, into: &plan)
            windows.append(leap.window(of: 7) ?? -1)
        }
        #expect(windows.prefix(4) == [8, 4, 2, 1], "halves on each lost prefetch: \(windows)")

        var random = SplitMix64(seed: TestSeed.derive(700))
        for _ in 0..<40 {
            leap.recordAccess(stream: 7, position: Int64(random.next() % (1 << 30)), outcome: .miss, into: &plan)
        }
        #expect(leap.window(of: 7) == 0 && leap.trend(of: 7) == nil, "window \(String(describing: leap.window(of: 7))); \(TestSeed.note(TestSeed.derive(700)))")
        #expect(plan.isEmpty)
    }

    /// A cache too small for the full window loses prefetches; the ceiling keeps the window
    /// where the cache holds it instead of oscillating.
    @Test func aSmallCacheCapsTheWindow() {
        let leap = evaluate(LeapPrefetcher(), .sequential, seed: 0, cacheSize: 16)
        #expect(leap.accuracy > 0.75 && leap.coverage > 0.9, "\(describe(leap))")
    }

    /// Four streams (strides 1, 2, -1, 3) under their own ids, accessed in random order: each
    /// trend is found. Under one id the same accesses have no majority delta.
    @Test func interleavedStreamsAreSeparatedById() {
        let seed = TestSeed.derive(800)
        let leap = LeapPrefetcher()
        let stream = SyntheticStream.interleaved.generate(seed: seed, accesses: 20_000)
        let result = PrefetchEvaluation.run(prefetcher: leap, stream: stream, cacheSize: 256)
        #expect(result.coverage > 0.95 && result.accuracy > 0.95, "\(describe(result)); \(TestSeed.note(seed))")
        #expect([1, 2, 3, 4].map { leap.trend(of: $0) } == [1, 2, -1, 3])

        let merged = PageStream(name: "one-id", accesses: stream.accesses.map { PageAccess(stream: 0, position: $0.position) })
        let blind = PrefetchEvaluation.run(prefetcher: LeapPrefetcher(), stream: merged, cacheSize: 256)
        #expect(blind.coverage < 0.2, "\(describe(blind)); \(TestSeed.note(seed))")
    }

    /// Floors for Leap on every synthetic stream (256-page cache, 20 000 accesses).
    @Test(arguments: SyntheticStream.allCases)
    func leapMeetsItsFloors(kind: SyntheticStream) {
        let floors: (accuracy: Double, coverage: Double) = switch kind {
        case .sequential, .strided, .reverse: (0.95, 0.95)
        case .interleaved: (0.9, 0.95)
        case .weights: (0.9, 0.95)
        // Each layer's run ends after a request's last block; the window reaching past it
        // is wasted.
        case .perLayerKV: (0.6, 0.9)
        case .random: (0, 0)
        case .noisySequential, .noisyStrided: (0.9, 0.7)
        }
        for round in 0..<2 {
            let seed = TestSeed.derive(900 + UInt64(round))
            let leap = evaluate(LeapPrefetcher(), kind, seed: seed)
            #expect(leap.accuracy >= floors.accuracy, "\(describe(leap)); \(TestSeed.note(seed))")
            #expect(leap.coverage >= floors.coverage, "\(describe(leap)); \(TestSeed.note(seed))")
            if kind == .random { #expect(leap.issued * 20 < leap.accesses, "\(describe(leap)); \(TestSeed.note(seed))") }
        }
    }

    /// Next-N is the right tool only for forward dense streams.
    @Test func nextNCoversSequentialButNotReverse() {
        let sequential = evaluate(NextNPrefetcher(), .sequential, seed: 0)
        let reverse = evaluate(NextNPrefetcher(), .reverse, seed: 0)
        #expect(sequential.coverage > 0.99 && sequential.accuracy > 0.99, "\(describe(sequential))")
        #expect(reverse.coverage < 0.01, "\(describe(reverse))")
        // One new position per access once the run is going, not `depth`.
        #expect(sequential.asked < sequential.accesses + 16, "\(describe(sequential))")
    }

    /// With 16 slots, a 17th stream takes the least recently used one.
    @Test func streamSlotsAreReclaimedLeastRecentlyUsedFirst() {
        let leap = LeapPrefetcher(streamSlots: 16)
        var plan = PrefetchPlan()
        for stream in UInt64(0)..<16 { leap.recordAccess(stream: stream, position: 0, outcome: .miss, into: &plan) }
        leap.recordAccess(stream: 0, position: 1, outcome: .miss, into: &plan)  // 0 is recent again; 1 is the oldest
        leap.recordAccess(stream: 99, position: 0, outcome: .miss, into: &plan)
        #expect(leap.window(of: 1) == nil)
        #expect(leap.window(of: 0) != nil && leap.window(of: 2) != nil && leap.window(of: 99) != nil)
    }

    /// A plan smaller than the window: the run continues from where the last plan stopped.
    @Test func aSmallPlanLimitsEachAnswerButNotTheRun() {
        let leap = LeapPrefetcher(maxWindow: 16)
        var plan = PrefetchPlan(capacity: 4)
        var asked: [Int64] = []
        var largest = 0
        for position in Int64(0)..<200 {
            leap.recordAccess(stream: 1, position: position, outcome: asked.contains(position) ? .prefetchHit : .miss, into: &plan)
            largest = max(largest, plan.count)
            asked.append(contentsOf: plan)
        }
        #expect(largest == 4)
        #expect(Set(asked).count == asked.count, "no position asked twice")
        #expect(leap.counters.demandMisses <= 4 && leap.counters.useful >= 196, "\(leap.counters)")
        #expect(leap.counters.issued == asked.count)
    }

    /// Runs towards 0 stop at 0, runs near Int64.max stop before overflowing, and huge jumps
    /// (whose deltas overflow) are noise, not traps.
    @Test func positionsStayInRange() {
        let leap = LeapPrefetcher()
        var plan = PrefetchPlan()
        for position in stride(from: Int64(20), through: 0, by: -1) {
            leap.recordAccess(stream: 1, position: position, outcome: .miss, into: &plan)
            #expect(plan.allSatisfy { $0 >= 0 && $0 < position })
        }
        for position in (Int64.max - 10)...Int64.max {
            leap.recordAccess(stream: 2, position: position, outcome: .miss, into: &plan)
            #expect(plan.allSatisfy { $0 > position })
        }
        for position in [Int64.min, Int64.max, Int64.min, 0, Int64.max, Int64.min + 1, Int64.max - 1] {
            leap.recordAccess(stream: 3, position: position, outcome: .miss, into: &plan)
        }
        let nextN = NextNPrefetcher()
        nextN.recordAccess(stream: 1, position: Int64.max - 2, outcome: .miss, into: &plan)
        #expect(plan.isEmpty || plan.allSatisfy { $0 > Int64.max - 2 })
    }

    /// The prefetcher's own counters agree with what the evaluation saw.
    @Test func countersMatchTheEvaluation() {
        let leap = LeapPrefetcher()
        let result = evaluate(leap, .noisySequential, seed: TestSeed.derive(1000))
        #expect(leap.counters.useful == result.useful && leap.counters.demandMisses == result.demandMisses)
        #expect(leap.counters.accesses == result.accesses && leap.counters.issued == result.asked)
        #expect(result.asked >= result.issued)
    }

    @Test func reportCoversEveryStreamAndPrefetcher() throws {
        let rows = PrefetchEvaluation.report(accesses: 2_000)
        #expect(rows.count == SyntheticStream.allCases.count * PrefetcherKind.allCases.count)
        let table = PrefetchEvaluation.table(rows)
        #expect(table.split(separator: "\n").count == rows.count + 1)
        #expect(table.contains("noisy-strided") && table.contains("leap") && table.contains("coverage"))
        #expect(rows.filter { $0.prefetcher == "none" }.allSatisfy { $0.issued == 0 && $0.coverage == 0 })
        #expect(throws: SpillwayError.self) { _ = try PrefetcherKind(name: "oracle") }
        #expect(PrefetchEvaluation.fixed(0.5) == "0.500" && PrefetchEvaluation.fixed(1) == "1.000" && PrefetchEvaluation.fixed(0.0125) == "0.013")
    }
}
