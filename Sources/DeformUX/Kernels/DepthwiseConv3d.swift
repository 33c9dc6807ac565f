/// Depthwise 3D convolution, kernel k (odd), stride 1, padding k/2, with bias: 3D UX-Net's
/// `dwconv` (Conv3d(C, C, 7, padding 3, groups C)), forward and backward, channels-last.
///
///     x       N x D x H x W x C
///     weight  C x 1 x k x k x k      (PyTorch layout; `pack` turns it into [tap][C rounded up to 16])
///     bias    C (optional)
///     y       N x D x H x W x C
///
/// SIMD over channels: each thread owns a run of output planes and keeps the k input planes it needs
/// in a ring of planes padded by k/2 in H and W (channels rounded up to 16, zero); planes outside the
/// volume are skipped. A register tile is 8 output voxels along W x 16 channels.
/// `ConvReference.conv3d(..., groups: C)` is the oracle.
public enum DepthwiseConv3d {
    public struct Shape: Equatable, Sendable, CustomStringConvertible {
        public var n: Int, c: Int, d: Int, h: Int, w: Int, kernel: Int

        public init(n: Int, c: Int, d: Int, h: Int, w: Int, kernel: Int = 7) throws {
            for (name, v) in [("N", n), ("C", c), ("D", d), ("H", h), ("W", w), ("kernel", kernel)] where v < 1 {
                throw DeformUXError.invalidArgument("depthwise_conv3d", "\(name) must be >= 1, got \(v)")
            }
            guard kernel % 2 == 1 else {
                throw DeformUXError.invalidArgument("depthwise_conv3d", "the kernel must be odd (padding k/2 keeps the size), got \(kernel)")
            }
            _ = try Tensor.elementCount([n, d + kernel, h + kernel, w + kernel + 16, c + 16, kernel], context: "depthwise_conv3d")
            self.n = n; self.c = c; self.d = d; self.h = h; self.w = w; self.kernel = kernel
        }

        public var padding: Int { kernel / 2 }
        public var taps: Int { kernel * kernel * kernel }
        /// Elements of x (and y).
        public var count: Int { n * d * h * w * c }
        /// Elements of the PyTorch weight C x 1 x k x k x k.
        public var weightCount: Int { c * taps }
        public var macs: Int { count * taps }
        /// Channels rounded up to a multiple of 16.
        public var cp: Int { (c + 15) / 16 * 16 }
        public var description: String { "N=\(n) C=\(c) \(d)x\(h)x\(w) k\(kernel)" }
    }

    public static func packedCount(_ s: Shape) -> Int { s.taps * s.cp }

    /// packed[t * cp + c] = weight[c * k^3 + t]; padding channels 0.
    public static func pack(weight: UnsafePointer<Float>, into packed: UnsafeMutablePointer<Float>, shape s: Shape) {
        pack(weight: weight, into: packed, channels: s.c, taps: s.taps)
    }

    /// The packing depends on the channels and the kernel only.
    public static func pack(weight: UnsafePointer<Float>, into packed: UnsafeMutablePointer<Float>, channels c: Int, taps: Int) {
        let cp = (c + 15) / 16 * 16
        packed.initialize(repeating: 0, count: taps * cp)
        for ch in 0..<c {
            for t in 0..<taps { packed[t * cp + ch] = weight[ch * taps + t] }
        }
    }

    // MARK: Tensor API (validated)

    /// y = depthwise conv3d(x, weight, bias), x channels-last N x D x H x W x C, weight C x 1 x k x k x k.
    public static func forward(x: Tensor, weight: Tensor, bias: Tensor?, workspace: Workspace? = nil) throws -> Tensor {
        let op = "depthwise_conv3d"
        guard x.rank == 5 else {
            throw DeformUXError.shapeMismatch(op, "x must be N x D x H x W x C (channels-last, rank 5), got shape \(x.shape)")
        }
        let c = x.shape[4]
        guard weight.rank == 5, weight.shape[0] == c, weight.shape[1] == 1, weight.shape[2] == weight.shape[3],
              weight.shape[3] == weight.shape[4] else {
            throw DeformUXError.shapeMismatch(op, "weight must be C x 1 x k x k x k with C = \(c), got shape \(weight.shape)")
        }
        let s = try Shape(n: x.shape[0], c: c, d: x.shape[1], h: x.shape[2], w: x.shape[3], kernel: weight.shape[2])
        if let bias, bias.shape != [c] {
            throw DeformUXError.shapeMismatch(op, "bias must have shape [\(c)], got \(bias.shape)")
        }
        try x.requireContiguous("\(op) x")
        try weight.requireContiguous("\(op) weight")
        try bias?.requireContiguous("\(op) bias")
        let packed = try Tensor(zeros: [packedCount(s)])
        pack(weight: weight.pointer, into: packed.pointer, shape: s)
        let y = try Tensor(zeros: x.shape)
        try forward(x: x.pointer, packedWeight: packed.pointer, bias: bias?.pointer, y: y.pointer, shape: s,
                    workspace: workspace ?? Workspace())
        return y
    }

