/// Depthwise deformable 3x3x3 convolution with tri-planar offsets shared by all channels
/// (DeformUX-Net's DDC, ARCHITECTURE.md section 3), forward and backward.
///
///     x        N x C x D x H x W
///     offsets  N x 81 x D x H x W    channel 3*t + a: tap t = i*9 + j*3 + k, axis a (0 D, 1 H, 2 W)
///     weight   C x 1 x 3 x 3 x 3     bias C (optional)
///     y        N x C x D x H x W
///
///     p = o - 1 + (i, j, k) + delta          (per axis, in input voxels)
///     sample_t(x[c])(o) = 0 if any p <= -1 or p >= size, else trilinear(x[c], p), zero outside
///     y[c](o) = bias[c] + sum_t weight[c, t] * sample_t(x[c])(o)
///
/// `DeformConv3dReference` holds the same operator as plain loops (the test oracle).
///
/// How the fast kernel works (PERFORMANCE.md): x is copied once per sample into a zero-padded
/// channels-last buffer, so the "outside counts 0" rule costs nothing (one base index per voxel and tap,
/// no per-corner tests) and each trilinear corner is a contiguous vector of C channels. Because the
/// offsets are shared by all channels, the 8 corner indices and weights of a (voxel, tap) are computed
/// once, 16 voxels at a time with SIMD, and reused across every channel. Threads own disjoint runs of
/// voxels; the input gradient, which scatters to 8 corners anywhere in the volume, goes to one padded
/// buffer per thread part, summed in part order.
public enum DeformConv3d {
    /// Where the channels are in x, y and their gradients (offsets are always N x 81 x D x H x W).
    public typealias Layout = DeformUX.Layout

    /// Voxels handled together when computing sampling indices and weights.
    @usableFromInline static let lanes = 16

    // MARK: Tensor API (validated)

    /// y = DDC(x, offsets, weight, bias). Shapes as above; throws with the offending argument named.
    public static func forward(x: Tensor, offsets: Tensor, weight: Tensor, bias: Tensor?,
                               workspace: Workspace? = nil) throws -> Tensor {
        let shape = try validate(x: x, offsets: offsets, weight: weight, bias: bias, gradY: nil)
        let y = try Tensor(zeros: x.shape)
        try forward(x: x.pointer, offsets: offsets.pointer, weight: weight.pointer, bias: bias?.pointer,
                    y: y.pointer, shape: shape, workspace: workspace ?? Workspace())
        return y
    }

    /// The gradients of `forward` with respect to x, offsets, weight and bias, in new tensors.
    public static func backward(x: Tensor, offsets: Tensor, weight: Tensor, gradY: Tensor,
                                workspace: Workspace? = nil) throws
        -> (gradX: Tensor, gradOffsets: Tensor, gradWeight: Tensor, gradBias: Tensor) {
        let shape = try validate(x: x, offsets: offsets, weight: weight, bias: nil, gradY: gradY)
        let gx = try Tensor(zeros: x.shape)
        let go = try Tensor(zeros: offsets.shape)
        let gw = try Tensor(zeros: weight.shape)
        let gb = try Tensor(zeros: [shape.c])
        try backward(x: x.pointer, offsets: offsets.pointer, weight: weight.pointer, gradY: gradY.pointer,
                     gradX: gx.pointer, gradOffsets: go.pointer, gradWeight: gw.pointer, gradBias: gb.pointer,
                     shape: shape, workspace: workspace ?? Workspace())
        return (gx, go, gw, gb)
    }

