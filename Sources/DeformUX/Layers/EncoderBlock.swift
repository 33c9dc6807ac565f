import COpenBLAS

/// One encoder block, ConvNeXt ordering with one residual (ARCHITECTURE.md section 2, following the
/// released code rather than the paper's Eq. 3):
///
///     y = DDC(x)                 DeformUX: depthwise deformable 3x3x3, offsets from a 1x1x1 conv of x
///                                (3D UX-Net: depthwise Conv3d k x k x k, pad k/2, named `dwconv`)
///     y = LN(y)                  channel LayerNorm, eps 1e-6
///     y = pw2(GELU(pw1(y)))      C -> 4C -> C, dense or grouped (groups = C); absent with mlp = none
///     out = x + gamma * y        layer scale, initialised to 1e-6; drop path 0
///
/// Parameters under `prefix` (e.g. "deformuxnet_3d.stages.0.1."): `ddc.weight`, `ddc.bias`,
/// `ddc.conv_offset.weight`, `ddc.conv_offset.bias` (or `dwconv.weight`, `dwconv.bias`), `norm.weight`,
/// `norm.bias`, `pwconv1.weight`, `pwconv1.bias`, `pwconv2.weight`, `pwconv2.bias`, `gamma`.
final class EncoderBlock {
    let channels: Int
    let config: DeformUXNetConfig
    let convWeight: ParameterRef, convBias: ParameterRef
    let offsetWeight: ParameterRef?, offsetBias: ParameterRef?
    let norm: LayerNormLayer
    let pw1Weight: ParameterRef?, pw1Bias: ParameterRef?, pw2Weight: ParameterRef?, pw2Bias: ParameterRef?
    let gamma: ParameterRef

    /// Voxels per MLP chunk: the 4C hidden activations of one chunk stay in cache-sized scratch.
    static let mlpChunk = 512

