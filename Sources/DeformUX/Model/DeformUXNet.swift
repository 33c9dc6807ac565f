/// DeformUX-Net (and 3D UX-Net): a U-Net whose encoder uses depthwise deformable 3x3x3 convolutions
/// with tri-planar offsets, and a UNETR-style decoder (ARCHITECTURE.md).
///
/// The model is weights (STYLE.md habit 16): the configuration, the topology (layers holding
/// `ParameterRef`s) and one `ParameterStore` (values, gradients, optimiser moments) under the released
/// code's state-dict names, so official checkpoints load by name. It never changes during a forward and
/// owns no working memory: a `Session` runs it (activations, scratch, packed weights), and several
/// sessions may run one model at the same time from different threads.
///
/// Reading order of a forward (`forward(_:_:)`): encoder (stem, stages, skips x2..x5) -> encoder2..5 ->
/// decoder5..3 -> encoder1 (full resolution, computed late so that it is not held through the network)
/// -> decoder2 -> decoder1 -> out. The backward (`backward(_:_:_:gradInput:)`) walks the same steps in
/// reverse and frees each step's saved activations as soon as it is done.
public final class DeformUXNet {
    public let config: DeformUXNetConfig
    public let parameters: ParameterStore
    let encoder: Encoder
    let encoders: [ResBlock]      // encoder1 ... encoder5
    let decoders: [UpBlock]       // decoder5, decoder4, decoder3, decoder2
    let decoder1: ResBlock
    let head: ConvLayer           // out.conv.conv
    /// How a runner's weight snapshot holds each parameter (packed for its kernel, or copied).
    let forms: [WeightSnapshot.Form]

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
        var forms = [WeightSnapshot.Form](repeating: .copy, count: layout.entries.count)
        encoder.forms(&forms)
        for e in encoders { e.forms(&forms) }
        for d in decoders { d.forms(&forms) }
        decoder1.forms(&forms)
        head.forms(&forms)
        self.forms = forms
        // Initialisation writes the store before anyone else can see it.
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
    /// halves the grid four times; padding to a multiple of 16 is the pipeline's job) and that the
    /// activations fit in memory arithmetic.
    public func validateInput(_ shape: [Int], operation: String = "DeformUXNet.forward") throws {
        let expected = "N x \(config.inChannels) x D x H x W"
        guard shape.count == 5 else {
            throw DeformUXError.shapeMismatch(operation, "x has the wrong rank", expected: expected, got: "shape \(shape)")
        }
        guard shape[0] >= 1 else {
            throw DeformUXError.shapeMismatch(operation, "the batch must not be empty", expected: expected, got: "shape \(shape)")
        }
        guard shape[1] == config.inChannels else {
            throw DeformUXError.shapeMismatch(operation, "x must have \(config.inChannels) channels", expected: expected,
                                              got: "shape \(shape)")
        }
        for (name, s) in zip(["D", "H", "W"], shape[2...]) where s < 16 || s % 16 != 0 {
            throw DeformUXError.shapeMismatch(operation, "spatial sizes must be positive multiples of 16 (pad the volume first)",
                                              expected: "\(name) a multiple of 16", got: "\(name) = \(s) in shape \(shape)")
        }
        // The widest activation (max width x full grid, and decoder2's concatenation) must be countable.
        let widest = max(config.featureSize.max() ?? 1, config.hiddenSize, config.inChannels, config.outChannels) * 2
        _ = try Tensor.elementCount([shape[0], shape[2], shape[3], shape[4], widest, 8], context: operation)
    }

    /// Called between the steps of a long call with (steps done, total steps); return false to cancel
    /// (the call then throws `.cancelled`). To stop in the middle of a step, pass a `Cancellation`.
    public typealias Progress = (_ done: Int, _ total: Int) -> Bool

    /// Steps reported by a forward pass (a backward reports as many again).
    public static let forwardSteps = 12

    /// Logits N x Cout x D x H x W (no softmax) for x N x Cin x D x H x W, on a session made for this
    /// call. For repeated calls keep a `Session`: it keeps the packed weights and activation memory.
    public func forward(_ x: Tensor, progress: Progress? = nil, cancellation: Cancellation? = nil) throws -> Tensor {
        try Session(model: self).forward(x, progress: progress, cancellation: cancellation)
    }

