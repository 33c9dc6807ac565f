#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Elementwise activations.
///
/// GELU is the exact erf form, x * (1 + erf(x / sqrt 2)) / 2 (PyTorch's default `nn.GELU()`), with erf
/// evaluated by the rational approximation XLA and Eigen use (x clamped to [-4, 4], an odd numerator
/// of degree 13 over an even denominator of degree 8): at most 4.2e-7 absolute error against libm.
public enum Activation {
    public typealias V = SIMD16<Float>

    @inline(__always)
    public static func erf(_ x: V) -> V {
        let z = x.clamped(lowerBound: V(repeating: -4), upperBound: V(repeating: 4))
        let z2 = z * z
        var p = V(repeating: -2.72614225801306e-10)
        p = V(repeating: 2.77068142495902e-08).addingProduct(p, z2)
        p = V(repeating: -2.10102402082508e-06).addingProduct(p, z2)
        p = V(repeating: -5.69250639462346e-05).addingProduct(p, z2)
        p = V(repeating: -7.34990630326855e-04).addingProduct(p, z2)
        p = V(repeating: -2.95459980854025e-03).addingProduct(p, z2)
        p = V(repeating: -1.60960333262415e-02).addingProduct(p, z2)
        var q = V(repeating: -1.45660718464996e-05)
        q = V(repeating: -2.13374055278905e-04).addingProduct(q, z2)
        q = V(repeating: -1.68282697438203e-03).addingProduct(q, z2)
        q = V(repeating: -7.37332916720468e-03).addingProduct(q, z2)
        q = V(repeating: -1.42647390514189e-02).addingProduct(q, z2)
        return z * p / q
    }

    /// GELU of 16 values.
    @inline(__always)
    public static func gelu(_ x: V) -> V {
        x * (V(repeating: 1) + erf(x * V(repeating: 0.70710678118654752))) * V(repeating: 0.5)
    }

    /// Elements per thread part of the elementwise kernels (coarse: each part is tens of microseconds).
    static let elementsPerPart = 1 << 16

    /// Runs `body(range)` over 0..<count in parts (in parallel when count is large; serially when
    /// called from inside another parallel part).
    @inline(__always)
    static func split(_ count: Int, _ body: (Range<Int>) -> Void) {
        let parts = max(1, min(Threads.count, count / elementsPerPart))
        if parts == 1 { body(0..<count); return }
        parallelFor(parts) { part in
            // Part boundaries on multiples of 16 keep every part's SIMD loads aligned to the vector.
            let lo = Threads.range(part, of: parts, total: (count + 15) / 16).lowerBound * 16
            let hi = min(count, Threads.range(part, of: parts, total: (count + 15) / 16).upperBound * 16)
            body(lo..<hi)
        }
    }

    /// y = GELU(x) over `count` values; y may alias x.
    public static func gelu(x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>, count: Int) {
        split(count) { r in
            var i = r.lowerBound
            while i + 16 <= r.upperBound {
                let v = UnsafeRawPointer(x + i).loadUnaligned(as: V.self)
                UnsafeMutableRawPointer(y + i).storeBytes(of: gelu(v), as: V.self)
                i += 16
            }
            if i < r.upperBound {
                var v = V()
                for l in 0..<(r.upperBound - i) { v[l] = x[i + l] }
                let out = gelu(v)
                for l in 0..<(r.upperBound - i) { y[i + l] = out[l] }
            }
        }
    }

    /// gradX (+= or =) gradY * GELU'(x), GELU'(x) = Phi(x) + x phi(x), Phi the normal CDF, phi its
    /// density. gradX may alias gradY when `accumulate` is false.
    public static func geluBackward(x: UnsafePointer<Float>, gradY: UnsafePointer<Float>,
                                    gradX: UnsafeMutablePointer<Float>, count: Int, accumulate: Bool = true) {
        let invSqrt2Pi: Float = 0.3989422804014327
        split(count) { r in
            var i = r.lowerBound
            while i < r.upperBound {
                let lanes = min(16, r.upperBound - i)
                var v = V(), g = V()
                for l in 0..<lanes { v[l] = x[i + l]; g[l] = gradY[i + l] }
                let cdf = (V(repeating: 1) + erf(v * V(repeating: 0.70710678118654752))) * V(repeating: 0.5)
                var pdf = V()
                for l in 0..<lanes { pdf[l] = invSqrt2Pi * expf(-0.5 * v[l] * v[l]) }
                let d = g * cdf.addingProduct(v, pdf)
                if accumulate {
                    for l in 0..<lanes { gradX[i + l] += d[l] }
                } else {
                    for l in 0..<lanes { gradX[i + l] = d[l] }
                }
                i += 16
            }
        }
    }

    /// gradX (= or +=) gradY * LeakyReLU'(z), read off the activation's output y = LeakyReLU(z) (same
    /// sign as z; at 0 the slope, as PyTorch's). gradX may alias gradY when `accumulate` is false.
    public static func leakyReLUBackward(output y: UnsafePointer<Float>, gradY: UnsafePointer<Float>,
                                         gradX: UnsafeMutablePointer<Float>, count: Int, slope: Float,
                                         accumulate: Bool) {
        split(count) { r in
            for i in r {
                let d = y[i] > 0 ? gradY[i] : gradY[i] * slope
                gradX[i] = accumulate ? gradX[i] + d : d
            }
        }
    }

    /// y[i] += x[i] over `count` values.
    public static func add(_ x: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, count: Int) {
        split(count) { r in for i in r { y[i] += x[i] } }
    }
}
