import Foundation
import XCTest
@testable import DeformUX

/// Stand-in: each output channel is its input plus the mean of that channel over the window. Not
/// translation invariant, so window positions, weights and normalisation all show in the result (the
/// MONAI fixtures in Tests/Fixtures/pipeline/blend.json use the same predictor).
struct WindowMeanPredictor: WindowPredictor {
    let inChannels: Int
    var outChannels: Int { inChannels }
    var sizeMultiple = 1
    var preferredBatch = 1

    func predict(windows: UnsafePointer<Float>, batch: Int, size: SIMD3<Int>, into: UnsafeMutablePointer<Float>) throws {
        let n = size.x * size.y * size.z
        for k in 0..<(batch * inChannels) {
            var s = 0.0
            for i in 0..<n { s += Double(windows[k * n + i]) }
            let mean = Float(s / Double(n))
            for i in 0..<n { into[k * n + i] = windows[k * n + i] + mean }
        }
    }
}

/// Stand-in that is not flip-equivariant: x + 0.1 * (index along the window's x axis). Averaged over the
/// 8 flips its ramp becomes the constant 0.05 * (w0 - 1).
struct RampPredictor: WindowPredictor {
    let inChannels: Int
    var outChannels: Int { inChannels }
    var sizeMultiple = 1
    var preferredBatch = 1

    func predict(windows: UnsafePointer<Float>, batch: Int, size: SIMD3<Int>, into: UnsafeMutablePointer<Float>) throws {
        let n = size.x * size.y * size.z
        for k in 0..<(batch * inChannels) {
            for i in 0..<n { into[k * n + i] = windows[k * n + i] + 0.1 * Float(i / (size.y * size.z)) }
        }
    }
}

/// Counts calls and windows of another predictor; checks that every call gets the size it expects.
final class CountingPredictor: WindowPredictor {
    let inner: any WindowPredictor
    private(set) var calls = 0
    private(set) var windows = 0
    private(set) var sizes: Set<[Int]> = []
    private(set) var batches: [Int] = []
    var failAfter: Int?

    init(_ inner: any WindowPredictor) { self.inner = inner }
    var inChannels: Int { inner.inChannels }
    var outChannels: Int { inner.outChannels }
    var sizeMultiple: Int { inner.sizeMultiple }
    var preferredBatch: Int { inner.preferredBatch }

    func predict(windows p: UnsafePointer<Float>, batch: Int, size: SIMD3<Int>, into: UnsafeMutablePointer<Float>) throws {
        if let f = failAfter, calls >= f { throw DeformUXError.internal("stand-in", "failing on purpose") }
        calls += 1
        windows += batch
        batches.append(batch)
        sizes.insert([size.x, size.y, size.z])
        try inner.predict(windows: p, batch: batch, size: size, into: into)
    }
}

/// A stand-in with settable properties (for validation tests).
struct OddPredictor: WindowPredictor {
    var inChannels = 1
    var outChannels = 2
    var sizeMultiple = 1
    var preferredBatch = 1
    var output: Float = 0

    func predict(windows: UnsafePointer<Float>, batch: Int, size: SIMD3<Int>, into: UnsafeMutablePointer<Float>) throws {
        into.update(repeating: output, count: batch * outChannels * size.x * size.y * size.z)
    }
}

enum PipelineFixture {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Fixtures/pipeline")

    /// The "cases" array of a fixture file.
    static func cases(_ file: String) throws -> [[String: Any]] {
        let data = try Data(contentsOf: directory.appendingPathComponent(file))
        guard let root = try JSONSerialization.jsonObject(with: data) as? [String: Any],
              let cases = root["cases"] as? [[String: Any]] else {
            throw DeformUXError.io("fixture", "\(file): no cases")
        }
        return cases
    }
}

extension Dictionary where Key == String, Value == Any {
    func ints(_ k: String) -> [Int] { (self[k] as? [Any])?.compactMap { ($0 as? NSNumber)?.intValue } ?? [] }
    func doubles(_ k: String) -> [Double] { (self[k] as? [Any])?.compactMap { ($0 as? NSNumber)?.doubleValue } ?? [] }
    /// float32 values written as exact doubles.
    func floats(_ k: String) -> [Float] { doubles(k).map { Float($0) } }
    func double(_ k: String) -> Double { (self[k] as? NSNumber)?.doubleValue ?? .nan }
    func int(_ k: String) -> Int { (self[k] as? NSNumber)?.intValue ?? -1 }
    func string(_ k: String) -> String { self[k] as? String ?? "" }
    func size(_ k: String) -> SIMD3<Int> { let v = ints(k); return v.count == 3 ? SIMD3(v[0], v[1], v[2]) : SIMD3(0, 0, 0) }
}

/// Random volume values with a clear argmax over channels: at every voxel one channel (random) is at
/// least `margin` above every other, so blending's rounding can never change the labels.
func separatedChannels(_ rng: inout SplitMix64, channels: Int, voxels: Int, margin: Float = 0.25) -> (values: [Float], argmax: [UInt8]) {
    var v = [Float](repeating: 0, count: channels * voxels)
    var arg = [UInt8](repeating: 0, count: voxels)
    for i in 0..<voxels {
        let winner = rng.int(0...(channels - 1))
        arg[i] = UInt8(winner)
        for c in 0..<channels {
            v[c * voxels + i] = c == winner ? Float(rng.uniform(0.5, 1.5)) : Float(rng.uniform(-1, 0.5 - Double(margin)))
        }
    }
    return (v, arg)
}

/// Runs the streaming sliding window, returning labels, probabilities and logits.
func runStreaming(_ predictor: any WindowPredictor, _ input: [Float], _ size: SIMD3<Int>, _ options: SlidingWindowOptions,
                  engine: SlidingWindowInference = SlidingWindowInference(),
                  progress: WindowProgress? = nil) throws -> (labels: [UInt8], probabilities: [Float], logits: [Float], stats: SlidingWindowStatistics) {
    let n = size.x * size.y * size.z
    var labels = [UInt8](repeating: 0xAA, count: n)
    var probs = [Float](repeating: .nan, count: predictor.outChannels * n)
    var logits = [Float](repeating: .nan, count: predictor.outChannels * n)
    let stats = try input.withUnsafeBufferPointer { x in
        try labels.withUnsafeMutableBufferPointer { l in
            try probs.withUnsafeMutableBufferPointer { p in
                try logits.withUnsafeMutableBufferPointer { g in
                    try engine.run(predictor, input: x.baseAddress!, size: size, options: options, labels: l.baseAddress!,
                                   probabilities: p.baseAddress!, logits: g.baseAddress!, progress: progress)
                }
            }
        }
    }
    return (labels, probs, logits, stats)
}

/// Asserts that a throwing call fails with a DeformUXError of `kind` whose description mentions each of
/// `mentions`.
func assertThrowsDeformUX(_ kind: DeformUXError.Kind, _ mentions: [String] = [], _ label: String,
                          file: StaticString = #filePath, line: UInt = #line, _ body: () throws -> Void) {
    do {
        try body()
        XCTFail("\(label): expected a \(kind) error, got none", file: file, line: line)
    } catch let e as DeformUXError {
        XCTAssertEqual(e.kind, kind, "\(label): \(e)", file: file, line: line)
        for m in mentions where !e.description.contains(m) {
            XCTFail("\(label): error '\(e)' does not mention '\(m)'", file: file, line: line)
        }
    } catch {
        XCTFail("\(label): expected DeformUXError, got \(error)", file: file, line: line)
    }
}
