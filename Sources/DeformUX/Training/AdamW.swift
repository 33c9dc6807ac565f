#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// AdamW with `torch.optim.AdamW`'s exact update (single-tensor path, amsgrad and maximize off), on
/// flat float32 buffers: the parameter store keeps values, gradients and the two moments at the same
/// offsets, so one step is one pass over a list of segments.
///
///     step += 1
///     p  = p * (1 - lr * wd)                          decoupled weight decay, first (wd = 0 where decay is off)
///     m  = m + (1 - beta1) * (g - m)                  torch's lerp(m, g, 1 - beta1), fused multiply-add
///     v  = v * beta2 + ((1 - beta2) * g) * g          the sum fused, as torch's vectorised addcmul
///     bc1 = 1 - beta1^step,  bc2 = 1 - beta2^step     (Double, as torch computes them in Python)
///     p  = p + (-lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
///
/// Scalars are formed in Double and rounded to float once, as torch passes Python floats to its
/// float32 kernels; per-element arithmetic is float32 in torch's order, with fused multiply-adds where
/// torch's AVX kernels use them: the results are torch's bit for bit on the fixtures (AdamWTests).
///
/// Every segment is stepped on every call, as torch steps every parameter whose `.grad` is not None
/// (a parameter the loss does not reach gets g = 0, still decays and still moves by its momentum).
/// The caller owns the gradients: backward accumulates into them (+=), the caller zeroes them once per
/// step after `update`, and for k accumulated micro-batches either scales the loss gradient by 1/k
/// (`DiceCELoss.backward(gradientScale:)`) or calls `AdamW.scale` before `update`.
public struct AdamW: Equatable, Sendable, Codable {
    /// torch.optim.AdamW's arguments; the defaults are the training recipe's (ARCHITECTURE.md section 7).
    public struct Hyperparameters: Equatable, Sendable, Codable {
        public var learningRate: Double
        public var beta1: Double
        public var beta2: Double
        public var eps: Double
        /// Applied to segments with `decay` set.
        public var weightDecay: Double

        public init(learningRate: Double = 1e-4, beta1: Double = 0.9, beta2: Double = 0.999, eps: Double = 1e-8,
                    weightDecay: Double = 0.08) {
            self.learningRate = learningRate
            self.beta1 = beta1
            self.beta2 = beta2
            self.eps = eps
            self.weightDecay = weightDecay
        }

        /// torch's checks (lr, eps, weight decay >= 0; betas in [0, 1)), plus finiteness.
        public func validate() throws {
            let op = "AdamW"
            func check(_ ok: Bool, _ name: String, _ value: Double, _ expected: String) throws {
                if !ok { throw DeformUXError.invalidArgument(op, "invalid \(name)", expected: expected, got: "\(value)") }
            }
            try check(learningRate >= 0 && learningRate.isFinite, "learning rate", learningRate, "finite >= 0")
            try check(eps >= 0 && eps.isFinite, "eps", eps, "finite >= 0")
            try check(beta1 >= 0 && beta1 < 1, "beta1", beta1, "0 <= beta1 < 1")
            try check(beta2 >= 0 && beta2 < 1, "beta2", beta2, "0 <= beta2 < 1")
            try check(weightDecay >= 0 && weightDecay.isFinite, "weight decay", weightDecay, "finite >= 0")
        }
    }

    /// A run of `count` parameters starting at `offset` in all four buffers; `decay` says whether weight
    /// decay applies (torch: a parameter group with weight_decay = 0 when false).
    public struct Segment: Equatable, Sendable, Codable {
        public var offset: Int
        public var count: Int
        public var decay: Bool
        public init(offset: Int, count: Int, decay: Bool = true) {
            self.offset = offset
            self.count = count
            self.decay = decay
        }
    }

    /// Elements per parallel part (a fixed partition; each element is independent, so any partition
    /// gives the same result).
    public static let partElements = 1 << 16

    public var hyperparameters: Hyperparameters
    /// Steps taken so far (torch's state["step"]); the next `update` is step `step + 1`. Saved with
    /// the moments for resuming.
    public private(set) var step: Int

    public init(_ hyperparameters: Hyperparameters = Hyperparameters(), step: Int = 0) throws {
        try hyperparameters.validate()
        guard step >= 0 else { throw DeformUXError.invalidArgument("AdamW", "invalid step count", expected: ">= 0", got: "\(step)") }
        self.hyperparameters = hyperparameters
        self.step = step
    }

    enum CodingKeys: String, CodingKey { case hyperparameters, step }

    /// Decodes a saved optimiser state (a checkpoint), validating it like `init`.
    public init(from decoder: Swift.Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        try self.init(try c.decode(Hyperparameters.self, forKey: .hyperparameters), step: try c.decode(Int.self, forKey: .step))
    }

