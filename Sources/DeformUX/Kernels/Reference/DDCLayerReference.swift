/// The DDC layer (ARCHITECTURE.md section 3) as plain loops: the offset branch, a 1x1x1 conv C -> 81
/// with bias, composed with `DeformConv3dReference`. The test oracle for `DDCLayerOps`.
///
///     x              N x C x D x H x W
///     offsetWeight   81 x C             (81 x C x 1 x 1 x 1)
///     offsetBias     81
///     offsets        N x 81 x D x H x W (what the deformable kernel reads)
///
/// `aligned`:  offsets[n, o, v] = sum_c W[o, c] * x[n, c, v] + b[o].
/// `official`: the released code's offset conv kept padding 1, so it produced
///             P = N x 81 x (D+2) x (H+2) x (W+2), with P = b on the border (the input is zero-padded)
///             and the aligned values inside; the kernel reads P's first N*81*D*H*W values (flat, C
///             order) as if they were N x 81 x D x H x W. This file builds P explicitly.
public enum DDCLayerReference {
    /// The offset field the deformable kernel reads.
    public static func offsets<T: BinaryFloatingPoint>(x: [T], offsetWeight: [T], offsetBias: [T],
                                                       mode: OffsetMode, shape: DDCShape) -> [T] {
        let oc = DDCShape.offsetChannels
        precondition(x.count == shape.count && offsetWeight.count == oc * shape.c && offsetBias.count == oc)
        var aligned = [T](repeating: 0, count: shape.offsetCount)
        for n in 0..<shape.n {
            for o in 0..<oc {
                for v in 0..<shape.voxels {
                    var acc = offsetBias[o]
                    for c in 0..<shape.c {
                        acc += offsetWeight[o * shape.c + c] * x[(n * shape.c + c) * shape.voxels + v]
                    }
                    aligned[(n * oc + o) * shape.voxels + v] = acc
                }
            }
        }
        switch mode {
        case .aligned:
            return aligned
        case .official:
            let padded = padOfficial(aligned, offsetBias: offsetBias, shape: shape)
            return Array(padded[0..<shape.offsetCount])
        }
    }

    /// Gradients of `offsets` with respect to x, W and b, given the gradient of the offset field.
    public static func offsetsBackward<T: BinaryFloatingPoint>(x: [T], offsetWeight: [T], gradOffsets: [T],
                                                               mode: OffsetMode, shape: DDCShape)
        -> (gradX: [T], gradOffsetWeight: [T], gradOffsetBias: [T]) {
        let oc = DDCShape.offsetChannels
        precondition(gradOffsets.count == shape.offsetCount)
        // The gradient of the aligned conv output (N x 81 x V), and of the bias.
        var gAligned: [T]
        var gb = [T](repeating: 0, count: oc)
        switch mode {
        case .aligned:
            gAligned = gradOffsets
            for n in 0..<shape.n {
                for o in 0..<oc {
                    for v in 0..<shape.voxels { gb[o] += gradOffsets[(n * oc + o) * shape.voxels + v] }
                }
            }
        case .official:
            // P's gradient: gradOffsets on its first N*81*V values, 0 beyond. Every position of P
            // holds b, only the interior holds W x.
            let (dp, hp, wp) = (shape.d + 2, shape.h + 2, shape.w + 2)
            let pv = dp * hp * wp
            var gP = [T](repeating: 0, count: shape.n * oc * pv)
            for i in 0..<shape.offsetCount { gP[i] = gradOffsets[i] }
            gAligned = [T](repeating: 0, count: shape.offsetCount)
            for n in 0..<shape.n {
                for o in 0..<oc {
                    for d in 0..<dp {
                        for h in 0..<hp {
                            for w in 0..<wp {
                                let g = gP[(n * oc + o) * pv + (d * hp + h) * wp + w]
                                gb[o] += g
                                if d >= 1, d <= shape.d, h >= 1, h <= shape.h, w >= 1, w <= shape.w {
                                    let v = ((d - 1) * shape.h + (h - 1)) * shape.w + (w - 1)
                                    gAligned[(n * oc + o) * shape.voxels + v] = g
                                }
                            }
                        }
                    }
                }
            }
        }
        var gx = [T](repeating: 0, count: shape.count)
        var gw = [T](repeating: 0, count: oc * shape.c)
        for n in 0..<shape.n {
            for o in 0..<oc {
                for v in 0..<shape.voxels {
                    let g = gAligned[(n * oc + o) * shape.voxels + v]
                    for c in 0..<shape.c {
                        let xi = (n * shape.c + c) * shape.voxels + v
                        gw[o * shape.c + c] += g * x[xi]
                        gx[xi] += g * offsetWeight[o * shape.c + c]
                    }
                }
            }
        }
        return (gx, gw, gb)
    }

