/// One encoder block, ConvNeXt ordering with one residual (ARCHITECTURE.md section 2, following the
/// released code rather than the paper's Eq. 3):
///
///     y = DDC(x)                 DeformUX: deformable 3x3x3, offsets from a conv of x (`DeformableDepthwiseConv3d`)
///                                (3D UX-Net: depthwise Conv3d k x k x k, pad k/2, named `dwconv`)
///     z = LN(y)                  channel LayerNorm, eps 1e-6
///     m = pw2(GELU(pw1(z)))      C -> 4C -> C, dense (`Pointwise`) or grouped (`GroupedPointwise3d`); m = z with mlp = none
///     out = x + gamma * m        layer scale, initialised to 1e-6; drop path 0
///
/// Parameters under `prefix` (e.g. "deformuxnet_3d.stages.0.1."): `ddc.weight`, `ddc.bias`,
/// `ddc.conv_offset.weight`, `ddc.conv_offset.bias` (or `dwconv.weight`, `dwconv.bias`), `norm.weight`,
/// `norm.bias`, `pwconv1.weight`, `pwconv1.bias`, `pwconv2.weight`, `pwconv2.bias`, `gamma`.
///
/// Inference runs the MLP in chunks of voxels whose 4C hidden values stay in cache (the same kernels on
/// chunk-sized shapes) and writes LN and the residual in place; the saving forward keeps y (the LN
/// input) and x, and the backward recomputes z, the offsets and the MLP's hidden values from them.
final class EncoderBlock {
    enum Spatial {
        case deformable(DeformableDepthwiseConv3d)
        /// 3D UX-Net's depthwise conv.
        case depthwise(weight: ParameterRef, bias: ParameterRef, kernel: Int)
    }

    let channels: Int
    let config: DeformUXNetConfig
    let spatial: Spatial
    let norm: LayerNormLayer
    let pw1Weight: ParameterRef?, pw1Bias: ParameterRef?, pw2Weight: ParameterRef?, pw2Bias: ParameterRef?
    let gamma: ParameterRef
    /// This block's place among all encoder blocks (0, 1, ...): its drop-path rate and mask slot.
    let index: Int

    /// Voxels per MLP chunk: the 4C hidden activations of one chunk stay in cache-sized scratch.
    static let mlpChunk = 512

    init(_ prefix: String, channels c: Int, config: DeformUXNetConfig, index: Int, layout: inout ParameterLayout) throws {
        channels = c
        self.config = config
        self.index = index
        switch config.block {
        case .deformux:
            spatial = .deformable(try DeformableDepthwiseConv3d(
                channels: c, offsetMode: config.offsetMode, offsetKernel: config.offsetKernel,
                heldAxis: EncoderBlock.heldAxis(config.offsetPlanes), standard: config.deformable == .standard,
                prefix: prefix + "ddc.", layout: &layout))
        case .uxnet:
            let k = config.kernelSize
            spatial = .depthwise(weight: try layout.add(prefix + "dwconv.weight", shape: [c, 1, k, k, k]),
                                 bias: try layout.add(prefix + "dwconv.bias", shape: [c]), kernel: k)
        }
        norm = try LayerNormLayer(prefix + "norm.", channels: c, layout: &layout)
        switch config.mlp {
        case .dense:
            pw1Weight = try layout.add(prefix + "pwconv1.weight", shape: [4 * c, c, 1, 1, 1])
            pw1Bias = try layout.add(prefix + "pwconv1.bias", shape: [4 * c])
            pw2Weight = try layout.add(prefix + "pwconv2.weight", shape: [c, 4 * c, 1, 1, 1])
            pw2Bias = try layout.add(prefix + "pwconv2.bias", shape: [c])
        case .grouped:
            pw1Weight = try layout.add(prefix + "pwconv1.weight", shape: [4 * c, 1, 1, 1, 1])
            pw1Bias = try layout.add(prefix + "pwconv1.bias", shape: [4 * c])
            pw2Weight = try layout.add(prefix + "pwconv2.weight", shape: [c, 4, 1, 1, 1])
            pw2Bias = try layout.add(prefix + "pwconv2.bias", shape: [c])
        case .none:
            pw1Weight = nil; pw1Bias = nil; pw2Weight = nil; pw2Bias = nil
        }
        gamma = try layout.add(prefix + "gamma", shape: [c])
    }

