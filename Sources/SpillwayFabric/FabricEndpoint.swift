#if canImport(Glibc)
import Glibc
#endif
import CSpillwayFabric
import SpillwayCore
import Synchronization

/// One reliable-datagram (`FI_EP_RDM`) endpoint with everything it needs: its fabric, domain,
/// address vector, completion queue and the endpoint itself, opened from a `FabricProvider` and
/// closed, in reverse order, in deinit.
///
/// Why: the unit both sides of one-sided RMA hold. A daemon opens one, registers its slabs
/// (`register(_:access:)`, `FabricAccess.remote`), hands out `address` and grants, and keeps it
/// progressing (`FabricProgressThread`) when the provider needs manual progress. A client opens
/// one, registers its page buffers once (`FabricAccess.local`), inserts the daemon's address
/// (`insertPeer`) and moves pages with batched `read`/`write`: up to `maxInFlight` operations
/// outstanding (never more than the provider's transmit queue), completions reaped from the CQ,
/// every wait bounded by a deadline.
///
/// Ownership: memory regions keep their endpoint alive, so the endpoint closes after its last
/// region. `@unchecked Sendable`: the libfabric objects are opened `FI_THREAD_SAFE` and their
/// pointers never change after init; the batch bookkeeping (operation contexts, free slots,
/// CQ entry buffer) is owned by whichever thread holds `batchState`'s mutex, so batches on one
/// endpoint run one at a time (use one endpoint per thread for parallelism).
public final class FabricEndpoint: @unchecked Sendable {
    /// How an endpoint is opened.
    public struct Options: Sendable {
        /// Operations in flight per batch, clamped to the provider's transmit queue size.
        public var maxInFlight: Int
        /// A completion queue with a wait object, so `progress(waitMilliseconds:)` can block
        /// instead of spinning (a daemon's progress thread); clients that busy-poll leave it off.
        public var waitableCompletions: Bool

        public init(maxInFlight: Int = 256, waitableCompletions: Bool = false) {
            self.maxInFlight = maxInFlight
            self.waitableCompletions = waitableCompletions
        }
    }

    /// The kind of a one-sided transfer.
    enum Operation: Sendable {
        case read, write
        var name: String { self == .read ? "fi_read" : "fi_write" }
    }

    /// The provider this endpoint was opened on.
    public let provider: FabricProvider
    /// The bound on operations in flight (the provider's transmit queue size at most).
    public let maxInFlight: Int
    /// This endpoint's address (`fi_getname`): what a peer passes to `insertPeer(address:)`.
    public let address: [UInt8]

    let fabric: UnsafeMutablePointer<fid_fabric>
    let domain: UnsafeMutablePointer<fid_domain>
    let av: UnsafeMutablePointer<fid_av>
    let cq: UnsafeMutablePointer<fid_cq>
    let ep: UnsafeMutablePointer<fid_ep>
    let waitable: Bool
    private let batchState: Mutex<BatchState>

