import Foundation

/// Hit ratio vs capacity per policy as a standalone SVG (hand-written text: no plotting
/// dependency for one chart). Capacities are spaced evenly by sweep step, not linearly, so
/// the small capacities that matter most stay readable.
public enum HitRatioPlot {
    static let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]

    /// `table` as returned by `PolicySimulator.sweep`: one row per policy, one column per fraction.
    public static func svg(table: [[SimulationResult]], fractions: [Double], title: String, prefix: Bool = false) -> String {
        let width = 720.0, height = 440.0
        let left = 70.0, right = 170.0, top = 40.0, bottom = 60.0
        let plotWidth = width - left - right, plotHeight = height - top - bottom
        let steps = max(1, fractions.count - 1)
        func x(_ column: Int) -> Double { left + plotWidth * Double(column) / Double(steps) }
        func y(_ ratio: Double) -> Double { top + plotHeight * (1 - min(1, max(0, ratio))) }
        func f(_ value: Double) -> String { String(Double(Int((value * 10).rounded())) / 10) }
        var out = """
        <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" viewBox="0 0 \(Int(width)) \(Int(height))" font-family="sans-serif" font-size="12">
        <rect width="100%" height="100%" fill="white"/>
        <text x="\(f(left + plotWidth / 2))" y="22" text-anchor="middle" font-size="14">\(escape(title))</text>

        """
        // Grid and y labels every 0.1.
        for tick in 0...10 {
            let ratio = Double(tick) / 10
            out += "<line x1=\"\(f(left))\" y1=\"\(f(y(ratio)))\" x2=\"\(f(left + plotWidth))\" y2=\"\(f(y(ratio)))\" stroke=\"#e0e0e0\"/>\n"
            out += "<text x=\"\(f(left - 8))\" y=\"\(f(y(ratio) + 4))\" text-anchor=\"end\">\(tick == 10 ? "1.0" : "0.\(tick)")</text>\n"
        }
        for (column, fraction) in fractions.enumerated() {
            out += "<line x1=\"\(f(x(column)))\" y1=\"\(f(top))\" x2=\"\(f(x(column)))\" y2=\"\(f(top + plotHeight))\" stroke=\"#f0f0f0\"/>\n"
            out += "<text x=\"\(f(x(column)))\" y=\"\(f(top + plotHeight + 18))\" text-anchor=\"middle\">\(percent(fraction))</text>\n"
        }
        // Axes and their labels.
        out += "<line x1=\"\(f(left))\" y1=\"\(f(top + plotHeight))\" x2=\"\(f(left + plotWidth))\" y2=\"\(f(top + plotHeight))\" stroke=\"black\"/>\n"
        out += "<line x1=\"\(f(left))\" y1=\"\(f(top))\" x2=\"\(f(left))\" y2=\"\(f(top + plotHeight))\" stroke=\"black\"/>\n"
        out += "<text x=\"\(f(left + plotWidth / 2))\" y=\"\(f(height - 15))\" text-anchor=\"middle\">capacity (% of unique blocks)</text>\n"
        out += "<text x=\"18\" y=\"\(f(top + plotHeight / 2))\" text-anchor=\"middle\" transform=\"rotate(-90 18 \(f(top + plotHeight / 2)))\">\(prefix ? "prefix hit ratio" : "block hit ratio")</text>\n"
        // One polyline with markers per policy, and the legend.
        for (row, results) in table.enumerated() {
            let color = colors[row % colors.count]
            let points = results.enumerated().map { column, result in
                "\(f(x(column))),\(f(y(prefix ? result.prefixHitRatio : result.hitRatio)))"
            }
            out += "<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\" points=\"\(points.joined(separator: " "))\"/>\n"
            for point in points {
                let parts = point.split(separator: ",")
                out += "<circle cx=\"\(parts[0])\" cy=\"\(parts[1])\" r=\"3\" fill=\"\(color)\"/>\n"
            }
            let legendY = top + 10 + Double(row) * 20
            out += "<line x1=\"\(f(left + plotWidth + 15))\" y1=\"\(f(legendY))\" x2=\"\(f(left + plotWidth + 40))\" y2=\"\(f(legendY))\" stroke=\"\(color)\" stroke-width=\"2\"/>\n"
            out += "<text x=\"\(f(left + plotWidth + 46))\" y=\"\(f(legendY + 4))\">\(escape(results.first?.policy ?? "?"))</text>\n"
        }
        out += "</svg>\n"
        return out
    }

    /// "1 %", "12.5 %": how the table and the plot label a capacity fraction.
    public static func percent(_ fraction: Double) -> String {
        let value = fraction * 100
        return value == value.rounded() ? "\(Int(value)) %" : "\(value) %"
    }

    private static func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
}
