import XCTest
@testable import DeformUX

/// The oracle itself: finite-difference gradients (Double), the zero-offset and integer-shift special
/// cases, against independent plain loops. The shift and plain-conv checks also run the fast kernel.
final class DeformConv3dReferenceTests: XCTestCase {
    /// Offsets whose fractional part is in [0.1, 0.9] (whole part in [-2, 1]): every sampling position
    /// is at least 0.1 from an integer, away from the kinks of trilinear sampling, and some fall off
    /// each border.
    static func offsetsAwayFromIntegers(_ count: Int, _ rng: inout SplitMix64) -> [Double] {
        (0..<count).map { _ in Double(rng.int(-2...1)) + rng.uniform(0.1, 0.9) }
    }

    /// L = sum(gradY * y); its gradient is what backward returns given gradY.
    static func loss(_ x: [Double], _ off: [Double], _ w: [Double], _ b: [Double], _ gy: [Double], _ s: DDCShape) -> Double {
        let y = DeformConv3dReference.forward(x: x, offsets: off, weight: w, bias: b, shape: s)
        return zip(y, gy).reduce(0) { $0 + $1.0 * $1.1 }
    }

    func testFiniteDifferenceGradients() {
        let shapes: [(String, DDCShape)] = [
            ("1x1x1 C1", ddcShape(1, 1, 1, 1, 1)),
            ("2x2x2 C2", ddcShape(1, 2, 2, 2, 2)),
            ("3x1x2 C1 N2", ddcShape(2, 1, 3, 1, 2)),
            ("1x3x2 C3", ddcShape(1, 3, 1, 3, 2)),
        ]
        // Central differences; y is linear in x, weight, bias and, within a cell, in each offset
        // coordinate, so the only error is rounding: ~1e-16 * |L| / h.
        let h = 1e-6
        let tol = (atol: 1e-7, rtol: 1e-6)
        for (index, (name, s)) in shapes.enumerated() {
            var rng = SplitMix64(seed: UInt64(300 + index))
            let x: [Double] = (0..<s.count).map { _ in rng.uniform(-1, 1) }
            let off = Self.offsetsAwayFromIntegers(s.offsetCount, &rng)
            let w: [Double] = (0..<s.weightCount).map { _ in rng.uniform(-1, 1) }
            let b: [Double] = (0..<s.c).map { _ in rng.uniform(-1, 1) }
            let gy: [Double] = (0..<s.count).map { _ in rng.uniform(-1, 1) }
            let g = DeformConv3dReference.backward(x: x, offsets: off, weight: w, gradY: gy, shape: s)

            let nx = centralDifferences(x, h: h) { Self.loss($0, off, w, b, gy, s) }
            let no = centralDifferences(off, h: h) { Self.loss(x, $0, w, b, gy, s) }
            let nw = centralDifferences(w, h: h) { Self.loss(x, off, $0, b, gy, s) }
            let nb = centralDifferences(b, h: h) { Self.loss(x, off, w, $0, gy, s) }
            let label = "case '\(name)' [\(s)]"
            assertClose(g.gradX, nx, atol: tol.atol, rtol: tol.rtol, shape: [s.n, s.c, s.d, s.h, s.w], "\(label) grad x vs finite differences")
            assertClose(g.gradOffsets, no, atol: tol.atol, rtol: tol.rtol, shape: [s.n, 81, s.d, s.h, s.w], "\(label) grad offsets vs finite differences")
            assertClose(g.gradWeight, nw, atol: tol.atol, rtol: tol.rtol, shape: [s.c, 27], "\(label) grad weight vs finite differences")
            assertClose(g.gradBias, nb, atol: tol.atol, rtol: tol.rtol, "\(label) grad bias vs finite differences")
            // The offset gradient must not be trivially zero (in 1x1x1, 12 of 81 are inside).
            XCTAssertGreaterThan(g.gradOffsets.filter { $0 != 0 }.count, s.offsetCount / 10, "\(label): grad offsets mostly zero")
        }
    }

    /// The generic oracle in Float agrees with itself in Double.
    func testFloatReferenceMatchesDouble() {
        let data = DDCData(ddcShape(2, 5, 3, 4, 5), offsets: .uniform(2.5), seed: 310)
        let y = DeformConv3dReference.forward(x: data.x, offsets: data.offsets, weight: data.weight, bias: data.bias, shape: data.shape)
        let g = DeformConv3dReference.backward(x: data.x, offsets: data.offsets, weight: data.weight, gradY: data.gradY, shape: data.shape)
        let gd = data.referenceBackward()
        assertClose(y, data.referenceForward(), atol: 1e-5, rtol: 1e-5, "Float reference y")
        assertClose(g.gradX, gd.gradX, atol: 1e-5, rtol: 1e-5, "Float reference grad x")
        assertClose(g.gradOffsets, gd.gradOffsets, atol: 1e-5, rtol: 1e-5, "Float reference grad offsets")
        assertClose(g.gradWeight, gd.gradWeight, atol: 1e-4, rtol: 1e-5, "Float reference grad weight")
        assertClose(g.gradBias, gd.gradBias, atol: 1e-4, rtol: 1e-5, "Float reference grad bias")
    }

