/// Normalisations and activations as plain loops (the oracles of `ChannelLayerNorm`, `InstanceNorm`
/// and `Activation`), channels-last (V x C per sample), generic over the float type.
public enum NormReference {
    /// Per voxel: (x - mean) / sqrt(var + eps) * weight + bias over its C values (biased variance).
    public static func channelLayerNorm<T: BinaryFloatingPoint>(_ x: [T], weight: [T], bias: [T], channels c: Int,
                                                               eps: T = 1e-6) -> [T] {
        var y = x
        for v in 0..<(x.count / c) {
            let row = x[(v * c)..<(v * c + c)]
            let mean = row.reduce(0, +) / T(c)
            let variance = row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / T(c)
            let r = 1 / (variance + eps).squareRoot()
            for i in 0..<c { y[v * c + i] = (x[v * c + i] - mean) * r * weight[i] + bias[i] }
        }
        return y
    }

    /// Per sample and channel over all voxels: (x - mean) / sqrt(var + eps), biased variance, no affine.
    public static func instanceNorm<T: BinaryFloatingPoint>(_ x: [T], n: Int, voxels: Int, channels c: Int,
                                                           eps: T = 1e-5) -> [T] {
        var y = x
        for s in 0..<n {
            for i in 0..<c {
                var mean: T = 0
                for v in 0..<voxels { mean += x[(s * voxels + v) * c + i] }
                mean /= T(voxels)
                var variance: T = 0
                for v in 0..<voxels { let d = x[(s * voxels + v) * c + i] - mean; variance += d * d }
                variance /= T(voxels)
                let r = 1 / (variance + eps).squareRoot()
                for v in 0..<voxels { y[(s * voxels + v) * c + i] = (x[(s * voxels + v) * c + i] - mean) * r }
            }
        }
        return y
    }

    public static func leakyReLU<T: BinaryFloatingPoint>(_ x: T, slope: T = 0.01) -> T { x < 0 ? x * slope : x }

    /// The exact GELU, x Phi(x), for references (Double via the caller's erf).
    public static func gelu(_ x: Double, erf: (Double) -> Double) -> Double { x * (1 + erf(x / 2.0.squareRoot())) / 2 }
}