    /// Checks ranks, sizes and contiguity; returns the shape.
    public static func validate(x: Tensor, offsets: Tensor, weight: Tensor, bias: Tensor?,
                                gradY: Tensor?) throws -> DDCShape {
        let op = "deform_conv3d"
        guard x.rank == 5 else {
            throw DeformUXError.shapeMismatch(op, "x must be N x C x D x H x W (rank 5), got shape \(x.shape)")
        }
        let shape = try DDCShape(n: x.shape[0], c: x.shape[1], d: x.shape[2], h: x.shape[3], w: x.shape[4])
        let expectOffsets = [shape.n, DDCShape.offsetChannels, shape.d, shape.h, shape.w]
        guard offsets.shape == expectOffsets else {
            throw DeformUXError.shapeMismatch(op, "offsets must have shape \(expectOffsets) for x of shape \(x.shape), got \(offsets.shape)")
        }
        guard weight.shape == [shape.c, 1, 3, 3, 3] else {
            throw DeformUXError.shapeMismatch(op, "weight must have shape [\(shape.c), 1, 3, 3, 3], got \(weight.shape)")
        }
        if let bias, bias.shape != [shape.c] {
            throw DeformUXError.shapeMismatch(op, "bias must have shape [\(shape.c)], got \(bias.shape)")
        }
        if let gradY, gradY.shape != x.shape {
            throw DeformUXError.shapeMismatch(op, "grad_output must have the shape of x \(x.shape), got \(gradY.shape)")
        }
        try x.requireContiguous("\(op) x")
        try offsets.requireContiguous("\(op) offsets")
        try weight.requireContiguous("\(op) weight")
        try bias?.requireContiguous("\(op) bias")
        try gradY?.requireContiguous("\(op) grad_output")
        return shape
    }

    // MARK: Pointer API (the layers and the C ABI call these)

    /// Writes y (overwrites). Throws only when scratch memory cannot be had.
    public static func forward(x: UnsafePointer<Float>, offsets: UnsafePointer<Float>,
                               weight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
                               y: UnsafeMutablePointer<Float>, shape: DDCShape,
                               layout: Layout = .channelsFirst, workspace: Workspace) throws {
        let g = try Geometry(shape)
        let xp = try workspace.buffer("ddc.xpad", count: g.paddedCount)
        let wt = try workspace.buffer("ddc.weightT", count: DDCShape.taps * g.cp)
        let bt = try workspace.buffer("ddc.biasT", count: g.cp)
        transposeWeight(weight, into: wt, g: g)
        bt.initialize(repeating: 0, count: g.cp)
        if let bias { bt.update(from: bias, count: shape.c) }

        let parts = Threads.count
        let scratch = try workspace.buffer("ddc.scratch", count: parts * Scratch.floats(g))
        for n in 0..<shape.n {
            pad(x + n * shape.c * g.voxels, layout: layout, into: xp, g: g, parts: parts)
            let offN = offsets + n * DDCShape.offsetChannels * g.voxels
            let yN = y + n * shape.c * g.voxels
            parallelFor(parts) { part in
                let s = Scratch(scratch + part * Scratch.floats(g), g)
                for block in Threads.range(part, of: parts, total: g.blocks) {
                    if workspace.stopRequested() { return }
                    forwardBlock(block, xp: xp, offsets: offN, weightT: wt, biasT: bt, y: yN, layout: layout,
                                 g: g, s: s)
                }
            }
            try workspace.throwIfCancelled("deform_conv3d")
        }
    }

