import XCTest
@testable import DeformUX

/// The fast DDC kernel (`DeformConv3d`) against the plain-loop oracle (`DeformConv3dReference`, run in
/// Double) over awkward shapes and offsets, with 1, 2 and 3 threads.
final class DeformConv3dTests: XCTestCase {
    struct Case {
        let name: String
        let shape: DDCShape
        let offsets: OffsetKind
        var bias = true
    }

    /// Voxel counts are mostly not multiples of the 16-voxel block; channel counts straddle the
    /// SIMD16 width.
    static let cases: [Case] = [
        Case(name: "1x1x1 C1", shape: ddcShape(1, 1, 1, 1, 1), offsets: .uniform(2.5)),
        Case(name: "1x1x1 C17 N2", shape: ddcShape(2, 17, 1, 1, 1), offsets: .uniform(2.5)),
        Case(name: "7x5x3 C3 N2", shape: ddcShape(2, 3, 7, 5, 3), offsets: .uniform(2.5)),
        Case(name: "3x1x9 C16", shape: ddcShape(1, 16, 3, 1, 9), offsets: .uniform(2.5)),
        Case(name: "7x5x3 C17", shape: ddcShape(1, 17, 7, 5, 3), offsets: .uniform(2.5)),
        Case(name: "3x5x4 C48 N2", shape: ddcShape(2, 48, 3, 5, 4), offsets: .uniform(2.5)),
        Case(name: "9x8x7 C48", shape: ddcShape(1, 48, 9, 8, 7), offsets: .uniform(2.5)),
        Case(name: "4x4x4 C1 no bias", shape: ddcShape(1, 1, 4, 4, 4), offsets: .uniform(2.5), bias: false),
        Case(name: "2x3x5 C48 no bias", shape: ddcShape(1, 48, 2, 3, 5), offsets: .uniform(2.5), bias: false),
        Case(name: "2x3x5 C1 integers", shape: ddcShape(1, 1, 2, 3, 5), offsets: .integers(2)),
        Case(name: "7x5x3 C16 integers", shape: ddcShape(1, 16, 7, 5, 3), offsets: .integers(3)),
        Case(name: "3x1x9 C17 N2 integers", shape: ddcShape(2, 17, 3, 1, 9), offsets: .integers(1)),
        Case(name: "4x3x5 C17 far 1e3", shape: ddcShape(1, 17, 4, 3, 5), offsets: .far(1e3)),
        Case(name: "3x4x2 C3 N2 mixed 1e6", shape: ddcShape(2, 3, 3, 4, 2), offsets: .mixedFar(1e6)),
        Case(name: "7x5x3 C16 mixed 1e3", shape: ddcShape(1, 16, 7, 5, 3), offsets: .mixedFar(1e3)),
        Case(name: "5x3x3 C17 N2 nan/inf", shape: ddcShape(2, 17, 5, 3, 3), offsets: .nonFinite),
        Case(name: "1x1x1 C3 nan/inf", shape: ddcShape(1, 3, 1, 1, 1), offsets: .nonFinite),
        Case(name: "4x4x4 C16 zero", shape: ddcShape(1, 16, 4, 4, 4), offsets: .zero),
        Case(name: "6x5x7 C17 unquantized", shape: ddcShape(1, 17, 6, 5, 7), offsets: .unquantized(2.5)),
        Case(name: "3x5x4 C48 N2 unquantized", shape: ddcShape(2, 48, 3, 5, 4), offsets: .unquantized(2.5)),
    ]

    // Tolerances for the Float kernel against the Double oracle (inputs, weights and grad_y in
    // [-1, 1]). Observed max abs errors over the table: y 1.1e-6, grad x 1.5e-6, grad offsets 1e-6,
    // grad weight 6.5e-6, grad bias 2.5e-5 (a Float sum over 1008 voxels).
    static let forwardTol = (atol: 1e-5, rtol: 1e-5)
    static let gradXTol = (atol: 1e-5, rtol: 1e-5)
    static let gradOffsetsTol = (atol: 1e-5, rtol: 1e-5)
    static let gradParamTol = (atol: 1e-4, rtol: 1e-5)

    let threads = ThreadCountGuard()
    override func tearDown() { threads.restore() }

