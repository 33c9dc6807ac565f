import Foundation
import XCTest
@testable import DeformUX

/// DiceCELoss against MONAI (fixtures), against its Double reference, and the reference against
/// finite differences.
final class DiceCELossTests: XCTestCase {
    let threads = ThreadCountGuard()
    override func tearDown() { threads.restore() }

    /// Runs the fast loss in `layout` on channels-first data; returns the value and the gradient back in
    /// channels-first order.
    func fast(_ logits: [Float], _ labels: [Int32], n: Int, c: Int, spatial: [Int], layout: Layout,
              options: DiceCELoss.Options = .init(), scale: Float = 1) throws -> (DiceCELoss.Value, [Float]) {
        let v = spatial.reduce(1, *)
        let shape = layout == .channelsFirst ? [n, c] + spatial : [n] + spatial + [c]
        let data = layout == .channelsFirst ? logits : toChannelsLast(logits, n: n, c: c, v: v)
        let x = try Tensor(shape: shape, values: data)
        let forwardValue = try DiceCELoss.forward(logits: x, labels: labels, layout: layout, options: options)
        let (value, grad) = try DiceCELoss.backward(logits: x, labels: labels, layout: layout, options: options,
                                                    gradientScale: scale)
        XCTAssertEqual(forwardValue, value, "forward and backward report the same loss")
        let g = try grad.toArray()
        return (value, layout == .channelsFirst ? g : toChannelsFirst(g, n: n, c: c, v: v))
    }

    func testMatchesMONAI() throws {
        // MONAI's loss and torch's autograd gradient are float64 from the float32 logits. The Double
        // reference agrees to float64 rounding; the fast kernel computes each voxel's softmax in Float
        // (sums in Double), so it agrees to float32 rounding: rtol 2e-6 on the loss, and on the gradient
        // atol 2e-6 of the largest gradient entry plus rtol 1e-4 (observed: 3e-7 of the largest; small
        // entries come from cancellation in s * (dL/ds - t), hence the loose rtol).
        for raw in try TrainingFixtures.cases("dice_ce") {
            let f = FixtureCase(dict: raw)
            let n = try f.int("n"), c = try f.int("classes")
            let spatial = try f.ints("spatial")
            let v = spatial.reduce(1, *)
            let logits = try f.floats("logits")
            let labels = try f.ints("labels").map { Int32($0) }
            let weights = f.dict["weight"] == nil ? nil : try f.doubles("weight")
            let ld = try f.double("lambda_dice"), lce = try f.double("lambda_ce")
            let want = try f.double("loss")
            let wantGrad = try f.doubles("grad")
            let label = "case \(f.name) (N \(n), C \(c), spatial \(spatial))"

            let refLoss = DiceCELossReference.loss(logits: logits.map(Double.init), labels: labels, n: n, classes: c,
                                                   voxels: v, weights: weights, lambdaDice: ld, lambdaCE: lce)
            let refGrad = DiceCELossReference.gradient(logits: logits.map(Double.init), labels: labels, n: n, classes: c,
                                                       voxels: v, weights: weights, lambdaDice: ld, lambdaCE: lce)
            XCTAssertEqual(refLoss, want, accuracy: 1e-12 * abs(want), "\(label): reference loss vs MONAI")
            assertClose(refGrad, wantGrad, atol: 1e-14, rtol: 1e-10, shape: [n, c] + spatial, "\(label): reference gradient vs torch autograd")

            let options = DiceCELoss.Options(classWeights: weights.map { $0.map(Float.init) }, lambdaDice: ld, lambdaCE: lce)
            let gmax = wantGrad.map(abs).max() ?? 0
            for layout in [Layout.channelsFirst, .channelsLast] {
                let (value, grad) = try fast(logits, labels, n: n, c: c, spatial: spatial, layout: layout, options: options)
                XCTAssertEqual(value.total, want, accuracy: 2e-6 * abs(want), "\(label) \(layout): loss vs MONAI")
                XCTAssertEqual(value.total, ld * value.dice + lce * value.crossEntropy, accuracy: 1e-12, "\(label): total = terms")
                assertClose(grad, wantGrad, atol: 2e-6 * gmax, rtol: 1e-4, shape: [n, c] + spatial, "\(label) \(layout): gradient vs torch autograd")
            }
        }
    }

    /// Random cases, some with more voxels than one part (DiceCELoss.partVoxels), against the reference.
    func randomCase(seed: UInt64, n: Int, c: Int, spatial: [Int], scale: Double = 3)
        -> (logits: [Float], labels: [Int32]) {
        var rng = SplitMix64(seed: seed)
        let v = spatial.reduce(1, *)
        let logits = rng.floats(n * c * v, -scale, scale)
        let labels = (0..<(n * v)).map { _ in Int32(rng.int(0...(c - 1))) }
        return (logits, labels)
    }

