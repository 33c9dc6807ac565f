/// The network's simple layers, on channels-last activations (N x D x H x W x C tensors).
///
/// Each layer adds its parameters to a `ParameterLayout` under its state-dict prefix when built, says
/// how a runner's `WeightSnapshot` should hold them (`forms`), and computes with a `RunContext`: the
/// weights of the runner's snapshot, its scratch and activation memory, and (backward) the gradient
/// region of the store, into which every backward adds (`+=`, STYLE.md habit 2).

/// Channels-last activation sizes.
public struct Volume5: Equatable, Sendable, CustomStringConvertible {
    public var n: Int, d: Int, h: Int, w: Int, c: Int
    public var voxels: Int { d * h * w }
    public var count: Int { n * voxels * c }
    public var shape: [Int] { [n, d, h, w, c] }
    public init(n: Int, d: Int, h: Int, w: Int, c: Int) { self.n = n; self.d = d; self.h = h; self.w = w; self.c = c }

    /// The sizes of a channels-last activation; the rank is checked before any size is read.
    public init(_ t: Tensor, _ operation: String) throws {
        guard t.rank == 5 else {
            throw DeformUXError.shapeMismatch(operation, "expected a channels-last activation", expected: "N x D x H x W x C (rank 5)",
                                              got: "shape \(t.shape)")
        }
        self.init(n: t.shape[0], d: t.shape[1], h: t.shape[2], w: t.shape[3], c: t.shape[4])
    }

    public var description: String { "N=\(n) \(d)x\(h)x\(w) C=\(c)" }
}

/// Conv3d with parameters `weight` (Cout x Cin x k x k x k) and optionally `bias`; the snapshot holds
/// the weight packed for its kernel path.
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

    var packing: Conv3d.Packing { Conv3d.Packing(cin: cin, cout: cout, kernel: kernel, stride: stride, padding: padding) }

    func forms(_ f: inout [WeightSnapshot.Form]) { f[weight.index] = .conv(packing) }

    func shape(_ x: Tensor, _ x2: Tensor?) throws -> Conv3d.Shape {
        let v = try Volume5(x, "conv3d")
        let c2 = try x2.map { try Volume5($0, "conv3d").c } ?? 0
        let s = try Conv3d.Shape(n: v.n, cin: v.c + c2, cout: cout, d: v.d, h: v.h, w: v.w,
                                 kernel: kernel, stride: stride, padding: padding, cin2: c2)
        guard s.cin == cin else {
            throw DeformUXError.shapeMismatch("conv3d", "wrong input channel count", expected: "\(cin)", got: "\(s.cin)")
        }
        return s
    }

    /// y = conv([x, x2]); x2 (optional) supplies the last input channels. `statistics` (N x 2 x Cout
    /// doubles) receives per-channel sums and sums of squares of y; `transform` is applied to the
    /// input as the kernel reads it (3x3x3 only): see `Conv3d.forward`.
    func forward(_ x: Tensor, _ x2: Tensor? = nil, _ ctx: RunContext,
                 statistics: UnsafeMutablePointer<Double>? = nil,
                 transform: Conv3d.InputTransform? = nil) throws -> Tensor {
        let s = try shape(x, x2)
        let y = try ctx.output([s.n, s.od, s.oh, s.ow, s.cout])
        try Conv3d.forward(x: x.pointer, x2: x2?.pointer, packedWeight: ctx.weight(weight),
                           bias: bias.map { ctx.weight($0) }, y: y.pointer, shape: s,
                           workspace: ctx.workspace, inputTransform: transform, statistics: statistics)
        return y
    }

    /// Adds the weight and bias gradients into the store and dL/dx', dL/dx2' into gradX, gradX2 (either
    /// may be nil), for the input [x, x2] the forward saw (with the same `transform`, x' = transform(x)).
    func backward(_ x: Tensor, _ x2: Tensor? = nil, gradY: Tensor, _ ctx: RunContext,
                  gradX: Tensor?, gradX2: Tensor? = nil, transform: Conv3d.InputTransform? = nil) throws {
        let s = try shape(x, x2)
        try Conv3d.backward(x: x.pointer, x2: x2?.pointer, packedWeight: ctx.weight(weight), gradY: gradY.pointer,
                            gradX: gradX?.pointer, gradX2: gradX2?.pointer, gradWeight: ctx.gradient(weight),
                            gradBias: bias.flatMap { ctx.gradient($0) }, shape: s, workspace: ctx.workspace,
                            inputTransform: transform)
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

    /// y = LN(x) into a new tensor, or into `into` (which may be x itself).
    func forward(_ x: Tensor, _ ctx: RunContext, into: Tensor? = nil) throws -> Tensor {
        let v = try Volume5(x, "layer_norm")
        guard v.c == channels else {
            throw DeformUXError.shapeMismatch("layer_norm", "wrong channel count", expected: "\(channels)", got: "\(v.c)")
        }
        let y = try into ?? ctx.output(x.shape)
        ChannelLayerNorm.forward(x: x.pointer, weight: ctx.weight(weight), bias: ctx.weight(bias),
                                 y: y.pointer, voxels: v.n * v.voxels, channels: v.c)
        return y
    }

    /// gradX += dL/dx for the input x the forward saw; the weight and bias gradients go to the store.
    func backward(_ x: Tensor, gradY: Tensor, _ ctx: RunContext, gradX: Tensor?) throws {
        let v = try Volume5(x, "layer_norm")
        try ChannelLayerNorm.backward(x: x.pointer, weight: ctx.weight(weight), gradY: gradY.pointer,
                                      gradX: gradX?.pointer, gradWeight: ctx.gradient(weight),
                                      gradBias: ctx.gradient(bias), voxels: v.n * v.voxels, channels: v.c,
                                      workspace: ctx.workspace)
    }

    func initialize(_ p: ParameterStore) {
        initConstant(p, weight, count: channels, 1)
        initConstant(p, bias, count: channels, 0)
    }
}