    func testMatchesReferenceWithOneTwoAndThreeThreads() throws {
        // One workspace for every case and thread count: stale contents must never leak into results.
        let workspace = Workspace()
        for (index, c) in Self.cases.enumerated() {
            let data = DDCData(c.shape, offsets: c.offsets, bias: c.bias, seed: UInt64(100 + index))
            let label = "case '\(c.name)' [\(c.shape), offsets \(c.offsets)]"
            let yRef = data.referenceForward()
            let gRef = data.referenceBackward()
            var runs: [(y: [Float], g: (gradX: [Float], gradOffsets: [Float], gradWeight: [Float], gradBias: [Float]))] = []
            for t in [1, 2, 3] {
                try Threads.setCount(t)
                let y = try data.fastForward(workspace: workspace)
                let g = try data.fastBackward(workspace: workspace)
                runs.append((y, g))
                let l = "\(label), \(t) thread(s)"
                XCTAssertTrue(allFinite(y), "\(l): y has non-finite values")
                XCTAssertTrue(allFinite(g.gradOffsets) && allFinite(g.gradX), "\(l): gradients have non-finite values")
                assertClose(y, yRef, atol: Self.forwardTol.atol, rtol: Self.forwardTol.rtol, shape: data.xShape, "\(l) y")
                assertClose(g.gradX, gRef.gradX, atol: Self.gradXTol.atol, rtol: Self.gradXTol.rtol,
                            shape: data.xShape, "\(l) grad x")
                if c.offsets.exactPositions {
                    assertClose(g.gradOffsets, gRef.gradOffsets, atol: Self.gradOffsetsTol.atol,
                                rtol: Self.gradOffsetsTol.rtol, shape: data.offsetShape, "\(l) grad offsets")
                }
                assertClose(g.gradWeight, gRef.gradWeight, atol: Self.gradParamTol.atol, rtol: Self.gradParamTol.rtol,
                            shape: data.weightShape, "\(l) grad weight")
                assertClose(g.gradBias, gRef.gradBias, atol: Self.gradParamTol.atol, rtol: Self.gradParamTol.rtol,
                            "\(l) grad bias")
            }
            // Channels-last x / y / grads (pointer API), 2 threads: the same numbers as channels-first.
            try Threads.setCount(2)
            let cl = try data.fastChannelsLast(workspace: workspace)
            let l2 = runs[1]
            assertIdentical(cl.y, l2.y, shape: data.xShape, "\(label), channels-last: y vs channels-first")
            assertIdentical(cl.gradOffsets, l2.g.gradOffsets, shape: data.offsetShape, "\(label), channels-last: grad offsets vs channels-first")
            assertClose(cl.gradX, gRef.gradX, atol: Self.gradXTol.atol, rtol: Self.gradXTol.rtol, shape: data.xShape, "\(label), channels-last: grad x")
            assertClose(cl.gradWeight, gRef.gradWeight, atol: Self.gradParamTol.atol, rtol: Self.gradParamTol.rtol, "\(label), channels-last: grad weight")
            assertClose(cl.gradBias, gRef.gradBias, atol: Self.gradParamTol.atol, rtol: Self.gradParamTol.rtol, "\(label), channels-last: grad bias")

            // Per-voxel outputs do not depend on the thread count at all; sums over parts only by rounding.
            let a = runs[0]
            for (k, b) in runs.enumerated().dropFirst() {
                let vs = "\(k + 1) threads vs 1"
                assertIdentical(b.y, a.y, shape: data.xShape, "\(label): y, \(vs)")
                assertIdentical(b.g.gradOffsets, a.g.gradOffsets, shape: data.offsetShape, "\(label): grad offsets, \(vs)")
                assertClose(b.g.gradX, a.g.gradX, atol: 1e-5, rtol: 1e-5, shape: data.xShape, "\(label): grad x, \(vs)")
                assertClose(b.g.gradWeight, a.g.gradWeight, atol: 1e-4, rtol: 1e-5, "\(label): grad weight, \(vs)")
                assertClose(b.g.gradBias, a.g.gradBias, atol: 1e-4, rtol: 1e-5, "\(label): grad bias, \(vs)")
            }
        }
    }