    /// Opens fabric, domain, address vector, completion queue and endpoint, binds and enables it.
    /// - Throws: `SpillwayError.transport` naming the call that failed, with libfabric's text.
    public init(provider: FabricProvider, options: Options = Options()) throws(SpillwayError) {
        self.provider = provider
        let name = provider.name
        let info = provider.info
        var opened: [UnsafeMutablePointer<fid>] = []  // closed in reverse if init fails
        var succeeded = false
        defer { if !succeeded { for object in opened.reversed() { fi_close(object) } } }

        var fabric: UnsafeMutablePointer<fid_fabric>?
        var status = fi_fabric(info.pointee.fabric_attr, &fabric, nil)
        guard status == 0, let fabric else { throw fabricError(name, "fi_fabric", status) }
        opened.append(spillway_fid_fabric(fabric))

        var domain: UnsafeMutablePointer<fid_domain>?
        status = fi_domain(fabric, info, &domain, nil)
        guard status == 0, let domain else { throw fabricError(name, "fi_domain", status) }
        opened.append(spillway_fid_domain(domain))

        var avAttributes = fi_av_attr()
        avAttributes.type = FI_AV_UNSPEC
        var av: UnsafeMutablePointer<fid_av>?
        status = fi_av_open(domain, &avAttributes, &av, nil)
        guard status == 0, let av else { throw fabricError(name, "fi_av_open", status) }
        opened.append(spillway_fid_av(av))

        let inFlight = max(1, min(options.maxInFlight, provider.transmitQueueSize))
        var cqAttributes = fi_cq_attr()
        cqAttributes.format = FI_CQ_FORMAT_CONTEXT
        cqAttributes.size = max(inFlight, 64)
        cqAttributes.wait_obj = options.waitableCompletions ? FI_WAIT_UNSPEC : FI_WAIT_NONE
        var cq: UnsafeMutablePointer<fid_cq>?
        status = fi_cq_open(domain, &cqAttributes, &cq, nil)
        guard status == 0, let cq else { throw fabricError(name, "fi_cq_open", status) }
        opened.append(spillway_fid_cq(cq))

        var ep: UnsafeMutablePointer<fid_ep>?
        status = fi_endpoint(domain, info, &ep, nil)
        guard status == 0, let ep else { throw fabricError(name, "fi_endpoint", status) }
        opened.append(spillway_fid_ep(ep))

        status = fi_ep_bind(ep, spillway_fid_av(av), 0)
        guard status == 0 else { throw fabricError(name, "fi_ep_bind(av)", status) }
        // RDM endpoints need a CQ for both directions even when only transmitting.
        status = fi_ep_bind(ep, spillway_fid_cq(cq), UInt64(FI_TRANSMIT) | UInt64(FI_RECV))
        guard status == 0 else { throw fabricError(name, "fi_ep_bind(cq)", status) }
        status = fi_enable(ep)
        guard status == 0 else { throw fabricError(name, "fi_enable", status) }

        var nameBytes = [UInt8](repeating: 0, count: 256)
        var nameLength = nameBytes.count
        status = nameBytes.withUnsafeMutableBytes { fi_getname(spillway_fid_ep(ep), $0.baseAddress, &nameLength) }
        if status == -Int32(FI_ETOOSMALL) {
            nameBytes = [UInt8](repeating: 0, count: nameLength)
            status = nameBytes.withUnsafeMutableBytes { fi_getname(spillway_fid_ep(ep), $0.baseAddress, &nameLength) }
        }
        guard status == 0 else { throw fabricError(name, "fi_getname", status) }

        self.fabric = fabric
        self.domain = domain
        self.av = av
        self.cq = cq
        self.ep = ep
        self.address = Array(nameBytes.prefix(nameLength))
        self.maxInFlight = inFlight
        self.waitable = options.waitableCompletions
        self.batchState = Mutex(BatchState(slots: inFlight))
        succeeded = true
    }

    deinit {
        // Regions hold the endpoint, so none is open here. The endpoint first (it references
        // the AV and CQ), then the queues, the domain, the fabric.
        fi_close(spillway_fid_ep(ep))
        fi_close(spillway_fid_av(av))
        fi_close(spillway_fid_cq(cq))
        fi_close(spillway_fid_domain(domain))
        fi_close(spillway_fid_fabric(fabric))
        batchState.withLock { $0.deallocate() }
    }

    // MARK: Addresses

    /// Inserts a peer's address (its `address`, received out of band) into this endpoint's
    /// address vector.
    public func insertPeer(address peerAddress: [UInt8]) throws(SpillwayError) -> FabricPeer {
        guard !peerAddress.isEmpty else { throw .invalidArgument("empty fabric address") }
        var handle: fi_addr_t = spillway_fi_addr_unspec()
        let inserted = peerAddress.withUnsafeBytes { fi_av_insert(av, $0.baseAddress, 1, &handle, 0, nil) }
        guard inserted == 1, handle != spillway_fi_addr_unspec() else {
            throw fabricError(provider.name, "fi_av_insert", inserted < 0 ? inserted : Int32(FI_EINVAL),
                              detail: "address of \(peerAddress.count) bytes not accepted")
        }
        return FabricPeer(address: handle, owner: ObjectIdentifier(self))
    }

