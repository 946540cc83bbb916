import Dispatch
import Spillway
import SpillwayServer

#if canImport(Glibc)
import Glibc
#endif

/// `spillway store soak` and `spillway store verify`: a crash test with real processes.
///
/// `soak` runs puts (new versions of existing keys too), removes and gets of self-verifying
/// pages on a configured store and appends `put KEY VERSION` / `remove KEY` to an ack log
/// after each put or remove *returns* (one write(2) per line, nothing buffered). Kill it at
/// any moment; `verify` reopens the store (warm restart) and checks every key of the log
/// against its last acknowledged operation.
public enum StoreSoak {
    /// Keys of soak pages: a fixed high half, the key index as the low half.
    public static let keyHigh: UInt64 = 0x5350_4C57_534F_414B  // "SPLWSOAK"
    static let magic: UInt64 = 0x3147_4150_4B41_4F53  // "SOAKPAG1"
    static let headerBytes = 24

    public static func key(_ index: UInt64) -> PageKey { PageKey(high: keyHigh, low: index) }

    // MARK: Pages

    /// The length of version `version` of key `index`'s page: 24 bytes … `limit`, derived
    /// from both, so a page of the wrong length is caught too.
    static func length(key index: UInt64, version: UInt64, limit: Int) -> Int {
        var state = index &* 0x9E37_79B9_7F4A_7C15 ^ version
        let span = max(1, limit - headerBytes + 1)
        return headerBytes + Int(splitMix(&state) % UInt64(span))
    }

