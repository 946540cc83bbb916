#if canImport(Glibc)
import Glibc
#endif

/// Where benchmarks and tests put scratch files: `$SPILLWAY_TMPDIR` as configured, else
/// `spillway-<uid>` under `$TMPDIR` or `/tmp`, a directory private to the user
/// (`PrivateDirectory`): a fixed name in a shared directory would let two users' runs
/// overwrite, or lock each other out of, one file.
public enum ScratchDirectory {
    public static func path() throws(SpillwayError) -> String {
        if let value = getenv("SPILLWAY_TMPDIR"), value.pointee != 0 { return String(cString: value) }
        let base = getenv("TMPDIR").flatMap { $0.pointee != 0 ? String(cString: $0) : nil } ?? "/tmp"
        let directory = "\(base)/spillway-\(geteuid())"
        try PrivateDirectory.ensure(directory)
        return directory
    }

    /// A file name under the scratch directory.
    public static func file(_ name: String) throws(SpillwayError) -> String { "\(try path())/\(name)" }
}

/// A directory only this user can enter (mode 0700, owned by the effective user, not a
/// symlink): where the daemon's generated token files live. Created if missing; an existing
/// one that someone else owns, that is a symlink, or that group or others can enter is refused
/// with the reason, since whoever controls it could read or swap the secrets inside.
public enum PrivateDirectory {
    /// Makes sure `path` is a private directory (creating it, and its missing parent, 0700).
    public static func ensure(_ path: String) throws(SpillwayError) {
        if mkdir(path, 0o700) != 0 && errno != EEXIST {
            let reason = errno
            // A missing parent ($XDG_CACHE_HOME/spillway's parent): one level is enough here.
            if reason == ENOENT, let slash = path.lastIndex(of: "/"), slash != path.startIndex {
                try ensure(String(path[..<slash]))
                return try ensure(path)
            }
            throw .invalidConfiguration("cannot create '\(path)': \(String(cString: strerror(reason)))")
        }
        try check(path)
    }

    /// Refuses a directory that is not private to this user.
    public static func check(_ path: String) throws(SpillwayError) {
        var info = stat()
        guard lstat(path, &info) == 0 else {
            throw .invalidConfiguration("'\(path)': \(String(cString: strerror(errno)))")
        }
        guard info.st_mode & S_IFMT == S_IFDIR else {
            throw .invalidConfiguration("'\(path)' is not a directory (a symlink or file there is refused)")
        }
        guard info.st_uid == geteuid() else {
            throw .invalidConfiguration("'\(path)' belongs to uid \(info.st_uid), not to this user (uid \(geteuid()))")
        }
        guard info.st_mode & 0o077 == 0 else {
            throw .invalidConfiguration("'\(path)' can be entered by group or others (mode \(String(info.st_mode & 0o777, radix: 8))); chmod 700 it")
        }
    }

    /// Where per-user runtime files (the daemon's generated tokens) go, most preferred first:
    /// `$SPILLWAY_RUNTIME_DIR`, `$XDG_RUNTIME_DIR/spillway`, `/tmp/spillway-$UID`. A daemon
    /// writes into the first; clients look in each (a daemon under systemd may have
    /// XDG_RUNTIME_DIR set while a shell does not).
    public static var runtimeCandidates: [String] {
        var candidates: [String] = []
        if let value = getenv("SPILLWAY_RUNTIME_DIR"), value.pointee != 0 { candidates.append(String(cString: value)) }
        if let value = getenv("XDG_RUNTIME_DIR"), value.pointee != 0 { candidates.append(String(cString: value) + "/spillway") }
        candidates.append("/tmp/spillway-\(geteuid())")
        return candidates
    }
}