    /// Adds the gradients into gradX (N x C x D x H x W), gradOffsets (N x 81 x D x H x W),
    /// gradWeight (C x 27) and gradBias (C); any may be nil. The caller zeroes them once per step.
    public static func backward(x: UnsafePointer<Float>, offsets: UnsafePointer<Float>,
                                weight: UnsafePointer<Float>, gradY: UnsafePointer<Float>,
                                gradX: UnsafeMutablePointer<Float>?,
                                gradOffsets: UnsafeMutablePointer<Float>?,
                                gradWeight: UnsafeMutablePointer<Float>?,
                                gradBias: UnsafeMutablePointer<Float>?,
                                shape: DDCShape, layout: Layout = .channelsFirst,
                                workspace: Workspace) throws {
        if gradX == nil && gradOffsets == nil && gradWeight == nil && gradBias == nil { return }
        let g = try Geometry(shape)
        let parts = Threads.count
        let xp = try workspace.buffer("ddc.xpad", count: g.paddedCount)
        let wt = try workspace.buffer("ddc.weightT", count: DDCShape.taps * g.cp)
        transposeWeight(weight, into: wt, g: g)
        let scratch = try workspace.buffer("ddc.scratch", count: parts * Scratch.floats(g))
        // Per part: a padded channels-last input gradient, and weight/bias gradients (28 x cp).
        let gxParts: UnsafeMutablePointer<Float>? = gradX == nil ? nil
            : try workspace.buffer("ddc.gradXParts", count: parts * g.paddedCount)
        let rowScratch = try workspace.buffer("ddc.gradXRows", count: parts * g.w * g.cp)
        let paramStride = (DDCShape.taps + 1) * g.cp
        let gParams = try workspace.buffer("ddc.gradParamParts", count: parts * paramStride)
        gParams.initialize(repeating: 0, count: parts * paramStride)

        for n in 0..<shape.n {
            pad(x + n * shape.c * g.voxels, layout: layout, into: xp, g: g, parts: parts)
            let offN = offsets + n * DDCShape.offsetChannels * g.voxels
            let gyN = gradY + n * shape.c * g.voxels
            let goN = gradOffsets.map { $0 + n * DDCShape.offsetChannels * g.voxels }
            parallelFor(parts) { part in
                let s = Scratch(scratch + part * Scratch.floats(g), g)
                let gxp = gxParts.map { $0 + part * g.paddedCount }
                gxp?.initialize(repeating: 0, count: g.paddedCount)
                let gp = gParams + part * paramStride
                for block in Threads.range(part, of: parts, total: g.blocks) {
                    if workspace.stopRequested() { return }
                    backwardBlock(block, xp: xp, offsets: offN, weightT: wt, gradY: gyN, layout: layout,
                                  gradXPad: gxp, gradOffsets: goN, gradWeightT: gp, gradBiasT: gp + DDCShape.taps * g.cp,
                                  g: g, s: s)
                }
            }
            try workspace.throwIfCancelled("deform_conv3d_backward")
            if let gradX, let gxParts {
                sumPartsUnpad(gxParts, parts: parts, into: gradX + n * shape.c * g.voxels, layout: layout, g: g,
                              scratch: rowScratch)
            }
        }
        // Parameter gradients: the parts summed in part order, then back to C x 27.
        for part in 0..<parts {
            let gp = gParams + part * paramStride
            if let gradWeight {
                for c in 0..<shape.c {
                    for t in 0..<DDCShape.taps { gradWeight[c * DDCShape.taps + t] += gp[t * g.cp + c] }
                }
            }
            if let gradBias {
                for c in 0..<shape.c { gradBias[c] += gp[DDCShape.taps * g.cp + c] }
            }
        }
    }

    // MARK: Geometry and scratch

    /// Sizes of one sample in the padded channels-last layout.
    @usableFromInline struct Geometry {
        let c: Int, d: Int, h: Int, w: Int
        /// Channels rounded up to a multiple of 16 (one SIMD16 vector).
        let cp: Int
        let hp: Int, wp: Int
        let voxels: Int
        let paddedVoxels: Int
        var paddedCount: Int { paddedVoxels * cp }
        let blocks: Int
        /// Element offsets of the 8 corners (bd, bh, bw) from the low corner, in the padded buffer.
        let corner: (Int, Int, Int, Int, Int, Int, Int, Int)

        init(_ s: DDCShape) throws {
            c = s.c; d = s.d; h = s.h; w = s.w
            cp = (s.c + 15) / 16 * 16
            hp = s.h + 2; wp = s.w + 2
            voxels = s.voxels
            paddedVoxels = (s.d + 2) * hp * wp
            // Padded voxel indices are computed in Int32 lanes.
            guard paddedVoxels < Int(Int32.max) else {
                throw DeformUXError.invalidArgument("deform_conv3d", "volume \(s.d) x \(s.h) x \(s.w) is too large (at most 2^31 padded voxels)")
            }
            _ = try Tensor.elementCount([paddedVoxels, cp, 2], context: "deform_conv3d")
            blocks = (voxels + DeformConv3d.lanes - 1) / DeformConv3d.lanes
            let dz = hp * wp * cp, dy = wp * cp, dx = cp
            corner = (0, dx, dy, dy + dx, dz, dz + dx, dz + dy, dz + dy + dx)
        }
    }

