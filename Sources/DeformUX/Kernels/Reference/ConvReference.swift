/// Plain-loop convolutions with PyTorch's semantics (cross-correlation, zero padding, cubic kernels,
/// `groups`), the oracle for `Conv3d`, `ConvTranspose3d`, `DepthwiseConv3d` and `GroupedPointwise3d`.
/// Untuned on purpose. Generic over the float type so that tests can run them in Double.
///
/// Activations are **channels-last** (N x D x H x W x C, C fastest), as the engine's kernels;
/// `toChannelsLast` / `toChannelsFirst` convert from and to PyTorch's N x C x D x H x W.
/// Weights are in PyTorch's layouts:
///
///     conv3d            weight  Cout x (Cin / groups) x k x k x k
///     convTranspose3d   weight  Cin x (Cout / groups) x k x k x k
public enum ConvReference {
    /// y = conv3d(x, weight, bias). x is N x D x H x W x Cin; returns N x Do x Ho x Wo x Cout with
    /// Do = (D + 2 padding - k) / stride + 1 (likewise Ho, Wo).
    public static func conv3d<T: BinaryFloatingPoint>(
        x: [T], n: Int, cin: Int, d: Int, h: Int, w: Int,
        weight: [T], bias: [T]?, cout: Int, kernel k: Int, stride: Int = 1, padding: Int = 0, groups: Int = 1
    ) -> [T] {
        precondition(cin % groups == 0 && cout % groups == 0, "conv3d reference: channels not divisible by groups")
        let od = (d + 2 * padding - k) / stride + 1
        let oh = (h + 2 * padding - k) / stride + 1
        let ow = (w + 2 * padding - k) / stride + 1
        let cinG = cin / groups, coutG = cout / groups
        precondition(x.count == n * d * h * w * cin && weight.count == cout * cinG * k * k * k)
        var y = [T](repeating: 0, count: n * od * oh * ow * cout)
        for b in 0..<n {
            for zd in 0..<od {
                for zh in 0..<oh {
                    for zw in 0..<ow {
                        let out = (((b * od + zd) * oh + zh) * ow + zw) * cout
                        for co in 0..<cout {
                            let g = co / coutG
                            var acc: T = bias?[co] ?? 0
                            for cl in 0..<cinG {
                                let ci = g * cinG + cl
                                for kd in 0..<k {
                                    let id = zd * stride - padding + kd
                                    if id < 0 || id >= d { continue }
                                    for kh in 0..<k {
                                        let ih = zh * stride - padding + kh
                                        if ih < 0 || ih >= h { continue }
                                        for kw in 0..<k {
                                            let iw = zw * stride - padding + kw
                                            if iw < 0 || iw >= w { continue }
                                            let xv = x[(((b * d + id) * h + ih) * w + iw) * cin + ci]
                                            let wv = weight[(((co * cinG + cl) * k + kd) * k + kh) * k + kw]
                                            acc += xv * wv
                                        }
                                    }
                                }
                            }
                            y[out + co] = acc
                        }
                    }
                }
            }
        }
        return y
    }

