#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The parameters of a model in one store addressed by PyTorch state-dict names (STYLE.md habits 4
/// and 16): AdamW is one loop over flat regions, and safetensors load/save is a name-to-range copy.
///
/// Layers are built in two steps: each layer adds its tensors to a `ParameterLayout` (getting back a
/// `ParameterRef`), then one `ParameterStore` is allocated for the whole layout.
public struct ParameterLayout: Sendable {
    public struct Entry: Sendable, Equatable {
        public let name: String
        public let shape: [Int]
        /// First element in each region of the flat store.
        public let offset: Int
        /// Elements (the product of `shape`, checked when the entry was added).
        public let count: Int
    }

    /// At most this many floats (16 GB) in one region: a model that large is a configuration mistake.
    public static let maxFloats = 1 << 32

    public private(set) var entries: [Entry] = []
    public private(set) var totalCount = 0
    private var indexByName: [String: Int] = [:]

    public init() {}

    /// Adds a tensor. Names are unique; the running total is checked against `maxFloats`.
    public mutating func add(_ name: String, shape: [Int]) throws -> ParameterRef {
        guard indexByName[name] == nil else {
            throw DeformUXError.invalidArgument("parameters", "\(name) is defined twice")
        }
        let n = try Tensor.elementCount(shape, context: "parameter \(name)")
        // Each tensor starts on a 16-float (64-byte) boundary.
        let offset = (totalCount + 15) / 16 * 16
        guard n <= ParameterLayout.maxFloats - offset else {
            throw DeformUXError.invalidArgument("parameters", "the model needs more than \(ParameterLayout.maxFloats) parameters (at \(name), shape \(shape)); the configuration is too large")
        }
        entries.append(Entry(name: name, shape: shape, offset: offset, count: n))
        indexByName[name] = entries.count - 1
        totalCount = offset + n
        return ParameterRef(index: entries.count - 1)
    }

    public func entry(named name: String) -> Entry? { indexByName[name].map { entries[$0] } }
    public func index(named name: String) -> Int? { indexByName[name] }
}

/// A handle to one parameter tensor of a `ParameterLayout`.
public struct ParameterRef: Sendable, Equatable, Hashable {
    public let index: Int
}

/// Values, gradients and AdamW's two moments of every parameter, as four regions of ONE allocation at
/// the same offsets (as llm.c lays them out), so an optimiser step is one loop over four pointers.
///
/// The allocation is anonymous mmap'd memory: pages cost nothing until touched, so a model used for
/// inference only is as large as its values; gradients appear with the first backward and moments
/// with the first optimiser step. `zeroGradients` gives the gradient pages back to the system.
///
/// Concurrency: runners (sessions, trainers) never read `values` while they compute: they take a
/// snapshot under `read` (see `WeightSnapshot`) whenever `version` changed. Every change of the values
/// goes through `write`, which bumps `version`. Gradients belong to one runner at a time
/// (`withGradients`); the runner that owns a step zeroes them (STYLE.md habit 2).
public final class ParameterStore: @unchecked Sendable {
    public let layout: ParameterLayout
    /// Floats per region, a whole number of pages.
    let regionFloats: Int
    private let base: UnsafeMutablePointer<Float>
    private let bytes: Int
    /// Bumped by every `write`; guarded by `lock`.
    private var versionValue: UInt64 = 0
    private let lock = ReadWriteLock("model's weights")
    private let gradientLock = OwnedLock("model's gradients")

    public init(layout: ParameterLayout) throws {
        self.layout = layout
        let page = 1024  // floats per 4 KB page
        regionFloats = max(page, (layout.totalCount + page - 1) / page * page)
        bytes = 4 * regionFloats * MemoryLayout<Float>.stride
        guard let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else {
            throw DeformUXError.outOfMemory("parameters", "cannot reserve \(bytes) bytes for \(layout.totalCount) parameters with gradients and moments")
        }
        base = p.bindMemory(to: Float.self, capacity: 4 * regionFloats)
    }

    deinit { munmap(UnsafeMutableRawPointer(base), bytes) }

