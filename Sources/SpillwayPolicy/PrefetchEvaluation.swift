import SpillwayCore

/// The prefetchers the evaluation knows, by report name.
public enum PrefetcherKind: String, CaseIterable, Sendable {
    case none
    case nextN = "next-n"
    case lastDelta = "last-delta"
    case leap

    public static var names: String { allCases.map(\.rawValue).joined(separator: ", ") }

    public init(name: String) throws(SpillwayError) {
        guard let kind = PrefetcherKind(rawValue: name) else { throw .invalidArgument("unknown prefetcher '\(name)' (one of \(Self.names))") }
        self = kind
    }

    public func make() -> any PrefetchPolicy {
        switch self {
        case .none: NoPrefetcher()
        case .nextN: NextNPrefetcher()
        case .lastDelta: LeapPrefetcher(detection: .lastDelta)
        case .leap: LeapPrefetcher()
        }
    }
}

/// How a prefetcher did on one stream with one cache size.
public struct PrefetchEvaluationResult: Sendable, Equatable {
    public var stream: String
    public var prefetcher: String
    public var cacheSize: Int
    public var accesses: Int
    /// Pages fetched because a plan asked for them (positions already resident are not fetched
    /// and not counted).
    public var issued: Int
    /// Prefetched pages accessed before being evicted.
    public var useful: Int
    /// Accesses that had to fetch the page on demand.
    public var demandMisses: Int
    /// Positions the prefetcher put in plans (≥ issued).
    public var asked: Int

    /// useful / issued (0 when nothing was issued).
    public var accuracy: Double { issued == 0 ? 0 : Double(useful) / Double(issued) }
    /// useful / (useful + demand misses): the share of the misses without prefetching that a
    /// prefetch served.
    public var coverage: Double { useful + demandMisses == 0 ? 0 : Double(useful) / Double(useful + demandMisses) }
    /// Fetches issued per access: the extra traffic.
    public var issuedPerAccess: Double { accesses == 0 ? 0 : Double(issued) / Double(accesses) }

    public var json: JSONValue {
        .object([
            ("stream", .string(stream)), ("prefetcher", .string(prefetcher)), ("cache_pages", .int(cacheSize)),
            ("accesses", .int(accesses)), ("issued", .int(issued)), ("useful", .int(useful)),
            ("demand_misses", .int(demandMisses)), ("asked", .int(asked)),
            ("accuracy", .double(accuracy)), ("coverage", .double(coverage)),
        ])
    }
}

/// Replays a page stream against a small LRU cache with a prefetcher in front: each access is
/// a hit, a first hit on a prefetched page (useful), or a demand miss (fetched and inserted);
/// then the prefetcher's plan is fetched into the cache, skipping pages already there.
///
/// Fetches are instant: this measures what a prefetcher guesses (accuracy) and how much of
/// the miss traffic it covers, not whether it fetches early enough (timeliness depends on
/// tier latencies and belongs to a store benchmark).
public enum PrefetchEvaluation {
    /// Default report parameters: accesses per stream and cache size in pages.
    public static let defaultAccesses = 20_000
    public static let defaultCachePages = 256
    public static let defaultSeed: UInt64 = 0x5EED_5EED

    public static func run(prefetcher: any PrefetchPolicy, stream: PageStream, cacheSize: Int, planCapacity: Int = 16) -> PrefetchEvaluationResult {
        let cache = LRUBlockPolicy(capacityBlocks: cacheSize)
        // Pages brought in by a prefetch and not accessed since (stale for evicted pages:
        // checked together with residency).
        var prefetched = Set<UInt64>()
        var plan = PrefetchPlan(capacity: planCapacity)
        var result = PrefetchEvaluationResult(stream: stream.name, prefetcher: prefetcher.name, cacheSize: cache.capacityBlocks,
                                              accesses: stream.accesses.count, issued: 0, useful: 0, demandMisses: 0, asked: 0)
        for (now, access) in stream.accesses.enumerated() {
            let key = pageKey(access.stream, access.position)
            let outcome: PrefetchOutcome
            if cache.contains(key) {
                _ = cache.access(block: key, parent: nil, depth: 0, now: now)
                outcome = prefetched.remove(key) != nil ? .prefetchHit : .hit
            } else {
                prefetched.remove(key)
                _ = cache.access(block: key, parent: nil, depth: 0, now: now)
                outcome = .miss
            }
            switch outcome {
            case .miss: result.demandMisses += 1
            case .prefetchHit: result.useful += 1
            case .hit: break
            }
            prefetcher.recordAccess(stream: access.stream, position: access.position, outcome: outcome, into: &plan)
            result.asked += plan.count
            for position in plan {
                let page = pageKey(plan.stream, position)
                guard !cache.contains(page) else { continue }
                _ = cache.access(block: page, parent: nil, depth: 0, now: now)
                prefetched.insert(page)
                result.issued += 1
            }
        }
        return result
    }

    /// Every stream × every prefetcher, rows stream-major in `allCases` order.
    public static func report(seed: UInt64 = defaultSeed, accesses: Int = defaultAccesses, cacheSize: Int = defaultCachePages,
                              streams: [SyntheticStream] = SyntheticStream.allCases,
                              prefetchers: [PrefetcherKind] = PrefetcherKind.allCases) -> [PrefetchEvaluationResult]
    {
        var rows: [PrefetchEvaluationResult] = []
        for kind in streams {
            let stream = kind.generate(seed: seed, accesses: accesses)
            for prefetcher in prefetchers { rows.append(run(prefetcher: prefetcher.make(), stream: stream, cacheSize: cacheSize)) }
        }
        return rows
    }

    /// The results as an aligned text table.
    public static func table(_ results: [PrefetchEvaluationResult]) -> String {
        let header = ["stream", "prefetcher", "accesses", "misses", "issued", "useful", "accuracy", "coverage", "issued/access"]
        var rows = [header]
        for result in results {
            rows.append([
                result.stream, result.prefetcher, "\(result.accesses)", "\(result.demandMisses)", "\(result.issued)", "\(result.useful)",
                result.issued == 0 ? "-" : fixed(result.accuracy), fixed(result.coverage), fixed(result.issuedPerAccess),
            ])
        }
        let widths = header.indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
        return rows.map { row in
            row.enumerated().map { column, cell in
                let pad = String(repeating: " ", count: widths[column] - cell.count)
                return column < 2 ? cell + pad : pad + cell
            }.joined(separator: "  ")
        }.joined(separator: "\n") + "\n"
    }

    /// A cache key for (stream, position): the stream id mixed so streams do not collide.
    @inline(__always)
    static func pageKey(_ stream: UInt64, _ position: Int64) -> UInt64 {
        (stream &* 0x9E37_79B9_7F4A_7C15) ^ UInt64(bitPattern: position)
    }

    static func fixed(_ value: Double) -> String {
        let scaled = Int((value * 1000).rounded())
        let fraction = String(scaled % 1000)
        return "\(scaled / 1000).\(String(repeating: "0", count: 3 - fraction.count))\(fraction)"
    }
}