    /// The offset axis held at zero by a single-plane ablation (D, H, W are x, y, z).
    static func heldAxis(_ planes: DeformUXNetConfig.OffsetPlanes) -> Int? {
        switch planes {
        case .all: return nil
        case .xy: return 2
        case .xz: return 1
        case .yz: return 0
        }
    }

    func forms(_ f: inout [WeightSnapshot.Form]) {
        switch spatial {
        case .deformable(let ddc): ddc.forms(&f)
        case .depthwise(let w, _, let k): f[w.index] = .depthwise(channels: channels, kernel: k)
        }
    }

    struct Saved {
        let x: Tensor
        /// The spatial conv's output (the LayerNorm's input).
        let y: Tensor
        /// Drop path: per sample, 0 (branch dropped) or 1 / (1 - rate); nil when no drop path.
        let keep: [Float]?
    }

    /// y = spatial conv(x), into a new tensor.
    private func spatialForward(_ x: Tensor, _ ctx: RunContext) throws -> Tensor {
        switch spatial {
        case .deformable(let ddc):
            return try ddc.forward(x, ctx)
        case .depthwise(let w, let b, let k):
            let v = try Volume5(x, "encoder block")
            let s = try DepthwiseConv3d.Shape(n: v.n, c: v.c, d: v.d, h: v.h, w: v.w, kernel: k)
            let y = try ctx.output(x.shape)
            try DepthwiseConv3d.forward(x: x.pointer, packedWeight: ctx.weight(w), bias: ctx.weight(b),
                                        y: y.pointer, shape: s, workspace: ctx.workspace)
            return y
        }
    }

    func forward(_ x: Tensor, _ ctx: RunContext) throws -> Tensor {
        let y = try spatialForward(x, ctx)
        _ = try norm.forward(y, ctx, into: y)
        try mlpResidual(x: x.pointer, z: y.pointer, out: y.pointer, voxels: x.count / channels, keep: nil, ctx)
        return y
    }

    /// `forward` for training: keeps what backward needs, and applies drop path when the context
    /// carries masks for this block (`RunContext.dropPath`).
    func forwardSaving(_ x: Tensor, _ ctx: RunContext) throws -> (out: Tensor, saved: Saved) {
        let y = try spatialForward(x, ctx)
        let out = try norm.forward(y, ctx)
        let keep = ctx.dropPath?.keep(block: index)
        try mlpResidual(x: x.pointer, z: out.pointer, out: out.pointer, voxels: x.count / channels, keep: keep, ctx)
        return (out, Saved(x: x, y: y, keep: keep))
    }