    /// Removes a peer from the address vector (its connection, if any, goes with it). Transfers
    /// naming it afterwards are refused.
    public func removePeer(_ peer: FabricPeer) throws(SpillwayError) {
        guard peer.owner == ObjectIdentifier(self) else { throw .invalidArgument("peer belongs to another fabric endpoint") }
        var handle = peer.address
        let status = fi_av_remove(av, &handle, 1, 0)
        guard status == 0 else { throw fabricError(provider.name, "fi_av_remove", status) }
    }

    // MARK: Memory registration

    /// Registers `buffer` (which must stay allocated until the region closes) for `access`.
    ///
    /// The key is the provider's (FI_MR_PROV_KEY) or else a random one of the provider's key
    /// size, so keys of one daemon are neither reused nor guessable from one another; with
    /// FI_MR_ENDPOINT the region is bound to this endpoint and enabled.
    /// - Throws: `SpillwayError.transport` (`fi_mr_reg`); when the provider pins memory
    ///   (verbs, efa) and the locked-memory limit is too low this is typically ENOMEM or
    ///   EPERM/EFAULT, and the reason names `ulimit -l`.
    public func register(_ buffer: UnsafeMutableRawBufferPointer, access: FabricAccess) throws(SpillwayError) -> FabricMemoryRegion {
        guard let base = buffer.baseAddress, buffer.count > 0 else { throw .invalidArgument("cannot register an empty buffer") }
        let name = provider.name
        let mode = provider.mrMode
        var attempt = 0
        while true {
            attempt += 1
            let requestedKey: UInt64 = mode.contains(.providerKey) ? 0 : Self.randomKey(bytes: provider.keySize)
            var region: UnsafeMutablePointer<fid_mr>?
            let status = fi_mr_reg(domain, base, buffer.count, access.rawValue, 0, requestedKey, 0, &region, nil)
            if status == -Int32(FI_ENOKEY), !mode.contains(.providerKey), attempt < 8 { continue }  // key collision
            guard status == 0, let region else {
                throw fabricError(name, "fi_mr_reg", status, detail: Self.registrationHint(status: status, bytes: buffer.count))
            }
            if mode.contains(.endpoint) {
                var bound = fi_mr_bind(region, spillway_fid_ep(ep), 0)
                if bound == 0 { bound = fi_mr_enable(region) }
                guard bound == 0 else {
                    fi_close(spillway_fid_mr(region))
                    throw fabricError(name, "fi_mr_bind/fi_mr_enable", bound)
                }
            }
            let key = fi_mr_key(region)
            guard key != UInt64.max else {  // FI_KEY_NOTAVAIL
                fi_close(spillway_fid_mr(region))
                throw fabricError(name, "fi_mr_key", Int32(FI_ENOKEY), detail: "the provider gave no key")
            }
            let remoteBase = mode.contains(.virtualAddress) ? UInt64(UInt(bitPattern: base)) : 0
            return FabricMemoryRegion(endpoint: self, region: region, buffer: buffer, access: access,
                                      grant: FabricRegionGrant(base: remoteBase, length: buffer.count, key: key))
        }
    }

    static func randomKey(bytes: Int) -> UInt64 {
        var generator = SystemRandomNumberGenerator()
        let upper: UInt64 = bytes >= 8 ? UInt64.max - 1 : (UInt64(1) << UInt64(8 * bytes)) - 1
        return UInt64.random(in: 1...upper, using: &generator)
    }