    /// Zeroes offset channels 3t + axis of every tap and sample: the single-plane ablations of the
    /// paper's Table 3 hold the third axis's offsets at zero (axis 0 D, 1 H, 2 W).
    public static func hold<T: BinaryFloatingPoint>(axis: Int, of field: [T], shape: DDCShape) -> [T] {
        var f = field
        for n in 0..<shape.n {
            for t in 0..<DDCShape.taps {
                for v in 0..<shape.voxels { f[(n * DDCShape.offsetChannels + 3 * t + axis) * shape.voxels + v] = 0 }
            }
        }
        return f
    }

    /// y = DDC(x, offsets(x), weight, bias); also returns the offsets (with `heldAxis` held at zero).
    public static func forward<T: BinaryFloatingPoint>(x: [T], weight: [T], bias: [T]?, offsetWeight: [T],
                                                       offsetBias: [T], mode: OffsetMode, heldAxis: Int? = nil,
                                                       shape: DDCShape) -> (y: [T], offsets: [T]) {
        var off = offsets(x: x, offsetWeight: offsetWeight, offsetBias: offsetBias, mode: mode, shape: shape)
        if let heldAxis { off = hold(axis: heldAxis, of: off, shape: shape) }
        let y = DeformConv3dReference.forward(x: x, offsets: off, weight: weight, bias: bias, shape: shape)
        return (y, off)
    }

    /// The gradients of `forward` with respect to x (both paths: the deformable sampling and the
    /// offset branch) and the four parameters.
    public static func backward<T: BinaryFloatingPoint>(x: [T], weight: [T], offsetWeight: [T], offsetBias: [T],
                                                        mode: OffsetMode, heldAxis: Int? = nil, gradY: [T],
                                                        shape: DDCShape)
        -> (gradX: [T], gradWeight: [T], gradBias: [T], gradOffsetWeight: [T], gradOffsetBias: [T]) {
        var off = offsets(x: x, offsetWeight: offsetWeight, offsetBias: offsetBias, mode: mode, shape: shape)
        if let heldAxis { off = hold(axis: heldAxis, of: off, shape: shape) }
        let k = DeformConv3dReference.backward(x: x, offsets: off, weight: weight, gradY: gradY, shape: shape)
        // Held offsets are constants: nothing flows back through them.
        let gOff = heldAxis.map { hold(axis: $0, of: k.gradOffsets, shape: shape) } ?? k.gradOffsets
        let b = offsetsBackward(x: x, offsetWeight: offsetWeight, gradOffsets: gOff, mode: mode, shape: shape)
        var gx = k.gradX
        for i in 0..<gx.count { gx[i] += b.gradX[i] }
        return (gx, k.gradWeight, k.gradBias, b.gradOffsetWeight, b.gradOffsetBias)
    }

    /// P for the official mode: bias on the border, the aligned values inside.
    static func padOfficial<T: BinaryFloatingPoint>(_ aligned: [T], offsetBias: [T], shape: DDCShape) -> [T] {
        let oc = DDCShape.offsetChannels
        let (dp, hp, wp) = (shape.d + 2, shape.h + 2, shape.w + 2)
        let pv = dp * hp * wp
        var p = [T](repeating: 0, count: shape.n * oc * pv)
        for n in 0..<shape.n {
            for o in 0..<oc {
                for d in 0..<dp {
                    for h in 0..<hp {
                        for w in 0..<wp {
                            let inside = d >= 1 && d <= shape.d && h >= 1 && h <= shape.h && w >= 1 && w <= shape.w
                            p[(n * oc + o) * pv + (d * hp + h) * wp + w] = inside
                                ? aligned[(n * oc + o) * shape.voxels + ((d - 1) * shape.h + (h - 1)) * shape.w + (w - 1)]
                                : offsetBias[o]
                        }
                    }
                }
            }
        }
        return p
    }
}