    /// out = x + keep[n] * gamma * MLP(z), chunk by chunk with the MLP's kernels on chunk-sized shapes
    /// (out may be z; keep: the drop-path factor of each sample, 1 when nil).
    func mlpResidual(x: UnsafePointer<Float>, z: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, voxels: Int,
                     keep: [Float]?, _ ctx: RunContext) throws {
        let c = channels, hidden = 4 * c, chunk = EncoderBlock.mlpChunk
        let g = ctx.weight(gamma)
        let chunks = (voxels + chunk - 1) / chunk
        let parts = max(1, min(Threads.count, chunks))
        let perPart = chunk * (hidden + c)
        let scratch = try ctx.workspace.buffer("encoderblock.mlp", count: parts * perPart)
        let mlp = config.mlp
        let perSample = voxels / max(1, keep?.count ?? 1)
        let w1 = pw1Weight.map { ctx.weight($0) }, b1 = pw1Bias.map { ctx.weight($0) }
        let w2 = pw2Weight.map { ctx.weight($0) }, b2 = pw2Bias.map { ctx.weight($0) }
        let ws = ctx.workspace
        parallelFor(parts) { part in
            let h = scratch + part * perPart
            let m = h + chunk * hidden
            for ch in Threads.range(part, of: parts, total: chunks) {
                if ws.stopRequested() { return }
                let v0 = ch * chunk
                let rows = min(chunk, voxels - v0)
                let zc = z + v0 * c, xc = x + v0 * c, oc = out + v0 * c
                switch mlp {
                case .dense:
                    guard let w1, let b1, let w2, let b2 else { return }
                    Pointwise.forward(x: zc, weight: w1, bias: b1, y: h,
                                      shape: .init(n: 1, cin: c, cout: hidden, voxels: rows, xLayout: .channelsLast, yLayout: .channelsLast))
                    Activation.gelu(x: h, y: h, count: rows * hidden)
                    Pointwise.forward(x: h, weight: w2, bias: b2, y: m,
                                      shape: .init(n: 1, cin: hidden, cout: c, voxels: rows, xLayout: .channelsLast, yLayout: .channelsLast))
                case .grouped:
                    guard let w1, let b1, let w2, let b2 else { return }
                    GroupedPointwise3d.expand(x: zc, weight: w1, bias: b1, y: h, voxels: rows, channels: c, ratio: 4)
                    Activation.gelu(x: h, y: h, count: rows * hidden)
                    GroupedPointwise3d.reduce(x: h, weight: w2, bias: b2, y: m, voxels: rows, channels: c, ratio: 4)
                case .none:
                    m.update(from: zc, count: rows * c)
                }
                for r in 0..<rows {
                    let xr = xc + r * c, mr = m + r * c, or = oc + r * c
                    if let keep {
                        let k = keep[(v0 + r) / perSample]
                        for i in 0..<c { or[i] = xr[i] + k * g[i] * mr[i] }
                    } else {
                        for i in 0..<c { or[i] = xr[i] + g[i] * mr[i] }
                    }
                }
            }
        }
        try ws.throwIfCancelled("encoder block")
    }