    /// The segments of every parameter of `layout`, in layout order. With `decayNormsAndBiases` false,
    /// tensors of rank <= 1 (biases, norm weights and biases, the layer scale gamma) get no weight
    /// decay, the usual ConvNeXt/timm rule. The released training code decays everything
    /// (`torch.optim.AdamW(model.parameters())`), hence the default.
    public static func segments(for layout: ParameterLayout, decayNormsAndBiases: Bool = true) -> [Segment] {
        layout.entries.map { e in
            Segment(offset: e.offset, count: e.count, decay: decayNormsAndBiases || e.shape.count > 1)
        }
    }

    /// Checks that segments lie inside `0..<bufferCount` and do not overlap (an overlap would step the
    /// same values twice).
    public static func validate(segments: [Segment], bufferCount: Int) throws {
        let op = "AdamW"
        for (i, s) in segments.enumerated() {
            guard s.offset >= 0, s.count >= 0, s.offset <= bufferCount, s.count <= bufferCount - s.offset else {
                throw DeformUXError.invalidArgument(op, "segment \(i) lies outside the buffers",
                                                    expected: "offset + count <= \(bufferCount)", got: "offset \(s.offset), count \(s.count)")
            }
        }
        let sorted = segments.enumerated().filter { $0.element.count > 0 }.sorted { $0.element.offset < $1.element.offset }
        for k in sorted.indices.dropFirst() {
            let a = sorted[k - 1], b = sorted[k]
            if a.element.offset + a.element.count > b.element.offset {
                throw DeformUXError.invalidArgument(op, "segments \(a.offset) and \(b.offset) overlap",
                                                    expected: "disjoint segments",
                                                    got: "[\(a.element.offset), \(a.element.offset + a.element.count)) and [\(b.element.offset), \(b.element.offset + b.element.count))")
            }
        }
    }

    /// One optimiser step over `segments` of the four buffers (each `bufferCount` floats). The learning
    /// rate is `hyperparameters.learningRate` (a scheduler sets it between steps).
    public mutating func update(values: UnsafeMutablePointer<Float>, gradients: UnsafePointer<Float>,
                                m: UnsafeMutablePointer<Float>, v: UnsafeMutablePointer<Float>,
                                bufferCount: Int, segments: [Segment]) throws {
        try hyperparameters.validate()
        try AdamW.validate(segments: segments, bufferCount: bufferCount)
        let h = hyperparameters
        let t = step + 1
        let bc1 = 1 - pow(h.beta1, Double(t))
        let bc2 = 1 - pow(h.beta2, Double(t))
        // float32 scalars, as torch's kernels receive them
        let decayFactor = Float(1 - h.learningRate * h.weightDecay)
        let oneMinusBeta1 = Float(1 - h.beta1)
        let beta2 = Float(h.beta2)
        let oneMinusBeta2 = Float(1 - h.beta2)
        let negStepSize = Float(-(h.learningRate / bc1))
        let bc2Sqrt = Float(bc2.squareRoot())
        let eps = Float(h.eps)

        let chunks = AdamW.chunks(segments)
        chunks.withUnsafeBufferPointer { cb in
            parallelFor(cb.count) { part in
                let c = cb[part]
                let decay = c.decay && h.weightDecay != 0
                for i in c.range {
                    // torch: param.mul_(1 - lr * wd) only when weight_decay != 0
                    var p = decay ? values[i] * decayFactor : values[i]
                    let g = gradients[i]
                    let mi = m[i].addingProduct(oneMinusBeta1, g - m[i])
                    let vi = (v[i] * beta2).addingProduct(oneMinusBeta2 * g, g)
                    let denom = vi.squareRoot() / bc2Sqrt + eps
                    p = p + negStepSize * mi / denom
                    m[i] = mi
                    v[i] = vi
                    values[i] = p
                }
            }
        }
        step = t
    }

    /// Multiplies `segments` of `buffer` by `factor` (e.g. 1/k after accumulating k micro-batches).
    public static func scale(_ buffer: UnsafeMutablePointer<Float>, bufferCount: Int, segments: [Segment],
                             by factor: Float) throws {
        try validate(segments: segments, bufferCount: bufferCount)
        let chunks = AdamW.chunks(segments)
        chunks.withUnsafeBufferPointer { cb in
            parallelFor(cb.count) { part in
                for i in cb[part].range { buffer[i] *= factor }
            }
        }
    }

    struct Chunk {
        let range: Range<Int>
        let decay: Bool
    }

    /// The segments cut into parts of at most `partElements`.
    static func chunks(_ segments: [Segment]) -> [Chunk] {
        var out: [Chunk] = []
        for s in segments {
            var lo = s.offset
            let end = s.offset + s.count
            while lo < end {
                let hi = min(lo + partElements, end)
                out.append(Chunk(range: lo..<hi, decay: s.decay))
                lo = hi
            }
        }
        return out
    }
}
