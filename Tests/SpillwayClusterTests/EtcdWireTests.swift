import Testing
@testable import SpillwayCluster
import SpillwayCore

/// The reply decoders on their own: every malformed shape is a typed error, never a trap.
@Suite struct EtcdWireTests {
    func json(_ text: String) throws -> JSONValue { try JSONValue.parse(text) }

    @Test func decodesTheShapesEtcd34Sends() throws {
        // Copied from etcd 3.4.23's gateway on this machine.
        let range = try json(#"{"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952","revision":"6","raft_term":"2"},"kvs":[{"key":"L2Ev","create_revision":"6","mod_revision":"6","version":"1","value":"AA==","lease":"2324035625778798866"}],"count":"1"}"#)
        let parsed = try EtcdWire.parseRange(range)
        #expect(parsed.revision == 6)
        #expect(parsed.entries.count == 1)
        #expect(parsed.entries[0].key == "/a/")
        #expect(parsed.entries[0].value == [0])
        #expect(parsed.entries[0].modRevision == 6)
        #expect(try EtcdWire.parseRange(json(#"{"header":{"revision":"2"}}"#)).entries.isEmpty)
        #expect(try EtcdWire.parseLeaseGrant(json(#"{"header":{"revision":"1"},"ID":"2324035625778798854","TTL":"5"}"#)) == 2324035625778798854)
        #expect(try EtcdWire.parseKeepAlive(json(#"{"result":{"header":{"revision":"3"},"ID":"7","TTL":"4"}}"#), lease: 7) == 4)
        #expect(try EtcdWire.parseDeleted(json(#"{"header":{"revision":"3"},"deleted":"1"}"#)) == 1)
        let watch = try EtcdWire.parseWatchMessage(Array(#"{"result":{"header":{"revision":"5"},"events":[{"kv":{"key":"L2EvYw==","create_revision":"4","mod_revision":"4","version":"1"}},{"type":"DELETE","kv":{"key":"L2EvYw==","mod_revision":"5"}}]}}"#.utf8))
        #expect(watch.events == [EtcdEvent(kind: .put, key: "/a/c", value: [], revision: 4), EtcdEvent(kind: .delete, key: "/a/c", value: [], revision: 5)])
        #expect(try EtcdWire.parseWatchMessage(Array(#"{"result":{"header":{"revision":"3"},"created":true}}"#.utf8)).created)
    }

    @Test func anAbsentTTLMeansTheLeaseIsGone() throws {
        let reply = try json(#"{"result":{"header":{"revision":"7"},"ID":"99"}}"#)
        #expect(throws: EtcdError.leaseExpired(99)) { try EtcdWire.parseKeepAlive(reply, lease: 99) }
    }

    @Test func aCompactedWatchSaysSo() {
        let line = Array(#"{"result":{"header":{"raft_term":"2"},"canceled":true,"compact_revision":"4"}}"#.utf8)
        #expect(throws: EtcdError.compacted(4)) { try EtcdWire.parseWatchMessage(line) }
    }

    @Test(arguments: [
        "{not json", "[]", "\"x\"", "{}", #"{"header":[]}"#, #"{"header":{"revision":"x"}}"#, #"{"header":{"revision":true}}"#,
        #"{"header":{"revision":"1"},"kvs":{}}"#, #"{"header":{"revision":"1"},"kvs":[1]}"#,
        #"{"header":{"revision":"1"},"kvs":[{"value":"AA=="}]}"#,
        #"{"header":{"revision":"1"},"kvs":[{"key":"!!!not base64"}]}"#,
        #"{"header":{"revision":"1"},"kvs":[{"key":"L2E=","value":"%%%"}]}"#,
        #"{"header":{"revision":"1"},"kvs":[{"key":"L2E=","value":5}]}"#,
        #"{"header":{"revision":"1"},"kvs":[{"key":"/w=="}]}"#,
        #"{"header":{"revision":"1"},"kvs":[{"key":"L2E=","mod_revision":"99999999999999999999"}]}"#,
        #"{"header":{"revision":"1"},"kvs":[],"more":true}"#,
    ])
    func malformedRangeRepliesAreBadResponses(_ text: String) {
        #expect(throws: EtcdError.self) {
            try EtcdWire.parseRange(EtcdWire.parse(Array(text.utf8)))
        }
        do {
            _ = try EtcdWire.parseRange(EtcdWire.parse(Array(text.utf8)))
        } catch {
            guard case .badResponse = error else {
                Issue.record("expected .badResponse, got \(error)")
                return
            }
        }
    }

    @Test(arguments: [
        "", "{", "[]", "{}", #"{"result":1}"#, #"{"error":{"message":"boom"}}"#, #"{"result":{"events":{}}}"#,
        #"{"result":{"events":[1]}}"#, #"{"result":{"events":[{"type":"PUT"}]}}"#,
        #"{"result":{"events":[{"type":"MOVE","kv":{"key":"L2E="}}]}}"#,
        #"{"result":{"events":[{"kv":{"key":"@@@"}}]}}"#, #"{"result":{"canceled":true}}"#,
        #"{"result":{"header":{"revision":[]}}}"#,
    ])
    func malformedWatchLinesAreTypedErrors(_ text: String) {
        #expect(throws: EtcdError.self) { try EtcdWire.parseWatchMessage(Array(text.utf8)) }
    }

    @Test func malformedLeaseRepliesAreTypedErrors() throws {
        for text in [#"{}"#, #"{"ID":"0","TTL":"5"}"#, #"{"ID":"5"}"#, #"{"ID":"x","TTL":"5"}"#, #"{"error":"too many leases"}"#] {
            #expect(throws: EtcdError.self) { try EtcdWire.parseLeaseGrant(try json(text)) }
        }
        for text in [#"{}"#, #"{"result":"x"}"#, #"{"result":{"TTL":"ten"}}"#, #"{"error":{"message":"no leader"}}"#] {
            #expect(throws: EtcdError.self) { try EtcdWire.parseKeepAlive(try json(text), lease: 1) }
        }
        #expect(EtcdWire.errorMessage(Array(#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#.utf8)) == "etcdserver: requested lease not found")
        #expect(EtcdWire.errorMessage(Array("<html>502</html>".utf8)) == "<html>502</html>")
    }

    @Test func prefixRanges() {
        #expect(EtcdWire.prefixRange("/a/") == (Array("/a/".utf8), Array("/a0".utf8)))
        #expect(EtcdWire.prefixRange("") == ([0], [0]))
        #expect(EtcdWire.prefixRange("a\u{7F}").end == [UInt8(ascii: "a"), 0x80])
    }
}

@Suite struct ClusterRecordTests {
    @Test func clusterNamesAreValidated() throws {
        for good in ["a", "prod-1", "eu.west_2", String(repeating: "x", count: 64)] {
            #expect(try ClusterKeys(cluster: good).cluster == good)
        }
        for bad in ["", "a/b", "..", ".", "a b", "é", String(repeating: "x", count: 65), "a\n"] {
            #expect(throws: ClusterError.invalidClusterName(bad)) { try ClusterKeys(cluster: bad) }
        }
        let keys = try ClusterKeys(cluster: "prod")
        #expect(try keys.daemonKey(instance: "0123456789abcdef") == "/spillway/prod/daemons/0123456789abcdef")
        #expect(try keys.stateKey(instance: "ff") == "/spillway/prod/state/ff")
        #expect(throws: ClusterError.self) { try keys.daemonKey(instance: "../x") }
        #expect(throws: ClusterError.self) { try keys.daemonKey(instance: "ABC") }
        #expect(throws: ClusterError.self) { try keys.daemonKey(instance: "00112233445566778") }
        #expect(keys.instance(fromKey: "/spillway/prod/daemons/ab", prefix: keys.daemonsPrefix) == "ab")
        #expect(keys.instance(fromKey: "/spillway/prod/daemons/ab/x", prefix: keys.daemonsPrefix) == nil)
    }

    @Test func recordsRoundTripAndRefuseGarbage() throws {
        let original = try DaemonRecord(address: "10.0.0.5:7070", transports: ["tcp", "rma"], capacity: 64 << 30, freeSlabs: 1000,
                                        slabSize: 64 << 20, failureDomain: "rack \"7\"", instance: "9f3a", registeredAt: 1_790_000_123)
        let bytes = original.encoded()
        #expect(try DaemonRecord.decode(bytes) == original)
        #expect(String(decoding: bytes, as: UTF8.self).contains(#""free_slabs": 1000"#))
        for text in [
            "", "{", "[]", #"{"address":"a:1"}"#,
            #"{"address":"a:1","transports":["udp"],"capacity":1,"free_slabs":1,"slab_size":1,"failure_domain":"","instance":"1","registered_at":0}"#,
            #"{"address":"a:1","transports":["tcp"],"capacity":-1,"free_slabs":1,"slab_size":1,"failure_domain":"","instance":"1","registered_at":0}"#,
            #"{"address":"a:1","transports":["tcp"],"capacity":1,"free_slabs":1,"slab_size":1,"failure_domain":"","instance":"XYZ","registered_at":0}"#,
            #"{"address":"a:1","transports":"tcp","capacity":1,"free_slabs":1,"slab_size":1,"failure_domain":"","instance":"1","registered_at":0}"#,
            #"{"address":"nocolon","transports":["tcp"],"capacity":1,"free_slabs":1,"slab_size":1,"failure_domain":"","instance":"1","registered_at":0}"#,
            #"{"address":"a:1","transports":["tcp"],"capacity":1.5,"free_slabs":1,"slab_size":1,"failure_domain":"","instance":"1","registered_at":0}"#,
        ] {
            #expect(throws: ClusterError.self) { try DaemonRecord.decode(Array(text.utf8)) }
        }
        #expect(HealthState(rawValue: "draining") == .draining)
        #expect(HealthState.allCases.map(\.rawValue) == ["live", "suspect", "draining", "dead"])
    }

    @Test func aResyncReportsTheDifference() throws {
        let a = try record("a"), b = try record("b"), c = try record("c"), bFuller = try record("b", freeSlabs: 1)
        let events = ClusterMembership.difference(from: ["a": a, "b": b], to: ["b": bFuller, "c": c])
        #expect(events == [.updated(bFuller), .joined(c), .left(instance: "a")])
        #expect(ClusterMembership.difference(from: ["a": a], to: ["a": a]).isEmpty)
    }
}
