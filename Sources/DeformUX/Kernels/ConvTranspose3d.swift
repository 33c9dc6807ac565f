import COpenBLAS

/// Transposed 3D convolution with kernel == stride (the UpBlock's ConvTranspose3d(k 2, s 2), no
/// padding), forward, channels-last.
///
///     x       N x D x H x W x Cin
///     weight  Cin x Cout x k x k x k      (PyTorch layout; `pack` turns it into Cin x (k^3 Cout) once)
///     bias    Cout (optional; the network's has none)
///     y       N x kD x kH x kW x Cout
///
/// With kernel == stride the output windows do not overlap: every input voxel v owns the k^3 output
/// voxels k v + (kd, kh, kw), and their values are one row of the GEMM X (V x Cin) . Wp (Cin x k^3 Cout).
/// A block of input rows is multiplied into scratch and then scattered; for fixed (kd, kh) the k output
/// voxels of one input voxel are adjacent in y, so the scatter moves k Cout floats at a time.
/// `ConvReference.convTranspose3d` is the oracle.
public enum ConvTranspose3d {
    public struct Shape: Equatable, Sendable, CustomStringConvertible {
        public var n: Int, cin: Int, cout: Int, d: Int, h: Int, w: Int
        /// Kernel size and stride (equal).
        public var kernel: Int

        public init(n: Int, cin: Int, cout: Int, d: Int, h: Int, w: Int, kernel: Int = 2) throws {
            for (name, v) in [("N", n), ("Cin", cin), ("Cout", cout), ("D", d), ("H", h), ("W", w), ("kernel", kernel)]
            where v < 1 {
                throw DeformUXError.invalidArgument("conv_transpose3d", "\(name) must be >= 1, got \(v)")
            }
            _ = try Tensor.elementCount([n, d * kernel, h * kernel, w * kernel, max(cin, cout)], context: "conv_transpose3d")
            _ = try Tensor.elementCount([cin, kernel * kernel * kernel, cout, 2], context: "conv_transpose3d")
            self.n = n; self.cin = cin; self.cout = cout; self.d = d; self.h = h; self.w = w; self.kernel = kernel
        }

        public var taps: Int { kernel * kernel * kernel }
        public var od: Int { d * kernel }
        public var oh: Int { h * kernel }
        public var ow: Int { w * kernel }
        public var inputCount: Int { n * d * h * w * cin }
        public var outputCount: Int { n * od * oh * ow * cout }
        /// Elements of the PyTorch weight Cin x Cout x k x k x k.
        public var weightCount: Int { cin * cout * taps }
        public var macs: Int { n * d * h * w * cin * cout * taps }
        public var description: String { "N=\(n) Cin=\(cin) Cout=\(cout) \(d)x\(h)x\(w) k\(kernel) s\(kernel)" }
    }

    /// Floats of the packed weight: [ci][tap][co], the Cin x (k^3 Cout) right-hand matrix.
    public static func packedCount(_ s: Shape) -> Int { s.cin * s.taps * s.cout }

    public static func pack(weight: UnsafePointer<Float>, into packed: UnsafeMutablePointer<Float>, shape s: Shape) {
        pack(weight: weight, into: packed, cin: s.cin, cout: s.cout, taps: s.taps)
    }

    /// The packing depends on the channels and the kernel only.
    public static func pack(weight: UnsafePointer<Float>, into packed: UnsafeMutablePointer<Float>,
                            cin: Int, cout: Int, taps: Int) {
        for ci in 0..<cin {
            for co in 0..<cout {
                for t in 0..<taps {
                    packed[(ci * taps + t) * cout + co] = weight[(ci * cout + co) * taps + t]
                }
            }
        }
    }

    // MARK: Tensor API (validated)