    func testAgainstReferenceAcrossParts() throws {
        let cases: [(n: Int, c: Int, spatial: [Int])] = [
            (1, 2, [1, 1, 1]), (2, 3, [7, 5, 3]), (2, 3, [21, 20, 22]), (1, 16, [9, 31, 30]), (3, 2, [8193]),
        ]
        for (i, t) in cases.enumerated() {
            let (logits, labels) = randomCase(seed: UInt64(100 + i), n: t.n, c: t.c, spatial: t.spatial)
            let v = t.spatial.reduce(1, *)
            let label = "N \(t.n) C \(t.c) spatial \(t.spatial)"
            let want = DiceCELossReference.loss(logits: logits.map(Double.init), labels: labels, n: t.n, classes: t.c, voxels: v)
            let wantGrad = DiceCELossReference.gradient(logits: logits.map(Double.init), labels: labels, n: t.n, classes: t.c, voxels: v)
            let gmax = wantGrad.map(abs).max() ?? 0
            for layout in [Layout.channelsFirst, .channelsLast] {
                let (value, grad) = try fast(logits, labels, n: t.n, c: t.c, spatial: t.spatial, layout: layout)
                XCTAssertEqual(value.total, want, accuracy: 2e-6 * want, "\(label) \(layout): loss vs reference")
                assertClose(grad, wantGrad, atol: 2e-6 * gmax, rtol: 1e-4, "\(label) \(layout): gradient vs reference")
            }
        }
    }

    func testReferenceGradientMatchesFiniteDifferences() throws {
        // Central differences of the Double reference, h = 1e-6: truncation ~h^2 * |L'''| and rounding
        // ~1e-16 / h, so agreement to 1e-8 absolute (gradient entries are ~1e-3 .. 1e-1).
        let cases: [(n: Int, c: Int, spatial: [Int], weights: [Double]?)] = [
            (1, 2, [2, 3, 2], nil), (2, 4, [3, 2, 2], [0.5, 1, 2, 0.25]), (2, 3, [1, 1, 2], nil),
        ]
        for (i, t) in cases.enumerated() {
            let (lf, labels) = randomCase(seed: UInt64(200 + i), n: t.n, c: t.c, spatial: t.spatial, scale: 2)
            var logits = lf.map(Double.init)
            let v = t.spatial.reduce(1, *)
            let grad = DiceCELossReference.gradient(logits: logits, labels: labels, n: t.n, classes: t.c, voxels: v,
                                                    weights: t.weights, lambdaDice: 0.8, lambdaCE: 1.2)
            var fd = [Double](repeating: 0, count: logits.count)
            let h = 1e-6
            for j in 0..<logits.count {
                let x0 = logits[j]
                logits[j] = x0 + h
                let up = DiceCELossReference.loss(logits: logits, labels: labels, n: t.n, classes: t.c, voxels: v,
                                                  weights: t.weights, lambdaDice: 0.8, lambdaCE: 1.2)
                logits[j] = x0 - h
                let down = DiceCELossReference.loss(logits: logits, labels: labels, n: t.n, classes: t.c, voxels: v,
                                                    weights: t.weights, lambdaDice: 0.8, lambdaCE: 1.2)
                logits[j] = x0
                fd[j] = (up - down) / (2 * h)
            }
            assertClose(grad, fd, atol: 1e-8, rtol: 0, shape: [t.n, t.c] + t.spatial, "case \(i): reference gradient vs finite differences")
            // and the fast kernel against the same finite differences (float32 tolerance)
            let options = DiceCELoss.Options(classWeights: t.weights.map { $0.map(Float.init) }, lambdaDice: 0.8, lambdaCE: 1.2)
            let (_, fastGrad) = try fast(lf, labels, n: t.n, c: t.c, spatial: t.spatial, layout: .channelsLast, options: options)
            assertClose(fastGrad, fd, atol: 1e-6, rtol: 1e-4, "case \(i): fast gradient vs finite differences")
        }
    }

