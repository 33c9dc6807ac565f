import XCTest
@testable import DeformUX

/// The training draws on SplitMix64: reproducible, resumable, and with the right distributions
/// (bounds stated per test, about 5 standard errors wide, on fixed seeds).
final class TrainingRandomTests: XCTestCase {
    func testSameSeedAndRestoredStateContinue() {
        var a = SplitMix64(seed: 99)
        var b = SplitMix64(seed: 99)
        for _ in 0..<17 { XCTAssertEqual(a.next(), b.next()) }
        _ = a.normal(); _ = a.index(below: 7); _ = a.unitDouble()
        let saved = a.state
        let expected = (0..<50).map { _ in a.next() }
        var resumed = SplitMix64(state: saved)
        XCTAssertEqual((0..<50).map { _ in resumed.next() }, expected, "restored state continues the sequence")
        XCTAssertNotEqual(SplitMix64.stream(key: 5, index: 0).state, SplitMix64.stream(key: 5, index: 1).state)
        var s0 = SplitMix64.stream(key: 5, index: 0), s0b = SplitMix64.stream(key: 5, index: 0)
        XCTAssertEqual(s0.next(), s0b.next())
    }

    func testIndexIsUniformAndInRange() {
        var g = SplitMix64(seed: 1)
        let n = 10, draws = 100_000
        var counts = [Int](repeating: 0, count: n)
        for _ in 0..<draws {
            let i = g.index(below: n)
            XCTAssertTrue(i >= 0 && i < n)
            counts[i] += 1
        }
        // chi-square with 9 degrees of freedom: mean 9, sd 4.2; 35 is beyond the 0.9999 quantile (~33.7).
        let e = Double(draws) / Double(n)
        let chi2 = counts.reduce(0.0) { $0 + (Double($1) - e) * (Double($1) - e) / e }
        XCTAssertLessThan(chi2, 35, "counts \(counts)")
        XCTAssertEqual(g.index(below: 1), 0)
        XCTAssertEqual(g.index(below: 0), 0)
        // a bound that is not a power of two near 2^63 still lands in range
        for _ in 0..<1000 { XCTAssertLessThan(g.index(below: Int.max - 5), Int.max - 5) }
    }

    func testNormalMoments() {
        var g = SplitMix64(seed: 2)
        let n = 200_000
        var sum = 0.0, sum2 = 0.0
        for _ in 0..<n { let x = g.normal(); sum += x; sum2 += x * x }
        let mean = sum / Double(n), variance = sum2 / Double(n) - mean * mean
        // standard errors: mean 1/sqrt(n) = 0.0022, variance sqrt(2/n) = 0.0032
        XCTAssertEqual(mean, 0, accuracy: 0.011)
        XCTAssertEqual(variance, 1, accuracy: 0.016)
        var buffer = [Float](repeating: 1, count: 100_001)
        buffer.withUnsafeMutableBufferPointer { g.addNormal($0.baseAddress!, count: $0.count, sigma: 0.5) }
        let m = buffer.reduce(0.0) { $0 + Double($1) } / Double(buffer.count)
        let v = buffer.reduce(0.0) { $0 + (Double($1) - m) * (Double($1) - m) } / Double(buffer.count)
        XCTAssertEqual(m, 1, accuracy: 0.5 * 0.016)        // 5 standard errors of 0.5 / sqrt(n)
        XCTAssertEqual(v.squareRoot(), 0.5, accuracy: 0.5 * 0.012)
        var u = SplitMix64(seed: 3)
        for _ in 0..<10_000 { let x = u.unitDouble(); XCTAssertTrue(x >= 0 && x < 1) }
    }
}