    /// y = conv_transpose3d(x, weight, bias, stride = kernel), x channels-last N x D x H x W x Cin,
    /// weight Cin x Cout x k x k x k.
    public static func forward(x: Tensor, weight: Tensor, bias: Tensor?, workspace: Workspace? = nil) throws -> Tensor {
        let op = "conv_transpose3d"
        guard x.rank == 5 else {
            throw DeformUXError.shapeMismatch(op, "x must be N x D x H x W x C (channels-last, rank 5), got shape \(x.shape)")
        }
        guard weight.rank == 5, weight.shape[0] == x.shape[4], weight.shape[2] == weight.shape[3],
              weight.shape[3] == weight.shape[4] else {
            throw DeformUXError.shapeMismatch(op, "weight must be Cin x Cout x k x k x k with Cin = \(x.shape[4]), got shape \(weight.shape)")
        }
        let s = try Shape(n: x.shape[0], cin: x.shape[4], cout: weight.shape[1], d: x.shape[1], h: x.shape[2],
                          w: x.shape[3], kernel: weight.shape[2])
        if let bias, bias.shape != [s.cout] {
            throw DeformUXError.shapeMismatch(op, "bias must have shape [\(s.cout)], got \(bias.shape)")
        }
        try x.requireContiguous("\(op) x")
        try weight.requireContiguous("\(op) weight")
        try bias?.requireContiguous("\(op) bias")
        let packed = try Tensor(zeros: [packedCount(s)])
        pack(weight: weight.pointer, into: packed.pointer, shape: s)
        let y = try Tensor(zeros: [s.n, s.od, s.oh, s.ow, s.cout])
        try forward(x: x.pointer, packedWeight: packed.pointer, bias: bias?.pointer, y: y.pointer, shape: s,
                    workspace: workspace ?? Workspace())
        return y
    }

    // MARK: Pointer API

