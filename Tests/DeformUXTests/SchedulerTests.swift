import Foundation
import XCTest
@testable import DeformUX

/// ReduceLROnPlateau against torch (Tests/Fixtures/training/plateau.json): the whole state after every
/// step must be equal, bit for bit (the arithmetic is the same Double arithmetic as torch's Python
/// floats; the fixture stores exact hex floats).
final class SchedulerTests: XCTestCase {
    func config(_ f: FixtureCase) throws -> ReduceLROnPlateau.Config {
        guard let c = try f.value("config") as? [String: Any],
              let mode = c["mode"] as? String, let tm = c["threshold_mode"] as? String,
              let factor = c["factor"] as? NSNumber, let patience = c["patience"] as? NSNumber,
              let threshold = c["threshold"] as? NSNumber, let cooldown = c["cooldown"] as? NSNumber,
              let minLR = c["min_lr"] as? NSNumber, let eps = c["eps"] as? NSNumber else {
            throw DeformUXError.io("fixture \(f.name)", "bad config")
        }
        return .init(mode: mode == "max" ? .max : .min, factor: factor.doubleValue, patience: patience.intValue,
                     threshold: threshold.doubleValue, thresholdMode: tm == "rel" ? .rel : .abs,
                     cooldown: cooldown.intValue, minLR: minLR.doubleValue, eps: eps.doubleValue)
    }

    func testMatchesTorch() throws {
        for raw in try TrainingFixtures.cases("plateau") {
            let f = FixtureCase(dict: raw)
            let metrics = try f.hexes("metrics")
            guard let rows = try f.value("after") as? [[String: Any]], rows.count == metrics.count else {
                return XCTFail("\(f.name): bad rows")
            }
            var s = try ReduceLROnPlateau(config: config(f), learningRate: f.hex("initial_lr") ?? .nan)
            var reductions = 0
            for (t, m) in metrics.enumerated() {
                let before = s.learningRate
                let lr = s.step(m)
                if lr != before { reductions += 1 }
                let row = FixtureCase(dict: rows[t])
                let label = "\(f.name) step \(t + 1) (metric \(m))"
                XCTAssertEqual(lr, try row.hex("lr"), label + ": lr")
                XCTAssertEqual(s.learningRate, lr)
                let best = try row.hex("best")
                if let best { XCTAssertEqual(s.best, best, label + ": best") } else { XCTAssertTrue(s.best.isInfinite, label + ": best") }
                XCTAssertEqual(s.numBadEpochs, try row.int("num_bad_epochs"), label + ": num_bad_epochs")
                XCTAssertEqual(s.cooldownCounter, try row.int("cooldown_counter"), label + ": cooldown_counter")
                XCTAssertEqual(s.lastEpoch, try row.int("last_epoch"), label + ": last_epoch")
            }
            XCTAssertGreaterThan(reductions, 1, "\(f.name): the sequence should reduce the lr more than once")
        }
    }

    /// Saving the state mid-way (JSON, including an infinite best) and continuing gives the same run.
    func testResume() throws {
        let metrics = [0.1, 0.2, 0.2, 0.2, 0.19, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
        let cfg = ReduceLROnPlateau.Config(patience: 2, cooldown: 1)
        for cut in [0, 1, 5, 9] {
            var a = try ReduceLROnPlateau(config: cfg, learningRate: 1e-4)
            var b = a
            for (t, m) in metrics.enumerated() {
                if t == cut { b = try JSONDecoder().decode(ReduceLROnPlateau.self, from: try JSONEncoder().encode(b)) }
                a.step(m)
                b.step(m)
                XCTAssertEqual(a, b, "resumed at \(cut), step \(t + 1)")
            }
            XCTAssertLessThan(a.learningRate, 1e-4, "the sequence reduces the lr")
        }
        let fresh = try ReduceLROnPlateau(learningRate: 1e-4)
        let json = String(decoding: try JSONEncoder().encode(fresh), as: UTF8.self)
        XCTAssertTrue(json.contains("\"-inf\""), json)
        XCTAssertEqual(try JSONDecoder().decode(ReduceLROnPlateau.self, from: Data(json.utf8)), fresh)
    }

    func testNaNIsABadEpochAndErrors() throws {
        var s = try ReduceLROnPlateau(config: .init(patience: 1), learningRate: 1)
        s.step(0.5)
        s.step(.nan)
        XCTAssertEqual(s.numBadEpochs, 1)
        XCTAssertEqual(s.best, 0.5)
        s.step(.nan)
        XCTAssertEqual(s.learningRate, 0.9)
        XCTAssertThrowsError(try ReduceLROnPlateau(config: .init(factor: 1), learningRate: 1))
        XCTAssertThrowsError(try ReduceLROnPlateau(config: .init(patience: -1), learningRate: 1))
        XCTAssertThrowsError(try ReduceLROnPlateau(learningRate: -1))
    }
}