    /// Per-part scratch for one block of 16 voxels: the base index, validity, fractions and 8 corner
    /// weights of every (tap, voxel), and a 16 x cp tile of y or grad_y in channels-last order.
    @usableFromInline struct Scratch {
        let index: UnsafeMutablePointer<Int32>   // 27 x 16, padded voxel index of the low corner
        let valid: UnsafeMutablePointer<Float>    // 27 x 16, 1 or 0
        let frac: UnsafeMutablePointer<Float>     // 27 x 3 x 16, fractional parts along D, H, W
        let weights: UnsafeMutablePointer<Float>  // 27 x 8 x 16, trilinear corner weights (0 if invalid)
        let tile: UnsafeMutablePointer<Float>     // 16 x cp

        static func floats(_ g: Geometry) -> Int {
            // Each region rounded to 16 floats keeps every region 64-byte aligned.
            27 * 16 * (1 + 1 + 3 + 8) + 16 * g.cp
        }

        init(_ base: UnsafeMutablePointer<Float>, _ g: Geometry) {
            let raw = UnsafeMutableRawPointer(base)
            index = raw.bindMemory(to: Int32.self, capacity: 27 * 16)
            valid = base + 27 * 16
            frac = valid + 27 * 16
            weights = frac + 27 * 3 * 16
            tile = weights + 27 * 8 * 16
        }
    }

    // MARK: Kernels

    /// weightT[t * cp + c] = weight[c * 27 + t]; padding channels 0.
    static func transposeWeight(_ weight: UnsafePointer<Float>, into wt: UnsafeMutablePointer<Float>, g: Geometry) {
        wt.initialize(repeating: 0, count: DDCShape.taps * g.cp)
        for c in 0..<g.c {
            for t in 0..<DDCShape.taps { wt[t * g.cp + c] = weight[c * DDCShape.taps + t] }
        }
    }

    /// xp[((d+1) * hp + h+1) * wp + w+1][c] = x at (c, d, h, w); the border and the padding channels are 0.
    static func pad(_ x: UnsafePointer<Float>, layout: Layout, into xp: UnsafeMutablePointer<Float>,
                    g: Geometry, parts: Int) {
        let planes = g.d + 2
        let planeCount = g.hp * g.wp * g.cp
        parallelFor(parts) { part in
            for dp in Threads.range(part, of: parts, total: planes) {
                let plane = xp + dp * planeCount
                plane.initialize(repeating: 0, count: planeCount)
                if dp == 0 || dp == g.d + 1 { continue }
                let d = dp - 1
                switch layout {
                case .channelsFirst:
                    for c in 0..<g.c {
                        let src = x + (c * g.d + d) * g.h * g.w
                        for h in 0..<g.h {
                            let row = src + h * g.w
                            var dst = plane + ((h + 1) * g.wp + 1) * g.cp + c
                            for w in 0..<g.w {
                                dst.pointee = row[w]
                                dst += g.cp
                            }
                        }
                    }
                case .channelsLast:
                    for h in 0..<g.h {
                        var src = x + (d * g.h + h) * g.w * g.c
                        var dst = plane + ((h + 1) * g.wp + 1) * g.cp
                        for _ in 0..<g.w {
                            dst.update(from: src, count: g.c)
                            src += g.c
                            dst += g.cp
                        }
                    }
                }
            }
        }
    }

    /// gradX at (c, v) += sum over parts (in order) of gxParts[part][padded(v)][c]. Row by row: the
    /// parts' channel vectors are summed with SIMD into a W x cp tile, which is then transposed into
    /// the channels-first rows (or added as it is, channels-last).
    static func sumPartsUnpad(_ gxParts: UnsafeMutablePointer<Float>, parts: Int,
                              into gradX: UnsafeMutablePointer<Float>, layout: Layout, g: Geometry,
                              scratch: UnsafeMutablePointer<Float>) {
        let rowFloats = g.w * g.cp
        parallelFor(parts) { part in
            let tile = scratch + part * rowFloats
            for d in Threads.range(part, of: parts, total: g.d) {
                for h in 0..<g.h {
                    let rowBase = (((d + 1) * g.hp + h + 1) * g.wp + 1) * g.cp
                    var i = 0
                    while i < rowFloats {
                        var acc = load(gxParts + rowBase + i)
                        for q in 1..<max(parts, 1) { acc += load(gxParts + q * g.paddedCount + rowBase + i) }
                        store(acc, tile + i)
                        i &+= 16
                    }
                    switch layout {
                    case .channelsFirst:
                        for c in 0..<g.c {
                            let dst = gradX + (c * g.d + d) * g.h * g.w + h * g.w
                            for w in 0..<g.w { dst[w] += tile[w * g.cp + c] }
                        }
                    case .channelsLast:
                        let dstRow = gradX + (d * g.h + h) * g.w * g.c
                        for w in 0..<g.w {
                            let dst = dstRow + w * g.c, src = tile + w * g.cp
                            for c in 0..<g.c { dst[c] += src[c] }
                        }
                    }
                }
            }
        }
    }

