#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The random draws of training (patch centres, augmentation parameters, noise), on the engine's one
/// generator, `SplitMix64` (Layers/Parameters.swift).
///
/// Every draw is defined here bit for bit rather than through the standard library's `Int.random` /
/// `Double.random`, whose algorithms may change between Swift releases: a seed gives the same batches
/// on every machine and toolchain. The generator's complete state is one `UInt64` (`state`); a
/// checkpoint stores it and `SplitMix64(state:)` continues the sequence exactly, so a resumed run draws
/// what the uninterrupted run would have drawn.
extension SplitMix64 {
    /// The generator whose next draw is the one `g` would make after reaching `state` (`g.state`).
    public init(state: UInt64) { self.init(seed: state) }

    /// Uniform in [0, 1): 53 random bits (one draw).
    @inlinable
    public mutating func unitDouble() -> Double { Double(next() >> 11) * 0x1p-53 }

    /// Uniform in [lo, hi) (one draw). `lo == hi` gives `lo`.
    @inlinable
    public mutating func uniformDouble(_ lo: Double, _ hi: Double) -> Double { lo + (hi - lo) * unitDouble() }

    /// True with probability `p` (one draw, also when p is 0 or 1, so the sequence does not depend on p).
    @inlinable
    public mutating func bernoulli(_ p: Double) -> Bool { unitDouble() < p }

    /// Uniform in 0..<n, unbiased (Lemire's multiply-shift with rejection: one draw, rarely more).
    /// n <= 1 gives 0 after one draw.
    public mutating func index(below n: Int) -> Int {
        let x = next()
        guard n > 1 else { return 0 }
        let bound = UInt64(n)
        var m = x.multipliedFullWidth(by: bound)
        if m.low < bound {
            let threshold = (0 &- bound) % bound  // 2^64 mod bound
            while m.low < threshold { m = next().multipliedFullWidth(by: bound) }
        }
        return Int(m.high)
    }

    /// A standard normal value (Box-Muller, cosine branch; two draws, no cached second value, so the
    /// state stays one UInt64).
    public mutating func normal() -> Double {
        let u1 = 1 - unitDouble()  // (0, 1]: log is finite
        let u2 = unitDouble()
        return (-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2)
    }

    /// Adds `sigma` times independent standard normal values to `out[0..<count]` (Box-Muller, both
    /// branches: two draws per pair of values).
    public mutating func addNormal(_ out: UnsafeMutablePointer<Float>, count: Int, sigma: Double) {
        var i = 0
        while i < count {
            let u1 = 1 - unitDouble()
            let u2 = unitDouble()
            let r = sigma * (-2 * log(u1)).squareRoot()
            let a = 2 * Double.pi * u2
            out[i] += Float(r * cos(a))
            if i + 1 < count { out[i + 1] += Float(r * sin(a)) }
            i += 2
        }
    }

    /// SplitMix64's output function, a bijection of UInt64 that scrambles every bit. Used to derive
    /// independent streams from a key and an index (`SplitMix64(seed: mix(key ^ index))`), so work
    /// split across threads draws the same numbers whatever the thread count.
    @inlinable
    public static func mix(_ x: UInt64) -> UInt64 {
        var z = x
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// The stream for part `index` of the work keyed by `key` (see `mix`).
    @inlinable
    public static func stream(key: UInt64, index: Int) -> SplitMix64 {
        SplitMix64(seed: mix(key ^ mix(UInt64(truncatingIfNeeded: index))))
    }
}
