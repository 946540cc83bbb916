import Crypto
import Logging
import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// Tenant tokens (`--token-file`): lines `NAME TOKEN [admin] [SIZE]`, split on spaces or tabs;
/// `#` comments and blank lines ignored; CR/LF trimmed; TOKEN is 16–1024 printable ASCII
/// characters; `admin` lets that tenant see every tenant in `stats` (others see their own);
/// SIZE (e.g. `64g`, parsed like the CLI's sizes) caps the bytes of slabs that tenant may hold
/// on one daemon. The two optional fields may come in either order.
/// A file readable by group or others is used, with a warning.
public struct TokenFile: Sendable, Equatable {
    public var tokens: [String: [UInt8]]
    /// Tenant names in file order (a client uses the first).
    public var names: [String]
    /// Tenants marked `admin`.
    public var admins: Set<String>
    /// Per-tenant capacity limits in bytes (the optional SIZE field); absent = no limit but
    /// the daemon's capacity.
    public var limits: [String: Int]

    public init(tokens: [(String, String)], admins: Set<String> = [], limits: [String: Int] = [:]) {
        self.tokens = Dictionary(tokens.map { ($0.0, Array($0.1.utf8)) }, uniquingKeysWith: { _, last in last })
        names = tokens.map(\.0)
        self.admins = admins
        self.limits = limits
    }

    /// One tenant with a fresh random token (64 hex digits from the system's CSPRNG), never
    /// written anywhere unless the caller does: in-process daemons and the clients of the same
    /// process share it in memory.
    public static func random(tenant: String = "spillway", admin: Bool = true) -> TokenFile {
        var generator = SystemRandomNumberGenerator()
        let digits = Array("0123456789abcdef".utf8)
        let token = String(decoding: (0..<64).map { _ in digits[Int.random(in: 0..<16, using: &generator)] }, as: UTF8.self)
        return TokenFile(tokens: [(tenant, token)], admins: admin ? [tenant] : [])
    }

    /// The file's text (what `parse` reads back).
    public var text: String {
        names.map { name in
            "\(name) \(String(decoding: tokens[name]!, as: UTF8.self))\(admins.contains(name) ? " admin" : "")\(limits[name].map { " \($0)" } ?? "")\n"
        }.joined()
    }

    public static func parse(_ text: String, source: String = "token file") throws(SpillwayError) -> TokenFile {
        var entries: [(String, String)] = []
        var admins: Set<String> = []
        var limits: [String: Int] = [:]
        var lineNumber = 0
        // "\r\n" is one Character in Swift, so split on every newline form.
        for rawLine in text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" || $0 == "\r" }) {
            lineNumber += 1
            var line = Substring(rawLine)
            while line.last == "\r" { line = line.dropLast() }
            if let hash = line.firstIndex(of: "#") { line = line[..<hash] }
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            if fields.isEmpty { continue }
            guard fields.count >= 2, fields.count <= 4 else {
                throw .invalidConfiguration("\(source):\(lineNumber): expected 'NAME TOKEN [admin] [SIZE]', found \(fields.count) field(s)")
            }
            var isAdmin = false
            var limit: Int?
            for field in fields.dropFirst(2) {
                if field == "admin", !isAdmin {
                    isAdmin = true
                } else if limit == nil, let size = ByteCount.parse(field), size > 0 {
                    limit = size
                } else {
                    throw .invalidConfiguration(
                        "\(source):\(lineNumber): '\(field)' is neither 'admin' nor a size such as 64g (expected 'NAME TOKEN [admin] [SIZE]')")
                }
            }
            guard fields[0].utf8.count <= 256, fields[0].unicodeScalars.allSatisfy({ $0.value > 0x20 && $0.value != 0x7F }) else {
                throw .invalidConfiguration("\(source):\(lineNumber): a tenant name is at most 256 bytes without control characters")
            }
            if isAdmin { admins.insert(String(fields[0])) }
            if let limit { limits[String(fields[0])] = limit }
            let token = fields[1]
            guard token.utf8.count >= 16, token.utf8.count <= 1024, token.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
                throw .invalidConfiguration("\(source):\(lineNumber): the token must be 16–1024 printable ASCII characters")
            }
            entries.append((String(fields[0]), String(token)))
        }
        guard !entries.isEmpty else { throw .invalidConfiguration("\(source): no 'NAME TOKEN' line") }
        return TokenFile(tokens: entries, admins: admins, limits: limits)
    }

    /// Reads and parses `path`; warns (does not refuse) when group or others can read it.
    public static func load(_ path: String, logger: Logger) throws(SpillwayError) -> TokenFile {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw .invalidConfiguration("token file '\(path)': \(String(cString: strerror(errno)))")
        }
        if info.st_mode & 0o077 != 0 {
            logger.warning("token file is readable by group or others; chmod 600 it", metadata: ["path": "\(path)"])
        }
        guard let file = fopen(path, "r") else {
            throw .invalidConfiguration("token file '\(path)': \(String(cString: strerror(errno)))")
        }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = fread(&chunk, 1, chunk.count, file)
            if count <= 0 { break }
            bytes += chunk[0..<count]
            if bytes.count > 1 << 20 { throw .invalidConfiguration("token file '\(path)' is larger than 1 MiB") }
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw .invalidConfiguration("token file '\(path)' is not UTF-8")
        }
        return try parse(text, source: path)
    }
}

