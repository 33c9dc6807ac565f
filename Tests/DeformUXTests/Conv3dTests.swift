import XCTest
@testable import DeformUX

/// Fast convolution kernels (Conv3d's three paths, ConvTranspose3d, DepthwiseConv3d, GroupedPointwise3d)
/// against `ConvReference` in Double, over awkward shapes, channels-last.
///
/// Tolerance: |fast - reference| <= 1e-5 * sum |w| |x| (+ |b|) per output element, the magnitude the
/// float rounding of a sum of products scales with, plus 1e-30 so that all-zero outputs compare exactly.
/// Thread counts 1 and 2 must give identical results (threads own disjoint outputs).
final class Conv3dTests: XCTestCase {
    static let rtol = 1e-5

    struct ConvCase {
        var name: String
        var n: Int, cin: Int, cin2: Int, cout: Int, d: Int, h: Int, w: Int
        var k: Int, stride: Int, pad: Int
        var bias: Bool
    }

    // 3x3x3 s1 p1 (the direct kernel): Cin 1, tails of the 48-wide output block, two sources, W a
    // multiple of 8 (tiles along rows) or not (tiles over the flattened padded plane), and Cin large
    // enough for the weight chunking (27 taps up to Cin 61, 9 taps up to 185, then 3).
    static let directCases: [ConvCase] = [
        ConvCase(name: "3x3x3 1x1x1 cin1 cout1", n: 1, cin: 1, cin2: 0, cout: 1, d: 1, h: 1, w: 1, k: 3, stride: 1, pad: 1, bias: false),
        ConvCase(name: "3x3x3 7x5x3 cin3 cout16", n: 1, cin: 3, cin2: 0, cout: 16, d: 7, h: 5, w: 3, k: 3, stride: 1, pad: 1, bias: true),
        ConvCase(name: "3x3x3 9x4x6 cin16 cout17", n: 1, cin: 16, cin2: 0, cout: 17, d: 9, h: 4, w: 6, k: 3, stride: 1, pad: 1, bias: false),
        ConvCase(name: "3x3x3 N2 3x4x5 cin17 cout48", n: 2, cin: 17, cin2: 0, cout: 48, d: 3, h: 4, w: 5, k: 3, stride: 1, pad: 1, bias: true),
        ConvCase(name: "3x3x3 2x3x9 cin48 cout3", n: 1, cin: 48, cin2: 0, cout: 3, d: 2, h: 3, w: 9, k: 3, stride: 1, pad: 1, bias: false),
        ConvCase(name: "3x3x3 1 cin1 cout48 4x4x4", n: 1, cin: 1, cin2: 0, cout: 48, d: 4, h: 4, w: 4, k: 3, stride: 1, pad: 1, bias: false),
        ConvCase(name: "3x3x3 two sources 5+3 cout17 7x5x3", n: 1, cin: 8, cin2: 3, cout: 17, d: 7, h: 5, w: 3, k: 3, stride: 1, pad: 1, bias: true),
        ConvCase(name: "3x3x3 two sources N2 16+16 cout50 3x3x3", n: 2, cin: 32, cin2: 16, cout: 50, d: 3, h: 3, w: 3, k: 3, stride: 1, pad: 1, bias: false),
        ConvCase(name: "3x3x3 two sources 1+1 cout1 1x1x1", n: 1, cin: 2, cin2: 1, cout: 1, d: 1, h: 1, w: 1, k: 3, stride: 1, pad: 1, bias: true),
        ConvCase(name: "3x3x3 rows of 8: 3x2x8 cin17 cout48", n: 1, cin: 17, cin2: 0, cout: 48, d: 3, h: 2, w: 8, k: 3, stride: 1, pad: 1, bias: true),
        ConvCase(name: "3x3x3 rows of 8: N2 two sources 5+3 2x3x16 cout17", n: 2, cin: 8, cin2: 3, cout: 17, d: 2, h: 3, w: 16, k: 3, stride: 1, pad: 1, bias: false),
        ConvCase(name: "3x3x3 cin70 (9-tap chunks) cout96 2x3x4", n: 1, cin: 70, cin2: 0, cout: 96, d: 2, h: 3, w: 4, k: 3, stride: 1, pad: 1, bias: false),
        // The narrow tile (<= 16 outputs, three tiles of 8 voxels), by rows and across row ends.
        ConvCase(name: "narrow rows of 8: 3x4x16 cin5 cout16", n: 1, cin: 5, cin2: 0, cout: 16, d: 3, h: 4, w: 16, k: 3, stride: 1, pad: 1, bias: true),
        ConvCase(name: "narrow rows of 8: N2 two sources 7+4 2x3x24 cout9", n: 2, cin: 11, cin2: 4, cout: 9, d: 2, h: 3, w: 24, k: 3, stride: 1, pad: 1, bias: false),
        ConvCase(name: "narrow rows of 8: 2x5x8 cin33 cout1 (a group's last triple short)", n: 1, cin: 33, cin2: 0, cout: 1, d: 2, h: 5, w: 8, k: 3, stride: 1, pad: 1, bias: true),
        ConvCase(name: "narrow across rows: 3x5x7 cin16 cout16", n: 1, cin: 16, cin2: 0, cout: 16, d: 3, h: 5, w: 7, k: 3, stride: 1, pad: 1, bias: true),
        ConvCase(name: "3x3x3 two sources 100+90 (3-tap chunks) cout5 3x2x3", n: 1, cin: 190, cin2: 90, cout: 5, d: 3, h: 2, w: 3, k: 3, stride: 1, pad: 1, bias: true),
    ]

    // Shapes the Winograd path serves (even H, W >= 8, Cin a multiple of 16 up to 192, Cout > 16):
    // odd D (the last plane pair half outside), a short last chunk of tiles, a partial second output
    // block, two sources, the 8-tile chunks of Cin > 64, batch 2.
    static let winogradCases: [ConvCase] = [
        ConvCase(name: "winograd N2 5x8x10 cin16 cout48", n: 2, cin: 16, cin2: 0, cout: 48, d: 5, h: 8, w: 10, k: 3, stride: 1, pad: 1, bias: true),
        ConvCase(name: "winograd two sources 32+16 cout50 4x8x8", n: 1, cin: 48, cin2: 16, cout: 50, d: 4, h: 8, w: 8, k: 3, stride: 1, pad: 1, bias: false),
        ConvCase(name: "winograd cin80 cout96 3x10x8", n: 1, cin: 80, cin2: 0, cout: 96, d: 3, h: 10, w: 8, k: 3, stride: 1, pad: 1, bias: true),
        ConvCase(name: "winograd N2 two sources 96+96 cout20 2x8x12", n: 2, cin: 192, cin2: 96, cout: 20, d: 2, h: 8, w: 12, k: 3, stride: 1, pad: 1, bias: true),
        // 16-wide blocks (at most 16 outputs): chunks of 24 tiles, one short (20 tiles) or two (30).
        ConvCase(name: "winograd narrow N2 two sources 16+16 cout16 3x8x10", n: 2, cin: 32, cin2: 16, cout: 16, d: 3, h: 8, w: 10, k: 3, stride: 1, pad: 1, bias: true),
        ConvCase(name: "winograd narrow cin48 cout9 4x12x10", n: 1, cin: 48, cin2: 0, cout: 9, d: 4, h: 12, w: 10, k: 3, stride: 1, pad: 1, bias: false),
    ]

    func testWinogradMatchesReference() throws {
        for (i, c) in Self.winogradCases.enumerated() {
            let shape = try Conv3d.Shape(n: c.n, cin: c.cin, cout: c.cout, d: c.d, h: c.h, w: c.w,
                                         kernel: 3, stride: 1, padding: 1, cin2: c.cin2)
            XCTAssertTrue(Conv3d.Winograd.applies(shape), c.name)
            try checkConv(c, seed: UInt64(150 + i), expectPath: .direct3x3x3)
        }
        // And the shapes it leaves to the direct kernel.
        for (cin, cout, h, w) in [(16, 48, 8, 9), (16, 48, 6, 8), (17, 48, 8, 8), (208, 48, 8, 8)] {
            let shape = try Conv3d.Shape(n: 1, cin: cin, cout: cout, d: 4, h: h, w: w, kernel: 3, stride: 1, padding: 1)
            XCTAssertFalse(Conv3d.Winograd.applies(shape), "\(shape)")
        }
    }

