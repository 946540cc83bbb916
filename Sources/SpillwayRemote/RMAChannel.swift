import Logging
import SpillwayCore
import SpillwayFabric

#if canImport(Glibc)
import Glibc
#endif

/// A client's one-sided path to one daemon: a libfabric endpoint of the daemon's provider, a
/// bounce arena registered once at open (`FabricAccess.local`), the daemon's address, and the
/// grant of every slab the daemon mapped for us with a memory region.
///
/// Why a bounce arena: the tiers' page buffers belong to the store and change every batch;
/// registering them per batch costs an `fi_mr_reg`/`fi_close` pair per page (and, on verbs,
/// pinning), while a copy of 4 KiB costs far less than the round trip. Pages move by
/// `fi_write` (after a copy into the arena) and `fi_read` (then a copy out), completions
/// batched by `FabricEndpoint`.
///
/// What it cannot do it hands back to the caller, which sends it over Spillway's TCP protocol
/// on the same daemon: operations on slabs with no grant (held from an earlier connection, or
/// whose registration failed), operations larger than the arena, and every operation that
/// failed on the fabric (a revoked key, a lost peer). The daemon's TCP answer is the
/// authoritative, typed one (e.g. `slabRevoked` → ENXIO), and after a fabric failure the
/// endpoint is reopened (an access error kills the provider's connection).
///
/// `@unchecked Sendable`: everything mutable is behind `state`'s lock, which a batch holds for
/// its duration (batches to one daemon over RMA run one at a time).
final class RMAChannel: @unchecked Sendable {
    let providerName: String
    let daemonAddress: [UInt8]
    /// The local address to open on (loopback for a daemon on loopback), nil: the provider's choice.
    let node: String?
    let arena: UnsafeMutableRawBufferPointer
    private let timeout: Duration
    private let logger: Logger

    private struct Live {
        let endpoint: FabricEndpoint
        let region: FabricMemoryRegion
        let peer: FabricPeer
    }

    private struct State {
        var live: Live?
        var grants: [UInt32: FabricRegionGrant] = [:]
        var transfers: [FabricTransfer] = []
        var members: [Int] = []
        var failed: [Bool] = []
    }

    private let state: Locked<State>
    /// Fabric failures that sent operations back to TCP, and endpoint reopenings.
    let fallbacks = Locked(0)