    // MARK: Pointer API

    /// Writes y (overwrites). Throws only when scratch memory cannot be had.
    public static func forward(x: UnsafePointer<Float>, packedWeight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
                               y: UnsafeMutablePointer<Float>, shape s: Shape, workspace: Workspace) throws {
        try run(x: x, packedWeight: packedWeight, bias: bias, y: y, shape: s, workspace: workspace, accumulate: false)
    }

    /// Adds the gradients of `forward`: gradX (N x D x H x W x C) += dL/dx, gradWeight (C x 1 x k x k x k,
    /// PyTorch layout) += dL/dW, gradBias (C) += dL/db; any may be nil. The input gradient is the same
    /// kernel on grad_y with the taps flipped; the weight and bias gradients are per-part sums (taps x C)
    /// over each part's planes, added in part order.
    public static func backward(x: UnsafePointer<Float>, packedWeight: UnsafePointer<Float>, gradY: UnsafePointer<Float>,
                                gradX: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>?,
                                gradBias: UnsafeMutablePointer<Float>?, shape s: Shape, workspace: Workspace) throws {
        let taps = s.taps, cp = s.cp
        if let gradX {
            // The forward's packed taps in reverse order (padding channels stay 0).
            let flipped = try workspace.buffer("depthwise_conv3d.flipped", count: packedCount(s))
            for t in 0..<taps { (flipped + (taps - 1 - t) * cp).update(from: packedWeight + t * cp, count: cp) }
            try run(x: gradY, packedWeight: flipped, bias: nil, y: gradX, shape: s, workspace: workspace, accumulate: true)
        }
        if gradWeight == nil && gradBias == nil { return }
        let k = s.kernel, p = s.padding
        let hp = s.h + 2 * p, wp = s.w + 2 * p
        let planeFloats = (hp * wp + 16) * cp
        let planes = s.n * s.d
        let parts = max(1, min(Threads.count, planes))
        let sums = (taps + 1) * cp  // weight gradient [tap][cp], then the bias gradient
        let perPart = k * planeFloats + sums
        let scratch = try workspace.buffer("depthwise_conv3d.ring", count: parts * perPart)
        parallelFor(parts) { part in
            let ring = scratch + part * perPart
            let gw = ring + k * planeFloats, gb = gw + taps * cp
            gw.initialize(repeating: 0, count: sums)
            withUnsafeTemporaryAllocation(of: Int.self, capacity: k) { loadedBuf in
                guard let loaded = loadedBuf.baseAddress else { return }
                loaded.initialize(repeating: -1, count: k)
                for plane in Threads.range(part, of: parts, total: planes) {
                    let n = plane / s.d, d = plane % s.d
                    let lo = max(0, d - p), hi = min(s.d - 1, d + p)
                    for dIn in lo...hi {
                        let slot = dIn % k
                        let key = n * s.d + dIn
                        if loaded[slot] != key {
                            fillPlane(ring + slot * planeFloats, x: x + (n * s.d + dIn) * s.h * s.w * s.c, s: s,
                                      hp: hp, wp: wp, planeFloats: planeFloats)
                            loaded[slot] = key
                        }
                    }
                    let gyPlane = gradY + plane * s.h * s.w * s.c
                    for h in 0..<s.h {
                        var w0 = 0
                        while w0 < s.w {
                            let valid = min(8, s.w - w0)
                            for cv in stride(from: 0, to: cp, by: 16) {
                                weightTile8(ring: ring, planeFloats: planeFloats, lo: lo, hi: hi, d: d, k: k,
                                            rowBase: (h * wp + w0) * cp + cv, wp: wp, cp: cp,
                                            gy: gyPlane + (h * s.w + w0) * s.c + cv, cy: s.c, valid: valid,
                                            lanes: min(16, s.c - cv), gw: gw + cv, gb: gb + cv)
                            }
                            w0 += 8
                        }
                    }
                }
            }
        }
        for part in 0..<parts {
            let gw = scratch + part * perPart + k * planeFloats, gb = gw + taps * cp
            if let gradWeight {
                for c in 0..<s.c {
                    for t in 0..<taps { gradWeight[c * taps + t] += gw[t * cp + c] }
                }
            }
            if let gradBias {
                for c in 0..<s.c { gradBias[c] += gb[c] }
            }
        }
    }

