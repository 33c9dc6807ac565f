import Foundation
import XCTest
@testable import DeformUX

/// The streaming sliding window with stand-in networks (STYLE.md habit 11), against the naive
/// full-memory reference (habit 3) and against what the stand-ins must give back.
final class PipelineSlidingWindowTests: XCTestCase {
    /// (volume, window): larger than the volume, equal, odd and smaller, mixed per axis, 1x1x1.
    static let geometries: [(String, SIMD3<Int>, SIMD3<Int>)] = [
        ("window larger", SIMD3(7, 5, 3), SIMD3(8, 8, 8)),
        ("window equal", SIMD3(8, 6, 4), SIMD3(8, 6, 4)),
        ("odd, smaller", SIMD3(11, 9, 7), SIMD3(6, 4, 3)),
        ("equal on y only", SIMD3(13, 5, 9), SIMD3(5, 5, 4)),
        ("larger on x only", SIMD3(5, 7, 3), SIMD3(8, 4, 2)),
        ("1x1x1", SIMD3(1, 1, 1), SIMD3(1, 1, 1)),
    ]

    /// Identity and affine stand-ins give back their formula applied to the input, for every geometry,
    /// overlap, batch and blend: logits within 2e-6 (float32 rounding of the weighted sum and its
    /// quotient; inputs in -1..1.5), labels exactly (the input's channels are separated by at least 0.1
    /// after the affine map, so rounding cannot change the argmax), probabilities (softmax) within 1e-6;
    /// and everything equals the naive reference to the bit.
    func testStandInsReproduceTheInput() throws {
        var rng = SplitMix64(seed: 81)
        let channels = 3
        let identity = IdentityPredictor(channels: channels)
        let affine = try AffinePredictor(scale: [1.0, 1.2, 1.1], shift: [0.05, -0.05, 0])
        let engine = SlidingWindowInference()  // reused across all cases: memory reuse must not leak state
        var cases = 0
        for (name, size, window) in PipelineSlidingWindowTests.geometries {
            let n = size.x * size.y * size.z
            let (input, argmax) = separatedChannels(&rng, channels: channels, voxels: n)
            for predictor in [identity as any WindowPredictor, affine] {
                let expected: [Float] = predictor is AffinePredictor
                    ? (0..<(channels * n)).map { affine.apply(input[$0], channel: $0 / n) } : input
                let expectedProbabilities = try SlidingWindowReference.probabilities(
                    logits: expected, weights: [Float](repeating: 1, count: n), classes: channels)
                for overlap in [0.0, 0.25, 0.5, 0.75] {
                    for batch in [1, 3] {
                        for blend in [BlendMode.gaussian(), .constant] {
                            let options = SlidingWindowOptions(window: window, overlap: overlap, blend: blend, batch: batch)
                            let label = "\(name) \(predictor is AffinePredictor ? "affine" : "identity") overlap \(overlap) batch \(batch) \(blend)"
                            let got = try runStreaming(predictor, input, size, options, engine: engine)
                            let shape = [channels, size.x, size.y, size.z]
                            assertClose(got.logits, expected, atol: 2e-6, rtol: 0, shape: shape, "\(label): logits")
                            XCTAssertEqual(got.labels, argmax, "\(label): labels")
                            assertClose(got.probabilities, expectedProbabilities, atol: 1e-6, rtol: 0, shape: shape,
                                        "\(label): probabilities")
                            let ref = try SlidingWindowReference.blend(predictor, input: input, size: size, options: options)
                            assertIdentical(got.logits, ref.logits, shape: shape, "\(label): logits vs reference")
                            XCTAssertEqual(got.labels, try SlidingWindowReference.labels(logits: ref.logits, weights: ref.weights,
                                                                                     classes: channels), "\(label): labels vs reference")
                            XCTAssertEqual(got.stats.windowsRun, got.stats.windows, label)
                            cases += 1
                        }
                    }
                }
            }
        }
        XCTAssertEqual(cases, 6 * 2 * 4 * 2 * 2)
    }

