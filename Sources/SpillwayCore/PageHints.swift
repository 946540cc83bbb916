/// What kind of data a page holds, as told by the caller on `put`. Policies use it to treat
/// pages differently (weights streamed once per forward pass vs. KV blocks reused by later
/// requests); the store itself never interprets it.
public enum PageClass: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// No information (the default): ordinary LRU treatment.
    case generic = 0
    /// A KV-cache block; `PageHints.order` is its depth in the prefix chain and
    /// `PageHints.parent` the `PageHints.parentID(of:)` of its parent block's key.
    case kvBlock = 1
    /// A chunk of model weights, streamed in layer order (`PageHints.order`).
    case weights = 2

    public var description: String {
        switch self {
        case .generic: "generic"
        case .kvBlock: "kvBlock"
        case .weights: "weights"
        }
    }
}

/// A page's class and class-specific hints, stored in its directory entry.
///
/// The directory entry is one cache line; the hints take 11 bytes of it: the class (8 bits),
/// a 16-bit `order` (saturating) and the 64-bit `parent` id. A KV block's parent is stored as
/// the parent key's policy id (`parentID(of:)`, the same 64-bit id the store's policy tracks
/// pages by) rather than the 128-bit key, so a policy links a child to its cached parent
/// directly (a false link needs a 64-bit collision).
public struct PageHints: Sendable, Equatable, CustomStringConvertible {
    public var pageClass: PageClass
    /// `kvBlock`: depth in the prefix chain (0 = first block); `weights`: layer order
    /// (0 = first streamed). Values past 65,535 saturate.
    public var order: UInt16
    /// `kvBlock`: `parentID(of:)` of the parent block's key, 0 for a chain's first block.
    /// Otherwise 0.
    public var parent: UInt64

    public init(pageClass: PageClass = .generic, order: UInt16 = 0, parent: UInt64 = 0) {
        self.pageClass = pageClass
        self.order = order
        self.parent = parent
    }

    public static let generic = PageHints()

    /// A KV block at `depth` in its prefix chain whose parent block is stored under `parent`
    /// (nil for the first block). Depth saturates at 65,535; a negative depth is clamped to 0.
    public static func kvBlock(depth: Int, parent: PageKey?) -> PageHints {
        PageHints(pageClass: .kvBlock, order: saturated(depth), parent: parent.map(parentID(of:)) ?? 0)
    }

    /// A weights chunk of the layer streamed `layerOrder`-th (saturating; negative clamps to 0).
    public static func weights(layerOrder: Int) -> PageHints {
        PageHints(pageClass: .weights, order: saturated(layerOrder))
    }

    /// The id the store's policy tracks `key` by (`PageKey.policyID`), stored as a child's
    /// `parent`; never 0 (0 means "no parent").
    @inline(__always)
    public static func parentID(of key: PageKey) -> UInt64 { key.policyID }

    static func saturated(_ value: Int) -> UInt16 { UInt16(clamping: max(0, value)) }

    public var description: String {
        switch pageClass {
        case .generic: "generic"
        case .kvBlock: "kvBlock(depth \(order), parent \(parent))"
        case .weights: "weights(layer order \(order))"
        }
    }
}
