#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// `DiceCELoss` as plain Double loops written from the formula (the test oracle, and the function
/// finite differences are taken of). Channels-first: logits N x C x V, labels N x V.
///
/// The gradient goes the long way round on purpose (dL/ds from the Dice and CE terms, then the full
/// C x C softmax Jacobian), so that it shares no algebra with the fast kernel's folded form.
/// Like the other references it checks sizes with `precondition`: a caller error here is a test bug.
public enum DiceCELossReference {
    /// Softmax over classes, N x C x V.
    public static func softmax(_ logits: [Double], n: Int, classes c: Int, voxels: Int) -> [Double] {
        precondition(logits.count == n * c * voxels)
        var s = logits
        for i in 0..<n {
            for v in 0..<voxels {
                var m = -Double.infinity
                for k in 0..<c { m = max(m, logits[(i * c + k) * voxels + v]) }
                var sum = 0.0
                for k in 0..<c { sum += exp(logits[(i * c + k) * voxels + v] - m) }
                for k in 0..<c { s[(i * c + k) * voxels + v] = exp(logits[(i * c + k) * voxels + v] - m) / sum }
            }
        }
        return s
    }

    /// lambdaDice * dice + lambdaCE * ce (see DiceCELoss).
    public static func loss(logits: [Double], labels: [Int32], n: Int, classes c: Int, voxels: Int,
                            weights: [Double]? = nil, lambdaDice: Double = 1, lambdaCE: Double = 1) -> Double {
        precondition(labels.count == n * voxels)
        let w = weights ?? [Double](repeating: 1, count: c)
        let s = softmax(logits, n: n, classes: c, voxels: voxels)
        var dice = 0.0
        for i in 0..<n {
            for k in 0..<c {
                var inter = 0.0, p = 0.0, g = 0.0
                for v in 0..<voxels {
                    let onehot = Int(labels[i * voxels + v]) == k ? 1.0 : 0.0
                    inter += s[(i * c + k) * voxels + v] * onehot
                    p += s[(i * c + k) * voxels + v]
                    g += onehot
                }
                dice += w[k] * (1 - (2 * inter + DiceCELoss.smooth) / (p + g + DiceCELoss.smooth))
            }
        }
        dice /= Double(n * c)
        var ce = 0.0, wsum = 0.0
        for i in 0..<n {
            for v in 0..<voxels {
                let y = Int(labels[i * voxels + v])
                ce += w[y] * -log(s[(i * c + y) * voxels + v])
                wsum += w[y]
            }
        }
        return lambdaDice * dice + lambdaCE * ce / wsum
    }

    /// dL/dlogits, N x C x V.
    public static func gradient(logits: [Double], labels: [Int32], n: Int, classes c: Int, voxels: Int,
                                weights: [Double]? = nil, lambdaDice: Double = 1, lambdaCE: Double = 1) -> [Double] {
        precondition(labels.count == n * voxels)
        let w = weights ?? [Double](repeating: 1, count: c)
        let s = softmax(logits, n: n, classes: c, voxels: voxels)
        var wsum = 0.0
        for y in labels { wsum += w[Int(y)] }
        // dL/ds
        var ds = [Double](repeating: 0, count: s.count)
        for i in 0..<n {
            for k in 0..<c {
                var inter = 0.0, p = 0.0, g = 0.0
                for v in 0..<voxels {
                    let onehot = Int(labels[i * voxels + v]) == k ? 1.0 : 0.0
                    inter += s[(i * c + k) * voxels + v] * onehot
                    p += s[(i * c + k) * voxels + v]
                    g += onehot
                }
                let num = 2 * inter + DiceCELoss.smooth, den = p + g + DiceCELoss.smooth
                for v in 0..<voxels {
                    let onehot = Int(labels[i * voxels + v]) == k ? 1.0 : 0.0
                    // d/ds of -(num/den) = -(2 g den - num) / den^2
                    let dDice = -(2 * onehot * den - num) / (den * den)
                    var d = lambdaDice * w[k] * dDice / Double(n * c)
                    // d/ds of w[y] * -log s[y] / wsum
                    if onehot == 1 { d += lambdaCE * w[k] * -1 / s[(i * c + k) * voxels + v] / wsum }
                    ds[(i * c + k) * voxels + v] = d
                }
            }
        }
        // through the softmax: dz[j] = sum_k ds[k] * s[k] * (delta_kj - s[j])
        var dz = [Double](repeating: 0, count: s.count)
        for i in 0..<n {
            for v in 0..<voxels {
                for j in 0..<c {
                    var acc = 0.0
                    for k in 0..<c {
                        let sk = s[(i * c + k) * voxels + v], sj = s[(i * c + j) * voxels + v]
                        acc += ds[(i * c + k) * voxels + v] * sk * ((k == j ? 1 : 0) - sj)
                    }
                    dz[(i * c + j) * voxels + v] = acc
                }
            }
        }
        return dz
    }
}