    /// For 8 output voxels along W x 16 channels: gw[tap] += sum_j gy_j * x_{j + tap}, gb += sum_j gy_j.
    @inline(__always)
    static func weightTile8(ring: UnsafeMutablePointer<Float>, planeFloats: Int, lo: Int, hi: Int, d: Int, k: Int,
                            rowBase: Int, wp: Int, cp: Int, gy: UnsafePointer<Float>, cy: Int, valid: Int, lanes: Int,
                            gw: UnsafeMutablePointer<Float>, gb: UnsafeMutablePointer<Float>) {
        typealias V = SIMD16<Float>
        @inline(__always) func load(_ j: Int) -> V {
            if j >= valid { return V() }
            if lanes == 16 { return cload(gy + j * cy) }
            var v = V()
            for l in 0..<lanes { v[l] = gy[j * cy + l] }
            return v
        }
        let g0 = load(0), g1 = load(1), g2 = load(2), g3 = load(3)
        let g4 = load(4), g5 = load(5), g6 = load(6), g7 = load(7)
        cstore(cload(gb) + (((g0 + g1) + (g2 + g3)) + ((g4 + g5) + (g6 + g7))), gb)
        let p = k / 2
        for dIn in lo...hi {
            let kd = dIn - d + p
            let plane = ring + (dIn % k) * planeFloats + rowBase
            for kh in 0..<k {
                let xr = plane + kh * wp * cp
                let wr = gw + (kd * k + kh) * k * cp
                var x0 = cload(xr), x1 = cload(xr + cp), x2 = cload(xr + 2 * cp), x3 = cload(xr + 3 * cp)
                var x4 = cload(xr + 4 * cp), x5 = cload(xr + 5 * cp), x6 = cload(xr + 6 * cp)
                for kw in 0..<k {
                    let x7 = cload(xr + (kw + 7) * cp)
                    var a = g0 * x0
                    var b = g1 * x1
                    a = a.addingProduct(g2, x2); b = b.addingProduct(g3, x3)
                    a = a.addingProduct(g4, x4); b = b.addingProduct(g5, x5)
                    a = a.addingProduct(g6, x6); b = b.addingProduct(g7, x7)
                    cstore(cload(wr + kw * cp) + (a + b), wr + kw * cp)
                    x0 = x1; x1 = x2; x2 = x3; x3 = x4; x4 = x5; x5 = x6; x6 = x7
                }
            }
        }
    }