    /// For the 16 voxels of `block` and every tap: validity, low-corner index, fractions and the 8
    /// corner weights. Lanes past the last voxel are invalid.
    @inline(__always)
    static func sampleBlock(_ block: Int, offsets: UnsafePointer<Float>, g: Geometry, s: Scratch) {
        typealias V = SIMD16<Float>
        let v0 = block * lanes
        let count = min(lanes, g.voxels - v0)
        // Padded coordinates of each voxel: (d, h, w) + 1 - 1, the -1 of the 3x3x3 window.
        var cd = V(), ch = V(), cw = V(), live = V()
        for l in 0..<count {
            let v = v0 + l
            cw[l] = Float(v % g.w)
            ch[l] = Float((v / g.w) % g.h)
            cd[l] = Float(v / (g.w * g.h))
            live[l] = 1
        }
        let hiD = V(repeating: Float(g.d + 1)), hiH = V(repeating: Float(g.h + 1)), hiW = V(repeating: Float(g.w + 1))
        let zero = V(), one = V(repeating: 1)
        let magic = V(repeating: 8_388_608)  // 2^23: adding it to a small whole float exposes the integer in its bits
        let magicBits = SIMD16<Int32>(repeating: 0x4B00_0000)
        let isLive = live .> zero
        var tap = 0
        for i in 0..<3 {
            for j in 0..<3 {
                for k in 0..<3 {
                    let od = loadLanes(offsets + (3 * tap + 0) * g.voxels + v0, count)
                    let oh = loadLanes(offsets + (3 * tap + 1) * g.voxels + v0, count)
                    let ow = loadLanes(offsets + (3 * tap + 2) * g.voxels + v0, count)
                    var qd = cd + Float(i) + od
                    var qh = ch + Float(j) + oh
                    var qw = cw + Float(k) + ow
                    // Inside (-1, size) in input coordinates is (0, size + 1) padded. NaN fails every test.
                    let ok = isLive .& (qd .> zero) .& (qd .< hiD) .& (qh .> zero) .& (qh .< hiH)
                        .& (qw .> zero) .& (qw .< hiW)
                    qd.replace(with: 0, where: .!ok)
                    qh.replace(with: 0, where: .!ok)
                    qw.replace(with: 0, where: .!ok)
                    let fd = qd.rounded(.down), fh = qh.rounded(.down), fw = qw.rounded(.down)
                    let ad = qd - fd, ah = qh - fh, aw = qw - fw
                    let id = unsafeBitCast(fd + magic, to: SIMD16<Int32>.self) &- magicBits
                    let ih = unsafeBitCast(fh + magic, to: SIMD16<Int32>.self) &- magicBits
                    let iw = unsafeBitCast(fw + magic, to: SIMD16<Int32>.self) &- magicBits
                    let index = (id &* Int32(g.hp) &+ ih) &* Int32(g.wp) &+ iw
                    let m = zero.replacing(with: one, where: ok)
                    store(index, s.index + tap * 16)
                    store(m, s.valid + tap * 16)
                    store(ad, s.frac + (tap * 3 + 0) * 16)
                    store(ah, s.frac + (tap * 3 + 1) * 16)
                    store(aw, s.frac + (tap * 3 + 2) * 16)
                    let d0 = (one - ad) * m, d1 = ad * m
                    let h0 = one - ah, h1 = ah
                    let w0 = one - aw, w1 = aw
                    let d0h0 = d0 * h0, d0h1 = d0 * h1, d1h0 = d1 * h0, d1h1 = d1 * h1
                    let wts = s.weights + tap * 8 * 16
                    store(d0h0 * w0, wts + 0 * 16)
                    store(d0h0 * w1, wts + 1 * 16)
                    store(d0h1 * w0, wts + 2 * 16)
                    store(d0h1 * w1, wts + 3 * 16)
                    store(d1h0 * w0, wts + 4 * 16)
                    store(d1h0 * w1, wts + 5 * 16)
                    store(d1h1 * w0, wts + 6 * 16)
                    store(d1h1 * w1, wts + 7 * 16)
                    tap += 1
                }
            }
        }
    }

