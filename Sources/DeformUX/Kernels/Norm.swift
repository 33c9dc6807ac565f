/// Normalisations over channels-last activations (V voxels x C channels per sample, C fastest).
///
/// - Channel LayerNorm (ConvNeXt's "channels_first" LayerNorm, ARCHITECTURE.md section 1): per voxel,
///   over its C values, biased variance, eps inside the square root, per-channel weight and bias.
/// - InstanceNorm (MONAI's decoder blocks): per sample and channel over all voxels, biased variance,
///   eps 1e-5, no affine parameters and no running statistics, so training and inference compute the
///   same thing. In the network the statistics come as sums from the convolution that writes the
///   tensor (`affine(fromSums:)`) and the norm is applied by the next kernel, fused with the residual
///   add and LeakyReLU (`applyAffine`) or with the next convolution's input (`Conv3d.InputTransform`).
///   `statistics` computes them in two passes (mean, then squared deviations) for tensors that no
///   convolution wrote.
public enum ChannelLayerNorm {
    /// Mean and 1/sqrt(var + eps) of one voxel's c values (two passes, biased variance).
    @inline(__always)
    static func moments(_ row: UnsafePointer<Float>, _ c: Int, _ eps: Float) -> (mean: Float, rstd: Float) {
        var sum: Float = 0
        for i in 0..<c { sum += row[i] }
        let mean = sum / Float(c)
        var sq: Float = 0
        for i in 0..<c { let d = row[i] - mean; sq += d * d }
        return (mean, 1 / (sq / Float(c) + eps).squareRoot())
    }

    /// y = (x - mean) / sqrt(var + eps) * weight + bias per voxel. x and y may be the same buffer.
    ///     x, y  V x C      weight, bias  C
    public static func forward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, bias: UnsafePointer<Float>,
                               y: UnsafeMutablePointer<Float>, voxels: Int, channels c: Int, eps: Float = 1e-6) {
        let parts = max(1, min(Threads.count, voxels / 512))
        parallelFor(parts) { part in
            for v in Threads.range(part, of: parts, total: voxels) {
                let row = x + v * c, out = y + v * c
                let (mean, rstd) = moments(row, c, eps)
                for i in 0..<c { out[i] = (row[i] - mean) * rstd * weight[i] + bias[i] }
            }
        }
    }

    /// Adds the gradients of `forward`: gradX += (per voxel, with xhat = (x - mean) rstd and
    /// g = gradY * weight) rstd (g - mean(g) - xhat mean(g xhat)); gradWeight += sum_v gradY xhat;
    /// gradBias += sum_v gradY. Any output may be nil. The statistics are recomputed from x.
    /// `partials` is scratch for Threads.count x 2C floats (the parameter gradients per part, added in
    /// part order).
    public static func backward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, gradY: UnsafePointer<Float>,
                                gradX: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>?,
                                gradBias: UnsafeMutablePointer<Float>?, voxels: Int, channels c: Int,
                                eps: Float = 1e-6, workspace: Workspace) throws {
        let parts = max(1, min(Threads.count, voxels / 512))
        let partials = try workspace.buffer("layernorm.gradParts", count: parts * 2 * c)
        partials.initialize(repeating: 0, count: parts * 2 * c)
        parallelFor(parts) { part in
            let dw = partials + part * 2 * c, db = dw + c
            for v in Threads.range(part, of: parts, total: voxels) {
                let row = x + v * c, gy = gradY + v * c
                let (mean, rstd) = moments(row, c, eps)
                var meanG: Float = 0, meanGX: Float = 0
                for i in 0..<c {
                    let xhat = (row[i] - mean) * rstd
                    let g = gy[i] * weight[i]
                    meanG += g
                    meanGX += g * xhat
                    dw[i] += gy[i] * xhat
                    db[i] += gy[i]
                }
                meanG /= Float(c)
                meanGX /= Float(c)
                if let gradX {
                    let gx = gradX + v * c
                    for i in 0..<c {
                        let xhat = (row[i] - mean) * rstd
                        gx[i] += rstd * (gy[i] * weight[i] - meanG - xhat * meanGX)
                    }
                }
            }
        }
        for part in 0..<parts {
            let dw = partials + part * 2 * c, db = dw + c
            if let gradWeight { for i in 0..<c { gradWeight[i] += dw[i] } }
            if let gradBias { for i in 0..<c { gradBias[i] += db[i] } }
        }
    }
}