    /// The bytes of version `version` of key `index`: magic, key, version, then a SplitMix64
    /// stream seeded by both.
    public static func page(key index: UInt64, version: UInt64, limit: Int) -> [UInt8] {
        let count = length(key: index, version: version, limit: limit)
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: magic.littleEndian, toByteOffset: 0, as: UInt64.self)
            raw.storeBytes(of: index.littleEndian, toByteOffset: 8, as: UInt64.self)
            raw.storeBytes(of: version.littleEndian, toByteOffset: 16, as: UInt64.self)
            var state = index ^ version &* 0xD1B5_4A32_D192_ED03
            var offset = headerBytes
            while offset < count {
                var word = splitMix(&state).littleEndian
                let take = min(8, count - offset)
                withUnsafeBytes(of: &word) { source in
                    for byte in 0..<take { raw[offset + byte] = source[byte] }
                }
                offset += take
            }
        }
        return bytes
    }

    /// The version a page holds if its bytes are exactly some version of key `index`; nil
    /// (corrupt) otherwise.
    public static func version(of bytes: [UInt8], key index: UInt64, limit: Int) -> UInt64? {
        guard bytes.count >= headerBytes else { return nil }
        let (claimedMagic, claimedKey, claimedVersion) = bytes.withUnsafeBytes { raw in
            (UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self)),
             UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self)),
             UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self)))
        }
        guard claimedMagic == magic, claimedKey == index, claimedVersion > 0 else { return nil }
        return page(key: index, version: claimedVersion, limit: limit) == bytes ? claimedVersion : nil
    }

    static func splitMix(_ state: inout UInt64) -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var value = state
        value = (value ^ (value >> 30)) &* 0xBF58_476D_1CE4_E5B9
        value = (value ^ (value >> 27)) &* 0x94D0_49BB_1331_11EB
        return value ^ (value >> 31)
    }

    /// The page size limit soak pages use for a configuration: at most one slot (so a full
    /// key set fits the capacity a test gives it) and at most `max-page-size`.
    public static func pageLimit(_ configuration: SpillwayConfiguration) -> Int {
        min(configuration.slotSize, configuration.maxPageSize)
    }

    // MARK: Soak

    public struct Options: Sendable {
        public var durationSeconds: Double = 10
        public var keys = 1000
        public var threads = 2
        public var seed: UInt64 = 1
        public var ackLog = ""

        public init() {}
    }

    public struct SoakResult: Sendable {
        public var puts = 0
        public var removes = 0
        public var gets = 0
        /// Operations the store refused or failed (e.g. `storeFull`); not acknowledged.
        public var errors = 0
        /// Gets that returned an older version than the last acknowledged put (or any version
        /// at or below an acknowledged remove's), or bytes of no version: must be 0.
        public var stale = 0
        public var corrupt = 0

        public var json: JSONValue {
            .object([("puts", .int(puts)), ("removes", .int(removes)), ("gets", .int(gets)), ("errors", .int(errors)),
                     ("stale", .int(stale)), ("corrupt", .int(corrupt))])
        }

        mutating func add(_ other: SoakResult) {
            puts += other.puts
            removes += other.removes
            gets += other.gets
            errors += other.errors
            stale += other.stale
            corrupt += other.corrupt
        }
    }

    /// Formats the configured store (every NVMe tier reformatted), then runs `threads` workers
    /// for `durationSeconds`. Worker `t` owns the keys `k ≡ t (mod threads)`, so each key's
    /// operations, and their ack lines, are in order. Versions increase per key (a put after
    /// a remove gets a new one).
    public static func run(_ options: Options, configuration: SpillwayConfiguration) throws(SpillwayError) -> SoakResult {
        guard options.keys > 0, options.threads > 0, options.threads <= 64, options.durationSeconds >= 0 else {
            throw .invalidArgument("--keys and --threads must be positive (threads ≤ 64), --duration non-negative")
        }
        var configuration = configuration
        for index in configuration.tiers.indices where configuration.tiers[index].kind == .nvme {
            configuration.tiers[index].reformat = true
        }
        let limit = pageLimit(configuration)
        let log = open(options.ackLog, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0o644)
        guard log >= 0 else { throw .tierIO(tier: "ack log", operation: "open '\(options.ackLog)'", errno: errno) }
        defer { close(log) }
        let intents = open(intentLogPath(options.ackLog), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0o644)
        guard intents >= 0 else { throw .tierIO(tier: "ack log", operation: "open '\(intentLogPath(options.ackLog))'", errno: errno) }
        defer { close(intents) }
        let store = try TieredStore.open(configuration, daemons: InProcessDaemons())
        defer { store.close() }
        let deadline = monotonicNanoseconds() + UInt64(options.durationSeconds * 1e9)
        let results = Locked(SoakResult())
        let failure = Locked<SpillwayError?>(nil)
        DispatchQueue.concurrentPerform(iterations: options.threads) { worker in
            var result = SoakResult()
            var random = options.seed &+ UInt64(worker) &* 0x9E37_79B9_7F4A_7C15
            let owned = stride(from: UInt64(worker), to: UInt64(options.keys), by: options.threads).map { $0 }
            guard !owned.isEmpty else { return }
            // Per key: the last version put (acknowledged or not), the last acknowledged put's
            // version and the last acknowledged operation.
            var versions = [UInt64](repeating: 0, count: owned.count)
            var acknowledged = [UInt64](repeating: 0, count: owned.count)
            var last = [LastOperation?](repeating: nil, count: owned.count)
            while monotonicNanoseconds() < deadline, failure.withLock({ $0 == nil }) {
                let slot = Int(splitMix(&random) % UInt64(owned.count))
                let index = owned[slot]
                let key = Self.key(index)
                let choice = splitMix(&random) % 10
                if choice < 6 {
                    versions[slot] += 1
                    let version = versions[slot]
                    do throws(SpillwayError) {
                        try store.put(key, bytes: page(key: index, version: version, limit: limit))
                    } catch {
                        result.errors += 1
                        continue
                    }
                    guard appendLine(log, "put \(index) \(version)\n") else {
                        failure.withLock { $0 = .tierIO(tier: "ack log", operation: "write", errno: errno) }
                        break
                    }
                    acknowledged[slot] = version
                    last[slot] = .put(version: version)
                    result.puts += 1
                } else if choice < 7 {
                    // A remove is durable before it returns, so a kill between that and its ack
                    // line leaves the key missing with a put as its last ack: the intent line
                    // (written first) tells verify a remove was in flight.
                    guard appendLine(intents, "removing \(index) \(acknowledged[slot])\n") else {
                        failure.withLock { $0 = .tierIO(tier: "ack log", operation: "write", errno: errno) }
                        break
                    }
                    let line = "remove \(index)\n"
                    do throws(SpillwayError) {
                        try store.remove(key)
                    } catch {
                        result.errors += 1
                        continue
                    }
                    guard appendLine(log, line) else {
                        failure.withLock { $0 = .tierIO(tier: "ack log", operation: "write", errno: errno) }
                        break
                    }
                    last[slot] = .remove(removed: acknowledged[slot])
                    result.removes += 1
                } else {
                    result.gets += 1
                    let bytes: [UInt8]
                    do throws(SpillwayError) {
                        bytes = try store.get(key)
                    } catch .unknownKey {
                        continue  // removed or evicted: a cache may drop pages
                    } catch {
                        result.errors += 1
                        continue
                    }
                    // This worker is the key's only writer: the same rules as verify (a put that
                    // failed may still have become visible, so newer is not stale).
                    var check = VerifyResult()
                    classify(last[slot] ?? .remove(removed: 0), read: .some(version(of: bytes, key: index, limit: limit)), into: &check)
                    result.stale += check.stale
                    result.corrupt += check.corrupt
                }
            }
            results.withLock { $0.add(result) }
        }
        if let error = failure.withLock({ $0 }) { throw error }
        return results.withLock { $0 }
    }

    /// One line with one write(2) (an O_APPEND write of a few bytes lands whole or not at all
    /// as far as a later reader of the file can tell; verify ignores an incomplete last line).
    static func appendLine(_ fd: Int32, _ line: String) -> Bool {
        var line = line
        return line.withUTF8 { bytes in
            while true {
                let written = write(fd, bytes.baseAddress!, bytes.count)
                if written < 0 && errno == EINTR { continue }
                return written == bytes.count
            }
        }
    }

    // MARK: Verify

    /// The sidecar of an ack log: `removing KEY VERSION` before each remove starts (VERSION:
    /// the key's last acknowledged put, 0 if none). The ack log keeps its two line kinds.
    public static func intentLogPath(_ ackLog: String) -> String { ackLog + ".intents" }

    /// Removes that may have been in flight: key → the acknowledged put versions they followed.
    /// A missing or unreadable sidecar (a log not written by soak) means none.
    public static func parseIntents(_ text: String) -> [UInt64: Set<UInt64>] {
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        lines.removeLast()
        var intents: [UInt64: Set<UInt64>] = [:]
        for line in lines {
            let fields = line.split(separator: " ")
            guard fields.count == 3, fields[0] == "removing", let index = UInt64(fields[1]), let version = UInt64(fields[2]) else { continue }
            intents[index, default: []].insert(version)
        }
        return intents
    }

    /// The last acknowledged operation of one key, from the ack log.
    public enum LastOperation: Equatable, Sendable {
        case put(version: UInt64)
        /// `removed`: the version put before the remove (0: none in the log).
        case remove(removed: UInt64)
    }

    /// Parses an ack log: the last operation per key. An incomplete last line (no newline) is
    /// ignored; any other malformed line is an error naming its line number.
    public static func parseAckLog(_ text: String) throws(SpillwayError) -> [UInt64: LastOperation] {
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        // The text after the last newline is an incomplete line (or empty).
        lines.removeLast()
        var last: [UInt64: LastOperation] = [:]
        var lastPut: [UInt64: UInt64] = [:]
        for (number, line) in lines.enumerated() {
            let fields = line.split(separator: " ")
            switch (fields.first, fields.count) {
            case ("put", 3):
                guard let index = UInt64(fields[1]), let version = UInt64(fields[2]), version > 0 else { fallthrough }
                if let previous = lastPut[index], version <= previous {
                    throw .invalidArgument("ack log line \(number + 1): version \(version) of key \(index) after version \(previous)")
                }
                lastPut[index] = version
                last[index] = .put(version: version)
            case ("remove", 2):
                guard let index = UInt64(fields[1]) else { fallthrough }
                last[index] = .remove(removed: lastPut[index] ?? 0)
            default:
                throw .invalidArgument("ack log line \(number + 1) is malformed: '\(line.prefix(80))'")
            }
        }
        return last
    }

    public struct VerifyResult: Sendable, Equatable {
        public var checked = 0
        public var present = 0
        public var absent = 0
        public var stale = 0
        public var corrupt = 0
        /// Reads that failed with an error other than a missing key (I/O, checksum); also
        /// counted as `corrupt` (the store could not produce the key's bytes).
        public var errors = 0

        public init() {}

        public var json: JSONValue {
            .object([("checked", .int(checked)), ("present", .int(present)), ("absent", .int(absent)), ("stale", .int(stale)),
                     ("corrupt", .int(corrupt)), ("errors", .int(errors))])
        }

        public func passed(expectAll: Bool) -> Bool { stale == 0 && corrupt == 0 && (!expectAll || absent == 0) }
    }

    /// Classifies what the store holds for `index` against its last acknowledged operation.
    /// `read`: nil if missing, `.some(nil)` if the bytes match no version.
    public static func classify(_ operation: LastOperation, read: UInt64??, into result: inout VerifyResult) {
        result.checked += 1
        switch (operation, read) {
        case (_, .some(nil)):
            result.corrupt += 1
        case (.put, nil):
            result.absent += 1
        case (.put(let acknowledged), .some(.some(let version))):
            // Newer: a put in flight when the process died (its ack line never written).
            if version >= acknowledged { result.present += 1 } else { result.stale += 1 }
        case (.remove, nil):
            result.present += 1
        case (.remove(let removed), .some(.some(let version))):
            if version > removed { result.present += 1 } else { result.stale += 1 }
        }
    }

    /// Reopens the configured store (warm restart, never reformatting) and checks every key
    /// of the ack log.
    public static func verify(ackLog path: String, configuration: SpillwayConfiguration) throws(SpillwayError) -> VerifyResult {
        let text: String
        do {
            text = try readTextFile(path)
        } catch {
            throw .invalidArgument("cannot read ack log '\(path)': \(error)")
        }
        let operations = try parseAckLog(text)
        let intents = (try? readTextFile(intentLogPath(path))).map(parseIntents) ?? [:]
        var configuration = configuration
        for index in configuration.tiers.indices { configuration.tiers[index].reformat = false }
        let limit = pageLimit(configuration)
        let store = try TieredStore.open(configuration, daemons: InProcessDaemons())
        defer { store.close() }
        var result = VerifyResult()
        for (index, operation) in operations.sorted(by: { $0.key < $1.key }) {
            let read: UInt64??
            do throws(SpillwayError) {
                read = .some(version(of: try store.get(key(index)), key: index, limit: limit))
            } catch .unknownKey {
                read = nil
            } catch {
                result.checked += 1
                result.errors += 1
                result.corrupt += 1
                writeFully(STDERR_FILENO, "spillway: key \(index): \(error)\n")
                continue
            }
            let before = result
            if read == nil, case .put(let version) = operation, intents[index]?.contains(version) == true {
                // The last acknowledged put was followed by a remove that started (intent
                // logged) and may have become durable before its ack line: missing is right.
                result.checked += 1
                result.present += 1
                continue
            }
            classify(operation, read: read, into: &result)
            // Name the keys that are not present (on stderr, so --json stays one object).
            if result.present == before.present && result.checked - result.present <= 20 {
                let found = read.map { $0.map { "version \($0)" } ?? "bytes of no version" } ?? "missing"
                writeFully(STDERR_FILENO, "spillway: key \(index): last acknowledged \(operation), read \(found)\n")
            }
        }
        return result
    }
}
