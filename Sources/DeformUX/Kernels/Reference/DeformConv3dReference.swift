/// The DDC (depthwise deformable 3x3x3 convolution, ARCHITECTURE.md section 3) as plain loops: the test
/// oracle for `DeformConv3d`. Written from the specification, untuned, generic so that tests can run it
/// in Double. Arrays are C-contiguous (W fastest):
///
///     x        N x C x D x H x W
///     offsets  N x 81 x D x H x W    channel 3*t + a: tap t = i*9 + j*3 + k, axis a (0 D, 1 H, 2 W)
///     weight   C x 27                 (C x 1 x 3 x 3 x 3)
///     bias     C
///     y        N x C x D x H x W
///
///     p = (d - 1 + i + off[3t+0], h - 1 + j + off[3t+1], w - 1 + k + off[3t+2])
///     sample = 0 if any coordinate of p is <= -1, >= its size, or NaN;
///              else trilinear interpolation of the 8 neighbours (floor, floor + 1), outside ones 0
///     y[c] = bias[c] + sum_t weight[c*27 + t] * sample_t(x[c])
///
/// Sizes are not checked beyond preconditions: callers are tests.
public enum DeformConv3dReference {
    /// The trilinear sampling of one (voxel, tap): the low corner (floor of p) and the fractional
    /// parts, or nil when the sample is 0 by the out-of-volume rule.
    struct Sample<T: BinaryFloatingPoint> {
        var low: (Int, Int, Int)
        var frac: (T, T, T)

        /// The trilinear weight of corner q = 4*bd + 2*bh + bw: per axis 1 - f for the low neighbour,
        /// f for the high one.
        func weight(_ q: Int) -> T {
            factor(frac.0, (q >> 2) & 1) * factor(frac.1, (q >> 1) & 1) * factor(frac.2, q & 1)
        }

        /// d(weight(q)) / d(p_a): the factor of axis a becomes -1 (low) or +1 (high).
        func dWeight(_ q: Int, axis a: Int) -> T {
            let b = ((q >> 2) & 1, (q >> 1) & 1, q & 1)
            let fd: T = a == 0 ? (b.0 == 1 ? 1 : -1) : factor(frac.0, b.0)
            let fh: T = a == 1 ? (b.1 == 1 ? 1 : -1) : factor(frac.1, b.1)
            let fw: T = a == 2 ? (b.2 == 1 ? 1 : -1) : factor(frac.2, b.2)
            return fd * fh * fw
        }

        private func factor(_ f: T, _ high: Int) -> T { high == 1 ? f : 1 - f }
    }

    static func sample<T: BinaryFloatingPoint>(_ p: (T, T, T), sizes: (Int, Int, Int)) -> Sample<T>? {
        // Written so that NaN fails: the sample is taken only strictly inside (-1, size) on every axis.
        guard p.0 > -1, p.0 < T(sizes.0), p.1 > -1, p.1 < T(sizes.1), p.2 > -1, p.2 < T(sizes.2) else { return nil }
        let f = (p.0.rounded(.down), p.1.rounded(.down), p.2.rounded(.down))
        return Sample(low: (Int(f.0), Int(f.1), Int(f.2)), frac: (p.0 - f.0, p.1 - f.1, p.2 - f.2))
    }

    /// The flat index within one channel of corner q of `s`, or nil when that corner is outside.
    static func corner<T>(_ s: Sample<T>, _ q: Int, sizes: (Int, Int, Int)) -> Int? {
        let d = s.low.0 + ((q >> 2) & 1), h = s.low.1 + ((q >> 1) & 1), w = s.low.2 + (q & 1)
        guard d >= 0, d < sizes.0, h >= 0, h < sizes.1, w >= 0, w < sizes.2 else { return nil }
        return (d * sizes.1 + h) * sizes.2 + w
    }

    /// The sampling position of output voxel (d, h, w), tap (i, j, k), in sample n.
    static func position<T: BinaryFloatingPoint>(_ offsets: [T], n: Int, d: Int, h: Int, w: Int,
                                                 i: Int, j: Int, k: Int, shape: DDCShape) -> (T, T, T) {
        let t = i * 9 + j * 3 + k
        let v = (d * shape.h + h) * shape.w + w
        let base = n * DDCShape.offsetChannels * shape.voxels
        return (T(d - 1 + i) + offsets[base + (3 * t + 0) * shape.voxels + v],
                T(h - 1 + j) + offsets[base + (3 * t + 1) * shape.voxels + v],
                T(w - 1 + k) + offsets[base + (3 * t + 2) * shape.voxels + v])
    }

