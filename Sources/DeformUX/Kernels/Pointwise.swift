/// 1x1x1 convolution, the GEMM it is: per sample, y (Cout x V) = W (Cout x Cin) . x (Cin x V) + b,
/// with x and y each in either layout (the DDC offset branch reads a channels-last x and writes
/// channels-first offsets). Threads own disjoint voxel ranges and call single-threaded sgemm on them.
///
///     x  N x Cin x V or N x V x Cin     weight Cout x Cin (x 1 x 1 x 1)     bias Cout (optional)
///     y  N x Cout x V or N x V x Cout
public enum Pointwise {
    public struct Shape: Sendable {
        public var n: Int, cin: Int, cout: Int, voxels: Int
        public var xLayout: Layout, yLayout: Layout
        public init(n: Int, cin: Int, cout: Int, voxels: Int,
                    xLayout: Layout = .channelsFirst, yLayout: Layout = .channelsFirst) {
            self.n = n; self.cin = cin; self.cout = cout; self.voxels = voxels
            self.xLayout = xLayout; self.yLayout = yLayout
        }

        func x(_ p: UnsafePointer<Float>, sample n: Int) -> ChannelMatrix {
            ChannelMatrix(pointer: UnsafeMutablePointer(mutating: p) + n * cin * voxels, channels: cin,
                          voxels: voxels, layout: xLayout)
        }
        func y(_ p: UnsafePointer<Float>, sample n: Int) -> ChannelMatrix {
            ChannelMatrix(pointer: UnsafeMutablePointer(mutating: p) + n * cout * voxels, channels: cout,
                          voxels: voxels, layout: yLayout)
        }
    }

    /// Voxels per sgemm call in the forward pass.
    static let columnBlock = 2048

    /// Voxel ranges smaller than this are not worth a thread.
    static let minVoxelsPerPart = 2048

    static func parts(_ voxels: Int) -> Int { max(1, min(Threads.count, voxels / minVoxelsPerPart)) }

    static func weight(_ w: UnsafePointer<Float>, _ s: Shape) -> GemmOperand {
        GemmOperand(pointer: UnsafeMutablePointer(mutating: w), ld: s.cin, transposed: false)
    }

    /// y = W x + b (overwrites y).
    public static func forward(x: UnsafePointer<Float>, weight w: UnsafePointer<Float>, bias: UnsafePointer<Float>?,
                               y: UnsafeMutablePointer<Float>, shape s: Shape) {
        let parts = parts(s.voxels)
        for n in 0..<s.n {
            let xN = s.x(x, sample: n), yN = s.y(y, sample: n)
            parallelFor(parts) { part in
                let r = Threads.range(part, of: parts, total: s.voxels)
                // Column blocks: the bias written into a block is still in cache when sgemm adds to it.
                var v0 = r.lowerBound
                while v0 < r.upperBound {
                    let block = v0..<min(v0 + columnBlock, r.upperBound)
                    fillBias(yN, block, bias)
                    gemm(m: s.cout, n: block.count, k: s.cin, a: weight(w, s), b: xN.columns(block), beta: 1,
                         c: yN.columns(block))
                    v0 = block.upperBound
                }
            }
        }
    }

    /// Adds gradX += W^T gy, gradWeight += gy x^T (summed over samples), gradBias += sum_v gy. Any may be nil.
    public static func backward(x: UnsafePointer<Float>, weight w: UnsafePointer<Float>, gradY: UnsafePointer<Float>,
                                gradX: UnsafeMutablePointer<Float>?, gradWeight: UnsafeMutablePointer<Float>?,
                                gradBias: UnsafeMutablePointer<Float>?, shape s: Shape,
                                workspace: Workspace) throws {
        let parts = parts(s.voxels)
        let wCount = s.cout * s.cin
        // Per-part sums of the weight and bias gradients, added up in part order at the end.
        let stride = wCount + s.cout
        let partials = try workspace.buffer("pointwise.gradParts", count: parts * stride)
        partials.initialize(repeating: 0, count: parts * stride)
        for n in 0..<s.n {
            let xN = s.x(x, sample: n), gN = s.y(gradY, sample: n)
            let gxN = gradX.map { s.x($0, sample: n) }
            parallelFor(parts) { part in
                let r = Threads.range(part, of: parts, total: s.voxels)
                if r.isEmpty { return }
                if let gxN {
                    gemm(m: s.cin, n: r.count, k: s.cout, a: weight(w, s).t, b: gN.columns(r), beta: 1,
                         c: gxN.columns(r))
                }
                let p = partials + part * stride
                if gradWeight != nil {
                    gemm(m: s.cout, n: s.cin, k: r.count, a: gN.columns(r), b: xN.columns(r).t, beta: 1,
                         c: GemmOperand(pointer: p, ld: s.cin, transposed: false))
                }
                if gradBias != nil { addRowSums(gN, r, into: p + wCount) }
            }
        }
        for part in 0..<parts {
            let p = partials + part * stride
            if let gradWeight { for i in 0..<wCount { gradWeight[i] += p[i] } }
            if let gradBias { for o in 0..<s.cout { gradBias[o] += p[wCount + o] } }
        }
    }

    /// y's columns r = bias (or 0).
    static func fillBias(_ y: ChannelMatrix, _ r: Range<Int>, _ bias: UnsafePointer<Float>?) {
        switch y.layout {
        case .channelsFirst:
            for o in 0..<y.channels {
                (y.pointer + o * y.voxels + r.lowerBound).initialize(repeating: bias?[o] ?? 0, count: r.count)
            }
        case .channelsLast:
            for v in r {
                let row = y.pointer + v * y.channels
                if let bias { row.update(from: bias, count: y.channels) } else { row.initialize(repeating: 0, count: y.channels) }
            }
        }
    }

    /// sums[o] += sum over v in r of g[o, v], accumulated in Double (V can be ~10^6 voxels).
    static func addRowSums(_ g: ChannelMatrix, _ r: Range<Int>, into sums: UnsafeMutablePointer<Float>) {
        switch g.layout {
        case .channelsFirst:
            // SIMD Float sums over blocks of 1024 voxels, the blocks added in Double.
            for o in 0..<g.channels {
                let row = g.pointer + o * g.voxels
                var acc: Double = 0
                var v = r.lowerBound
                while v < r.upperBound {
                    let end = min(v + 1024, r.upperBound)
                    var lanes = SIMD16<Float>()
                    while v + 16 <= end {
                        lanes += UnsafeRawPointer(row + v).loadUnaligned(as: SIMD16<Float>.self)
                        v += 16
                    }
                    var tail: Float = 0
                    while v < end { tail += row[v]; v += 1 }
                    acc += Double(DeformConv3d.horizontalSum(lanes)) + Double(tail)
                }
                sums[o] += Float(acc)
            }
        case .channelsLast:
            // Float sums over blocks of 256 voxels, blocks added in Double.
            var total = [Double](repeating: 0, count: g.channels)
            var partial = [Float](repeating: 0, count: g.channels)
            var v = r.lowerBound
            while v < r.upperBound {
                let end = min(v + 256, r.upperBound)
                for o in 0..<g.channels { partial[o] = 0 }
                while v < end {
                    let row = g.pointer + v * g.channels
                    for o in 0..<g.channels { partial[o] += row[o] }
                    v += 1
                }
                for o in 0..<g.channels { total[o] += Double(partial[o]) }
            }
            for o in 0..<g.channels { sums[o] += Float(total[o]) }
        }
    }
}