    static func forwardBlock(_ block: Int, xp: UnsafePointer<Float>, offsets: UnsafePointer<Float>,
                             weightT: UnsafePointer<Float>, biasT: UnsafePointer<Float>,
                             y: UnsafeMutablePointer<Float>, layout: Layout, g: Geometry, s: Scratch) {
        typealias V = SIMD16<Float>
        sampleBlock(block, offsets: offsets, g: g, s: s)
        let v0 = block * lanes
        let count = min(lanes, g.voxels - v0)
        let cp = g.cp
        for l in 0..<count {
            // For each group of up to 3 channel vectors, the 27 taps accumulate in registers. Samples
            // outside the volume are 0: skipping them (rather than weighting corners by 0) also keeps
            // an inf or NaN in x from leaking into them.
            let row = s.tile + l * cp
            var cc = 0
            while cc < cp {
                let group = min(3, (cp - cc) / 16)
                var a0 = load(biasT + cc)
                var a1 = group > 1 ? load(biasT + cc + 16) : V()
                var a2 = group > 2 ? load(biasT + cc + 32) : V()
                for t in 0..<DDCShape.taps where s.valid[t * 16 + l] != 0 {
                    let cw = CornerWeights(s.weights + t * 128 + l)
                    let q = xp + (Int(s.index[t * 16 + l]) &* cp &+ cc)
                    let wt = weightT + (t &* cp &+ cc)
                    a0 = a0.addingProduct(cw.interpolate(q, g.corner), load(wt))
                    if group > 1 { a1 = a1.addingProduct(cw.interpolate(q + 16, g.corner), load(wt + 16)) }
                    if group > 2 { a2 = a2.addingProduct(cw.interpolate(q + 32, g.corner), load(wt + 32)) }
                }
                store(a0, row + cc)
                if group > 1 { store(a1, row + cc + 16) }
                if group > 2 { store(a2, row + cc + 32) }
                cc &+= 16 * group
            }
        }
        switch layout {
        case .channelsFirst:
            for c in 0..<g.c {
                let dst = y + c * g.voxels + v0
                for l in 0..<count { dst[l] = s.tile[l * cp + c] }
            }
        case .channelsLast:
            for l in 0..<count { (y + (v0 + l) * g.c).update(from: s.tile + l * cp, count: g.c) }
        }
    }