public enum InstanceNorm {
    public static let eps: Float = 1e-5

    /// Per-channel mean and 1/sqrt(var + eps) of x (V x C), into mean[C] and rstd[C].
    public static func statistics(x: UnsafePointer<Float>, voxels: Int, channels c: Int,
                                  mean: UnsafeMutablePointer<Float>, rstd: UnsafeMutablePointer<Float>,
                                  workspace: Workspace) throws {
        let parts = max(1, min(Threads.count, voxels / 1024))
        // Per-part Double sums, added up in part order.
        let raw = try workspace.buffer("instancenorm.partials", count: parts * c * 2)
        let partials = UnsafeMutableRawPointer(raw).bindMemory(to: Double.self, capacity: parts * c)
        func pass(_ centre: UnsafePointer<Float>?) {
            parallelFor(parts) { part in
                let acc = partials + part * c
                acc.initialize(repeating: 0, count: c)
                withUnsafeTemporaryAllocation(of: Float.self, capacity: c) { block in
                    let r = Threads.range(part, of: parts, total: voxels)
                    var v = r.lowerBound
                    while v < r.upperBound {
                        let end = min(v + 256, r.upperBound)
                        block.initialize(repeating: 0)
                        let b = block
                        while v < end {
                            let row = x + v * c
                            if let centre {
                                for i in 0..<c { let d = row[i] - centre[i]; b[i] += d * d }
                            } else {
                                for i in 0..<c { b[i] += row[i] }
                            }
                            v += 1
                        }
                        for i in 0..<c { acc[i] += Double(b[i]) }
                    }
                }
            }
        }
        pass(nil)
        for i in 0..<c {
            var s: Double = 0
            for p in 0..<parts { s += partials[p * c + i] }
            mean[i] = Float(s / Double(voxels))
        }
        pass(UnsafePointer(mean))
        for i in 0..<c {
            var s: Double = 0
            for p in 0..<parts { s += partials[p * c + i] }
            rstd[i] = Float(1 / (s / Double(voxels) + Double(eps)).squareRoot())
        }
    }

    /// scale = 1/sqrt(var + eps), shift = -mean * scale per sample and channel, from per-sample sums
    /// (N x 2 x C doubles: C sums, then C sums of squares, as `Conv3d.forward` gathers them).
    /// The variance is E[x^2] - mean^2 in Double (clamped at 0).
    public static func affine(fromSums sums: UnsafePointer<Double>, n: Int, channels c: Int, voxels: Int,
                              scale: UnsafeMutablePointer<Float>, shift: UnsafeMutablePointer<Float>) {
        for s in 0..<n {
            let sum = sums + s * 2 * c, sq = sum + c
            for i in 0..<c {
                let mean = sum[i] / Double(voxels)
                let variance = max(sq[i] / Double(voxels) - mean * mean, 0)
                let r = 1 / (variance + Double(eps)).squareRoot()
                scale[s * c + i] = Float(r)
                shift[s * c + i] = Float(-mean * r)
            }
        }
    }

