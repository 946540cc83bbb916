import Foundation
import Glibc
import Logging
import Testing
@testable import SpillwayCore
@testable import SpillwayRemote
@testable import SpillwayStore
import SpillwayTestSupport

/// Keeps every log record (message and metadata) a logger emits.
final class RecordingLogHandler: LogHandler, @unchecked Sendable {
    let records: Locked<[(level: Logger.Level, message: String, metadata: Logger.Metadata)]>
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    init(_ records: Locked<[(level: Logger.Level, message: String, metadata: Logger.Metadata)]>) { self.records = records }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String, file: String,
             function: String, line: UInt)
    {
        records.withLock { $0.append((level, message.description, self.metadata.merging(metadata ?? [:]) { $1 })) }
    }
}

@Suite(.serialized) struct TenantLimitTests {
    /// A daemon whose token file caps tenants (`NAME TOKEN SIZE`): the refusal's own words
    /// reach the client — logged once per daemon with the daemon and tenant, kept by the
    /// fleet and the tier — and a put that no daemon can place fails, with the tier saying why.
    @Test func aTenantAtItsTokenFileLimitIsToldWhyNotJustFull() throws {
        let path = NSTemporaryDirectory() + "spillway-limit-\(getpid()).tokens"
        let tokens = "alice alice-token-0123456789abcdef 2m\nbob bob-token-0123456789abcdef 512k\n"
        try tokens.write(toFile: path, atomically: true, encoding: .utf8)
        chmod(path, 0o600)
        defer { unlink(path) }
        let daemon = try DaemonProcess(arguments: ["--token-file", path])
        let records = Locked<[(level: Logger.Level, message: String, metadata: Logger.Metadata)]>([])
        let logger = Logger(label: "test.limit") { _ in RecordingLogHandler(records) }

        // alice may hold two 1 MiB slabs: the first 512 slots map, the next one cannot.
        let alice = try RemoteTier(RemoteTierConfiguration(
            servers: [daemon.endpoint], credentials: ClientCredentials(tenant: "alice", token: Array("alice-token-0123456789abcdef".utf8)),
            capacity: 4 << 20, slotSize: 4096, ioTimeout: 2, heartbeatInterval: 0), logger: logger)
        defer { alice.close() }
        #expect(alice.allocate(slotCount: 256) != nil)
        #expect(alice.allocate(slotCount: 256) != nil)
        #expect(alice.mappingFailure == nil)
        #expect(alice.allocate(slotCount: 1) == nil)
        #expect(alice.allocate(slotCount: 1) == nil)
        let refusal = try #require(alice.fleet.capacityRefusal(0))
        #expect(refusal.contains("tenant 'alice' is at its limit of 2MiB"), "\(refusal)")
        let failure = try #require(alice.mappingFailure)
        #expect(failure.contains("at its limit of 2MiB") && failure.contains(daemon.endpoint.description), "\(failure)")
        let logged = records.withLock { $0 }
        let warnings = logged.filter { $0.level == .warning && $0.message.contains("refused a slab") }
        #expect(warnings.count == 1, "one warning per daemon, got \(warnings.map(\.message))")
        #expect(warnings.first?.metadata["tenant"]?.description == "alice")
        #expect(warnings.first?.metadata["daemon"]?.description == daemon.endpoint.description)
        #expect(warnings.first?.metadata["reason"]?.description.contains("limit of 2MiB") == true)
        let errors = logged.filter { $0.level == .error && $0.message.contains("no daemon can map a slab") }
        #expect(errors.count == 1, "logged once while the reason stands, got \(errors.count)")
        #expect(errors.first?.metadata["reason"]?.description.contains("limit of 2MiB") == true)

        // bob's limit is below one slab: his store's very first put fails, and the tier says why.
        let bob = try RemoteTier(RemoteTierConfiguration(
            servers: [daemon.endpoint], credentials: ClientCredentials(tenant: "bob", token: Array("bob-token-0123456789abcdef".utf8)),
            capacity: 4 << 20, slotSize: 4096, ioTimeout: 2, heartbeatInterval: 0), logger: logger)
        let store = try TieredStore(tiers: [bob], options: StoreOptions(maxPageSize: 4096, backgroundWorker: false))
        defer { store.close() }
        let page = [UInt8](repeating: 7, count: 4096)
        #expect(throws: SpillwayError.self) { try store.put(PageKey(1), bytes: page) }
        let bobFailure = try #require(bob.mappingFailure)
        #expect(bobFailure.contains("tenant 'bob' is at its limit of 512KiB"), "\(bobFailure)")
        #expect(records.withLock { $0 }.contains { $0.level == .error && $0.metadata["tenant"]?.description == "bob"
            && $0.metadata["reason"]?.description.contains("512KiB") == true })
    }
}