    static func backwardBlock(_ block: Int, xp: UnsafePointer<Float>, offsets: UnsafePointer<Float>,
                              weightT: UnsafePointer<Float>, gradY: UnsafePointer<Float>, layout: Layout,
                              gradXPad: UnsafeMutablePointer<Float>?,
                              gradOffsets: UnsafeMutablePointer<Float>?,
                              gradWeightT: UnsafeMutablePointer<Float>, gradBiasT: UnsafeMutablePointer<Float>,
                              g: Geometry, s: Scratch) {
        typealias V = SIMD16<Float>
        sampleBlock(block, offsets: offsets, g: g, s: s)
        let v0 = block * lanes
        let count = min(lanes, g.voxels - v0)
        let cp = g.cp
        let (c0, c1, c2, c3, c4, c5, c6, c7) = g.corner
        // grad_y of the block in channels-last order (padding channels 0).
        for l in 0..<count {
            (s.tile + l * cp).initialize(repeating: 0, count: cp)
        }
        switch layout {
        case .channelsFirst:
            for c in 0..<g.c {
                let src = gradY + c * g.voxels + v0
                for l in 0..<count { s.tile[l * cp + c] = src[l] }
            }
        case .channelsLast:
            for l in 0..<count { (s.tile + l * cp).update(from: gradY + (v0 + l) * g.c, count: g.c) }
        }
        let one = V(repeating: 1)
        let wantOffsets = gradOffsets != nil
        for l in 0..<count {
            let gyRow = s.tile + l * cp
            for cc in stride(from: 0, to: cp, by: 16) {
                store(load(gradBiasT + cc) + load(gyRow + cc), gradBiasT + cc)
            }
            for t in 0..<DDCShape.taps where s.valid[t * 16 + l] != 0 {
                let base = Int(s.index[t * 16 + l]) &* cp
                let wt = weightT + t &* cp
                let gwt = gradWeightT + t &* cp
                // Pass 1: the sample and its derivatives along D, H, W from the lerp tree (along W, then
                // H, then D); weight gradient; offset gradients summed over channels. Two passes keep
                // each loop's live vectors within the 32 registers.
                let fd = V(repeating: s.frac[(t * 3 + 0) * 16 + l])
                let fh = V(repeating: s.frac[(t * 3 + 1) * 16 + l])
                let fw = V(repeating: s.frac[(t * 3 + 2) * 16 + l])
                let gd0 = one - fd, fh0 = one - fh
                // d(sample)/d(fw) weights the four W-differences by their (D, H) weights.
                let wd0h0 = gd0 * fh0, wd0h1 = gd0 * fh, wd1h0 = fd * fh0, wd1h1 = fd * fh
                var accD = V(), accH = V(), accW = V()
                var cc = 0
                while cc < cp {
                    let p = xp + (base &+ cc)
                    let x000 = load(p + c0), x001 = load(p + c1), x010 = load(p + c2), x011 = load(p + c3)
                    let x100 = load(p + c4), x101 = load(p + c5), x110 = load(p + c6), x111 = load(p + c7)
                    let e00 = x001 - x000, e01 = x011 - x010, e10 = x101 - x100, e11 = x111 - x110
                    let a00 = x000.addingProduct(fw, e00), a01 = x010.addingProduct(fw, e01)
                    let a10 = x100.addingProduct(fw, e10), a11 = x110.addingProduct(fw, e11)
                    let b0 = a00.addingProduct(fh, a01 - a00), b1 = a10.addingProduct(fh, a11 - a10)
                    let sample = b0.addingProduct(fd, b1 - b0)
                    let gy = load(gyRow + cc)
                    store(load(gwt + cc).addingProduct(gy, sample), gwt + cc)
                    if wantOffsets {
                        let gw = gy * load(wt + cc)
                        accD = accD.addingProduct(gw, b1 - b0)
                        accH = accH.addingProduct(gw, (gd0 * (a01 - a00)).addingProduct(fd, a11 - a10))
                        var dw = wd0h0 * e00
                        dw = dw.addingProduct(wd0h1, e01)
                        dw = dw.addingProduct(wd1h0, e10)
                        dw = dw.addingProduct(wd1h1, e11)
                        accW = accW.addingProduct(gw, dw)
                    }
                    cc &+= 16
                }
                if let go = gradOffsets {
                    let v = v0 + l
                    go[(3 * t + 0) * g.voxels + v] += horizontalSum(accD)
                    go[(3 * t + 1) * g.voxels + v] += horizontalSum(accH)
                    go[(3 * t + 2) * g.voxels + v] += horizontalSum(accW)
                }
                // Pass 2: the input gradient, scattered to the 8 corners (padded, per part).
                if let gx = gradXPad {
                    let cw = CornerWeights(s.weights + t * 128 + l)
                    var cc = 0
                    while cc < cp {
                        let gw = load(gyRow + cc) * load(wt + cc)
                        let q = gx + (base &+ cc)
                        store(load(q + c0).addingProduct(gw, cw.w0), q + c0)
                        store(load(q + c1).addingProduct(gw, cw.w1), q + c1)
                        store(load(q + c2).addingProduct(gw, cw.w2), q + c2)
                        store(load(q + c3).addingProduct(gw, cw.w3), q + c3)
                        store(load(q + c4).addingProduct(gw, cw.w4), q + c4)
                        store(load(q + c5).addingProduct(gw, cw.w5), q + c5)
                        store(load(q + c6).addingProduct(gw, cw.w6), q + c6)
                        store(load(q + c7).addingProduct(gw, cw.w7), q + c7)
                        cc &+= 16
                    }
                }
            }
        }
    }

