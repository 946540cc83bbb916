import Foundation

/// The one place this target's random seeds come from. Set `SPILLWAY_TEST_SEED` (decimal) to
/// replay a failure; every test that draws random numbers names the seed it used in its
/// failure messages.
enum TestSeeds {
    static let base: UInt64 = ProcessInfo.processInfo.environment["SPILLWAY_TEST_SEED"].flatMap { UInt64($0) } ?? 0x5EED_2026

    /// A seed for one use (`salt` tells the uses apart), derived from `base`.
    static func seed(_ salt: UInt64) -> UInt64 { base ^ (salt &* 0x9E37_79B9_7F4A_7C15) }
}