    /// The streaming argmax, softmax and blended logits equal the naive full-memory reference to the bit,
    /// with predictors whose output depends on the window (window mean, a ramp), with and without flip
    /// TTA, skipping and a non-zero pad value, over random (not separated) data.
    func testStreamingEqualsFullMemoryReference() throws {
        var rng = SplitMix64(seed: 82)
        let cases: [(String, SIMD3<Int>, SIMD3<Int>, Double, Int, BlendMode, Bool, Float, Bool)] = [
            // name, size, window, overlap, batch, blend, tta, pad value, skip
            ("mean, long x", SIMD3(23, 6, 5), SIMD3(4, 4, 4), 0.5, 1, .gaussian(), false, 0, false),
            ("mean, batch 5 spans x-positions", SIMD3(17, 9, 6), SIMD3(5, 4, 3), 0.25, 5, .gaussian(), false, 0, false),
            ("mean, batch larger than all windows", SIMD3(9, 4, 4), SIMD3(4, 4, 4), 0.75, 64, .constant, false, 0, false),
            ("mean, tta", SIMD3(10, 7, 5), SIMD3(4, 3, 4), 0.5, 2, .gaussian(), true, 0, false),
            ("ramp, tta, larger window", SIMD3(5, 6, 3), SIMD3(8, 4, 4), 0.5, 1, .gaussian(sigmaScale: 0.25), true, 0.5, false),
            ("ramp, skip", SIMD3(20, 5, 5), SIMD3(4, 4, 4), 0.5, 3, .gaussian(), false, 0, true),
            ("mean, skip, pad above threshold", SIMD3(6, 9, 3), SIMD3(8, 4, 4), 0.5, 2, .constant, false, 2, true),
        ]
        for (name, size, window, overlap, batch, blend, tta, padValue, skip) in cases {
            let channels = 2
            let n = size.x * size.y * size.z
            var input = rng.floats(channels * n, -1, 1)
            if skip {
                // background (<= 0.1) except a blob in the middle of x
                for c in 0..<channels {
                    for i in 0..<n where abs(i / (size.y * size.z) - size.x / 2) > 1 { input[c * n + i] = Float(rng.uniform(-1, 0.1)) }
                }
            }
            for predictor in [WindowMeanPredictor(inChannels: channels) as any WindowPredictor, RampPredictor(inChannels: channels)] {
                let options = SlidingWindowOptions(window: window, overlap: overlap, blend: blend, batch: batch, flipTTA: tta,
                                                   padValue: padValue, skipThreshold: skip ? [0.1, 0.1] : nil)
                let label = "\(name) (\(type(of: predictor)))"
                let counting = CountingPredictor(predictor)
                let got = try runStreaming(counting, input, size, options)
                let ref = try SlidingWindowReference.blend(predictor, input: input, size: size, options: options)
                let shape = [channels, size.x, size.y, size.z]
                assertIdentical(got.logits, ref.logits, shape: shape, "\(label): logits")
                XCTAssertEqual(got.labels, try SlidingWindowReference.labels(logits: ref.logits, weights: ref.weights, classes: channels),
                               "\(label): labels")
                assertIdentical(got.probabilities, try SlidingWindowReference.probabilities(logits: ref.logits, weights: ref.weights,
                                                                                        classes: channels),
                                shape: shape, "\(label): probabilities")
                XCTAssertEqual(counting.windows, got.stats.windowsRun * (tta ? 8 : 1), "\(label): windows predicted")
                XCTAssertEqual(counting.calls, got.stats.predictorCalls, label)
                XCTAssertEqual(counting.sizes, [[window.x, window.y, window.z]], "\(label): every call gets the window size")
                XCTAssertTrue(counting.batches.allSatisfy { $0 >= 1 && $0 <= batch }, "\(label): batches \(counting.batches)")
                if skip && padValue == 0 { XCTAssertGreaterThan(got.stats.windowsSkipped, 0, "\(label): something skipped") }
                if skip && padValue == 2 {
                    // Every window hangs over the padding (x: 6 < 8) and the padding is above the threshold.
                    XCTAssertEqual(got.stats.windowsSkipped, 0, "\(label): padding above the threshold keeps windows")
                }
            }
        }
    }