    /// Opens the endpoint and registers the arena.
    /// - Throws: `SpillwayError.transport` from libfabric (provider refused, registration
    ///   failed with its errno and the `ulimit -l` hint, address not accepted).
    init(provider: String, daemonAddress: [UInt8], node: String?, arenaBytes: Int, timeout: Double, logger: Logger) throws(SpillwayError) {
        providerName = provider
        self.node = node
        self.daemonAddress = daemonAddress
        self.timeout = .milliseconds(Int64(max(0.1, timeout) * 1000))
        self.logger = logger
        let size = max(1 << 20, (arenaBytes + 4095) & ~4095)
        guard let memory = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), memory != MAP_FAILED else {
            throw .invalidConfiguration("cannot allocate the RMA bounce arena of \(size) bytes")
        }
        arena = UnsafeMutableRawBufferPointer(start: memory, count: size)
        do {
            let live = try Self.open(provider: provider, node: node, daemonAddress: daemonAddress, arena: arena)
            state = Locked(State(live: live))
        } catch {
            munmap(memory, size)
            throw error
        }
    }

    deinit {
        state.withLock { state in
            state.live?.region.close()
            state.live = nil
        }
        munmap(arena.baseAddress, arena.count)
    }

    private static func open(provider: String, node: String?, daemonAddress: [UInt8], arena: UnsafeMutableRawBufferPointer) throws(SpillwayError) -> Live {
        let info = try FabricProvider.discover(provider: provider, node: node)
        let endpoint = try FabricEndpoint(provider: info, options: .init(maxInFlight: 64))
        let region = try endpoint.register(arena, access: .local)
        let peer = try endpoint.insertPeer(address: daemonAddress)
        return Live(endpoint: endpoint, region: region, peer: peer)
    }

    /// Whether an endpoint is open (false after a reopen failed: everything goes over TCP).
    var isOpen: Bool { state.withLock { $0.live != nil } }

    func setGrant(_ grant: FabricRegionGrant?, for slab: UInt32) {
        state.withLock { $0.grants[slab] = grant }
    }

    func grant(for slab: UInt32) -> FabricRegionGrant? { state.withLock { $0.grants[slab] } }

    /// Runs what it can of `operations` (status 0 on success) and appends the indexes of the
    /// rest to `retry`, for the caller to send over TCP.
    func execute(_ operations: UnsafeMutableBufferPointer<RemoteOperation>, retry: inout [Int]) {
        state.withLock { state in
            guard let live = state.live else {
                retry.append(contentsOf: 0..<operations.count)
                return
            }
            let capacity = arena.count
            let base = arena.baseAddress!
            var index = 0
            var reopen = false
            while index < operations.count {
                let first = operations[index]
                guard let grant = state.grants[first.slab], first.length <= capacity,
                      first.offset <= UInt64(grant.length), UInt64(first.length) <= UInt64(grant.length) - first.offset
                else {
                    retry.append(index)
                    index += 1
                    continue
                }
                // A run of same-direction operations with grants that fits the arena.
                state.transfers.removeAll(keepingCapacity: true)
                state.members.removeAll(keepingCapacity: true)
                var used = 0
                while index < operations.count {
                    let operation = operations[index]
                    guard operation.write == first.write, let grant = state.grants[operation.slab],
                          operation.length <= capacity - used, operation.offset <= UInt64(grant.length),
                          UInt64(operation.length) <= UInt64(grant.length) - operation.offset
                    else { break }
                    state.transfers.append(FabricTransfer(localOffset: used, remote: FabricRemoteRegion(peer: live.peer, grant: grant),
                                                          remoteOffset: Int(operation.offset), length: operation.length))
                    if operation.write { (base + used).copyMemory(from: operation.buffer, byteCount: operation.length) }
                    state.members.append(index)
                    used += operation.length
                    index += 1
                }
                state.failed.removeAll(keepingCapacity: true)
                state.failed.append(contentsOf: repeatElement(false, count: state.members.count))
                do {
                    let result = first.write
                        ? try live.endpoint.write(state.transfers, from: live.region, timeout: timeout)
                        : try live.endpoint.read(state.transfers, into: live.region, timeout: timeout)
                    for failure in result.failures where failure.index < state.failed.count { state.failed[failure.index] = true }
                    if !result.failures.isEmpty {
                        reopen = true
                        logger.notice("RMA transfers failed; retrying them over TCP", metadata: [
                            "failed": "\(result.failures.count)", "error": "\(result.failures[0].error)"])
                    }
                } catch {
                    for position in state.failed.indices { state.failed[position] = true }
                    reopen = true
                    logger.warning("RMA batch failed; retrying it over TCP", metadata: ["error": "\(error)"])
                }
                for (position, member) in state.members.enumerated() {
                    if state.failed[position] {
                        retry.append(member)
                        continue
                    }
                    let operation = operations[member]
                    if !operation.write {
                        operation.buffer.copyMemory(from: base + state.transfers[position].localOffset, byteCount: operation.length)
                    }
                    operations[member].status = 0
                }
                if reopen { break }
            }
            // After a failure the rest of the batch goes over TCP too; the endpoint is reopened.
            if index < operations.count { retry.append(contentsOf: index..<operations.count) }
            if reopen {
                fallbacks.withLock { $0 += 1 }
                live.region.close()
                state.live = nil
                do {
                    state.live = try Self.open(provider: providerName, node: node, daemonAddress: daemonAddress, arena: arena)
                } catch {
                    logger.error("cannot reopen the RMA endpoint; this daemon's pages go over TCP from now on", metadata: ["error": "\(error)"])
                }
            }
        }
    }
}
