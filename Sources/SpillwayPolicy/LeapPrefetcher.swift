/// Trend-detecting prefetcher after Leap (Al Maruf & Chowdhury, "Effectively Prefetching
/// Remote Memory with Leap", USENIX ATC '20), per stream:
///
/// - **History.** The last `historySize` deltas between consecutive positions (32 by
///   default), kept as a ring of positions per stream slot.
/// - **Trend.** Boyer–Moore majority vote over the most recent 4 deltas, then 8, 16, … up to
///   the whole history; the first window in which one delta is a strict majority gives the
///   trend (the smallest window first, so a new pattern is picked up quickly; the larger ones
///   let a trend survive noise: with 20 % random accesses, about 64 % of deltas still equal
///   the stride, where the last delta alone is wrong after every random access).
/// - **Window.** How many positions ahead along the trend to keep fetched, adapted to how
///   well prefetches did (Leap's rule): at a demand miss, with `h` prefetched pages hit since
///   the last decision, `h > 0` gives the next power of two ≥ h + 1; `h = 0` gives 1 if the
///   access follows the trend, else 0; and the window never drops below half its last value
///   in one step, so a single miss does not end a run. Capped at `maxWindow`.
/// - **No trend, no prefetch.** Without a majority delta nothing is fetched and the window
///   halves, so a random stream costs (almost) no fetches; the previous trend is kept only
///   while its prefetches are still being hit.
///
/// Two additions for a store (Leap decides on page faults only):
/// - **Keeping ahead.** A prefetch hit within half a window of the furthest position asked
///   for doubles the window and extends the run (Linux readahead's asynchronous marker), so a
///   steady stream never stalls on a miss at the end of each batch.
/// - **Runs.** Per stream the furthest position asked for (the frontier) is kept, and only
///   positions past it are asked for, so consecutive accesses do not repeat requests. An access
///   off the trend (noise) extends the run from the last position that was on it instead of
///   prefetching around the noise.
/// - **Lost prefetches.** A demand miss on a position already asked for means the prefetch
///   was evicted (or dropped) before use: the run reaches further than the cache keeps. The
///   window halves, becomes a ceiling that growth may not pass, and the run restarts there;
///   the ceiling grows back by one per batch consumed at it (additive increase,
///   multiplicative decrease), so the window settles near what the cache sustains instead of
///   oscillating between full and half.
///
/// Streams are separated by id (weights and each layer's KV blocks detected independently)
/// in `streamSlots` slots, the least recently used reclaimed for a new stream. Positions
/// asked for are never negative. Single-threaded; every structure is allocated at init.
public final class LeapPrefetcher: PrefetchPolicy {
    /// How the trend is found: Leap's majority vote, or the last delta alone (the classic
    /// stride prefetcher, for comparison: same windows and runs, no noise tolerance).
    public enum TrendDetection: Sendable {
        case majority
        case lastDelta
    }

    public let name: String
    public let historySize: Int
    public let maxWindow: Int
    public let detection: TrendDetection
    public private(set) var counters = PrefetchCounters()
    /// The smallest window the majority vote looks at.
    static let smallestVote = 4

    private var table: StreamTable
    /// `historySize + 1` positions per slot, a ring; `states[slot].head` is the next write.
    private var positions: [Int64]
    private var states: [StreamState]

    struct StreamState {
        var head = 0
        /// Positions recorded, at most `historySize + 1`.
        var count = 0
        /// The trend of the current run (0: none).
        var trend: Int64 = 0
        /// The furthest position asked for along `trend`.
        var frontier: Int64 = 0
        var window = 0
        /// The largest window allowed: `maxWindow` until a prefetch is lost, then half the
        /// window that lost it, growing back by one at each batch consumed at the ceiling.
        var ceiling: Int
        /// Prefetched pages of this stream hit since the last decision (Leap's C_hit).
        var hits = 0

        init(ceiling: Int) { self.ceiling = ceiling }
    }

    enum Trigger { case miss, consumed }

    public init(streamSlots: Int = 16, historySize: Int = 32, maxWindow: Int = 16, detection: TrendDetection = .majority) {
        self.historySize = max(2, historySize)
        self.maxWindow = max(1, maxWindow)
        self.detection = detection
        name = detection == .majority ? "leap" : "last-delta"
        table = StreamTable(slots: streamSlots)
        positions = Array(repeating: 0, count: table.capacity * (self.historySize + 1))
        states = Array(repeating: StreamState(ceiling: self.maxWindow), count: table.capacity)
    }

    /// The stream's current window (positions kept ahead), nil if it has no slot.
    public func window(of stream: UInt64) -> Int? { table.find(stream).map { states[$0].window } }

    /// The stream's current trend (nil: no slot or no trend).
    public func trend(of stream: UInt64) -> Int64? {
        guard let slot = table.find(stream), states[slot].trend != 0 else { return nil }
        return states[slot].trend
    }

