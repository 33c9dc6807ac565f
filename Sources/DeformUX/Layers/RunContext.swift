import Synchronization

/// The weights a runner computes with (STYLE.md habit 16): every parameter of a model, each either
/// packed for its kernel (convolution weights, in the layout the kernel reads) or copied as it is,
/// taken under the model's read lock at one version. A session keeps its snapshot between calls and
/// refreshes it only when the model's weights changed (`ParameterStore.version`), so a sliding window
/// never re-packs the weights and a forward never reads weights that a load is changing.
public final class WeightSnapshot: @unchecked Sendable {
    /// How a parameter is held in the snapshot.
    public enum Form: Equatable, Sendable {
        /// As in the store.
        case copy
        /// `Conv3d.pack` of a Cout x Cin x k x k x k weight.
        case conv(Conv3d.Packing)
        /// `ConvTranspose3d.pack` of a Cin x Cout x k x k x k weight.
        case convTranspose(cin: Int, cout: Int, kernel: Int)
        /// `DepthwiseConv3d.pack` of a C x 1 x k x k x k weight.
        case depthwise(channels: Int, kernel: Int)

        func count(_ entry: ParameterLayout.Entry) -> Int {
            switch self {
            case .copy: return entry.count
            case .conv(let p): return p.count
            case .convTranspose(let cin, let cout, let k): return cin * cout * k * k * k
            case .depthwise(let c, let k): return k * k * k * ((c + 15) / 16 * 16)
            }
        }
    }

    public let forms: [Form]
    /// Start of each parameter in `storage` (16-float aligned).
    let offsets: [Int]
    let total: Int
    private var storage: TensorStorage?
    /// Bytes of `storage`, readable from any thread while the owner refreshes or releases it.
    private let heldBytes = Atomic<Int>(0)
    public private(set) var version: UInt64?
    private var forkGeneration: UInt64 = Fork.generation

    /// `forms[i]` says how parameter i of `layout` is held.
    init(layout: ParameterLayout, forms: [Form]) throws {
        self.forms = forms
        var offsets: [Int] = []
        var total = 0
        for (e, f) in zip(layout.entries, forms) {
            offsets.append(total)
            total = (total + f.count(e) + 15) / 16 * 16
        }
        self.offsets = offsets
        self.total = total
    }

    /// Bytes held (0 until the first refresh). Safe to read from any thread (a counter, not `storage`).
    public var bytes: Int { heldBytes.load(ordering: .relaxed) }

    /// Brings the snapshot to the store's current version (packing in parallel over parameters).
    func refresh(from store: ParameterStore, operation: String) throws {
        if forkGeneration != Fork.generation {
            // A parent thread may have been halfway through packing when this process was forked.
            version = nil
            forkGeneration = Fork.generation
        }
        try store.read(operation) { current in
            if version == current, storage != nil { return }
            if storage == nil {
                let s = try TensorStorage(count: total, zeroed: false)
                storage = s
                heldBytes.store(s.count * 4, ordering: .relaxed)
            }
            guard let base = storage?.pointer else { return }
            let entries = store.layout.entries
            // Parts own runs of parameters of about equal size.
            let parts = max(1, min(Threads.count, entries.count))
            var cuts = [0]
            var acc = 0
            for (i, e) in entries.enumerated() {
                acc += e.count
                if cuts.count < parts && acc * parts >= store.layout.totalCount * cuts.count { cuts.append(i + 1) }
            }
            while cuts.count <= parts { cuts.append(entries.count) }
            cuts[parts] = entries.count
            parallelFor(parts) { part in
                for i in cuts[part]..<cuts[part + 1] {
                    let e = entries[i]
                    let src = store.values + e.offset, dst = base + offsets[i]
                    switch forms[i] {
                    case .copy:
                        dst.update(from: src, count: e.count)
                    case .conv(let p):
                        Conv3d.pack(weight: src, into: dst, packing: p)
                    case .convTranspose(let cin, let cout, let k):
                        ConvTranspose3d.pack(weight: src, into: dst, cin: cin, cout: cout, taps: k * k * k)
                    case .depthwise(let c, let k):
                        DepthwiseConv3d.pack(weight: src, into: dst, channels: c, taps: k * k * k)
                    }
                }
            }
            version = current
        }
    }

    /// Parameter `ref` in its snapshot form (valid after `refresh`).
    @inline(__always) public func pointer(_ ref: ParameterRef) -> UnsafeMutablePointer<Float> {
        // The storage exists once refresh has run; runners refresh before every call.
        (storage?.pointer ?? UnsafeMutablePointer(mutating: emptyFloat)) + offsets[ref.index]
    }

    /// Frees the snapshot (the next refresh rebuilds it).
    func release() {
        storage = nil
        heldBytes.store(0, ordering: .relaxed)
        version = nil
    }
}

