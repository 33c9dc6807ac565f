/// How the DDC's offset branch lines its offsets up with the voxels (ARCHITECTURE.md section 3).
public enum OffsetMode: String, Sendable, CaseIterable, Codable {
    /// The 1x1x1 offset conv has padding 0: voxel o uses the offsets computed at o. The default.
    case aligned
    /// The released code's offset conv kept padding 1: it outputs N x 81 x (D+2) x (H+2) x (W+2), and
    /// the kernel reads that buffer's first N*81*D*H*W values as if it were N x 81 x D x H x W.
    /// Checkpoints trained with the released code need this mode.
    case official
}

/// The DDC layer as pure functions of buffers: offsets = conv_offset(x) (1x1x1, C -> 81, with bias),
/// then y = DeformConv3d(x, offsets, weight, bias).
///
///     x, y           N x C x D x H x W, or N x D x H x W x C with layout .channelsLast
///     weight         C x 1 x 3 x 3 x 3     bias C
///     offsetWeight   81 x C x 1 x 1 x 1    offsetBias 81
public enum DDCLayerOps {
    /// Writes y, and the offsets the kernel used (N x 81 x D x H x W) to `offsetsOut` if given.
    public static func forward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
                               offsetWeight: UnsafePointer<Float>, offsetBias: UnsafePointer<Float>,
                               mode: OffsetMode, y: UnsafeMutablePointer<Float>,
                               offsetsOut: UnsafeMutablePointer<Float>?, shape: DDCShape,
                               layout: Layout = .channelsFirst, heldAxis: Int? = nil,
                               workspace: Workspace) throws {
        let offsets = try computeOffsets(x: x, offsetWeight: offsetWeight, offsetBias: offsetBias,
                                         mode: mode, shape: shape, layout: layout, workspace: workspace)
        if let heldAxis { holdAxis(heldAxis, of: offsets, shape: shape) }
        try DeformConv3d.forward(x: x, offsets: offsets, weight: weight, bias: bias, y: y,
                                 shape: shape, layout: layout, workspace: workspace)
        offsetsOut?.update(from: offsets, count: shape.offsetCount)
    }

    /// Adds the gradients with respect to x and the four parameters (any may be nil), the offset
    /// branch included. Recomputes the offsets from x.
    public static func backward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>,
                                offsetWeight: UnsafePointer<Float>, offsetBias: UnsafePointer<Float>,
                                mode: OffsetMode, gradY: UnsafePointer<Float>,
                                gradX: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>?,
                                gradBias: UnsafeMutablePointer<Float>?,
                                gradOffsetWeight: UnsafeMutablePointer<Float>?,
                                gradOffsetBias: UnsafeMutablePointer<Float>?,
                                shape: DDCShape, layout: Layout = .channelsFirst, heldAxis: Int? = nil,
                                workspace: Workspace) throws {
        let offsets = try computeOffsets(x: x, offsetWeight: offsetWeight, offsetBias: offsetBias,
                                         mode: mode, shape: shape, layout: layout, workspace: workspace)
        if let heldAxis { holdAxis(heldAxis, of: offsets, shape: shape) }
        let needOffsetGrad = gradX != nil || gradOffsetWeight != nil || gradOffsetBias != nil
        let gradOffsets: UnsafeMutablePointer<Float>? = needOffsetGrad
            ? try workspace.buffer("ddc.gradOffsets", count: shape.offsetCount) : nil
        gradOffsets?.initialize(repeating: 0, count: shape.offsetCount)
        try DeformConv3d.backward(x: x, offsets: offsets, weight: weight, gradY: gradY,
                                  gradX: gradX, gradOffsets: gradOffsets, gradWeight: gradWeight,
                                  gradBias: gradBias, shape: shape, layout: layout, workspace: workspace)
        guard let gradOffsets else { return }
        // A held axis's offsets are constants: nothing flows back through them.
        if let heldAxis { holdAxis(heldAxis, of: gradOffsets, shape: shape) }

        // Through the offset branch: grad of the 1x1x1 conv's own output (aligned: N x 81 x V).
        let pw = Pointwise.Shape(n: shape.n, cin: shape.c, cout: DDCShape.offsetChannels, voxels: shape.voxels,
                                 xLayout: layout, yLayout: .channelsFirst)
        switch mode {
        case .aligned:
            try Pointwise.backward(x: x, weight: offsetWeight, gradY: gradOffsets, gradX: gradX,
                                   gradWeight: gradOffsetWeight, gradBias: gradOffsetBias, shape: pw,
                                   workspace: workspace)
        case .official:
            // The kernel read the first N*81*V values of the padded output P, so P's gradient is
            // gradOffsets there and 0 beyond. Every position of P carries the bias; only interior
            // positions see x.
            let g = OfficialGeometry(shape)
            let gradPadded = try workspace.buffer("ddc.gradOffsetsPadded", count: g.paddedCount)
            gradPadded.update(from: gradOffsets, count: shape.offsetCount)
            (gradPadded + shape.offsetCount).initialize(repeating: 0, count: g.paddedCount - shape.offsetCount)
            if let gradOffsetBias {
                for o in 0..<DDCShape.offsetChannels {
                    var acc: Double = 0
                    for n in 0..<shape.n {
                        let plane = gradPadded + (n * DDCShape.offsetChannels + o) * g.paddedVoxels
                        for i in 0..<g.paddedVoxels { acc += Double(plane[i]) }
                    }
                    gradOffsetBias[o] += Float(acc)
                }
            }
            // The interior of P's gradient is the aligned conv's output gradient.
            let interior = gradOffsets  // reuse: gradOffsets is no longer needed
            g.copyInterior(from: gradPadded, to: interior)
            try Pointwise.backward(x: x, weight: offsetWeight, gradY: interior, gradX: gradX,
                                   gradWeight: gradOffsetWeight, gradBias: nil, shape: pw,
                                   workspace: workspace)
        }
    }

    /// Zeroes the offset channels 3t + axis of every tap (the single-plane ablations of Table 3).
    static func holdAxis(_ axis: Int, of field: UnsafeMutablePointer<Float>, shape: DDCShape) {
        for n in 0..<shape.n {
            for t in 0..<DDCShape.taps {
                let plane = field + (n * DDCShape.offsetChannels + 3 * t + axis) * shape.voxels
                plane.initialize(repeating: 0, count: shape.voxels)
            }
        }
    }

    /// The offsets the kernel reads: a workspace buffer whose first N*81*V values are the field.
    /// `offsetKernel` 3 is the Table 3 ablation: a 3x3x3 offset conv (padding 1, aligned mode,
    /// channels-last x; forward only).
    static func computeOffsets(x: UnsafePointer<Float>, offsetWeight: UnsafePointer<Float>,
                               offsetBias: UnsafePointer<Float>, mode: OffsetMode, shape: DDCShape,
                               layout: Layout, offsetKernel: Int = 1,
                               workspace: Workspace) throws -> UnsafeMutablePointer<Float> {
        let aligned = try workspace.buffer("ddc.offsets", count: shape.offsetCount)
        if offsetKernel == 3 {
            guard mode == .aligned, layout == .channelsLast else {
                throw DeformUXError.invalidArgument("DDC layer", "a 3x3x3 offset branch needs aligned offsets and channels-last input")
            }
            let cs = try Conv3d.Shape(n: shape.n, cin: shape.c, cout: DDCShape.offsetChannels, d: shape.d, h: shape.h,
                                      w: shape.w, kernel: 3, padding: 1)
            let packed = try workspace.buffer("ddc.offsetWeightPacked", count: Conv3d.packedCount(cs))
            Conv3d.pack(weight: offsetWeight, into: packed, shape: cs)
            let channelsLast = try workspace.buffer("ddc.offsetsChannelsLast", count: shape.offsetCount)
            try Conv3d.forward(x: x, packedWeight: packed, bias: offsetBias, y: channelsLast, shape: cs, workspace: workspace)
            for n in 0..<shape.n {
                let src = channelsLast + n * shape.offsetCount / shape.n, dst = aligned + n * shape.offsetCount / shape.n
                for v in 0..<shape.voxels {
                    for o in 0..<DDCShape.offsetChannels { dst[o * shape.voxels + v] = src[v * DDCShape.offsetChannels + o] }
                }
            }
            return aligned
        }
        let pw = Pointwise.Shape(n: shape.n, cin: shape.c, cout: DDCShape.offsetChannels, voxels: shape.voxels,
                                 xLayout: layout, yLayout: .channelsFirst)
        Pointwise.forward(x: x, weight: offsetWeight, bias: offsetBias, y: aligned, shape: pw)
        if mode == .aligned { return aligned }
        let g = OfficialGeometry(shape)
        let padded = try workspace.buffer("ddc.offsetsPadded", count: g.paddedCount)
        g.fillPadded(interior: aligned, bias: offsetBias, into: padded)
        return padded
    }

    /// The padded N x 81 x (D+2) x (H+2) x (W+2) output of the official offset conv.
    struct OfficialGeometry {
        let s: DDCShape
        let hp: Int, wp: Int, paddedVoxels: Int
        var paddedCount: Int { s.n * DDCShape.offsetChannels * paddedVoxels }

        init(_ s: DDCShape) {
            self.s = s
            hp = s.h + 2; wp = s.w + 2
            paddedVoxels = (s.d + 2) * hp * wp
        }

        /// P[n][o] = bias[o] on the border, interior[n][o][v] inside.
        func fillPadded(interior: UnsafePointer<Float>, bias: UnsafePointer<Float>, into p: UnsafeMutablePointer<Float>) {
            for n in 0..<s.n {
                for o in 0..<DDCShape.offsetChannels {
                    let plane = p + (n * DDCShape.offsetChannels + o) * paddedVoxels
                    plane.initialize(repeating: bias[o], count: paddedVoxels)
                    let src = interior + (n * DDCShape.offsetChannels + o) * s.voxels
                    for d in 0..<s.d {
                        for h in 0..<s.h {
                            (plane + ((d + 1) * hp + h + 1) * wp + 1).update(from: src + (d * s.h + h) * s.w, count: s.w)
                        }
                    }
                }
            }
        }

        /// interior[n][o][v] = P[n][o][padded(v)].
        func copyInterior(from p: UnsafePointer<Float>, to interior: UnsafeMutablePointer<Float>) {
            for n in 0..<s.n {
                for o in 0..<DDCShape.offsetChannels {
                    let plane = p + (n * DDCShape.offsetChannels + o) * paddedVoxels
                    let dst = interior + (n * DDCShape.offsetChannels + o) * s.voxels
                    for d in 0..<s.d {
                        for h in 0..<s.h {
                            (dst + (d * s.h + h) * s.w).update(from: plane + ((d + 1) * hp + h + 1) * wp + 1, count: s.w)
                        }
                    }
                }
            }
        }
    }
}