    /// The two algorithms of the direct path, forced, on shapes both serve: the same results within
    /// 2e-5 (relative to max(1, |y|)) (a) with the fused input transform, accumulating into two outputs
    /// (a 48-wide block straddles them, as in a two-source input gradient), (b) with bias and output
    /// statistics.
    func testWinogradMatchesDirectKernel() throws {
        var rng = SplitMix64(seed: 77)
        let s = try Conv3d.Shape(n: 2, cin: 32, cout: 70, d: 3, h: 8, w: 10, kernel: 3, stride: 1, padding: 1)
        let voxels = s.n * s.d * s.h * s.w
        let xt = try Tensor(shape: [voxels * s.cin], values: rng.floats(voxels * s.cin))
        let weight = rng.floats(s.weightCount)
        let packed = try Conv3d.pack(weight: try Tensor(shape: [s.cout, s.cin, 3, 3, 3], values: weight), shape: s)
        let st = try Tensor(shape: [s.n * s.cin], values: rng.floats(s.n * s.cin))
        let ht = try Tensor(shape: [s.n * s.cin], values: rng.floats(s.n * s.cin))
        let transform = Conv3d.InputTransform(scale: st.pointer, shift: ht.pointer, leakySlope: 0.01)
        let start1 = rng.floats(voxels * 40), start2 = rng.floats(voxels * 30)
        // (b): the first 40 output channels alone, with bias and statistics.
        let s40 = try Conv3d.Shape(n: 2, cin: 32, cout: 40, d: 3, h: 8, w: 10, kernel: 3, stride: 1, padding: 1)
        let packed40 = try Conv3d.pack(weight: try Tensor(shape: [40, 32, 3, 3, 3], values: Array(weight[0..<(40 * 32 * 27)])),
                                       shape: s40)
        let bt = try Tensor(shape: [40], values: rng.floats(40))

        func run(_ algorithm: Conv3d.Direct.Algorithm) throws -> (y: [Float], z: [Float], stats: [Double]) {
            var y1 = start1, y2 = start2, z = [Float](repeating: 0, count: voxels * 40)
            var stats = [Double](repeating: 0, count: Threads.count * s.n * 2 * 40)
            try y1.withUnsafeMutableBufferPointer { p1 in
                try y2.withUnsafeMutableBufferPointer { p2 in
                    let out = Conv3d.Direct.Output(y1: p1.baseAddress!, c1: 40, y2: p2.baseAddress!, c2: 30, accumulate: true)
                    try Conv3d.Direct.forward(x1: xt.pointer, x2: nil, packed: packed.pointer, bias: nil, out: out, s: s,
                                              workspace: Workspace(), transform: transform, stats: nil,
                                              parts: Threads.count, algorithm: algorithm)
                }
            }
            try z.withUnsafeMutableBufferPointer { zp in
                try stats.withUnsafeMutableBufferPointer { sp in
                    let out = Conv3d.Direct.Output(y1: zp.baseAddress!, c1: 40, y2: nil, c2: 0, accumulate: false)
                    try Conv3d.Direct.forward(x1: xt.pointer, x2: nil, packed: packed40.pointer, bias: bt.pointer, out: out,
                                              s: s40, workspace: Workspace(), transform: nil,
                                              stats: Conv3d.Statistics(partials: sp.baseAddress!, n: s.n, cout: 40),
                                              parts: Threads.count, algorithm: algorithm)
                }
            }
            return (y1 + y2, z, stats)
        }
        let direct = try run(.direct), winograd = try run(.winograd)
        func worst<T: BinaryFloatingPoint>(_ a: [T], _ b: [T]) -> T {
            zip(a, b).map { abs($0 - $1) / max(1, abs($0)) }.max() ?? 0
        }
        XCTAssertLessThan(worst(direct.y, winograd.y), 2e-5, "transform + two outputs, accumulating")
        XCTAssertLessThan(worst(direct.z, winograd.z), 2e-5, "bias")
        XCTAssertLessThan(worst(direct.stats, winograd.stats), 2e-5, "statistics")
        XCTAssertTrue(winograd.stats.contains { $0 != 0 }, "statistics were written")
    }

    /// The weight gradient by both algorithms, forced, with the fused input transform (the planes hold
    /// x'): equal within 2e-5 relative to max(1, |dW|), and `appliesToWeightGradient` as documented.
    func testWinogradWeightGradientMatchesDirectKernel() throws {
        var rng = SplitMix64(seed: 78)
        let s = try Conv3d.Shape(n: 2, cin: 32, cout: 48, d: 5, h: 8, w: 12, kernel: 3, stride: 1, padding: 1, cin2: 16)
        XCTAssertTrue(Conv3d.Winograd.appliesToWeightGradient(s, parts: 2))
        let wide = try Conv3d.Shape(n: 1, cin: 192, cout: 400, d: 4, h: 8, w: 8, kernel: 3, stride: 1, padding: 1)
        XCTAssertFalse(Conv3d.Winograd.appliesToWeightGradient(wide, parts: 2), "private sums over the limit")
        let odd = try Conv3d.Shape(n: 1, cin: 32, cout: 40, d: 4, h: 8, w: 8, kernel: 3, stride: 1, padding: 1)
        XCTAssertFalse(Conv3d.Winograd.appliesToWeightGradient(odd, parts: 2), "Cout not a multiple of 16")
        let voxels = s.n * s.d * s.h * s.w
        let x1 = try Tensor(shape: [voxels * 16], values: rng.floats(voxels * 16))
        let x2 = try Tensor(shape: [voxels * 16], values: rng.floats(voxels * 16))
        let gy = try Tensor(shape: [s.outputCount], values: rng.floats(s.outputCount))
        let st = try Tensor(shape: [s.n * s.cin], values: rng.floats(s.n * s.cin))
        let ht = try Tensor(shape: [s.n * s.cin], values: rng.floats(s.n * s.cin))
        let transform = Conv3d.InputTransform(scale: st.pointer, shift: ht.pointer, leakySlope: 0.01)
        let start = rng.floats(s.weightCount)
        var results: [[Float]] = []
        for algorithm in [Conv3d.Direct.Algorithm.direct, .winograd] {
            var gw = start
            try gw.withUnsafeMutableBufferPointer { p in
                try Conv3d.Direct.weightGradient(x1: x1.pointer, x2: x2.pointer, gradY: gy.pointer, gradWeight: p.baseAddress!,
                                                 s: s, workspace: Workspace(), transform: transform, parts: Threads.count,
                                                 algorithm: algorithm)
            }
            results.append(gw)
        }
        let worst = zip(results[0], results[1]).map { abs($0 - $1) / max(1, abs($0)) }.max() ?? 0
        XCTAssertLessThan(worst, 2e-5)
        XCTAssertNotEqual(results[1], start, "the gradient was added")
    }

    // Every other (k, stride, padding): the sgemm paths.
    static let gemmCases: [ConvCase] = [
        ConvCase(name: "1x1x1 N2 7x5x3 cin17 cout16", n: 2, cin: 17, cin2: 0, cout: 16, d: 7, h: 5, w: 3, k: 1, stride: 1, pad: 0, bias: true),
        ConvCase(name: "1x1x1 two sources 5+3 cout17 9x4x6", n: 1, cin: 8, cin2: 3, cout: 17, d: 9, h: 4, w: 6, k: 1, stride: 1, pad: 0, bias: false),
        ConvCase(name: "1x1x1 1x1x1 cin1 cout1", n: 1, cin: 1, cin2: 0, cout: 1, d: 1, h: 1, w: 1, k: 1, stride: 1, pad: 0, bias: true),
        ConvCase(name: "2x2x2 s2 4x6x2 cin48 cout16", n: 1, cin: 48, cin2: 0, cout: 16, d: 4, h: 6, w: 2, k: 2, stride: 2, pad: 0, bias: true),
        ConvCase(name: "2x2x2 s2 N2 5x3x7 (odd) cin3 cout17", n: 2, cin: 3, cin2: 0, cout: 17, d: 5, h: 3, w: 7, k: 2, stride: 2, pad: 0, bias: false),
        ConvCase(name: "2x2x2 s2 two sources 5+3 cout5 4x4x4", n: 1, cin: 8, cin2: 3, cout: 5, d: 4, h: 4, w: 4, k: 2, stride: 2, pad: 0, bias: true),
        ConvCase(name: "7x7x7 s2 p3 9x4x6 cin1 cout48", n: 1, cin: 1, cin2: 0, cout: 48, d: 9, h: 4, w: 6, k: 7, stride: 2, pad: 3, bias: true),
        ConvCase(name: "7x7x7 s2 p3 N2 7x5x3 cin3 cout5", n: 2, cin: 3, cin2: 0, cout: 5, d: 7, h: 5, w: 3, k: 7, stride: 2, pad: 3, bias: false),
        ConvCase(name: "7x7x7 s2 p3 1x1x1 cin1 cout3", n: 1, cin: 1, cin2: 0, cout: 3, d: 1, h: 1, w: 1, k: 7, stride: 2, pad: 3, bias: true),
        ConvCase(name: "3x3x3 s2 p1 7x5x3 cin16 cout17", n: 1, cin: 16, cin2: 0, cout: 17, d: 7, h: 5, w: 3, k: 3, stride: 2, pad: 1, bias: true),
        ConvCase(name: "3x3x3 s1 p0 5x4x6 cin3 cout16", n: 1, cin: 3, cin2: 0, cout: 16, d: 5, h: 4, w: 6, k: 3, stride: 1, pad: 0, bias: false),
    ]

