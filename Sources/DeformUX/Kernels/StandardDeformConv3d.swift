import COpenBLAS

/// A full (not depthwise) deformable 3x3x3 convolution with the DDC's single shared offset field:
/// the `standard` ablation of the paper's Table 3. Forward only (channels-last, as the network runs).
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
