import Foundation
import XCTest
@testable import DeformUX

/// AdamW against torch.optim.AdamW (Tests/Fixtures/training/adamw.json).
final class AdamWTests: XCTestCase {
    let threads = ThreadCountGuard()
    override func tearDown() { threads.restore() }

    /// One fixture case laid out like the parameter store: tensors at 16-aligned offsets, gaps between.
    struct Flat {
        var layout = ParameterLayout()
        var values: [Float] = []
        var grads: [Float] = []
        var m: [Float] = []
        var v: [Float] = []
        let gapValue: Float = 12345
    }

    func flat(shapes: [[Int]], initial: [[Double]]) throws -> Flat {
        var f = Flat()
        for (i, s) in shapes.enumerated() { _ = try f.layout.add("p\(i)", shape: s) }
        f.values = [Float](repeating: f.gapValue, count: f.layout.totalCount)
        // NaN gradients in the gaps: touching a gap would poison the values there.
        f.grads = [Float](repeating: .nan, count: f.layout.totalCount)
        f.m = [Float](repeating: 0, count: f.layout.totalCount)
        f.v = f.m
        for (i, e) in f.layout.entries.enumerated() {
            for j in 0..<e.count { f.values[e.offset + j] = Float(initial[i][j]) }
        }
        return f
    }

    func step(_ opt: inout AdamW, _ f: inout Flat, segments: [AdamW.Segment]) throws {
        let n = f.values.count
        try f.values.withUnsafeMutableBufferPointer { p in
            try f.grads.withUnsafeBufferPointer { g in
                try f.m.withUnsafeMutableBufferPointer { m in
                    try f.v.withUnsafeMutableBufferPointer { v in
                        try opt.update(values: p.baseAddress!, gradients: g.baseAddress!, m: m.baseAddress!, v: v.baseAddress!,
                                       bufferCount: n, segments: segments)
                    }
                }
            }
        }
    }

    func tensor(_ buffer: [Float], _ e: ParameterLayout.Entry) -> [Float] { Array(buffer[e.offset..<(e.offset + e.count)]) }

    /// |got - want| in units of float32 spacing at |want| (ulps).
    func assertUlps(_ got: [Float], _ want: [Double], maxUlps: Float, _ label: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(got.count, want.count, label, file: file, line: line)
        var worst: Float = 0, at = -1
        for i in 0..<min(got.count, want.count) {
            let w = Float(want[i])
            let ulps = abs(got[i] - w) / max(w.ulp, Float.leastNormalMagnitude)
            if !(ulps <= worst) { worst = ulps; at = i }  // catches NaN
        }
        if !(worst <= maxUlps) {
            XCTFail("\(label): \(worst) ulps at \(at) (got \(got[at]), expected \(Float(want[at]))), allowed \(maxUlps)", file: file, line: line)
        }
    }

    func testMatchesTorch() throws {
        // torch runs the same float32 operations in the same order (its vectorised lerp and addcmul with
        // FMA). Observed: identical bits. Allowed: 1 float32 ulp of each value and moment after up to 10
        // steps (a torch build without FMA rounds twice); the gaps between tensors are never touched.
        for raw in try TrainingFixtures.cases("adamw") {
            let f = FixtureCase(dict: raw)
            let shapes = try (f.value("shapes") as? [[Int]]) ?? []
            let initial = try (f.value("initial") as? [Any] ?? []).map { try FixtureCase.doubles($0, "initial") }
            let grads = try (f.value("grads") as? [[Any]] ?? []).map { step in try step.map { try FixtureCase.doubles($0, "grads") } }
            let lrs = try f.doubles("lr")
            let wds = try f.doubles("weight_decay")
            let steps = try f.int("steps")
            let after = try (f.value("after") as? [String: [Any]]) ?? [:]
            XCTAssertEqual(grads.count, steps)
            var flat = try self.flat(shapes: shapes, initial: initial)
            // The no-decay tensors of these fixtures are exactly the rank-1 ones: check the helper's rule.
            let decayAll = wds.allSatisfy { $0 == wds[0] }
            let segments = AdamW.segments(for: flat.layout, decayNormsAndBiases: decayAll)
            for (i, s) in segments.enumerated() { XCTAssertEqual(s.decay, wds[i] != 0, "\(f.name): segment \(i) decay") }
            var opt = try AdamW(.init(learningRate: lrs[0], beta1: try f.double("beta1"), beta2: try f.double("beta2"),
                                      eps: try f.double("eps"), weightDecay: wds.max() ?? 0))
            for t in 0..<steps {
                for (i, e) in flat.layout.entries.enumerated() {
                    for j in 0..<e.count { flat.grads[e.offset + j] = Float(grads[t][i][j]) }
                }
                opt.hyperparameters.learningRate = lrs[t]
                try step(&opt, &flat, segments: segments)
                XCTAssertEqual(opt.step, t + 1)
                guard let want = after[String(t + 1)] else { continue }
                for (i, e) in flat.layout.entries.enumerated() {
                    assertUlps(tensor(flat.values, e), try FixtureCase.doubles(want[i], "after"), maxUlps: 1,
                               "\(f.name): tensor \(i) \(e.shape) after step \(t + 1)")
                }
            }
            let wantM = try (f.value("exp_avg") as? [Any] ?? []).map { try FixtureCase.doubles($0, "exp_avg") }
            let wantV = try (f.value("exp_avg_sq") as? [Any] ?? []).map { try FixtureCase.doubles($0, "exp_avg_sq") }
            for (i, e) in flat.layout.entries.enumerated() {
                assertUlps(tensor(flat.m, e), wantM[i], maxUlps: 1, "\(f.name): exp_avg \(i)")
                assertUlps(tensor(flat.v, e), wantV[i], maxUlps: 1, "\(f.name): exp_avg_sq \(i)")
            }
            let inside = Set(flat.layout.entries.flatMap { $0.offset..<($0.offset + $0.count) })
            for i in 0..<flat.values.count where !inside.contains(i) {
                XCTAssertEqual(flat.values[i], flat.gapValue, "\(f.name): gap value \(i) was touched")
                XCTAssertEqual(flat.m[i], 0, "\(f.name): gap moment \(i) was touched")
            }
        }
    }

