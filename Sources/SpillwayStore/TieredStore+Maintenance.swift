import Atomics
import DequeModule
import Dispatch
import Logging
import SpillwayCore
import SpillwayPolicy

#if canImport(Glibc)
import Glibc
#endif

/// The background worker's jobs (prefetch queue) and shutdown.
extension TieredStore {
    func drainPrefetchQueue() {
        while true {
            let keys: [PageKey] = prefetchQueue.withLock { queue in
                let count = min(queue.count, ThreadBatch.moveChunk)
                defer { queue.removeFirst(count) }
                return Array(queue.prefix(count))
            }
            if keys.isEmpty { return }
            var byTier: [Int: [PageKey]] = [:]
            for key in keys {
                if let snapshot = directory.snapshot(of: key), snapshot.location.tier > 0 {
                    byTier[snapshot.location.tier, default: []].append(key)
                }
            }
            for (tier, keys) in byTier.sorted(by: { $0.key < $1.key }) {
                _ = movePages(keys, from: tier, to: 0)
            }
        }
    }

    func shutdown() {
        closedFlag.store(true, ordering: .releasing)
        wake.signal()
        let thread = worker.withLock { thread -> BackgroundThread? in
            defer { thread = nil }
            return thread
        }
        thread?.join()
        publishMetrics()
        for tier in tiers { tier.close() }
        logger.info("store closed")
    }
}