    /// The values region (`totalCount` floats at the layout's offsets). Read it under `read`, change it
    /// under `write`, or before the store is shared (initialisation).
    public var values: UnsafeMutablePointer<Float> { base }
    /// The gradients region; zero until a backward writes it.
    public var gradients: UnsafeMutablePointer<Float> { base + regionFloats }
    /// AdamW's first and second moments; zero until an optimiser writes them.
    public var firstMoments: UnsafeMutablePointer<Float> { base + 2 * regionFloats }
    public var secondMoments: UnsafeMutablePointer<Float> { base + 3 * regionFloats }

    /// The number of trainable values (alignment gaps excluded).
    public var parameterCount: Int { layout.entries.reduce(0) { $0 + $1.count } }

    /// Incremented by every change of the values (a runner's snapshot is stale when it differs).
    public var version: UInt64 { (try? lock.read("parameters") { versionValue }) ?? versionValue }

    /// Runs `body` while no one changes the values, with the current version.
    public func read<T>(_ operation: String, _ body: (_ version: UInt64) throws -> T) throws -> T {
        try lock.read(operation) { try body(versionValue) }
    }

    /// Runs `body` as the only one using the values, then bumps the version.
    public func write<T>(_ operation: String, _ body: () throws -> T) throws -> T {
        try lock.write(operation) {
            defer { versionValue &+= 1 }
            return try body()
        }
    }

    /// Runs `body` as the only user of the gradients (a backward accumulating into them, a reader
    /// copying them out); a second thread waits, the same thread re-entering gets `.busy`.
    public func withGradients<T>(_ operation: String, _ body: () throws -> T) throws -> T {
        try gradientLock.withLock(operation, body)
    }

    public func value(_ ref: ParameterRef) -> UnsafeMutablePointer<Float> {
        values + layout.entries[ref.index].offset
    }

    public func gradient(_ ref: ParameterRef) -> UnsafeMutablePointer<Float> {
        gradients + layout.entries[ref.index].offset
    }

    func entry(_ name: String, _ operation: String) throws -> ParameterLayout.Entry {
        guard let e = layout.entry(named: name) else {
            throw DeformUXError.invalidArgument(operation, "no parameter named \(name)")
        }
        return e
    }

    /// A view of the parameter called `name` (shares memory with the store; valid while it lives).
    public func tensor(_ name: String) throws -> Tensor {
        let e = try entry(name, "parameters")
        return Tensor(shape: e.shape, strides: Tensor.contiguousStrides(e.shape),
                      storage: TensorStorage(borrowing: values + e.offset, count: e.count, owner: self), offset: 0)
    }

    /// A view of the gradient of the parameter called `name`.
    public func gradientTensor(_ name: String) throws -> Tensor {
        let e = try entry(name, "parameters")
        return Tensor(shape: e.shape, strides: Tensor.contiguousStrides(e.shape),
                      storage: TensorStorage(borrowing: gradients + e.offset, count: e.count, owner: self), offset: 0)
    }

    /// Copies `values` (row-major) into the parameter called `name`, checking the shape.
    public func set(_ name: String, shape: [Int], values src: [Float]) throws {
        let e = try entry(name, "parameters")
        guard e.shape == shape, src.count == e.count else {
            throw DeformUXError.shapeMismatch("parameters", "\(name) has the wrong shape", expected: "\(e.shape)",
                                              got: "shape \(shape) with \(src.count) values")
        }
        try write("parameters") {
            src.withUnsafeBufferPointer { b in
                if let p = b.baseAddress { (values + e.offset).update(from: p, count: e.count) }
            }
        }
    }

    /// Sets every gradient to zero and gives the gradient pages back to the system (they read as zero
    /// until written again). Called once per step by the runner that owns the step.
    public func zeroGradients() {
        let g = UnsafeMutableRawPointer(gradients)
        if madvise(g, regionFloats * MemoryLayout<Float>.stride, MADV_DONTNEED) != 0 {
            gradients.initialize(repeating: 0, count: regionFloats)
        }
    }

    /// Sets the optimiser moments to zero (a fresh optimiser), returning their pages to the system.
    public func zeroMoments() {
        let m = UnsafeMutableRawPointer(firstMoments)
        if madvise(m, 2 * regionFloats * MemoryLayout<Float>.stride, MADV_DONTNEED) != 0 {
            firstMoments.initialize(repeating: 0, count: 2 * regionFloats)
        }
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