    func testDirect3x3x3MatchesReference() throws {
        for (i, c) in Self.directCases.enumerated() { try checkConv(c, seed: UInt64(100 + i), expectPath: .direct3x3x3) }
    }

    func testGemmPathsMatchReference() throws {
        for (i, c) in Self.gemmCases.enumerated() { try checkConv(c, seed: UInt64(200 + i), expectPath: nil) }
    }

    func checkConv(_ c: ConvCase, seed: UInt64, expectPath: Conv3d.Path?) throws {
        var rng = SplitMix64(seed: seed)
        let voxels = c.d * c.h * c.w
        let c1 = c.cin - c.cin2
        let x1 = rng.floats(c.n * voxels * c1)
        let x2 = rng.floats(c.n * voxels * c.cin2)
        let weight = rng.floats(c.cout * c.cin * c.k * c.k * c.k)
        let bias = c.bias ? rng.floats(c.cout) : nil
        let shape = try Conv3d.Shape(n: c.n, cin: c.cin, cout: c.cout, d: c.d, h: c.h, w: c.w,
                                     kernel: c.k, stride: c.stride, padding: c.pad, cin2: c.cin2)
        if let expectPath { XCTAssertEqual(shape.path, expectPath, c.name) }

        // Reference on the concatenated input, and the magnitude sum |w| |x| + |b| for the tolerance.
        var xcat = [Double](repeating: 0, count: c.n * voxels * c.cin)
        for v in 0..<(c.n * voxels) {
            for j in 0..<c1 { xcat[v * c.cin + j] = Double(x1[v * c1 + j]) }
            for j in 0..<c.cin2 { xcat[v * c.cin + c1 + j] = Double(x2[v * c.cin2 + j]) }
        }
        let wd = weight.map(Double.init), bd = bias?.map(Double.init)
        let want = ConvReference.conv3d(x: xcat, n: c.n, cin: c.cin, d: c.d, h: c.h, w: c.w, weight: wd, bias: bd,
                                        cout: c.cout, kernel: c.k, stride: c.stride, padding: c.pad)
        let mag = ConvReference.conv3d(x: xcat.map(abs), n: c.n, cin: c.cin, d: c.d, h: c.h, w: c.w,
                                       weight: wd.map(abs), bias: bd?.map(abs), cout: c.cout, kernel: c.k,
                                       stride: c.stride, padding: c.pad)

        let outShape = [c.n, shape.od, shape.oh, shape.ow, c.cout]
        let guardThreads = ThreadCountGuard()
        defer { guardThreads.restore() }
        var results: [[Float]] = []
        for threads in [1, 2] {
            try Threads.setCount(threads)
            let xt = try Tensor(shape: [c.n, c.d, c.h, c.w, c1], values: x1)
            let x2t = c.cin2 > 0 ? try Tensor(shape: [c.n, c.d, c.h, c.w, c.cin2], values: x2) : nil
            let wt = try Tensor(shape: [c.cout, c.cin, c.k, c.k, c.k], values: weight)
            let bt = try bias.map { try Tensor(shape: [c.cout], values: $0) }
            let y = try Conv3d.forward(x: xt, x2: x2t, weight: wt, bias: bt, stride: c.stride, padding: c.pad)
            XCTAssertEqual(y.shape, outShape, c.name)
            let got = try y.toArray()
            assertWithinMagnitude(got, want, mag, rtol: Self.rtol, shape: outShape, "\(c.name), \(threads) thread(s)")
            results.append(got)
        }
        assertIdentical(results[1], results[0], shape: outShape, "\(c.name): 2 threads vs 1 thread")
    }

    // MARK: Fused statistics and input transform

