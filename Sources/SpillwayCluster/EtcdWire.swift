import Foundation
import SpillwayCore

/// Decoding of etcd v3 JSON-gateway replies, kept apart from the transport so every malformed
/// shape (bad JSON, wrong types, bad base64, missing fields) is unit-tested directly. The
/// gateway omits proto3 default values, so an absent int64 means 0 and an absent list means
/// empty; int64s arrive as strings.
enum EtcdWire {
    static func base64(_ bytes: [UInt8]) -> String { Data(bytes).base64EncodedString() }

    static func unbase64(_ text: String, field: String) throws(EtcdError) -> [UInt8] {
        guard let data = Data(base64Encoded: text) else { throw .badResponse("\(field) is not base64") }
        return [UInt8](data)
    }

    /// `[prefix, prefix+1)`: the range_end etcd expects for "every key with this prefix".
    /// The empty prefix means every key ("\0" to "\0").
    static func prefixRange(_ prefix: String) -> (start: [UInt8], end: [UInt8]) {
        var end = Array(prefix.utf8)
        guard !end.isEmpty else { return ([0], [0]) }
        while let last = end.last {
            if last < 0xFF {
                end[end.count - 1] = last + 1
                return (Array(prefix.utf8), end)
            }
            end.removeLast()
        }
        return (Array(prefix.utf8), [0])
    }

    static func parse(_ bytes: [UInt8]) throws(EtcdError) -> JSONValue {
        do {
            return try JSONValue.parse(bytes)
        } catch {
            throw .badResponse("\(error)")
        }
    }

    /// An int64 field: a decimal string (or a bare number); absent means 0.
    static func int64(_ value: JSONValue?, field: String) throws(EtcdError) -> Int64 {
        switch value {
        case nil: return 0
        case .string(let text)?:
            guard let number = Int64(text) else { throw .badResponse("\(field) is not an int64: \(text.prefix(40))") }
            return number
        case .int(let number)?: return Int64(number)
        default: throw .badResponse("\(field) is not an int64")
        }
    }

    static func object(_ value: JSONValue?, field: String) throws(EtcdError) -> JSONValue? {
        switch value {
        case nil: return nil
        case .object?: return value
        default: throw .badResponse("\(field) is not an object")
        }
    }

    static func requireObject(_ value: JSONValue) throws(EtcdError) {
        guard case .object = value else { throw .badResponse("reply is not a JSON object") }
    }

    /// header.revision of a reply (put, revoke, delete); the header must be there.
    static func parseHeaderRevision(_ reply: JSONValue) throws(EtcdError) -> Int64 {
        try requireObject(reply)
        guard let header = try object(reply["header"], field: "header") else { throw .badResponse("reply has no header") }
        return try int64(header["revision"], field: "header.revision")
    }

    static func parseLeaseGrant(_ reply: JSONValue) throws(EtcdError) -> Int64 {
        try requireObject(reply)
        if let error = reply["error"]?.stringValue, !error.isEmpty { throw .badResponse("lease grant refused: \(error)") }
        let id = try int64(reply["ID"], field: "ID")
        guard id != 0 else { throw .badResponse("lease grant without an ID") }
        guard try int64(reply["TTL"], field: "TTL") > 0 else { throw .badResponse("lease grant with no TTL") }
        return id
    }

    /// The keepalive reply is one message of a stream: `{"result":{"ID":…,"TTL":…}}`. A TTL of
    /// 0 (absent) means etcd no longer has the lease.
    static func parseKeepAlive(_ reply: JSONValue, lease: Int64) throws(EtcdError) -> Int64 {
        try requireObject(reply)
        if let error = try object(reply["error"], field: "error") {
            throw .badResponse("keepalive error: \(error["message"]?.stringValue ?? error.serialized())")
        }
        guard let result = try object(reply["result"], field: "result") else { throw .badResponse("keepalive reply has no result") }
        let ttl = try int64(result["TTL"], field: "result.TTL")
        guard ttl > 0 else { throw .leaseExpired(lease) }
        return ttl
    }