    /// y = act(scale * y + shift + residual) in place, channels-last, with the residual either
    /// normalised the same way (rScale, rShift given) or added as it is. act = LeakyReLU(leakySlope).
    public static func applyAffine(_ y: UnsafeMutablePointer<Float>, scale: UnsafePointer<Float>,
                                   shift: UnsafePointer<Float>, plus r: UnsafePointer<Float>,
                                   scale rScale: UnsafePointer<Float>?, shift rShift: UnsafePointer<Float>?,
                                   leakySlope: Float, n: Int, voxels: Int, channels c: Int) {
        let parts = max(1, min(Threads.count, voxels / 1024))
        for s in 0..<n {
            let yS = y + s * voxels * c, rS = r + s * voxels * c
            let sc = scale + s * c, sh = shift + s * c
            let rsc = rScale.map { $0 + s * c }, rsh = rShift.map { $0 + s * c }
            parallelFor(parts) { part in
                for v in Threads.range(part, of: parts, total: voxels) {
                    let out = yS + v * c, res = rS + v * c
                    if let rsc, let rsh {
                        for i in 0..<c {
                            let z = out[i] * sc[i] + sh[i] + (res[i] * rsc[i] + rsh[i])
                            out[i] = z < 0 ? z * leakySlope : z
                        }
                    } else {
                        for i in 0..<c {
                            let z = out[i] * sc[i] + sh[i] + res[i]
                            out[i] = z < 0 ? z * leakySlope : z
                        }
                    }
                }
            }
        }
    }

    /// The gradient of an InstanceNorm, optionally followed by a LeakyReLU, from what the forward kept:
    ///
    ///     xhat = scale x + shift           (per sample and channel: scale = rstd, shift = -mean rstd),
    ///                                       or xhat = x when scale/shift are nil (x already normalised)
    ///     g    = gradY * act'(xhat)        act = LeakyReLU(leakySlope), or the identity when nil
    ///     gradX (= or +=) rstd (g - mean_v(g) - xhat mean_v(g xhat))
    ///
    /// x, gradY, gradX: N x V x C (channels-last); scale, shift, rstd: N x C. `gradX` may be `gradY`
    /// (in place) when `accumulate` is false. Two passes per sample: the per-channel sums (per part in
    /// Double, added in part order), then the gradient.
    public static func backward(x: UnsafePointer<Float>, scale: UnsafePointer<Float>?, shift: UnsafePointer<Float>?,
                                rstd: UnsafePointer<Float>, leakySlope: Float?, gradY: UnsafePointer<Float>,
                                gradX: UnsafeMutablePointer<Float>, accumulate: Bool,
                                n: Int, voxels: Int, channels c: Int, workspace: Workspace) throws {
        let parts = max(1, min(Threads.count, voxels / 1024))
        // Per part: Double sums of g and g xhat (2C), then Float scratch: the affine (or 1, 0) and the
        // means as Float (4C), padded to whole vectors.
        let cv = (c + 15) / 16 * 16
        let raw = try workspace.buffer("instancenorm.gradParts", count: parts * 2 * c * 2 + 4 * cv + 2 * parts * cv)
        let partials = UnsafeMutableRawPointer(raw).bindMemory(to: Double.self, capacity: parts * 2 * c)
        let affine = raw + parts * 2 * c * 2
        let blockSums = affine + 4 * cv
        let slope = leakySlope ?? 1
        for s in 0..<n {
            let xS = x + s * voxels * c, gS = gradY + s * voxels * c, gxS = gradX + s * voxels * c
            // xhat = a x + b per channel (a = 1, b = 0 for an already normalised x).
            let a = affine, b = affine + cv, r = rstd + s * c
            a.initialize(repeating: 1, count: cv)
            b.initialize(repeating: 0, count: cv)
            if let scale { a.update(from: scale + s * c, count: c) }
            if let shift { b.update(from: shift + s * c, count: c) }
            partials.initialize(repeating: 0, count: parts * 2 * c)
            parallelFor(parts) { part in
                let sumG = partials + part * 2 * c, sumGX = sumG + c
                let bg = blockSums + part * 2 * cv, bgx = bg + cv
                let range = Threads.range(part, of: parts, total: voxels)
                var v = range.lowerBound
                // Float sums over runs of 256 voxels, then Double.
                while v < range.upperBound {
                    let end = min(v + 256, range.upperBound)
                    bg.initialize(repeating: 0, count: 2 * cv)
                    while v < end {
                        sums(x: xS + v * c, g: gS + v * c, a: a, b: b, slope: slope, c: c, sumG: bg, sumGX: bgx)
                        v += 1
                    }
                    for i in 0..<c { sumG[i] += Double(bg[i]); sumGX[i] += Double(bgx[i]) }
                }
            }
            // The means, as Float vectors, after the affine (mg at 2cv, mgx at 3cv).
            let mg = affine + 2 * cv, mgx = affine + 3 * cv
            mg.initialize(repeating: 0, count: 2 * cv)
            for i in 0..<c {
                var sg: Double = 0, sgx: Double = 0
                for p in 0..<parts { sg += partials[p * 2 * c + i]; sgx += partials[p * 2 * c + c + i] }
                mg[i] = Float(sg / Double(voxels))
                mgx[i] = Float(sgx / Double(voxels))
            }
            parallelFor(parts) { part in
                for v in Threads.range(part, of: parts, total: voxels) {
                    gradient(x: xS + v * c, g: gS + v * c, gx: gxS + v * c, a: a, b: b, r: r, mg: mg, mgx: mgx,
                             slope: slope, c: c, accumulate: accumulate)
                }
            }
        }
    }