    /// `statistics` (per sample and channel: sum and sum of squares of y) on every path, and the
    /// direct path's `inputTransform` (x' = LeakyReLU(scale x + shift), per sample and channel).
    func testStatisticsAndInputTransform() throws {
        let cases: [(ConvCase, transform: Bool, slope: Float?)] = [
            (ConvCase(name: "stats 3x3x3 N2 7x5x3 cin3 cout50", n: 2, cin: 3, cin2: 0, cout: 50, d: 7, h: 5, w: 3, k: 3, stride: 1, pad: 1, bias: true), false, nil),
            (ConvCase(name: "stats+transform 3x3x3 N2 3x2x8 cin17 cout17", n: 2, cin: 17, cin2: 0, cout: 17, d: 3, h: 2, w: 8, k: 3, stride: 1, pad: 1, bias: false), true, 0.01),
            (ConvCase(name: "stats+transform 3x3x3 two sources 5+3 cout16 4x3x5 no activation", n: 1, cin: 8, cin2: 3, cout: 16, d: 4, h: 3, w: 5, k: 3, stride: 1, pad: 1, bias: true), true, nil),
            (ConvCase(name: "transform 3x3x3 N2 1x1x1 cin1 cout3", n: 2, cin: 1, cin2: 0, cout: 3, d: 1, h: 1, w: 1, k: 3, stride: 1, pad: 1, bias: false), true, 0.2),
            (ConvCase(name: "stats+transform narrow rows of 8 N2 3x4x16 cin16 cout16", n: 2, cin: 16, cin2: 0, cout: 16, d: 3, h: 4, w: 16, k: 3, stride: 1, pad: 1, bias: true), true, 0.01),
            (ConvCase(name: "stats 1x1x1 N2 9x4x6 two sources 5+3 cout17", n: 2, cin: 8, cin2: 3, cout: 17, d: 9, h: 4, w: 6, k: 1, stride: 1, pad: 0, bias: true), false, nil),
            (ConvCase(name: "stats 1x1x1 N2 20x20x20 cin16 cout48", n: 2, cin: 16, cin2: 0, cout: 48, d: 20, h: 20, w: 20, k: 1, stride: 1, pad: 0, bias: false), false, nil),
            (ConvCase(name: "stats 2x2x2 s2 N2 5x4x6 cin3 cout17", n: 2, cin: 3, cin2: 0, cout: 17, d: 5, h: 4, w: 6, k: 2, stride: 2, pad: 0, bias: true), false, nil),
        ]
        let guardThreads = ThreadCountGuard()
        defer { guardThreads.restore() }
        for (i, (c, transform, slope)) in cases.enumerated() {
            var rng = SplitMix64(seed: UInt64(600 + i))
            let voxels = c.d * c.h * c.w
            let c1 = c.cin - c.cin2
            let x1 = rng.floats(c.n * voxels * c1), x2 = rng.floats(c.n * voxels * c.cin2)
            let weight = rng.floats(c.cout * c.cin * c.k * c.k * c.k)
            let bias = c.bias ? rng.floats(c.cout) : nil
            let scale = rng.floats(c.n * c.cin, 0.5, 2), shift = rng.floats(c.n * c.cin)
            let shape = try Conv3d.Shape(n: c.n, cin: c.cin, cout: c.cout, d: c.d, h: c.h, w: c.w,
                                         kernel: c.k, stride: c.stride, padding: c.pad, cin2: c.cin2)
            // Reference input: concatenated, transformed; and its magnitude |scale| |x| + |shift|.
            var xin = [Double](repeating: 0, count: c.n * voxels * c.cin), xmag = xin
            for v in 0..<(c.n * voxels) {
                let n = v / voxels
                for j in 0..<c.cin {
                    let raw = Double(j < c1 ? x1[v * c1 + j] : x2[v * c.cin2 + j - c1])
                    if transform {
                        let a = Double(scale[n * c.cin + j]), b = Double(shift[n * c.cin + j])
                        var t = a * raw + b
                        if let slope, t < 0 { t *= Double(slope) }
                        xin[v * c.cin + j] = t
                        xmag[v * c.cin + j] = abs(a * raw) + abs(b)
                    } else {
                        xin[v * c.cin + j] = raw
                        xmag[v * c.cin + j] = abs(raw)
                    }
                }
            }
            let wd = weight.map(Double.init), bd = bias?.map(Double.init)
            let want = ConvReference.conv3d(x: xin, n: c.n, cin: c.cin, d: c.d, h: c.h, w: c.w, weight: wd, bias: bd,
                                            cout: c.cout, kernel: c.k, stride: c.stride, padding: c.pad)
            let mag = ConvReference.conv3d(x: xmag, n: c.n, cin: c.cin, d: c.d, h: c.h, w: c.w, weight: wd.map(abs),
                                           bias: bd?.map(abs), cout: c.cout, kernel: c.k, stride: c.stride, padding: c.pad)
            let outVoxels = shape.od * shape.oh * shape.ow
            var wantStats = [Double](repeating: 0, count: c.n * 2 * c.cout), statsTol = wantStats
            for v in 0..<(c.n * outVoxels) {
                let n = v / outVoxels
                for co in 0..<c.cout {
                    let y = want[v * c.cout + co], m = mag[v * c.cout + co]
                    wantStats[n * 2 * c.cout + co] += y
                    wantStats[n * 2 * c.cout + c.cout + co] += y * y
                    statsTol[n * 2 * c.cout + co] += Self.rtol * m
                    statsTol[n * 2 * c.cout + c.cout + co] += Self.rtol * 3 * m * m
                }
            }
            let outShape = [c.n, shape.od, shape.oh, shape.ow, c.cout]
            var results: [[Float]] = []
            for threads in [1, 2] {
                try Threads.setCount(threads)
                let packed = try Conv3d.pack(weight: try Tensor(shape: [c.cout, c.cin, c.k, c.k, c.k], values: weight), shape: shape)
                let x1t = try Tensor(shape: [x1.count], values: x1), x2t = try Tensor(shape: [max(x2.count, 1)], values: x2.isEmpty ? [0] : x2)
                let bt = try bias.map { try Tensor(shape: [c.cout], values: $0) }
                let st = try Tensor(shape: [scale.count], values: scale), sh = try Tensor(shape: [shift.count], values: shift)
                let y = try Tensor(zeros: [shape.outputCount])
                var stats = [Double](repeating: .nan, count: c.n * 2 * c.cout)
                let t = transform ? Conv3d.InputTransform(scale: st.pointer, shift: sh.pointer, leakySlope: slope) : nil
                try stats.withUnsafeMutableBufferPointer { sp in
                    try Conv3d.forward(x: x1t.pointer, x2: x2t.pointer, packedWeight: packed.pointer, bias: bt?.pointer,
                                       y: y.pointer, shape: shape, workspace: Workspace(), inputTransform: t,
                                       statistics: sp.baseAddress)
                }
                let got = try y.toArray()
                assertWithinMagnitude(got, want, mag, rtol: Self.rtol, shape: outShape, "\(c.name), \(threads) thread(s): y")
                assertWithinMagnitude(stats.map { Float($0) }, wantStats, statsTol.map { $0 / Self.rtol }, rtol: Self.rtol,
                                      shape: [c.n, 2, c.cout], "\(c.name), \(threads) thread(s): statistics")
                results.append(got)
            }
            assertIdentical(results[1], results[0], shape: outShape, "\(c.name): 2 threads vs 1 thread")
        }
        // The transform is the direct kernel's; other paths refuse it.
        let s = try Conv3d.Shape(n: 1, cin: 2, cout: 2, d: 2, h: 2, w: 2, kernel: 1)
        let buf = try Tensor(zeros: [64])
        XCTAssertThrowsError(try Conv3d.forward(x: buf.pointer, packedWeight: buf.pointer, bias: nil, y: buf.pointer, shape: s,
                                                workspace: Workspace(),
                                                inputTransform: Conv3d.InputTransform(scale: buf.pointer, shift: buf.pointer, leakySlope: nil)),
                             "input transform on the 1x1x1 path")
    }

    // MARK: Backward

    /// The reference backward against central differences of the reference forward (Double). The
    /// loss sum(gradY * conv(x)) is linear in each of x, W, b, so the differences are exact up to rounding.
    func testReferenceBackwardFiniteDifferences() throws {
        let cases: [(String, n: Int, cin: Int, cout: Int, d: Int, h: Int, w: Int, k: Int, stride: Int, pad: Int)] = [
            ("fd 3x3x3 p1 N2 3x2x4 cin2 cout3", 2, 2, 3, 3, 2, 4, 3, 1, 1),
            ("fd 2x2x2 s2 5x3x4 cin3 cout2", 1, 3, 2, 5, 3, 4, 2, 2, 0),
            ("fd 7x7x7 s2 p3 5x4x3 cin1 cout2", 1, 1, 2, 5, 4, 3, 7, 2, 3),
            ("fd depthwise k3 p1 groups 3 3x2x4 c3", 1, 3, 3, 3, 2, 4, 3, 1, 1),
        ]
        for (i, c) in cases.enumerated() {
            var rng = SplitMix64(seed: UInt64(700 + i))
            let x: [Double] = (0..<(c.n * c.d * c.h * c.w * c.cin)).map { _ in rng.uniform(-1, 1) }
            let groups = c.0.contains("depthwise") ? c.cin : 1
            let wt: [Double] = (0..<(c.cout * c.cin / groups * c.k * c.k * c.k)).map { _ in rng.uniform(-1, 1) }
            let b: [Double] = (0..<c.cout).map { _ in rng.uniform(-1, 1) }
            func forward(_ x: [Double], _ wt: [Double], _ b: [Double]) -> [Double] {
                ConvReference.conv3d(x: x, n: c.n, cin: c.cin, d: c.d, h: c.h, w: c.w, weight: wt, bias: b, cout: c.cout,
                                     kernel: c.k, stride: c.stride, padding: c.pad, groups: groups)
            }
            let y = forward(x, wt, b)
            let gy: [Double] = y.map { _ in rng.uniform(-1, 1) }
            func loss(_ y: [Double]) -> Double { zip(y, gy).reduce(0) { $0 + $1.0 * $1.1 } }
            let g = ConvReference.conv3dBackward(x: x, n: c.n, cin: c.cin, d: c.d, h: c.h, w: c.w, weight: wt, gradY: gy,
                                                 cout: c.cout, kernel: c.k, stride: c.stride, padding: c.pad, groups: groups)
            let e = 1e-3
            for _ in 0..<8 {
                let xi = rng.int(0...(x.count - 1)), wi = rng.int(0...(wt.count - 1)), bi = rng.int(0...(c.cout - 1))
                let fdX = centralDifferences(x, at: [xi], h: e) { loss(forward($0, wt, b)) }[0]
                XCTAssertEqual(g.gradX[xi], fdX, accuracy: 1e-8, "\(c.0): dL/dx at flat \(xi)")
                let fdW = centralDifferences(wt, at: [wi], h: e) { loss(forward(x, $0, b)) }[0]
                XCTAssertEqual(g.gradWeight[wi], fdW, accuracy: 1e-8, "\(c.0): dL/dW at flat \(wi)")
                let fdB = centralDifferences(b, at: [bi], h: e) { loss(forward(x, wt, $0)) }[0]
                XCTAssertEqual(g.gradBias[bi], fdB, accuracy: 1e-8, "\(c.0): dL/db at \(bi)")
            }
        }
    }

