/// The network's building blocks, on channels-last activations (N x D x H x W x C tensors).
///
/// Each block adds its parameters to a `ParameterLayout` under its state-dict prefix when built, and
/// reads them from a `ParameterStore` when run. Forward passes here are inference passes: they keep
/// nothing for backward (training adds saved activations per patch shape).

/// Channels-last activation sizes.
public struct Volume5: Equatable, Sendable, CustomStringConvertible {
    public var n: Int, d: Int, h: Int, w: Int, c: Int
    public var voxels: Int { d * h * w }
    public var count: Int { n * voxels * c }
    public var shape: [Int] { [n, d, h, w, c] }
    public init(n: Int, d: Int, h: Int, w: Int, c: Int) { self.n = n; self.d = d; self.h = h; self.w = w; self.c = c }
    public init(_ t: Tensor) { self.init(n: t.shape[0], d: t.shape[1], h: t.shape[2], w: t.shape[3], c: t.shape[4]) }
    public var description: String { "N=\(n) \(d)x\(h)x\(w) C=\(c)" }
}

/// Everything a forward pass needs besides the input: parameters and scratch memory.
public final class RunContext {
    public let parameters: ParameterStore
    public let workspace: Workspace
    /// Where activations are allocated, so that a pass reuses the memory of the activations released
    /// before it (and of the previous pass) instead of faulting in new pages.
    public let pool: StoragePool?
    public init(parameters: ParameterStore, workspace: Workspace = Workspace(), pool: StoragePool? = nil) {
        self.parameters = parameters
        self.workspace = workspace
        self.pool = pool
    }

    /// A new activation that a kernel will overwrite in full.
    public func output(_ shape: [Int]) throws -> Tensor { try Tensor(uninitialized: shape, pool: pool) }
}

/// Conv3d with parameters `weight` (Cout x Cin x k x k x k) and optionally `bias`.
final class ConvLayer {
    let cin: Int, cout: Int, kernel: Int, stride: Int, padding: Int
    let weight: ParameterRef
    let bias: ParameterRef?

    init(_ prefix: String, cin: Int, cout: Int, kernel: Int, stride: Int = 1, padding: Int = 0, bias: Bool,
         layout: inout ParameterLayout) throws {
        self.cin = cin; self.cout = cout; self.kernel = kernel; self.stride = stride; self.padding = padding
        weight = try layout.add(prefix + "weight", shape: [cout, cin, kernel, kernel, kernel])
        self.bias = bias ? try layout.add(prefix + "bias", shape: [cout]) : nil
    }

    /// y = conv([x, x2]); x2 (optional) supplies the last input channels. `statistics` (N x 2 x Cout
    /// doubles) receives per-channel sums and sums of squares of y; `transform` is applied to the
    /// input as the kernel reads it (3x3x3 only): see `Conv3d.forward`.
    func forward(_ x: Tensor, _ x2: Tensor? = nil, _ ctx: RunContext,
                 statistics: UnsafeMutablePointer<Double>? = nil,
                 transform: Conv3d.InputTransform? = nil) throws -> Tensor {
        let v = Volume5(x)
        let c2 = x2.map { Volume5($0).c } ?? 0
        let s = try Conv3d.Shape(n: v.n, cin: v.c + c2, cout: cout, d: v.d, h: v.h, w: v.w,
                                 kernel: kernel, stride: stride, padding: padding, cin2: c2)
        guard s.cin == cin else {
            throw DeformUXError.shapeMismatch("conv3d", "layer expects \(cin) input channels, got \(s.cin)")
        }
        let packed = try ctx.workspace.buffer("conv.packed", count: Conv3d.packedCount(s))
        Conv3d.pack(weight: ctx.parameters.value(weight), into: packed, shape: s)
        let y = try ctx.output([s.n, s.od, s.oh, s.ow, s.cout])
        try Conv3d.forward(x: x.pointer, x2: x2?.pointer, packedWeight: packed,
                           bias: bias.map { ctx.parameters.value($0) }, y: y.pointer, shape: s,
                           workspace: ctx.workspace, inputTransform: transform, statistics: statistics)
        return y
    }

