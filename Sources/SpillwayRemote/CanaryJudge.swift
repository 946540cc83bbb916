import SpillwayCore

/// Decides, from canary latencies, which daemons are outliers against their peers. Shared by
/// the remote and erasure-coded tiers so both judge the same way.
///
/// Each daemon keeps its last `window` canary latencies. At the end of a round a daemon is an
/// outlier when its window's p99 is over `factor` × the fleet's median (the median of every
/// sample in every window) and over `floorNanoseconds`, *and* a sample of this round is too
/// (so one slow read, once in the window, is not held against it round after round). An
/// outlier in `strikes` rounds running is reported; a round without a slow sample clears its
/// strikes. Fixed memory: `window` samples per daemon slot, allocated at init.
///
/// Not thread-safe by itself: a tier calls it from its one heartbeat thread, under `Locked`.
public struct CanaryJudge: Sendable {
    public let window: Int
    public let factor: UInt64
    public let floorNanoseconds: UInt64
    public let strikesNeeded: Int
    private var samples: [UInt64]
    private var filled: [Int]
    private var next: [Int]
    private var roundWorst: [UInt64]
    private var strikes: [Int]

    /// A daemon judged an outlier this round, with the figures that condemned it.
    public struct Outlier: Sendable, Equatable {
        public var daemon: Int
        public var p99: UInt64
        public var median: UInt64
        /// Consecutive rounds it was an outlier (reported at `strikesNeeded` and after).
        public var strikes: Int
    }

    public init(daemons: Int, window: Int = 32, factor: UInt64 = 4, floorNanoseconds: UInt64 = 1_000_000, strikes needed: Int = 2) {
        precondition(daemons >= 0 && window > 0 && needed > 0, "CanaryJudge: bad parameters")
        self.window = window
        self.factor = factor
        self.floorNanoseconds = floorNanoseconds
        strikesNeeded = needed
        samples = Array(repeating: 0, count: daemons * window)
        filled = Array(repeating: 0, count: daemons)
        next = Array(repeating: 0, count: daemons)
        roundWorst = Array(repeating: 0, count: daemons)
        strikes = Array(repeating: 0, count: daemons)
    }

    /// Records one canary's latency on `daemon` (this round).
    public mutating func record(_ daemon: Int, nanoseconds: UInt64) {
        guard filled.indices.contains(daemon) else { return }
        samples[daemon * window + next[daemon]] = nanoseconds
        next[daemon] = (next[daemon] + 1) % window
        filled[daemon] = min(window, filled[daemon] + 1)
        roundWorst[daemon] = max(roundWorst[daemon], nanoseconds)
    }

    /// A daemon restarted or left: its history is someone else's.
    public mutating func forget(_ daemon: Int) {
        guard filled.indices.contains(daemon) else { return }
        filled[daemon] = 0
        next[daemon] = 0
        roundWorst[daemon] = 0
        strikes[daemon] = 0
    }

    /// The p99 of `daemon`'s window (0 if empty).
    public func p99(_ daemon: Int) -> UInt64 {
        guard filled.indices.contains(daemon), filled[daemon] > 0 else { return 0 }
        let mine = samples[(daemon * window)..<(daemon * window + filled[daemon])].sorted()
        return mine[min(mine.count - 1, mine.count * 99 / 100)]
    }

    /// Ends the round: the daemons that have been outliers `strikesNeeded` rounds running.
    /// Needs samples from at least three daemons (a median of two says nothing).
    public mutating func endRound() -> [Outlier] {
        defer { for daemon in roundWorst.indices { roundWorst[daemon] = 0 } }
        var all: [UInt64] = []
        var contributing = 0
        for daemon in filled.indices where filled[daemon] > 0 {
            contributing += 1
            all.append(contentsOf: samples[(daemon * window)..<(daemon * window + filled[daemon])])
        }
        guard contributing >= 3 else { return [] }
        all.sort()
        let median = all[all.count / 2]
        let limit = max(factor &* median, floorNanoseconds)
        var outliers: [Outlier] = []
        for daemon in filled.indices where filled[daemon] > 0 {
            let p99 = self.p99(daemon)
            guard p99 > limit, roundWorst[daemon] > limit else {
                strikes[daemon] = 0
                continue
            }
            strikes[daemon] += 1
            if strikes[daemon] >= strikesNeeded {
                outliers.append(Outlier(daemon: daemon, p99: p99, median: median, strikes: strikes[daemon]))
            }
        }
        return outliers
    }
}