    /// Flip TTA averages the logits over the 8 flips: a ramp along the window's x (not flip-equivariant)
    /// averages to the constant 0.05 * (w0 - 1); an identity stand-in gives back its input.
    func testFlipTTAAveragesTheEightFlips() throws {
        var rng = SplitMix64(seed: 83)
        let size = SIMD3(9, 5, 6), window = SIMD3(5, 4, 3)
        let n = size.x * size.y * size.z
        let input = rng.floats(n, -1, 1)
        let options = SlidingWindowOptions(window: window, overlap: 0.5, blend: .gaussian(), batch: 2, flipTTA: true)
        let ramp = try runStreaming(RampPredictor(inChannels: 1), input, size, options)
        assertClose(ramp.logits, input.map { $0 + 0.05 * Float(window.x - 1) }, atol: 2e-6, rtol: 0, "ramp averaged over flips")
        XCTAssertEqual(ramp.stats.predictorCalls, 8 * ramp.stats.batches)
        var plain = options
        plain.flipTTA = false
        let noTTA = try runStreaming(RampPredictor(inChannels: 1), input, size, plain)
        let differs = zip(noTTA.logits, input).contains { abs($0 - ($1 + 0.2)) > 1e-3 }
        XCTAssertTrue(differs, "without TTA the ramp is not a constant")
        let identity = try runStreaming(IdentityPredictor(channels: 1), input, size, options)
        assertClose(identity.logits, input, atol: 2e-6, rtol: 0, "identity under TTA")
    }

    /// Bounded memory: the accumulator ring's depth is the bound computed from the window order (checked
    /// here by an independent formula), the high-water mark never exceeds it, and for a long volume the
    /// ring and all the engine's working memory stay far below one Cout x volume float array.
    func testAccumulatorStaysWithinItsBound() throws {
        let cases: [(SIMD3<Int>, SIMD3<Int>, Double, Int)] = [
            (SIMD3(64, 12, 10), SIMD3(16, 12, 10), 0.5, 1),
            (SIMD3(64, 24, 20), SIMD3(16, 12, 10), 0.5, 1),
            (SIMD3(64, 24, 20), SIMD3(16, 12, 10), 0.5, 4),
            (SIMD3(64, 24, 20), SIMD3(16, 12, 10), 0.75, 7),
            (SIMD3(40, 9, 9), SIMD3(7, 5, 3), 0.25, 1000),
            (SIMD3(5, 9, 9), SIMD3(8, 5, 3), 0.5, 2),
        ]
        var rng = SplitMix64(seed: 84)
        for (size, window, overlap, batch) in cases {
            let classes = 4
            let n = size.x * size.y * size.z
            let input = rng.floats(classes * n)
            let options = SlidingWindowOptions(window: window, overlap: overlap, blend: .gaussian(), batch: batch)
            let label = "size \(sizeText(size)) window \(sizeText(window)) overlap \(overlap) batch \(batch)"
            let engine = SlidingWindowInference()
            var labels = [UInt8](repeating: 0, count: n)
            let stats = try input.withUnsafeBufferPointer { x in
                try labels.withUnsafeMutableBufferPointer { l in
                    try engine.run(IdentityPredictor(channels: classes), input: x.baseAddress!, size: size, options: options,
                                   labels: l.baseAddress!)
                }
            }
            // Independent bound: windows in MONAI order, chunks of `batch`; each chunk spans from its first
            // window's start to its last window's end (clipped to the image).
            let plan = try SlidingWindowPlan(imageSize: size, window: window, overlap: overlap)
            var bound = 0
            for first in stride(from: 0, to: plan.count, by: batch) {
                let last = min(first + batch, plan.count) - 1
                let lo = max(plan.origin(first).x, 0), hi = min(plan.origin(last).x + window.x, size.x)
                bound = max(bound, hi - lo)
            }
            XCTAssertEqual(stats.accumulatorPlanes, bound, "\(label): ring depth")
            XCTAssertLessThanOrEqual(stats.accumulatorPlanesHighWater, stats.accumulatorPlanes, "\(label): high water")
            XCTAssertGreaterThan(stats.accumulatorPlanesHighWater, 0, label)
            XCTAssertEqual(stats.accumulatorBytes, (classes + 1) * bound * size.y * size.z * 4, label)
            if batch == 1 { XCTAssertEqual(bound, min(window.x, size.x), "\(label): batch 1 holds one window's depth") }
            // A long volume, batches within one x-position: the ring holds a fraction of the volume.
            let perPosition = plan.count / plan.starts[0].count
            let full = classes * n * 4
            if size.x >= 4 * window.x && batch <= perPosition {
                XCTAssertLessThan(stats.accumulatorBytes, full / 2, "\(label): the ring is not the whole volume")
            }
            // ... and so does all of the engine's memory when the window is small against the volume.
            if size.x >= 4 * window.x && size.y >= 2 * window.y && batch == 1 {
                XCTAssertLessThan(engine.retainedBytes, full / 2, "\(label): all working memory \(engine.retainedBytes) B vs \(full) B")
            }
        }
    }