    /// PyTorch's default initialisation: uniform +-1/sqrt(fan_in) for weight and bias.
    func initialize(_ p: ParameterStore, _ rng: inout SplitMix64) {
        initUniform(p, weight, count: cout * cin * kernel * kernel * kernel, fanIn: cin * kernel * kernel * kernel, &rng)
        if let bias { initUniform(p, bias, count: cout, fanIn: cin * kernel * kernel * kernel, &rng) }
    }
}

/// PyTorch's default Conv/Linear initialisation (kaiming_uniform with a = sqrt(5), and the bias rule):
/// both come to uniform +-1/sqrt(fan_in).
func initUniform(_ p: ParameterStore, _ ref: ParameterRef, count: Int, fanIn: Int, _ rng: inout SplitMix64) {
    let bound = 1 / Float(max(fanIn, 1)).squareRoot()
    let w = p.value(ref)
    for i in 0..<count { w[i] = rng.uniform(-bound, bound) }
}

func initConstant(_ p: ParameterStore, _ ref: ParameterRef, count: Int, _ value: Float) {
    p.value(ref).initialize(repeating: value, count: count)
}

/// Channel LayerNorm with `weight` and `bias` (C), eps 1e-6.
final class LayerNormLayer {
    let channels: Int
    let weight: ParameterRef, bias: ParameterRef

    init(_ prefix: String, channels: Int, layout: inout ParameterLayout) throws {
        self.channels = channels
        weight = try layout.add(prefix + "weight", shape: [channels])
        bias = try layout.add(prefix + "bias", shape: [channels])
    }

    func forward(_ x: Tensor, _ ctx: RunContext) throws -> Tensor {
        let v = Volume5(x)
        let y = try ctx.output(x.shape)
        ChannelLayerNorm.forward(x: x.pointer, weight: ctx.parameters.value(weight), bias: ctx.parameters.value(bias),
                                 y: y.pointer, voxels: v.n * v.voxels, channels: v.c)
        return y
    }

    func initialize(_ p: ParameterStore) {
        initConstant(p, weight, count: channels, 1)
        initConstant(p, bias, count: channels, 0)
    }
}

/// MONAI's UnetResBlock as the released code uses it (ARCHITECTURE.md section 1):
/// conv1 3x3x3 -> IN -> LeakyReLU -> conv2 3x3x3 -> IN; residual = input, or conv3 1x1x1 -> IN when
/// the width changes; add; LeakyReLU(0.01). Convolutions without bias.
final class ResBlock {
    static let slope: Float = 0.01
    let conv1: ConvLayer, conv2: ConvLayer, conv3: ConvLayer?

    init(_ prefix: String, cin: Int, cout: Int, layout: inout ParameterLayout) throws {
        conv1 = try ConvLayer(prefix + "conv1.conv.", cin: cin, cout: cout, kernel: 3, padding: 1, bias: false, layout: &layout)
        conv2 = try ConvLayer(prefix + "conv2.conv.", cin: cout, cout: cout, kernel: 3, padding: 1, bias: false, layout: &layout)
        conv3 = cin != cout
            ? try ConvLayer(prefix + "conv3.conv.", cin: cin, cout: cout, kernel: 1, bias: false, layout: &layout)
            : nil
    }

