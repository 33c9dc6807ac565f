@testable import DeformUX

/// How a case's offsets are drawn.
enum OffsetKind: CustomStringConvertible {
    /// Uniform in [-r, r], odd multiples of 2^-10: every sampling position is exact in Float and never
    /// an integer, so floor and fractions agree between Float and Double (the offset gradient jumps at
    /// integers, and a rounding flip there would be a false alarm).
    case uniform(Double)
    /// Uniform in [-r, r], any Float: only the continuous outputs (y, grad x/weight/bias) are compared.
    case unquantized(Double)
    /// Whole numbers in [-r, r]: samples land exactly on voxels and exactly on the -1 / size borders.
    case integers(Int)
    /// Every offset +-[m/2, m): every sample is outside, y = bias.
    case far(Double)
    /// Half the offsets +-[m/2, m), half uniform(2.5).
    case mixedFar(Double)
    /// A quarter NaN, a quarter +inf, a quarter -inf, the rest uniform(2.5): non-finite samples are 0.
    case nonFinite
    case zero

    var description: String {
        switch self {
        case .uniform(let r): return "uniform(+-\(r))"
        case .unquantized(let r): return "unquantized(+-\(r))"
        case .integers(let r): return "integers(+-\(r))"
        case .far(let m): return "far(\(m))"
        case .mixedFar(let m): return "mixedFar(\(m))"
        case .nonFinite: return "nonFinite"
        case .zero: return "zero"
        }
    }

    /// Whether Float and Double sampling positions are the same numbers (so the offset gradient,
    /// discontinuous at integers, must agree too).
    var exactPositions: Bool {
        if case .unquantized = self { return false }
        return true
    }

    func draw(_ count: Int, _ rng: inout SplitMix64) -> [Float] {
        func quantized(_ r: Double, _ rng: inout SplitMix64) -> Float {
            let m = Int((r * 1024 - 1) / 2)
            return Float(Double(2 * rng.int(-m...(m - 1)) + 1) / 1024)
        }
        func far(_ m: Double, _ rng: inout SplitMix64) -> Float {
            Float(rng.uniform(m / 2, m) * (rng.bool() ? 1 : -1))
        }
        return (0..<count).map { _ in
            switch self {
            case .uniform(let r): return quantized(r, &rng)
            case .unquantized(let r): return Float(rng.uniform(-r, r))
            case .integers(let r): return Float(rng.int(-r...r))
            case .far(let m): return far(m, &rng)
            case .mixedFar(let m): return rng.bool() ? far(m, &rng) : quantized(2.5, &rng)
            case .nonFinite:
                switch rng.int(0...3) {
                case 0: return .nan
                case 1: return .infinity
                case 2: return -.infinity
                default: return quantized(2.5, &rng)
                }
            case .zero: return 0
            }
        }
    }
}

/// The inputs of one DDC case, in Float (what the fast kernel takes) and Double (for the oracle).
struct DDCData {
    let shape: DDCShape
    let x: [Float], offsets: [Float], weight: [Float], bias: [Float]?, gradY: [Float]

    init(_ shape: DDCShape, offsets kind: OffsetKind, bias hasBias: Bool = true, seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        self.shape = shape
        x = rng.floats(shape.count)
        offsets = kind.draw(shape.offsetCount, &rng)
        weight = rng.floats(shape.weightCount)
        bias = hasBias ? rng.floats(shape.c) : nil
        gradY = rng.floats(shape.count)
    }

    var xShape: [Int] { [shape.n, shape.c, shape.d, shape.h, shape.w] }
    var offsetShape: [Int] { [shape.n, DDCShape.offsetChannels, shape.d, shape.h, shape.w] }
    var weightShape: [Int] { [shape.c, 1, 3, 3, 3] }

    func referenceForward() -> [Double] {
        DeformConv3dReference.forward(x: x.map(Double.init), offsets: offsets.map(Double.init),
                                      weight: weight.map(Double.init), bias: bias?.map(Double.init), shape: shape)
    }

