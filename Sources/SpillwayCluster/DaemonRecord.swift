import SpillwayCore

/// Why a cluster name, instance id or registry record was refused. Kept apart from
/// `EtcdError`: these are caller or data mistakes, not etcd failures.
public enum ClusterError: Error, Sendable, Equatable, CustomStringConvertible {
    case invalidClusterName(String)
    case invalidInstance(String)
    case invalidRecord(String)

    public var description: String {
        switch self {
        case .invalidClusterName(let name): "invalid cluster name \"\(name.prefix(80))\": use 1-64 of A-Z a-z 0-9 . _ -"
        case .invalidInstance(let instance): "invalid daemon instance \"\(instance.prefix(80))\": use 1-16 lowercase hex digits"
        case .invalidRecord(let detail): "invalid daemon record: \(detail)"
        }
    }
}

/// The etcd key layout of one cluster, so every writer and reader agrees on it:
/// `/spillway/<cluster>/daemons/<instance>` holds a `DaemonRecord` under the daemon's lease,
/// `/spillway/<cluster>/state/<instance>` holds the `HealthState` judged by clients. The name
/// is validated because it becomes part of a key prefix: a `/` in it would let one cluster
/// read another's daemons.
public struct ClusterKeys: Sendable, Equatable {
    public let cluster: String

    public init(cluster: String) throws(ClusterError) {
        guard (1...64).contains(cluster.utf8.count),
              cluster.utf8.allSatisfy({ Self.isNameByte($0) }),
              cluster != ".", cluster != ".."
        else { throw .invalidClusterName(cluster) }
        self.cluster = cluster
    }

    static func isNameByte(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
             UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "-"): true
        default: false
        }
    }

    /// A daemon instance id as it appears in keys: 1-16 lowercase hex digits (a UInt64).
    public static func validateInstance(_ instance: String) throws(ClusterError) {
        guard (1...16).contains(instance.utf8.count),
              instance.utf8.allSatisfy({ (0x30...0x39).contains($0) || (0x61...0x66).contains($0) })
        else { throw .invalidInstance(instance) }
    }

    public var daemonsPrefix: String { "/spillway/\(cluster)/daemons/" }
    public var statePrefix: String { "/spillway/\(cluster)/state/" }

    public func daemonKey(instance: String) throws(ClusterError) -> String {
        try Self.validateInstance(instance)
        return daemonsPrefix + instance
    }

    public func stateKey(instance: String) throws(ClusterError) -> String {
        try Self.validateInstance(instance)
        return statePrefix + instance
    }

    /// The instance named by a key under `prefix`, or nil for a key that is not one of ours.
    func instance(fromKey key: String, prefix: String) -> String? {
        guard key.hasPrefix(prefix) else { return nil }
        let instance = String(key.dropFirst(prefix.count))
        do {
            try Self.validateInstance(instance)
            return instance
        } catch {
            return nil
        }
    }
}

/// What a daemon tells the cluster about itself, so clients can place stripes without first
/// connecting: where to reach it, how (TCP, or TCP plus one-sided RMA), how much room it has,
/// which failure domain it shares fate with, and which incarnation it is (a restarted daemon
/// has a new `instance` and must never have its old slabs trusted).
public struct DaemonRecord: Sendable, Equatable {
    /// "host:port" of the daemon's TCP listener.
    public var address: String
    /// "tcp", optionally "rma".
    public var transports: [String]
    /// Bytes the daemon offers in all.
    public var capacity: UInt64
    public var freeSlabs: UInt64
    public var slabSize: UInt64
    public var failureDomain: String
    /// The daemon instance id, lowercase hex (`String(id, radix: 16)`).
    public var instance: String
    /// Unix seconds when this incarnation registered.
    public var registeredAt: Int64

    public init(address: String, transports: [String], capacity: UInt64, freeSlabs: UInt64, slabSize: UInt64,
                failureDomain: String, instance: String, registeredAt: Int64) throws(ClusterError)
    {
        try ClusterKeys.validateInstance(instance)
        guard !address.isEmpty, address.utf8.count <= 300, address.contains(":") else { throw .invalidRecord("address \"\(address.prefix(80))\" is not host:port") }
        guard transports.contains("tcp"), transports.allSatisfy({ $0 == "tcp" || $0 == "rma" }) else {
            throw .invalidRecord("transports \(transports) must include tcp and name only tcp or rma")
        }
        guard failureDomain.utf8.count <= 256 else { throw .invalidRecord("failure domain longer than 256 bytes") }
        guard capacity <= Int.max, freeSlabs <= Int.max, slabSize <= Int.max else { throw .invalidRecord("sizes beyond Int64") }
        self.address = address
        self.transports = transports
        self.capacity = capacity
        self.freeSlabs = freeSlabs
        self.slabSize = slabSize
        self.failureDomain = failureDomain
        self.instance = instance
        self.registeredAt = registeredAt
    }

    /// The record as stored in etcd: one JSON object.
    public func encoded() -> [UInt8] {
        let value = JSONValue.object([
            ("address", .string(address)),
            ("transports", .array(transports.map { .string($0) })),
            ("capacity", .int(Int(capacity))),
            ("free_slabs", .int(Int(freeSlabs))),
            ("slab_size", .int(Int(slabSize))),
            ("failure_domain", .string(failureDomain)),
            ("instance", .string(instance)),
            ("registered_at", .int(Int(registeredAt))),
        ])
        return Array(value.serialized().utf8)
    }

    /// Decodes a stored record, refusing anything malformed (another writer, an older
    /// format, garbage): a bad record must cost one warning, not a crash.
    public static func decode(_ bytes: [UInt8]) throws(ClusterError) -> DaemonRecord {
        let value: JSONValue
        do {
            value = try JSONValue.parse(bytes, maxDepth: 4, maxBytes: 64 << 10)
        } catch {
            throw .invalidRecord("\(error)")
        }
        func string(_ name: String) throws(ClusterError) -> String {
            guard let text = value[name]?.stringValue else { throw .invalidRecord("\(name) missing or not a string") }
            return text
        }
        func count(_ name: String) throws(ClusterError) -> UInt64 {
            guard let number = value[name]?.intValue, number >= 0 else { throw .invalidRecord("\(name) missing or not a non-negative integer") }
            return UInt64(number)
        }
        guard let transportValues = value["transports"]?.arrayValue else { throw .invalidRecord("transports missing or not an array") }
        var transports: [String] = []
        for transport in transportValues {
            guard let name = transport.stringValue else { throw .invalidRecord("transports holds a non-string") }
            transports.append(name)
        }
        guard let registeredAt = value["registered_at"]?.intValue else { throw .invalidRecord("registered_at missing or not an integer") }
        return try DaemonRecord(address: try string("address"), transports: transports, capacity: try count("capacity"),
                                freeSlabs: try count("free_slabs"), slabSize: try count("slab_size"),
                                failureDomain: try string("failure_domain"), instance: try string("instance"),
                                registeredAt: Int64(registeredAt))
    }
}

/// A client's verdict on a daemon, shared through etcd so every client (and a fresh
/// `cluster status`) sees the same one. Clients judge; daemons never write it.
public enum HealthState: String, Sendable, CaseIterable {
    case live, suspect, draining, dead
}