    /// Far and non-finite offsets: every out-of-volume sample is exactly 0, so y is exactly the bias there.
    func testFarOffsetsGiveExactlyTheBias() throws {
        for (kind, seed) in [(OffsetKind.far(1e3), UInt64(7)), (.far(1e6), 8), (.far(Double(Float.greatestFiniteMagnitude)), 9)] {
            let data = DDCData(ddcShape(2, 17, 3, 4, 5), offsets: kind, seed: seed)
            let y = try data.fastForward()
            let want = (0..<data.shape.count).map { data.bias![($0 / data.shape.voxels) % data.shape.c] }
            assertIdentical(y, want, shape: data.xShape, "offsets \(kind): y vs bias")
            let g = try data.fastBackward()
            assertIdentical(g.gradX, [Float](repeating: 0, count: data.shape.count), "offsets \(kind): grad x")
            assertIdentical(g.gradOffsets, [Float](repeating: 0, count: data.shape.offsetCount), "offsets \(kind): grad offsets")
            assertIdentical(g.gradWeight, [Float](repeating: 0, count: data.shape.weightCount), "offsets \(kind): grad weight")
        }
        // Every offset NaN or infinite: same.
        var rng = SplitMix64(seed: 11)
        let base = DDCData(ddcShape(1, 16, 3, 3, 3), offsets: .zero, seed: 12)
        let bad: [Float] = (0..<base.shape.offsetCount).map { _ in [Float.nan, .infinity, -.infinity][rng.int(0...2)] }
        let y = try DeformConv3d.forward(x: Tensor(shape: base.xShape, values: base.x),
                                         offsets: Tensor(shape: base.offsetShape, values: bad),
                                         weight: Tensor(shape: base.weightShape, values: base.weight),
                                         bias: Tensor(shape: [16], values: base.bias!)).toArray()
        let want = (0..<base.shape.count).map { base.bias![($0 / base.shape.voxels) % base.shape.c] }
        assertIdentical(y, want, "all offsets non-finite: y vs bias")
    }

    /// A non-finite input value must not leak into samples that the out-of-volume rule makes 0 (the spec
    /// says "the sample is 0"). Only the voxel itself, when actually sampled, may give NaN.
    /// (FINDINGS.md, finding 1: the first kernel weighted invalid samples' corners by 0, and 0 * inf.)
    func testNonFiniteInputDoesNotLeakIntoOutsideSamples() throws {
        let s = ddcShape(1, 2, 3, 3, 3)
        var x = [Float](repeating: 1, count: s.count)
        x[0] = .infinity            // channel 0, voxel (0, 0, 0)
        x[s.voxels + 26] = .nan     // channel 1, voxel (2, 2, 2)
        let xs = [1, 2, 3, 3, 3]
        for (kind, seed) in [(OffsetKind.far(1e3), UInt64(41)), (.nonFinite, 42)] {
            var rng = SplitMix64(seed: seed)
            var off = kind.draw(s.offsetCount, &rng)
            if case .nonFinite = kind { off = off.map { $0.isFinite ? 1e3 : $0 } }  // every sample outside
            let w = [Float](repeating: 1, count: s.weightCount)
            let y = try DeformConv3d.forward(x: Tensor(shape: xs, values: x), offsets: Tensor(shape: [1, 81, 3, 3, 3], values: off),
                                             weight: Tensor(shape: [2, 1, 3, 3, 3], values: w),
                                             bias: Tensor(shape: [2], values: [0.5, 0.25])).toArray()
            let want = (0..<s.count).map { $0 < s.voxels ? Float(0.5) : 0.25 }
            assertIdentical(y, want, shape: xs, "x with inf at [0,0,0,0,0] and NaN at [0,1,2,2,2], offsets \(kind): y vs bias")
        }
    }