    /// The block on [x, x2] (x2: optional second source of input channels, the UpBlock's skip).
    ///
    /// The InstanceNorms cost no passes of their own: each conv gathers its output's statistics as it
    /// writes it, conv1's norm and LeakyReLU are applied by conv2 as it reads its input, and the last
    /// norms, the residual add and the LeakyReLU are one pass. conv1's output is released before the
    /// residual branch runs, so at most four activations of the block's size are alive at once
    /// (input, skip, conv1's and conv2's outputs).
    func forward(_ x: Tensor, _ x2: Tensor? = nil, _ ctx: RunContext) throws -> Tensor {
        let n = x.shape[0], c = conv1.cout
        // Per sample and channel: statistics (2C doubles), then scale and shift (2C floats) per norm.
        let stats = try ctx.workspace.buffer("resblock.stats", count: 3 * n * 2 * c * 2 + 3 * n * 2 * c)
        let raw = UnsafeMutableRawPointer(stats).bindMemory(to: Double.self, capacity: 3 * n * 2 * c)
        let s1 = raw, s2 = raw + n * 2 * c, s3 = raw + 2 * n * 2 * c
        let affine = stats + 3 * n * 2 * c * 2
        let (scale1, shift1) = (affine, affine + n * c)
        let (scale2, shift2) = (affine + 2 * n * c, affine + 3 * n * c)
        let (scale3, shift3) = (affine + 4 * n * c, affine + 5 * n * c)
        let b: Tensor = try {
            let a = try conv1.forward(x, x2, ctx, statistics: s1)
            let voxels = a.count / (n * c)
            InstanceNorm.affine(fromSums: s1, n: n, channels: c, voxels: voxels, scale: scale1, shift: shift1)
            let transform = Conv3d.InputTransform(scale: scale1, shift: shift1, leakySlope: ResBlock.slope)
            return try conv2.forward(a, nil, ctx, statistics: s2, transform: transform)
        }()
        let voxels = b.count / (n * c)
        InstanceNorm.affine(fromSums: s2, n: n, channels: c, voxels: voxels, scale: scale2, shift: shift2)
        if let conv3 {
            let r = try conv3.forward(x, x2, ctx, statistics: s3)
            InstanceNorm.affine(fromSums: s3, n: n, channels: c, voxels: voxels, scale: scale3, shift: shift3)
            InstanceNorm.applyAffine(b.pointer, scale: scale2, shift: shift2, plus: r.pointer,
                                     scale: scale3, shift: shift3, leakySlope: ResBlock.slope,
                                     n: n, voxels: voxels, channels: c)
        } else {
            guard x2 == nil, x.count == b.count else {
                throw DeformUXError.internal("res block", "an identity residual needs one input of the output's shape")
            }
            InstanceNorm.applyAffine(b.pointer, scale: scale2, shift: shift2, plus: x.pointer,
                                     scale: nil, shift: nil, leakySlope: ResBlock.slope,
                                     n: n, voxels: voxels, channels: c)
        }
        return b
    }

    func initialize(_ p: ParameterStore, _ rng: inout SplitMix64) {
        conv1.initialize(p, &rng)
        conv2.initialize(p, &rng)
        conv3?.initialize(p, &rng)
    }
}

/// MONAI's UnetrUpBlock: ConvTranspose3d k2 s2 (no bias) -> concatenate [upsampled, skip] -> ResBlock.
/// The concatenation is never materialised: the ResBlock's convs read the two sources.
final class UpBlock {
    let cin: Int, cout: Int
    let transposedWeight: ParameterRef
    let block: ResBlock

    init(_ prefix: String, cin: Int, cout: Int, layout: inout ParameterLayout) throws {
        self.cin = cin; self.cout = cout
        transposedWeight = try layout.add(prefix + "transp_conv.conv.weight", shape: [cin, cout, 2, 2, 2])
        block = try ResBlock(prefix + "conv_block.", cin: 2 * cout, cout: cout, layout: &layout)
    }

    func forward(_ x: Tensor, skip: Tensor, _ ctx: RunContext) throws -> Tensor {
        let v = Volume5(x)
        guard v.c == cin else {
            throw DeformUXError.shapeMismatch("up block", "expects \(cin) channels, got \(v.c)")
        }
        let upShape = [v.n, 2 * v.d, 2 * v.h, 2 * v.w, cout]
        guard skip.shape == upShape else {
            throw DeformUXError.shapeMismatch("up block", "the skip must have shape \(upShape) (N x D x H x W x C), got \(skip.shape)")
        }
        let s = try ConvTranspose3d.Shape(n: v.n, cin: v.c, cout: cout, d: v.d, h: v.h, w: v.w)
        let up = try ctx.output(upShape)
        let packed = try ctx.workspace.buffer("conv.packed", count: ConvTranspose3d.packedCount(s))
        ConvTranspose3d.pack(weight: ctx.parameters.value(transposedWeight), into: packed, shape: s)
        try ConvTranspose3d.forward(x: x.pointer, packedWeight: packed, bias: nil, y: up.pointer,
                                    shape: s, workspace: ctx.workspace)
        return try block.forward(up, skip, ctx)
    }

    func initialize(_ p: ParameterStore, _ rng: inout SplitMix64) {
        // ConvTranspose3d's fan_in as PyTorch computes it: weight.size(1) * k^3.
        initUniform(p, transposedWeight, count: cin * cout * 8, fanIn: cout * 8, &rng)
        block.initialize(p, &rng)
    }
}
