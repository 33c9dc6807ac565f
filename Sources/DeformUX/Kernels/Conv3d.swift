import COpenBLAS

/// Dense 3D convolution (PyTorch's Conv3d: cross-correlation, zero padding, cubic kernel), forward and
/// backward, on channels-last activations.
///
///     x       N x D x H x W x Cin          (optionally two sources: x1 with Cin - cin2 channels and x2
///                                            with cin2 channels, meaning their concatenation [x1, x2])
///     weight  Cout x Cin x k x k x k       (PyTorch layout; `pack` turns it into the kernel's layout once)
///     bias    Cout (optional)
///     y       N x Do x Ho x Wo x Cout      Do = (D + 2 pad - k) / stride + 1, likewise Ho, Wo
///
/// `ConvReference.conv3d` holds the same operator as plain loops (the test oracle).
///
/// Three paths, chosen by the shape (`Conv3d.Path`):
/// - `direct3x3x3` (k 3, stride 1, pad 1: nearly all of the network's multiply-adds). A register-blocked
///   kernel (PERFORMANCE.md: 213-222 GFLOP/s in C): 8 output voxels x 48 output channels live in 24
///   SIMD16 registers; per (tap, input channel) one input value per voxel is broadcast and multiplied
///   into 3 weight vectors. Each thread owns a run of output planes and keeps the 3 input planes it needs
///   in a ring of zero-padded planes (H+2 x W+2, both sources interleaved there, so the decoder's
///   channel concatenation is never materialised), so a tile never needs a border test. A tile is 8
///   adjacent voxels of a row when W is a multiple of 8, else the next 8 voxels wherever rows break
///   (8 offsets instead of one stride); nothing is computed for padding positions. Where the shape
///   allows (`Winograd.applies`: the big high-resolution convs), the same path runs by Winograd's
///   F(2x2x2, 3x3x3) instead (Winograd3d.swift: 64 instead of 216 multiply-adds per 2x2x2 tile,
///   2.1-2.6x faster at 96^3 and 48^3 on this machine), with every option of the direct kernel; the
///   weight gradient too where `Winograd.appliesToWeightGradient`.
/// - `pointwise` (k 1, stride 1, pad 0): y (V x Cout) = x (V x Cin) . W (Cin x Cout), sgemm per voxel range.
/// - `im2col` (anything else: the 7x7x7 stride-2 stem, the 2x2x2 stride-2 downsampling): a bounded
///   block of output voxels at a time gathers its k^3 Cin-vectors into a column panel, then sgemm.
///
/// Forward options (see `forward`): an `InputTransform` (a preceding InstanceNorm + LeakyReLU applied
/// while the direct kernel pads its input) and per-channel output `statistics` (for the following
/// InstanceNorm), both to save passes over large activations.
///
/// Backward (`backward`, adds into the gradients): the 3x3x3 input gradient is the same direct kernel
/// with the weight transposed and flipped (writing into the two sources' gradients); its weight
/// gradient is one GEMM per tap over the padded planes. The sgemm paths use the transposed GEMMs and
/// col2im. With an input transform, backward gives the gradient with respect to the transformed input
/// x' (the caller chains it through the transform: `InputTransform.backward`), and the weight gradient
/// re-applies the transform as it reads x, so x' is never stored.
///
/// Threads own disjoint output ranges and call single-threaded sgemm. Forward outputs and input
/// gradients do not depend on the thread count (each output element is computed by one part in a
/// fixed order); weight/bias gradients and statistics of the sgemm paths are per-part sums added in
/// part order, so they depend on the thread count but never on timing.
public enum Conv3d {
    /// Output channels per register tile of the direct kernel (3 SIMD16 vectors).
    @usableFromInline static let coutBlock = 48
    /// Output voxels per register tile of the direct kernel.
    @usableFromInline static let tileVoxels = 8

    public enum Path: Sendable, Equatable {
        case direct3x3x3, pointwise, im2col
    }

    /// Sizes of one convolution. `cin` is the total input channel count; `cin2` > 0 means the input
    /// comes as two tensors with cin - cin2 and cin2 channels (their concatenation, first source first).
    public struct Shape: Equatable, Sendable, CustomStringConvertible {
        public var n: Int, cin: Int, cout: Int, d: Int, h: Int, w: Int
        public var kernel: Int, stride: Int, padding: Int
        public var cin2: Int

        /// Checks that every size is valid and the output is not empty.
        public init(n: Int, cin: Int, cout: Int, d: Int, h: Int, w: Int,
                    kernel: Int, stride: Int = 1, padding: Int = 0, cin2: Int = 0) throws {
            let op = "conv3d"
            for (name, v) in [("N", n), ("Cin", cin), ("Cout", cout), ("D", d), ("H", h), ("W", w),
                              ("kernel", kernel), ("stride", stride)] where v < 1 {
                throw DeformUXError.invalidArgument(op, "\(name) must be >= 1, got \(v)")
            }
            guard padding >= 0 else {
                throw DeformUXError.invalidArgument(op, "padding must be >= 0, got \(padding)")
            }
            guard cin2 >= 0, cin2 < cin else {
                throw DeformUXError.invalidArgument(op, "the second input's channels must be in 0..<Cin (\(cin)), got \(cin2)")
            }
            self.n = n; self.cin = cin; self.cout = cout; self.d = d; self.h = h; self.w = w
            self.kernel = kernel; self.stride = stride; self.padding = padding; self.cin2 = cin2
            guard od >= 1, oh >= 1, ow >= 1 else {
                throw DeformUXError.invalidArgument(op, "input \(d) x \(h) x \(w) with kernel \(kernel), stride \(stride), padding \(padding) gives an empty output")
            }
            _ = try Tensor.elementCount([n, d + 2 * padding + 16, h + 2 * padding + 1, w + 2 * padding + 1, max(cin, cout), 2],
                                        context: op)
            _ = try Tensor.elementCount([kernel, kernel, kernel, cin, cout + Conv3d.coutBlock], context: op)
        }

        /// Channels of the first source.
        public var cin1: Int { cin - cin2 }
        public var od: Int { (d + 2 * padding - kernel) / stride + 1 }
        public var oh: Int { (h + 2 * padding - kernel) / stride + 1 }
        public var ow: Int { (w + 2 * padding - kernel) / stride + 1 }
        public var taps: Int { kernel * kernel * kernel }
        public var inputCount: Int { n * d * h * w * cin }
        public var outputCount: Int { n * od * oh * ow * cout }
        /// Elements of the PyTorch weight Cout x Cin x k x k x k.
        public var weightCount: Int { cout * cin * taps }
        /// Multiply-adds of one forward.
        public var macs: Int { n * od * oh * ow * cout * cin * taps }

        public var packing: Packing { Packing(cin: cin, cout: cout, kernel: kernel, stride: stride, padding: padding) }
        public var path: Path { packing.path }

        public var description: String {
            let src = cin2 > 0 ? " (\(cin1)+\(cin2))" : ""
            return "N=\(n) Cin=\(cin)\(src) Cout=\(cout) \(d)x\(h)x\(w) k\(kernel) s\(stride) p\(padding)"
        }
    }

    // MARK: Weight packing

    /// What the packed layout of a weight depends on: the channels, the kernel and the path (not the
    /// input size), so a layer can pack its weight once and reuse it for every input.
    public struct Packing: Equatable, Sendable {
        public var cin: Int, cout: Int, kernel: Int, path: Path
        public var taps: Int { kernel * kernel * kernel }

        /// The packing of a conv with these channels, kernel, stride and padding.
        public init(cin: Int, cout: Int, kernel: Int, stride: Int = 1, padding: Int = 0) {
            self.cin = cin; self.cout = cout; self.kernel = kernel
            if kernel == 3 && stride == 1 && padding == 1 { path = .direct3x3x3 }
            else if kernel == 1 && stride == 1 && padding == 0 { path = .pointwise }
            else { path = .im2col }
        }

        /// The direct kernel's output-channel block: 16 for convs with at most 16 outputs (the narrow
        /// tile, 24 voxels x 16 channels), else 48 (8 voxels x 48 channels).
        public var blockWidth: Int { path == .direct3x3x3 && cout <= 16 ? 16 : coutBlock }

        /// Floats of the packed weight.
        ///
        /// direct3x3x3: [cout block of `blockWidth`][tap 27][cin][blockWidth] (output channels past Cout are 0).
        /// pointwise, im2col: [tap][cin][Cout], the K x Cout right-hand matrix of the GEMM (K = taps * Cin,
        /// the same (tap, channel) order as the channels-last column panel).
        public var count: Int {
            switch path {
            case .direct3x3x3: return (cout + blockWidth - 1) / blockWidth * 27 * cin * blockWidth
            case .pointwise, .im2col: return taps * cin * cout
            }
        }
    }

    /// Floats of the packed weight for `shape`.
    public static func packedCount(_ s: Shape) -> Int { s.packing.count }

    static func coutBlocks(_ cout: Int) -> Int { (cout + coutBlock - 1) / coutBlock }

    /// Packs a PyTorch weight (Cout x Cin x k x k x k) into the kernel's layout (`packedCount` floats).
    public static func pack(weight: UnsafePointer<Float>, into packed: UnsafeMutablePointer<Float>, shape s: Shape) {
        pack(weight: weight, into: packed, packing: s.packing)
    }

    /// Packs a PyTorch weight (Cout x Cin x k x k x k) into the layout `p` describes (`p.count` floats).
    public static func pack(weight: UnsafePointer<Float>, into packed: UnsafeMutablePointer<Float>, packing s: Packing) {
        let taps = s.taps
        // Loop orders keep both sides cache-friendly: each (co, ci) reads its taps contiguously, and the
        // rows being written stay in L1/L2 (packing the 768-channel convs every forward must stay cheap).
        switch s.path {
        case .direct3x3x3:
            packed.initialize(repeating: 0, count: s.count)
            let bw = s.blockWidth
            for b in 0..<(s.cout + bw - 1) / bw {
                let block = packed + b * 27 * s.cin * bw
                // 4 input channels at a time: the bw x 4 x 27 source floats they need stay in L1 while
                // the 27 destination rows of 4 x bw floats are written one after another.
                for ci0 in stride(from: 0, to: s.cin, by: 4) {
                    let ci1 = min(s.cin, ci0 + 4)
                    for t in 0..<taps {
                        for j in 0..<min(bw, s.cout - b * bw) {
                            let src = weight + (b * bw + j) * s.cin * taps + t
                            for ci in ci0..<ci1 { block[(t * s.cin + ci) * bw + j] = src[ci * taps] }
                        }
                    }
                }
            }
        case .pointwise, .im2col:
            for ci0 in stride(from: 0, to: s.cin, by: 8) {
                let ci1 = min(s.cin, ci0 + 8)
                for co in 0..<s.cout {
                    let src = weight + co * s.cin * taps
                    for ci in ci0..<ci1 {
                        for t in 0..<taps { packed[(t * s.cin + ci) * s.cout + co] = src[ci * taps + t] }
                    }
                }
            }
        }
    }

