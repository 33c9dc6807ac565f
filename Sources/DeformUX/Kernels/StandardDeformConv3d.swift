import COpenBLAS

/// A full (not depthwise) deformable 3x3x3 convolution with the DDC's single shared offset field:
/// the `standard` ablation of the paper's Table 3, forward and backward (channels-last, as the network
/// runs).
///
///     x        N x D x H x W x Cin       (channels-last)
///     offsets  N x 81 x D x H x W        as for DeformConv3d
///     weight   Cout x Cin x 3 x 3 x 3    bias Cout (optional)
///     y        N x D x H x W x Cout      (channels-last)
///
///     y[co](o) = bias[co] + sum_ci sum_t weight[co, ci, t] * sample_t(x[ci])(o)
///
/// The sampling is DeformConv3d's (same padded channels-last copy, same per-(voxel, tap) indices and
/// weights); the sampled values of a block of voxels form a column panel (voxels x 27*Cin), and one
/// sgemm with the packed weight (27*Cin x Cout) gives their outputs. `ConvReference` has no naive
/// version of this: `StandardDeformConv3dReference` below is the oracle.
public enum StandardDeformConv3d {
    /// Voxel blocks (of 16) per panel: 128 rows.
    static let blocksPerPanel = 8

    public static func forward(x: UnsafePointer<Float>, offsets: UnsafePointer<Float>, weight: UnsafePointer<Float>,
                               bias: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>, shape: DDCShape,
                               cout: Int, workspace: Workspace) throws {
        let g = try DeformConv3d.Geometry(shape)
        let cin = shape.c, k = 27 * cin
        let parts = Threads.count
        let xp = try workspace.buffer("ddc.xpad", count: g.paddedCount)
        let packed = try workspace.buffer("standardddc.weight", count: k * cout)
        for co in 0..<cout {
            for ci in 0..<cin {
                for t in 0..<27 { packed[(t * cin + ci) * cout + co] = weight[(co * cin + ci) * 27 + t] }
            }
        }
        let rowsPerPanel = blocksPerPanel * DeformConv3d.lanes
        let perPart = DeformConv3d.Scratch.floats(g) + rowsPerPanel * k + g.cp
        let scratch = try workspace.buffer("standardddc.scratch", count: parts * perPart)
        let panels = (g.blocks + blocksPerPanel - 1) / blocksPerPanel
        for n in 0..<shape.n {
            DeformConv3d.pad(x + n * cin * g.voxels, layout: .channelsLast, into: xp, g: g, parts: parts)
            let offN = offsets + n * DDCShape.offsetChannels * g.voxels
            let yN = y + n * cout * g.voxels
            parallelFor(parts) { part in
                let base = scratch + part * perPart
                let s = DeformConv3d.Scratch(base, g)
                let panel = base + DeformConv3d.Scratch.floats(g)
                let sample = panel + rowsPerPanel * k
                for p in Threads.range(part, of: parts, total: panels) {
                    if workspace.stopRequested() { return }
                    let v0 = p * rowsPerPanel
                    let rows = min(rowsPerPanel, g.voxels - v0)
                    for b in 0..<blocksPerPanel {
                        let block = p * blocksPerPanel + b
                        if block >= g.blocks { break }
                        DeformConv3d.sampleBlock(block, offsets: offN, g: g, s: s)
                        let count = min(DeformConv3d.lanes, g.voxels - block * DeformConv3d.lanes)
                        for l in 0..<count {
                            let row = panel + (b * DeformConv3d.lanes + l) * k
                            for t in 0..<27 {
                                interpolate(xp: xp, s: s, t: t, l: l, g: g, into: sample)
                                (row + t * cin).update(from: sample, count: cin)
                            }
                        }
                    }
                    let out = yN + v0 * cout
                    for r in 0..<rows {
                        if let bias { (out + r * cout).update(from: bias, count: cout) }
                        else { (out + r * cout).initialize(repeating: 0, count: cout) }
                    }
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(cout), Int32(k),
                                1, panel, Int32(k), packed, Int32(cout), 1, out, Int32(cout))
                }
            }
            try workspace.throwIfCancelled("standard_deform_conv3d")
        }
    }

    /// Adds the gradients of `forward`: gradX (N x D x H x W x Cin, channels-last), gradOffsets
    /// (N x 81 x D x H x W), gradWeight (Cout x Cin x 3 x 3 x 3, PyTorch layout), gradBias (Cout); any
    /// may be nil. Per panel of voxels (as in the forward): the sampled panel S and G = grad_y rows give
    /// dW = S^T G and dS = G W^T by sgemm; each (voxel, tap) then pushes its row of dS through the
    /// trilinear sampling exactly as the DDC's backward does with grad_y * weight: scattered to the 8
    /// corners (per-part padded buffers summed in part order) and, for the offsets, weighted by the
    /// corner differences and summed over channels.
    public static func backward(x: UnsafePointer<Float>, offsets: UnsafePointer<Float>, weight: UnsafePointer<Float>,
                                gradY: UnsafePointer<Float>, gradX: UnsafeMutablePointer<Float>?,
                                gradOffsets: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>?,
                                gradBias: UnsafeMutablePointer<Float>?, shape: DDCShape, cout: Int,
                                workspace: Workspace) throws {
        typealias V = SIMD16<Float>
        let g = try DeformConv3d.Geometry(shape)
        let cin = shape.c, k = 27 * cin
        let parts = Threads.count
        let xp = try workspace.buffer("ddc.xpad", count: g.paddedCount)
        let packed = try workspace.buffer("standardddc.weight", count: k * cout)
        for co in 0..<cout {
            for ci in 0..<cin {
                for t in 0..<27 { packed[(t * cin + ci) * cout + co] = weight[(co * cin + ci) * 27 + t] }
            }
        }
        let rowsPerPanel = blocksPerPanel * DeformConv3d.lanes
        // Per part: sampling scratch, the panel S, its gradient dS (rows x 27 cp: channel vectors padded to
        // 16 so the scatter is SIMD), the weight gradient [t][ci][co] and the bias gradient.
        let kp = 27 * g.cp
        let perPart = DeformConv3d.Scratch.floats(g) + rowsPerPanel * k + rowsPerPanel * kp + g.cp
        let scratch = try workspace.buffer("standardddc.scratch", count: parts * perPart)
        let gwStride = (k * cout + cout + 15) / 16 * 16
        let gParams = try workspace.buffer("standardddc.gradParams", count: parts * gwStride)
        gParams.initialize(repeating: 0, count: parts * gwStride)
        let gxParts: UnsafeMutablePointer<Float>? = gradX == nil ? nil
            : try workspace.buffer("ddc.gradXParts", count: parts * g.paddedCount)
        let rowScratch = try workspace.buffer("ddc.gradXRows", count: parts * g.w * g.cp)
        let panels = (g.blocks + blocksPerPanel - 1) / blocksPerPanel
        let (c0, c1, c2, c3, c4, c5, c6, c7) = g.corner
        for n in 0..<shape.n {
            DeformConv3d.pad(x + n * cin * g.voxels, layout: .channelsLast, into: xp, g: g, parts: parts)
            let offN = offsets + n * DDCShape.offsetChannels * g.voxels
            let gyN = gradY + n * cout * g.voxels
            let goN = gradOffsets.map { $0 + n * DDCShape.offsetChannels * g.voxels }
            parallelFor(parts) { part in
                let base = scratch + part * perPart
                let s = DeformConv3d.Scratch(base, g)
                let panel = base + DeformConv3d.Scratch.floats(g)
                let gPanel = panel + rowsPerPanel * k
                let sample = gPanel + rowsPerPanel * kp
                let gw = gParams + part * gwStride, gb = gw + k * cout
                let gxp = gxParts.map { $0 + part * g.paddedCount }
                gxp?.initialize(repeating: 0, count: g.paddedCount)
                for p in Threads.range(part, of: parts, total: panels) {
                    if workspace.stopRequested() { return }
                    let v0 = p * rowsPerPanel
                    let rows = min(rowsPerPanel, g.voxels - v0)
                    let gy = gyN + v0 * cout
                    // The panel, as the forward builds it (needed for the weight gradient).
                    for b in 0..<blocksPerPanel {
                        let block = p * blocksPerPanel + b
                        if block >= g.blocks { break }
                        DeformConv3d.sampleBlock(block, offsets: offN, g: g, s: s)
                        let count = min(DeformConv3d.lanes, g.voxels - block * DeformConv3d.lanes)
                        for l in 0..<count {
                            let row = panel + (b * DeformConv3d.lanes + l) * k
                            for t in 0..<27 {
                                interpolate(xp: xp, s: s, t: t, l: l, g: g, into: sample)
                                (row + t * cin).update(from: sample, count: cin)
                            }
                        }
                    }
                    if gradWeight != nil {
                        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(k), Int32(cout), Int32(rows),
                                    1, panel, Int32(k), gy, Int32(cout), 1, gw, Int32(cout))
                    }
                    if gradBias != nil {
                        for r in 0..<rows { for co in 0..<cout { gb[co] += gy[r * cout + co] } }
                    }
                    if gxp == nil && goN == nil { continue }
                    // dS (rows x k) = G W^T, then spread into channel vectors padded to cp.
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(k), Int32(cout),
                                1, gy, Int32(cout), packed, Int32(cout), 0, panel, Int32(k))
                    for r in 0..<rows {
                        for t in 0..<27 {
                            let dst = gPanel + r * kp + t * g.cp
                            dst.update(from: panel + r * k + t * cin, count: cin)
                            (dst + cin).initialize(repeating: 0, count: g.cp - cin)
                        }
                    }
                    for b in 0..<blocksPerPanel {
                        let block = p * blocksPerPanel + b
                        if block >= g.blocks { break }
                        DeformConv3d.sampleBlock(block, offsets: offN, g: g, s: s)
                        let count = min(DeformConv3d.lanes, g.voxels - block * DeformConv3d.lanes)
                        let one = V(repeating: 1)
                        for l in 0..<count {
                            let r = b * DeformConv3d.lanes + l
                            for t in 0..<27 where s.valid[t * 16 + l] != 0 {
                                let gs = gPanel + r * kp + t * g.cp
                                let base = Int(s.index[t * 16 + l]) &* g.cp
                                if let goN {
                                    let fd = V(repeating: s.frac[(t * 3 + 0) * 16 + l])
                                    let fh = V(repeating: s.frac[(t * 3 + 1) * 16 + l])
                                    let fw = V(repeating: s.frac[(t * 3 + 2) * 16 + l])
                                    let gd0 = one - fd, fh0 = one - fh
                                    let wd0h0 = gd0 * fh0, wd0h1 = gd0 * fh, wd1h0 = fd * fh0, wd1h1 = fd * fh
                                    var accD = V(), accH = V(), accW = V()
                                    var cc = 0
                                    while cc < g.cp {
                                        let q = xp + (base &+ cc)
                                        let x000 = DeformConv3d.load(q + c0), x001 = DeformConv3d.load(q + c1)
                                        let x010 = DeformConv3d.load(q + c2), x011 = DeformConv3d.load(q + c3)
                                        let x100 = DeformConv3d.load(q + c4), x101 = DeformConv3d.load(q + c5)
                                        let x110 = DeformConv3d.load(q + c6), x111 = DeformConv3d.load(q + c7)
                                        let e00 = x001 - x000, e01 = x011 - x010, e10 = x101 - x100, e11 = x111 - x110
                                        let a00 = x000.addingProduct(fw, e00), a01 = x010.addingProduct(fw, e01)
                                        let a10 = x100.addingProduct(fw, e10), a11 = x110.addingProduct(fw, e11)
                                        let b0 = a00.addingProduct(fh, a01 - a00), b1 = a10.addingProduct(fh, a11 - a10)
                                        let gv = DeformConv3d.load(gs + cc)
                                        accD = accD.addingProduct(gv, b1 - b0)
                                        accH = accH.addingProduct(gv, (gd0 * (a01 - a00)).addingProduct(fd, a11 - a10))
                                        var dw = wd0h0 * e00
                                        dw = dw.addingProduct(wd0h1, e01)
                                        dw = dw.addingProduct(wd1h0, e10)
                                        dw = dw.addingProduct(wd1h1, e11)
                                        accW = accW.addingProduct(gv, dw)
                                        cc &+= 16
                                    }
                                    let v = block * DeformConv3d.lanes + l
                                    goN[(3 * t + 0) * g.voxels + v] += DeformConv3d.horizontalSum(accD)
                                    goN[(3 * t + 1) * g.voxels + v] += DeformConv3d.horizontalSum(accH)
                                    goN[(3 * t + 2) * g.voxels + v] += DeformConv3d.horizontalSum(accW)
                                }
                                if let gxp {
                                    let cw = DeformConv3d.CornerWeights(s.weights + t * 128 + l)
                                    var cc = 0
                                    while cc < g.cp {
                                        let gv = DeformConv3d.load(gs + cc)
                                        let q = gxp + (base &+ cc)
                                        DeformConv3d.store(DeformConv3d.load(q + c0).addingProduct(gv, cw.w0), q + c0)
                                        DeformConv3d.store(DeformConv3d.load(q + c1).addingProduct(gv, cw.w1), q + c1)
                                        DeformConv3d.store(DeformConv3d.load(q + c2).addingProduct(gv, cw.w2), q + c2)
                                        DeformConv3d.store(DeformConv3d.load(q + c3).addingProduct(gv, cw.w3), q + c3)
                                        DeformConv3d.store(DeformConv3d.load(q + c4).addingProduct(gv, cw.w4), q + c4)
                                        DeformConv3d.store(DeformConv3d.load(q + c5).addingProduct(gv, cw.w5), q + c5)
                                        DeformConv3d.store(DeformConv3d.load(q + c6).addingProduct(gv, cw.w6), q + c6)
                                        DeformConv3d.store(DeformConv3d.load(q + c7).addingProduct(gv, cw.w7), q + c7)
                                        cc &+= 16
                                    }
                                }
                            }
                        }
                    }
                }
            }
            try workspace.throwIfCancelled("standard_deform_conv3d_backward")
            if let gradX, let gxParts {
                DeformConv3d.sumPartsUnpad(gxParts, parts: parts, into: gradX + n * cin * g.voxels, layout: .channelsLast,
                                           g: g, scratch: rowScratch)
            }
        }
        for part in 0..<parts {
            let gw = gParams + part * gwStride, gb = gw + k * cout
            if let gradWeight {
                for co in 0..<cout {
                    for ci in 0..<cin {
                        for t in 0..<27 { gradWeight[(co * cin + ci) * 27 + t] += gw[(t * cin + ci) * cout + co] }
                    }
                }
            }
            if let gradBias { for co in 0..<cout { gradBias[co] += gb[co] } }
        }
    }

    /// sample[c] = the trilinear sample of channel c for (voxel lane l, tap t); 0 outside.
    @inline(__always)
    static func interpolate(xp: UnsafePointer<Float>, s: DeformConv3d.Scratch, t: Int, l: Int,
                            g: DeformConv3d.Geometry, into sample: UnsafeMutablePointer<Float>) {
        typealias V = SIMD16<Float>
        if s.valid[t * 16 + l] == 0 {
            sample.initialize(repeating: 0, count: g.cp)
            return
        }
        let wts = s.weights + t * 128 + l
        let (c0, c1, c2, c3, c4, c5, c6, c7) = g.corner
        let w0 = V(repeating: wts[0]), w1 = V(repeating: wts[16]), w2 = V(repeating: wts[32])
        let w3 = V(repeating: wts[48]), w4 = V(repeating: wts[64]), w5 = V(repeating: wts[80])
        let w6 = V(repeating: wts[96]), w7 = V(repeating: wts[112])
        let p = xp + Int(s.index[t * 16 + l]) &* g.cp
        var cc = 0
        while cc < g.cp {
            let q = p + cc
            var s0 = DeformConv3d.load(q + c0) * w0
            var s1 = DeformConv3d.load(q + c1) * w1
            s0 = s0.addingProduct(DeformConv3d.load(q + c2), w2)
            s1 = s1.addingProduct(DeformConv3d.load(q + c3), w3)
            s0 = s0.addingProduct(DeformConv3d.load(q + c4), w4)
            s1 = s1.addingProduct(DeformConv3d.load(q + c5), w5)
            s0 = s0.addingProduct(DeformConv3d.load(q + c6), w6)
            s1 = s1.addingProduct(DeformConv3d.load(q + c7), w7)
            DeformConv3d.store(s0 + s1, sample + cc)
            cc &+= 16
        }
    }
}