    static func run(x: UnsafePointer<Float>, packedWeight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
                    y: UnsafeMutablePointer<Float>, shape s: Shape, workspace: Workspace, accumulate: Bool) throws {
        let k = s.kernel, p = s.padding, cp = s.cp
        let hp = s.h + 2 * p, wp = s.w + 2 * p
        // A padded plane, plus slack: the last tile of a row reads up to 7 voxels past the row's end.
        let planeFloats = (hp * wp + 16) * cp
        let planes = s.n * s.d
        let parts = max(1, min(Threads.count, planes))
        let perPart = k * planeFloats + cp
        let scratch = try workspace.buffer("depthwise_conv3d.ring", count: parts * perPart)
        parallelFor(parts) { part in
            let ring = scratch + part * perPart
            let biasP = ring + k * planeFloats
            biasP.initialize(repeating: 0, count: cp)
            if let bias { biasP.update(from: bias, count: s.c) }
            withUnsafeTemporaryAllocation(of: Int.self, capacity: k) { loadedBuf in
                guard let loaded = loadedBuf.baseAddress else { return }
                loaded.initialize(repeating: -1, count: k)
                for plane in Threads.range(part, of: parts, total: planes) {
                    let n = plane / s.d, d = plane % s.d
                    // Input planes d - p ... d + p that exist, in the ring (slot dIn mod k).
                    let lo = max(0, d - p), hi = min(s.d - 1, d + p)
                    for dIn in lo...hi {
                        let slot = dIn % k
                        let key = n * s.d + dIn
                        if loaded[slot] != key {
                            fillPlane(ring + slot * planeFloats, x: x + (n * s.d + dIn) * s.h * s.w * s.c, s: s,
                                      hp: hp, wp: wp, planeFloats: planeFloats)
                            loaded[slot] = key
                        }
                    }
                    let yPlane = y + plane * s.h * s.w * s.c
                    for h in 0..<s.h {
                        var w0 = 0
                        while w0 < s.w {
                            let valid = min(8, s.w - w0)
                            for cv in stride(from: 0, to: cp, by: 16) {
                                tile8(ring: ring, planeFloats: planeFloats, lo: lo, hi: hi, d: d, k: k,
                                      rowBase: (h * wp + w0) * cp + cv, wp: wp, cp: cp,
                                      w: packedWeight + cv, bias: biasP + cv,
                                      y: yPlane + (h * s.w + w0) * s.c + cv, cy: s.c, valid: valid,
                                      lanes: min(16, s.c - cv), accumulate: accumulate)
                            }
                            w0 += 8
                        }
                    }
                }
            }
        }
    }

    /// x plane (H x W x C) into a zero-bordered padded plane (H + 2p) x (W + 2p) x cp.
    static func fillPlane(_ dst: UnsafeMutablePointer<Float>, x: UnsafePointer<Float>, s: Shape,
                          hp: Int, wp: Int, planeFloats: Int) {
        let p = s.padding, cp = s.cp
        dst.initialize(repeating: 0, count: planeFloats)
        for h in 0..<s.h {
            let row = dst + ((h + p) * wp + p) * cp
            let src = x + h * s.w * s.c
            if cp == s.c {
                row.update(from: src, count: s.w * s.c)
            } else {
                for w in 0..<s.w { (row + w * cp).update(from: src + w * s.c, count: s.c) }
            }
        }
    }

    /// 8 output voxels along W x 16 channels: y = bias + sum over existing input planes and all
    /// (kh, kw) of w[tap] * x. `rowBase` is the padded offset of output voxel (h, w0)'s window corner.
    @inline(__always)
    static func tile8(ring: UnsafeMutablePointer<Float>, planeFloats: Int, lo: Int, hi: Int, d: Int, k: Int,
                      rowBase: Int, wp: Int, cp: Int, w: UnsafePointer<Float>, bias: UnsafeMutablePointer<Float>,
                      y: UnsafeMutablePointer<Float>, cy: Int, valid: Int, lanes: Int, accumulate: Bool) {
        typealias V = SIMD16<Float>
        let b = cload(bias)
        var a0 = b, a1 = b, a2 = b, a3 = b, a4 = b, a5 = b, a6 = b, a7 = b
        let p = k / 2
        for dIn in lo...hi {
            let kd = dIn - d + p
            let plane = ring + (dIn % k) * planeFloats + rowBase
            for kh in 0..<k {
                let xr = plane + kh * wp * cp
                let wr = w + (kd * k + kh) * k * cp
                // Sliding window along W: input voxel j + kw feeds output j through weight kw.
                var x0 = cload(xr), x1 = cload(xr + cp), x2 = cload(xr + 2 * cp), x3 = cload(xr + 3 * cp)
                var x4 = cload(xr + 4 * cp), x5 = cload(xr + 5 * cp), x6 = cload(xr + 6 * cp)
                for kw in 0..<k {
                    let wv = cload(wr + kw * cp)
                    let x7 = cload(xr + (kw + 7) * cp)
                    a0 = a0.addingProduct(x0, wv); a1 = a1.addingProduct(x1, wv)
                    a2 = a2.addingProduct(x2, wv); a3 = a3.addingProduct(x3, wv)
                    a4 = a4.addingProduct(x4, wv); a5 = a5.addingProduct(x5, wv)
                    a6 = a6.addingProduct(x6, wv); a7 = a7.addingProduct(x7, wv)
                    x0 = x1; x1 = x2; x2 = x3; x3 = x4; x4 = x5; x5 = x6; x6 = x7
                }
            }
        }
        storeTile(a0, y, 0, cy, valid, lanes, accumulate)
        storeTile(a1, y, 1, cy, valid, lanes, accumulate)
        storeTile(a2, y, 2, cy, valid, lanes, accumulate)
        storeTile(a3, y, 3, cy, valid, lanes, accumulate)
        storeTile(a4, y, 4, cy, valid, lanes, accumulate)
        storeTile(a5, y, 5, cy, valid, lanes, accumulate)
        storeTile(a6, y, 6, cy, valid, lanes, accumulate)
        storeTile(a7, y, 7, cy, valid, lanes, accumulate)
    }