private let emptyFloat: UnsafeMutablePointer<Float> = {
    let p = UnsafeMutablePointer<Float>.allocate(capacity: 16)
    p.initialize(repeating: 0, count: 16)
    return p
}()

/// Everything a forward or backward needs besides its input: the weights to compute with, scratch,
/// activation memory and, for a backward, where the parameter gradients go. It belongs to the runner
/// (a session or a trainer), never to the model.
public final class RunContext {
    public let weights: WeightSnapshot
    public let workspace: Workspace
    /// Activation memory, reused across the passes of one call and between calls.
    public let pool: StoragePool
    /// The model's gradient region (a backward adds into it), or nil for inference.
    public let gradients: UnsafeMutablePointer<Float>?
    let layout: ParameterLayout
    /// Drop path (stochastic depth) masks for a training forward, or nil.
    public var dropPath: DropPathMasks?

    init(weights: WeightSnapshot, workspace: Workspace, pool: StoragePool, gradients: UnsafeMutablePointer<Float>?,
         layout: ParameterLayout) {
        self.weights = weights
        self.workspace = workspace
        self.pool = pool
        self.gradients = gradients
        self.layout = layout
    }

    /// A context for running layers outside a network (tests, benchmarks, single operators): a
    /// snapshot of `store` (each parameter held as `forms` says, copied by default), fresh scratch and
    /// activation memory, and the store's gradient region if `gradients`.
    public static func standalone(store: ParameterStore, forms: [WeightSnapshot.Form]? = nil,
                                  gradients: Bool = false) throws -> RunContext {
        let f = forms ?? [WeightSnapshot.Form](repeating: .copy, count: store.layout.entries.count)
        guard f.count == store.layout.entries.count else {
            throw DeformUXError.invalidArgument("run context", "one form per parameter",
                                                expected: "\(store.layout.entries.count)", got: "\(f.count)")
        }
        let snapshot = try WeightSnapshot(layout: store.layout, forms: f)
        try snapshot.refresh(from: store, operation: "run context")
        return RunContext(weights: snapshot, workspace: Workspace(), pool: StoragePool(),
                          gradients: gradients ? store.gradients : nil, layout: store.layout)
    }

    /// Brings the snapshot up to the store's current values (after the test or caller changed them).
    public func refresh(from store: ParameterStore) throws {
        try weights.refresh(from: store, operation: "run context")
    }

    /// A new activation that a kernel will overwrite in full.
    public func output(_ shape: [Int]) throws -> Tensor { try Tensor(uninitialized: shape, pool: pool) }

    /// A new zero-filled activation (a gradient that kernels add into).
    public func zeros(_ shape: [Int]) throws -> Tensor {
        let t = try Tensor(uninitialized: shape, pool: pool)
        t.pointer.initialize(repeating: 0, count: t.count)
        return t
    }

    /// Parameter `ref` as the kernels want it (packed or copied; see `WeightSnapshot`).
    @inline(__always) public func weight(_ ref: ParameterRef) -> UnsafeMutablePointer<Float> { weights.pointer(ref) }

    /// The gradient of parameter `ref` in the store (PyTorch layout), or nil for inference.
    @inline(__always) public func gradient(_ ref: ParameterRef) -> UnsafeMutablePointer<Float>? {
        gradients.map { $0 + layout.entries[ref.index].offset }
    }

    /// Stops between steps when the call was asked to stop (see `Cancellation`).
    func checkCancelled(_ operation: String, _ step: @autoclosure () -> String) throws {
        try workspace.cancellation?.check(operation, step())
    }
}

/// Stochastic depth for the encoder blocks of one training forward (ConvNeXt / 3D UX-Net's drop path):
/// each block's residual branch is dropped for a whole sample with probability `rate(block)` and
/// scaled by 1 / (1 - rate) otherwise. Rates grow linearly with the block's depth, from 0 to `maxRate`
/// (`torch.linspace(0, drop_path_rate, sum(depths))` in the released code). The masks are drawn by the
/// trainer's generator, so a seed gives the same run.
public struct DropPathMasks: Sendable {
    /// keep[block][sample]: 0 or 1 / (1 - rate).
    public let keep: [[Float]]

    /// Masks for `blocks` encoder blocks and `samples` samples, drawn from `rng`.
    public init(maxRate: Double, blocks: Int, samples: Int, rng: inout SplitMix64) {
        var keep: [[Float]] = []
        for b in 0..<blocks {
            let rate = blocks > 1 ? maxRate * Double(b) / Double(blocks - 1) : maxRate
            keep.append((0..<samples).map { _ in
                rate <= 0 ? 1 : (rng.unitDouble() < rate ? 0 : Float(1 / (1 - rate)))
            })
        }
        self.keep = keep
    }

    func keep(block: Int) -> [Float]? { block < keep.count ? keep[block] : nil }
}