    /// Resuming from a saved optimiser (Codable) and the moments gives the uninterrupted run bit for bit,
    /// with any thread count.
    func testResumeAndThreadsGiveIdenticalResults() throws {
        var rng = SplitMix64(seed: 3)
        let shapes = [[300, 700], [129], [5, 5, 5]]  // more than one part of AdamW.partElements
        let initial = shapes.map { s in rng.floats(s.reduce(1, *)).map(Double.init) }
        let gradSteps = (0..<6).map { _ in shapes.map { s in rng.floats(s.reduce(1, *)) } }
        func run(threads: Int, resumeAfter: Int?) throws -> Flat {
            try Threads.setCount(threads)
            var f = try flat(shapes: shapes, initial: initial)
            let segments = AdamW.segments(for: f.layout)
            var opt = try AdamW(.init(learningRate: 1e-3))
            for t in 0..<gradSteps.count {
                if t == resumeAfter {
                    let saved = try JSONEncoder().encode(opt)
                    opt = try JSONDecoder().decode(AdamW.self, from: saved)
                }
                for (i, e) in f.layout.entries.enumerated() { for j in 0..<e.count { f.grads[e.offset + j] = gradSteps[t][i][j] } }
                try step(&opt, &f, segments: segments)
            }
            XCTAssertEqual(opt.step, gradSteps.count)
            return f
        }
        let a = try run(threads: 1, resumeAfter: nil)
        let b = try run(threads: 2, resumeAfter: 3)
        assertIdentical(b.values, a.values, "values: resumed with 2 threads vs uninterrupted with 1")
        assertIdentical(b.m, a.m, "exp_avg")
        assertIdentical(b.v, a.v, "exp_avg_sq")
    }

    func testScaleAndErrors() throws {
        var buffer: [Float] = (0..<40).map(Float.init)
        try buffer.withUnsafeMutableBufferPointer { b in
            try AdamW.scale(b.baseAddress!, bufferCount: 40, segments: [.init(offset: 2, count: 3), .init(offset: 30, count: 10)], by: 0.5)
        }
        XCTAssertEqual(Array(buffer[0..<6]), [0, 1, 1, 1.5, 2, 5])
        XCTAssertEqual(buffer[29], 29)
        XCTAssertEqual(buffer[39], 19.5)

        func expectError(_ what: String, _ needle: String, _ body: () throws -> Void) {
            XCTAssertThrowsError(try body(), what) { e in
                XCTAssertTrue("\(e)".contains(needle), "\(what): '\(e)' should mention '\(needle)'")
            }
        }
        expectError("overlap", "overlap") { try AdamW.validate(segments: [.init(offset: 0, count: 10), .init(offset: 9, count: 2)], bufferCount: 20) }
        expectError("outside", "outside") { try AdamW.validate(segments: [.init(offset: 15, count: 10)], bufferCount: 20) }
        expectError("negative", "outside") { try AdamW.validate(segments: [.init(offset: -1, count: 1)], bufferCount: 20) }
        XCTAssertNoThrow(try AdamW.validate(segments: [.init(offset: 0, count: 10), .init(offset: 10, count: 10), .init(offset: 5, count: 0)], bufferCount: 20))
        expectError("lr", "learning rate") { _ = try AdamW(.init(learningRate: -1)) }
        expectError("beta", "beta2") { _ = try AdamW(.init(beta2: 1)) }
        expectError("step", "step") { _ = try AdamW(step: -1) }
        expectError("decoded step", "step") {
            _ = try JSONDecoder().decode(AdamW.self, from: Data(#"{"hyperparameters":{"learningRate":1e-4,"beta1":0.9,"beta2":0.999,"eps":1e-8,"weightDecay":0.08},"step":-3}"#.utf8))
        }
    }
}