    @inline(__always)
    static func storeTile(_ v: SIMD16<Float>, _ y: UnsafeMutablePointer<Float>, _ j: Int, _ cy: Int,
                          _ valid: Int, _ lanes: Int, _ accumulate: Bool) {
        if j >= valid { return }
        let dst = y + j * cy
        if lanes == 16 {
            cstore(accumulate ? cload(dst) + v : v, dst)
        } else {
            for l in 0..<lanes { dst[l] = accumulate ? dst[l] + v[l] : v[l] }
        }
    }
}

/// The grouped 1x1x1 convolutions of 3D UX-Net's MLP (groups = C), channels-last, with bias.
///
///     expand (pwconv1):  x V x C,   weight rC x 1 x 1 x 1 x 1, bias rC:  y[v][r c + j] = b[r c + j] + w[r c + j] x[v][c]
///     reduce (pwconv2):  x V x rC,  weight C x r x 1 x 1 x 1,  bias C:   y[v][c] = b[c] + sum_j w[c r + j] x[v][r c + j]
///
/// (PyTorch's grouped conv: group c owns input channels c..., output channels r c ..< r (c+1) for
/// expand, and input channels r c ..< r (c+1), output c for reduce.) Cheap next to everything else;
/// plain loops over voxel ranges (expand with r = 4 uses one SIMD16 FMA per 4 channels). Forward and
/// backward (`expandBackward`, `reduceBackward`). `ConvReference.conv3d(..., groups: C)` is the oracle.
/// (Kept in this file, beside the other per-channel convolution.)
public enum GroupedPointwise3d {
    static func parts(_ voxels: Int) -> Int { max(1, min(Threads.count, voxels / 4096)) }

    public static func expand(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
                              y: UnsafeMutablePointer<Float>, voxels: Int, channels c: Int, ratio r: Int) {
        let parts = parts(voxels)
        let rc = r * c
        parallelFor(parts) { part in
            for v in Threads.range(part, of: parts, total: voxels) {
                let xv = x + v &* c, yv = y + v &* rc
                var ch = 0
                if r == 4 {
                    // 4 channels -> 16 outputs: x broadcast in groups of 4, one FMA.
                    while ch &+ 4 <= c {
                        let lo = SIMD8(lowHalf: SIMD4(repeating: xv[ch]), highHalf: SIMD4(repeating: xv[ch &+ 1]))
                        let hi = SIMD8(lowHalf: SIMD4(repeating: xv[ch &+ 2]), highHalf: SIMD4(repeating: xv[ch &+ 3]))
                        let xs = SIMD16(lowHalf: lo, highHalf: hi)
                        let o = ch &* 4
                        let b = bias.map { cload($0 + o) } ?? SIMD16<Float>()
                        cstore(b.addingProduct(xs, cload(weight + o)), yv + o)
                        ch &+= 4
                    }
                }
                while ch < c {
                    let xs = xv[ch]
                    let o = ch &* r
                    for j in 0..<r { yv[o &+ j] = (bias?[o &+ j] ?? 0) + weight[o &+ j] * xs }
                    ch &+= 1
                }
            }
        }
    }