    /// The inverse of `pack`: the PyTorch weight (Cout x Cin x k x k x k) from a packed one.
    public static func unpack(_ packed: UnsafePointer<Float>, into weight: UnsafeMutablePointer<Float>, packing s: Packing) {
        let taps = s.taps
        for co in 0..<s.cout {
            for ci in 0..<s.cin {
                for t in 0..<taps {
                    let at: Int
                    switch s.path {
                    case .direct3x3x3:
                        let bw = s.blockWidth
                        at = (((co / bw) * 27 + t) * s.cin + ci) * bw + co % bw
                    case .pointwise, .im2col: at = (t * s.cin + ci) * s.cout + co
                    }
                    weight[(co * s.cin + ci) * taps + t] = packed[at]
                }
            }
        }
    }

    /// For the direct 3x3x3 path's input gradient: the packed weight of the conv that maps grad_y back
    /// to grad_x (Cin and Cout swapped, taps flipped: W'[ci][co][t] = W[co][ci][26 - t]), made from the
    /// forward's packed weight. `q` holds `Packing(cin: cout, cout: cin, kernel: 3, padding: 1).count` floats.
    static func packInputGradient(fromPacked p: UnsafePointer<Float>, into q: UnsafeMutablePointer<Float>, packing s: Packing) {
        let t = Packing(cin: s.cout, cout: s.cin, kernel: 3, padding: 1)
        let sw = s.blockWidth, tw = t.blockWidth   // block widths of the source and of the result
        let blocks = (s.cin + tw - 1) / tw         // blocks of the new output channels (the old input channels)
        let blockFloats = 27 * s.cout * tw
        // Parts own (block, tap) items and write their rows contiguously.
        let work = blocks * 27
        let parts = max(1, min(Threads.count, work / 8))
        parallelFor(parts) { part in
            for item in Threads.range(part, of: parts, total: work) {
                let b = item / 27, tap = item % 27
                let qTap = q + b * blockFloats + tap * s.cout * tw
                let ciLo = b * tw, ciN = min(tw, s.cin - ciLo)
                for co in 0..<s.cout {
                    let row = qTap + co * tw
                    let src = p + ((co / sw) * 27 + (26 - tap)) * s.cin * sw + co % sw
                    for j in 0..<ciN { row[j] = src[(ciLo + j) * sw] }
                    if ciN < tw { (row + ciN).initialize(repeating: 0, count: tw - ciN) }
                }
            }
        }
    }

    /// The packed weight as a new 1-D tensor. Checks the weight's shape.
    public static func pack(weight: Tensor, shape s: Shape) throws -> Tensor {
        let expect = [s.cout, s.cin, s.kernel, s.kernel, s.kernel]
        guard weight.shape == expect else {
            throw DeformUXError.shapeMismatch("conv3d", "weight must have shape \(expect) (Cout x Cin x k x k x k), got \(weight.shape)")
        }
        try weight.requireContiguous("conv3d weight")
        let p = try Tensor(zeros: [packedCount(s)])
        pack(weight: weight.pointer, into: p.pointer, shape: s)
        return p
    }

    // MARK: Tensor API (validated)

    /// y = conv3d([x, x2], weight, bias) with channels-last x (N x D x H x W x C1) and x2
    /// (N x D x H x W x C2, optional); weight in PyTorch layout. Packs the weight on every call
    /// (layers keep a packed copy and call the pointer API instead).
    public static func forward(x: Tensor, x2: Tensor? = nil, weight: Tensor, bias: Tensor?,
                               stride: Int = 1, padding: Int = 0, workspace: Workspace? = nil) throws -> Tensor {
        let op = "conv3d"
        guard x.rank == 5 else {
            throw DeformUXError.shapeMismatch(op, "x must be N x D x H x W x C (channels-last, rank 5), got shape \(x.shape)")
        }
        guard weight.rank == 5, weight.shape[2] == weight.shape[3], weight.shape[3] == weight.shape[4] else {
            throw DeformUXError.shapeMismatch(op, "weight must be Cout x Cin x k x k x k, got shape \(weight.shape)")
        }
        var c2 = 0
        if let x2 {
            guard x2.rank == 5, Array(x2.shape[0..<4]) == Array(x.shape[0..<4]) else {
                throw DeformUXError.shapeMismatch(op, "x2 must be N x D x H x W x C2 with the N, D, H, W of x \(x.shape), got \(x2.shape)")
            }
            c2 = x2.shape[4]
        }
        let s = try Shape(n: x.shape[0], cin: x.shape[4] + c2, cout: weight.shape[0], d: x.shape[1], h: x.shape[2],
                          w: x.shape[3], kernel: weight.shape[2], stride: stride, padding: padding, cin2: c2)
        guard weight.shape[1] == s.cin else {
            throw DeformUXError.shapeMismatch(op, "weight has \(weight.shape[1]) input channels, the input has \(s.cin)")
        }
        if let bias, bias.shape != [s.cout] {
            throw DeformUXError.shapeMismatch(op, "bias must have shape [\(s.cout)], got \(bias.shape)")
        }
        try x.requireContiguous("\(op) x")
        try x2?.requireContiguous("\(op) x2")
        try bias?.requireContiguous("\(op) bias")
        let packed = try pack(weight: weight, shape: s)
        let y = try Tensor(zeros: [s.n, s.od, s.oh, s.ow, s.cout])
        try forward(x: x.pointer, x2: x2?.pointer, packedWeight: packed.pointer, bias: bias?.pointer,
                    y: y.pointer, shape: s, workspace: workspace ?? Workspace())
        return y
    }

    // MARK: Pointer API

    /// An elementwise transform of the input applied while the direct kernel reads it:
    /// x' = f(scale[n][c] x + shift[n][c]) with f = LeakyReLU(leakySlope) (or the identity when nil);
    /// scale and shift hold N x Cin floats (channels in concatenated order). The zero padding pads x',
    /// as in PyTorch where the conv pads its (already transformed) input. This fuses a preceding
    /// InstanceNorm (scale = rstd, shift = -mean rstd) and LeakyReLU into the convolution, saving a
    /// read and a write of the activation.
    public struct InputTransform {
        public var scale: UnsafePointer<Float>
        public var shift: UnsafePointer<Float>
        public var leakySlope: Float?
        public init(scale: UnsafePointer<Float>, shift: UnsafePointer<Float>, leakySlope: Float?) {
            self.scale = scale; self.shift = shift; self.leakySlope = leakySlope
        }
    }

    /// Writes y (overwrites). `x2` is required when shape.cin2 > 0 and ignored otherwise.
    ///
    /// - inputTransform: see `InputTransform`; only the direct 3x3x3 path supports it.
    /// - statistics: if given, receives N x 2 x Cout doubles: per sample, the sum over voxels of y
    ///   (bias included) for each output channel, then the sum of squares. Gathered while y is still
    ///   in cache, so an InstanceNorm after the conv needs no statistics pass. Summed per thread part
    ///   and then in part order: deterministic for a given thread count.
    ///
    /// Throws when scratch memory cannot be had or an option does not fit the path.
    public static func forward(x: UnsafePointer<Float>, x2: UnsafePointer<Float>? = nil,
                               packedWeight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
                               y: UnsafeMutablePointer<Float>, shape s: Shape, workspace: Workspace,
                               inputTransform: InputTransform? = nil,
                               statistics: UnsafeMutablePointer<Double>? = nil) throws {
        if s.cin2 > 0 && x2 == nil {
            throw DeformUXError.invalidArgument("conv3d", "shape \(s) has a second input, but x2 is nil")
        }
        if inputTransform != nil && s.path != .direct3x3x3 {
            throw DeformUXError.invalidArgument("conv3d", "an input transform needs the 3x3x3 stride 1 padding 1 path, got \(s)")
        }
        let x2p: UnsafePointer<Float>? = s.cin2 > 0 ? x2 : nil
        let parts = Threads.count
        // Per part and sample: Cout sums, then Cout sums of squares.
        var partials: UnsafeMutablePointer<Double>?
        if statistics != nil {
            let doubles = parts * s.n * 2 * s.cout
            let raw = try workspace.buffer("conv3d.statistics", count: 2 * doubles)
            let p = UnsafeMutableRawPointer(raw).bindMemory(to: Double.self, capacity: doubles)
            p.initialize(repeating: 0, count: doubles)
            partials = p
        }
        let stats = partials.map { Statistics(partials: $0, n: s.n, cout: s.cout) }
        switch s.path {
        case .direct3x3x3:
            try Direct.forward(x1: x, x2: x2p, packed: packedWeight, bias: bias,
                               out: Direct.Output(y1: y, c1: s.cout, y2: nil, c2: 0, accumulate: false), s: s,
                               workspace: workspace, transform: inputTransform, stats: stats, parts: parts)
        case .pointwise:
            pointwiseForward(x1: x, x2: x2p, packed: packedWeight, bias: bias, y: y, s: s, stats: stats, parts: parts)
        case .im2col:
            try im2colForward(x1: x, x2: x2p, packed: packedWeight, bias: bias, y: y, s: s, workspace: workspace,
                              stats: stats, parts: parts)
        }
        try workspace.throwIfCancelled("conv3d")
        if let statistics, let partials {
            let count = s.n * 2 * s.cout
            statistics.initialize(repeating: 0, count: count)
            for part in 0..<parts {
                let p = partials + part * count
                for i in 0..<count { statistics[i] += p[i] }
            }
        }
    }

    /// Where the parts put their per-channel sums (see `forward`'s `statistics`).
    struct Statistics {
        let partials: UnsafeMutablePointer<Double>
        let n: Int, cout: Int

        /// Adds the sums over `count` rows of y (row stride `stride`) of channels c0 ..< c0 + channels,
        /// for sample `sample`, to part `part`'s partials. Rows are summed in Float (callers pass at
        /// most a few hundred), then added in Double.
        func add(part: Int, sample: Int, rows: UnsafePointer<Float>, count: Int, stride: Int, c0: Int, channels: Int) {
            let sum = partials + (part * n + sample) * 2 * cout + c0
            let sq = sum + cout
            var c = 0
            while c < channels {
                let lanes = min(16, channels - c)
                if lanes == 16 {
                    var a = SIMD16<Float>(), b = SIMD16<Float>()
                    for r in 0..<count {
                        let v = cload(rows + r * stride + c)
                        a += v
                        b = b.addingProduct(v, v)
                    }
                    for l in 0..<16 { sum[c + l] += Double(a[l]); sq[c + l] += Double(b[l]) }
                } else {
                    for l in 0..<lanes {
                        var a: Float = 0, b: Float = 0
                        for r in 0..<count {
                            let v = rows[r * stride + c + l]
                            a += v
                            b += v * v
                        }
                        sum[c + l] += Double(a); sq[c + l] += Double(b)
                    }
                }
                c += lanes
            }
        }