    /// The gradients of `conv3d` for an output gradient gradY (N x Do x Ho x Wo x Cout):
    /// dL/dx (N x D x H x W x Cin), dL/dW (Cout x Cin/groups x k x k x k), dL/db (Cout).
    public static func conv3dBackward<T: BinaryFloatingPoint>(
        x: [T], n: Int, cin: Int, d: Int, h: Int, w: Int,
        weight: [T], gradY: [T], cout: Int, kernel k: Int, stride: Int = 1, padding: Int = 0, groups: Int = 1
    ) -> (gradX: [T], gradWeight: [T], gradBias: [T]) {
        precondition(cin % groups == 0 && cout % groups == 0, "conv3d backward reference: channels not divisible by groups")
        let cinG = cin / groups, coutG = cout / groups
        let od = (d + 2 * padding - k) / stride + 1
        let oh = (h + 2 * padding - k) / stride + 1
        let ow = (w + 2 * padding - k) / stride + 1
        precondition(x.count == n * d * h * w * cin && weight.count == cout * cinG * k * k * k)
        precondition(gradY.count == n * od * oh * ow * cout)
        var gx = [T](repeating: 0, count: x.count)
        var gw = [T](repeating: 0, count: weight.count)
        var gb = [T](repeating: 0, count: cout)
        for b in 0..<n {
            for zd in 0..<od {
                for zh in 0..<oh {
                    for zw in 0..<ow {
                        let out: Int = (((b * od + zd) * oh + zh) * ow + zw) * cout
                        for co in 0..<cout {
                            let g = gradY[out + co]
                            gb[co] += g
                            let group = co / coutG
                            for cl in 0..<cinG {
                                let ci = group * cinG + cl
                                for kd in 0..<k {
                                    let id = zd * stride - padding + kd
                                    if id < 0 || id >= d { continue }
                                    for kh in 0..<k {
                                        let ih = zh * stride - padding + kh
                                        if ih < 0 || ih >= h { continue }
                                        for kw in 0..<k {
                                            let iw = zw * stride - padding + kw
                                            if iw < 0 || iw >= w { continue }
                                            let xi: Int = (((b * d + id) * h + ih) * w + iw) * cin + ci
                                            let wi: Int = (((co * cinG + cl) * k + kd) * k + kh) * k + kw
                                            gx[xi] += g * weight[wi]
                                            gw[wi] += g * x[xi]
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        return (gx, gw, gb)
    }

    /// y = conv_transpose3d(x, weight, bias) (PyTorch ConvTranspose3d, output_padding 0, dilation 1).
    /// x is N x D x H x W x Cin; returns N x Do x Ho x Wo x Cout with Do = (D - 1) stride - 2 padding + k.
    public static func convTranspose3d<T: BinaryFloatingPoint>(
        x: [T], n: Int, cin: Int, d: Int, h: Int, w: Int,
        weight: [T], bias: [T]?, cout: Int, kernel k: Int, stride: Int, padding: Int = 0, groups: Int = 1
    ) -> [T] {
        precondition(cin % groups == 0 && cout % groups == 0, "conv_transpose3d reference: channels not divisible by groups")
        let od = (d - 1) * stride - 2 * padding + k
        let oh = (h - 1) * stride - 2 * padding + k
        let ow = (w - 1) * stride - 2 * padding + k
        let cinG = cin / groups, coutG = cout / groups
        precondition(x.count == n * d * h * w * cin && weight.count == cin * coutG * k * k * k)
        var y = [T](repeating: 0, count: n * od * oh * ow * cout)
        if let bias {
            for v in 0..<(n * od * oh * ow) {
                for co in 0..<cout { y[v * cout + co] = bias[co] }
            }
        }
        // Every input voxel scatters weight * x into the output window it covers.
        for b in 0..<n {
            for id in 0..<d {
                for ih in 0..<h {
                    for iw in 0..<w {
                        for ci in 0..<cin {
                            let xv = x[(((b * d + id) * h + ih) * w + iw) * cin + ci]
                            let g = ci / cinG
                            for kd in 0..<k {
                                let zd = id * stride - padding + kd
                                if zd < 0 || zd >= od { continue }
                                for kh in 0..<k {
                                    let zh = ih * stride - padding + kh
                                    if zh < 0 || zh >= oh { continue }
                                    for kw in 0..<k {
                                        let zw = iw * stride - padding + kw
                                        if zw < 0 || zw >= ow { continue }
                                        let outVoxel: Int = ((b * od + zd) * oh + zh) * ow + zw
                                        for cl in 0..<coutG {
                                            let co: Int = g * coutG + cl
                                            let wi: Int = (((ci * coutG + cl) * k + kd) * k + kh) * k + kw
                                            let wv: T = weight[wi]
                                            y[outVoxel * cout + co] += xv * wv
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        return y
    }

    /// The gradients of `convTranspose3d` (groups 1) for an output gradient gradY:
    /// dL/dx (N x D x H x W x Cin), dL/dW (Cin x Cout x k x k x k), dL/db (Cout).
    public static func convTranspose3dBackward<T: BinaryFloatingPoint>(
        x: [T], n: Int, cin: Int, d: Int, h: Int, w: Int,
        weight: [T], gradY: [T], cout: Int, kernel k: Int, stride: Int, padding: Int = 0
    ) -> (gradX: [T], gradWeight: [T], gradBias: [T]) {
        let od = (d - 1) * stride - 2 * padding + k
        let oh = (h - 1) * stride - 2 * padding + k
        let ow = (w - 1) * stride - 2 * padding + k
        precondition(x.count == n * d * h * w * cin && weight.count == cin * cout * k * k * k)
        precondition(gradY.count == n * od * oh * ow * cout)
        var gx = [T](repeating: 0, count: x.count)
        var gw = [T](repeating: 0, count: weight.count)
        var gb = [T](repeating: 0, count: cout)
        for v in 0..<(n * od * oh * ow) {
            for co in 0..<cout { gb[co] += gradY[v * cout + co] }
        }
        for b in 0..<n {
            for id in 0..<d {
                for ih in 0..<h {
                    for iw in 0..<w {
                        for ci in 0..<cin {
                            let xi: Int = (((b * d + id) * h + ih) * w + iw) * cin + ci
                            for kd in 0..<k {
                                let zd = id * stride - padding + kd
                                if zd < 0 || zd >= od { continue }
                                for kh in 0..<k {
                                    let zh = ih * stride - padding + kh
                                    if zh < 0 || zh >= oh { continue }
                                    for kw in 0..<k {
                                        let zw = iw * stride - padding + kw
                                        if zw < 0 || zw >= ow { continue }
                                        let outVoxel: Int = ((b * od + zd) * oh + zh) * ow + zw
                                        for co in 0..<cout {
                                            let wi: Int = (((ci * cout + co) * k + kd) * k + kh) * k + kw
                                            let g: T = gradY[outVoxel * cout + co]
                                            gx[xi] += g * weight[wi]
                                            gw[wi] += g * x[xi]
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        return (gx, gw, gb)
    }

    /// N x C x D x H x W (PyTorch) to N x D x H x W x C.
    public static func toChannelsLast<T>(_ a: [T], n: Int, c: Int, voxels: Int) -> [T] {
        precondition(a.count == n * c * voxels)
        var out = a
        for b in 0..<n {
            for ch in 0..<c {
                for v in 0..<voxels { out[(b * voxels + v) * c + ch] = a[(b * c + ch) * voxels + v] }
            }
        }
        return out
    }

    /// N x D x H x W x C to N x C x D x H x W (PyTorch).
    public static func toChannelsFirst<T>(_ a: [T], n: Int, c: Int, voxels: Int) -> [T] {
        precondition(a.count == n * c * voxels)
        var out = a
        for b in 0..<n {
            for ch in 0..<c {
                for v in 0..<voxels { out[(b * c + ch) * voxels + v] = a[(b * voxels + v) * c + ch] }
            }
        }
        return out
    }
}