    public static func reduce(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
                              y: UnsafeMutablePointer<Float>, voxels: Int, channels c: Int, ratio r: Int) {
        let parts = parts(voxels)
        let rc = r * c
        parallelFor(parts) { part in
            for v in Threads.range(part, of: parts, total: voxels) {
                let xv = x + v &* rc, yv = y + v &* c
                if r == 4 {
                    for ch in 0..<c {
                        let o = ch &* 4
                        // Same order as the loop below: ((b + p0) + p1) + p2) + p3.
                        var acc: Float = bias?[ch] ?? 0
                        acc += weight[o] * xv[o]
                        acc += weight[o &+ 1] * xv[o &+ 1]
                        acc += weight[o &+ 2] * xv[o &+ 2]
                        acc += weight[o &+ 3] * xv[o &+ 3]
                        yv[ch] = acc
                    }
                    continue
                }
                for ch in 0..<c {
                    let o = ch &* r
                    var acc: Float = bias?[ch] ?? 0
                    for j in 0..<r { acc += weight[o &+ j] * xv[o &+ j] }
                    yv[ch] = acc
                }
            }
        }
    }

    /// Adds the gradients of `expand` (ratio r): gradX (V x C), gradWeight (rC), gradBias (rC); any may
    /// be nil. `workspace` holds per-part sums (Double) for the parameter gradients, added in part order.
    public static func expandBackward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, gradY: UnsafePointer<Float>,
                                      gradX: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>?,
                                      gradBias: UnsafeMutablePointer<Float>?, voxels: Int, channels c: Int, ratio r: Int,
                                      workspace: Workspace) throws {
        try backward(x: x, weight: weight, gradY: gradY, gradX: gradX, gradWeight: gradWeight, gradBias: gradBias,
                     voxels: voxels, channels: c, ratio: r, expand: true, workspace: workspace)
    }

    /// Adds the gradients of `reduce` (ratio r): gradX (V x rC), gradWeight (rC), gradBias (C); any may be nil.
    public static func reduceBackward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, gradY: UnsafePointer<Float>,
                                      gradX: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>?,
                                      gradBias: UnsafeMutablePointer<Float>?, voxels: Int, channels c: Int, ratio r: Int,
                                      workspace: Workspace) throws {
        try backward(x: x, weight: weight, gradY: gradY, gradX: gradX, gradWeight: gradWeight, gradBias: gradBias,
                     voxels: voxels, channels: c, ratio: r, expand: false, workspace: workspace)
    }

    static func backward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, gradY: UnsafePointer<Float>,
                         gradX: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>?,
                         gradBias: UnsafeMutablePointer<Float>?, voxels: Int, channels c: Int, ratio r: Int,
                         expand: Bool, workspace: Workspace) throws {
        let parts = parts(voxels)
        let rc = r * c
        let cy = expand ? rc : c          // channels of y
        // Per part: weight sums (rC), then bias sums (cy), in Double.
        let stride = rc + cy
        let raw = try workspace.buffer("grouped_pointwise.gradParts", count: 2 * parts * stride)
        let partials = UnsafeMutableRawPointer(raw).bindMemory(to: Double.self, capacity: parts * stride)
        partials.initialize(repeating: 0, count: parts * stride)
        parallelFor(parts) { part in
            let gw = partials + part * stride, gb = gw + rc
            for v in Threads.range(part, of: parts, total: voxels) {
                let gyv = gradY + v &* cy
                for ch in 0..<c {
                    let o = ch &* r
                    if expand {
                        // y[r c + j] = b + w[r c + j] x[c]
                        let xs = x[v &* c &+ ch]
                        var gx: Float = 0
                        for j in 0..<r {
                            let g = gyv[o &+ j]
                            gx += weight[o &+ j] * g
                            gw[o &+ j] += Double(g * xs)
                            gb[o &+ j] += Double(g)
                        }
                        if let gradX { gradX[v &* c &+ ch] += gx }
                    } else {
                        // y[c] = b + sum_j w[r c + j] x[r c + j]
                        let g = gyv[ch]
                        let xv = x + v &* rc
                        for j in 0..<r {
                            gw[o &+ j] += Double(g * xv[o &+ j])
                            if let gradX { gradX[v &* rc &+ o &+ j] += weight[o &+ j] * g }
                        }
                        gb[ch] += Double(g)
                    }
                }
            }
        }
        for part in 0..<parts {
            let gw = partials + part * stride, gb = gw + rc
            if let gradWeight { for i in 0..<rc { gradWeight[i] += Float(gw[i]) } }
            if let gradBias { for i in 0..<cy { gradBias[i] += Float(gb[i]) } }
        }
    }
}