    /// Conv3d.backward on every path against the reference; gradients are added to random initial
    /// values (the += contract).
    func testBackwardMatchesReference() throws {
        let cases: [ConvCase] = [
            ConvCase(name: "bwd 3x3x3 7x5x3 cin3 cout16", n: 1, cin: 3, cin2: 0, cout: 16, d: 7, h: 5, w: 3, k: 3, stride: 1, pad: 1, bias: true),
            ConvCase(name: "bwd 3x3x3 N2 3x2x8 cin17 cout50", n: 2, cin: 17, cin2: 0, cout: 50, d: 3, h: 2, w: 8, k: 3, stride: 1, pad: 1, bias: true),
            ConvCase(name: "bwd 3x3x3 two sources 5+3 cout17 9x4x6", n: 1, cin: 8, cin2: 3, cout: 17, d: 9, h: 4, w: 6, k: 3, stride: 1, pad: 1, bias: false),
            ConvCase(name: "bwd 3x3x3 two sources 40+30 cout70 (straddling blocks) 2x3x4", n: 1, cin: 70, cin2: 30, cout: 70, d: 2, h: 3, w: 4, k: 3, stride: 1, pad: 1, bias: true),
            ConvCase(name: "bwd 3x3x3 two sources 100+100 cout16 2x10x8 (weight gradient in position chunks)", n: 1, cin: 200, cin2: 100, cout: 16, d: 2, h: 10, w: 8, k: 3, stride: 1, pad: 1, bias: false),
            // The input gradient by Winograd (its conv: Cin 32 -> Cout 70, blocks straddling the sources).
            ConvCase(name: "bwd winograd two sources 40+30 cout32 3x8x10", n: 1, cin: 70, cin2: 30, cout: 32, d: 3, h: 8, w: 10, k: 3, stride: 1, pad: 1, bias: true),
            // Weight and input gradients by Winograd, batch 2, odd D.
            ConvCase(name: "bwd winograd N2 two sources 32+16 cout64 3x8x10", n: 2, cin: 48, cin2: 16, cout: 64, d: 3, h: 8, w: 10, k: 3, stride: 1, pad: 1, bias: false),
            ConvCase(name: "bwd 3x3x3 1x1x1 cin1 cout1", n: 1, cin: 1, cin2: 0, cout: 1, d: 1, h: 1, w: 1, k: 3, stride: 1, pad: 1, bias: true),
            ConvCase(name: "bwd narrow 3x3x3 N2 two sources 8+8 cout16 2x3x16", n: 2, cin: 16, cin2: 8, cout: 16, d: 2, h: 3, w: 16, k: 3, stride: 1, pad: 1, bias: true),
            ConvCase(name: "bwd 1x1x1 N2 two sources 5+3 cout17 7x5x3", n: 2, cin: 8, cin2: 3, cout: 17, d: 7, h: 5, w: 3, k: 1, stride: 1, pad: 0, bias: true),
            ConvCase(name: "bwd 2x2x2 s2 N2 two sources 5+3 cout5 5x4x6", n: 2, cin: 8, cin2: 3, cout: 5, d: 5, h: 4, w: 6, k: 2, stride: 2, pad: 0, bias: true),
            ConvCase(name: "bwd 7x7x7 s2 p3 9x4x6 cin1 cout48", n: 1, cin: 1, cin2: 0, cout: 48, d: 9, h: 4, w: 6, k: 7, stride: 2, pad: 3, bias: true),
            ConvCase(name: "bwd 3x3x3 s2 p1 7x5x3 cin16 cout17", n: 1, cin: 16, cin2: 0, cout: 17, d: 7, h: 5, w: 3, k: 3, stride: 2, pad: 1, bias: false),
        ]
        let guardThreads = ThreadCountGuard()
        defer { guardThreads.restore() }
        for (i, c) in cases.enumerated() {
            var rng = SplitMix64(seed: UInt64(800 + i))
            let shape = try Conv3d.Shape(n: c.n, cin: c.cin, cout: c.cout, d: c.d, h: c.h, w: c.w,
                                         kernel: c.k, stride: c.stride, padding: c.pad, cin2: c.cin2)
            let voxels = c.d * c.h * c.w, c1 = c.cin - c.cin2
            let x1 = rng.floats(c.n * voxels * c1), x2 = rng.floats(c.n * voxels * c.cin2)
            let weight = rng.floats(shape.weightCount)
            let gy = rng.floats(shape.outputCount)
            let gx1Init = rng.floats(x1.count), gx2Init = rng.floats(x2.count)
            let gwInit = rng.floats(weight.count), gbInit = rng.floats(c.cout)
            var xcat = [Double](repeating: 0, count: c.n * voxels * c.cin)
            for v in 0..<(c.n * voxels) {
                for j in 0..<c1 { xcat[v * c.cin + j] = Double(x1[v * c1 + j]) }
                for j in 0..<c.cin2 { xcat[v * c.cin + c1 + j] = Double(x2[v * c.cin2 + j]) }
            }
            let wd = weight.map(Double.init), gyd = gy.map(Double.init)
            let ref = ConvReference.conv3dBackward(x: xcat, n: c.n, cin: c.cin, d: c.d, h: c.h, w: c.w, weight: wd,
                                                   gradY: gyd, cout: c.cout, kernel: c.k, stride: c.stride, padding: c.pad)
            let mag = ConvReference.conv3dBackward(x: xcat.map(abs), n: c.n, cin: c.cin, d: c.d, h: c.h, w: c.w,
                                                   weight: wd.map(abs), gradY: gyd.map(abs), cout: c.cout, kernel: c.k,
                                                   stride: c.stride, padding: c.pad)
            // Expected: initial value + reference; magnitude: |initial| + reference magnitude.
            var want1 = [Double](), want2 = [Double](), mag1 = [Double](), mag2 = [Double]()
            for v in 0..<(c.n * voxels) {
                for j in 0..<c1 {
                    want1.append(Double(gx1Init[v * c1 + j]) + ref.gradX[v * c.cin + j])
                    mag1.append(Double(abs(gx1Init[v * c1 + j])) + mag.gradX[v * c.cin + j])
                }
                for j in 0..<c.cin2 {
                    want2.append(Double(gx2Init[v * c.cin2 + j]) + ref.gradX[v * c.cin + c1 + j])
                    mag2.append(Double(abs(gx2Init[v * c.cin2 + j])) + mag.gradX[v * c.cin + c1 + j])
                }
            }
            let wantW = zip(gwInit, ref.gradWeight).map { Double($0) + $1 }
            let magW = zip(gwInit, mag.gradWeight).map { Double(abs($0)) + $1 }
            let wantB = zip(gbInit, ref.gradBias).map { Double($0) + $1 }
            let magB = zip(gbInit, mag.gradBias).map { Double(abs($0)) + $1 }
            var gradXs: [[Float]] = []
            for threads in [1, 2] {
                try Threads.setCount(threads)
                var gx1 = gx1Init, gx2 = gx2Init, gw = gwInit, gb = gbInit
                let x1t = try Tensor(shape: [max(x1.count, 1)], values: x1.isEmpty ? [0] : x1)
                let x2t = try Tensor(shape: [max(x2.count, 1)], values: x2.isEmpty ? [0] : x2)
                let wt = try Conv3d.pack(weight: try Tensor(shape: [c.cout, c.cin, c.k, c.k, c.k], values: weight), shape: shape)
                let gyt = try Tensor(shape: [gy.count], values: gy)
                try gx1.withUnsafeMutableBufferPointer { g1 in
                    try gx2.withUnsafeMutableBufferPointer { g2 in
                        try gw.withUnsafeMutableBufferPointer { gwp in
                            try gb.withUnsafeMutableBufferPointer { gbp in
                                try Conv3d.backward(x: x1t.pointer, x2: c.cin2 > 0 ? x2t.pointer : nil, packedWeight: wt.pointer,
                                                    gradY: gyt.pointer, gradX: g1.baseAddress,
                                                    gradX2: c.cin2 > 0 ? g2.baseAddress : nil,
                                                    gradWeight: gwp.baseAddress, gradBias: gbp.baseAddress,
                                                    shape: shape, workspace: Workspace())
                            }
                        }
                    }
                }
                let label = "\(c.name), \(threads) thread(s)"
                assertWithinMagnitude(gx1, want1, mag1, rtol: Self.rtol, shape: [c.n, c.d, c.h, c.w, c1], "\(label): grad x1")
                if c.cin2 > 0 {
                    assertWithinMagnitude(gx2, want2, mag2, rtol: Self.rtol, shape: [c.n, c.d, c.h, c.w, c.cin2], "\(label): grad x2")
                }
                assertWithinMagnitude(gw, wantW, magW, rtol: Self.rtol, shape: [c.cout, c.cin, c.k, c.k, c.k], "\(label): grad weight")
                assertWithinMagnitude(gb, wantB, magB, rtol: Self.rtol, shape: [c.cout], "\(label): grad bias")
                gradXs.append(gx1 + gx2)
            }
            assertIdentical(gradXs[1], gradXs[0], "\(c.name): grad x, 2 threads vs 1 thread")
        }
    }