    /// Writes y (overwrites). Throws only when scratch memory cannot be had.
    public static func forward(x: UnsafePointer<Float>, packedWeight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
                               y: UnsafeMutablePointer<Float>, shape s: Shape, workspace: Workspace) throws {
        let k = s.kernel
        let rowOut = s.taps * s.cout           // GEMM output floats per input voxel
        let rows = s.n * s.d * s.h             // input rows (n, d, h)
        // Input rows per block: the GEMM output block kept near 256 KB.
        let rowsPerBlock = max(1, min(rows, (64 * 1024) / max(1, s.w * rowOut)))
        let parts = max(1, min(Threads.count, rows))
        let scratch = try workspace.buffer("conv_transpose3d.block", count: parts * rowsPerBlock * s.w * rowOut)
        let segment = k * s.cout               // y floats that are adjacent for fixed (voxel, kd, kh)
        parallelFor(parts) { part in
            let out = scratch + part * rowsPerBlock * s.w * rowOut
            let r = Threads.range(part, of: parts, total: rows)
            var row0 = r.lowerBound
            while row0 < r.upperBound {
                let count = min(rowsPerBlock, r.upperBound - row0)
                let m = count * s.w
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(m), Int32(rowOut), Int32(s.cin),
                            1, x + row0 * s.w * s.cin, Int32(s.cin), packedWeight, Int32(rowOut), 0, out, Int32(rowOut))
                for i in 0..<count {
                    let row = row0 + i
                    let ih = row % s.h, id = (row / s.h) % s.d, n = row / (s.h * s.d)
                    for kd in 0..<k {
                        for kh in 0..<k {
                            // Output row (n, k id + kd, k ih + kh); input voxel iw writes k Cout floats at k iw.
                            let yRow = y + (((n * s.od + k * id + kd) * s.oh + k * ih + kh) * s.ow) * s.cout
                            let src0 = out + i * s.w * rowOut + (kd * k + kh) * segment
                            for iw in 0..<s.w {
                                let src = src0 + iw * rowOut
                                let dst = yRow + iw * segment
                                if let bias {
                                    for kw in 0..<k {
                                        let sp = src + kw * s.cout, dp = dst + kw * s.cout
                                        for co in 0..<s.cout { dp[co] = sp[co] + bias[co] }
                                    }
                                } else {
                                    dst.update(from: src, count: segment)
                                }
                            }
                        }
                    }
                }
                row0 += count
            }
        }
    }

    // MARK: Backward

    /// Adds the gradients of `forward` (given its packed weight): gradX (N x D x H x W x Cin) += dL/dx, gradWeight (Cin x Cout x
    /// k x k x k, PyTorch layout) += dL/dW, gradBias (Cout) += dL/db; any may be nil. Per block of
    /// input rows, grad_y is gathered back into the GEMM's row layout G (V x k^3 Cout), then
    /// dL/dx = G . Wp^T and dL/dWp = X^T . G (per-part partials summed in part order).
    public static func backward(x: UnsafePointer<Float>, packedWeight packed: UnsafePointer<Float>, gradY: UnsafePointer<Float>,
                                gradX: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>?,
                                gradBias: UnsafeMutablePointer<Float>?, shape s: Shape, workspace: Workspace) throws {
        let k = s.kernel
        let rowOut = s.taps * s.cout
        let rows = s.n * s.d * s.h
        let rowsPerBlock = max(1, min(rows, (64 * 1024) / max(1, s.w * rowOut)))
        let parts = max(1, min(Threads.count, rows))
        let segment = k * s.cout
        let blocks = try workspace.buffer("conv_transpose3d.block", count: parts * rowsPerBlock * s.w * rowOut)
        let wCount = s.cin * rowOut
        let wStride = (wCount + 15) / 16 * 16  // keeps the Double bias sums 64-byte aligned
        // Per part: the weight gradient (Cin x k^3 Cout) and the bias gradient (Cout, in Double).
        let partials = try workspace.buffer("conv_transpose3d.gradParts", count: parts * (wStride + 2 * s.cout))
        partials.initialize(repeating: 0, count: parts * (wStride + 2 * s.cout))
        parallelFor(parts) { part in
            let g = blocks + part * rowsPerBlock * s.w * rowOut
            let gw = partials + part * (wStride + 2 * s.cout)
            let gb = UnsafeMutableRawPointer(gw + wStride).bindMemory(to: Double.self, capacity: s.cout)
            let r = Threads.range(part, of: parts, total: rows)
            var row0 = r.lowerBound
            while row0 < r.upperBound {
                let count = min(rowsPerBlock, r.upperBound - row0)
                let m = count * s.w
                for i in 0..<count {
                    let row = row0 + i
                    let ih = row % s.h, id = (row / s.h) % s.d, n = row / (s.h * s.d)
                    for kd in 0..<k {
                        for kh in 0..<k {
                            let yRow = gradY + (((n * s.od + k * id + kd) * s.oh + k * ih + kh) * s.ow) * s.cout
                            let dst0 = g + i * s.w * rowOut + (kd * k + kh) * segment
                            for iw in 0..<s.w {
                                (dst0 + iw * rowOut).update(from: yRow + iw * segment, count: segment)
                            }
                        }
                    }
                }
                if let gradX {
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(s.cin), Int32(rowOut),
                                1, g, Int32(rowOut), packed, Int32(rowOut), 1, gradX + row0 * s.w * s.cin, Int32(s.cin))
                }
                if gradWeight != nil {
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(s.cin), Int32(rowOut), Int32(m),
                                1, x + row0 * s.w * s.cin, Int32(s.cin), g, Int32(rowOut), 1, gw, Int32(rowOut))
                }
                if gradBias != nil {
                    // Every output voxel's grad_y is in G exactly once: rows of k^3 segments of Cout.
                    for v in 0..<m {
                        let rowG = g + v * rowOut
                        for t in 0..<s.taps {
                            let q = rowG + t * s.cout
                            for co in 0..<s.cout { gb[co] += Double(q[co]) }
                        }
                    }
                }
                row0 += count
            }
        }
        for part in 0..<parts {
            let gw = partials + part * (wStride + 2 * s.cout)
            if let gradWeight {
                for ci in 0..<s.cin {
                    for co in 0..<s.cout {
                        for t in 0..<s.taps { gradWeight[(ci * s.cout + co) * s.taps + t] += gw[(ci * s.taps + t) * s.cout + co] }
                    }
                }
            }
            if let gradBias {
                let gb = UnsafeMutableRawPointer(gw + wStride).bindMemory(to: Double.self, capacity: s.cout)
                for co in 0..<s.cout { gradBias[co] += Float(gb[co]) }
            }
        }
    }
}