    /// 16 channels of the normalised input xhat = b + a x and the gradient through the LeakyReLU after it.
    @inline(__always)
    static func leaky(_ x: UnsafePointer<Float>, _ g: UnsafePointer<Float>, _ a: UnsafePointer<Float>,
                      _ b: UnsafePointer<Float>, _ slope: SIMD16<Float>) -> (xhat: SIMD16<Float>, g: SIMD16<Float>) {
        let xhat = cload(b).addingProduct(cload(a), cload(x))
        var gi = cload(g)
        gi.replace(with: gi * slope, where: xhat .<= SIMD16<Float>())
        return (xhat, gi)
    }

    /// One voxel's contribution to the per-channel sums of g and g xhat (see `backward`).
    @inline(__always)
    static func sums(x: UnsafePointer<Float>, g: UnsafePointer<Float>, a: UnsafePointer<Float>, b: UnsafePointer<Float>,
                     slope: Float, c: Int, sumG: UnsafeMutablePointer<Float>, sumGX: UnsafeMutablePointer<Float>) {
        typealias V = SIMD16<Float>
        var i = 0
        let vs = V(repeating: slope)
        while i + 16 <= c {
            let (xhat, gi) = leaky(x + i, g + i, a + i, b + i, vs)
            cstore(cload(sumG + i) + gi, sumG + i)
            cstore(cload(sumGX + i).addingProduct(gi, xhat), sumGX + i)
            i += 16
        }
        while i < c {
            let xhat = b[i] + a[i] * x[i], gi = xhat <= 0 ? g[i] * slope : g[i]
            sumG[i] += gi
            sumGX[i] += gi * xhat
            i += 1
        }
    }

    /// One voxel's gradient (see `backward`); gx may be g.
    @inline(__always)
    static func gradient(x: UnsafePointer<Float>, g: UnsafePointer<Float>, gx: UnsafeMutablePointer<Float>,
                         a: UnsafePointer<Float>, b: UnsafePointer<Float>, r: UnsafePointer<Float>,
                         mg: UnsafePointer<Float>, mgx: UnsafePointer<Float>, slope: Float, c: Int, accumulate: Bool) {
        typealias V = SIMD16<Float>
        var i = 0
        let vs = V(repeating: slope)
        while i + 16 <= c {
            let (xhat, gi) = leaky(x + i, g + i, a + i, b + i, vs)
            var d = cload(r + i) * (gi - cload(mg + i) - xhat * cload(mgx + i))
            if accumulate { d += cload(gx + i) }
            cstore(d, gx + i)
            i += 16
        }
        while i < c {
            let xhat = b[i] + a[i] * x[i], gi = xhat <= 0 ? g[i] * slope : g[i]
            let d = r[i] * (gi - mg[i] - xhat * mgx[i])
            gx[i] = accumulate ? gx[i] + d : d
            i += 1
        }
    }
}