    // MARK: ConvTranspose3d

    func testConvTransposeMatchesReference() throws {
        let cases: [(String, n: Int, cin: Int, cout: Int, d: Int, h: Int, w: Int, k: Int, bias: Bool)] = [
            ("convT k2 7x5x3 cin3 cout16", 1, 3, 16, 7, 5, 3, 2, false),
            ("convT k2 N2 9x4x6 cin17 cout17", 2, 17, 17, 9, 4, 6, 2, true),
            ("convT k2 1x1x1 cin48 cout1", 1, 48, 1, 1, 1, 1, 2, false),
            ("convT k2 2x3x4 cin16 cout48", 1, 16, 48, 2, 3, 4, 2, true),
            ("convT k3 2x2x3 cin5 cout3", 1, 5, 3, 2, 2, 3, 3, true),
        ]
        let guardThreads = ThreadCountGuard()
        defer { guardThreads.restore() }
        for (i, c) in cases.enumerated() {
            var rng = SplitMix64(seed: UInt64(300 + i))
            let x = rng.floats(c.n * c.d * c.h * c.w * c.cin)
            let weight = rng.floats(c.cin * c.cout * c.k * c.k * c.k)
            let bias = c.bias ? rng.floats(c.cout) : nil
            let xd = x.map(Double.init), wd = weight.map(Double.init), bd = bias?.map(Double.init)
            let want = ConvReference.convTranspose3d(x: xd, n: c.n, cin: c.cin, d: c.d, h: c.h, w: c.w, weight: wd,
                                                     bias: bd, cout: c.cout, kernel: c.k, stride: c.k)
            let mag = ConvReference.convTranspose3d(x: xd.map(abs), n: c.n, cin: c.cin, d: c.d, h: c.h, w: c.w,
                                                    weight: wd.map(abs), bias: bd?.map(abs), cout: c.cout,
                                                    kernel: c.k, stride: c.k)
            let outShape = [c.n, c.d * c.k, c.h * c.k, c.w * c.k, c.cout]
            var results: [[Float]] = []
            for threads in [1, 2] {
                try Threads.setCount(threads)
                let y = try ConvTranspose3d.forward(
                    x: try Tensor(shape: [c.n, c.d, c.h, c.w, c.cin], values: x),
                    weight: try Tensor(shape: [c.cin, c.cout, c.k, c.k, c.k], values: weight),
                    bias: try bias.map { try Tensor(shape: [c.cout], values: $0) })
                XCTAssertEqual(y.shape, outShape, c.0)
                let got = try y.toArray()
                assertWithinMagnitude(got, want, mag, rtol: Self.rtol, shape: outShape, "\(c.0), \(threads) thread(s)")
                results.append(got)
            }
            assertIdentical(results[1], results[0], shape: outShape, "\(c.0): 2 threads vs 1 thread")
        }
    }

    func testConvTransposeBackwardMatchesReference() throws {
        let cases: [(String, n: Int, cin: Int, cout: Int, d: Int, h: Int, w: Int, k: Int)] = [
            ("convT bwd k2 7x5x3 cin3 cout16", 1, 3, 16, 7, 5, 3, 2),
            ("convT bwd k2 N2 3x4x6 cin17 cout17", 2, 17, 17, 3, 4, 6, 2),
            ("convT bwd k2 1x1x1 cin48 cout1", 1, 48, 1, 1, 1, 1, 2),
            ("convT bwd k3 2x2x3 cin5 cout3", 1, 5, 3, 2, 2, 3, 3),
        ]
        let guardThreads = ThreadCountGuard()
        defer { guardThreads.restore() }
        for (i, c) in cases.enumerated() {
            var rng = SplitMix64(seed: UInt64(900 + i))
            let s = try ConvTranspose3d.Shape(n: c.n, cin: c.cin, cout: c.cout, d: c.d, h: c.h, w: c.w, kernel: c.k)
            let x = rng.floats(s.inputCount), weight = rng.floats(s.weightCount), gy = rng.floats(s.outputCount)
            let gxInit = rng.floats(x.count), gwInit = rng.floats(weight.count), gbInit = rng.floats(c.cout)
            let xd = x.map(Double.init), wd = weight.map(Double.init), gyd = gy.map(Double.init)
            let ref = ConvReference.convTranspose3dBackward(x: xd, n: c.n, cin: c.cin, d: c.d, h: c.h, w: c.w, weight: wd,
                                                            gradY: gyd, cout: c.cout, kernel: c.k, stride: c.k)
            let mag = ConvReference.convTranspose3dBackward(x: xd.map(abs), n: c.n, cin: c.cin, d: c.d, h: c.h, w: c.w,
                                                            weight: wd.map(abs), gradY: gyd.map(abs), cout: c.cout,
                                                            kernel: c.k, stride: c.k)
            func plus(_ a: [Float], _ b: [Double]) -> [Double] { zip(a, b).map { Double($0) + $1 } }
            func plusAbs(_ a: [Float], _ b: [Double]) -> [Double] { zip(a, b).map { Double(abs($0)) + $1 } }
            for threads in [1, 2] {
                try Threads.setCount(threads)
                var gx = gxInit, gw = gwInit, gb = gbInit
                let xt = try Tensor(shape: [x.count], values: x), wt = try Tensor(shape: [weight.count], values: weight)
                let packed = try Tensor(zeros: [ConvTranspose3d.packedCount(s)])
                ConvTranspose3d.pack(weight: wt.pointer, into: packed.pointer, shape: s)
                let gyt = try Tensor(shape: [gy.count], values: gy)
                try gx.withUnsafeMutableBufferPointer { gxp in
                    try gw.withUnsafeMutableBufferPointer { gwp in
                        try gb.withUnsafeMutableBufferPointer { gbp in
                            try ConvTranspose3d.backward(x: xt.pointer, packedWeight: packed.pointer, gradY: gyt.pointer,
                                                         gradX: gxp.baseAddress, gradWeight: gwp.baseAddress,
                                                         gradBias: gbp.baseAddress, shape: s, workspace: Workspace())
                        }
                    }
                }
                let label = "\(c.0), \(threads) thread(s)"
                assertWithinMagnitude(gx, plus(gxInit, ref.gradX), plusAbs(gxInit, mag.gradX), rtol: Self.rtol,
                                      shape: [c.n, c.d, c.h, c.w, c.cin], "\(label): grad x")
                assertWithinMagnitude(gw, plus(gwInit, ref.gradWeight), plusAbs(gwInit, mag.gradWeight), rtol: Self.rtol,
                                      shape: [c.cin, c.cout, c.k, c.k, c.k], "\(label): grad weight")
                assertWithinMagnitude(gb, plus(gbInit, ref.gradBias), plusAbs(gbInit, mag.gradBias), rtol: Self.rtol,
                                      shape: [c.cout], "\(label): grad bias")
            }
        }
    }

    func testReferenceConvTransposeBackwardFiniteDifferences() throws {
        var rng = SplitMix64(seed: 950)
        let (n, cin, cout, d, h, w, k) = (2, 3, 2, 2, 3, 2, 2)
        let x: [Double] = (0..<(n * d * h * w * cin)).map { _ in rng.uniform(-1, 1) }
        let wt: [Double] = (0..<(cin * cout * k * k * k)).map { _ in rng.uniform(-1, 1) }
        let b: [Double] = (0..<cout).map { _ in rng.uniform(-1, 1) }
        func forward(_ x: [Double], _ wt: [Double], _ b: [Double]) -> [Double] {
            ConvReference.convTranspose3d(x: x, n: n, cin: cin, d: d, h: h, w: w, weight: wt, bias: b, cout: cout,
                                          kernel: k, stride: k)
        }
        let gy: [Double] = forward(x, wt, b).map { _ in rng.uniform(-1, 1) }
        func loss(_ y: [Double]) -> Double { zip(y, gy).reduce(0) { $0 + $1.0 * $1.1 } }
        let g = ConvReference.convTranspose3dBackward(x: x, n: n, cin: cin, d: d, h: h, w: w, weight: wt, gradY: gy,
                                                      cout: cout, kernel: k, stride: k)
        let e = 1e-3
        for _ in 0..<8 {
            let xi = rng.int(0...(x.count - 1)), wi = rng.int(0...(wt.count - 1)), bi = rng.int(0...(cout - 1))
            XCTAssertEqual(g.gradX[xi], centralDifferences(x, at: [xi], h: e) { loss(forward($0, wt, b)) }[0],
                           accuracy: 1e-8, "dL/dx at \(xi)")
            XCTAssertEqual(g.gradWeight[wi], centralDifferences(wt, at: [wi], h: e) { loss(forward(x, $0, b)) }[0],
                           accuracy: 1e-8, "dL/dW at \(wi)")
            XCTAssertEqual(g.gradBias[bi], centralDifferences(b, at: [bi], h: e) { loss(forward(x, wt, $0)) }[0],
                           accuracy: 1e-8, "dL/db at \(bi)")
        }
    }