    static func registrationHint(status: Int32, bytes: Int) -> String {
        let number = -status
        guard number == ENOMEM || number == EPERM || number == EFAULT || number == EAGAIN else {
            return "registering \(bytes) bytes"
        }
        var limit = rlimit()
        let current = getrlimit(__rlimit_resource_t(__RLIMIT_MEMLOCK.rawValue), &limit) == 0
            ? (limit.rlim_cur == rlim_t.max /* RLIM_INFINITY */ ? "unlimited" : "\(limit.rlim_cur / 1024) KiB") : "unknown"
        return "registering \(bytes) bytes; providers that pin memory (verbs, efa) need a locked-memory limit "
            + "above the registered total: raise `ulimit -l` (RLIMIT_MEMLOCK, now \(current)), e.g. "
            + "LimitMEMLOCK=infinity in the systemd unit or memlock in /etc/security/limits.conf"
    }

    // MARK: Transfers

    /// Reads each transfer's remote bytes into `local` (at its `localOffset`).
    ///
    /// Up to `maxInFlight` reads are outstanding at once; completions are reaped from the CQ as
    /// they arrive. An item the provider refuses or fails (revoked key, address outside the
    /// registration, lost peer) is a `Failure` with the provider's text, its local bytes
    /// undefined. Items outside their grant or the local region throw `invalidArgument` before
    /// anything is posted.
    /// - Parameter timeout: the bound on the whole batch. On expiry with operations still in
    ///   flight the endpoint is unusable (the provider may still write `local`): every later
    ///   batch throws; close it (and its regions) and open another.
    public func read(_ transfers: [FabricTransfer], into local: FabricMemoryRegion, timeout: Duration = .seconds(10)) throws(SpillwayError) -> FabricBatchResult {
        try transfers.withUnsafeBufferPointer { (items) throws(SpillwayError) in
            try run(.read, items, local: local, timeout: timeout)
        }
    }

    /// Writes each transfer's bytes from `local` (at its `localOffset`) to its remote region.
    /// Bounds, failures and the timeout as for `read`.
    public func write(_ transfers: [FabricTransfer], from local: FabricMemoryRegion, timeout: Duration = .seconds(10)) throws(SpillwayError) -> FabricBatchResult {
        try transfers.withUnsafeBufferPointer { (items) throws(SpillwayError) in
            try run(.write, items, local: local, timeout: timeout)
        }
    }

    /// The batch engine behind `read` and `write` (no allocation unless an item fails).
    func run(_ operation: Operation, _ items: UnsafeBufferPointer<FabricTransfer>, local: FabricMemoryRegion, timeout: Duration) throws(SpillwayError) -> FabricBatchResult {
        try validate(operation, items, local: local)
        if items.isEmpty { return FabricBatchResult(completed: 0, failures: []) }
        let deadline = ContinuousClock.now.advanced(by: timeout)
        return try local.whileOpen { (descriptor) throws(SpillwayError) in
            try batchState.withLock { (state) throws(SpillwayError) -> FabricBatchResult in
                if let broken = state.broken { throw broken }
                return try execute(operation, items, localBase: local.buffer.baseAddress!, descriptor: descriptor,
                                   deadline: deadline, state: &state)
            }
        }
    }