    /// Adds dL/dx into gradX and the parameter gradients into the store. `gradOut` is overwritten.
    func backward(_ gradOut: Tensor, _ saved: Saved, _ ctx: RunContext, gradX: Tensor) throws {
        let x = saved.x, y = saved.y
        let v = try Volume5(x, "encoder block backward")
        let c = channels, voxels = v.n * v.voxels, count = x.count
        guard gradOut.shape == x.shape, gradX.shape == x.shape else {
            throw DeformUXError.shapeMismatch("encoder block backward", "gradients must have the shape of x",
                                              expected: "\(x.shape)", got: "\(gradOut.shape), \(gradX.shape)")
        }
        let ws = ctx.workspace
        // The residual.
        Activation.add(gradOut.pointer, into: gradX.pointer, count: count)
        // Recompute z = LN(y) and push gradOut back through gamma and the MLP: dL/dz.
        let z = try norm.forward(y, ctx)
        let gz = try ctx.zeros(x.shape)
        let cl = Layout.channelsLast
        switch config.mlp {
        case .dense, .grouped:
            guard let w1Ref = pw1Weight, let b1Ref = pw1Bias, let w2Ref = pw2Weight, let b2Ref = pw2Bias else {
                throw DeformUXError.internal("encoder block", "the MLP has no parameters")
            }
            let w1 = ctx.weight(w1Ref), b1 = ctx.weight(b1Ref), w2 = ctx.weight(w2Ref), b2 = ctx.weight(b2Ref)
            let dense = config.mlp == .dense
            let hidden = 4 * c
            let h = try ctx.output([voxels, hidden])
            if dense {
                Pointwise.forward(x: z.pointer, weight: w1, bias: b1, y: h.pointer,
                                  shape: .init(n: 1, cin: c, cout: hidden, voxels: voxels, xLayout: cl, yLayout: cl))
            } else {
                GroupedPointwise3d.expand(x: z.pointer, weight: w1, bias: b1, y: h.pointer, voxels: voxels, channels: c, ratio: 4)
            }
            let g = try ctx.output([voxels, hidden])
            Activation.gelu(x: h.pointer, y: g.pointer, count: voxels * hidden)
            let m = try ctx.output(x.shape)
            if dense {
                Pointwise.forward(x: g.pointer, weight: w2, bias: b2, y: m.pointer,
                                  shape: .init(n: 1, cin: hidden, cout: c, voxels: voxels, xLayout: cl, yLayout: cl))
            } else {
                GroupedPointwise3d.reduce(x: g.pointer, weight: w2, bias: b2, y: m.pointer, voxels: voxels, channels: c, ratio: 4)
            }
            // gamma's gradient, then m becomes dL/dm = gradOut * gamma.
            try EncoderBlock.gammaBackward(gradOut: gradOut.pointer, m: m.pointer, gamma: ctx.weight(gamma),
                                           gradGamma: ctx.gradient(gamma), gradM: m.pointer, voxels: voxels,
                                           channels: c, keep: saved.keep, workspace: ws)
            // pw2: parameter gradients from g, then dL/dg into g's memory (g is no longer needed).
            if dense {
                let s2 = Pointwise.Shape(n: 1, cin: hidden, cout: c, voxels: voxels, xLayout: cl, yLayout: cl)
                try Pointwise.backward(x: g.pointer, weight: w2, gradY: m.pointer, gradX: nil, gradWeight: ctx.gradient(w2Ref),
                                       gradBias: ctx.gradient(b2Ref), shape: s2, workspace: ws)
                g.pointer.initialize(repeating: 0, count: g.count)
                try Pointwise.backward(x: g.pointer, weight: w2, gradY: m.pointer, gradX: g.pointer, gradWeight: nil,
                                       gradBias: nil, shape: s2, workspace: ws)
            } else {
                try GroupedPointwise3d.reduceBackward(x: g.pointer, weight: w2, gradY: m.pointer, gradX: nil,
                                                      gradWeight: ctx.gradient(w2Ref), gradBias: ctx.gradient(b2Ref),
                                                      voxels: voxels, channels: c, ratio: 4, workspace: ws)
                g.pointer.initialize(repeating: 0, count: g.count)
                try GroupedPointwise3d.reduceBackward(x: g.pointer, weight: w2, gradY: m.pointer, gradX: g.pointer,
                                                      gradWeight: nil, gradBias: nil, voxels: voxels, channels: c,
                                                      ratio: 4, workspace: ws)
            }
            // GELU: dL/dh in place over dL/dg.
            Activation.geluBackward(x: h.pointer, gradY: g.pointer, gradX: g.pointer, count: voxels * hidden,
                                    accumulate: false)
            if dense {
                try Pointwise.backward(x: z.pointer, weight: w1, gradY: g.pointer, gradX: gz.pointer,
                                       gradWeight: ctx.gradient(w1Ref), gradBias: ctx.gradient(b1Ref),
                                       shape: .init(n: 1, cin: c, cout: hidden, voxels: voxels, xLayout: cl, yLayout: cl),
                                       workspace: ws)
            } else {
                try GroupedPointwise3d.expandBackward(x: z.pointer, weight: w1, gradY: g.pointer, gradX: gz.pointer,
                                                      gradWeight: ctx.gradient(w1Ref), gradBias: ctx.gradient(b1Ref),
                                                      voxels: voxels, channels: c, ratio: 4, workspace: ws)
            }
        case .none:
            try EncoderBlock.gammaBackward(gradOut: gradOut.pointer, m: z.pointer, gamma: ctx.weight(gamma),
                                           gradGamma: ctx.gradient(gamma), gradM: gz.pointer, voxels: voxels,
                                           channels: c, keep: saved.keep, workspace: ws)
        }
        // LayerNorm, then the spatial conv.
        let gy = try ctx.zeros(x.shape)
        try norm.backward(y, gradY: gz, ctx, gradX: gy)
        switch spatial {
        case .deformable(let ddc):
            try ddc.backward(x, gradY: gy, ctx, gradX: gradX)
        case .depthwise(let w, let b, let k):
            let s = try DepthwiseConv3d.Shape(n: v.n, c: v.c, d: v.d, h: v.h, w: v.w, kernel: k)
            try DepthwiseConv3d.backward(x: x.pointer, packedWeight: ctx.weight(w), gradY: gy.pointer, gradX: gradX.pointer,
                                         gradWeight: ctx.gradient(w), gradBias: ctx.gradient(b), shape: s, workspace: ws)
        }
    }