    /// y = DDC(x, offsets, weight, bias).
    public static func forward<T: BinaryFloatingPoint>(x: [T], offsets: [T], weight: [T], bias: [T]?,
                                                       shape: DDCShape) -> [T] {
        precondition(x.count == shape.count && offsets.count == shape.offsetCount && weight.count == shape.weightCount)
        precondition(bias == nil || bias!.count == shape.c)
        let sizes = (shape.d, shape.h, shape.w)
        var y = [T](repeating: 0, count: shape.count)
        for n in 0..<shape.n {
            for c in 0..<shape.c {
                let xc = (n * shape.c + c) * shape.voxels
                for d in 0..<shape.d {
                    for h in 0..<shape.h {
                        for w in 0..<shape.w {
                            var acc: T = bias?[c] ?? 0
                            for i in 0..<3 {
                                for j in 0..<3 {
                                    for k in 0..<3 {
                                        let t = i * 9 + j * 3 + k
                                        let p: (T, T, T) = position(offsets, n: n, d: d, h: h, w: w, i: i, j: j, k: k, shape: shape)
                                        guard let s = sample(p, sizes: sizes) else { continue }
                                        var value: T = 0
                                        for q in 0..<8 {
                                            if let at = corner(s, q, sizes: sizes) { value += s.weight(q) * x[xc + at] }
                                        }
                                        acc += weight[c * DDCShape.taps + t] * value
                                    }
                                }
                            }
                            y[xc + (d * shape.h + h) * shape.w + w] = acc
                        }
                    }
                }
            }
        }
        return y
    }

    /// The exact gradients of `forward` given grad_y (new arrays, not accumulated).
    public static func backward<T: BinaryFloatingPoint>(x: [T], offsets: [T], weight: [T], gradY: [T],
                                                        shape: DDCShape)
        -> (gradX: [T], gradOffsets: [T], gradWeight: [T], gradBias: [T]) {
        precondition(x.count == shape.count && offsets.count == shape.offsetCount && weight.count == shape.weightCount)
        precondition(gradY.count == shape.count)
        let sizes = (shape.d, shape.h, shape.w)
        var gx = [T](repeating: 0, count: shape.count)
        var go = [T](repeating: 0, count: shape.offsetCount)
        var gw = [T](repeating: 0, count: shape.weightCount)
        var gb = [T](repeating: 0, count: shape.c)
        for n in 0..<shape.n {
            for c in 0..<shape.c {
                let xc = (n * shape.c + c) * shape.voxels
                for d in 0..<shape.d {
                    for h in 0..<shape.h {
                        for w in 0..<shape.w {
                            let v = (d * shape.h + h) * shape.w + w
                            let g = gradY[xc + v]
                            gb[c] += g
                            for i in 0..<3 {
                                for j in 0..<3 {
                                    for k in 0..<3 {
                                        let t = i * 9 + j * 3 + k
                                        let p: (T, T, T) = position(offsets, n: n, d: d, h: h, w: w, i: i, j: j, k: k, shape: shape)
                                        guard let s = sample(p, sizes: sizes) else { continue }
                                        let wct = weight[c * DDCShape.taps + t]
                                        var value: T = 0
                                        var dp: (T, T, T) = (0, 0, 0)  // d(sample)/d(p) per axis
                                        for q in 0..<8 {
                                            guard let at = corner(s, q, sizes: sizes) else { continue }
                                            let xv = x[xc + at]
                                            value += s.weight(q) * xv
                                            dp.0 += s.dWeight(q, axis: 0) * xv
                                            dp.1 += s.dWeight(q, axis: 1) * xv
                                            dp.2 += s.dWeight(q, axis: 2) * xv
                                            gx[xc + at] += g * wct * s.weight(q)
                                        }
                                        gw[c * DDCShape.taps + t] += g * value
                                        let ob = n * DDCShape.offsetChannels * shape.voxels + v
                                        go[ob + (3 * t + 0) * shape.voxels] += g * wct * dp.0
                                        go[ob + (3 * t + 1) * shape.voxels] += g * wct * dp.1
                                        go[ob + (3 * t + 2) * shape.voxels] += g * wct * dp.2
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        return (gx, go, gw, gb)
    }
}