    func testThreadCountInPlaceAndScale() throws {
        let spatial = [17, 23, 29]  // 11339 voxels: two parts per sample
        let (logits, labels) = randomCase(seed: 7, n: 2, c: 4, spatial: spatial)
        try Threads.setCount(1)
        let (v1, g1) = try fast(logits, labels, n: 2, c: 4, spatial: spatial, layout: .channelsFirst)
        try Threads.setCount(2)
        let (v2, g2) = try fast(logits, labels, n: 2, c: 4, spatial: spatial, layout: .channelsFirst)
        XCTAssertEqual(v1, v2, "loss with 1 and 2 threads")
        assertIdentical(g1, g2, "gradient with 1 and 2 threads")
        // In place: the gradient may overwrite the logits.
        for layout in [Layout.channelsFirst, .channelsLast] {
            let v = spatial.reduce(1, *)
            var buffer = layout == .channelsFirst ? logits : toChannelsLast(logits, n: 2, c: 4, v: v)
            let shape = try DiceCELoss.Shape(n: 2, classes: 4, spatial: spatial)
            let value = try buffer.withUnsafeMutableBufferPointer { b in
                try labels.withUnsafeBufferPointer { l in
                    try DiceCELoss.backward(logits: b.baseAddress!, labels: l.baseAddress!, gradLogits: b.baseAddress!,
                                            shape: shape, layout: layout)
                }
            }
            XCTAssertEqual(value, v2, "in place \(layout): loss")
            assertIdentical(layout == .channelsFirst ? buffer : toChannelsFirst(buffer, n: 2, c: 4, v: v), g2, "in place \(layout): gradient")
        }
        // A power-of-two gradient scale scales every coefficient exactly.
        let (v3, g3) = try fast(logits, labels, n: 2, c: 4, spatial: spatial, layout: .channelsFirst, scale: 0.25)
        XCTAssertEqual(v3, v1, "the scale does not change the loss")
        assertIdentical(g3, g1.map { $0 * 0.25 }, "gradient scale 0.25")
    }

    func testErrors() throws {
        let x = try Tensor(shape: [1, 3, 2, 2], values: [Float](repeating: 0, count: 12))
        func expectError(_ what: String, _ needle: String, _ body: () throws -> Void) {
            XCTAssertThrowsError(try body(), what) { e in
                guard let e = e as? DeformUXError else { return XCTFail("\(what): not a DeformUXError: \(e)") }
                XCTAssertTrue(e.description.contains(needle), "\(what): '\(e.description)' should mention '\(needle)'")
                XCTAssertEqual(e.operation, "dice_ce", what)
            }
        }
        expectError("label too large", "[0, 1, 0]") {
            _ = try DiceCELoss.forward(logits: x, labels: [0, 1, 3, 1], options: .init())
        }
        expectError("label too large names value", "got 3") {
            _ = try DiceCELoss.forward(logits: x, labels: [0, 1, 3, 1])
        }
        expectError("negative label", "got -1") {
            _ = try DiceCELoss.forward(logits: x, labels: [0, 0, 0, -1])
        }
        expectError("label count", "expected 4 values") {
            _ = try DiceCELoss.forward(logits: x, labels: [0, 0, 0])
        }
        expectError("one class", "at least 2 classes") {
            _ = try DiceCELoss.forward(logits: try Tensor(shape: [1, 1, 4], values: [0, 0, 0, 0]), labels: [0, 0, 0, 0])
        }
        expectError("weight count", "3 values") {
            _ = try DiceCELoss.forward(logits: x, labels: [0, 0, 0, 0], options: .init(classWeights: [1, 1]))
        }
        expectError("negative weight", "weight[1] >= 0") {
            _ = try DiceCELoss.forward(logits: x, labels: [0, 0, 0, 0], options: .init(classWeights: [1, -1, 1]))
        }
        expectError("zero total weight", "0/0") {
            _ = try DiceCELoss.forward(logits: x, labels: [0, 0, 0, 0], options: .init(classWeights: [0, 1, 1]))
        }
        expectError("negative lambda", "lambda") {
            _ = try DiceCELoss.forward(logits: x, labels: [0, 0, 0, 0], options: .init(lambdaDice: -1))
        }
        expectError("rank", "rank >= 2") {
            _ = try DiceCELoss.forward(logits: try Tensor(shape: [4], values: [0, 0, 0, 0]), labels: [0])
        }
        // channels-last: the class axis is the last one
        let xl = try Tensor(shape: [1, 2, 2, 3], values: [Float](repeating: 0, count: 12))
        XCTAssertNoThrow(try DiceCELoss.forward(logits: xl, labels: [0, 1, 2, 2], layout: .channelsLast))
        expectError("channels-last label", "[0, 1, 1]") {
            _ = try DiceCELoss.forward(logits: xl, labels: [0, 1, 2, 4], layout: .channelsLast)
        }
    }

    /// Uniform logits: s = 1/C everywhere, so the terms have closed forms.
    func testUniformLogitsClosedForm() throws {
        let n = 2, c = 4, v = 6
        let labels: [Int32] = [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 0, 0]
        let x = try Tensor(shape: [n, c, v], values: [Float](repeating: 0.3, count: n * c * v))
        let value = try DiceCELoss.forward(logits: x, labels: labels)
        XCTAssertEqual(value.crossEntropy, log(4.0), accuracy: 1e-6)
        var dice = 0.0
        for i in 0..<n {
            for k in 0..<c {
                let g = Double(labels[(i * v)..<(i * v + v)].filter { $0 == Int32(k) }.count)
                dice += 1 - (2 * g / 4 + 1e-5) / (Double(v) / 4 + g + 1e-5)
            }
        }
        XCTAssertEqual(value.dice, dice / 8, accuracy: 1e-7)
    }
}