    /// gradGamma += sum over voxels of keep gradOut * m (per channel; per-part Double sums added in part
    /// order), and gradM = keep gradOut * gamma (gradM may alias m); keep is each sample's drop-path
    /// factor (1 when nil).
    static func gammaBackward(gradOut: UnsafePointer<Float>, m: UnsafePointer<Float>, gamma: UnsafePointer<Float>,
                              gradGamma: UnsafeMutablePointer<Float>?, gradM: UnsafeMutablePointer<Float>,
                              voxels: Int, channels c: Int, keep: [Float]?, workspace: Workspace) throws {
        let parts = max(1, min(Threads.count, voxels / 1024))
        let raw = try workspace.buffer("encoderblock.gammaParts", count: 2 * parts * c)
        let partials = UnsafeMutableRawPointer(raw).bindMemory(to: Double.self, capacity: parts * c)
        partials.initialize(repeating: 0, count: parts * c)
        let perSample = voxels / max(1, keep?.count ?? 1)
        parallelFor(parts) { part in
            let acc = partials + part * c
            for v in Threads.range(part, of: parts, total: voxels) {
                let g = gradOut + v * c, mv = m + v * c, d = gradM + v * c
                let k = keep?[v / perSample] ?? 1
                for i in 0..<c {
                    let gk = g[i] * k
                    acc[i] += Double(gk * mv[i])
                    d[i] = gk * gamma[i]
                }
            }
        }
        guard let gradGamma else { return }
        for i in 0..<c {
            var s: Double = 0
            for p in 0..<parts { s += partials[p * c + i] }
            gradGamma[i] += Float(s)
        }
    }

    func initialize(_ p: ParameterStore, _ rng: inout SplitMix64) {
        let c = channels
        switch spatial {
        case .deformable(let ddc):
            ddc.initialize(p, rng: &rng)
        case .depthwise(let w, let b, let k):
            let k3 = k * k * k
            initUniform(p, w, count: c * k3, fanIn: k3, &rng)
            initUniform(p, b, count: c, fanIn: k3, &rng)
        }
        norm.initialize(p)
        if let pw1Weight, let pw1Bias, let pw2Weight, let pw2Bias {
            let grouped = config.mlp == .grouped
            initUniform(p, pw1Weight, count: grouped ? 4 * c : 4 * c * c, fanIn: grouped ? 1 : c, &rng)
            initUniform(p, pw1Bias, count: 4 * c, fanIn: grouped ? 1 : c, &rng)
            initUniform(p, pw2Weight, count: grouped ? 4 * c : 4 * c * c, fanIn: grouped ? 4 : 4 * c, &rng)
            initUniform(p, pw2Bias, count: c, fanIn: grouped ? 4 : 4 * c, &rng)
        }
        initConstant(p, gamma, count: c, 1e-6)
    }
}
