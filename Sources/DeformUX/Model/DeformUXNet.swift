/// DeformUX-Net (and 3D UX-Net): a U-Net whose encoder uses depthwise deformable 3x3x3 convolutions
/// with tri-planar offsets, and a UNETR-style decoder (ARCHITECTURE.md).
///
/// Parameters live in one `ParameterStore` under the released code's state-dict names, so official
/// checkpoints load by name. `forward` takes and returns PyTorch's N x C x D x H x W layout; inside,
/// activations are channels-last (N x D x H x W x C).
public final class DeformUXNet {
    public let config: DeformUXNetConfig
    public let parameters: ParameterStore
    let encoder: Encoder
    let encoders: [ResBlock]      // encoder1 ... encoder5
    let decoders: [UpBlock]       // decoder5, decoder4, decoder3, decoder2
    let decoder1: ResBlock
    let head: ConvLayer           // out.conv.conv
    let workspace = Workspace()
    /// Activation memory reused across the passes of one forward and between forwards.
    let pool = StoragePool()

    /// Builds the network with PyTorch's default initialisation (offset branches zero, gamma 1e-6),
    /// reproducible from `seed`.
    public init(config: DeformUXNetConfig, seed: UInt64 = 0) throws {
        try config.validate()
        self.config = config
        var layout = ParameterLayout()
        let f = config.featureSize
        encoder = try Encoder(config: config, layout: &layout)
        // widths[k]: the output width of encoder k (encoder1 ... encoder5); widths[0] is the input.
        let widths = [config.inChannels] + f + [config.hiddenSize]
        var enc: [ResBlock] = []
        for k in 1...5 {
            enc.append(try ResBlock("encoder\(k).layer.", cin: widths[k - 1], cout: widths[k], layout: &layout))
        }
        encoders = enc
        // decoder k (5 ... 2) upsamples widths[k] to widths[k - 1] and takes encoder k-1's output as skip.
        var dec: [UpBlock] = []
        for k in stride(from: 5, through: 2, by: -1) {
            dec.append(try UpBlock("decoder\(k).", cin: widths[k], cout: widths[k - 1], layout: &layout))
        }
        decoders = dec
        decoder1 = try ResBlock("decoder1.layer.", cin: f[0], cout: f[0], layout: &layout)
        head = try ConvLayer("out.conv.conv.", cin: f[0], cout: config.outChannels, kernel: 1, bias: true, layout: &layout)
        parameters = try ParameterStore(layout: layout)
        var rng = SplitMix64(seed: seed)
        encoder.initialize(parameters, &rng)
        for e in encoders { e.initialize(parameters, &rng) }
        for d in decoders { d.initialize(parameters, &rng) }
        decoder1.initialize(parameters, &rng)
        head.initialize(parameters, &rng)
    }

    /// The number of trainable parameters (ARCHITECTURE.md section 6: 55,790,776 for the default).
    public var parameterCount: Int { parameters.parameterCount }

    /// Checks x is N x Cin x D x H x W with every spatial size a positive multiple of 16 (the encoder
    /// halves the grid four times; padding to a multiple of 16 is the pipeline's job).
    public func validateInput(_ shape: [Int]) throws {
        guard shape.count == 5, shape[0] >= 1 else {
            throw DeformUXError.shapeMismatch("DeformUXNet.forward", "x must be N x \(config.inChannels) x D x H x W, got shape \(shape)")
        }
        guard shape[1] == config.inChannels else {
            throw DeformUXError.shapeMismatch("DeformUXNet.forward", "x must have \(config.inChannels) channels (shape N x \(config.inChannels) x D x H x W), got shape \(shape)")
        }
        for (name, s) in zip(["D", "H", "W"], shape[2...]) where s < 16 || s % 16 != 0 {
            throw DeformUXError.shapeMismatch("DeformUXNet.forward", "spatial sizes must be positive multiples of 16 (pad the volume first), got \(name) = \(s) in shape \(shape)")
        }
    }

    /// Called between the steps of a long call with (steps done, total steps); return false to cancel
    /// (the call then throws `DeformUXError.cancelled`).
    public typealias Progress = (_ done: Int, _ total: Int) -> Bool