/// The `standard` ablation as plain loops (channels-first, the test oracle), built on the DDC
/// reference's sampling.
public enum StandardDeformConv3dReference {
    public static func forward<T: BinaryFloatingPoint>(x: [T], offsets: [T], weight: [T], bias: [T]?,
                                                       shape s: DDCShape, cout: Int) -> [T] {
        let v = s.voxels
        var y = [T](repeating: 0, count: s.n * cout * v)
        for n in 0..<s.n {
            for d in 0..<s.d { for h in 0..<s.h { for w in 0..<s.w {
                let o = (d * s.h + h) * s.w + w
                for co in 0..<cout {
                    var acc: T = bias?[co] ?? 0
                    for ci in 0..<s.c {
                        for t in 0..<27 {
                            let (i, j, k) = (t / 9, (t / 3) % 3, t % 3)
                            let p: (T, T, T) = DeformConv3dReference.position(offsets, n: n, d: d, h: h, w: w,
                                                                              i: i, j: j, k: k, shape: s)
                            guard let smp = DeformConv3dReference.sample(p, sizes: (s.d, s.h, s.w)) else { continue }
                            var value: T = 0
                            for q in 0..<8 {
                                if let at = DeformConv3dReference.corner(smp, q, sizes: (s.d, s.h, s.w)) {
                                    value += smp.weight(q) * x[(n * s.c + ci) * v + at]
                                }
                            }
                            acc += weight[(co * s.c + ci) * 27 + t] * value
                        }
                    }
                    y[(n * cout + co) * v + o] = acc
                }
            } } }
        }
        return y
    }
}
