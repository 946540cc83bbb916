// The library serving engines link: every layer re-exported, plus construction of a store
// from a configuration value or a TOML file.
@_exported import SpillwayCore
@_exported import SpillwayMemoryTiers
@_exported import SpillwayNVMe
@_exported import SpillwayStore
@_exported import SpillwayPolicy
@_exported import SpillwayRemote
@_exported import SpillwayErasure
@_exported import SpillwayKV
@_exported import SpillwayWeights
@_exported import SpillwayCompression
@_exported import SpillwayCluster
