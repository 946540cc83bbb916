#if canImport(Glibc)
import Glibc
#endif

/// Where tests, benchmarks and default NVMe files put scratch files: `$SPILLWAY_TMPDIR`, else
/// `$TMPDIR`, else `/tmp`.
public enum ScratchDirectory {
    public static var path: String {
        for variable in ["SPILLWAY_TMPDIR", "TMPDIR"] {
            if let value = getenv(variable), value.pointee != 0 { return String(cString: value) }
        }
        return "/tmp"
    }

    /// A file name under the scratch directory.
    public static func file(_ name: String) -> String { "\(path)/\(name)" }
}