    private func validate(_ operation: Operation, _ items: UnsafeBufferPointer<FabricTransfer>, local: FabricMemoryRegion) throws(SpillwayError) {
        guard local.endpoint === self else { throw .invalidArgument("local region is registered with another fabric endpoint") }
        let needed: FabricAccess = operation == .read ? .read : .write
        guard local.access.contains(needed) else {
            throw .invalidArgument("local region lacks \(operation == .read ? "FI_READ" : "FI_WRITE") access for \(operation.name)")
        }
        let me = ObjectIdentifier(self)
        for (index, item) in items.enumerated() {
            guard item.remote.peer.owner == me else { throw .invalidArgument("transfer \(index): peer belongs to another fabric endpoint") }
            guard item.length > 0, item.length <= provider.maxMessageSize else {
                throw .invalidArgument("transfer \(index): length \(item.length) outside 1...\(provider.maxMessageSize)")
            }
            guard item.localOffset >= 0, item.localOffset <= local.buffer.count - item.length else {
                throw .invalidArgument("transfer \(index): local bytes \(item.localOffset)..<\(item.localOffset + item.length) outside the registered \(local.buffer.count)")
            }
            guard item.remoteOffset >= 0, item.remoteOffset <= item.remote.grant.length - item.length else {
                throw .invalidArgument("transfer \(index): remote bytes \(item.remoteOffset)..<\(item.remoteOffset + item.length) outside the granted \(item.remote.grant.length) (\(item.remote.grant))")
            }
        }
    }

    private func execute(_ operation: Operation, _ items: UnsafeBufferPointer<FabricTransfer>, localBase: UnsafeMutableRawPointer,
                         descriptor: UnsafeMutableRawPointer?, deadline: ContinuousClock.Instant,
                         state: inout BatchState) throws(SpillwayError) -> FabricBatchResult {
        var next = 0
        var outstanding = 0
        var completed = 0
        var failures: [FabricBatchResult.Failure] = []
        let again = -Int(FI_EAGAIN)
        while next < items.count || outstanding > 0 {
            // Post while a slot is free.
            while next < items.count, state.freeCount > 0 {
                let slot = state.takeSlot()
                let item = items[next]
                let buffer = localBase + item.localOffset
                let remoteAddress = item.remote.grant.base &+ UInt64(item.remoteOffset)
                let context = UnsafeMutableRawPointer(state.contexts + slot)
                let status: Int = switch operation {
                case .read: fi_read(ep, buffer, item.length, descriptor, item.remote.peer.address, remoteAddress, item.remote.grant.key, context)
                case .write: fi_write(ep, buffer, item.length, descriptor, item.remote.peer.address, remoteAddress, item.remote.grant.key, context)
                }
                if status == 0 {
                    state.slotItem[slot] = next
                    next += 1
                    outstanding += 1
                } else {
                    state.returnSlot(slot)
                    if status == again { break }  // queue full or connecting: reap, then retry
                    failures.append(.init(index: next, error: itemError(operation, index: next, item: item, code: status, detail: nil)))
                    next += 1
                }
            }
            // Reap.
            let count = fi_cq_read(cq, state.entries, state.entryCapacity)
            if count > 0 {
                for entryIndex in 0..<count {
                    guard let slot = state.slot(of: state.entries[entryIndex].op_context) else { continue }
                    state.returnSlot(slot)
                    outstanding -= 1
                    completed += 1
                }
            } else if count == -Int(FI_EAVAIL) {
                var entry = fi_cq_err_entry()
                let read = fi_cq_readerr(cq, &entry, 0)
                guard read == 1 else { continue }
                guard let slot = state.slot(of: entry.op_context) else { continue }
                state.returnSlot(slot)
                outstanding -= 1
                let index = state.slotItem[slot]
                var detail = "provider: " + String(cString: fi_cq_strerror(cq, entry.prov_errno, entry.err_data, nil, 0))
                detail += " (prov_errno \(entry.prov_errno))"
                failures.append(.init(index: index, error: itemError(operation, index: index, item: items[index], code: Int(entry.err), detail: detail)))
            } else if count == again {
                if ContinuousClock.now >= deadline {
                    let error = fabricError(provider.name, operation.name, Int32(ETIMEDOUT),
                                            detail: "batch of \(items.count) passed its deadline with \(outstanding) in flight and \(items.count - next) not posted")
                    if outstanding > 0 {
                        state.broken = fabricError(provider.name, operation.name, Int32(ETIMEDOUT),
                                                   detail: "endpoint abandoned after a batch timed out with \(outstanding) operations in flight; close it and open another")
                    }
                    throw error
                }
            } else {
                let error = fabricError(provider.name, "fi_cq_read", count)
                state.broken = error
                throw error
            }
        }
        return FabricBatchResult(completed: completed, failures: failures)
    }