/// DeformUX-Net's depthwise deformable 3x3x3 convolution layer (`ddc` in the state dict): a depthwise
/// 3x3x3 deformable conv whose offsets come from a parallel 1x1x1 conv of the input (`conv_offset`,
/// initialised to zero, so a fresh layer is a plain depthwise 3x3x3 conv).
///
/// Parameter names under `prefix`: `weight` (C,1,3,3,3), `bias` (C), `conv_offset.weight` (81,C,1,1,1),
/// `conv_offset.bias` (81).
public final class DeformableDepthwiseConv3d {
    public let channels: Int
    public let offsetMode: OffsetMode
    public let weight: ParameterRef, bias: ParameterRef
    public let offsetWeight: ParameterRef, offsetBias: ParameterRef
    let workspace = Workspace()
    /// Memory for the outputs, reused from call to call.
    let pool = StoragePool()

    /// Adds the layer's parameters to `layout` under `prefix` (e.g. "stages.0.0.ddc.").
    public init(channels: Int, offsetMode: OffsetMode = .aligned, prefix: String = "",
                layout: inout ParameterLayout) throws {
        guard channels >= 1 else {
            throw DeformUXError.invalidArgument("DDC layer", "channels must be >= 1, got \(channels)")
        }
        self.channels = channels
        self.offsetMode = offsetMode
        weight = try layout.add(prefix + "weight", shape: [channels, 1, 3, 3, 3])
        bias = try layout.add(prefix + "bias", shape: [channels])
        offsetWeight = try layout.add(prefix + "conv_offset.weight", shape: [DDCShape.offsetChannels, channels, 1, 1, 1])
        offsetBias = try layout.add(prefix + "conv_offset.bias", shape: [DDCShape.offsetChannels])
    }

