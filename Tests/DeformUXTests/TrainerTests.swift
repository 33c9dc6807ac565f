import Foundation
import XCTest
@testable import DeformUX

/// The Trainer: one step (loss, backward, AdamW) against PyTorch + MONAI (Tests/Fixtures/training/
/// train_step.safetensors, tools/make_train_step_fixture.py), accumulation, drop path, resuming.
final class TrainerTests: XCTestCase {
    let threads = ThreadCountGuard()
    override func tearDown() { threads.restore() }

    struct Fixture {
        let file: SafetensorsFile
        let config: DeformUXNetConfig
        let loss: Double
        let lr: Double, weightDecay: Double

        init() throws {
            file = try SafetensorsFile(path: TrainingFixtures.directory.appendingPathComponent("train_step.safetensors").path)
            config = try DeformUXNetConfig(json: try XCTUnwrap(file.metadata[DeformUXNet.configMetadataKey]))
            loss = try XCTUnwrap(Double(try XCTUnwrap(file.metadata["loss"])))
            let opt = try JSONSerialization.jsonObject(with: Data(try XCTUnwrap(file.metadata["optimizer"]).utf8)) as? [String: Any]
            lr = try XCTUnwrap(opt?["lr"] as? Double)
            weightDecay = try XCTUnwrap(opt?["weight_decay"] as? Double)
        }

        func floats(_ name: String) throws -> [Float] {
            let e = try XCTUnwrap(file.entries.first { $0.name == name }, name)
            var out = [Float](repeating: 0, count: e.shape.reduce(1, *))
            try out.withUnsafeMutableBufferPointer { try file.copy(name, into: $0.baseAddress!, count: $0.count) }
            return out
        }

        func shape(_ name: String) -> [Int] { file.entries.first { $0.name == name }?.shape ?? [] }

        /// The model with the weights before the step.
        func model() throws -> DeformUXNet {
            let net = try DeformUXNet(config: config)
            var items: [String: (shape: [Int], values: [Float])] = [:]
            for e in net.parameters.layout.entries { items[e.name] = (e.shape, try floats(e.name)) }
            try net.parameters.load(items)
            return net
        }

        func options() -> Trainer.Options {
            var o = Trainer.Options()
            o.learningRate = lr
            o.weightDecay = weightDecay
            o.plateau = nil
            return o
        }
    }

    func testOneStepMatchesPyTorch() throws {
        let f = try Fixture()
        for t in [1, 2] {
            try Threads.setCount(t)
            let net = try f.model()
            let trainer = try Trainer(model: net, options: f.options())
            let x = try Tensor(shape: f.shape("input"), values: try f.floats("input"))
            let labels = try f.floats("labels").map { Int32($0) }
            let value = try labels.withUnsafeBufferPointer { try trainer.step(images: x, labels: $0.baseAddress!) }
            // The loss: float32 logits against a float64 reference.
            XCTAssertEqual(value.total, f.loss, accuracy: 2e-5 * abs(f.loss), "\(t) thread(s): loss")
            XCTAssertEqual(trainer.step, 1)
            // The weights after one AdamW step. The first step moves each weight by about lr * sign(grad)
            // (plus the decay), so an element whose gradient is tiny next to its tensor's may move either
            // way in float32: those get 2 lr of slack; every other element must match to float rounding.
            for e in net.parameters.layout.entries {
                let got = try net.parameters.tensor(e.name).toArray()
                let want = try f.floats("after." + e.name), grad = try f.floats("grad." + e.name)
                let scale = grad.map { abs($0) }.max() ?? 0
                for i in 0..<got.count {
                    let slack: Float = abs(grad[i]) < 1e-3 * scale ? Float(2 * f.lr) : 0
                    let err = abs(got[i] - want[i])
                    if err > 2e-6 + 1e-5 * abs(want[i]) + slack {
                        XCTFail("\(t) thread(s): \(e.name)[\(i)] after the step is \(got[i]), PyTorch \(want[i]) (grad \(grad[i]), largest |grad| \(scale))")
                        break
                    }
                }
            }
        }
    }

