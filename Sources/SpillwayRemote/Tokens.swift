import Crypto
import Logging
import SpillwayCore

#if canImport(Glibc)
import Glibc
#endif

/// Tenant tokens (`--token-file`): lines `NAME TOKEN`, split on spaces or tabs; `#` comments
/// and blank lines ignored; CR/LF trimmed; TOKEN is 16–1024 printable ASCII characters. A file
/// readable by group or others is used, with a warning.
public struct TokenFile: Sendable, Equatable {
    public var tokens: [String: [UInt8]]
    /// Tenant names in file order (a client uses the first).
    public var names: [String]

    public init(tokens: [(String, String)]) {
        self.tokens = Dictionary(tokens.map { ($0.0, Array($0.1.utf8)) }, uniquingKeysWith: { _, last in last })
        names = tokens.map(\.0)
    }

    public static func parse(_ text: String, source: String = "token file") throws(SpillwayError) -> TokenFile {
        var entries: [(String, String)] = []
        var lineNumber = 0
        // "\r\n" is one Character in Swift, so split on every newline form.
        for rawLine in text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" || $0 == "\r" }) {
            lineNumber += 1
            var line = Substring(rawLine)
            while line.last == "\r" { line = line.dropLast() }
            if let hash = line.firstIndex(of: "#") { line = line[..<hash] }
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            if fields.isEmpty { continue }
            guard fields.count == 2 else {
                throw .invalidConfiguration("\(source):\(lineNumber): expected 'NAME TOKEN', found \(fields.count) field(s)")
            }
            let token = fields[1]
            guard token.utf8.count >= 16, token.utf8.count <= 1024, token.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
                throw .invalidConfiguration("\(source):\(lineNumber): the token must be 16–1024 printable ASCII characters")
            }
            entries.append((String(fields[0]), String(token)))
        }
        guard !entries.isEmpty else { throw .invalidConfiguration("\(source): no 'NAME TOKEN' line") }
        return TokenFile(tokens: entries)
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

/// HMAC-SHA256 challenge–response: the client proves it holds the tenant's token without
/// sending it. The MAC covers a fixed label, the daemon's fresh nonce and the tenant name, so
/// a proof cannot be replayed on another connection or for another tenant.
public enum Authenticator {
    static let label = Array("spillway-auth-v1".utf8)

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