    /// Logits N x Cout x D x H x W (no softmax) for x N x Cin x D x H x W.
    public func forward(_ x: Tensor, progress: Progress? = nil) throws -> Tensor {
        let y = try Tensor(uninitialized: [x.shape[0], config.outChannels] + Array(x.shape.dropFirst(2)))
        try forward(x, into: y.pointer, progress: progress)
        return y
    }

    /// Writes the logits (N x Cout x D x H x W) into memory the caller owns (the C ABI's output array).
    public func forward(_ x: Tensor, into y: UnsafeMutablePointer<Float>, progress: Progress? = nil) throws {
        try validateInput(x.shape)
        try x.requireContiguous("DeformUXNet.forward x")
        let ctx = RunContext(parameters: parameters, workspace: workspace, pool: pool)
        // Memory kept for sizes this pass did not use goes back to the system at its end.
        defer { pool.endPass() }
        let logits = try forwardChannelsLast(try toChannelsLast(x, pool: pool), ctx, progress: progress)
        transposeToChannelsFirst(logits, into: y)
    }

    /// Frees the memory kept between calls (activation pool, scratch): the next forward allocates it
    /// again. For long-lived processes that run a model once in a while.
    public func releaseMemory() {
        pool.trim()
        workspace.release()
    }

    /// Steps reported by a forward pass.
    static let forwardSteps = 12

    /// The network on a channels-last input (N x D x H x W x Cin); channels-last logits.
    func forwardChannelsLast(_ x: Tensor, _ ctx: RunContext, progress: Progress? = nil) throws -> Tensor {
        var step = 0
        func advance() throws {
            step += 1
            if let progress, !progress(step, DeformUXNet.forwardSteps) {
                throw DeformUXError.cancelled("DeformUXNet.forward", "cancelled after step \(step) of \(DeformUXNet.forwardSteps)")
            }
        }
        // Activations are dropped (set to nil) as soon as nothing needs them: the peak is decoder2 at
        // full resolution, where only encoder1's output, the upsampled input and the block's two
        // convolution outputs should be alive.
        // Encoder: skips x2..x5 (normed stage outputs).
        var skips: [Tensor] = try encoder.forward(x, ctx)
        // The encoder's scratch (DDC padding and offsets, MLP chunks) is not needed by the decoder.
        ctx.workspace.release(prefixes: ["ddc.", "standardddc.", "encoderblock."])
        try advance()
        var enc2: Tensor? = try encoders[1].forward(skips[0], nil, ctx); try advance()
        var enc3: Tensor? = try encoders[2].forward(skips[1], nil, ctx); try advance()
        var enc4: Tensor? = try encoders[3].forward(skips[2], nil, ctx); try advance()
        var d: Tensor = try encoders[4].forward(skips[3], nil, ctx); try advance()
        skips.removeAll()
        d = try decoders[0].forward(d, skip: try unwrap(enc4), ctx); enc4 = nil; try advance()
        d = try decoders[1].forward(d, skip: try unwrap(enc3), ctx); enc3 = nil; try advance()
        d = try decoders[2].forward(d, skip: try unwrap(enc2), ctx); enc2 = nil; try advance()
        // encoder1 (full resolution) runs only now, just before decoder2 needs it, so that its
        // activation is not held through the whole network.
        let enc1 = try encoders[0].forward(x, nil, ctx); try advance()
        d = try decoders[3].forward(d, skip: enc1, ctx); try advance()
        d = try decoder1.forward(d, nil, ctx); try advance()
        let logits = try head.forward(d, nil, ctx); try advance()
        return logits
    }
}

private func unwrap(_ t: Tensor?) throws -> Tensor {
    guard let t else { throw DeformUXError.internal("DeformUXNet.forward", "an activation was released too early") }
    return t
}

/// The encoder (`deformuxnet_3d.` or `uxnet_3d.`): stem, four stages of blocks with downsampling
/// between them, and a LayerNorm on each stage's output for the skip.
final class Encoder {
    let stemConv: ConvLayer, stemNorm: LayerNormLayer
    let downNorms: [LayerNormLayer], downConvs: [ConvLayer]   // stages 1...3
    let stages: [[EncoderBlock]]
    let outNorms: [LayerNormLayer]

