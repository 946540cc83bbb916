import CSpillwayISAL
import SpillwayCore

/// Reed–Solomon RS(k, r) over GF(2^8) with Intel ISA-L: a systematic code (the first k splits
/// are the data itself) whose r parity rows come from a Cauchy matrix
/// (`gf_gen_cauchy1_matrix`), so every k×k sub-matrix is invertible and any k of the k+r
/// splits rebuild the others.
///
/// Tables are built once: the encode tables at init, and one decode plan per
/// (available sources, splits to rebuild) pattern, cached on first use. Encoding and decoding
/// take caller-owned split pointers and allocate nothing per call once a pattern is cached.
public final class ReedSolomonCode: Sendable {
    public let k: Int
    public let r: Int
    public var n: Int { k + r }
    /// (k+r)×k encode matrix, row-major: identity, then the Cauchy rows.
    private let matrix: [UInt8]
    /// `ec_init_tables` output for the parity rows (32·k·r bytes); written once in init.
    private let encodeTables: TableStorage
    private let plans = Locked<[UInt64: DecodePlan]>([:])

    /// Expanded GF multiplication tables, allocated once and read-only after init.
    /// `@unchecked Sendable`: written only by the initializer that creates it.
    final class TableStorage: @unchecked Sendable {
        let bytes: UnsafeMutablePointer<UInt8>
        let rows: Int
        init(count: Int, rows: Int) {
            bytes = .allocate(capacity: max(1, count))
            bytes.initialize(repeating: 0, count: max(1, count))
            self.rows = rows
        }
        deinit { bytes.deallocate() }
    }

    /// How to rebuild `targets` from exactly k `sources` (split indices, ascending).
    public final class DecodePlan: Sendable {
        public let sources: [Int]
        public let targets: [Int]
        let tables: TableStorage
        init(sources: [Int], targets: [Int], tables: TableStorage) {
            self.sources = sources
            self.targets = targets
            self.tables = tables
        }
    }

    public init(k: Int, r: Int) throws(SpillwayError) {
        guard (1...32).contains(k), (1...16).contains(r), k + r <= 32 else {
            throw .invalidConfiguration("erasure code RS(\(k), \(r)): need 1 ≤ k ≤ 32, 1 ≤ r ≤ 16, k + r ≤ 32")
        }
        self.k = k
        self.r = r
        var matrix = [UInt8](repeating: 0, count: (k + r) * k)
        gf_gen_cauchy1_matrix(&matrix, Int32(k + r), Int32(k))
        self.matrix = matrix
        let tables = TableStorage(count: 32 * k * r, rows: r)
        matrix.withUnsafeMutableBufferPointer { rows in
            ec_init_tables(Int32(k), Int32(r), rows.baseAddress! + k * k, tables.bytes)
        }
        encodeTables = tables
    }

    /// Writes the r parity splits for k data splits of `length` bytes each.
    /// `data` holds k pointers, `parity` r pointers.
    public func encode(data: UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>,
                       parity: UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>, length: Int)
    {
        ec_encode_data(Int32(length), Int32(k), Int32(r), encodeTables.bytes, data, parity)
        VectorState.reset()
    }

    /// The plan rebuilding `targets` from `sources` (exactly k distinct indices < n, none of
    /// them a target); cached per pattern. Nil if the pattern is impossible.
    public func plan(sources: [Int], targets: [Int]) -> DecodePlan? {
        guard sources.count == k, !targets.isEmpty else { return nil }
        var sourceMask: UInt32 = 0
        var targetMask: UInt32 = 0
        for index in sources {
            guard index >= 0, index < n, sourceMask & (1 << index) == 0 else { return nil }
            sourceMask |= 1 << index
        }
        for index in targets {
            guard index >= 0, index < n, sourceMask & (1 << index) == 0, targetMask & (1 << index) == 0 else { return nil }
            targetMask |= 1 << index
        }
        return plan(sourceMask: sourceMask, targetMask: targetMask)
    }

    /// `plan(sources:targets:)` with the splits as masks (bit i = split i): k sources, at
    /// least one target, disjoint. A cached pattern costs one lookup and no allocation.
    public func plan(sourceMask: UInt32, targetMask: UInt32) -> DecodePlan? {
        let valid: UInt32 = n >= 32 ? .max : (1 << n) - 1
        guard sourceMask.nonzeroBitCount == k, targetMask != 0, sourceMask & targetMask == 0,
              (sourceMask | targetMask) & ~valid == 0
        else { return nil }
        let key = UInt64(sourceMask) << 32 | UInt64(targetMask)
        if let cached = plans.withLock({ $0[key] }) { return cached }
        let orderedSources = (0..<n).filter { sourceMask & (1 << $0) != 0 }
        let orderedTargets = (0..<n).filter { targetMask & (1 << $0) != 0 }
        // Rows of the encode matrix for the sources, inverted: row t of the inverse rebuilds
        // data split t from the sources; a parity split is its encode row times the inverse.
        var sub = [UInt8](repeating: 0, count: k * k)
        for (row, source) in orderedSources.enumerated() {
            for column in 0..<k { sub[row * k + column] = matrix[source * k + column] }
        }
        var inverse = [UInt8](repeating: 0, count: k * k)
        guard gf_invert_matrix(&sub, &inverse, Int32(k)) == 0 else { return nil }
        var coefficients = [UInt8](repeating: 0, count: orderedTargets.count * k)
        for (row, target) in orderedTargets.enumerated() {
            for column in 0..<k {
                if target < k {
                    coefficients[row * k + column] = inverse[target * k + column]
                } else {
                    var sum: UInt8 = 0
                    for i in 0..<k { sum ^= gf_mul(matrix[target * k + i], inverse[i * k + column]) }
                    coefficients[row * k + column] = sum
                }
            }
        }
        let tables = TableStorage(count: 32 * k * orderedTargets.count, rows: orderedTargets.count)
        ec_init_tables(Int32(k), Int32(orderedTargets.count), &coefficients, tables.bytes)
        let plan = DecodePlan(sources: orderedSources, targets: orderedTargets, tables: tables)
        plans.withLock { $0[key] = plan }
        return plan
    }

    /// Rebuilds the plan's targets: `sources` holds k pointers in `plan.sources` order,
    /// `targets` one pointer per `plan.targets` entry.
    public func decode(_ plan: DecodePlan, sources: UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>,
                       targets: UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>, length: Int)
    {
        ec_encode_data(Int32(length), Int32(k), Int32(plan.targets.count), plan.tables.bytes, sources, targets)
        VectorState.reset()
    }

    /// Decode patterns cached so far.
    public var cachedPlans: Int { plans.withLock { $0.count } }
}