    /// Finalising a range longer than the ring: planes that no window reached are background whatever
    /// their (aliased) ring slots hold, and only the slots of finalised planes are read and zeroed.
    /// (A finalised range can be longer than the ring after skipped windows or at the end; reading the
    /// aliased slots there raced with their zeroing by another part.)
    func testFinaliserIgnoresSlotsOfUntouchedPlanes() {
        let size = SIMD3(8, 2, 3), depth = 4, classes = 2, plane = 6
        var acc = [Float](repeating: 1, count: classes * depth * plane)
        for i in (depth * plane)..<(2 * depth * plane) { acc[i] = 3 }       // class 1 sums: 3, class 0: 1
        var weights = [Float](repeating: 2, count: depth * plane)
        var labels = [UInt8](repeating: 9, count: 8 * plane)
        var probabilities = [Float](repeating: .nan, count: classes * 8 * plane)
        var logits = [Float](repeating: .nan, count: classes * 8 * plane)
        var scratch = [Float](repeating: 0, count: 2 * Threads.count * size.z)
        acc.withUnsafeMutableBufferPointer { a in weights.withUnsafeMutableBufferPointer { w in
            labels.withUnsafeMutableBufferPointer { l in probabilities.withUnsafeMutableBufferPointer { p in
                logits.withUnsafeMutableBufferPointer { g in scratch.withUnsafeMutableBufferPointer { s in
                    Finaliser(acc: a.baseAddress!, weights: w.baseAddress!, depth: depth, size: size, classes: classes,
                              labels: l.baseAddress!, probabilities: p.baseAddress!, logits: g.baseAddress!,
                              scratch: s.baseAddress!, parts: Threads.count).finalise(0..<8, touched: 2)
                } }
            } }
        } }
        let n = 8 * plane
        for x in 0..<8 {
            for i in (x * plane)..<((x + 1) * plane) {
                XCTAssertEqual(labels[i], x < 2 ? 1 : 0, "label, plane \(x)")
                XCTAssertEqual(logits[i], x < 2 ? 0.5 : 0, "class 0 logit, plane \(x)")
                XCTAssertEqual(logits[n + i], x < 2 ? 1.5 : 0, "class 1 logit, plane \(x)")
                XCTAssertEqual(probabilities[i] + probabilities[n + i], 1, accuracy: 1e-6)
                if x >= 2 { XCTAssertEqual(probabilities[i], 1, "background probability, plane \(x)") }
            }
        }
        // Slots 0 and 1 (planes 0, 1) are zeroed for reuse; the others are left alone.
        XCTAssertEqual(Array(weights[0..<(2 * plane)]), [Float](repeating: 0, count: 2 * plane))
        XCTAssertEqual(Array(weights[(2 * plane)...]), [Float](repeating: 2, count: 2 * plane))
    }

