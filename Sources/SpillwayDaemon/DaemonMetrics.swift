import Atomics
import Prometheus
import Spillway
import SpillwayRemote
import SpillwayServer

/// Exposes a daemon's state to Prometheus (swift-prometheus registry). The daemon counts in
/// plain atomics on its request path; at each scrape this sets the gauges and advances each
/// Prometheus counter by what its atomic gained since the previous scrape, so counters stay
/// monotonic and the request path never touches the registry.
///
/// Metric names are listed in docs/operations.md ("Metrics").
final class DaemonMetricsExporter: Sendable {
    let registry: PrometheusCollectorRegistry
    let server: RemoteMemoryServer
    /// Last exported value of each counter, by name and tenant.
    private let exported = Locked<[String: Int]>([:])

    init(registry: PrometheusCollectorRegistry, server: RemoteMemoryServer) {
        self.registry = registry
        self.server = server
    }

    /// Refreshes and renders the exposition text.
    func render() -> [UInt8] {
        refresh()
        return registry.emitToBuffer()
    }

    private func gauge(_ name: String, _ unit: String, _ help: String, _ value: Int, tenant: String? = nil) {
        let descriptor = MetricNameDescriptor(namespace: "spillwayd", metricName: name, unitName: unit, helpText: help)
        registry.makeGauge(descriptor: descriptor, labels: tenant.map { [("tenant", $0)] } ?? []).set(Int64(value))
    }

    private func counter(_ name: String, _ help: String, _ value: Int, tenant: String? = nil) {
        let descriptor = MetricNameDescriptor(namespace: "spillwayd", metricName: name, unitName: "total", helpText: help)
        let key = "\(descriptor.name)|\(tenant ?? "")"
        let delta = exported.withLock { exported -> Int in
            // A tenant whose lease expired comes back with fresh counters: start over from 0.
            let previous = exported[key] ?? 0
            exported[key] = value
            return value >= previous ? value - previous : value
        }
        let counter = registry.makeCounter(descriptor: descriptor, labels: tenant.map { [("tenant", $0)] } ?? [])
        if delta > 0 { counter.increment(by: Int64(delta)) }
    }

    private func refresh() {
        let snapshot = server.snapshot()
        let configuration = server.configuration
        let c = server.counters
        func load(_ atomic: ManagedAtomic<Int>) -> Int { atomic.load(ordering: .relaxed) }
        gauge("capacity", "bytes", "Memory this daemon lends in all.", configuration.capacity)
        gauge("slab_size", "bytes", "Unit of lending.", configuration.slabSize)
        gauge("slabs_lent", "", "Slabs currently mapped by clients.", snapshot.slabsLent)
        gauge("slabs_free", "", "Slabs that can still be lent.", snapshot.slabsFree)
        gauge("lent", "bytes", "Bytes of slabs currently lent.", snapshot.bytesLent)
        gauge("connections", "", "Open client connections.", snapshot.connections)
        counter("reads", "Page reads served.", load(c.reads))
        counter("writes", "Page writes stored.", load(c.writes))
        counter("read_bytes", "Bytes read by clients.", load(c.bytesRead))
        counter("written_bytes", "Bytes written by clients.", load(c.bytesWritten))
        counter("auth_failures", "Connections refused for a missing or wrong token.", load(c.authFailures))
        counter("refused_accesses", "Accesses refused: another tenant's slab, out of bounds, unknown or revoked slab.",
                load(c.refusedAccesses))
        counter("malformed_frames", "Frames rejected by the decoder.", load(c.malformedFrames))
        counter("checksum_failures", "Payloads whose CRC32C did not match.", load(c.checksumFailures))
        counter("reclaim_notices", "Slabs asked back because free host memory fell below the headroom.", load(c.reclaimNotices))
        counter("revoked_slabs", "Reclaimed slabs taken back at their deadline.", load(c.revokedSlabs))
        counter("expired_leases", "Disconnected tenants whose slabs were freed after the lease.", load(c.expiredLeases))
        counter("handshake_timeouts", "Connections cut off for not finishing the handshake in time.", load(c.handshakeTimeouts))
        counter("handshake_evictions", "Unauthenticated connections evicted to make room for newer ones.", load(c.handshakeEvictions))
        counter("stuck_peers", "Connections dropped because the client stopped reading replies.", load(c.stuckPeers))
        counter("token_reloads", "Token file reloads (SIGHUP).", load(c.tokenReloads))
        counter("removed_tenant_connections", "Connections closed because a reload removed their tenant.", load(c.removedTenantConnections))
        for tenant in snapshot.tenants {
            gauge("tenant_slabs", "", "Slabs a tenant holds.", tenant.slabs, tenant: tenant.name)
            gauge("tenant_connections", "", "A tenant's open connections.", tenant.connections, tenant: tenant.name)
            counter("tenant_reads", "A tenant's page reads.", tenant.reads, tenant: tenant.name)
            counter("tenant_writes", "A tenant's page writes.", tenant.writes, tenant: tenant.name)
            counter("tenant_read_bytes", "Bytes a tenant read.", tenant.bytesRead, tenant: tenant.name)
            counter("tenant_written_bytes", "Bytes a tenant wrote.", tenant.bytesWritten, tenant: tenant.name)
            counter("tenant_refused", "A tenant's refused accesses.", tenant.refused, tenant: tenant.name)
        }
    }
}