    public func recordAccess(stream: UInt64, position: Int64, outcome: PrefetchOutcome, into plan: inout PrefetchPlan) {
        plan.reset(stream: stream)
        counters.count(outcome)
        let (slot, fresh) = table.slot(for: stream)
        if fresh { states[slot] = StreamState(ceiling: maxWindow) }
        var state = states[slot]
        defer { states[slot] = state }
        let base = slot * (historySize + 1)

        let previous: Int64? = state.count > 0 ? recent(0, slot: slot, state: state) : nil
        if previous != position {
            positions[base + state.head] = position
            state.head = state.head == historySize ? 0 : state.head + 1
            state.count = min(state.count + 1, historySize + 1)
        }
        let delta = previous.map { position &- $0 } ?? 0
        if outcome == .prefetchHit { state.hits += 1 }

        let trigger: Trigger
        switch outcome {
        case .miss:
            trigger = .miss
        case .prefetchHit where state.trend != 0 && state.window > 0:
            // Within half a window of the frontier, on the run: keep ahead.
            guard let ahead = Self.steps(from: position, to: state.frontier, trend: state.trend),
                  (0...Int64(state.window / 2)).contains(ahead) else { return }
            trigger = .consumed
        default:
            return
        }
        decide(trigger, position: position, delta: delta, slot: slot, state: &state, plan: &plan)
        counters.issued += plan.count
    }

    private func decide(_ trigger: Trigger, position: Int64, delta: Int64, slot: Int, state: inout StreamState, plan: inout PrefetchPlan) {
        var trend = findTrend(slot: slot, state: state)
        if trend == 0 {
            guard state.hits > 0, state.trend != 0 else {
                state.trend = 0
                state.window /= 2
                state.hits = 0
                return
            }
            trend = state.trend  // no majority now, but the run's prefetches are still hit
        }
        let start = anchor(trend: trend, position: position, slot: slot, state: state)
        // The run's frontier is usable if `start` is on it, at most maxWindow behind it.
        var ahead: Int64 = -1
        if trend == state.trend, let steps = Self.steps(from: start, to: state.frontier, trend: trend),
           (0...Int64(maxWindow)).contains(steps)
        {
            ahead = steps
        }
        var window: Int
        switch trigger {
        case .consumed:
            if state.window >= state.ceiling { state.ceiling = min(maxWindow, state.ceiling + 1) }
            window = min(state.ceiling, max(1, state.window * 2))
        case .miss where ahead > 0 && start == position:
            // Asked for already, yet missed: the prefetch was lost (evicted before use, or
            // dropped), so the run reaches further than the cache keeps. Shrink, cap, ask again.
            state.ceiling = max(1, state.window / 2)
            window = state.ceiling
            ahead = 0
        case .miss:
            window = state.hits > 0 ? Self.powerOfTwo(atLeast: state.hits + 1) : (delta == trend ? 1 : 0)
            window = min(state.ceiling, max(window, state.window / 2))
        }
        if ahead < 0 { ahead = 0 }
        state.trend = trend
        state.window = window
        state.hits = 0
        state.frontier = start &+ trend &* ahead
        while ahead < Int64(window), !plan.isFull {
            ahead += 1
            let (offset, overflow) = trend.multipliedReportingOverflow(by: ahead)
            let (next, overflow2) = start.addingReportingOverflow(offset)
            guard !overflow, !overflow2, next >= 0 else { break }
            plan.append(next)
            state.frontier = next
        }
    }

    /// The position `back` accesses ago (0: the latest recorded).
    @inline(__always)
    private func recent(_ back: Int, slot: Int, state: StreamState) -> Int64 {
        var index = state.head - 1 - back
        if index < 0 { index += historySize + 1 }
        return positions[slot * (historySize + 1) + index]
    }

    /// The delta `back` steps ago (0: into the latest position).
    @inline(__always)
    private func delta(_ back: Int, slot: Int, state: StreamState) -> Int64 {
        recent(back, slot: slot, state: state) &- recent(back + 1, slot: slot, state: state)
    }

    /// The majority delta of the most recent 4, 8, … deltas (first window with one), or 0.
    func findTrend(slot: Int, state: StreamState) -> Int64 {
        let deltas = state.count - 1
        guard deltas >= 1 else { return 0 }
        if detection == .lastDelta { return delta(0, slot: slot, state: state) }
        var size = min(Self.smallestVote, deltas)
        guard size >= 2 else { return 0 }
        while true {
            var candidate: Int64 = 0, votes = 0
            for back in 0..<size {
                let value = delta(back, slot: slot, state: state)
                if votes == 0 {
                    candidate = value
                    votes = 1
                } else {
                    votes += value == candidate ? 1 : -1
                }
            }
            if votes > 0 {
                var occurrences = 0
                for back in 0..<size where delta(back, slot: slot, state: state) == candidate { occurrences += 1 }
                if occurrences * 2 > size { return candidate }
            }
            if size == deltas { return 0 }
            size = min(size * 2, deltas)
        }
    }

    /// Where to extend the run from: the latest position reached along `trend` (by one step,
    /// or by two over one noise access), or `position` itself when none is (a new run).
    private func anchor(trend: Int64, position: Int64, slot: Int, state: StreamState) -> Int64 {
        let recorded = state.count
        guard recorded >= 2 else { return position }
        for back in 0..<(recorded - 1) {
            let here = recent(back, slot: slot, state: state)
            if here &- recent(back + 1, slot: slot, state: state) == trend { return here }
            if back + 2 < recorded, here &- recent(back + 2, slot: slot, state: state) == trend &* 2 { return here }
        }
        return position
    }

    /// How many `trend` steps lead from `start` to `end`, if a whole number does.
    @inline(__always)
    static func steps(from start: Int64, to end: Int64, trend: Int64) -> Int64? {
        let (gap, overflow) = end.subtractingReportingOverflow(start)
        guard !overflow, trend != 0 else { return nil }
        let (quotient, overflow2) = gap.dividedReportingOverflow(by: trend)
        guard !overflow2, quotient &* trend == gap else { return nil }
        return quotient
    }

    static func powerOfTwo(atLeast value: Int) -> Int {
        var power = 1
        while power < value { power <<= 1 }
        return power
    }
}