        /// `add` for rows v0 ..< v0 + count of y (flat voxel index over all samples), split at sample
        /// boundaries and into runs of at most 256 rows.
        func add(part: Int, y: UnsafePointer<Float>, v0: Int, count: Int, voxelsPerSample: Int) {
            var v = v0
            let end = v0 + count
            while v < end {
                let sample = v / voxelsPerSample
                let runEnd = min(end, (sample + 1) * voxelsPerSample, v + 256)
                add(part: part, sample: sample, rows: y + v * cout, count: runEnd - v, stride: cout, c0: 0, channels: cout)
                v = runEnd
            }
        }
    }

    // MARK: Backward

    /// Adds the gradients of `forward`:
    ///
    ///     gradX       N x D x H x W x Cin1   += dL/dx1'       (nil: not wanted)
    ///     gradX2      N x D x H x W x Cin2   += dL/dx2'       (two sources; nil together with gradX or not at all)
    ///     gradWeight  Cout x Cin x k x k x k += dL/dW         (PyTorch layout)
    ///     gradBias    Cout                   += dL/db
    ///
    /// x' is the input the conv multiplied: x itself, or, with `inputTransform` (3x3x3 path), the
    /// transformed x (see `InputTransform`; pass the same transform as the forward). `packedWeight` is
    /// the forward's packed weight. The input gradient of the 3x3x3 path is the same direct
    /// kernel run on grad_y with the weight transposed (Cin <-> Cout) and flipped; its weight gradient
    /// is 27 GEMMs (one per tap) of grad_y against shifted views of the padded input planes, threads
    /// owning disjoint taps, so it does not depend on the thread count. The sgemm paths split voxels
    /// and sum per-part weight gradients in part order. Throws when scratch memory cannot be had or
    /// the gradient buffers do not fit the shape.
    public static func backward(x: UnsafePointer<Float>, x2: UnsafePointer<Float>? = nil, packedWeight: UnsafePointer<Float>,
                                gradY: UnsafePointer<Float>, gradX: UnsafeMutablePointer<Float>?,
                                gradX2: UnsafeMutablePointer<Float>? = nil,
                                gradWeight: UnsafeMutablePointer<Float>?, gradBias: UnsafeMutablePointer<Float>?,
                                shape s: Shape, workspace: Workspace,
                                inputTransform: InputTransform? = nil) throws {
        let op = "conv3d backward"
        if s.cin2 > 0 && x2 == nil {
            throw DeformUXError.invalidArgument(op, "shape \(s) has a second input, but x2 is nil")
        }
        if s.cin2 > 0 && (gradX == nil) != (gradX2 == nil) {
            throw DeformUXError.invalidArgument(op, "with two inputs, give both input gradients or neither")
        }
        if inputTransform != nil && s.path != .direct3x3x3 {
            throw DeformUXError.invalidArgument(op, "an input transform needs the 3x3x3 stride 1 padding 1 path, got \(s)")
        }
        let x2p: UnsafePointer<Float>? = s.cin2 > 0 ? x2 : nil
        let gx2: UnsafeMutablePointer<Float>? = s.cin2 > 0 ? gradX2 : nil
        let maxParts = Threads.count
        let outVoxels = s.n * s.od * s.oh * s.ow

        if let gradBias {
            // Sum of grad_y over voxels, per part in Double, then in part order.
            let parts = max(1, min(maxParts, outVoxels / 4096))
            let raw = try workspace.buffer("conv3d.gradBiasParts", count: 2 * parts * 2 * s.cout)
            let partials = UnsafeMutableRawPointer(raw).bindMemory(to: Double.self, capacity: parts * 2 * s.cout)
            partials.initialize(repeating: 0, count: parts * 2 * s.cout)
            let sums = Statistics(partials: partials, n: 1, cout: s.cout)
            parallelFor(parts) { part in
                let r = Threads.range(part, of: parts, total: outVoxels)
                sums.add(part: part, y: gradY, v0: r.lowerBound, count: r.count, voxelsPerSample: outVoxels)
            }
            for co in 0..<s.cout {
                var acc = 0.0
                for part in 0..<parts { acc += partials[part * 2 * s.cout + co] }
                gradBias[co] += Float(acc)
            }
        }
        if let gradX {
            try inputGradient(packed: packedWeight, gradY: gradY, gradX1: gradX, gradX2: gx2, s: s, workspace: workspace,
                              parts: maxParts)
        }
        try workspace.throwIfCancelled("conv3d backward")
        if let gradWeight {
            switch s.path {
            case .direct3x3x3:
                try Direct.weightGradient(x1: x, x2: x2p, gradY: gradY, gradWeight: gradWeight, s: s,
                                          workspace: workspace, transform: inputTransform, parts: maxParts)
            case .pointwise, .im2col:
                try gemmWeightGradient(x1: x, x2: x2p, gradY: gradY, gradWeight: gradWeight, s: s,
                                       workspace: workspace, parts: maxParts)
            }
            try workspace.throwIfCancelled("conv3d backward")
        }
    }

