/// Parameters and their gradients in one flat allocation each, addressed by PyTorch state-dict names
/// (STYLE.md habit 4): AdamW is one loop over `values`/`gradients`, and safetensors load/save is a
/// name-to-range copy.
///
/// Layers are built in two steps: each layer adds its tensors to a `ParameterLayout` (getting back a
/// `ParameterRef`), then one `ParameterStore` is allocated for the whole layout. Layers resolve their
/// refs to pointers at call time.
public struct ParameterLayout: Sendable {
    public struct Entry: Sendable, Equatable {
        public let name: String
        public let shape: [Int]
        /// First element in the flat store.
        public let offset: Int
        public var count: Int { shape.reduce(1, *) }
    }

    public private(set) var entries: [Entry] = []
    public private(set) var totalCount = 0
    private var indexByName: [String: Int] = [:]

    public init() {}

    /// Adds a tensor. Names are unique.
    public mutating func add(_ name: String, shape: [Int]) throws -> ParameterRef {
        guard indexByName[name] == nil else {
            throw DeformUXError.invalidArgument("parameters", "\(name) is defined twice")
        }
        let n = try Tensor.elementCount(shape, context: "parameter \(name)")
        // Each tensor starts on a 16-float (64-byte) boundary.
        let offset = (totalCount + 15) / 16 * 16
        entries.append(Entry(name: name, shape: shape, offset: offset))
        indexByName[name] = entries.count - 1
        totalCount = offset + n
        return ParameterRef(index: entries.count - 1)
    }

    public func entry(named name: String) -> Entry? { indexByName[name].map { entries[$0] } }
}

/// A handle to one parameter tensor of a `ParameterLayout`.
public struct ParameterRef: Sendable, Equatable {
    public let index: Int
}

public final class ParameterStore: @unchecked Sendable {
    public let layout: ParameterLayout
    public let values: TensorStorage
    private var gradientStorage: TensorStorage?

    public init(layout: ParameterLayout) throws {
        self.layout = layout
        values = try TensorStorage(count: layout.totalCount)
    }

    /// The gradients, allocated (zeroed) on first use: inference never pays for them.
    public func gradients() throws -> TensorStorage {
        if let g = gradientStorage { return g }
        let g = try TensorStorage(count: layout.totalCount)
        gradientStorage = g
        return g
    }

    /// The number of trainable values (alignment gaps excluded).
    public var parameterCount: Int { layout.entries.reduce(0) { $0 + $1.count } }

    public func value(_ ref: ParameterRef) -> UnsafeMutablePointer<Float> {
        values.pointer + layout.entries[ref.index].offset
    }

    public func gradient(_ ref: ParameterRef) throws -> UnsafeMutablePointer<Float> {
        try gradients().pointer + layout.entries[ref.index].offset
    }

    /// A view of the parameter called `name` (shares memory with the store).
    public func tensor(_ name: String) throws -> Tensor {
        guard let e = layout.entry(named: name) else {
            throw DeformUXError.invalidArgument("parameters", "no parameter named \(name)")
        }
        return Tensor(shape: e.shape, strides: Tensor.contiguousStrides(e.shape), storage: values, offset: e.offset)
    }

    /// A view of the gradient of the parameter called `name`.
    public func gradientTensor(_ name: String) throws -> Tensor {
        guard let e = layout.entry(named: name) else {
            throw DeformUXError.invalidArgument("parameters", "no parameter named \(name)")
        }
        return Tensor(shape: e.shape, strides: Tensor.contiguousStrides(e.shape), storage: try gradients(), offset: e.offset)
    }

    /// Copies `values` (row-major) into the parameter called `name`, checking the shape.
    public func set(_ name: String, shape: [Int], values src: [Float]) throws {
        let t = try tensor(name)
        guard t.shape == shape, src.count == t.count else {
            throw DeformUXError.shapeMismatch("parameters", "\(name) has shape \(t.shape), got shape \(shape) with \(src.count) values")
        }
        src.withUnsafeBufferPointer { b in
            if let base = b.baseAddress { t.pointer.update(from: base, count: t.count) }
        }
    }

    /// Gradients are accumulated (+=) by every backward; the training loop zeroes them once per step.
    public func zeroGradients() {
        if let g = gradientStorage { g.pointer.initialize(repeating: 0, count: g.count) }
    }
}

/// A small deterministic generator (SplitMix64) for parameter initialisation and tests, so that a
/// seed gives the same weights on every machine.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    /// The complete state: `SplitMix64(seed: g.state)` continues `g`'s sequence exactly (training resume).
    public private(set) var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    public mutating func uniform(_ lo: Float, _ hi: Float) -> Float {
        lo + (hi - lo) * Float(next() >> 40) / Float(1 << 24)
    }
}