    private func itemError(_ operation: Operation, index: Int, item: FabricTransfer, code: Int, detail: String?) -> SpillwayError {
        var text = "transfer \(index) (\(item.length) bytes at remote offset \(item.remoteOffset), key 0x\(String(item.remote.grant.key, radix: 16)))"
        if let detail { text += "; " + detail }
        return fabricError(provider.name, operation.name, code, detail: text)
    }

    // MARK: Progress

    /// Drives the provider once: reads this endpoint's completion queue, which is what makes a
    /// manual-progress provider (`tcp`) serve peers' reads and writes of this endpoint's
    /// regions. Blocks up to `waitMilliseconds` when the endpoint was opened with
    /// `waitableCompletions`, else returns at once. Skips (returns false) while a batch runs on
    /// this endpoint: the batch drives progress itself.
    @discardableResult
    public func progress(waitMilliseconds: Int32 = 0) -> Bool {
        let ran: Bool? = batchState.withLockIfAvailable { state in
            let count: Int
            if waitable && waitMilliseconds > 0 {
                count = fi_cq_sread(cq, state.entries, state.entryCapacity, nil, waitMilliseconds)
            } else {
                count = fi_cq_read(cq, state.entries, state.entryCapacity)
            }
            if count == -Int(FI_EAVAIL) {  // an error outside any batch: nothing waits for it
                var entry = fi_cq_err_entry()
                _ = fi_cq_readerr(cq, &entry, 0)
            }
            return true
        }
        return ran ?? false
    }
}

/// The per-endpoint bookkeeping of batches, allocated once at open: an `fi_context2` per slot
/// (the provider may use it while the operation is in flight), the item each slot carries, a
/// stack of free slots and the CQ entry buffer. `@unchecked Sendable`: only ever touched by
/// the thread holding `FabricEndpoint.batchState`'s mutex.
struct BatchState: @unchecked Sendable {
    let contexts: UnsafeMutablePointer<fi_context2>
    let slotItem: UnsafeMutablePointer<Int>
    let freeSlots: UnsafeMutablePointer<Int>
    let slots: Int
    var freeCount: Int
    let entries: UnsafeMutablePointer<fi_cq_entry>
    let entryCapacity: Int
    var broken: SpillwayError?

    init(slots: Int) {
        self.slots = slots
        contexts = .allocate(capacity: slots)
        contexts.initialize(repeating: fi_context2(), count: slots)
        slotItem = .allocate(capacity: slots)
        slotItem.initialize(repeating: 0, count: slots)
        freeSlots = .allocate(capacity: slots)
        for slot in 0..<slots { (freeSlots + slot).initialize(to: slots - 1 - slot) }
        freeCount = slots
        entryCapacity = min(64, slots)
        entries = .allocate(capacity: entryCapacity)
        entries.initialize(repeating: fi_cq_entry(), count: entryCapacity)
    }

    mutating func takeSlot() -> Int {
        freeCount -= 1
        return freeSlots[freeCount]
    }

    mutating func returnSlot(_ slot: Int) {
        freeSlots[freeCount] = slot
        freeCount += 1
    }

    /// The slot whose context `context` is, or nil for a context not ours.
    func slot(of context: UnsafeMutableRawPointer?) -> Int? {
        guard let context else { return nil }
        let distance = context - UnsafeMutableRawPointer(contexts)
        let stride = MemoryLayout<fi_context2>.stride
        guard distance >= 0, distance % stride == 0, distance / stride < slots else { return nil }
        return distance / stride
    }

    func deallocate() {
        contexts.deallocate()
        slotItem.deallocate()
        freeSlots.deallocate()
        entries.deallocate()
    }
}