    /// gradX (split into the two sources) += dL/dx.
    static func inputGradient(packed weightPacked: UnsafePointer<Float>, gradY: UnsafePointer<Float>,
                              gradX1: UnsafeMutablePointer<Float>, gradX2: UnsafeMutablePointer<Float>?,
                              s: Shape, workspace: Workspace, parts maxParts: Int) throws {
        let c1 = s.cin1, c2 = s.cin2, taps = s.taps
        switch s.path {
        case .direct3x3x3:
            // dL/dx = conv3x3x3(grad_y, W') with W'[ci][co][t] = W[co][ci][26 - t], padding 1.
            let t = try Shape(n: s.n, cin: s.cout, cout: s.cin, d: s.d, h: s.h, w: s.w, kernel: 3, stride: 1, padding: 1)
            let packed = try workspace.buffer("conv3d.packedFlipped", count: packedCount(t))
            packInputGradient(fromPacked: weightPacked, into: packed, packing: s.packing)
            try Direct.forward(x1: gradY, x2: nil, packed: packed, bias: nil,
                               out: Direct.Output(y1: gradX1, c1: c1, y2: gradX2, c2: c2, accumulate: true),
                               s: t, workspace: workspace, transform: nil, stats: nil, parts: maxParts)
        case .pointwise:
            // gradX1 (V x c1) += grad_y (V x Cout) . W[:, 0 ..< c1]; gradX2 likewise with the rest.
            let voxels = s.n * s.d * s.h * s.w
            let parts = max(1, min(maxParts, voxels / 512))
            parallelFor(parts) { part in
                let r = Threads.range(part, of: parts, total: voxels)
                if r.isEmpty { return }
                // The packed weight P is Cin x Cout (y = x P): dL/dx = grad_y P^T, split by source rows.
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(r.count), Int32(c1), Int32(s.cout),
                            1, gradY + r.lowerBound * s.cout, Int32(s.cout), weightPacked, Int32(s.cout),
                            1, gradX1 + r.lowerBound * c1, Int32(c1))
                if let gradX2 {
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(r.count), Int32(c2), Int32(s.cout),
                                1, gradY + r.lowerBound * s.cout, Int32(s.cout), weightPacked + c1 * s.cout, Int32(s.cout),
                                1, gradX2 + r.lowerBound * c2, Int32(c2))
                }
            }
        case .im2col:
            // Column gradient grad_y . P^T per block of output voxels, scattered back (col2im). Windows
            // overlap when stride < kernel: then one part does all blocks, in order.
            let packed = weightPacked
            let outVoxels = s.n * s.od * s.oh * s.ow
            let block = im2colBlock(s)
            let kdim = taps * s.cin
            let parts = s.stride >= s.kernel ? max(1, min(maxParts, (outVoxels + block - 1) / block)) : 1
            let panels = try workspace.buffer("conv3d.im2col", count: parts * block * kdim)
            let k = s.kernel
            parallelFor(parts) { part in
                let r = Threads.range(part, of: parts, total: outVoxels)
                let panel = panels + part * block * kdim
                var v0 = r.lowerBound
                while v0 < r.upperBound {
                    let count = min(block, r.upperBound - v0)
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(count), Int32(kdim), Int32(s.cout),
                                1, gradY + v0 * s.cout, Int32(s.cout), packed, Int32(s.cout), 0, panel, Int32(kdim))
                    for i in 0..<count {
                        let v = v0 + i
                        let ow = v % s.ow, oh = (v / s.ow) % s.oh, od = (v / (s.ow * s.oh)) % s.od
                        let n = v / (s.ow * s.oh * s.od)
                        var src = panel + i * kdim
                        for kd in 0..<k {
                            let id = od * s.stride - s.padding + kd
                            for kh in 0..<k {
                                let ih = oh * s.stride - s.padding + kh
                                for kw in 0..<k {
                                    let iw = ow * s.stride - s.padding + kw
                                    if id >= 0 && id < s.d && ih >= 0 && ih < s.h && iw >= 0 && iw < s.w {
                                        let at = ((n * s.d + id) * s.h + ih) * s.w + iw
                                        let g1 = gradX1 + at * c1
                                        for c in 0..<c1 { g1[c] += src[c] }
                                        if let gradX2 {
                                            let g2 = gradX2 + at * c2
                                            for c in 0..<c2 { g2[c] += src[c1 + c] }
                                        }
                                    }
                                    src += s.cin
                                }
                            }
                        }
                    }
                    v0 += count
                }
            }
        }
    }

    /// gradWeight += grad_y^T . columns, for the sgemm paths: per part (a voxel range) a Cout x K
    /// partial ([co][tap][ci]), summed in part order and permuted to the PyTorch layout.
    static func gemmWeightGradient(x1: UnsafePointer<Float>, x2: UnsafePointer<Float>?, gradY: UnsafePointer<Float>,
                                   gradWeight: UnsafeMutablePointer<Float>, s: Shape, workspace: Workspace,
                                   parts maxParts: Int) throws {
        let outVoxels = s.n * s.od * s.oh * s.ow
        let kdim = s.taps * s.cin
        let wCount = s.cout * kdim
        let c1 = s.cin1, c2 = s.cin2
        let block = s.path == .pointwise ? 1024 : im2colBlock(s)
        let parts = max(1, min(maxParts, (outVoxels + block - 1) / block))
        let partials = try workspace.buffer("conv3d.gradWeightParts", count: parts * wCount)
        partials.initialize(repeating: 0, count: parts * wCount)
        let panels: UnsafeMutablePointer<Float>? = s.path == .im2col
            ? try workspace.buffer("conv3d.im2col", count: parts * block * kdim) : nil
        parallelFor(parts) { part in
            let r = Threads.range(part, of: parts, total: outVoxels)
            let acc = partials + part * wCount
            var v0 = r.lowerBound
            while v0 < r.upperBound {
                let count = min(block, r.upperBound - v0)
                let gy = gradY + v0 * s.cout
                if let panels {
                    let panel = panels + part * block * kdim
                    gatherPanel(panel, v0: v0, count: count, x1: x1, x2: x2, s: s)
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(s.cout), Int32(kdim), Int32(count),
                                1, gy, Int32(s.cout), panel, Int32(kdim), 1, acc, Int32(kdim))
                } else {
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(s.cout), Int32(c1), Int32(count),
                                1, gy, Int32(s.cout), x1 + v0 * c1, Int32(c1), 1, acc, Int32(kdim))
                    if let x2 {
                        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(s.cout), Int32(c2), Int32(count),
                                    1, gy, Int32(s.cout), x2 + v0 * c2, Int32(c2), 1, acc + c1, Int32(kdim))
                    }
                }
                v0 += count
            }
        }
        for part in 0..<parts {
            let p = partials + part * wCount
            for co in 0..<s.cout {
                for t in 0..<s.taps {
                    for ci in 0..<s.cin { gradWeight[(co * s.cin + ci) * s.taps + t] += p[(co * s.taps + t) * s.cin + ci] }
                }
            }
        }
    }

    // MARK: pointwise and im2col paths

    /// Rows of y (each Cout floats) set to the bias or 0.
    static func initRows(_ y: UnsafeMutablePointer<Float>, rows: Int, cout: Int, bias: UnsafePointer<Float>?) {
        if let bias {
            for r in 0..<rows { (y + r * cout).update(from: bias, count: cout) }
        } else {
            y.initialize(repeating: 0, count: rows * cout)
        }
    }

    static func pointwiseForward(x1: UnsafePointer<Float>, x2: UnsafePointer<Float>?, packed: UnsafePointer<Float>,
                                 bias: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>, s: Shape,
                                 stats: Statistics?, parts maxParts: Int) {
        let voxels = s.n * s.d * s.h * s.w
        let parts = max(1, min(maxParts, voxels / 512))
        let c1 = s.cin1, c2 = s.cin2
        // Blocks of rows, so that the statistics read y while it is in cache.
        let block = 1024
        parallelFor(parts) { part in
            let r = Threads.range(part, of: parts, total: voxels)
            var v0 = r.lowerBound
            while v0 < r.upperBound {
                let count = min(block, r.upperBound - v0)
                let yr = y + v0 * s.cout
                initRows(yr, rows: count, cout: s.cout, bias: bias)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(count), Int32(s.cout), Int32(c1),
                            1, x1 + v0 * c1, Int32(c1), packed, Int32(s.cout), 1, yr, Int32(s.cout))
                if let x2 {
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(count), Int32(s.cout), Int32(c2),
                                1, x2 + v0 * c2, Int32(c2), packed + c1 * s.cout, Int32(s.cout),
                                1, yr, Int32(s.cout))
                }
                stats?.add(part: part, y: y, v0: v0, count: count, voxelsPerSample: s.d * s.h * s.w)
                v0 += count
            }
        }
    }

    /// Output voxels per column panel: the panel (voxels x taps*Cin) kept near 384 KB (L2-sized).
    static func im2colBlock(_ s: Shape) -> Int {
        let k = s.taps * s.cin
        return max(8, min(1024, (96 * 1024) / max(k, 1)))
    }

    static func im2colForward(x1: UnsafePointer<Float>, x2: UnsafePointer<Float>?, packed: UnsafePointer<Float>,
                              bias: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>, s: Shape,
                              workspace: Workspace, stats: Statistics?, parts maxParts: Int) throws {
        let outVoxels = s.n * s.od * s.oh * s.ow
        let block = im2colBlock(s)
        let kdim = s.taps * s.cin
        let parts = max(1, min(maxParts, (outVoxels + block - 1) / block))
        let panels = try workspace.buffer("conv3d.im2col", count: parts * block * kdim)
        parallelFor(parts) { part in
            let r = Threads.range(part, of: parts, total: outVoxels)
            let panel = panels + part * block * kdim
            var v0 = r.lowerBound
            while v0 < r.upperBound {
                if workspace.stopRequested() { return }
                let count = min(block, r.upperBound - v0)
                gatherPanel(panel, v0: v0, count: count, x1: x1, x2: x2, s: s)
                let yb = y + v0 * s.cout
                initRows(yb, rows: count, cout: s.cout, bias: bias)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(count), Int32(s.cout), Int32(kdim),
                            1, panel, Int32(kdim), packed, Int32(s.cout), 1, yb, Int32(s.cout))
                stats?.add(part: part, y: y, v0: v0, count: count, voxelsPerSample: s.od * s.oh * s.ow)
                v0 += count
            }
        }
    }

    /// Column panel rows for output voxels v0 ..< v0 + count (flat over all samples): row i holds, for
    /// every tap (kd, kh, kw) in order, the Cin-vector under it ([x1, x2] channels; 0 outside).
    static func gatherPanel(_ panel: UnsafeMutablePointer<Float>, v0: Int, count: Int, x1: UnsafePointer<Float>,
                            x2: UnsafePointer<Float>?, s: Shape) {
        let c1 = s.cin1, c2 = s.cin2, k = s.kernel
        let kdim = s.taps * s.cin
        for i in 0..<count {
            let v = v0 + i
            let ow = v % s.ow, oh = (v / s.ow) % s.oh, od = (v / (s.ow * s.oh)) % s.od
            let n = v / (s.ow * s.oh * s.od)
            var dst = panel + i * kdim
            let iw0 = ow * s.stride - s.padding
            // Taps kw in kwLo..<kwHi read inside the volume; in channels-last order their
            // Cin-vectors are one contiguous run of x (one source).
            let kwLo = max(0, -iw0), kwHi = min(k, s.w - iw0)
            for kd in 0..<k {
                let id = od * s.stride - s.padding + kd
                for kh in 0..<k {
                    let ih = oh * s.stride - s.padding + kh
                    if id < 0 || id >= s.d || ih < 0 || ih >= s.h || kwLo >= kwHi {
                        dst.initialize(repeating: 0, count: k * s.cin)
                        dst += k * s.cin
                        continue
                    }
                    let rowAt = ((n * s.d + id) * s.h + ih) * s.w + iw0
                    if kwLo > 0 { dst.initialize(repeating: 0, count: kwLo * s.cin) }
                    if let x2 {
                        for kw in kwLo..<kwHi {
                            let at = rowAt + kw
                            (dst + kw * s.cin).update(from: x1 + at * c1, count: c1)
                            (dst + kw * s.cin + c1).update(from: x2 + at * c2, count: c2)
                        }
                    } else {
                        (dst + kwLo * c1).update(from: x1 + (rowAt + kwLo) * c1, count: (kwHi - kwLo) * c1)
                    }
                    if kwHi < k { (dst + kwHi * s.cin).initialize(repeating: 0, count: (k - kwHi) * s.cin) }
                    dst += k * s.cin
                }
            }
        }
    }

    // MARK: direct 3x3x3 path

    enum Direct {
        /// Geometry of one padded input plane: (H+2) x (W+2) voxels of Cin floats, plus slack so the
        /// last tile's reads stay inside the buffer, and which output voxels each tile of 8 holds.
        struct Geometry {
            let hp: Int, wp: Int, cin: Int, h: Int, w: Int
            let planeFloats: Int
            /// When W is a multiple of 8, a tile is 8 adjacent voxels of one row (one base pointer,
            /// stride Cin). Otherwise a tile is the next 8 output voxels in row-major order, wherever
            /// the rows break (8 offsets); the plane's last tile repeats its last voxel.
            let byRows: Bool
            let tilesPerRow: Int
            let tiles: Int

            init(_ s: Shape) {
                hp = s.h + 2; wp = s.w + 2; cin = s.cin; h = s.h; w = s.w
                byRows = s.w % Conv3d.tileVoxels == 0
                tilesPerRow = s.w / Conv3d.tileVoxels
                tiles = (s.h * s.w + Conv3d.tileVoxels - 1) / Conv3d.tileVoxels
                planeFloats = (hp * wp + 2 * Conv3d.tileVoxels) * cin
            }

            /// Padded position of output voxel v = h W + w of the plane (v clamped to the last voxel).
            @inline(__always) func position(_ v: Int) -> Int {
                let u = min(v, h * w - 1)
                return (u / w + 1) * wp + u % w + 1
            }
        }

        /// Tiles per group: a group's accumulators (group x 8 x 48 floats) stay in L1/L2 while the
        /// weight chunks are swept.
        static let groupTiles = 16

        /// Taps per weight chunk: the chunk (taps x Cin x 48 floats) should stay in L2 while every tile
        /// of a group streams through it.
        static func tapsPerChunk(cin: Int, width: Int = Conv3d.coutBlock) -> Int {
            let bytesPerTap = cin * width * 4
            if 27 * bytesPerTap <= 320 * 1024 { return 27 }
            if 9 * bytesPerTap <= 320 * 1024 { return 9 }
            if 3 * bytesPerTap <= 320 * 1024 { return 3 }
            return 1
        }

        /// Where the direct kernel writes: output channels 0 ..< c1 to y1 (rows of c1 floats) and, for the
        /// input gradient of a two-source conv, channels c1 ..< c1 + c2 to y2 (rows of c2); overwriting
        /// or adding.
        struct Output {
            let y1: UnsafeMutablePointer<Float>, c1: Int
            let y2: UnsafeMutablePointer<Float>?, c2: Int
            let accumulate: Bool
        }

        /// How `forward` computes: by shape (Winograd where `Winograd.applies`, else the direct
        /// kernel), or forced (tests compare the two).
        enum Algorithm { case automatic, direct, winograd }

        static func forward(x1: UnsafePointer<Float>, x2: UnsafePointer<Float>?, packed: UnsafePointer<Float>,
                            bias: UnsafePointer<Float>?, out: Output, s: Shape,
                            workspace: Workspace, transform: InputTransform?, stats: Statistics?,
                            parts maxParts: Int, algorithm: Algorithm = .automatic) throws {
            if algorithm == .winograd || (algorithm == .automatic && Winograd.applies(s)) {
                guard Winograd.applies(s) else {
                    throw DeformUXError.invalidArgument("conv3d", "the Winograd path does not serve \(s)")
                }
                try Winograd.forward(x1: x1, x2: x2, packed: packed, bias: bias, out: out, s: s, workspace: workspace,
                                     transform: transform, stats: stats, parts: maxParts)
                return
            }
            let g = Geometry(s)
            let planes = s.n * s.d
            let parts = max(1, min(maxParts, planes))
            let accFloats = groupTiles * Conv3d.tileVoxels * Conv3d.coutBlock
            let perPart = 3 * g.planeFloats + accFloats
            let scratch = try workspace.buffer("conv3d.direct", count: parts * perPart)
            parallelFor(parts) { part in
                let ring = scratch + part * perPart
                let acc = ring + 3 * g.planeFloats
                var loaded = (-1, -1, -1)  // which (n * (D+2) + dIn + 1) each ring slot holds
                withUnsafeTemporaryAllocation(of: UnsafePointer<Float>.self, capacity: 27) { basesBuf in
                    guard let bp = basesBuf.baseAddress else { return }
                    for plane in Threads.range(part, of: parts, total: planes) {
                        if workspace.stopRequested() { return }
                        let n = plane / s.d, d = plane % s.d
                        let slots = ensurePlanes(ring: ring, loaded: &loaded, n: n, d: d, x1: x1, x2: x2, s: s, g: g,
                                                 transform: transform)
                        // Tap (kd, kh, kw) reads position pos + (kh-1) * wp + (kw-1) of plane kd.
                        for kd in 0..<3 {
                            let slotPtr = kd == 0 ? slots.0 : (kd == 1 ? slots.1 : slots.2)
                            for kh in 0..<3 {
                                for kw in 0..<3 {
                                    bp[kd * 9 + kh * 3 + kw] = UnsafePointer(slotPtr + ((kh - 1) * g.wp + (kw - 1)) * g.cin)
                                }
                            }
                        }
                        computePlane(bases: UnsafePointer(bp), packed: packed, bias: bias, out: out,
                                     plane: plane, acc: acc, s: s, g: g, stats: stats, part: part, sample: n)
                    }
                }
            }
        }

        /// Makes sure the ring (3 padded planes) holds input planes d-1, d, d+1 of sample n, filling
        /// only the ones missing; returns them in that order. `loaded` records which plane each slot holds.
        static func ensurePlanes(ring: UnsafeMutablePointer<Float>, loaded: inout (Int, Int, Int), n: Int, d: Int,
                                 x1: UnsafePointer<Float>, x2: UnsafePointer<Float>?, s: Shape, g: Geometry,
                                 transform: InputTransform?)
            -> (UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>) {
            var p0 = ring, p1 = ring, p2 = ring
            for kd in 0..<3 {
                let dIn = d - 1 + kd
                let key = n * (s.d + 2) + dIn + 1
                let slot = (dIn + 1) % 3
                let slotPtr = ring + slot * g.planeFloats
                let current: Int
                switch slot { case 0: current = loaded.0; case 1: current = loaded.1; default: current = loaded.2 }
                if current != key {
                    fillPlane(slotPtr, x1: x1, x2: x2, n: n, dIn: dIn, s: s, g: g, transform: transform)
                    switch slot { case 0: loaded.0 = key; case 1: loaded.1 = key; default: loaded.2 = key }
                }
                switch kd { case 0: p0 = slotPtr; case 1: p1 = slotPtr; default: p2 = slotPtr }
            }
            return (p0, p1, p2)
        }

        /// gradWeight (PyTorch layout) += dL/dW. For every output plane, grad_y is laid out on the padded
        /// grid (zero at padding positions), so tap (kd, kh, kw)'s contribution over the whole plane is
        /// one product grad_y^T (Cout x L) . x_kd shifted by (kh-1) wp + (kw-1) (L x Cin), L the span of
        /// padded positions from (1, 1) to (H, W), taken in chunks that stay in L2.
        ///
        /// The product is a register-blocked kernel like the forward's (`wgradTile48x8`): 48 output
        /// channels x 8 input channels of one tap accumulate in 24 SIMD16 registers while the chunk's
        /// positions stream through (one grad_y row of 48 and 8 broadcast inputs per position). Channel
        /// counts it does not tile (Cout not a multiple of 16 or Cin of 8) use sgemm instead.
        ///
        /// Parts: when every part's per-tap sums fit in `privateSumsLimit` floats, parts own runs of
        /// planes and keep private sums, added in part order (balanced; no plane is loaded twice);
        /// otherwise (the wide, low-resolution convs) parts own runs of taps and share the sums.
        static func weightGradient(x1: UnsafePointer<Float>, x2: UnsafePointer<Float>?, gradY: UnsafePointer<Float>,
                                   gradWeight: UnsafeMutablePointer<Float>, s: Shape, workspace: Workspace,
                                   transform: InputTransform?, parts maxParts: Int,
                                   algorithm: Algorithm = .automatic) throws {
            if algorithm == .winograd
                || (algorithm == .automatic && Winograd.appliesToWeightGradient(s, parts: maxParts)) {
                guard Winograd.appliesToWeightGradient(s, parts: maxParts) else {
                    throw DeformUXError.invalidArgument("conv3d backward", "the Winograd path does not serve \(s)")
                }
                try Winograd.weightGradient(x1: x1, x2: x2, gradY: gradY, gradWeight: gradWeight, s: s,
                                            workspace: workspace, transform: transform, parts: maxParts)
                return
            }
            let g = Geometry(s)
            let planes = s.n * s.d
            let tapFloats = s.cout * s.cin
            let splitPlanes = maxParts > 1 && planes >= maxParts && maxParts * 27 * tapFloats <= privateSumsLimit
            let parts = splitPlanes ? min(maxParts, planes) : max(1, min(maxParts, 27))
            // Rows of the plane per chunk: a chunk of grad_y and of the 3 x planes stays in L2 while the
            // part's taps sweep it.
            let rowsPerChunk = max(1, min(s.h, (16 * 1024) / max(1, max(s.cout, s.cin) * s.w)))
            let tiled = s.cout % 16 == 0 && s.cin % 8 == 0
            // The sgemm fallback reads grad_y on the padded grid (zero at padding positions).
            let gyFloats = tiled ? 0 : (g.hp * g.wp) * s.cout
            let perPart = 3 * g.planeFloats + gyFloats
            let scratch = try workspace.buffer("conv3d.direct", count: parts * perPart)
            let sumCopies = splitPlanes ? parts : 1
            // Per-tap sums in [tap][ci][co] order: each accumulator vector (16 output channels of one input
            // channel) adds into contiguous floats.
            let sums = try workspace.buffer("conv3d.gradWeightTaps", count: sumCopies * 27 * tapFloats)
            sums.initialize(repeating: 0, count: sumCopies * 27 * tapFloats)
            parallelFor(parts) { part in
                let taps = splitPlanes ? 0..<27 : Threads.range(part, of: parts, total: 27)
                let myPlanes = splitPlanes ? Threads.range(part, of: parts, total: planes) : 0..<planes
                let mySums = sums + (splitPlanes ? part * 27 * tapFloats : 0)
                let ring = scratch + part * perPart
                let gyp = ring + 3 * g.planeFloats
                if !tiled { gyp.initialize(repeating: 0, count: gyFloats) }
                var loaded = (-1, -1, -1)
                for plane in myPlanes {
                    if workspace.stopRequested() { return }
                    let n = plane / s.d, d = plane % s.d
                    let slots = ensurePlanes(ring: ring, loaded: &loaded, n: n, d: d, x1: x1, x2: x2, s: s, g: g,
                                             transform: transform)
                    let src = gradY + plane * s.h * s.w * s.cout
                    if tiled {
                        // Row by row: grad_y's rows as they are, each against the shifted padded x row; no
                        // work for padding positions.
                        var h0 = 0
                        while h0 < s.h {
                            let rows = min(rowsPerChunk, s.h - h0)
                            for t in taps {
                                let kd = t / 9, kh = (t / 3) % 3, kw = t % 3
                                let xPlane = kd == 0 ? slots.0 : (kd == 1 ? slots.1 : slots.2)
                                let xRow = xPlane + ((h0 + kh) * g.wp + kw) * g.cin
                                wgradTaps(gy: src + h0 * s.w * s.cout, x: xRow, rows: rows, width: s.w,
                                          xRowStride: g.wp * g.cin, cout: s.cout, cin: s.cin, sums: mySums + t * tapFloats)
                            }
                            h0 += rows
                        }
                    } else {
                        for h in 0..<s.h {
                            (gyp + ((h + 1) * g.wp + 1) * s.cout).update(from: src + h * s.w * s.cout, count: s.w * s.cout)
                        }
                        let first = g.wp + 1, span = s.h * g.wp + s.w - first + 1
                        let chunkPositions = max(64, (16 * 1024) / max(s.cout, s.cin))
                        var k0 = 0
                        while k0 < span {
                            let kc = min(chunkPositions, span - k0)
                            for t in taps {
                                let kd = t / 9, kh = (t / 3) % 3, kw = t % 3
                                let xPlane = kd == 0 ? slots.0 : (kd == 1 ? slots.1 : slots.2)
                                let b = xPlane + (first + k0 + (kh - 1) * g.wp + (kw - 1)) * g.cin
                                // sums[t] (Cin x Cout) += x_shifted^T (Cin x L) . grad_y (L x Cout)
                                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(s.cin), Int32(s.cout), Int32(kc),
                                            1, b, Int32(g.cin), gyp + (first + k0) * s.cout, Int32(s.cout),
                                            1, mySums + t * tapFloats, Int32(s.cout))
                            }
                            k0 += kc
                        }
                    }
                }
            }
            for copy in 0..<sumCopies {
                let base = sums + copy * 27 * tapFloats
                for co in 0..<s.cout {
                    for ci in 0..<s.cin {
                        let dst = gradWeight + (co * s.cin + ci) * 27
                        for t in 0..<27 { dst[t] += base[(t * s.cin + ci) * s.cout + co] }
                    }
                }
            }
        }

        /// Floats of per-part private weight-gradient sums allowed before parts split taps instead.
        static let privateSumsLimit = 8 << 20

        /// sums (Cin x Cout) += x^T . grad_y over `rows` rows of `width` positions (grad_y rows contiguous,
        /// x rows `xRowStride` floats apart) for one tap, tile by tile (48 or 16 output channels x 8 input
        /// channels), each tile's accumulators held in registers over all the rows.
        @inline(__always)
        static func wgradTaps(gy: UnsafePointer<Float>, x: UnsafePointer<Float>, rows: Int, width: Int, xRowStride: Int,
                              cout: Int, cin: Int, sums: UnsafeMutablePointer<Float>) {
            var co = 0
            while co < cout {
                let wide = cout - co >= 48
                var ci = 0
                while ci < cin {
                    if wide {
                        wgradTile48x8(gy + co, cout, x + ci, cin, rows, width, xRowStride, sums + ci * cout + co, cout)
                    } else {
                        wgradTile16x8(gy + co, cout, x + ci, cin, rows, width, xRowStride, sums + ci * cout + co, cout)
                    }
                    ci += 8
                }
                co += wide ? 48 : 16
            }
        }

        /// out[j * os + 0..<48] += sum_p gy[p][0..<48] * x[p][j] for j in 0..<8 (24 accumulators), over
        /// `rows` rows of `count` positions: grad_y contiguous, x rows `xRowStride` floats apart.
        @inline(__always)
        static func wgradTile48x8(_ gy: UnsafePointer<Float>, _ gs: Int, _ x: UnsafePointer<Float>, _ xs: Int,
                                  _ rows: Int, _ count: Int, _ xRowStride: Int,
                                  _ out: UnsafeMutablePointer<Float>, _ os: Int) {
            typealias V = SIMD16<Float>
            var a0 = V(), a1 = V(), a2 = V(), a3 = V(), a4 = V(), a5 = V(), a6 = V(), a7 = V()
            var b0 = V(), b1 = V(), b2 = V(), b3 = V(), b4 = V(), b5 = V(), b6 = V(), b7 = V()
            var c0 = V(), c1 = V(), c2 = V(), c3 = V(), c4 = V(), c5 = V(), c6 = V(), c7 = V()
            var g = gy
            for r in 0..<rows {
            var p = x + r &* xRowStride
            for _ in 0..<count {
                let w0 = cload(g), w1 = cload(g + 16), w2 = cload(g + 32)
                var v = V(repeating: p[0])
                a0 = a0.addingProduct(v, w0); b0 = b0.addingProduct(v, w1); c0 = c0.addingProduct(v, w2)
                v = V(repeating: p[1])
                a1 = a1.addingProduct(v, w0); b1 = b1.addingProduct(v, w1); c1 = c1.addingProduct(v, w2)
                v = V(repeating: p[2])
                a2 = a2.addingProduct(v, w0); b2 = b2.addingProduct(v, w1); c2 = c2.addingProduct(v, w2)
                v = V(repeating: p[3])
                a3 = a3.addingProduct(v, w0); b3 = b3.addingProduct(v, w1); c3 = c3.addingProduct(v, w2)
                v = V(repeating: p[4])
                a4 = a4.addingProduct(v, w0); b4 = b4.addingProduct(v, w1); c4 = c4.addingProduct(v, w2)
                v = V(repeating: p[5])
                a5 = a5.addingProduct(v, w0); b5 = b5.addingProduct(v, w1); c5 = c5.addingProduct(v, w2)
                v = V(repeating: p[6])
                a6 = a6.addingProduct(v, w0); b6 = b6.addingProduct(v, w1); c6 = c6.addingProduct(v, w2)
                v = V(repeating: p[7])
                a7 = a7.addingProduct(v, w0); b7 = b7.addingProduct(v, w1); c7 = c7.addingProduct(v, w2)
                g += gs
                p += xs
            }
            }
            addInto(a0, b0, c0, out); addInto(a1, b1, c1, out + os); addInto(a2, b2, c2, out + 2 * os)
            addInto(a3, b3, c3, out + 3 * os); addInto(a4, b4, c4, out + 4 * os); addInto(a5, b5, c5, out + 5 * os)
            addInto(a6, b6, c6, out + 6 * os); addInto(a7, b7, c7, out + 7 * os)
        }

        /// o[0..<48] += (a, b, c).
        @inline(__always)
        static func addInto(_ a: SIMD16<Float>, _ b: SIMD16<Float>, _ c: SIMD16<Float>, _ o: UnsafeMutablePointer<Float>) {
            cstore(cload(o) + a, o); cstore(cload(o + 16) + b, o + 16); cstore(cload(o + 32) + c, o + 32)
        }

        /// `wgradTile48x8` for 16 output channels.
        @inline(__always)
        static func wgradTile16x8(_ gy: UnsafePointer<Float>, _ gs: Int, _ x: UnsafePointer<Float>, _ xs: Int,
                                  _ rows: Int, _ count: Int, _ xRowStride: Int,
                                  _ out: UnsafeMutablePointer<Float>, _ os: Int) {
            typealias V = SIMD16<Float>
            var a0 = V(), a1 = V(), a2 = V(), a3 = V(), a4 = V(), a5 = V(), a6 = V(), a7 = V()
            var g = gy
            for r in 0..<rows {
            var p = x + r &* xRowStride
            for _ in 0..<count {
                let w0 = cload(g)
                a0 = a0.addingProduct(V(repeating: p[0]), w0); a1 = a1.addingProduct(V(repeating: p[1]), w0)
                a2 = a2.addingProduct(V(repeating: p[2]), w0); a3 = a3.addingProduct(V(repeating: p[3]), w0)
                a4 = a4.addingProduct(V(repeating: p[4]), w0); a5 = a5.addingProduct(V(repeating: p[5]), w0)
                a6 = a6.addingProduct(V(repeating: p[6]), w0); a7 = a7.addingProduct(V(repeating: p[7]), w0)
                g += gs
                p += xs
            }
            }
            cstore(cload(out) + a0, out); cstore(cload(out + os) + a1, out + os)
            cstore(cload(out + 2 * os) + a2, out + 2 * os); cstore(cload(out + 3 * os) + a3, out + 3 * os)
            cstore(cload(out + 4 * os) + a4, out + 4 * os); cstore(cload(out + 5 * os) + a5, out + 5 * os)
            cstore(cload(out + 6 * os) + a6, out + 6 * os); cstore(cload(out + 7 * os) + a7, out + 7 * os)
        }

        /// Copies input plane dIn of sample n (both sources) into a zero-bordered padded plane; a plane
        /// outside 0..<D becomes all zeros.
        static func fillPlane(_ dst: UnsafeMutablePointer<Float>, x1: UnsafePointer<Float>, x2: UnsafePointer<Float>?,
                              n: Int, dIn: Int, s: Shape, g: Geometry, transform: InputTransform?) {
            if dIn < 0 || dIn >= s.d {
                dst.initialize(repeating: 0, count: g.planeFloats)
                return
            }
            let cin = g.cin, c1 = s.cin1, c2 = s.cin2
            // Top border row and the left pad of row 1.
            dst.initialize(repeating: 0, count: (g.wp + 1) * cin)
            for h in 0..<s.h {
                let row = dst + ((h + 1) * g.wp + 1) * cin
                let src = (((n * s.d + dIn) * s.h + h) * s.w)
                if x2 == nil {
                    row.update(from: x1 + src * c1, count: s.w * c1)
                } else if let x2 {
                    for w in 0..<s.w {
                        (row + w * cin).update(from: x1 + (src + w) * c1, count: c1)
                        (row + w * cin + c1).update(from: x2 + (src + w) * c2, count: c2)
                    }
                }
                if let transform { applyTransform(transform, row: row, voxels: s.w, cin: cin, sample: n) }
                // Right pad of this row and left pad of the next.
                (row + s.w * cin).initialize(repeating: 0, count: 2 * cin)
            }
            // The rest of the bottom border row and the slack.
            let tail = ((s.h + 1) * g.wp + 1) * cin
            (dst + tail).initialize(repeating: 0, count: g.planeFloats - tail)
        }

        /// row[v][c] = f(scale[n][c] row[v][c] + shift[n][c]) for `voxels` voxels of `cin` channels.
        static func applyTransform(_ t: InputTransform, row: UnsafeMutablePointer<Float>, voxels: Int, cin: Int,
                                   sample n: Int) {
            let a = t.scale + n * cin, b = t.shift + n * cin
            let slope = t.leakySlope
            let vs = SIMD16<Float>(repeating: slope ?? 1), zero = SIMD16<Float>()
            for v in 0..<voxels {
                let p = row + v * cin
                var c = 0
                while c + 16 <= cin {
                    var x = cload(b + c).addingProduct(cload(a + c), cload(p + c))
                    if slope != nil { x = x.replacing(with: x * vs, where: x .< zero) }
                    cstore(x, p + c)
                    c += 16
                }
                while c < cin {
                    var x = b[c] + a[c] * p[c]
                    if let slope, x < 0 { x *= slope }
                    p[c] = x
                    c += 1
                }
            }
        }

        /// One output plane: for each block of output channels and each group of tiles, sweep the weight
        /// chunks, then copy the group's real voxels (+ bias) to y. Blocks are 48 channels wide (tiles
        /// of 8 voxels), or, for convs with at most 16 outputs, 16 wide (three tiles at once: 24 voxels).
        static func computePlane(bases: UnsafePointer<UnsafePointer<Float>>, packed: UnsafePointer<Float>,
                                 bias: UnsafePointer<Float>?, out: Output, plane: Int,
                                 acc: UnsafeMutablePointer<Float>, s: Shape, g: Geometry,
                                 stats: Statistics?, part: Int, sample: Int) {
            let planeVoxel0 = plane * s.h * s.w
            let cin = g.cin
            let bw = s.packing.blockWidth
            let narrow = bw == 16
            let chunk = tapsPerChunk(cin: cin, width: bw)
            let group = narrow ? 15 : groupTiles   // a multiple of 3 for the narrow tile
            for cb in 0..<(s.cout + bw - 1) / bw {
                let wBlock = packed + cb * 27 * cin * bw
                let valid = min(bw, s.cout - cb * bw)
                var t0 = 0
                while t0 < g.tiles {
                    let t1 = min(g.tiles, t0 + group)
                    var tap = 0
                    while tap < 27 {
                        let w = wBlock + tap * cin * bw
                        if narrow {
                            // Three tiles of 8 voxels at a time (past t1 they repeat the plane's last voxel
                            // into accumulator rows nobody copies out).
                            var t = t0
                            while t < t1 {
                                let a = acc + (t - t0) * (8 * 16)
                                let v0 = t * Conv3d.tileVoxels
                                if g.byRows {
                                    tile24x16(bases + tap, chunk, g.position(v0) * cin, g.position(v0 + 8) * cin,
                                              g.position(v0 + 16) * cin, cin, w, a, tap > 0)
                                } else {
                                    withUnsafeTemporaryAllocation(of: Int.self, capacity: 24) { o in
                                        guard let op = o.baseAddress else { return }
                                        for k in 0..<24 { op[k] = g.position(v0 + k) * cin }
                                        tile24x16Gather(bases + tap, chunk, UnsafePointer(op), cin, w, a, tap > 0)
                                    }
                                }
                                t += 3
                            }
                        } else {
                            for t in t0..<t1 {
                                let a = acc + (t - t0) * (8 * 48)
                                let v0 = t * Conv3d.tileVoxels
                                if g.byRows {
                                    tile8x48(bases + tap, chunk, g.position(v0) * cin, cin, w, a, tap > 0)
                                } else {
                                    let o = (g.position(v0) * cin, g.position(v0 + 1) * cin, g.position(v0 + 2) * cin,
                                             g.position(v0 + 3) * cin, g.position(v0 + 4) * cin, g.position(v0 + 5) * cin,
                                             g.position(v0 + 6) * cin, g.position(v0 + 7) * cin)
                                    tile8x48Gather(bases + tap, chunk, o, cin, w, a, tap > 0)
                                }
                            }
                        }
                        tap += chunk
                    }
                    // Copy out the tiles' voxels (+ bias) to y.
                    let vStart = t0 * Conv3d.tileVoxels
                    let vEnd = min(t1 * Conv3d.tileVoxels, s.h * s.w)
                    let lo = cb * bw
                    for v in vStart..<vEnd {
                        write(UnsafePointer(acc + (v - vStart) * bw), voxel: planeVoxel0 + v, lo: lo, valid: valid,
                              out: out, bias: bias)
                    }
                    if let stats {
                        stats.add(part: part, sample: sample, rows: out.y1 + (planeVoxel0 + vStart) * out.c1 + lo,
                                  count: vEnd - vStart, stride: out.c1, c0: lo, channels: valid)
                    }
                    t0 = t1
                }
            }
        }

        /// Writes (or adds) output channels lo ..< lo + valid of one voxel from src (+ bias) to `out`:
        /// to y1, to y2, or split between them when the block straddles the two (only input gradients
        /// have two).
        @inline(__always)
        static func write(_ src: UnsafePointer<Float>, voxel vox: Int, lo: Int, valid: Int, out: Output,
                          bias: UnsafePointer<Float>?) {
            if lo + valid <= out.c1 {
                copyOut(src, out.y1 + vox * out.c1 + lo, valid, bias.map { $0 + lo }, out.accumulate)
            } else if let y2 = out.y2, lo >= out.c1 {
                copyOut(src, y2 + vox * out.c2 + lo - out.c1, valid, nil, out.accumulate)
            } else if let y2 = out.y2 {
                let first = out.c1 - lo
                copyOut(src, out.y1 + vox * out.c1 + lo, first, nil, out.accumulate)
                copyOut(src + first, y2 + vox * out.c2, valid - first, nil, out.accumulate)
            }
        }

        /// dst[0 ..< count] = (or +=) src + bias.
        @inline(__always)
        static func copyOut(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>, _ count: Int,
                            _ bias: UnsafePointer<Float>?, _ accumulate: Bool) {
            if count == 48 {
                var v0 = cload(src), v1 = cload(src + 16), v2 = cload(src + 32)
                if let bias { v0 += cload(bias); v1 += cload(bias + 16); v2 += cload(bias + 32) }
                if accumulate { v0 += cload(dst); v1 += cload(dst + 16); v2 += cload(dst + 32) }
                cstore(v0, dst); cstore(v1, dst + 16); cstore(v2, dst + 32)
                return
            }
            if count == 16 {
                var v0 = cload(src)
                if let bias { v0 += cload(bias) }
                if accumulate { v0 += cload(dst) }
                cstore(v0, dst)
                return
            }
            for q in 0..<count {
                let v = src[q] + (bias?[q] ?? 0)
                dst[q] = accumulate ? dst[q] + v : v
            }
        }

        /// The narrow register tile: three runs of 8 consecutive padded positions (at offsets o0, o1, o2
        /// from each tap's base pointer) x 16 output channels, 24 accumulators. Weights: [tap][cin][16].
        /// acc holds 24 rows of 16 floats.
        @inline(__always)
        static func tile24x16(_ bases: UnsafePointer<UnsafePointer<Float>>, _ taps: Int, _ o0: Int, _ o1: Int, _ o2: Int,
                              _ cin: Int, _ w: UnsafePointer<Float>, _ acc: UnsafeMutablePointer<Float>, _ accumulate: Bool) {
            typealias V = SIMD16<Float>
            var a0 = V(), a1 = V(), a2 = V(), a3 = V(), a4 = V(), a5 = V(), a6 = V(), a7 = V()
            var b0 = V(), b1 = V(), b2 = V(), b3 = V(), b4 = V(), b5 = V(), b6 = V(), b7 = V()
            var c0 = V(), c1 = V(), c2 = V(), c3 = V(), c4 = V(), c5 = V(), c6 = V(), c7 = V()
            if accumulate {
                a0 = cload(acc); a1 = cload(acc + 16); a2 = cload(acc + 32); a3 = cload(acc + 48)
                a4 = cload(acc + 64); a5 = cload(acc + 80); a6 = cload(acc + 96); a7 = cload(acc + 112)
                b0 = cload(acc + 128); b1 = cload(acc + 144); b2 = cload(acc + 160); b3 = cload(acc + 176)
                b4 = cload(acc + 192); b5 = cload(acc + 208); b6 = cload(acc + 224); b7 = cload(acc + 240)
                c0 = cload(acc + 256); c1 = cload(acc + 272); c2 = cload(acc + 288); c3 = cload(acc + 304)
                c4 = cload(acc + 320); c5 = cload(acc + 336); c6 = cload(acc + 352); c7 = cload(acc + 368)
            }
            var wp = w
            let s1 = cin, s2 = 2 &* cin, s3 = 3 &* cin, s4 = 4 &* cin, s5 = 5 &* cin, s6 = 6 &* cin, s7 = 7 &* cin
            for t in 0..<taps {
                let base = bases[t]
                var p = base + o0, q = base + o1, r = base + o2
                let end = p + cin
                while p < end {
                    let wv = cload(wp)
                    a0 = a0.addingProduct(V(repeating: p[0]), wv); a1 = a1.addingProduct(V(repeating: p[s1]), wv)
                    a2 = a2.addingProduct(V(repeating: p[s2]), wv); a3 = a3.addingProduct(V(repeating: p[s3]), wv)
                    a4 = a4.addingProduct(V(repeating: p[s4]), wv); a5 = a5.addingProduct(V(repeating: p[s5]), wv)
                    a6 = a6.addingProduct(V(repeating: p[s6]), wv); a7 = a7.addingProduct(V(repeating: p[s7]), wv)
                    b0 = b0.addingProduct(V(repeating: q[0]), wv); b1 = b1.addingProduct(V(repeating: q[s1]), wv)
                    b2 = b2.addingProduct(V(repeating: q[s2]), wv); b3 = b3.addingProduct(V(repeating: q[s3]), wv)
                    b4 = b4.addingProduct(V(repeating: q[s4]), wv); b5 = b5.addingProduct(V(repeating: q[s5]), wv)
                    b6 = b6.addingProduct(V(repeating: q[s6]), wv); b7 = b7.addingProduct(V(repeating: q[s7]), wv)
                    c0 = c0.addingProduct(V(repeating: r[0]), wv); c1 = c1.addingProduct(V(repeating: r[s1]), wv)
                    c2 = c2.addingProduct(V(repeating: r[s2]), wv); c3 = c3.addingProduct(V(repeating: r[s3]), wv)
                    c4 = c4.addingProduct(V(repeating: r[s4]), wv); c5 = c5.addingProduct(V(repeating: r[s5]), wv)
                    c6 = c6.addingProduct(V(repeating: r[s6]), wv); c7 = c7.addingProduct(V(repeating: r[s7]), wv)
                    wp += 16
                    p += 1; q += 1; r += 1
                }
            }
            cstore(a0, acc); cstore(a1, acc + 16); cstore(a2, acc + 32); cstore(a3, acc + 48)
            cstore(a4, acc + 64); cstore(a5, acc + 80); cstore(a6, acc + 96); cstore(a7, acc + 112)
            cstore(b0, acc + 128); cstore(b1, acc + 144); cstore(b2, acc + 160); cstore(b3, acc + 176)
            cstore(b4, acc + 192); cstore(b5, acc + 208); cstore(b6, acc + 224); cstore(b7, acc + 240)
            cstore(c0, acc + 256); cstore(c1, acc + 272); cstore(c2, acc + 288); cstore(c3, acc + 304)
            cstore(c4, acc + 320); cstore(c5, acc + 336); cstore(c6, acc + 352); cstore(c7, acc + 368)
        }

        /// `tile24x16` for 24 voxels at any offsets o[0..<24] (planes whose W is not a multiple of 8).
        @inline(__always)
        static func tile24x16Gather(_ bases: UnsafePointer<UnsafePointer<Float>>, _ taps: Int, _ o: UnsafePointer<Int>,
                                    _ cin: Int, _ w: UnsafePointer<Float>, _ acc: UnsafeMutablePointer<Float>,
                                    _ accumulate: Bool) {
            typealias V = SIMD16<Float>
            // 24 accumulators in a stack buffer of vectors (no heap array: this runs once per tile); this
            // path only serves awkward widths, so clarity wins over the last percent.
            withUnsafeTemporaryAllocation(of: V.self, capacity: 24) { a in
                for k in 0..<24 { a[k] = accumulate ? cload(acc + 16 * k) : V() }
                var wp = w
                for t in 0..<taps {
                    let base = bases[t]
                    for ci in 0..<cin {
                        let wv = cload(wp)
                        for k in 0..<24 { a[k] = a[k].addingProduct(V(repeating: base[o[k] &+ ci]), wv) }
                        wp += 16
                    }
                }
                for k in 0..<24 { cstore(a[k], acc + 16 * k) }
            }
        }

        /// The register tile: 8 consecutive padded positions x 48 output channels, accumulated over
        /// `taps` taps (base pointers in `bases`) and `cin` input channels. Weights: [tap][cin][48].
        @inline(__always)
        static func tile8x48(_ bases: UnsafePointer<UnsafePointer<Float>>, _ taps: Int, _ offset: Int, _ cin: Int,
                             _ w: UnsafePointer<Float>, _ acc: UnsafeMutablePointer<Float>, _ accumulate: Bool) {
            typealias V = SIMD16<Float>
            var a0 = V(), a1 = V(), a2 = V(), a3 = V(), a4 = V(), a5 = V(), a6 = V(), a7 = V()
            var b0 = V(), b1 = V(), b2 = V(), b3 = V(), b4 = V(), b5 = V(), b6 = V(), b7 = V()
            var c0 = V(), c1 = V(), c2 = V(), c3 = V(), c4 = V(), c5 = V(), c6 = V(), c7 = V()
            if accumulate {
                a0 = cload(acc + 0 * 48); b0 = cload(acc + 0 * 48 + 16); c0 = cload(acc + 0 * 48 + 32)
                a1 = cload(acc + 1 * 48); b1 = cload(acc + 1 * 48 + 16); c1 = cload(acc + 1 * 48 + 32)
                a2 = cload(acc + 2 * 48); b2 = cload(acc + 2 * 48 + 16); c2 = cload(acc + 2 * 48 + 32)
                a3 = cload(acc + 3 * 48); b3 = cload(acc + 3 * 48 + 16); c3 = cload(acc + 3 * 48 + 32)
                a4 = cload(acc + 4 * 48); b4 = cload(acc + 4 * 48 + 16); c4 = cload(acc + 4 * 48 + 32)
                a5 = cload(acc + 5 * 48); b5 = cload(acc + 5 * 48 + 16); c5 = cload(acc + 5 * 48 + 32)
                a6 = cload(acc + 6 * 48); b6 = cload(acc + 6 * 48 + 16); c6 = cload(acc + 6 * 48 + 32)
                a7 = cload(acc + 7 * 48); b7 = cload(acc + 7 * 48 + 16); c7 = cload(acc + 7 * 48 + 32)
            }
            var wp = w
            let s1 = cin, s2 = 2 &* cin, s3 = 3 &* cin, s4 = 4 &* cin
            for t in 0..<taps {
                var p = bases[t] + offset
                let p4end = p + cin
                while p < p4end {
                    let w0 = cload(wp), w1 = cload(wp + 16), w2 = cload(wp + 32)
                    let q = p + s4
                    var x = V(repeating: p[0])
                    a0 = a0.addingProduct(x, w0); b0 = b0.addingProduct(x, w1); c0 = c0.addingProduct(x, w2)
                    x = V(repeating: p[s1])
                    a1 = a1.addingProduct(x, w0); b1 = b1.addingProduct(x, w1); c1 = c1.addingProduct(x, w2)
                    x = V(repeating: p[s2])
                    a2 = a2.addingProduct(x, w0); b2 = b2.addingProduct(x, w1); c2 = c2.addingProduct(x, w2)
                    x = V(repeating: p[s3])
                    a3 = a3.addingProduct(x, w0); b3 = b3.addingProduct(x, w1); c3 = c3.addingProduct(x, w2)
                    x = V(repeating: q[0])
                    a4 = a4.addingProduct(x, w0); b4 = b4.addingProduct(x, w1); c4 = c4.addingProduct(x, w2)
                    x = V(repeating: q[s1])
                    a5 = a5.addingProduct(x, w0); b5 = b5.addingProduct(x, w1); c5 = c5.addingProduct(x, w2)
                    x = V(repeating: q[s2])
                    a6 = a6.addingProduct(x, w0); b6 = b6.addingProduct(x, w1); c6 = c6.addingProduct(x, w2)
                    x = V(repeating: q[s3])
                    a7 = a7.addingProduct(x, w0); b7 = b7.addingProduct(x, w1); c7 = c7.addingProduct(x, w2)
                    wp += 48
                    p += 1
                }
            }
            cstore(a0, acc + 0 * 48); cstore(b0, acc + 0 * 48 + 16); cstore(c0, acc + 0 * 48 + 32)
            cstore(a1, acc + 1 * 48); cstore(b1, acc + 1 * 48 + 16); cstore(c1, acc + 1 * 48 + 32)
            cstore(a2, acc + 2 * 48); cstore(b2, acc + 2 * 48 + 16); cstore(c2, acc + 2 * 48 + 32)
            cstore(a3, acc + 3 * 48); cstore(b3, acc + 3 * 48 + 16); cstore(c3, acc + 3 * 48 + 32)
            cstore(a4, acc + 4 * 48); cstore(b4, acc + 4 * 48 + 16); cstore(c4, acc + 4 * 48 + 32)
            cstore(a5, acc + 5 * 48); cstore(b5, acc + 5 * 48 + 16); cstore(c5, acc + 5 * 48 + 32)
            cstore(a6, acc + 6 * 48); cstore(b6, acc + 6 * 48 + 16); cstore(c6, acc + 6 * 48 + 32)
            cstore(a7, acc + 7 * 48); cstore(b7, acc + 7 * 48 + 16); cstore(c7, acc + 7 * 48 + 32)
        }

        /// `tile8x48` for 8 voxels at any offsets o (in floats from each tap's base pointer): the tiles
        /// of planes whose W is not a multiple of 8 cross row ends.
        @inline(__always)
        static func tile8x48Gather(_ bases: UnsafePointer<UnsafePointer<Float>>, _ taps: Int,
                                   _ o: (Int, Int, Int, Int, Int, Int, Int, Int), _ cin: Int,
                                   _ w: UnsafePointer<Float>, _ acc: UnsafeMutablePointer<Float>, _ accumulate: Bool) {
            typealias V = SIMD16<Float>
            var a0 = V(), a1 = V(), a2 = V(), a3 = V(), a4 = V(), a5 = V(), a6 = V(), a7 = V()
            var b0 = V(), b1 = V(), b2 = V(), b3 = V(), b4 = V(), b5 = V(), b6 = V(), b7 = V()
            var c0 = V(), c1 = V(), c2 = V(), c3 = V(), c4 = V(), c5 = V(), c6 = V(), c7 = V()
            if accumulate {
                a0 = cload(acc + 0 * 48); b0 = cload(acc + 0 * 48 + 16); c0 = cload(acc + 0 * 48 + 32)
                a1 = cload(acc + 1 * 48); b1 = cload(acc + 1 * 48 + 16); c1 = cload(acc + 1 * 48 + 32)
                a2 = cload(acc + 2 * 48); b2 = cload(acc + 2 * 48 + 16); c2 = cload(acc + 2 * 48 + 32)
                a3 = cload(acc + 3 * 48); b3 = cload(acc + 3 * 48 + 16); c3 = cload(acc + 3 * 48 + 32)
                a4 = cload(acc + 4 * 48); b4 = cload(acc + 4 * 48 + 16); c4 = cload(acc + 4 * 48 + 32)
                a5 = cload(acc + 5 * 48); b5 = cload(acc + 5 * 48 + 16); c5 = cload(acc + 5 * 48 + 32)
                a6 = cload(acc + 6 * 48); b6 = cload(acc + 6 * 48 + 16); c6 = cload(acc + 6 * 48 + 32)
                a7 = cload(acc + 7 * 48); b7 = cload(acc + 7 * 48 + 16); c7 = cload(acc + 7 * 48 + 32)
            }
            var wp = w
            let (o0, o1, o2, o3, o4, o5, o6, o7) = o
            for t in 0..<taps {
                var p = bases[t]
                let pEnd = p + cin
                while p < pEnd {
                    let w0 = cload(wp), w1 = cload(wp + 16), w2 = cload(wp + 32)
                    var x = V(repeating: p[o0])
                    a0 = a0.addingProduct(x, w0); b0 = b0.addingProduct(x, w1); c0 = c0.addingProduct(x, w2)
                    x = V(repeating: p[o1])
                    a1 = a1.addingProduct(x, w0); b1 = b1.addingProduct(x, w1); c1 = c1.addingProduct(x, w2)
                    x = V(repeating: p[o2])
                    a2 = a2.addingProduct(x, w0); b2 = b2.addingProduct(x, w1); c2 = c2.addingProduct(x, w2)
                    x = V(repeating: p[o3])
                    a3 = a3.addingProduct(x, w0); b3 = b3.addingProduct(x, w1); c3 = c3.addingProduct(x, w2)
                    x = V(repeating: p[o4])
                    a4 = a4.addingProduct(x, w0); b4 = b4.addingProduct(x, w1); c4 = c4.addingProduct(x, w2)
                    x = V(repeating: p[o5])
                    a5 = a5.addingProduct(x, w0); b5 = b5.addingProduct(x, w1); c5 = c5.addingProduct(x, w2)
                    x = V(repeating: p[o6])
                    a6 = a6.addingProduct(x, w0); b6 = b6.addingProduct(x, w1); c6 = c6.addingProduct(x, w2)
                    x = V(repeating: p[o7])
                    a7 = a7.addingProduct(x, w0); b7 = b7.addingProduct(x, w1); c7 = c7.addingProduct(x, w2)
                    wp += 48
                    p += 1
                }
            }
            cstore(a0, acc + 0 * 48); cstore(b0, acc + 0 * 48 + 16); cstore(c0, acc + 0 * 48 + 32)
            cstore(a1, acc + 1 * 48); cstore(b1, acc + 1 * 48 + 16); cstore(c1, acc + 1 * 48 + 32)
            cstore(a2, acc + 2 * 48); cstore(b2, acc + 2 * 48 + 16); cstore(c2, acc + 2 * 48 + 32)
            cstore(a3, acc + 3 * 48); cstore(b3, acc + 3 * 48 + 16); cstore(c3, acc + 3 * 48 + 32)
            cstore(a4, acc + 4 * 48); cstore(b4, acc + 4 * 48 + 16); cstore(c4, acc + 4 * 48 + 32)
            cstore(a5, acc + 5 * 48); cstore(b5, acc + 5 * 48 + 16); cstore(c5, acc + 5 * 48 + 32)
            cstore(a6, acc + 6 * 48); cstore(b6, acc + 6 * 48 + 16); cstore(c6, acc + 6 * 48 + 32)
            cstore(a7, acc + 7 * 48); cstore(b7, acc + 7 * 48 + 16); cstore(c7, acc + 7 * 48 + 32)
        }
    }
}

// MARK: SIMD helpers shared by the conv kernels (Conv3d, ConvTranspose3d, DepthwiseConv3d)

@inline(__always) func cload(_ p: UnsafePointer<Float>) -> SIMD16<Float> {
    UnsafeRawPointer(p).loadUnaligned(as: SIMD16<Float>.self)
}
@inline(__always) func cload(_ p: UnsafeMutablePointer<Float>) -> SIMD16<Float> {
    UnsafeRawPointer(p).loadUnaligned(as: SIMD16<Float>.self)
}
@inline(__always) func cstore(_ v: SIMD16<Float>, _ p: UnsafeMutablePointer<Float>) {
    UnsafeMutableRawPointer(p).storeBytes(of: v, as: SIMD16<Float>.self)
}
