import ArgumentParser
import SpillwayCommandSupport

/// `spillway`: tier benchmarks and daemon status; trace replay and pool tools join as their issues land.
struct SpillwayTool: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "spillway",
        abstract: "Spillway tiered page store: benchmarks and tools.",
        version: "0.1.0",
        subcommands: [BenchCommand.self, StatusCommand.self, PoolCommand.self, StoreCommand.self, ReplayCommand.self, ClusterCommand.self])
}

runMain(SpillwayTool.self, name: "spillway")