/// Token files a `spillwayd` started without `--token-file` generates: one per listen address,
/// `spillwayd-HOST-PORT.token` (mode 0600) in the first of `PrivateDirectory.runtimeCandidates`
/// (a 0700 directory of the user's). `spillway` commands and the library find it by the
/// daemon's address when given no token, so a same-host user needs no setup while other users
/// cannot read it.
public enum LocalTokens {
    static func fileName(for endpoint: Endpoint) -> String {
        let host = endpoint.host == "localhost" ? "127.0.0.1" : endpoint.host
        return "spillwayd-\(host)-\(endpoint.port).token"
    }

    /// Creates a fresh random token file for a daemon listening on `endpoint`: its path and
    /// the tokens. A stale file of an earlier daemon on the same address is replaced.
    public static func create(for endpoint: Endpoint) throws(SpillwayError) -> (path: String, tokens: TokenFile) {
        let directory = PrivateDirectory.runtimeCandidates[0]
        try PrivateDirectory.ensure(directory)
        pruneStale(in: directory)
        let path = "\(directory)/\(fileName(for: endpoint))"
        let tokens = TokenFile.random(tenant: "spillway", admin: true)
        unlink(path)
        let descriptor = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else { throw .invalidConfiguration("cannot create token file '\(path)': \(String(cString: strerror(errno)))") }
        defer { close(descriptor) }
        // The owner's pid as a comment: a later daemon removes files whose owner died without
        // cleaning up (SIGKILL), so the directory does not fill with dead tokens.
        let text = "# spillwayd pid \(getpid())\n" + tokens.text
        guard writeAll(descriptor, text) else {
            unlink(path)
            throw .invalidConfiguration("cannot write token file '\(path)': \(String(cString: strerror(errno)))")
        }
        return (path, tokens)
    }

    /// Removes generated token files whose daemon (the pid in their first line) is gone.
    static func pruneStale(in directory: String) {
        guard let handle = opendir(directory) else { return }
        defer { closedir(handle) }
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard name.hasPrefix("spillwayd-"), name.hasSuffix(".token") else { continue }
            let path = "\(directory)/\(name)"
            guard let file = fopen(path, "r") else { continue }
            var line = [CChar](repeating: 0, count: 64)
            let read = fgets(&line, Int32(line.count), file) != nil
            fclose(file)
            guard read else { continue }
            let text = String(cString: line)
            guard text.hasPrefix("# spillwayd pid "),
                  let pid = Int32(text.dropFirst("# spillwayd pid ".count).prefix { $0.isNumber })
            else { continue }
            if kill(pid, 0) != 0 && errno == ESRCH { unlink(path) }
        }
    }

    private static func writeAll(_ descriptor: Int32, _ text: String) -> Bool {
        let bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count {
            let written = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress! + offset, $0.count - offset) }
            if written < 0 && errno == EINTR { continue }
            if written <= 0 { return false }
            offset += written
        }
        return true
    }

    /// The generated token file of the daemon at `endpoint`, if this user has one: the path of
    /// the first private, user-owned, 0600 file found. Files that fail those checks are skipped.
    public static func path(for endpoint: Endpoint) -> String? {
        for directory in PrivateDirectory.runtimeCandidates {
            guard (try? PrivateDirectory.check(directory)) != nil else { continue }
            let path = "\(directory)/\(fileName(for: endpoint))"
            var info = stat()
            guard lstat(path, &info) == 0, info.st_mode & S_IFMT == S_IFREG, info.st_uid == geteuid(), info.st_mode & 0o077 == 0
            else { continue }
            return path
        }
        return nil
    }

    /// Credentials from the daemon's generated token file, if this user can find one.
    public static func credentials(for endpoint: Endpoint, logger: Logger) -> ClientCredentials? {
        guard let path = path(for: endpoint) else { return nil }
        do {
            return ClientCredentials(tokenFile: try TokenFile.load(path, logger: logger))
        } catch {
            logger.warning("ignoring an unreadable generated token file", metadata: ["path": "\(path)", "error": "\(error)"])
            return nil
        }
    }
}

/// HMAC-SHA256 challenge–response: the client proves it holds the tenant's token without
/// sending it. The MAC covers a fixed label, the daemon's fresh nonce and the tenant name, so
/// a proof cannot be replayed on another connection or for another tenant.
public enum Authenticator {
    static let label = Array("spillway-auth-v1".utf8)
    /// A different label for the daemon's proof, so a client's proof can never be replayed as
    /// a daemon's (or the reverse).
    static let daemonLabel = Array("spillway-daemon-v1".utf8)

    /// The daemon's proof in a mutually authenticated handshake: HMAC-SHA256(token,
    /// "spillway-daemon-v1" ‖ client nonce ‖ daemon nonce ‖ tenant ‖ daemon instance (u64 LE)).
    /// Binding the instance authenticates the welcome's `daemonInstance`.
    public static func daemonProof(token: [UInt8], clientNonce: [UInt8], daemonNonce: [UInt8], tenant: String, instance: UInt64) -> [UInt8] {
        var message = daemonLabel
        message += clientNonce
        message += daemonNonce
        message += Array(tenant.utf8)
        withUnsafeBytes(of: instance.littleEndian) { message += $0 }
        return Array(HMAC<SHA256>.authenticationCode(for: message, using: SymmetricKey(data: token)))
    }

    public static func proof(token: [UInt8], nonce: [UInt8], tenant: String) -> [UInt8] {
        var message = label
        message += nonce
        message += Array(tenant.utf8)
        let code = HMAC<SHA256>.authenticationCode(for: message, using: SymmetricKey(data: token))
        return Array(code)
    }

    /// Compares in time independent of where the inputs differ.
    public static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for index in 0..<a.count { difference |= a[index] ^ b[index] }
        return difference == 0
    }

    public static func nonce() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) }
    }
}
