/// Parses and prints byte sizes the way every `spillway` and `spillwayd` option accepts them.
///
/// A size is a bare byte count (`4096`) or a number with a `k`, `m`, `g` or `t` suffix
/// (case-insensitive), optionally followed by `i`, `iB` or `B`. All suffixes are binary
/// multiples: `4k` = `4KiB` = `4kB` = 4096.
public enum ByteCount {
    /// Parses `text`; returns nil for anything else (empty, negative, fractional, overflowing).
    public static func parse(_ text: some StringProtocol) -> Int? {
        var digits = Substring(text)
        guard !digits.isEmpty else { return nil }
        var shift = 0
        let lowered = digits.lowercased()
        // Strip an optional "ib" / "i" / "b" after a multiplier letter.
        var suffixLength = 0
        for tail in ["ib", "i", "b"] where lowered.hasSuffix(tail) {
            suffixLength = tail.count
            break
        }
        var body = lowered.dropLast(suffixLength)
        if let unit = body.last, let unitShift = ["k": 10, "m": 20, "g": 30, "t": 40][unit] {
            shift = unitShift
            body = body.dropLast()
        } else if suffixLength != 0 {
            // "i"/"ib"/"b" is only allowed after a multiplier letter.
            return nil
        }
        digits = Substring(body)
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }),
              let value = Int(digits)
        else { return nil }
        let (result, overflow) = value.multipliedReportingOverflow(by: 1 << shift)
        return overflow ? nil : result
    }

    /// The shortest exact binary form: `4096` → `4KiB`, `1536` → `1536B`.
    public static func format(_ bytes: Int) -> String {
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")]
        where bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return "\(bytes >> shift)\(unit)"
        }
        return "\(bytes)B"
    }
}