    /// Skipped windows are not run; voxels no run window covers are background (label 0, probability 1
    /// for class 0, logits 0); the skip count is what the threshold implies.
    func testSkippedWindowsAreBackground() throws {
        let size = SIMD3(24, 8, 8), window = SIMD3(8, 8, 8)
        let n = size.x * size.y * size.z
        // Two channels; everything 0 except a bright block at x in 2..<5 where channel 1 wins.
        var input = [Float](repeating: 0, count: 2 * n)
        for x in 2..<5 { for i in 0..<(size.y * size.z) { input[n + x * size.y * size.z + i] = 1 } }
        let options = SlidingWindowOptions(window: window, overlap: 0, blend: .constant, batch: 1, skipThreshold: [0.5, 0.5])
        let counting = CountingPredictor(IdentityPredictor(channels: 2))
        let got = try runStreaming(counting, input, size, options)
        XCTAssertEqual(got.stats.windows, 3)
        XCTAssertEqual(got.stats.windowsSkipped, 2)
        XCTAssertEqual(got.stats.windowsRun, 1)
        XCTAssertEqual(counting.windows, 1)
        let plane = size.y * size.z
        for i in 0..<n {
            let x = i / plane
            XCTAssertEqual(got.labels[i], x >= 2 && x < 5 ? 1 : 0, "label at x \(x)")
            if x >= 8 {
                XCTAssertEqual(got.probabilities[i], 1, "skipped region: probability of background")
                XCTAssertEqual(got.probabilities[n + i], 0)
                XCTAssertEqual(got.logits[i], 0)
            }
        }
        // Every window below the threshold: nothing runs, everything background.
        let none = try runStreaming(counting, [Float](repeating: -3, count: 2 * n), size, options)
        XCTAssertEqual(none.stats.windowsRun, 0)
        XCTAssertEqual(none.stats.accumulatorPlanes, 0)
        XCTAssertEqual(none.labels, [UInt8](repeating: 0, count: n))
        XCTAssertEqual(Array(none.probabilities[0..<n]), [Float](repeating: 1, count: n))
    }

    /// Progress goes from (skipped, total) to (total, total), never backwards; returning false cancels
    /// with .cancelled, and the same engine then runs normally again.
    func testProgressAndCancellation() throws {
        var rng = SplitMix64(seed: 85)
        let size = SIMD3(20, 10, 6), window = SIMD3(6, 6, 6)
        let input = rng.floats(2 * size.x * size.y * size.z)
        let options = SlidingWindowOptions(window: window, overlap: 0.5, blend: .gaussian(), batch: 2)
        let predictor = WindowMeanPredictor(inChannels: 2)
        var seen: [(Int, Int)] = []
        let engine = SlidingWindowInference()
        let full = try runStreaming(predictor, input, size, options, engine: engine) { done, total in
            seen.append((done, total)); return true
        }
        let total = full.stats.windows
        XCTAssertEqual(seen.first?.0, 0)
        XCTAssertEqual(seen.last?.0, total)
        XCTAssertTrue(seen.allSatisfy { $0.1 == total })
        XCTAssertTrue(zip(seen, seen.dropFirst()).allSatisfy { $0.0 < $1.0 }, "\(seen)")
        XCTAssertEqual(seen.count, full.stats.batches + 1)

        for stopAfter in [0, 1, 3] {
            var calls = 0
            assertThrowsDeformUX(.cancelled, ["cancelled"], "cancel after \(stopAfter) progress calls") {
                _ = try runStreaming(predictor, input, size, options, engine: engine) { _, _ in
                    calls += 1; return calls <= stopAfter
                }
            }
            let again = try runStreaming(predictor, input, size, options, engine: engine)
            assertIdentical(again.logits, full.logits, "run after a cancelled run")
            XCTAssertEqual(again.labels, full.labels)
        }
    }