    static func parseDeleted(_ reply: JSONValue) throws(EtcdError) -> Int64 {
        _ = try parseHeaderRevision(reply)
        return try int64(reply["deleted"], field: "deleted")
    }

    static func parseKeyValue(_ kv: JSONValue, field: String) throws(EtcdError) -> (key: String, value: [UInt8], modRevision: Int64) {
        guard case .object = kv else { throw .badResponse("\(field) is not an object") }
        guard let keyText = kv["key"]?.stringValue else { throw .badResponse("\(field) has no key") }
        let keyBytes = try unbase64(keyText, field: "\(field).key")
        guard let key = String(validating: keyBytes, as: UTF8.self) else { throw .badResponse("\(field).key is not UTF-8") }
        let value: [UInt8]
        switch kv["value"] {
        case nil: value = []
        case .string(let text)?: value = try unbase64(text, field: "\(field).value")
        default: throw .badResponse("\(field).value is not a string")
        }
        return (key, value, try int64(kv["mod_revision"], field: "\(field).mod_revision"))
    }

    static func parseRange(_ reply: JSONValue) throws(EtcdError)
        -> (entries: [(key: String, value: [UInt8], modRevision: Int64)], revision: Int64)
    {
        let revision = try parseHeaderRevision(reply)
        var entries: [(key: String, value: [UInt8], modRevision: Int64)] = []
        switch reply["kvs"] {
        case nil: break
        case .array(let kvs)?:
            for (index, kv) in kvs.enumerated() { entries.append(try parseKeyValue(kv, field: "kvs[\(index)]")) }
        default: throw .badResponse("kvs is not an array")
        }
        if reply["more"]?.boolValue == true { throw .badResponse("range reply truncated (more = true)") }
        return (entries, revision)
    }

    /// One line of the watch stream.
    struct WatchMessage {
        var created = false
        var revision: Int64 = 0
        var events: [EtcdEvent] = []
    }

    static func parseWatchMessage(_ line: [UInt8]) throws(EtcdError) -> WatchMessage {
        let message = try parse(line)
        try requireObject(message)
        if let error = try object(message["error"], field: "error") {
            throw .badResponse("watch error: \(error["message"]?.stringValue ?? error.serialized())")
        }
        guard let result = try object(message["result"], field: "result") else { throw .badResponse("watch message has no result") }
        var parsed = WatchMessage()
        if let header = try object(result["header"], field: "result.header") {
            parsed.revision = try int64(header["revision"], field: "result.header.revision")
        }
        parsed.created = result["created"]?.boolValue ?? false
        if result["canceled"]?.boolValue == true {
            let compact = try int64(result["compact_revision"], field: "result.compact_revision")
            if compact > 0 { throw .compacted(compact) }
            throw .badResponse("watch canceled: \(result["cancel_reason"]?.stringValue ?? "no reason given")")
        }
        switch result["events"] {
        case nil: break
        case .array(let events)?:
            for (index, event) in events.enumerated() {
                guard case .object = event else { throw .badResponse("events[\(index)] is not an object") }
                let kind: EtcdEvent.Kind
                switch event["type"] {
                case nil, .string("PUT")?: kind = .put
                case .string("DELETE")?: kind = .delete
                default: throw .badResponse("events[\(index)].type is not PUT or DELETE")
                }
                guard let kvValue = event["kv"] else { throw .badResponse("events[\(index)] has no kv") }
                let kv = try parseKeyValue(kvValue, field: "events[\(index)].kv")
                parsed.events.append(EtcdEvent(kind: kind, key: kv.key, value: kind == .put ? kv.value : [], revision: kv.modRevision))
            }
        default: throw .badResponse("events is not an array")
        }
        return parsed
    }

    /// The message of an error reply (`{"error":…,"message":…,"code":…}`), or its start as text.
    static func errorMessage(_ bytes: [UInt8]) -> String {
        if let reply = try? JSONValue.parse(bytes), let message = reply["message"]?.stringValue ?? reply["error"]?.stringValue {
            return message
        }
        return String(decoding: bytes.prefix(200), as: UTF8.self)
    }
}