    /// The pointer API adds into gradient buffers (STYLE.md habit 2) and accepts nil for any of them.
    func testBackwardAccumulatesAndSkipsNilGradients() throws {
        let data = DDCData(ddcShape(2, 17, 3, 5, 4), offsets: .uniform(2.5), seed: 21)
        let s = data.shape
        let fresh = try data.fastBackward()
        var rng = SplitMix64(seed: 22)
        let gx0 = rng.floats(s.count), go0 = rng.floats(s.offsetCount)
        let gw0 = rng.floats(s.weightCount), gb0 = rng.floats(s.c)
        var gx = gx0, go = go0, gw = gw0, gb = gb0
        var x = data.x, off = data.offsets, w = data.weight, gy = data.gradY
        try DeformConv3d.backward(x: &x, offsets: &off, weight: &w, gradY: &gy, gradX: &gx, gradOffsets: &go,
                                  gradWeight: &gw, gradBias: &gb, shape: s, workspace: Workspace())
        func plus(_ a: [Float], _ b: [Float]) -> [Float] { zip(a, b).map { $0 + $1 } }
        assertClose(gx, plus(gx0, fresh.gradX), atol: 1e-6, rtol: 1e-6, "accumulate: grad x")
        assertClose(go, plus(go0, fresh.gradOffsets), atol: 1e-6, rtol: 1e-6, "accumulate: grad offsets")
        assertClose(gw, plus(gw0, fresh.gradWeight), atol: 1e-6, rtol: 1e-6, "accumulate: grad weight")
        assertClose(gb, plus(gb0, fresh.gradBias), atol: 1e-6, rtol: 1e-6, "accumulate: grad bias")

        // Each gradient alone.
        for which in 0..<4 {
            var gxOnly = [Float](repeating: 0, count: s.count), goOnly = [Float](repeating: 0, count: s.offsetCount)
            var gwOnly = [Float](repeating: 0, count: s.weightCount), gbOnly = [Float](repeating: 0, count: s.c)
            try gxOnly.withUnsafeMutableBufferPointer { gxp in
                try goOnly.withUnsafeMutableBufferPointer { gop in
                    try gwOnly.withUnsafeMutableBufferPointer { gwp in
                        try gbOnly.withUnsafeMutableBufferPointer { gbp in
                            try DeformConv3d.backward(x: &x, offsets: &off, weight: &w, gradY: &gy,
                                                      gradX: which == 0 ? gxp.baseAddress : nil,
                                                      gradOffsets: which == 1 ? gop.baseAddress : nil,
                                                      gradWeight: which == 2 ? gwp.baseAddress : nil,
                                                      gradBias: which == 3 ? gbp.baseAddress : nil,
                                                      shape: s, workspace: Workspace())
                        }
                    }
                }
            }
            switch which {
            case 0: assertIdentical(gxOnly, fresh.gradX, "only grad x requested")
            case 1: assertIdentical(goOnly, fresh.gradOffsets, "only grad offsets requested")
            case 2: assertIdentical(gwOnly, fresh.gradWeight, "only grad weight requested")
            default: assertIdentical(gbOnly, fresh.gradBias, "only grad bias requested")
            }
        }
    }

    // MARK: Tensor API validation