    /// The engine keeps its memory between runs of different sizes and options, and gives what a fresh
    /// engine gives.
    func testReusedEngineMatchesFreshEngine() throws {
        var rng = SplitMix64(seed: 86)
        let engine = SlidingWindowInference()
        let runs: [(SIMD3<Int>, SlidingWindowOptions)] = [
            (SIMD3(12, 8, 8), SlidingWindowOptions(window: SIMD3(8, 4, 4), overlap: 0.5, batch: 2)),
            (SIMD3(5, 5, 5), SlidingWindowOptions(window: SIMD3(4, 4, 4), overlap: 0.25, blend: .constant, batch: 1)),
            (SIMD3(30, 6, 7), SlidingWindowOptions(window: SIMD3(8, 4, 4), overlap: 0.75, batch: 3, flipTTA: true)),
            (SIMD3(12, 8, 8), SlidingWindowOptions(window: SIMD3(8, 4, 4), overlap: 0.5, batch: 2)),
        ]
        for (size, options) in runs {
            let input = rng.floats(2 * size.x * size.y * size.z)
            let predictor = WindowMeanPredictor(inChannels: 2)
            let reused = try runStreaming(predictor, input, size, options, engine: engine)
            let fresh = try runStreaming(predictor, input, size, options)
            assertIdentical(reused.logits, fresh.logits, "reused engine, size \(sizeText(size))")
            XCTAssertEqual(reused.labels, fresh.labels)
            XCTAssertGreaterThan(engine.retainedBytes, 0)
        }
        engine.release()
        XCTAssertEqual(engine.retainedBytes, 0)
    }

    /// Bad options and bad predictors give DeformUXErrors naming what was expected.
    func testBadOptionsAndPredictorsGiveClearErrors() throws {
        let size = SIMD3(8, 8, 8)
        let input = [Float](repeating: 0, count: 2 * 512)
        let good = SlidingWindowOptions(window: SIMD3(4, 4, 4), overlap: 0.5, batch: 1)
        let predictor = IdentityPredictor(channels: 2)
        func run(_ p: any WindowPredictor, _ o: SlidingWindowOptions, _ s: SIMD3<Int> = size) throws {
            _ = try runStreaming(p, input, s, o)
        }
        var o = good
        o.window = SIMD3(0, 4, 4)
        assertThrowsDeformUX(.invalidArgument, ["window", "0x4x4"], "zero window") { try run(predictor, o) }
        o = good; o.window = SIMD3(8, 8, 12)
        assertThrowsDeformUX(.invalidArgument, ["multiples of 16", "8x8x12"], "window not a multiple") {
            try run(IdentityPredictor(channels: 2, sizeMultiple: 16), o)
        }
        for bad in [1.0, -0.1, .nan, .infinity] {
            o = good; o.overlap = bad
            assertThrowsDeformUX(.invalidArgument, ["overlap", "0 <= overlap < 1"], "overlap \(bad)") { try run(predictor, o) }
        }
        o = good; o.batch = 0
        assertThrowsDeformUX(.invalidArgument, ["batch"], "batch 0") { try run(predictor, o) }
        o = good; o.skipThreshold = [0.5]
        assertThrowsDeformUX(.invalidArgument, ["skip threshold", "2 values"], "threshold count") { try run(predictor, o) }
        o = good; o.padValue = .infinity
        assertThrowsDeformUX(.invalidArgument, ["pad value"], "pad value") { try run(predictor, o) }
        assertThrowsDeformUX(.invalidArgument, ["empty image"], "empty image") { try run(predictor, good, SIMD3(0, 8, 8)) }
        assertThrowsDeformUX(.invalidArgument, ["1...256 output channels", "257"], "too many classes") {
            try run(OddPredictor(inChannels: 2, outChannels: 257), good)
        }
        assertThrowsDeformUX(.invalidArgument, ["non-finite logit"], "NaN logits") {
            try run(OddPredictor(inChannels: 2, outChannels: 2, output: .nan), good)
        }
        let failing = CountingPredictor(predictor)
        failing.failAfter = 1
        assertThrowsDeformUX(.internal, ["failing on purpose"], "predictor error passes through") { try run(failing, good) }
    }
}