    init(_ prefix: String, channels c: Int, config: DeformUXNetConfig, layout: inout ParameterLayout) throws {
        channels = c
        self.config = config
        switch config.block {
        case .deformux:
            let k = config.offsetKernel
            let inPerGroup = config.deformable == .standard ? c : 1
            convWeight = try layout.add(prefix + "ddc.weight", shape: [c, inPerGroup, 3, 3, 3])
            convBias = try layout.add(prefix + "ddc.bias", shape: [c])
            offsetWeight = try layout.add(prefix + "ddc.conv_offset.weight", shape: [DDCShape.offsetChannels, c, k, k, k])
            offsetBias = try layout.add(prefix + "ddc.conv_offset.bias", shape: [DDCShape.offsetChannels])
        case .uxnet:
            let k = config.kernelSize
            convWeight = try layout.add(prefix + "dwconv.weight", shape: [c, 1, k, k, k])
            convBias = try layout.add(prefix + "dwconv.bias", shape: [c])
            offsetWeight = nil
            offsetBias = nil
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
    var heldAxis: Int? {
        switch config.offsetPlanes {
        case .all: return nil
        case .xy: return 2
        case .xz: return 1
        case .yz: return 0
        }
    }

    func forward(_ x: Tensor, _ ctx: RunContext) throws -> Tensor {
        let v = Volume5(x)
        let p = ctx.parameters
        let y = try ctx.output(x.shape)
        switch config.block {
        case .deformux:
            guard let offsetWeight, let offsetBias else {
                throw DeformUXError.internal("encoder block", "the DeformUX block has no offset branch")
            }
            let s = try DDCShape(n: v.n, c: v.c, d: v.d, h: v.h, w: v.w)
            let offsets = try DDCLayerOps.computeOffsets(x: x.pointer, offsetWeight: p.value(offsetWeight),
                                                         offsetBias: p.value(offsetBias), mode: config.offsetMode,
                                                         shape: s, layout: .channelsLast,
                                                         offsetKernel: config.offsetKernel, workspace: ctx.workspace)
            if let heldAxis { DDCLayerOps.holdAxis(heldAxis, of: offsets, shape: s) }
            switch config.deformable {
            case .depthwise:
                try DeformConv3d.forward(x: x.pointer, offsets: offsets, weight: p.value(convWeight),
                                         bias: p.value(convBias), y: y.pointer, shape: s, layout: .channelsLast,
                                         workspace: ctx.workspace)
            case .standard:
                try StandardDeformConv3d.forward(x: x.pointer, offsets: offsets, weight: p.value(convWeight),
                                                 bias: p.value(convBias), y: y.pointer, shape: s, cout: v.c,
                                                 workspace: ctx.workspace)
            }
        case .uxnet:
            let s = try DepthwiseConv3d.Shape(n: v.n, c: v.c, d: v.d, h: v.h, w: v.w, kernel: config.kernelSize)
            let packed = try ctx.workspace.buffer("conv.packed", count: DepthwiseConv3d.packedCount(s))
            DepthwiseConv3d.pack(weight: p.value(convWeight), into: packed, shape: s)
            try DepthwiseConv3d.forward(x: x.pointer, packedWeight: packed, bias: p.value(convBias),
                                        y: y.pointer, shape: s, workspace: ctx.workspace)
        }
        ChannelLayerNorm.forward(x: y.pointer, weight: p.value(norm.weight), bias: p.value(norm.bias),
                                 y: y.pointer, voxels: v.n * v.voxels, channels: v.c)
        try mlpResidual(x: x.pointer, y: y.pointer, voxels: v.n * v.voxels, ctx)
        return y
    }

    /// y = x + gamma * MLP(y), chunk by chunk (y is overwritten in place).
    func mlpResidual(x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>, voxels: Int, _ ctx: RunContext) throws {
        let c = channels, hidden = 4 * c, chunk = EncoderBlock.mlpChunk
        let p = ctx.parameters
        let g = p.value(gamma)
        let chunks = (voxels + chunk - 1) / chunk
        let parts = max(1, min(Threads.count, chunks))
        let perPart = chunk * (hidden + c)
        let scratch = try ctx.workspace.buffer("encoderblock.mlp", count: parts * perPart)
        let mlp = config.mlp
        let w1 = pw1Weight.map { p.value($0) }, b1 = pw1Bias.map { p.value($0) }
        let w2 = pw2Weight.map { p.value($0) }, b2 = pw2Bias.map { p.value($0) }
        parallelFor(parts) { part in
            let h = scratch + part * perPart
            let out = h + chunk * hidden
            for ch in Threads.range(part, of: parts, total: chunks) {
                let v0 = ch * chunk
                let rows = min(chunk, voxels - v0)
                let yc = y + v0 * c, xc = x + v0 * c
                switch mlp {
                case .dense:
                    guard let w1, let b1, let w2, let b2 else { return }
                    // h (rows x 4C) = y . W1^T + b1;  out (rows x C) = GELU(h) . W2^T + b2
                    for r in 0..<rows { (h + r * hidden).update(from: b1, count: hidden) }
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(hidden), Int32(c),
                                1, yc, Int32(c), w1, Int32(c), 1, h, Int32(hidden))
                    Activation.gelu(x: h, y: h, count: rows * hidden)
                    for r in 0..<rows { (out + r * c).update(from: b2, count: c) }
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(c), Int32(hidden),
                                1, h, Int32(hidden), w2, Int32(hidden), 1, out, Int32(c))
                case .grouped:
                    guard let w1, let b1, let w2, let b2 else { return }
                    // groups = C: hidden 4c+k = w1[4c+k] * y[c] + b1[4c+k]; out c = sum_k w2[c,k] * GELU(hidden 4c+k) + b2[c]
                    for r in 0..<rows {
                        let yr = yc + r * c, hr = h + r * hidden
                        for i in 0..<hidden { hr[i] = w1[i] * yr[i / 4] + b1[i] }
                    }
                    Activation.gelu(x: h, y: h, count: rows * hidden)
                    for r in 0..<rows {
                        let hr = h + r * hidden, or = out + r * c
                        for i in 0..<c {
                            var s = b2[i]
                            for k in 0..<4 { s += w2[i * 4 + k] * hr[i * 4 + k] }
                            or[i] = s
                        }
                    }
                case .none:
                    out.update(from: yc, count: rows * c)
                }
                for r in 0..<rows {
                    let yr = yc + r * c, xr = xc + r * c, or = out + r * c
                    for i in 0..<c { yr[i] = xr[i] + g[i] * or[i] }
                }
            }
        }
    }

    func initialize(_ p: ParameterStore, _ rng: inout SplitMix64) {
        let c = channels
        switch config.block {
        case .deformux:
            let fanIn = (config.deformable == .standard ? c : 1) * 27
            initUniform(p, convWeight, count: c * fanIn, fanIn: fanIn, &rng)
            initUniform(p, convBias, count: c, fanIn: fanIn, &rng)
            // The offset branch starts at zero: a fresh block is a plain depthwise 3x3x3 conv.
            if let offsetWeight, let offsetBias {
                let k = config.offsetKernel
                initConstant(p, offsetWeight, count: DDCShape.offsetChannels * c * k * k * k, 0)
                initConstant(p, offsetBias, count: DDCShape.offsetChannels, 0)
            }
        case .uxnet:
            let k3 = config.kernelSize * config.kernelSize * config.kernelSize
            initUniform(p, convWeight, count: c * k3, fanIn: k3, &rng)
            initUniform(p, convBias, count: c, fanIn: k3, &rng)
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
