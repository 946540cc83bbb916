import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// A one-line progress bar on stderr, drawn only when stderr is a terminal.
public final class ProgressBar {
    private let label: String
    private let enabled: Bool
    private var lastDraw: UInt64 = 0

    public init(label: String) {
        self.label = label
        enabled = isatty(STDERR_FILENO) != 0
    }

    /// `fraction` in 0…1; redraws at most every 100 ms.
    public func update(fraction: Double, detail: String) {
        guard enabled else { return }
        let now = monotonicNanoseconds()
        guard now - lastDraw > 100_000_000 else { return }
        lastDraw = now
        let width = 30
        let filled = max(0, min(width, Int(fraction * Double(width))))
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        writeFully(STDERR_FILENO, "\r\(label) [\(bar)] \(Int(fraction * 100))% \(detail)\u{1B}[K")
    }

    public func finish() {
        guard enabled else { return }
        writeFully(STDERR_FILENO, "\r\u{1B}[K")
    }
}

