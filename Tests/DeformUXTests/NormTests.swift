import Foundation
import XCTest
@testable import DeformUX

/// Channel LayerNorm, InstanceNorm (statistics from sums, the fused affine + residual + LeakyReLU) and
/// GELU against plain references.
final class NormTests: XCTestCase {
    func testChannelLayerNormMatchesReference() throws {
        for (label, voxels, c) in [("C1", 7, 1), ("C17", 33, 17), ("C48", 100, 48)] {
            var rng = SplitMix64(seed: UInt64(c))
            let x = rng.floats(voxels * c, -3, 5), w = rng.floats(c), b = rng.floats(c)
            let want = NormReference.channelLayerNorm(x.map(Double.init), weight: w.map(Double.init),
                                                      bias: b.map(Double.init), channels: c)
            var y = [Float](repeating: .nan, count: x.count)
            x.withUnsafeBufferPointer { xp in w.withUnsafeBufferPointer { wp in b.withUnsafeBufferPointer { bp in
                y.withUnsafeMutableBufferPointer { yp in
                    ChannelLayerNorm.forward(x: xp.baseAddress!, weight: wp.baseAddress!, bias: bp.baseAddress!,
                                             y: yp.baseAddress!, voxels: voxels, channels: c)
                }
            } } }
            assertClose(y, want, atol: 2e-5, rtol: 1e-5, shape: [voxels, c], "channel LayerNorm \(label)")
        }
    }

    /// Statistics gathered as sums (what Conv3d.forward provides) turned into scale and shift, then the
    /// fused apply with a normalised residual and LeakyReLU, against the reference composition.
    func testInstanceNormFromSumsWithResidualMatchesReference() throws {
        let n = 2, voxels = 300, c = 5
        var rng = SplitMix64(seed: 3)
        let y = rng.floats(n * voxels * c, -2, 4), r = rng.floats(n * voxels * c, 1, 3)
        func sums(_ a: [Float]) -> [Double] {
            var s = [Double](repeating: 0, count: n * 2 * c)
            for b in 0..<n { for v in 0..<voxels { for i in 0..<c {
                let x = Double(a[(b * voxels + v) * c + i])
                s[b * 2 * c + i] += x; s[b * 2 * c + c + i] += x * x
            } } }
            return s
        }
        var sy = [Float](repeating: 0, count: 2 * n * c), sr = [Float](repeating: 0, count: 2 * n * c)
        var out = y
        sums(y).withUnsafeBufferPointer { a in sy.withUnsafeMutableBufferPointer { p in
            InstanceNorm.affine(fromSums: a.baseAddress!, n: n, channels: c, voxels: voxels, scale: p.baseAddress!, shift: p.baseAddress! + n * c)
        } }
        sums(r).withUnsafeBufferPointer { a in sr.withUnsafeMutableBufferPointer { p in
            InstanceNorm.affine(fromSums: a.baseAddress!, n: n, channels: c, voxels: voxels, scale: p.baseAddress!, shift: p.baseAddress! + n * c)
        } }
        out.withUnsafeMutableBufferPointer { o in r.withUnsafeBufferPointer { rp in sy.withUnsafeBufferPointer { a in sr.withUnsafeBufferPointer { b in
            InstanceNorm.applyAffine(o.baseAddress!, scale: a.baseAddress!, shift: a.baseAddress! + n * c, plus: rp.baseAddress!,
                                     scale: b.baseAddress!, shift: b.baseAddress! + n * c, leakySlope: 0.01,
                                     n: n, voxels: voxels, channels: c)
        } } } }
        let ny = NormReference.instanceNorm(y.map(Double.init), n: n, voxels: voxels, channels: c)
        let nr = NormReference.instanceNorm(r.map(Double.init), n: n, voxels: voxels, channels: c)
        let want = zip(ny, nr).map { NormReference.leakyReLU($0 + $1) }
        assertClose(out, want, atol: 1e-5, rtol: 1e-5, shape: [n, voxels, c], "InstanceNorm + residual + LeakyReLU")
    }

    func testInstanceNormTwoPassStatistics() throws {
        let voxels = 5000, c = 3
        var rng = SplitMix64(seed: 4)
        let x = rng.floats(voxels * c, 100, 101)  // a large mean: the two-pass form keeps the variance exact
        var mean = [Float](repeating: 0, count: c), rstd = [Float](repeating: 0, count: c)
        try x.withUnsafeBufferPointer { xp in
            try InstanceNorm.statistics(x: xp.baseAddress!, voxels: voxels, channels: c, mean: &mean, rstd: &rstd,
                                        workspace: Workspace())
        }
        let want = NormReference.instanceNorm(x.map(Double.init), n: 1, voxels: voxels, channels: c)
        var got = x
        for v in 0..<voxels { for i in 0..<c { got[v * c + i] = (x[v * c + i] - mean[i]) * rstd[i] } }
        assertClose(got, want, atol: 2e-4, rtol: 1e-4, "InstanceNorm statistics, mean 100")
    }

    /// The exact (erf) GELU, against libm's erf in Double, over the whole useful range and the tails.
    func testGELUMatchesErfForm() {
        var xs: [Float] = stride(from: -9.0, through: 9.0, by: 0.01).map { Float($0) }
        xs += [0, -0.0, 1e-30, -1e-30, 50, -50, .greatestFiniteMagnitude / 4]
        var y = [Float](repeating: .nan, count: xs.count)
        xs.withUnsafeBufferPointer { a in y.withUnsafeMutableBufferPointer { b in
            Activation.gelu(x: a.baseAddress!, y: b.baseAddress!, count: xs.count)
        } }
        let want = xs.map { x -> Double in let d = Double(x); return d * (1 + Foundation.erf(d / 2.0.squareRoot())) / 2 }
        assertClose(y, want, atol: 1e-6, rtol: 2e-6, "GELU")
    }