    /// PyTorch's default Conv3d initialisation (uniform +-1/sqrt(fan_in), fan_in = 27 for a
    /// depthwise 3x3x3) for the DDC weight and bias; the offset branch starts at zero.
    public func initialize(_ store: ParameterStore, rng: inout SplitMix64) {
        let bound = 1 / Float(27).squareRoot()
        let w = store.value(weight), b = store.value(bias)
        for i in 0..<(channels * 27) { w[i] = rng.uniform(-bound, bound) }
        for i in 0..<channels { b[i] = rng.uniform(-bound, bound) }
        store.value(offsetWeight).initialize(repeating: 0, count: DDCShape.offsetChannels * channels)
        store.value(offsetBias).initialize(repeating: 0, count: DDCShape.offsetChannels)
    }

    func shape(of x: Tensor) throws -> DDCShape {
        guard x.rank == 5, x.shape[1] == channels else {
            throw DeformUXError.shapeMismatch("DDC layer", "expected x of shape N x \(channels) x D x H x W, got \(x.shape)")
        }
        try x.requireContiguous("DDC layer x")
        return try DDCShape(n: x.shape[0], c: x.shape[1], d: x.shape[2], h: x.shape[3], w: x.shape[4])
    }

    public func forward(_ x: Tensor, parameters p: ParameterStore) throws -> Tensor {
        let s = try shape(of: x)
        let y = try Tensor(uninitialized: x.shape, pool: pool)
        try DDCLayerOps.forward(x: x.pointer, weight: p.value(weight), bias: p.value(bias),
                                offsetWeight: p.value(offsetWeight), offsetBias: p.value(offsetBias),
                                mode: offsetMode, y: y.pointer, offsetsOut: nil, shape: s, workspace: workspace)
        return y
    }

    /// Adds the parameter gradients into `p.gradients()` and returns the gradient with respect to x.
    public func backward(_ x: Tensor, gradY: Tensor, parameters p: ParameterStore) throws -> Tensor {
        let s = try shape(of: x)
        guard gradY.shape == x.shape else {
            throw DeformUXError.shapeMismatch("DDC layer", "grad_output must have the shape of x \(x.shape), got \(gradY.shape)")
        }
        try gradY.requireContiguous("DDC layer grad_output")
        let gx = Tensor(shape: x.shape, strides: Tensor.contiguousStrides(x.shape),
                        storage: try TensorStorage(count: x.count, zeroed: true, pool: pool), offset: 0)
        try DDCLayerOps.backward(x: x.pointer, weight: p.value(weight), offsetWeight: p.value(offsetWeight),
                                 offsetBias: p.value(offsetBias), mode: offsetMode, gradY: gradY.pointer,
                                 gradX: gx.pointer, gradWeight: try p.gradient(weight), gradBias: try p.gradient(bias),
                                 gradOffsetWeight: try p.gradient(offsetWeight), gradOffsetBias: try p.gradient(offsetBias),
                                 shape: s, workspace: workspace)
        return gx
    }
}