    // MARK: SIMD helpers

    /// The sum of the 16 lanes as a tree of vector adds (SIMD's `sum()` adds the lanes one after
    /// another, a chain of 15 dependent scalar adds).
    @inline(__always) static func horizontalSum(_ v: SIMD16<Float>) -> Float {
        let a = v.lowHalf + v.highHalf
        let b = a.lowHalf + a.highHalf
        let c = b.lowHalf + b.highHalf
        return c[0] + c[1]
    }

    /// The 8 trilinear corner weights of one (voxel, tap), broadcast to all lanes.
    @usableFromInline struct CornerWeights {
        let w0: SIMD16<Float>, w1: SIMD16<Float>, w2: SIMD16<Float>, w3: SIMD16<Float>
        let w4: SIMD16<Float>, w5: SIMD16<Float>, w6: SIMD16<Float>, w7: SIMD16<Float>

        /// From the scratch weights of lane l (stride 16 between corners).
        @inline(__always) init(_ w: UnsafePointer<Float>) {
            w0 = SIMD16(repeating: w[0]); w1 = SIMD16(repeating: w[16]); w2 = SIMD16(repeating: w[32])
            w3 = SIMD16(repeating: w[48]); w4 = SIMD16(repeating: w[64]); w5 = SIMD16(repeating: w[80])
            w6 = SIMD16(repeating: w[96]); w7 = SIMD16(repeating: w[112])
        }
        @inline(__always) init(_ w: UnsafeMutablePointer<Float>) { self.init(UnsafePointer(w)) }

        /// The weighted sum of the 8 corner vectors at q (two partial sums shorten the dependency chain).
        @inline(__always)
        func interpolate(_ q: UnsafePointer<Float>, _ c: (Int, Int, Int, Int, Int, Int, Int, Int)) -> SIMD16<Float> {
            var s0 = DeformConv3d.load(q + c.0) * w0
            var s1 = DeformConv3d.load(q + c.1) * w1
            s0 = s0.addingProduct(DeformConv3d.load(q + c.2), w2)
            s1 = s1.addingProduct(DeformConv3d.load(q + c.3), w3)
            s0 = s0.addingProduct(DeformConv3d.load(q + c.4), w4)
            s1 = s1.addingProduct(DeformConv3d.load(q + c.5), w5)
            s0 = s0.addingProduct(DeformConv3d.load(q + c.6), w6)
            s1 = s1.addingProduct(DeformConv3d.load(q + c.7), w7)
            return s0 + s1
        }
        @inline(__always)
        func interpolate(_ q: UnsafeMutablePointer<Float>, _ c: (Int, Int, Int, Int, Int, Int, Int, Int)) -> SIMD16<Float> {
            interpolate(UnsafePointer(q), c)
        }
    }

    @inline(__always) static func load(_ p: UnsafePointer<Float>) -> SIMD16<Float> {
        UnsafeRawPointer(p).loadUnaligned(as: SIMD16<Float>.self)
    }
    @inline(__always) static func load(_ p: UnsafeMutablePointer<Float>) -> SIMD16<Float> {
        UnsafeRawPointer(p).loadUnaligned(as: SIMD16<Float>.self)
    }
    @inline(__always) static func store(_ v: SIMD16<Float>, _ p: UnsafeMutablePointer<Float>) {
        UnsafeMutableRawPointer(p).storeBytes(of: v, as: SIMD16<Float>.self)
    }
    @inline(__always) static func store(_ v: SIMD16<Int32>, _ p: UnsafeMutablePointer<Int32>) {
        UnsafeMutableRawPointer(p).storeBytes(of: v, as: SIMD16<Int32>.self)
    }
    /// The first `count` floats at p (count <= 16), the rest 0.
    @inline(__always) static func loadLanes(_ p: UnsafePointer<Float>, _ count: Int) -> SIMD16<Float> {
        if count == 16 { return load(p) }
        var v = SIMD16<Float>()
        for l in 0..<count { v[l] = p[l] }
        return v
    }
}
