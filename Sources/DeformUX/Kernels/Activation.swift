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

    /// y = GELU(x) over `count` values; y may alias x.
    public static func gelu(x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>, count: Int) {
        var i = 0
        while i + 16 <= count {
            let v = UnsafeRawPointer(x + i).loadUnaligned(as: V.self)
            UnsafeMutableRawPointer(y + i).storeBytes(of: gelu(v), as: V.self)
            i += 16
        }
        if i < count {
            var v = V()
            for l in 0..<(count - i) { v[l] = x[i + l] }
            let r = gelu(v)
            for l in 0..<(count - i) { y[i + l] = r[l] }
        }
    }

    /// gradX += gradY * GELU'(x), GELU'(x) = Phi(x) + x phi(x), Phi the normal CDF, phi its density.
    public static func geluBackward(x: UnsafePointer<Float>, gradY: UnsafePointer<Float>,
                                    gradX: UnsafeMutablePointer<Float>, count: Int) {
        let invSqrt2Pi: Float = 0.3989422804014327
        var i = 0
        while i < count {
            let lanes = min(16, count - i)
            var v = V(), g = V()
            for l in 0..<lanes { v[l] = x[i + l]; g[l] = gradY[i + l] }
            let cdf = (V(repeating: 1) + erf(v * V(repeating: 0.70710678118654752))) * V(repeating: 0.5)
            var pdf = V()
            for l in 0..<lanes { pdf[l] = invSqrt2Pi * expf(-0.5 * v[l] * v[l]) }
            let d = g * cdf.addingProduct(v, pdf)
            for l in 0..<lanes { gradX[i + l] += d[l] }
            i += 16
        }
    }
}
