import Foundation
import XCTest
@testable import DeformUX

/// Test data comes from the engine's own seeded generator (`SplitMix64`, Layers/Parameters.swift), so
/// every case is reproducible from its seed; these helpers draw the kinds of values the tests need.
extension SplitMix64 {
    /// Uniform in [lo, hi), in Double (53 random bits).
    mutating func uniform(_ lo: Double, _ hi: Double) -> Double {
        lo + (hi - lo) * Double(next() >> 11) / Double(UInt64(1) << 53)
    }

    mutating func int(_ range: ClosedRange<Int>) -> Int {
        range.lowerBound + Int(next() % UInt64(range.count))
    }

    mutating func bool() -> Bool { next() & 1 == 1 }

    /// `count` floats uniform in [lo, hi).
    mutating func floats(_ count: Int, _ lo: Double = -1, _ hi: Double = 1) -> [Float] {
        (0..<count).map { _ in Float(uniform(lo, hi)) }
    }
}

/// Central differences (f(x + h e_i) - f(x - h e_i)) / 2h of a scalar function of `x`, in Double, at
/// the flat indices `indices` (every index by default): the finite-difference oracle of the gradient
/// checks (STYLE.md habit 9). The one helper for all of them.
func centralDifferences(_ x: [Double], at indices: [Int]? = nil, h: Double, _ f: ([Double]) -> Double) -> [Double] {
    (indices ?? Array(x.indices)).map { i in
        var plus = x, minus = x
        plus[i] += h
        minus[i] -= h
        return (f(plus) - f(minus)) / (2 * h)
    }
}

/// The multi-index of flat index `i` in a C-contiguous array of `shape`.
func multiIndex(_ i: Int, _ shape: [Int]) -> [Int] {
    var rest = i
    var index = [Int](repeating: 0, count: shape.count)
    for a in stride(from: shape.count - 1, through: 0, by: -1) {
        index[a] = rest % max(shape[a], 1)
        rest /= max(shape[a], 1)
    }
    return index
}

/// Checks |got - want| <= atol + rtol * |want| elementwise (NaN anywhere fails). On failure reports the
/// label, how many elements mismatch, the max abs and rel errors and the first mismatching index.
@discardableResult
func assertClose(_ got: [Double], _ want: [Double], atol: Double, rtol: Double, shape: [Int]? = nil,
                 _ label: String, file: StaticString = #filePath, line: UInt = #line) -> Bool {
    guard got.count == want.count else {
        XCTFail("\(label): got \(got.count) values, expected \(want.count)", file: file, line: line)
        return false
    }
    var maxAbs = 0.0, maxRel = 0.0
    var firstBad: Int?
    var bad = 0
    for i in 0..<got.count {
        let e = abs(got[i] - want[i])
        let ok = e <= atol + rtol * abs(want[i])  // false for NaN
        if !ok {
            bad += 1
            if firstBad == nil { firstBad = i }
        }
        if e.isNaN { maxAbs = .nan; maxRel = .nan; continue }
        maxAbs = max(maxAbs, e)
        maxRel = max(maxRel, e / max(abs(want[i]), 1e-30))
    }
    if let i = firstBad {
        let at = shape.map { " \(multiIndex(i, $0))" } ?? ""
        XCTFail("\(label): \(bad) of \(got.count) values outside atol \(atol) + rtol \(rtol); max abs err \(maxAbs), max rel err \(maxRel); first mismatch at flat \(i)\(at): got \(got[i]), expected \(want[i])",
                file: file, line: line)
        return false
    }
    return true
}

func assertClose(_ got: [Float], _ want: [Double], atol: Double, rtol: Double, shape: [Int]? = nil,
                 _ label: String, file: StaticString = #filePath, line: UInt = #line) {
    assertClose(got.map(Double.init), want, atol: atol, rtol: rtol, shape: shape, label, file: file, line: line)
}

func assertClose(_ got: [Float], _ want: [Float], atol: Double, rtol: Double, shape: [Int]? = nil,
                 _ label: String, file: StaticString = #filePath, line: UInt = #line) {
    assertClose(got.map(Double.init), want.map(Double.init), atol: atol, rtol: rtol, shape: shape, label,
                file: file, line: line)
}

/// Bitwise equality (NaN payloads aside), reporting the first difference.
func assertIdentical(_ got: [Float], _ want: [Float], shape: [Int]? = nil, _ label: String,
                     file: StaticString = #filePath, line: UInt = #line) {
    guard got.count == want.count else {
        XCTFail("\(label): got \(got.count) values, expected \(want.count)", file: file, line: line)
        return
    }
    var maxAbs: Float = 0
    var firstBad: Int?
    var bad = 0
    for i in 0..<got.count where !(got[i] == want[i] || (got[i].isNaN && want[i].isNaN)) {
        bad += 1
        if firstBad == nil { firstBad = i }
        let e = abs(got[i] - want[i])
        maxAbs = e.isNaN || maxAbs.isNaN ? .nan : max(maxAbs, e)
    }
    if let i = firstBad {
        let at = shape.map { " \(multiIndex(i, $0))" } ?? ""
        XCTFail("\(label): \(bad) of \(got.count) values differ (expected identical); max abs diff \(maxAbs); first at flat \(i)\(at): got \(got[i]), expected \(want[i])",
                file: file, line: line)
    }
}

func allFinite(_ a: [Float]) -> Bool { a.allSatisfy { $0.isFinite } }

/// Restores the engine's thread count when a test changes it.
final class ThreadCountGuard {
    let saved = Threads.count
    func restore() { try? Threads.setCount(saved) }
}