    /// k micro-batches with accumulation k give the same step as one batch of all of them when the loss
    /// is averaged the same way: here the same micro-batch twice (its gradient averaged is itself).
    func testAccumulationAveragesMicroBatches() throws {
        let f = try Fixture()
        let x = try Tensor(shape: f.shape("input"), values: try f.floats("input"))
        let labels = try f.floats("labels").map { Int32($0) }
        let once = try f.model()
        _ = try labels.withUnsafeBufferPointer { try Trainer(model: once, options: f.options()).step(images: x, labels: $0.baseAddress!) }
        let twice = try f.model()
        var o = f.options()
        o.accumulation = 2
        let t = try Trainer(model: twice, options: o)
        try labels.withUnsafeBufferPointer { lp in
            try t.step(images: x, labels: lp.baseAddress!)
            XCTAssertEqual(t.step, 0, "no update after the first of two micro-batches")
            XCTAssertEqual(t.accumulated, 1)
            try t.step(images: x, labels: lp.baseAddress!)
        }
        XCTAssertEqual(t.step, 1)
        for e in once.parameters.layout.entries {
            assertClose(try twice.parameters.tensor(e.name).toArray(), try once.parameters.tensor(e.name).toArray(),
                        atol: 1e-6, rtol: 1e-5, "\(e.name): accumulation of the same batch twice")
        }
    }

    /// Saving after step 2 and resuming in a new trainer gives the same weights after step 4 as four
    /// uninterrupted steps (drop path on, so its generator must be restored too).
    func testResumeGivesTheSameWeights() throws {
        let f = try Fixture()
        let x = try Tensor(shape: f.shape("input"), values: try f.floats("input"))
        let labels = try f.floats("labels").map { Int32($0) }
        var o = f.options()
        o.dropPath = 0.3
        o.seed = 5
        func run(_ t: Trainer, _ steps: Int) throws {
            try labels.withUnsafeBufferPointer { lp in for _ in 0..<steps { try t.step(images: x, labels: lp.baseAddress!) } }
        }
        let straight = try f.model()
        try run(try Trainer(model: straight, options: o), 4)

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("dfx-trainer-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let first = try f.model()
        let t1 = try Trainer(model: first, options: o)
        try run(t1, 2)
        try first.save(to: dir.appendingPathComponent("w.safetensors").path)
        try t1.saveState(to: dir.appendingPathComponent("s.safetensors").path)

        let second = try DeformUXNet(config: f.config, seed: 99)
        try second.load(from: dir.appendingPathComponent("w.safetensors").path)
        let t2 = try Trainer(model: second, options: f.options())
        try t2.loadState(from: dir.appendingPathComponent("s.safetensors").path)
        XCTAssertEqual(t2.step, 2)
        XCTAssertEqual(t2.options, o, "the options come back with the state")
        try run(t2, 2)
        for e in straight.parameters.layout.entries {
            assertIdentical(try second.parameters.tensor(e.name).toArray(), try straight.parameters.tensor(e.name).toArray(),
                            "\(e.name): resumed vs uninterrupted")
        }
    }

    func testBadInputsAreErrors() throws {
        let f = try Fixture()
        let net = try f.model()
        var o = f.options()
        o.accumulation = 0
        XCTAssertThrowsError(try Trainer(model: net, options: o))
        o = f.options()
        o.classWeights = [1, 2]
        XCTAssertThrowsError(try Trainer(model: net, options: o)) { e in
            XCTAssertTrue("\(e)".contains("class weight"), "\(e)")
        }
        let t = try Trainer(model: net, options: f.options())
        let x = try Tensor(shape: f.shape("input"), values: try f.floats("input"))
        var labels = try f.floats("labels").map { Int32($0) }
        labels[5] = 7
        XCTAssertThrowsError(try labels.withUnsafeBufferPointer { try t.step(images: x, labels: $0.baseAddress!) }) { e in
            XCTAssertTrue("\(e)".contains("7"), "the bad label is named: \(e)")
        }
        XCTAssertEqual(t.step, 0, "a failed step changes nothing")
        let bad = try Tensor(zeros: [1, 1, 16, 16, 8])
        XCTAssertThrowsError(try labels.withUnsafeBufferPointer { try t.step(images: bad, labels: $0.baseAddress!) })
    }
}
