/// How the DDC's offset branch lines its offsets up with the voxels (ARCHITECTURE.md section 3).
public enum OffsetMode: String, Sendable, CaseIterable, Codable {
    /// The 1x1x1 offset conv has padding 0: voxel o uses the offsets computed at o. The default.
    case aligned
    /// The released code's offset conv kept padding 1: it outputs N x 81 x (D+2) x (H+2) x (W+2), and
    /// the kernel reads that buffer's first N*81*D*H*W values as if it were N x 81 x D x H x W.
    /// Checkpoints trained with the released code need this mode.
    case official
}

/// The DDC's offset branch: the 1x1x1 conv of the paper (PyTorch weight 81 x C x 1 x 1 x 1, the
/// `aligned` and `official` modes), or the 3x3x3 conv of the Table 3 ablation (aligned, channels-last
/// x, weight packed for `Conv3d`).
public enum OffsetBranch {
    case pointwise(weight: UnsafePointer<Float>, bias: UnsafePointer<Float>)
    case conv3(packedWeight: UnsafePointer<Float>, bias: UnsafePointer<Float>)
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
        let offsets = try computeOffsets(x: x, branch: .pointwise(weight: offsetWeight, bias: offsetBias),
                                         mode: mode, shape: shape, layout: layout, heldAxis: heldAxis, workspace: workspace)
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
        let branch = OffsetBranch.pointwise(weight: offsetWeight, bias: offsetBias)
        let offsets = try computeOffsets(x: x, branch: branch, mode: mode, shape: shape, layout: layout,
                                         heldAxis: heldAxis, workspace: workspace)
        let gradOffsets = try offsetGradientBuffer(shape, gradX: gradX, gradOffsetWeight: gradOffsetWeight,
                                                   gradOffsetBias: gradOffsetBias, workspace: workspace)
        try DeformConv3d.backward(x: x, offsets: offsets, weight: weight, gradY: gradY,
                                  gradX: gradX, gradOffsets: gradOffsets, gradWeight: gradWeight,
                                  gradBias: gradBias, shape: shape, layout: layout, workspace: workspace)
        guard let gradOffsets else { return }
        try offsetBranchBackward(x: x, branch: branch, mode: mode, gradOffsets: gradOffsets, gradX: gradX,
                                 gradOffsetWeight: gradOffsetWeight, gradOffsetBias: gradOffsetBias,
                                 shape: shape, layout: layout, heldAxis: heldAxis, workspace: workspace)
    }

    /// A zeroed N x 81 x V buffer for the offsets' gradient, or nil when nothing flows through them.
    static func offsetGradientBuffer(_ shape: DDCShape, gradX: UnsafeMutablePointer<Float>?,
                                     gradOffsetWeight: UnsafeMutablePointer<Float>?,
                                     gradOffsetBias: UnsafeMutablePointer<Float>?,
                                     workspace: Workspace) throws -> UnsafeMutablePointer<Float>? {
        guard gradX != nil || gradOffsetWeight != nil || gradOffsetBias != nil else { return nil }
        let g = try workspace.buffer("ddc.gradOffsets", count: shape.offsetCount)
        g.initialize(repeating: 0, count: shape.offsetCount)
        return g
    }

    /// Pushes the offsets' gradient (N x 81 x V, as the kernel read them) back through the offset branch:
    /// gradX += its input gradient, gradOffsetWeight/Bias += its parameter gradients (PyTorch layout).
    /// `gradOffsets` is used as scratch.
    static func offsetBranchBackward(x: UnsafePointer<Float>, branch: OffsetBranch, mode: OffsetMode,
                                     gradOffsets: UnsafeMutablePointer<Float>, gradX: UnsafeMutablePointer<Float>?,
                                     gradOffsetWeight: UnsafeMutablePointer<Float>?,
                                     gradOffsetBias: UnsafeMutablePointer<Float>?,
                                     shape: DDCShape, layout: Layout, heldAxis: Int?, workspace: Workspace) throws {
        // A held axis's offsets are constants: nothing flows back through them.
        if let heldAxis { holdAxis(heldAxis, of: gradOffsets, shape: shape) }
        switch branch {
        case .conv3(let packed, _):
            guard mode == .aligned, layout == .channelsLast else {
                throw DeformUXError.invalidArgument("DDC layer", "a 3x3x3 offset branch needs aligned offsets and channels-last input")
            }
            let cs = try Conv3d.Shape(n: shape.n, cin: shape.c, cout: DDCShape.offsetChannels, d: shape.d, h: shape.h,
                                      w: shape.w, kernel: 3, padding: 1)
            let channelsLast = try workspace.buffer("ddc.offsetsChannelsLast", count: shape.offsetCount)
            transposeOffsets(gradOffsets, toChannelsLast: channelsLast, shape: shape)
            try Conv3d.backward(x: x, packedWeight: packed, gradY: channelsLast, gradX: gradX, gradWeight: gradOffsetWeight,
                                gradBias: gradOffsetBias, shape: cs, workspace: workspace)
        case .pointwise(let offsetWeight, _):
            // Through the 1x1x1 conv: grad of its own output (aligned: N x 81 x V).
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

    /// N x 81 x V -> N x V x 81.
    static func transposeOffsets(_ src: UnsafePointer<Float>, toChannelsLast dst: UnsafeMutablePointer<Float>,
                                 shape: DDCShape) {
        let per = shape.offsetCount / shape.n
        for n in 0..<shape.n {
            let s = src + n * per, d = dst + n * per
            for o in 0..<DDCShape.offsetChannels {
                for v in 0..<shape.voxels { d[v * DDCShape.offsetChannels + o] = s[o * shape.voxels + v] }
            }
        }
    }

    /// The offsets the kernel reads: a workspace buffer whose first N*81*V values are the field (a
    /// held axis already zeroed).
    static func computeOffsets(x: UnsafePointer<Float>, branch: OffsetBranch, mode: OffsetMode, shape: DDCShape,
                               layout: Layout, heldAxis: Int?, workspace: Workspace) throws -> UnsafeMutablePointer<Float> {
        let aligned = try workspace.buffer("ddc.offsets", count: shape.offsetCount)
        var field = aligned
        switch branch {
        case .conv3(let packed, let bias):
            guard mode == .aligned, layout == .channelsLast else {
                throw DeformUXError.invalidArgument("DDC layer", "a 3x3x3 offset branch needs aligned offsets and channels-last input")
            }
            let cs = try Conv3d.Shape(n: shape.n, cin: shape.c, cout: DDCShape.offsetChannels, d: shape.d, h: shape.h,
                                      w: shape.w, kernel: 3, padding: 1)
            let channelsLast = try workspace.buffer("ddc.offsetsChannelsLast", count: shape.offsetCount)
            try Conv3d.forward(x: x, packedWeight: packed, bias: bias, y: channelsLast, shape: cs, workspace: workspace)
            let per = shape.offsetCount / shape.n
            for n in 0..<shape.n {
                let src = channelsLast + n * per, dst = aligned + n * per
                for v in 0..<shape.voxels {
                    for o in 0..<DDCShape.offsetChannels { dst[o * shape.voxels + v] = src[v * DDCShape.offsetChannels + o] }
                }
            }
        case .pointwise(let weight, let bias):
            let pw = Pointwise.Shape(n: shape.n, cin: shape.c, cout: DDCShape.offsetChannels, voxels: shape.voxels,
                                     xLayout: layout, yLayout: .channelsFirst)
            Pointwise.forward(x: x, weight: weight, bias: bias, y: aligned, shape: pw)
            if mode == .official {
                let g = OfficialGeometry(shape)
                let padded = try workspace.buffer("ddc.offsetsPadded", count: g.paddedCount)
                g.fillPadded(interior: aligned, bias: bias, into: padded)
                field = padded
            }
        }
        if let heldAxis { holdAxis(heldAxis, of: field, shape: shape) }
        return field
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

/// DeformUX-Net's deformable convolution layer (`ddc` in the state dict), on channels-last activations:
/// a depthwise 3x3x3 deformable conv (or, for the `standard` ablation, a full C -> C one) whose offsets
/// come from a parallel conv of the input (`conv_offset`: 1x1x1, or 3x3x3 for the ablation;
/// initialised to zero, so a fresh layer is a plain 3x3x3 conv). Single-plane ablations hold one
/// offset axis at zero.
///
/// Parameter names under `prefix`: `weight` (C,1,3,3,3) or (C,C,3,3,3), `bias` (C),
/// `conv_offset.weight` (81,C,k,k,k), `conv_offset.bias` (81). It owns no memory: it computes with
/// the run context it is given. Its backward recomputes the offsets from x.
public final class DeformableDepthwiseConv3d {
    public let channels: Int
    public let offsetMode: OffsetMode
    public let offsetKernel: Int
    public let heldAxis: Int?
    public let standard: Bool
    public let weight: ParameterRef, bias: ParameterRef
    public let offsetWeight: ParameterRef, offsetBias: ParameterRef

    /// Adds the layer's parameters to `layout` under `prefix` (e.g. "stages.0.0.ddc.").
    public init(channels: Int, offsetMode: OffsetMode = .aligned, offsetKernel: Int = 1, heldAxis: Int? = nil,
                standard: Bool = false, prefix: String = "", layout: inout ParameterLayout) throws {
        guard channels >= 1 else {
            throw DeformUXError.invalidArgument("DDC layer", "channels must be >= 1", got: "\(channels)")
        }
        guard offsetKernel == 1 || offsetKernel == 3 else {
            throw DeformUXError.invalidArgument("DDC layer", "the offset kernel must be 1 or 3", got: "\(offsetKernel)")
        }
        if offsetKernel == 3 || standard, offsetMode != .aligned {
            throw DeformUXError.invalidArgument("DDC layer", "a 3x3x3 offset branch and the standard conv need aligned offsets")
        }
        self.channels = channels
        self.offsetMode = offsetMode
        self.offsetKernel = offsetKernel
        self.heldAxis = heldAxis
        self.standard = standard
        let k = offsetKernel
        weight = try layout.add(prefix + "weight", shape: [channels, standard ? channels : 1, 3, 3, 3])
        bias = try layout.add(prefix + "bias", shape: [channels])
        offsetWeight = try layout.add(prefix + "conv_offset.weight", shape: [DDCShape.offsetChannels, channels, k, k, k])
        offsetBias = try layout.add(prefix + "conv_offset.bias", shape: [DDCShape.offsetChannels])
    }

    /// The 3x3x3 offset conv is packed for its kernel; everything else is read as it is.
    public func forms(_ f: inout [WeightSnapshot.Form]) {
        if offsetKernel == 3 {
            f[offsetWeight.index] = .conv(Conv3d.Packing(cin: channels, cout: DDCShape.offsetChannels, kernel: 3, padding: 1))
        }
    }

    /// PyTorch's default Conv3d initialisation (uniform +-1/sqrt(fan_in), fan_in = 27 for a
    /// depthwise 3x3x3, 27 C for the standard conv) for the weight and bias; the offset branch starts
    /// at zero.
    public func initialize(_ store: ParameterStore, rng: inout SplitMix64) {
        let fanIn = (standard ? channels : 1) * 27
        let bound = 1 / Float(fanIn).squareRoot()
        let w = store.value(weight), b = store.value(bias)
        for i in 0..<(channels * fanIn) { w[i] = rng.uniform(-bound, bound) }
        for i in 0..<channels { b[i] = rng.uniform(-bound, bound) }
        let k3 = offsetKernel * offsetKernel * offsetKernel
        store.value(offsetWeight).initialize(repeating: 0, count: DDCShape.offsetChannels * channels * k3)
        store.value(offsetBias).initialize(repeating: 0, count: DDCShape.offsetChannels)
    }

    func shape(of x: Tensor) throws -> DDCShape {
        let v = try Volume5(x, "DDC layer")
        guard v.c == channels else {
            throw DeformUXError.shapeMismatch("DDC layer", "x has the wrong channel count",
                                              expected: "N x D x H x W x \(channels) (channels-last)", got: "shape \(x.shape)")
        }
        try x.requireContiguous("DDC layer x")
        return try DDCShape(n: v.n, c: v.c, d: v.d, h: v.h, w: v.w)
    }

    func branch(_ ctx: RunContext) -> OffsetBranch {
        offsetKernel == 3
            ? .conv3(packedWeight: ctx.weight(offsetWeight), bias: ctx.weight(offsetBias))
            : .pointwise(weight: ctx.weight(offsetWeight), bias: ctx.weight(offsetBias))
    }

    /// y = DDC(x) for channels-last x (N x D x H x W x C), into a new tensor or `into`.
    public func forward(_ x: Tensor, _ ctx: RunContext, into: Tensor? = nil) throws -> Tensor {
        let s = try shape(of: x)
        let y = try into ?? ctx.output(x.shape)
        let offsets = try DDCLayerOps.computeOffsets(x: x.pointer, branch: branch(ctx), mode: offsetMode, shape: s,
                                                     layout: .channelsLast, heldAxis: heldAxis, workspace: ctx.workspace)
        if standard {
            try StandardDeformConv3d.forward(x: x.pointer, offsets: offsets, weight: ctx.weight(weight),
                                             bias: ctx.weight(bias), y: y.pointer, shape: s, cout: channels,
                                             workspace: ctx.workspace)
        } else {
            try DeformConv3d.forward(x: x.pointer, offsets: offsets, weight: ctx.weight(weight), bias: ctx.weight(bias),
                                     y: y.pointer, shape: s, layout: .channelsLast, workspace: ctx.workspace)
        }
        return y
    }

    /// Adds dL/dx into gradX (nil: not wanted) and the parameter gradients into the store.
    public func backward(_ x: Tensor, gradY: Tensor, _ ctx: RunContext, gradX: Tensor?) throws {
        let s = try shape(of: x)
        guard gradY.shape == x.shape else {
            throw DeformUXError.shapeMismatch("DDC layer backward", "grad_output must have the shape of x",
                                              expected: "\(x.shape)", got: "\(gradY.shape)")
        }
        try gradY.requireContiguous("DDC layer grad_output")
        let ws = ctx.workspace
        let branch = branch(ctx)
        let offsets = try DDCLayerOps.computeOffsets(x: x.pointer, branch: branch, mode: offsetMode, shape: s,
                                                     layout: .channelsLast, heldAxis: heldAxis, workspace: ws)
        let gOffW = ctx.gradient(offsetWeight), gOffB = ctx.gradient(offsetBias)
        let gradOffsets = try DDCLayerOps.offsetGradientBuffer(s, gradX: gradX?.pointer, gradOffsetWeight: gOffW,
                                                               gradOffsetBias: gOffB, workspace: ws)
        if standard {
            try StandardDeformConv3d.backward(x: x.pointer, offsets: offsets, weight: ctx.weight(weight), gradY: gradY.pointer,
                                              gradX: gradX?.pointer, gradOffsets: gradOffsets,
                                              gradWeight: ctx.gradient(weight), gradBias: ctx.gradient(bias),
                                              shape: s, cout: channels, workspace: ws)
        } else {
            try DeformConv3d.backward(x: x.pointer, offsets: offsets, weight: ctx.weight(weight), gradY: gradY.pointer,
                                      gradX: gradX?.pointer, gradOffsets: gradOffsets, gradWeight: ctx.gradient(weight),
                                      gradBias: ctx.gradient(bias), shape: s, layout: .channelsLast, workspace: ws)
        }
        guard let gradOffsets else { return }
        try DDCLayerOps.offsetBranchBackward(x: x.pointer, branch: branch, mode: offsetMode, gradOffsets: gradOffsets,
                                             gradX: gradX?.pointer, gradOffsetWeight: gOffW, gradOffsetBias: gOffB,
                                             shape: s, layout: .channelsLast, heldAxis: heldAxis, workspace: ws)
    }
}
