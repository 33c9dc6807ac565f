/// Normalisations over channels-last activations (V voxels x C channels per sample, C fastest).
///
/// - Channel LayerNorm (ConvNeXt's "channels_first" LayerNorm, ARCHITECTURE.md section 1): per voxel,
///   over its C values, biased variance, eps inside the square root, per-channel weight and bias.
/// - InstanceNorm (MONAI's decoder blocks): per sample and channel over all voxels, biased variance,
///   eps 1e-5, no affine parameters and no running statistics, so training and inference compute the
///   same thing. Statistics take two passes (mean, then squared deviations) for accuracy, with Float
///   sums over blocks of voxels added up in Double.
public enum ChannelLayerNorm {
    /// y = (x - mean) / sqrt(var + eps) * weight + bias per voxel. x and y may be the same buffer.
    ///     x, y  V x C      weight, bias  C
    public static func forward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, bias: UnsafePointer<Float>,
                               y: UnsafeMutablePointer<Float>, voxels: Int, channels c: Int, eps: Float = 1e-6) {
        let parts = max(1, min(Threads.count, voxels / 512))
        parallelFor(parts) { part in
            for v in Threads.range(part, of: parts, total: voxels) {
                let row = x + v * c, out = y + v * c
                var sum: Float = 0
                for i in 0..<c { sum += row[i] }
                let mean = sum / Float(c)
                var sq: Float = 0
                for i in 0..<c { let d = row[i] - mean; sq += d * d }
                let rstd = 1 / (sq / Float(c) + eps).squareRoot()
                for i in 0..<c { out[i] = (row[i] - mean) * rstd * weight[i] + bias[i] }
            }
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

    /// y = act((x - mean) * rstd + residual), where residual is either another normalised tensor
    /// ((r - rMean) * rRstd), a plain tensor, or absent, and act is LeakyReLU(slope) or identity.
    /// y may alias x or r.
    public enum Residual {
        case none
        case plain(UnsafePointer<Float>)
        case normalized(UnsafePointer<Float>, mean: UnsafePointer<Float>, rstd: UnsafePointer<Float>)
    }

    public static func apply(x: UnsafePointer<Float>, mean: UnsafePointer<Float>, rstd: UnsafePointer<Float>,
                             residual: Residual, leakySlope: Float?, y: UnsafeMutablePointer<Float>,
                             voxels: Int, channels c: Int) {
        let parts = max(1, min(Threads.count, voxels / 1024))
        parallelFor(parts) { part in
            for v in Threads.range(part, of: parts, total: voxels) {
                let row = x + v * c, out = y + v * c
                switch residual {
                case .none:
                    for i in 0..<c { out[i] = (row[i] - mean[i]) * rstd[i] }
                case .plain(let r):
                    let rr = r + v * c
                    for i in 0..<c { out[i] = (row[i] - mean[i]) * rstd[i] + rr[i] }
                case .normalized(let r, let rm, let rs):
                    let rr = r + v * c
                    for i in 0..<c { out[i] = (row[i] - mean[i]) * rstd[i] + (rr[i] - rm[i]) * rs[i] }
                }
                if let slope = leakySlope {
                    for i in 0..<c { let z = out[i]; out[i] = z < 0 ? z * slope : z }
                }
            }
        }
    }
}