    // MARK: DepthwiseConv3d

    func testDepthwiseMatchesReference() throws {
        let cases: [(String, n: Int, c: Int, d: Int, h: Int, w: Int, k: Int, bias: Bool)] = [
            ("dw k7 7x5x3 c3", 1, 3, 7, 5, 3, 7, true),
            ("dw k7 N2 9x4x6 c17", 2, 17, 9, 4, 6, 7, true),
            ("dw k7 1x1x1 c48", 1, 48, 1, 1, 1, 7, false),
            ("dw k7 4x9x10 c16", 1, 16, 4, 9, 10, 7, true),
            ("dw k3 3x4x5 c1", 1, 1, 3, 4, 5, 3, true),
            ("dw k7 8x8x8 c48", 1, 48, 8, 8, 8, 7, true),
        ]
        let guardThreads = ThreadCountGuard()
        defer { guardThreads.restore() }
        for (i, c) in cases.enumerated() {
            var rng = SplitMix64(seed: UInt64(400 + i))
            let x = rng.floats(c.n * c.d * c.h * c.w * c.c)
            let weight = rng.floats(c.c * c.k * c.k * c.k)
            let bias = c.bias ? rng.floats(c.c) : nil
            let xd = x.map(Double.init), wd = weight.map(Double.init), bd = bias?.map(Double.init)
            let want = ConvReference.conv3d(x: xd, n: c.n, cin: c.c, d: c.d, h: c.h, w: c.w, weight: wd, bias: bd,
                                            cout: c.c, kernel: c.k, padding: c.k / 2, groups: c.c)
            let mag = ConvReference.conv3d(x: xd.map(abs), n: c.n, cin: c.c, d: c.d, h: c.h, w: c.w,
                                           weight: wd.map(abs), bias: bd?.map(abs), cout: c.c, kernel: c.k,
                                           padding: c.k / 2, groups: c.c)
            let shape = [c.n, c.d, c.h, c.w, c.c]
            var results: [[Float]] = []
            for threads in [1, 2] {
                try Threads.setCount(threads)
                let y = try DepthwiseConv3d.forward(
                    x: try Tensor(shape: shape, values: x),
                    weight: try Tensor(shape: [c.c, 1, c.k, c.k, c.k], values: weight),
                    bias: try bias.map { try Tensor(shape: [c.c], values: $0) })
                let got = try y.toArray()
                assertWithinMagnitude(got, want, mag, rtol: Self.rtol, shape: shape, "\(c.0), \(threads) thread(s)")
                results.append(got)
            }
            assertIdentical(results[1], results[0], shape: shape, "\(c.0): 2 threads vs 1 thread")
        }
    }

    func testDepthwiseBackwardMatchesReference() throws {
        let cases: [(String, n: Int, c: Int, d: Int, h: Int, w: Int, k: Int)] = [
            ("dw bwd k7 7x5x3 c3", 1, 3, 7, 5, 3, 7),
            ("dw bwd k7 N2 4x9x10 c17", 2, 17, 4, 9, 10, 7),
            ("dw bwd k7 1x1x1 c16", 1, 16, 1, 1, 1, 7),
            ("dw bwd k3 3x4x5 c1", 1, 1, 3, 4, 5, 3),
        ]
        let guardThreads = ThreadCountGuard()
        defer { guardThreads.restore() }
        for (i, c) in cases.enumerated() {
            var rng = SplitMix64(seed: UInt64(1000 + i))
            let s = try DepthwiseConv3d.Shape(n: c.n, c: c.c, d: c.d, h: c.h, w: c.w, kernel: c.k)
            let x = rng.floats(s.count), weight = rng.floats(s.weightCount), gy = rng.floats(s.count)
            let gxInit = rng.floats(x.count), gwInit = rng.floats(weight.count), gbInit = rng.floats(c.c)
            let xd = x.map(Double.init), wd = weight.map(Double.init), gyd = gy.map(Double.init)
            let ref = ConvReference.conv3dBackward(x: xd, n: c.n, cin: c.c, d: c.d, h: c.h, w: c.w, weight: wd, gradY: gyd,
                                                   cout: c.c, kernel: c.k, padding: c.k / 2, groups: c.c)
            let mag = ConvReference.conv3dBackward(x: xd.map(abs), n: c.n, cin: c.c, d: c.d, h: c.h, w: c.w,
                                                   weight: wd.map(abs), gradY: gyd.map(abs), cout: c.c, kernel: c.k,
                                                   padding: c.k / 2, groups: c.c)
            func plus(_ a: [Float], _ b: [Double]) -> [Double] { zip(a, b).map { Double($0) + $1 } }
            func plusAbs(_ a: [Float], _ b: [Double]) -> [Double] { zip(a, b).map { Double(abs($0)) + $1 } }
            for threads in [1, 2] {
                try Threads.setCount(threads)
                var gx = gxInit, gw = gwInit, gb = gbInit
                let xt = try Tensor(shape: [x.count], values: x), wt = try Tensor(shape: [weight.count], values: weight)
                let packed = try Tensor(zeros: [DepthwiseConv3d.packedCount(s)])
                DepthwiseConv3d.pack(weight: wt.pointer, into: packed.pointer, shape: s)
                let gyt = try Tensor(shape: [gy.count], values: gy)
                try gx.withUnsafeMutableBufferPointer { gxp in
                    try gw.withUnsafeMutableBufferPointer { gwp in
                        try gb.withUnsafeMutableBufferPointer { gbp in
                            try DepthwiseConv3d.backward(x: xt.pointer, packedWeight: packed.pointer, gradY: gyt.pointer,
                                                         gradX: gxp.baseAddress, gradWeight: gwp.baseAddress,
                                                         gradBias: gbp.baseAddress, shape: s, workspace: Workspace())
                        }
                    }
                }
                let label = "\(c.0), \(threads) thread(s)"
                assertWithinMagnitude(gx, plus(gxInit, ref.gradX), plusAbs(gxInit, mag.gradX), rtol: Self.rtol,
                                      shape: [c.n, c.d, c.h, c.w, c.c], "\(label): grad x")
                assertWithinMagnitude(gw, plus(gwInit, ref.gradWeight), plusAbs(gwInit, mag.gradWeight), rtol: Self.rtol,
                                      shape: [c.c, 1, c.k, c.k, c.k], "\(label): grad weight")
                assertWithinMagnitude(gb, plus(gbInit, ref.gradBias), plusAbs(gbInit, mag.gradBias), rtol: Self.rtol,
                                      shape: [c.c], "\(label): grad bias")
            }
        }
    }

    // MARK: GroupedPointwise3d (UX-Net's grouped MLP, groups = C)