    /// The gradients of sum(forward(x) * gradOutput) with respect to every parameter (by state-dict
    /// name, PyTorch layouts), and with respect to x if `inputGradient`, on a session made for this
    /// call. The store's gradients are zeroed first and hold the result afterwards
    /// (`parameters.gradientTensor(name)`).
    public func backward(_ x: Tensor, gradOutput: Tensor, inputGradient: Bool = false, progress: Progress? = nil,
                         cancellation: Cancellation? = nil) throws -> (parameters: [String: Tensor], input: Tensor?) {
        let session = try Session(model: self)
        let gx: Tensor? = inputGradient ? try Tensor(zeros: x.shape) : nil
        try parameters.withGradients("DeformUXNet.backward") {
            parameters.zeroGradients()
            try session.backward(x, gradOutput: gradOutput, gradInput: gx?.pointer, progress: progress,
                                 cancellation: cancellation, gradientsHeld: true)
        }
        var out: [String: Tensor] = [:]
        for e in parameters.layout.entries { out[e.name] = try parameters.gradientTensor(e.name).copy() }
        return (out, gx)
    }

    // MARK: The network on channels-last activations

    /// Logits (channels-last) for a channels-last input; nothing kept for backward. Activations are
    /// dropped as soon as nothing needs them: the peak is decoder2 at full resolution, where only
    /// encoder1's output, the upsampled input and the block's two convolution outputs are alive.
    func forwardChannelsLast(_ x: Tensor, _ ctx: RunContext, _ step: (String) throws -> Void) throws -> Tensor {
        var skips: [Tensor] = try encoder.forward(x, ctx)
        // The encoder's scratch (DDC padding and offsets, MLP chunks) is not needed by the decoder.
        ctx.workspace.release(prefixes: ["ddc.", "standardddc.", "encoderblock."])
        try step("encoder")
        var enc2: Tensor? = try encoders[1].forward(skips[0], nil, ctx); try step("encoder2")
        var enc3: Tensor? = try encoders[2].forward(skips[1], nil, ctx); try step("encoder3")
        var enc4: Tensor? = try encoders[3].forward(skips[2], nil, ctx); try step("encoder4")
        var d: Tensor = try encoders[4].forward(skips[3], nil, ctx); try step("encoder5")
        skips.removeAll()
        d = try decoders[0].forward(d, skip: try unwrap(enc4), ctx); enc4 = nil; try step("decoder5")
        d = try decoders[1].forward(d, skip: try unwrap(enc3), ctx); enc3 = nil; try step("decoder4")
        d = try decoders[2].forward(d, skip: try unwrap(enc2), ctx); enc2 = nil; try step("decoder3")
        // encoder1 (full resolution) runs only now, just before decoder2 needs it.
        let enc1 = try encoders[0].forward(x, nil, ctx); try step("encoder1")
        d = try decoders[3].forward(d, skip: enc1, ctx); try step("decoder2")
        d = try decoder1.forward(d, nil, ctx); try step("decoder1")
        let logits = try head.forward(d, nil, ctx); try step("out")
        return logits
    }

    /// What the backward needs of one forward: every step's saved activations, dropped one by one as
    /// the backward passes them.
    final class Tape {
        var input: Tensor?
        var encoder: Encoder.Saved?
        var enc: [ResBlock.Saved?] = []      // encoder1 ... encoder5
        var dec: [UpBlock.Saved?] = []       // decoder5 ... decoder2
        var dec1: ResBlock.Saved?
        var headInput: Tensor?
    }

    /// Logits (channels-last) and the tape for `backward`.
    func forwardSaving(_ x: Tensor, _ ctx: RunContext, _ step: (String) throws -> Void) throws -> (Tensor, Tape) {
        let tape = Tape()
        tape.input = x
        let (skips, encSaved) = try encoder.forwardSaving(x, ctx)
        tape.encoder = encSaved
        try step("encoder")
        var outs: [Tensor] = []
        tape.enc = [nil, nil, nil, nil, nil]
        for k in 1...4 {
            let (o, s) = try encoders[k].forwardSaving(skips[k - 1], nil, ctx)
            outs.append(o)
            tape.enc[k] = s
            try step("encoder\(k + 1)")
        }
        var d = outs[3]
        tape.dec = [nil, nil, nil, nil]
        for (i, skip) in [outs[2], outs[1], outs[0]].enumerated() {
            let (o, s) = try decoders[i].forwardSaving(d, skip: skip, ctx)
            d = o
            tape.dec[i] = s
            try step("decoder\(5 - i)")
        }
        let (enc1, s1) = try encoders[0].forwardSaving(x, nil, ctx)
        tape.enc[0] = s1
        try step("encoder1")
        let (d2, s2) = try decoders[3].forwardSaving(d, skip: enc1, ctx)
        tape.dec[3] = s2
        try step("decoder2")
        let (d1, sd1) = try decoder1.forwardSaving(d2, nil, ctx)
        tape.dec1 = sd1
        tape.headInput = d1
        try step("decoder1")
        let logits = try head.forward(d1, nil, ctx)
        try step("out")
        return (logits, tape)
    }

