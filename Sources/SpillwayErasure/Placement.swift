import SpillwayCore

/// Where a stripe's k+r splits go.
public enum CodingPlacement: Sendable, Equatable, CustomStringConvertible {
    /// Any k+r distinct live daemons, uniformly at random.
    case random
    /// Hydra's CodingSets: daemons are split into fixed groups of k+r+`slack`; a stripe's
    /// splits all go to one group (k+r of its members, the emptiest), so simultaneous
    /// failures lose data only if r+1 of them fall into one group's stripe. The slack gives
    /// a little room to balance load and to repair within the group.
    case codingSets(slack: Int)

    public var description: String {
        switch self {
        case .random: "random"
        case .codingSets(let slack): "coding-sets(slack \(slack))"
        }
    }

    /// The groups of daemon indices for `daemons` daemons (one group of all for `random`).
    public func groups(daemons: Int, k: Int, r: Int) -> [[Int]] {
        guard case .codingSets(let slack) = self else { return [Array(0..<daemons)] }
        let size = k + r + max(0, slack)
        guard daemons >= 2 * size else { return [Array(0..<daemons)] }
        var groups: [[Int]] = stride(from: 0, to: daemons - daemons % size, by: size).map { Array($0..<($0 + size)) }
        // The remainder joins the last group (a group never has fewer than k+r+slack).
        for daemon in (daemons - daemons % size)..<daemons { groups[groups.count - 1].append(daemon) }
        return groups
    }
}

/// Data-loss probability of a placement under simultaneous failures, by simulation: place
/// `stripes` stripes of k+r splits on `daemons` daemons, fail `failed` of them at random, and
/// count the trials in which some stripe lost more than r splits (its data is gone).
public struct PlacementLossSimulation: Sendable {
    public var daemons = 1000
    public var failed = 10
    public var k = 4
    public var r = 2
    public var stripes = 100_000
    public var trials = 2000
    public var seed: UInt64 = 1

    public init() {}

    /// Fraction of trials that lost data.
    public func lossProbability(_ placement: CodingPlacement) -> Double {
        var random = SplitMix64(seed: seed)
        let n = k + r
        let groups = placement.groups(daemons: daemons, k: k, r: r)
        // Place the stripes once (as a long-running pool would have), then fail daemons.
        var stripeMembers = [UInt16](repeating: 0, count: stripes * n)
        for stripe in 0..<stripes {
            let group = groups[Int(random.next() % UInt64(groups.count))]
            // k+r distinct members of the group (partial Fisher–Yates on a copy).
            var pool = group
            for i in 0..<n {
                let j = i + Int(random.next() % UInt64(pool.count - i))
                pool.swapAt(i, j)
                stripeMembers[stripe * n + i] = UInt16(pool[i])
            }
        }
        // Per daemon, the stripes with a split on it: a trial only touches the failed ones'.
        var stripesOf = [[Int32]](repeating: [], count: daemons)
        for stripe in 0..<stripes {
            for i in 0..<n { stripesOf[Int(stripeMembers[stripe * n + i])].append(Int32(stripe)) }
        }
        var failures = [UInt8](repeating: 0, count: stripes)
        var lostTrials = 0
        var down: [Int] = []
        for _ in 0..<trials {
            down.removeAll(keepingCapacity: true)
            while down.count < failed {
                let daemon = Int(random.next() % UInt64(daemons))
                if !down.contains(daemon) { down.append(daemon) }
            }
            var lost = false
            for daemon in down {
                for stripe in stripesOf[daemon] {
                    failures[Int(stripe)] += 1
                    if Int(failures[Int(stripe)]) > r { lost = true }
                }
            }
            for daemon in down { for stripe in stripesOf[daemon] { failures[Int(stripe)] = 0 } }
            if lost { lostTrials += 1 }
        }
        return Double(lostTrials) / Double(trials)
    }
}