    // MARK: Backward: analytic (Float, fast) against central differences of the Double references

    func testChannelLayerNormBackwardMatchesFiniteDifferences() throws {
        let voxels = 6, c = 5
        var rng = SplitMix64(seed: 21)
        let x = rng.floats(voxels * c, -2, 3), w = rng.floats(c, 0.5, 1.5), b = rng.floats(c), gy = rng.floats(voxels * c)
        let xd = x.map(Double.init), wd = w.map(Double.init), bd = b.map(Double.init), gyd = gy.map(Double.init)
        func loss(_ x: [Double], _ w: [Double], _ b: [Double]) -> Double {
            zip(NormReference.channelLayerNorm(x, weight: w, bias: b, channels: c), gyd).reduce(0) { $0 + $1.0 * $1.1 }
        }
        func fd(_ base: [Double], _ f: ([Double]) -> Double) -> [Double] { centralDifferences(base, h: 1e-6, f) }
        var gx = [Float](repeating: 0.25, count: x.count), gw = [Float](repeating: 0, count: c), gb = [Float](repeating: 0, count: c)
        try x.withUnsafeBufferPointer { xp in try w.withUnsafeBufferPointer { wp in try gy.withUnsafeBufferPointer { gp in
            try gx.withUnsafeMutableBufferPointer { gxp in try gw.withUnsafeMutableBufferPointer { gwp in try gb.withUnsafeMutableBufferPointer { gbp in
                try ChannelLayerNorm.backward(x: xp.baseAddress!, weight: wp.baseAddress!, gradY: gp.baseAddress!,
                                              gradX: gxp.baseAddress!, gradWeight: gwp.baseAddress!, gradBias: gbp.baseAddress!,
                                              voxels: voxels, channels: c, workspace: Workspace())
            } } }
        } } }
        // gradX started at 0.25: backward adds.
        assertClose(gx.map { Double($0) - 0.25 }, fd(xd) { loss($0, wd, bd) }, atol: 2e-4, rtol: 1e-3, "LayerNorm dx")
        assertClose(gw, fd(wd) { loss(xd, $0, bd) }, atol: 2e-4, rtol: 1e-3, "LayerNorm dweight")
        assertClose(gb, fd(bd) { loss(xd, wd, $0) }, atol: 2e-4, rtol: 1e-3, "LayerNorm dbias")
    }

    func testInstanceNormBackwardMatchesFiniteDifferences() throws {
        let n = 2, voxels = 40, c = 3
        var rng = SplitMix64(seed: 22)
        let x = rng.floats(n * voxels * c, -1, 4), gy = rng.floats(n * voxels * c)
        let gyd = gy.map(Double.init)
        func loss(_ x: [Double]) -> Double {
            zip(NormReference.instanceNorm(x, n: n, voxels: voxels, channels: c), gyd).reduce(0) { $0 + $1.0 * $1.1 }
        }
        let want = centralDifferences(x.map(Double.init), h: 1e-6, loss)
        var mean = [Float](repeating: 0, count: n * c), rstd = [Float](repeating: 0, count: n * c)
        var gx = [Float](repeating: 0, count: x.count)
        let ws = Workspace()
        try x.withUnsafeBufferPointer { xp in
            for s in 0..<n {
                try mean.withUnsafeMutableBufferPointer { mp in try rstd.withUnsafeMutableBufferPointer { rp in
                    try InstanceNorm.statistics(x: xp.baseAddress! + s * voxels * c, voxels: voxels, channels: c,
                                                mean: mp.baseAddress! + s * c, rstd: rp.baseAddress! + s * c, workspace: ws)
                } }
            }
            let shift = zip(mean, rstd).map { -$0 * $1 }
            try gy.withUnsafeBufferPointer { gp in try gx.withUnsafeMutableBufferPointer { gxp in
                try InstanceNorm.backward(x: xp.baseAddress!, scale: rstd, shift: shift, rstd: rstd, leakySlope: nil,
                                          gradY: gp.baseAddress!, gradX: gxp.baseAddress!, accumulate: true,
                                          n: n, voxels: voxels, channels: c, workspace: ws)
            } }
        }
        assertClose(gx, want, atol: 2e-4, rtol: 1e-3, shape: [n, voxels, c], "InstanceNorm dx")
    }

    func testGELUBackwardMatchesFiniteDifferences() {
        let xs: [Float] = stride(from: -6.0, through: 6.0, by: 0.037).map { Float($0) } + [0]
        let gy = [Float](repeating: 1, count: xs.count)
        var gx = [Float](repeating: 0, count: xs.count)
        xs.withUnsafeBufferPointer { a in gy.withUnsafeBufferPointer { g in gx.withUnsafeMutableBufferPointer { o in
            Activation.geluBackward(x: a.baseAddress!, gradY: g.baseAddress!, gradX: o.baseAddress!, count: xs.count)
        } } }
        let want = xs.map { x in centralDifferences([Double(x)], h: 1e-6) { NormReference.gelu($0[0], erf: Foundation.erf) }[0] }
        assertClose(gx, want, atol: 2e-6, rtol: 1e-5, "GELU derivative")
    }
}
