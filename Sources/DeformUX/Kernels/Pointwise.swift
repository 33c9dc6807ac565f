import COpenBLAS

/// 1x1x1 convolution, the GEMM it is: per sample, y (Cout x V) = W (Cout x Cin) . x (Cin x V) + b.
/// Used by the DDC offset branch (C -> 81) and, with the network, by the MLP and the decoder's 1x1x1
/// convs. Threads own disjoint voxel ranges and call single-threaded sgemm on them.
///
///     x  N x Cin x V      weight Cout x Cin      bias Cout (optional)      y  N x Cout x V
public enum Pointwise {
    public struct Shape: Sendable {
        public var n: Int, cin: Int, cout: Int, voxels: Int
        public init(n: Int, cin: Int, cout: Int, voxels: Int) {
            self.n = n; self.cin = cin; self.cout = cout; self.voxels = voxels
        }
    }

    /// Voxel ranges smaller than this are not worth a thread.
    static let minVoxelsPerPart = 2048

    static func parts(_ voxels: Int) -> Int { max(1, min(Threads.count, voxels / minVoxelsPerPart)) }

    /// y = W x + b (overwrites y).
    public static func forward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
                               y: UnsafeMutablePointer<Float>, shape s: Shape) {
        let parts = parts(s.voxels)
        for n in 0..<s.n {
            let xN = x + n * s.cin * s.voxels, yN = y + n * s.cout * s.voxels
            parallelFor(parts) { part in
                let r = Threads.range(part, of: parts, total: s.voxels)
                if r.isEmpty { return }
                for o in 0..<s.cout {
                    (yN + o * s.voxels + r.lowerBound).initialize(repeating: bias?[o] ?? 0, count: r.count)
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans,
                            Int32(s.cout), Int32(r.count), Int32(s.cin),
                            1, weight, Int32(s.cin), xN + r.lowerBound, Int32(s.voxels),
                            1, yN + r.lowerBound, Int32(s.voxels))
            }
        }
    }

    /// Adds gradX += W^T gy, gradWeight += gy x^T (summed over samples), gradBias += sum_v gy. Any may be nil.
    /// `partials` holds Threads.count x Cout x Cin floats for the weight gradient's per-part sums.
    public static func backward(x: UnsafePointer<Float>, weight: UnsafePointer<Float>, gradY: UnsafePointer<Float>,
                                gradX: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>?,
                                gradBias: UnsafeMutablePointer<Float>?, shape s: Shape,
                                workspace: Workspace) throws {
        let parts = parts(s.voxels)
        let wCount = s.cout * s.cin
        let partials = try workspace.buffer("pointwise.gradWeightParts", count: max(parts * wCount, 1))
        if gradWeight != nil { partials.initialize(repeating: 0, count: parts * wCount) }
        for n in 0..<s.n {
            let xN = x + n * s.cin * s.voxels, gN = gradY + n * s.cout * s.voxels
            parallelFor(parts) { part in
                let r = Threads.range(part, of: parts, total: s.voxels)
                if r.isEmpty { return }
                if let gradX {
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans,
                                Int32(s.cin), Int32(r.count), Int32(s.cout),
                                1, weight, Int32(s.cin), gN + r.lowerBound, Int32(s.voxels),
                                1, gradX + n * s.cin * s.voxels + r.lowerBound, Int32(s.voxels))
                }
                if gradWeight != nil {
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans,
                                Int32(s.cout), Int32(s.cin), Int32(r.count),
                                1, gN + r.lowerBound, Int32(s.voxels), xN + r.lowerBound, Int32(s.voxels),
                                1, partials + part * wCount, Int32(s.cin))
                }
            }
            if let gradBias {
                for o in 0..<s.cout {
                    var acc: Double = 0
                    let row = gN + o * s.voxels
                    for v in 0..<s.voxels { acc += Double(row[v]) }
                    gradBias[o] += Float(acc)
                }
            }
        }
        if let gradWeight {
            for part in 0..<parts {
                let p = partials + part * wCount
                for i in 0..<wCount { gradWeight[i] += p[i] }
            }
        }
    }
}