    /// A plain depthwise 3x3x3 convolution, padding 1, written independently of the DDC code.
    static func depthwiseConv(_ x: [Double], _ w: [Double], _ b: [Double]?, _ s: DDCShape) -> [Double] {
        var y = [Double](repeating: 0, count: s.count)
        for n in 0..<s.n {
            for c in 0..<s.c {
                for d in 0..<s.d {
                    for hh in 0..<s.h {
                        for ww in 0..<s.w {
                            var acc = b?[c] ?? 0
                            for i in 0..<3 {
                                for j in 0..<3 {
                                    for k in 0..<3 {
                                        let (sd, sh, sw) = (d + i - 1, hh + j - 1, ww + k - 1)
                                        if sd < 0 || sd >= s.d || sh < 0 || sh >= s.h || sw < 0 || sw >= s.w { continue }
                                        acc += w[c * 27 + i * 9 + j * 3 + k] * x[(((n * s.c + c) * s.d + sd) * s.h + sh) * s.w + sw]
                                    }
                                }
                            }
                            y[(((n * s.c + c) * s.d + d) * s.h + hh) * s.w + ww] = acc
                        }
                    }
                }
            }
        }
        return y
    }

    func testZeroOffsetsAreAPlainDepthwiseConv() throws {
        let shapes: [(String, DDCShape)] = [
            ("1x1x1 C1", ddcShape(1, 1, 1, 1, 1)),
            ("7x5x3 C17 N2", ddcShape(2, 17, 7, 5, 3)),
            ("3x1x9 C3", ddcShape(1, 3, 3, 1, 9)),
            ("4x4x4 C16", ddcShape(1, 16, 4, 4, 4)),
        ]
        for (index, (name, s)) in shapes.enumerated() {
            let data = DDCData(s, offsets: .zero, seed: UInt64(320 + index))
            let want = Self.depthwiseConv(data.x.map(Double.init), data.weight.map(Double.init), data.bias!.map(Double.init), s)
            assertClose(data.referenceForward(), want, atol: 1e-12, rtol: 1e-12, shape: data.xShape, "case '\(name)': reference vs depthwise conv")
            assertClose(try data.fastForward(), want, atol: 1e-5, rtol: 1e-5, shape: data.xShape, "case '\(name)': fast kernel vs depthwise conv")
        }
    }

    /// With a weight of 1 at the centre tap only, an offset of +-1 along axis a at that tap gives
    /// y[o] = x[o +- e_a], and 0 past the edge. Exact in both kernels (all weights are 0 or 1).
    func testUnitOffsetShiftsAlongItsAxis() throws {
        let s = ddcShape(2, 17, 4, 3, 5)
        var rng = SplitMix64(seed: 330)
        let x = rng.floats(s.count)
        var w = [Float](repeating: 0, count: s.weightCount)
        for c in 0..<s.c { w[c * 27 + 13] = 1 }
        let sizes = [s.d, s.h, s.w]
        for axis in 0..<3 {
            for step in [1, -1] {
                var off = [Float](repeating: 0, count: s.offsetCount)
                for n in 0..<s.n {
                    for v in 0..<s.voxels { off[(n * 81 + 3 * 13 + axis) * s.voxels + v] = Float(step) }
                }
                var want = [Float](repeating: 0, count: s.count)
                for n in 0..<s.n {
                    for c in 0..<s.c {
                        for d in 0..<s.d {
                            for h in 0..<s.h {
                                for ww in 0..<s.w {
                                    var src = [d, h, ww]
                                    src[axis] += step
                                    let o = (((n * s.c + c) * s.d + d) * s.h + h) * s.w + ww
                                    guard src[axis] >= 0, src[axis] < sizes[axis] else { continue }
                                    want[o] = x[(((n * s.c + c) * s.d + src[0]) * s.h + src[1]) * s.w + src[2]]
                                }
                            }
                        }
                    }
                }
                let label = "offset \(step) on axis \(["D", "H", "W"][axis]) at the centre tap"
                let ref = DeformConv3dReference.forward(x: x, offsets: off, weight: w, bias: nil, shape: s)
                assertIdentical(ref, want, shape: [s.n, s.c, s.d, s.h, s.w], "\(label): reference")
                let fast = try DeformConv3d.forward(x: Tensor(shape: [s.n, s.c, s.d, s.h, s.w], values: x),
                                                    offsets: Tensor(shape: [s.n, 81, s.d, s.h, s.w], values: off),
                                                    weight: Tensor(shape: [s.c, 1, 3, 3, 3], values: w), bias: nil).toArray()
                assertIdentical(fast, want, shape: [s.n, s.c, s.d, s.h, s.w], "\(label): fast kernel")
            }
        }
    }

    /// Half-voxel offsets average two neighbours; past the edge, the outside neighbour counts 0.
    func testHalfOffsetAveragesNeighbours() {
        let s = ddcShape(1, 1, 1, 1, 3)
        let x: [Double] = [2, 4, 8]
        var w = [Double](repeating: 0, count: 27)
        w[13] = 1
        var off = [Double](repeating: 0, count: s.offsetCount)
        for v in 0..<3 { off[(3 * 13 + 2) * 3 + v] = 0.5 }
        let y = DeformConv3dReference.forward(x: x, offsets: off, weight: w, bias: nil, shape: s)
        assertClose(y, [3, 6, 4], atol: 1e-15, rtol: 0, "offset +0.5 along W")
        for v in 0..<3 { off[(3 * 13 + 2) * 3 + v] = -0.75 }
        let y2 = DeformConv3dReference.forward(x: x, offsets: off, weight: w, bias: nil, shape: s)
        // p = w - 0.75: 0.25*0 + ... : w=0 -> p=-0.75: 0.25*x[0]; w=1 -> 0.25: 0.75*x0+0.25*x1; w=2 -> 1.25
        assertClose(y2, [0.5, 2.5, 5], atol: 1e-15, rtol: 0, "offset -0.75 along W")
    }
}
