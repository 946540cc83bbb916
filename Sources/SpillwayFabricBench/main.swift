// A hand-run micro benchmark of the one-sided RMA path (not a test): a "daemon" endpoint with a
// 64 MiB registered slab and a "client" endpoint in one process, over a libfabric provider.
//
//   swift run -c release SpillwayFabricBench [--provider tcp] [--node 127.0.0.1] [--seconds 3]
//                                            [--polling]   # daemon progress spins instead of blocking
//
// Prints 4 KiB fi_read latency at QD1 (p50, p99) and throughput at QD32 (a batch of 4096 reads
// with 32 in flight, repeated).
#if canImport(Glibc)
import Glibc
#endif
import SpillwayCore
import SpillwayFabric

struct Settings: Sendable {
    var providerName = "tcp"
    var node: String? = "127.0.0.1"
    var seconds = 3.0
    var polling = false
}

func parse() -> Settings {
    var settings = Settings()
    var arguments = CommandLine.arguments.dropFirst().makeIterator()
    while let argument = arguments.next() {
        switch argument {
        case "--provider": settings.providerName = arguments.next() ?? settings.providerName
        case "--node": settings.node = arguments.next().flatMap { $0 == "none" ? nil : $0 }
        case "--seconds": settings.seconds = arguments.next().flatMap(Double.init) ?? settings.seconds
        case "--polling": settings.polling = true
        default:
            print("usage: SpillwayFabricBench [--provider NAME] [--node ADDRESS|none] [--seconds S] [--polling]")
            exit(2)
        }
    }
    return settings
}

/// `value` with `digits` decimals (no Foundation).
func fixed(_ value: Double, _ digits: Int) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let scaled = (value * scale).rounded()
    let whole = Int(scaled / scale)
    guard digits > 0 else { return String(whole) }
    let fraction = Int(abs(scaled) - abs(Double(whole)) * scale)
    let text = String(fraction)
    return "\(whole)." + String(repeating: "0", count: digits - text.count) + text
}

func run(_ settings: Settings) throws(SpillwayError) {
    let (providerName, node, seconds, polling) = (settings.providerName, settings.node, settings.seconds, settings.polling)
    let pageSize = 4096
    let slabPages = 16384  // 64 MiB
    let provider = try FabricProvider.discover(provider: providerName, node: node)
    print("provider: \(provider)")
    let daemon = try FabricEndpoint(provider: provider, options: .init(waitableCompletions: !polling))
    let progress = FabricProgressThread(endpoint: daemon, polling: polling)
    defer { progress.stop() }
    let slab = UnsafeMutableRawBufferPointer.allocate(byteCount: slabPages * pageSize, alignment: 4096)
    slab.initializeMemory(as: UInt8.self, repeating: 0xA5)
    defer { slab.deallocate() }
    let slabRegion = try daemon.register(slab, access: .remote)
    defer { slabRegion.close() }

    let client = try FabricEndpoint(provider: provider, options: .init(maxInFlight: 32))
    let peer = try client.insertPeer(address: daemon.address)
    let remote = FabricRemoteRegion(peer: peer, grant: slabRegion.grant)
    let depth = 32
    let pages = UnsafeMutableRawBufferPointer.allocate(byteCount: depth * pageSize, alignment: 4096)
    pages.initializeMemory(as: UInt8.self, repeating: 0)
    defer { pages.deallocate() }
    let pageRegion = try client.register(pages, access: .local)
    defer { pageRegion.close() }

    var random = SystemRandomNumberGenerator()
    func transfer(_ slot: Int) -> FabricTransfer {
        FabricTransfer(localOffset: (slot % depth) * pageSize, remote: remote,
                       remoteOffset: Int.random(in: 0..<slabPages, using: &random) * pageSize, length: pageSize)
    }

    // Warm up (connection set-up happens on the first operation).
    for _ in 0..<200 { try client.read([transfer(0)], into: pageRegion).check() }

    // QD1 latency.
    var latencies: [Duration] = []
    latencies.reserveCapacity(1 << 20)
    var one = [transfer(0)]
    let clock = ContinuousClock()
    let qd1End = clock.now.advanced(by: .seconds(seconds))
    while clock.now < qd1End {
        one[0] = transfer(0)
        let start = clock.now
        let result = try client.read(one, into: pageRegion)
        latencies.append(clock.now - start)
        try result.check()
    }
    latencies.sort()
    func microseconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) * 1e6 + Double(duration.components.attoseconds) / 1e12
    }
    let p50 = microseconds(latencies[latencies.count / 2])
    let p99 = microseconds(latencies[latencies.count * 99 / 100])
    print("4 KiB fi_read QD1: p50 \(fixed(p50, 1)) us, p99 \(fixed(p99, 1)) us (\(latencies.count) reads)")

    // QD32 throughput: long batches keep 32 reads in flight.
    let batch = (0..<4096).map(transfer)
    var reads = 0
    let qd32Start = clock.now
    let qd32End = qd32Start.advanced(by: .seconds(seconds))
    while clock.now < qd32End {
        let result = try client.read(batch, into: pageRegion, timeout: .seconds(30))
        try result.check()
        reads += result.completed
    }
    let elapsed = microseconds(clock.now - qd32Start) / 1e6
    let iops = Double(reads) / elapsed
    print("4 KiB fi_read QD32: \(fixed(iops, 0)) reads/s, \(fixed(iops * Double(pageSize) / 1_048_576, 1)) MiB/s (\(reads) reads in \(fixed(elapsed, 2)) s)")
    print("daemon progress: \(polling ? "polling" : "blocking (fi_cq_sread)"); client: busy-polls its CQ")
}

do {
    try run(parse())
} catch {
    print("SpillwayFabricBench: \(error)")
    exit(1)
}