    /// Adds the gradients of sum(logits * gradLogits) into the store's gradients (and dL/dx into
    /// gradInput, channels-last, if given), walking the tape backwards and emptying it. `gradLogits`
    /// (channels-last) is overwritten.
    func backward(_ gradLogits: Tensor, _ tape: Tape, _ ctx: RunContext, gradInput: Tensor?,
                  _ step: (String) throws -> Void) throws {
        guard let d1 = tape.headInput, let dec1 = tape.dec1, let encSaved = tape.encoder,
              tape.enc.count == 5, tape.dec.count == 4 else {
            throw DeformUXError.internal("DeformUXNet.backward", "the tape is incomplete (used twice?)")
        }
        // out and decoder1.
        var g = try ctx.zeros(d1.shape)
        try head.backward(d1, gradY: gradLogits, ctx, gradX: g)
        tape.headInput = nil
        try step("out")
        var gNext = try ctx.zeros(dec1.x.shape)
        try decoder1.backward(g, dec1, ctx, gradX: gNext)
        tape.dec1 = nil
        g = gNext
        try step("decoder1")
        // decoder2, then encoder1 (its skip), whose input gradient is the image's.
        guard let dec2 = tape.dec[3], let enc1 = tape.enc[0] else {
            throw DeformUXError.internal("DeformUXNet.backward", "the tape is incomplete")
        }
        var gSkip = try ctx.zeros(dec2.skip.shape)
        gNext = try ctx.zeros(dec2.x.shape)
        try decoders[3].backward(g, dec2, ctx, gradX: gNext, gradSkip: gSkip)
        tape.dec[3] = nil
        g = gNext
        try step("decoder2")
        try encoders[0].backward(gSkip, enc1, ctx, gradX: gradInput)
        tape.enc[0] = nil
        try step("encoder1")
        // decoder3..5 with their skips encoder2..4; each encoder k's input gradient is skip k-2's.
        var gSkips: [Tensor] = []
        for i in [2, 1, 0] {
            guard let dec = tape.dec[i], let enc = tape.enc[3 - i] else {
                throw DeformUXError.internal("DeformUXNet.backward", "the tape is incomplete")
            }
            gSkip = try ctx.zeros(dec.skip.shape)
            gNext = try ctx.zeros(dec.x.shape)
            try decoders[i].backward(g, dec, ctx, gradX: gNext, gradSkip: gSkip)
            tape.dec[i] = nil
            g = gNext
            try step("decoder\(5 - i)")
            let gEncoderSkip = try ctx.zeros(enc.x.shape)
            try encoders[3 - i].backward(gSkip, enc, ctx, gradX: gEncoderSkip)
            tape.enc[3 - i] = nil
            gSkips.append(gEncoderSkip)
            try step("encoder\(4 - i)")
        }
        // encoder5 (g is now its output's gradient), then the encoder with the four skip gradients.
        guard let enc5 = tape.enc[4] else { throw DeformUXError.internal("DeformUXNet.backward", "the tape is incomplete") }
        let gX5 = try ctx.zeros(enc5.x.shape)
        try encoders[4].backward(g, enc5, ctx, gradX: gX5)
        tape.enc[4] = nil
        try step("encoder5")
        try encoder.backward([gSkips[0], gSkips[1], gSkips[2], gX5], encSaved, ctx, gradInput: gradInput)
        tape.encoder = nil
        tape.input = nil
        try step("encoder")
    }
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
        var index = 0
        for i in 0..<4 {
            var blocks: [EncoderBlock] = []
            for j in 0..<config.depths[i] {
                blocks.append(try EncoderBlock(e + "stages.\(i).\(j).", channels: f[i], config: config, index: index,
                                               layout: &layout))
                index += 1
            }
            st.append(blocks)
        }
        stages = st
        var outs: [LayerNormLayer] = []
        for i in 0..<4 { outs.append(try LayerNormLayer(e + "norm\(i).", channels: f[i], layout: &layout)) }
        outNorms = outs
    }

    func forms(_ f: inout [WeightSnapshot.Form]) {
        stemConv.forms(&f)
        for c in downConvs { c.forms(&f) }
        for blocks in stages { for b in blocks { b.forms(&f) } }
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

    struct Saved {
        let input: Tensor
        /// The stem conv's output (the stem norm's input).
        let stem: Tensor
        let blocks: [[EncoderBlock.Saved]]
        /// Each stage's output (its out norm's input and the next down norm's).
        let stageOut: [Tensor]
        /// The inputs of down convs 1...3 (the down norms' outputs).
        let downIn: [Tensor]
    }

    func forwardSaving(_ x: Tensor, _ ctx: RunContext) throws -> ([Tensor], Saved) {
        let stem = try stemConv.forward(x, nil, ctx)
        var h = try stemNorm.forward(stem, ctx)
        var skips: [Tensor] = [], blocks: [[EncoderBlock.Saved]] = [], stageOut: [Tensor] = [], downIn: [Tensor] = []
        for i in 0..<4 {
            if i > 0 {
                let z = try downNorms[i - 1].forward(h, ctx)
                downIn.append(z)
                h = try downConvs[i - 1].forward(z, nil, ctx)
            }
            var saved: [EncoderBlock.Saved] = []
            for block in stages[i] {
                let (o, s) = try block.forwardSaving(h, ctx)
                saved.append(s)
                h = o
            }
            blocks.append(saved)
            stageOut.append(h)
            skips.append(try outNorms[i].forward(h, ctx))
        }
        return (skips, Saved(input: x, stem: stem, blocks: blocks, stageOut: stageOut, downIn: downIn))
    }

    /// Adds the gradients for the skip gradients (x2 ... x5, each overwritten) into the store, and dL/dx
    /// into gradInput if given.
    func backward(_ gradSkips: [Tensor], _ saved: Saved, _ ctx: RunContext, gradInput: Tensor?) throws {
        // Gradient of the current stage's output coming from the stage above (through its down path).
        var fromAbove: Tensor?
        for i in stride(from: 3, through: 0, by: -1) {
            let h = saved.stageOut[i]
            let gOut = try fromAbove ?? ctx.zeros(h.shape)
            fromAbove = nil
            try outNorms[i].backward(h, gradY: gradSkips[i], ctx, gradX: gOut)
            var g = gOut
            for (j, block) in stages[i].enumerated().reversed() {
                let gx = try ctx.zeros(saved.blocks[i][j].x.shape)
                try block.backward(g, saved.blocks[i][j], ctx, gradX: gx)
                g = gx
            }
            // g is now the gradient of the stage's input.
            if i > 0 {
                let z = saved.downIn[i - 1]
                let gz = try ctx.zeros(z.shape)
                try downConvs[i - 1].backward(z, gradY: g, ctx, gradX: gz)
                let below = try ctx.zeros(saved.stageOut[i - 1].shape)
                try downNorms[i - 1].backward(saved.stageOut[i - 1], gradY: gz, ctx, gradX: below)
                fromAbove = below
            } else {
                let gs = try ctx.zeros(saved.stem.shape)
                try stemNorm.backward(saved.stem, gradY: g, ctx, gradX: gs)
                try stemConv.backward(saved.input, gradY: gs, ctx, gradX: gradInput)
            }
        }
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

/// N x C x D x H x W -> N x D x H x W x C (a new tensor). Checks the rank first.
public func toChannelsLast(_ x: Tensor, pool: StoragePool? = nil) throws -> Tensor {
    guard x.rank == 5 else {
        throw DeformUXError.shapeMismatch("to_channels_last", "expected a channels-first tensor",
                                          expected: "N x C x D x H x W (rank 5)", got: "shape \(x.shape)")
    }
    try x.requireContiguous("to_channels_last")
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

/// N x D x H x W x C -> N x C x D x H x W (a new tensor). Checks the rank first.
public func toChannelsFirst(_ x: Tensor) throws -> Tensor {
    guard x.rank == 5 else {
        throw DeformUXError.shapeMismatch("to_channels_first", "expected a channels-last tensor",
                                          expected: "N x D x H x W x C (rank 5)", got: "shape \(x.shape)")
    }
    try x.requireContiguous("to_channels_first")
    let (n, d, h, w, c) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4])
    let y = try Tensor(uninitialized: [n, c, d, h, w])
    transposeToChannelsFirst(x, into: y.pointer)
    return y
}

/// Writes x (N x D x H x W x C, contiguous, rank checked by the caller) as N x C x D x H x W into y.
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