    func testGroupedPointwiseMatchesReference() throws {
        // 8192 voxels or more split into 2 parts.
        for (i, (c, voxels)) in [(1, 5), (3, 7), (17, 11), (48, 50), (8, 9000)].enumerated() {
            var rng = SplitMix64(seed: UInt64(500 + i))
            let r = 4
            // pw1: C -> 4C, weight 4C x 1 x 1 x 1 x 1; pw2: 4C -> C, weight C x 4 x 1 x 1 x 1.
            let x1 = rng.floats(voxels * c), w1 = rng.floats(r * c), b1 = rng.floats(r * c)
            let x2 = rng.floats(voxels * r * c), w2 = rng.floats(r * c), b2 = rng.floats(c)
            for expand in [true, false] {
                let (x, w, b, cin, cout) = expand ? (x1, w1, b1, c, r * c) : (x2, w2, b2, r * c, c)
                let want = ConvReference.conv3d(x: x.map(Double.init), n: 1, cin: cin, d: voxels, h: 1, w: 1,
                                                weight: w.map(Double.init), bias: b.map(Double.init), cout: cout,
                                                kernel: 1, groups: c)
                let mag = ConvReference.conv3d(x: x.map { Double(abs($0)) }, n: 1, cin: cin, d: voxels, h: 1, w: 1,
                                               weight: w.map { Double(abs($0)) }, bias: b.map { Double(abs($0)) },
                                               cout: cout, kernel: 1, groups: c)
                var y = [Float](repeating: .nan, count: voxels * cout)
                x.withUnsafeBufferPointer { xp in
                    w.withUnsafeBufferPointer { wp in
                        b.withUnsafeBufferPointer { bp in
                            y.withUnsafeMutableBufferPointer { yp in
                                if expand {
                                    GroupedPointwise3d.expand(x: xp.baseAddress!, weight: wp.baseAddress!, bias: bp.baseAddress!,
                                                              y: yp.baseAddress!, voxels: voxels, channels: c, ratio: r)
                                } else {
                                    GroupedPointwise3d.reduce(x: xp.baseAddress!, weight: wp.baseAddress!, bias: bp.baseAddress!,
                                                              y: yp.baseAddress!, voxels: voxels, channels: c, ratio: r)
                                }
                            }
                        }
                    }
                }
                assertWithinMagnitude(y, want, mag, rtol: Self.rtol, shape: [voxels, cout],
                                      "grouped \(expand ? "expand" : "reduce") C=\(c) V=\(voxels)")
            }
        }
    }

    func testGroupedPointwiseBackwardMatchesReference() throws {
        let guardThreads = ThreadCountGuard()
        defer { guardThreads.restore() }
        // 8192 voxels or more split into 2 parts.
        for (i, (c, voxels)) in [(1, 5), (3, 7), (17, 11), (48, 50), (8, 9000)].enumerated() {
            var rng = SplitMix64(seed: UInt64(1100 + i))
            let r = 4
            for expand in [true, false] {
                let (cin, cout) = expand ? (c, r * c) : (r * c, c)
                let x = rng.floats(voxels * cin), w = rng.floats(r * c), gy = rng.floats(voxels * cout)
                let gxInit = rng.floats(x.count), gwInit = rng.floats(w.count), gbInit = rng.floats(cout)
                let xd = x.map(Double.init), wd = w.map(Double.init), gyd = gy.map(Double.init)
                let ref = ConvReference.conv3dBackward(x: xd, n: 1, cin: cin, d: voxels, h: 1, w: 1, weight: wd, gradY: gyd,
                                                       cout: cout, kernel: 1, groups: c)
                let mag = ConvReference.conv3dBackward(x: xd.map(abs), n: 1, cin: cin, d: voxels, h: 1, w: 1,
                                                       weight: wd.map(abs), gradY: gyd.map(abs), cout: cout, kernel: 1, groups: c)
                func plus(_ a: [Float], _ b: [Double]) -> [Double] { zip(a, b).map { Double($0) + $1 } }
                func plusAbs(_ a: [Float], _ b: [Double]) -> [Double] { zip(a, b).map { Double(abs($0)) + $1 } }
                for threads in [1, 2] {
                    try Threads.setCount(threads)
                    var gx = gxInit, gw = gwInit, gb = gbInit
                    try x.withUnsafeBufferPointer { xp in
                        try w.withUnsafeBufferPointer { wp in
                            try gy.withUnsafeBufferPointer { gyp in
                                try gx.withUnsafeMutableBufferPointer { gxp in
                                    try gw.withUnsafeMutableBufferPointer { gwp in
                                        try gb.withUnsafeMutableBufferPointer { gbp in
                                            let f = expand ? GroupedPointwise3d.expandBackward : GroupedPointwise3d.reduceBackward
                                            try f(xp.baseAddress!, wp.baseAddress!, gyp.baseAddress!, gxp.baseAddress,
                                                  gwp.baseAddress, gbp.baseAddress, voxels, c, r, Workspace())
                                        }
                                    }
                                }
                            }
                        }
                    }
                    let label = "grouped \(expand ? "expand" : "reduce") backward C=\(c) V=\(voxels), \(threads) thread(s)"
                    assertWithinMagnitude(gx, plus(gxInit, ref.gradX), plusAbs(gxInit, mag.gradX), rtol: Self.rtol,
                                          shape: [voxels, cin], "\(label): grad x")
                    assertWithinMagnitude(gw, plus(gwInit, ref.gradWeight), plusAbs(gwInit, mag.gradWeight), rtol: Self.rtol,
                                          shape: [r * c], "\(label): grad weight")
                    assertWithinMagnitude(gb, plus(gbInit, ref.gradBias), plusAbs(gbInit, mag.gradBias), rtol: Self.rtol,
                                          shape: [cout], "\(label): grad bias")
                }
            }
        }
    }

    // MARK: Validation

    func testBadArgumentsThrow() throws {
        let x = try Tensor(zeros: [1, 3, 3, 3, 4])
        XCTAssertThrowsError(try Conv3d.forward(x: x, weight: try Tensor(zeros: [5, 3, 3, 3, 3]), bias: nil, padding: 1),
                             "weight with the wrong Cin")
        XCTAssertThrowsError(try Conv3d.forward(x: x, x2: try Tensor(zeros: [1, 3, 3, 2, 2]),
                                                weight: try Tensor(zeros: [5, 6, 3, 3, 3]), bias: nil, padding: 1),
                             "x2 with another spatial size")
        XCTAssertThrowsError(try Conv3d.forward(x: x, weight: try Tensor(zeros: [5, 4, 5, 5, 5]), bias: nil),
                             "kernel larger than the padded input")
        XCTAssertThrowsError(try Conv3d.forward(x: x, weight: try Tensor(zeros: [5, 4, 3, 3, 3]),
                                                bias: try Tensor(zeros: [4]), padding: 1), "bias of the wrong size")
        let s = try Conv3d.Shape(n: 1, cin: 4, cout: 5, d: 3, h: 3, w: 3, kernel: 3, stride: 1, padding: 1, cin2: 2)
        let y = try Tensor(zeros: [s.outputCount])
        XCTAssertThrowsError(try Conv3d.forward(x: x.pointer, x2: nil, packedWeight: y.pointer, bias: nil,
                                                y: y.pointer, shape: s, workspace: Workspace()), "missing x2")
        XCTAssertThrowsError(try DepthwiseConv3d.forward(x: x, weight: try Tensor(zeros: [4, 1, 6, 6, 6]), bias: nil),
                             "even depthwise kernel")
        XCTAssertThrowsError(try ConvTranspose3d.forward(x: x, weight: try Tensor(zeros: [3, 4, 2, 2, 2]), bias: nil),
                             "transposed weight with the wrong Cin")
    }

    // MARK: Helper

    /// |got - want| <= rtol * mag + 1e-30 elementwise; on failure names the case, the count, the max
    /// abs error, the max error relative to the magnitude and the first mismatching index.
    func assertWithinMagnitude(_ got: [Float], _ want: [Double], _ mag: [Double], rtol: Double, shape: [Int],
                               _ label: String, file: StaticString = #filePath, line: UInt = #line) {
        guard got.count == want.count else {
            XCTFail("\(label): got \(got.count) values, expected \(want.count)", file: file, line: line)
            return
        }
        var maxAbs = 0.0, maxRel = 0.0, bad = 0
        var first: Int?
        for i in 0..<got.count {
            let e = abs(Double(got[i]) - want[i])
            if !(e <= rtol * mag[i] + 1e-30) {
                bad += 1
                if first == nil { first = i }
            }
            maxAbs = e.isNaN ? .nan : max(maxAbs, e)
            maxRel = max(maxRel, e / max(mag[i], 1e-30))
        }
        if let i = first {
            XCTFail("\(label): \(bad) of \(got.count) values outside \(rtol) x magnitude (sum |w||x|, or its sums for statistics); max abs err \(maxAbs), max err / magnitude \(maxRel); first mismatch at \(multiIndex(i, shape)) (flat \(i)): got \(got[i]), expected \(want[i]), magnitude \(mag[i])",
                    file: file, line: line)
        }
    }
}