    init(config: DeformUXNetConfig, layout: inout ParameterLayout) throws {
        let e = config.encoderPrefix, f = config.featureSize
        stemConv = try ConvLayer(e + "downsample_layers.0.0.", cin: config.inChannels, cout: f[0], kernel: 7,
                                 stride: 2, padding: 3, bias: true, layout: &layout)
        stemNorm = try LayerNormLayer(e + "downsample_layers.0.1.", channels: f[0], layout: &layout)
        var norms: [LayerNormLayer] = [], convs: [ConvLayer] = []
        for i in 1..<4 {
            norms.append(try LayerNormLayer(e + "downsample_layers.\(i).0.", channels: f[i - 1], layout: &layout))
            convs.append(try ConvLayer(e + "downsample_layers.\(i).1.", cin: f[i - 1], cout: f[i], kernel: 2,
                                       stride: 2, bias: true, layout: &layout))
        }
        downNorms = norms
        downConvs = convs
        var st: [[EncoderBlock]] = []
        for i in 0..<4 {
            var blocks: [EncoderBlock] = []
            for j in 0..<config.depths[i] {
                blocks.append(try EncoderBlock(e + "stages.\(i).\(j).", channels: f[i], config: config, layout: &layout))
            }
            st.append(blocks)
        }
        stages = st
        var outs: [LayerNormLayer] = []
        for i in 0..<4 { outs.append(try LayerNormLayer(e + "norm\(i).", channels: f[i], layout: &layout)) }
        outNorms = outs
    }

    /// The four skips x2, x3, x4, x5 (each stage's output, normed), channels-last.
    func forward(_ x: Tensor, _ ctx: RunContext) throws -> [Tensor] {
        var h = try stemNorm.forward(stemConv.forward(x, nil, ctx), ctx)
        var skips: [Tensor] = []
        for i in 0..<4 {
            if i > 0 {
                h = try downConvs[i - 1].forward(downNorms[i - 1].forward(h, ctx), nil, ctx)
            }
            for block in stages[i] { h = try block.forward(h, ctx) }
            skips.append(try outNorms[i].forward(h, ctx))
        }
        return skips
    }

    func initialize(_ p: ParameterStore, _ rng: inout SplitMix64) {
        stemConv.initialize(p, &rng)
        stemNorm.initialize(p)
        for i in 0..<3 {
            downNorms[i].initialize(p)
            downConvs[i].initialize(p, &rng)
        }
        for blocks in stages { for b in blocks { b.initialize(p, &rng) } }
        for n in outNorms { n.initialize(p) }
    }
}

/// N x C x D x H x W -> N x D x H x W x C (a new tensor).
public func toChannelsLast(_ x: Tensor, pool: StoragePool? = nil) throws -> Tensor {
    let (n, c, d, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4])
    let y = try Tensor(uninitialized: [n, d, h, w, c], pool: pool)
    let v = d * h * w
    for s in 0..<n {
        let src = x.pointer + s * c * v, dst = y.pointer + s * c * v
        let parts = max(1, min(Threads.count, v / 4096))
        parallelFor(parts) { part in
            for i in Threads.range(part, of: parts, total: v) {
                for ch in 0..<c { dst[i * c + ch] = src[ch * v + i] }
            }
        }
    }
    return y
}

/// N x D x H x W x C -> N x C x D x H x W (a new tensor).
public func toChannelsFirst(_ x: Tensor) throws -> Tensor {
    let (n, d, h, w, c) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4])
    let y = try Tensor(uninitialized: [n, c, d, h, w])
    transposeToChannelsFirst(x, into: y.pointer)
    return y
}

/// Writes x (N x D x H x W x C, contiguous) as N x C x D x H x W into y.
func transposeToChannelsFirst(_ x: Tensor, into y: UnsafeMutablePointer<Float>) {
    let (n, d, h, w, c) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4])
    let v = d * h * w
    for s in 0..<n {
        let src = x.pointer + s * c * v, dst = y + s * c * v
        let parts = max(1, min(Threads.count, c))
        parallelFor(parts) { part in
            for ch in Threads.range(part, of: parts, total: c) {
                let row = dst + ch * v
                for i in 0..<v { row[i] = src[i * c + ch] }
            }
        }
    }
}
