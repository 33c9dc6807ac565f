/// MONAI's UnetResBlock as the released code uses it (ARCHITECTURE.md section 1):
/// conv1 3x3x3 -> IN -> LeakyReLU -> conv2 3x3x3 -> IN; residual = input, or conv3 1x1x1 -> IN when
/// the width changes; add; LeakyReLU(0.01). Convolutions without bias.
///
/// The InstanceNorms cost no passes of their own: each conv gathers its output's statistics as it
/// writes it, conv1's norm and LeakyReLU are applied by conv2 as it reads its input
/// (`Conv3d.InputTransform`), and the last norms, the residual add and the LeakyReLU are one pass
/// (`InstanceNorm.applyAffine`). This fused path is the only forward; a test keeps it equal to the
/// plain composition of the kernels (conv, InstanceNorm, LeakyReLU, add).
///
/// What the backward needs, and what it recomputes instead of keeping (`Saved`):
/// - conv1's raw output `a` and every norm's scale and shift (N x C each);
/// - the block's output `out` (the next layer's input, kept anyway): the LeakyReLU's derivative is
///   read off its sign, and conv2's normalised output is recovered as LeakyReLU^-1(out) - residual;
/// - the residual branch conv3 (1x1x1) is recomputed from the input, which costs a few percent of
///   the block's multiply-adds and saves a full activation.
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

    func forms(_ f: inout [WeightSnapshot.Form]) {
        conv1.forms(&f)
        conv2.forms(&f)
        conv3?.forms(&f)
    }

    /// What `backward` needs of one forward.
    struct Saved {
        let x: Tensor, x2: Tensor?
        /// conv1's output before its norm.
        let a: Tensor
        let out: Tensor
        /// 6 x N x C: scale and shift of the norms after conv1, conv2 and conv3 (scale = 1/sqrt(var +
        /// eps), shift = -mean scale).
        let affine: Tensor
    }

    /// The block on [x, x2] (x2: optional second source of input channels, the UpBlock's skip).
    /// conv1's output is released before the residual branch runs, so at most four activations of the
    /// block's size are alive at once (input, skip, conv1's and conv2's outputs).
    func forward(_ x: Tensor, _ x2: Tensor? = nil, _ ctx: RunContext) throws -> Tensor {
        try run(x, x2, ctx, save: false).out
    }

    /// `forward`, also returning what `backward` needs.
    func forwardSaving(_ x: Tensor, _ x2: Tensor? = nil, _ ctx: RunContext) throws -> (out: Tensor, saved: Saved) {
        let r = try run(x, x2, ctx, save: true)
        guard let saved = r.saved else { throw DeformUXError.internal("res block", "nothing saved") }
        return (r.out, saved)
    }

    private func run(_ x: Tensor, _ x2: Tensor?, _ ctx: RunContext, save: Bool) throws -> (out: Tensor, saved: Saved?) {
        let n = try Volume5(x, "res block").n, c = conv1.cout
        // Per sample and channel, the sums of conv1, conv2 and conv3's outputs (N x 2C doubles each).
        let raw = try ctx.workspace.buffer("resblock.sums", count: 3 * n * 2 * c * 2)
        let sums = UnsafeMutableRawPointer(raw).bindMemory(to: Double.self, capacity: 3 * n * 2 * c)
        let s1 = sums, s2 = sums + n * 2 * c, s3 = sums + 2 * n * 2 * c
        let affine = try ctx.output([6, n, c])
        let nc = n * c
        let (scale1, shift1) = (affine.pointer, affine.pointer + nc)
        let (scale2, shift2) = (affine.pointer + 2 * nc, affine.pointer + 3 * nc)
        let (scale3, shift3) = (affine.pointer + 4 * nc, affine.pointer + 5 * nc)
        var a: Tensor? = try conv1.forward(x, x2, ctx, statistics: s1)
        let voxels = (a?.count ?? 0) / max(nc, 1)
        InstanceNorm.affine(fromSums: s1, n: n, channels: c, voxels: voxels, scale: scale1, shift: shift1)
        let transform = Conv3d.InputTransform(scale: scale1, shift: shift1, leakySlope: ResBlock.slope)
        let b = try conv2.forward(unwrap(a), nil, ctx, statistics: s2, transform: transform)
        InstanceNorm.affine(fromSums: s2, n: n, channels: c, voxels: voxels, scale: scale2, shift: shift2)
        let kept = save ? a : nil
        a = nil  // inference: released before the residual branch allocates
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
        guard let kept else { return (b, nil) }
        return (b, Saved(x: x, x2: x2, a: kept, out: b, affine: affine))
    }

    /// Adds dL/dx and dL/dx2 into gradX and gradX2 (nil: not wanted; with two sources both or neither)
    /// and the weight gradients into the store. `gradOut` is used as scratch (overwritten).
    func backward(_ gradOut: Tensor, _ saved: Saved, _ ctx: RunContext, gradX: Tensor?, gradX2: Tensor? = nil) throws {
        let out = saved.out, a = saved.a
        let v = try Volume5(out, "res block backward")
        let n = v.n, c = v.c, voxels = v.voxels, nc = n * c, count = out.count
        guard gradOut.shape == out.shape else {
            throw DeformUXError.shapeMismatch("res block backward", "grad_output does not match the output",
                                              expected: "\(out.shape)", got: "\(gradOut.shape)")
        }
        let aff = saved.affine.pointer
        let (scale1, shift1) = (aff, aff + nc)
        let scale2 = aff + 2 * nc
        let (scale3, shift3) = (aff + 4 * nc, aff + 5 * nc)
        let ws = ctx.workspace

        // P = dL/d(pre-activation) of the final LeakyReLU; it flows to both norms unchanged.
        let p = gradOut
        Activation.leakyReLUBackward(output: out.pointer, gradY: p.pointer, gradX: p.pointer, count: count,
                                     slope: ResBlock.slope, accumulate: false)
        // Residual branch. conv2's normalised output is pre - residual, pre = LeakyReLU^-1(out). Scoped so
        // that each temporary is freed as soon as it is used.
        let gb: Tensor
        do {
            let bhat: Tensor
            if let conv3 {
                let r = try conv3.forward(saved.x, saved.x2, ctx)
                do {
                    let q = try ctx.output(out.shape)
                    try InstanceNorm.backward(x: r.pointer, scale: scale3, shift: shift3, rstd: scale3, leakySlope: nil,
                                              gradY: p.pointer, gradX: q.pointer, accumulate: false,
                                              n: n, voxels: voxels, channels: c, workspace: ws)
                    try conv3.backward(saved.x, saved.x2, gradY: q, ctx, gradX: gradX, gradX2: gradX2)
                }
                // r becomes pre - IN(r).
                ResBlock.preMinus(out: out.pointer, residual: r.pointer, scale: scale3, shift: shift3, into: r.pointer,
                                  n: n, voxels: voxels, channels: c)
                bhat = r
            } else {
                if let gradX { Activation.add(p.pointer, into: gradX.pointer, count: count) }
                let r = try ctx.output(out.shape)
                ResBlock.preMinus(out: out.pointer, residual: saved.x.pointer, scale: nil, shift: nil, into: r.pointer,
                                  n: n, voxels: voxels, channels: c)
                bhat = r
            }
            // dL/db for conv2's raw output b, from its normalised value, written over it (the kernel reads
            // each element before it writes it).
            try InstanceNorm.backward(x: bhat.pointer, scale: nil, shift: nil, rstd: scale2, leakySlope: nil,
                                      gradY: p.pointer, gradX: bhat.pointer, accumulate: false,
                                      n: n, voxels: voxels, channels: c, workspace: ws)
            gb = bhat
        }
        // conv2 read h = LeakyReLU(IN(a)); dL/dh goes into P's memory (P is no longer needed).
        let gh = p
        gh.pointer.initialize(repeating: 0, count: count)
        let transform = Conv3d.InputTransform(scale: scale1, shift: shift1, leakySlope: ResBlock.slope)
        try conv2.backward(a, nil, gradY: gb, ctx, gradX: gh, transform: transform)
        // Through the LeakyReLU and conv1's norm, in place: dL/da.
        try InstanceNorm.backward(x: a.pointer, scale: scale1, shift: shift1, rstd: scale1, leakySlope: ResBlock.slope,
                                  gradY: gh.pointer, gradX: gh.pointer, accumulate: false,
                                  n: n, voxels: voxels, channels: c, workspace: ws)
        try conv1.backward(saved.x, saved.x2, gradY: gh, ctx, gradX: gradX, gradX2: gradX2)
    }

    /// into = LeakyReLU^-1(out) - (scale residual + shift), or - residual when scale is nil
    /// (channels-last, N x V x C; into may alias residual).
    static func preMinus(out: UnsafePointer<Float>, residual: UnsafePointer<Float>, scale: UnsafePointer<Float>?,
                         shift: UnsafePointer<Float>?, into: UnsafeMutablePointer<Float>,
                         n: Int, voxels: Int, channels c: Int) {
        let inverse = 1 / slope
        let parts = max(1, min(Threads.count, voxels / 1024))
        for s in 0..<n {
            let base = s * voxels * c
            let sc = scale.map { $0 + s * c }, sh = shift.map { $0 + s * c }
            parallelFor(parts) { part in
                for v in Threads.range(part, of: parts, total: voxels) {
                    let o = out + base + v * c, r = residual + base + v * c, d = into + base + v * c
                    if let sc, let sh {
                        for i in 0..<c {
                            let pre = o[i] > 0 ? o[i] : o[i] * inverse
                            d[i] = pre - (sc[i] * r[i] + sh[i])
                        }
                    } else {
                        for i in 0..<c {
                            let pre = o[i] > 0 ? o[i] : o[i] * inverse
                            d[i] = pre - r[i]
                        }
                    }
                }
            }
        }
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

    func forms(_ f: inout [WeightSnapshot.Form]) {
        f[transposedWeight.index] = .convTranspose(cin: cin, cout: cout, kernel: 2)
        block.forms(&f)
    }

    /// What backward needs: the input, and the ResBlock's saved values without the upsampled input,
    /// which backward recomputes (a k2 s2 transposed conv costs a few percent of the block and saves
    /// the largest activation at full resolution).
    struct Saved {
        let x: Tensor
        let skip: Tensor
        let a: Tensor, out: Tensor, affine: Tensor
    }

    /// The upsampled input, checked against the skip.
    private func upsample(_ x: Tensor, skip: Tensor, _ ctx: RunContext) throws -> (Tensor, ConvTranspose3d.Shape) {
        let v = try Volume5(x, "up block")
        guard v.c == cin else {
            throw DeformUXError.shapeMismatch("up block", "wrong input channel count", expected: "\(cin)", got: "\(v.c)")
        }
        let upShape = [v.n, 2 * v.d, 2 * v.h, 2 * v.w, cout]
        guard skip.shape == upShape else {
            throw DeformUXError.shapeMismatch("up block", "the skip does not match the upsampled input",
                                              expected: "\(upShape) (N x D x H x W x C)", got: "\(skip.shape)")
        }
        let s = try ConvTranspose3d.Shape(n: v.n, cin: v.c, cout: cout, d: v.d, h: v.h, w: v.w)
        let up = try ctx.output(upShape)
        try ConvTranspose3d.forward(x: x.pointer, packedWeight: ctx.weight(transposedWeight), bias: nil, y: up.pointer,
                                    shape: s, workspace: ctx.workspace)
        return (up, s)
    }

    func forward(_ x: Tensor, skip: Tensor, _ ctx: RunContext) throws -> Tensor {
        try block.forward(try upsample(x, skip: skip, ctx).0, skip, ctx)
    }

    func forwardSaving(_ x: Tensor, skip: Tensor, _ ctx: RunContext) throws -> (out: Tensor, saved: Saved) {
        let (up, _) = try upsample(x, skip: skip, ctx)
        let (out, saved) = try block.forwardSaving(up, skip, ctx)
        return (out, Saved(x: x, skip: skip, a: saved.a, out: saved.out, affine: saved.affine))
    }

    /// Adds dL/dx into gradX (nil: not wanted) and dL/dskip into gradSkip; `gradOut` is overwritten.
    func backward(_ gradOut: Tensor, _ saved: Saved, _ ctx: RunContext, gradX: Tensor?, gradSkip: Tensor) throws {
        let (up, s) = try upsample(saved.x, skip: saved.skip, ctx)
        let gUp = try ctx.zeros(up.shape)
        try block.backward(gradOut, ResBlock.Saved(x: up, x2: saved.skip, a: saved.a, out: saved.out, affine: saved.affine),
                           ctx, gradX: gUp, gradX2: gradSkip)
        try ConvTranspose3d.backward(x: saved.x.pointer, packedWeight: ctx.weight(transposedWeight), gradY: gUp.pointer,
                                     gradX: gradX?.pointer, gradWeight: ctx.gradient(transposedWeight), gradBias: nil,
                                     shape: s, workspace: ctx.workspace)
    }

    func initialize(_ p: ParameterStore, _ rng: inout SplitMix64) {
        // ConvTranspose3d's fan_in as PyTorch computes it: weight.size(1) * k^3.
        initUniform(p, transposedWeight, count: cin * cout * 8, fanIn: cout * 8, &rng)
        block.initialize(p, &rng)
    }
}

/// The tensor an optional holds, or an internal error (a released activation used again).
func unwrap(_ t: Tensor?, _ what: String = "an activation") throws -> Tensor {
    guard let t else { throw DeformUXError.internal("network", "\(what) was released too early") }
    return t
}
