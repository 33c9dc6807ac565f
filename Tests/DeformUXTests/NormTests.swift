import Foundation
import XCTest
@testable import DeformUX

/// Channel LayerNorm, InstanceNorm (statistics from sums, the fused affine + residual + LeakyReLU) and
/// GELU against plain references.
final class NormTests: XCTestCase {
    func testChannelLayerNormMatchesReference() throws {
        for (label, voxels, c) in [("C1", 7, 1), ("C17", 33, 17), ("C48", 100, 48)] {
            var rng = TestRNG(seed: UInt64(c))
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
        var rng = TestRNG(seed: 3)
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
        var rng = TestRNG(seed: 4)
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
}