    func referenceBackward() -> (gradX: [Double], gradOffsets: [Double], gradWeight: [Double], gradBias: [Double]) {
        DeformConv3dReference.backward(x: x.map(Double.init), offsets: offsets.map(Double.init),
                                       weight: weight.map(Double.init), gradY: gradY.map(Double.init), shape: shape)
    }

    /// The fast kernel through its Tensor API.
    func fastForward(workspace: Workspace? = nil) throws -> [Float] {
        let y = try DeformConv3d.forward(x: Tensor(shape: xShape, values: x),
                                         offsets: Tensor(shape: offsetShape, values: offsets),
                                         weight: Tensor(shape: weightShape, values: weight),
                                         bias: bias.map { try Tensor(shape: [shape.c], values: $0) },
                                         workspace: workspace)
        return try y.toArray()
    }

    func fastBackward(workspace: Workspace? = nil) throws
        -> (gradX: [Float], gradOffsets: [Float], gradWeight: [Float], gradBias: [Float]) {
        let g = try DeformConv3d.backward(x: Tensor(shape: xShape, values: x),
                                          offsets: Tensor(shape: offsetShape, values: offsets),
                                          weight: Tensor(shape: weightShape, values: weight),
                                          gradY: Tensor(shape: xShape, values: gradY), workspace: workspace)
        return try (g.gradX.toArray(), g.gradOffsets.toArray(), g.gradWeight.toArray(), g.gradBias.toArray())
    }
}

/// N x C x V -> N x V x C (V = D*H*W).
func toChannelsLast(_ a: [Float], n: Int, c: Int, voxels: Int) -> [Float] {
    var out = [Float](repeating: 0, count: a.count)
    for b in 0..<n { for ch in 0..<c { for v in 0..<voxels { out[(b * voxels + v) * c + ch] = a[(b * c + ch) * voxels + v] } } }
    return out
}

/// N x V x C -> N x C x V.
func toChannelsFirst(_ a: [Float], n: Int, c: Int, voxels: Int) -> [Float] {
    var out = [Float](repeating: 0, count: a.count)
    for b in 0..<n { for ch in 0..<c { for v in 0..<voxels { out[(b * c + ch) * voxels + v] = a[(b * voxels + v) * c + ch] } } }
    return out
}

extension DDCData {
    /// The fast kernel through its pointer API with x, y, grad_y and grad_x channels-last
    /// (N x D x H x W x C); results converted back to channels-first for comparison.
    func fastChannelsLast(workspace: Workspace = Workspace()) throws
        -> (y: [Float], gradX: [Float], gradOffsets: [Float], gradWeight: [Float], gradBias: [Float]) {
        let s = shape
        var x = toChannelsLast(self.x, n: s.n, c: s.c, voxels: s.voxels)
        var gy = toChannelsLast(gradY, n: s.n, c: s.c, voxels: s.voxels)
        var off = offsets, w = weight
        var y = [Float](repeating: 0, count: s.count)
        var gx = [Float](repeating: 0, count: s.count), go = [Float](repeating: 0, count: s.offsetCount)
        var gw = [Float](repeating: 0, count: s.weightCount), gb = [Float](repeating: 0, count: s.c)
        if var b = bias {
            try DeformConv3d.forward(x: &x, offsets: &off, weight: &w, bias: &b, y: &y, shape: s,
                                     layout: .channelsLast, workspace: workspace)
        } else {
            try DeformConv3d.forward(x: &x, offsets: &off, weight: &w, bias: nil, y: &y, shape: s,
                                     layout: .channelsLast, workspace: workspace)
        }
        try DeformConv3d.backward(x: &x, offsets: &off, weight: &w, gradY: &gy, gradX: &gx, gradOffsets: &go,
                                  gradWeight: &gw, gradBias: &gb, shape: s, layout: .channelsLast, workspace: workspace)
        return (toChannelsFirst(y, n: s.n, c: s.c, voxels: s.voxels), toChannelsFirst(gx, n: s.n, c: s.c, voxels: s.voxels),
                go, gw, gb)
    }
}

func ddcShape(_ n: Int, _ c: Int, _ d: Int, _ h: Int, _ w: Int) -> DDCShape {
    // Sizes in the tables are valid; a throw here is a test bug.
    try! DDCShape(n: n, c: c, d: d, h: h, w: w)
}