    func testTensorAPIRejectsBadArgumentsNamingThem() throws {
        let s = ddcShape(1, 3, 4, 5, 6)
        func t(_ shape: [Int]) throws -> Tensor { try Tensor(zeros: shape) }
        let x = try t([1, 3, 4, 5, 6]), off = try t([1, 81, 4, 5, 6]), w = try t([3, 1, 3, 3, 3]), b = try t([3])
        let gy = try t([1, 3, 4, 5, 6])
        // A non-contiguous view: the transpose of a contiguous tensor's last two axes.
        func transposedLastTwo(_ shape: [Int]) throws -> Tensor {
            var swapped = shape
            swapped.swapAt(shape.count - 1, shape.count - 2)
            let base = try Tensor(zeros: swapped)
            var strides = base.strides
            strides.swapAt(shape.count - 1, shape.count - 2)
            return Tensor(shape: shape, strides: strides, storage: base.storage, offset: 0)
        }
        _ = s
        struct Bad { let name: String; let x: Tensor; let off: Tensor; let w: Tensor; let b: Tensor?; let gy: Tensor; let expect: [String] }
        let bad: [Bad] = [
            Bad(name: "x rank 4", x: try t([3, 4, 5, 6]), off: off, w: w, b: b, gy: gy, expect: ["x", "rank 5"]),
            Bad(name: "x rank 6", x: try t([1, 1, 3, 4, 5, 6]), off: off, w: w, b: b, gy: gy, expect: ["x", "rank 5"]),
            Bad(name: "x with C = 0", x: try t([1, 0, 4, 5, 6]), off: off, w: try t([0, 1, 3, 3, 3]), b: try t([0]), gy: try t([1, 0, 4, 5, 6]), expect: ["C", ">= 1"]),
            Bad(name: "x with D = 0", x: try t([1, 3, 0, 5, 6]), off: off, w: w, b: b, gy: gy, expect: ["D", ">= 1"]),
            Bad(name: "offsets 27 channels", x: x, off: try t([1, 27, 4, 5, 6]), w: w, b: b, gy: gy, expect: ["offsets", "81"]),
            Bad(name: "offsets other volume", x: x, off: try t([1, 81, 4, 5, 7]), w: w, b: b, gy: gy, expect: ["offsets"]),
            Bad(name: "offsets other batch", x: x, off: try t([2, 81, 4, 5, 6]), w: w, b: b, gy: gy, expect: ["offsets"]),
            Bad(name: "offsets rank 4", x: x, off: try t([81, 4, 5, 6]), w: w, b: b, gy: gy, expect: ["offsets"]),
            Bad(name: "weight C x 27", x: x, off: off, w: try t([3, 27]), b: b, gy: gy, expect: ["weight", "[3, 1, 3, 3, 3]"]),
            Bad(name: "weight other C", x: x, off: off, w: try t([4, 1, 3, 3, 3]), b: b, gy: gy, expect: ["weight"]),
            Bad(name: "weight 5x5x5", x: x, off: off, w: try t([3, 1, 5, 5, 5]), b: b, gy: gy, expect: ["weight"]),
            Bad(name: "bias other C", x: x, off: off, w: w, b: try t([4]), gy: gy, expect: ["bias"]),
            Bad(name: "bias rank 2", x: x, off: off, w: w, b: try t([3, 1]), gy: gy, expect: ["bias"]),
            Bad(name: "grad_output other shape", x: x, off: off, w: w, b: b, gy: try t([1, 3, 4, 5, 7]), expect: ["grad_output"]),
            Bad(name: "x non-contiguous", x: try transposedLastTwo([1, 3, 4, 5, 6]), off: off, w: w, b: b, gy: gy, expect: ["x", "contiguous"]),
            Bad(name: "offsets non-contiguous", x: x, off: try transposedLastTwo([1, 81, 4, 5, 6]), w: w, b: b, gy: gy, expect: ["offsets", "contiguous"]),
            Bad(name: "weight non-contiguous", x: x, off: off, w: try transposedLastTwo([3, 1, 3, 3, 3]), b: b, gy: gy, expect: ["weight", "contiguous"]),
            Bad(name: "grad_output non-contiguous", x: x, off: off, w: w, b: b, gy: try transposedLastTwo([1, 3, 4, 5, 6]), expect: ["grad_output", "contiguous"]),
        ]
        for c in bad {
            // grad_output is only an argument of backward.
            let forwardApplies = !c.name.hasPrefix("grad_output")
            if forwardApplies {
                do {
                    _ = try DeformConv3d.forward(x: c.x, offsets: c.off, weight: c.w, bias: c.b)
                    XCTFail("case '\(c.name)': forward accepted it")
                } catch let e as DeformUXError {
                    for word in c.expect {
                        XCTAssertTrue(e.description.contains(word), "case '\(c.name)': forward error does not name '\(word)': \(e.description)")
                    }
                } catch { XCTFail("case '\(c.name)': forward threw a non-DeformUXError \(error)") }
            }
            if c.name.hasPrefix("bias") { continue }  // backward takes no bias
            do {
                _ = try DeformConv3d.backward(x: c.x, offsets: c.off, weight: c.w, gradY: c.gy)
                XCTFail("case '\(c.name)': backward accepted it")
            } catch let e as DeformUXError {
                for word in c.expect {
                    XCTAssertTrue(e.description.contains(word), "case '\(c.name)': backward error does not name '\(word)': \(e.description)")
                }
            } catch { XCTFail("case '\(c.name)': backward threw a non-DeformUXError \(error)") }
        }
        // The same tensors, valid, pass.
        XCTAssertNoThrow(try DeformConv3d.forward(x: x, offsets: off, weight: w, bias: b))
        XCTAssertNoThrow(try DeformConv3d.forward(x: x, offsets: off, weight: w, bias: nil))
        XCTAssertNoThrow(try DeformConv3d.backward(x: x, offsets: off, weight: w, gradY: gy))
    }
}
