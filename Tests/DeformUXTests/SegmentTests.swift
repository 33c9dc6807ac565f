import Foundation
import XCTest
@testable import DeformUX

/// The network behind the pipeline: `SessionPredictor`, `Segmenter(model:)`, monitored segmentation
/// (progress inside windows, cancellation) and NIfTI files in and out. Tiny random-weight networks.
final class SegmentTests: XCTestCase {
    static let config = DeformUXNetConfig(outChannels: 3, featureSize: [4, 8, 8, 8], hiddenSize: 8)

    /// A tiny network whose head is scaled up so that the classes differ from voxel to voxel (PyTorch's
    /// initialisation with layer scale 1e-6 gives nearly constant logits).
    static func network(seed: UInt64 = 5) throws -> DeformUXNet {
        let net = try DeformUXNet(config: config, seed: seed)
        let layout = net.parameters.layout
        try net.parameters.write("test") {
            for e in layout.entries where e.name.hasPrefix("out.") {
                for i in 0..<e.count { net.parameters.values[e.offset + i] *= 50 }
            }
        }
        return net
    }

    /// The predictor the reference runs: the network's allocating forward, one call per batch.
    struct ForwardPredictor: WindowPredictor {
        let net: DeformUXNet
        var inChannels: Int { net.config.inChannels }
        var outChannels: Int { net.config.outChannels }
        var sizeMultiple: Int { 16 }
        var preferredBatch: Int { 1 }
        func predict(windows: UnsafePointer<Float>, batch: Int, size: SIMD3<Int>, into: UnsafeMutablePointer<Float>) throws {
            let n = batch * inChannels * size.x * size.y * size.z
            let x = try Tensor(shape: [batch, inChannels, size.x, size.y, size.z],
                               values: Array(UnsafeBufferPointer(start: windows, count: n)))
            let y = try net.forward(x)
            into.update(from: y.pointer, count: y.count)
        }
    }

    func randomVolume(_ size: SIMD3<Int>, seed: UInt64, affine: Affine = .identity) throws -> Volume {
        var rng = SplitMix64(seed: seed)
        // A smooth blob plus noise, so that the classes form regions.
        var v = [Float](repeating: 0, count: size.x * size.y * size.z)
        for x in 0..<size.x { for y in 0..<size.y { for z in 0..<size.z {
            let d = Double((x - size.x / 2) * (x - size.x / 2) + (y - size.y / 3) * (y - size.y / 3) + (z - size.z / 2) * (z - size.z / 2))
            v[(x * size.y + y) * size.z + z] = Float(100 * exp(-d / 60) + rng.uniform(0, 20))
        } } }
        return try Volume(size: size, values: v, affine: affine)
    }

    /// One window covering the whole (padded) volume: the labels are the argmax of one forward of the
    /// preprocessed input, the probabilities its softmax.
    func testOneWindowIsOneForward() throws {
        let net = try SegmentTests.network()
        let size = SIMD3(16, 16, 16)
        let volume = try randomVolume(size, seed: 1)
        let config = SegmenterConfiguration(window: size, overlap: 0.5, reorient: false, intensity: .mr())
        let result = try Segmenter(model: net, configuration: config).segment(volume, probabilities: true)
        let (input, _) = try Preprocessing.run(volume, options: PreprocessOptions(reorient: false, intensity: .mr()))
        let logits = try net.forward(try input.data.reshaped([1, 1, 16, 16, 16])).toArray()
        let n = size.x * size.y * size.z
        let probabilities = try XCTUnwrap(result.probabilities).values()
        var worst = 0.0
        for i in 0..<n {
            let l = (0..<3).map { Double(logits[$0 * n + i]) }
            let m = l.max()!
            let e = l.map { exp($0 - m) }
            for c in 0..<3 { worst = max(worst, abs(Double(probabilities[c * n + i]) - e[c] / e.reduce(0, +))) }
            let sorted = l.sorted()
            // The argmax, unless two logits tie to within the blend's rounding.
            if sorted[2] - sorted[1] > 1e-4 { XCTAssertEqual(Int(result.labels.labels[i]), l.firstIndex(of: m)!, "voxel \(i)") }
        }
        XCTAssertLessThan(worst, 1e-5, "probabilities vs the softmax of one forward")
        XCTAssertGreaterThan(Set(result.labels.labels).count, 1, "more than one class")
        XCTAssertEqual(result.statistics.windows.windowsRun, 1)
    }

    /// Several windows in batches of 2 through the session (borrowed buffers, logits written in place)
    /// agree to the bit with the naive reference running the network's allocating forward.
    func testSessionPredictorAgreesWithTheReference() throws {
        let net = try SegmentTests.network(seed: 8)
        let size = SIMD3(32, 16, 16)
        var rng = SplitMix64(seed: 2)
        let input = rng.floats(size.x * size.y * size.z, -1, 1)
        let options = SlidingWindowOptions(window: SIMD3(16, 16, 16), overlap: 0.5, blend: .gaussian(), batch: 2)
        var labels = [UInt8](repeating: 0, count: input.count)
        var logits = [Float](repeating: 0, count: 3 * input.count)
        let predictor = try SessionPredictor(model: net)
        let stats = try input.withUnsafeBufferPointer { i in
            try labels.withUnsafeMutableBufferPointer { l in
                try logits.withUnsafeMutableBufferPointer { g in
                    try SlidingWindowInference().run(predictor, input: i.baseAddress!, size: size, options: options,
                                                     labels: l.baseAddress!, logits: g.baseAddress!)
                }
            }
        }
        XCTAssertEqual(stats.windows, 3)
        XCTAssertEqual(stats.predictorCalls, 2, "batches of 2 and 1")
        let (want, weights) = try SlidingWindowReference.blend(ForwardPredictor(net: net), input: input, size: size, options: options)
        assertIdentical(logits, want, "blended logits")
        XCTAssertTrue(labels == (try SlidingWindowReference.labels(logits: want, weights: weights, classes: 3)), "labels vs the reference")
    }

    /// The same image stored with permuted, flipped axes (the affine keeps every voxel's world position)
    /// reorients to the same network input: the labels come back moved the same way, to the bit.
    func testReorientedVolumeGivesReorientedLabelsThroughTheNetwork() throws {
        let net = try SegmentTests.network(seed: 9)
        let size = SIMD3(20, 12, 14)
        let affine = try Affine([1.5, 0, 0, -10, 0, 1, 0, 5, 0, 0, 2, 3, 0, 0, 0, 1])
        let volume = try randomVolume(size, seed: 3, affine: affine)
        // Stored axes: new 0 = old 2 flipped, new 1 = old 0, new 2 = old 1 flipped.
        let newSize = SIMD3(size.z, size.x, size.y)
        func old(_ u: SIMD3<Int>) -> SIMD3<Int> { SIMD3(u.y, size.y - 1 - u.z, size.z - 1 - u.x) }
        let map = Affine.voxelMap([0, 1, 0, 0, 0, -1, -1, 0, 0], SIMD3(0, Double(size.y - 1), Double(size.z - 1)))
        let values = volume.values()
        var moved = [Float](repeating: 0, count: values.count)
        for a in 0..<newSize.x { for b in 0..<newSize.y { for c in 0..<newSize.z {
            let v = old(SIMD3(a, b, c))
            moved[(a * newSize.y + b) * newSize.z + c] = values[(v.x * size.y + v.y) * size.z + v.z]
        } } }
        let other = try Volume(size: newSize, values: moved, affine: affine * map)
        XCTAssertLessThan(worldDistance(affine.apply(SIMD3(4, 5, 6)),
                                           other.affine.apply(SIMD3(Double(size.z - 1 - 6), 4, Double(size.y - 1 - 5)))), 1e-9)
        var card = ModelCard(config: SegmentTests.config)
        card.window = SIMD3(16, 16, 16)
        let segmenter = try Segmenter(model: net, card: card)
        let a = try segmenter.segment(volume)
        let b = try segmenter.segment(other)
        XCTAssertEqual(b.labels.affine, other.affine)
        var mismatches = 0
        for i in 0..<newSize.x { for j in 0..<newSize.y { for k in 0..<newSize.z {
            let v = old(SIMD3(i, j, k))
            if b.labels[i, j, k] != a.labels[v.x, v.y, v.z] { mismatches += 1 }
        } } }
        XCTAssertEqual(mismatches, 0)
        XCTAssertGreaterThan(Set(a.labels.labels).count, 1)
        XCTAssertEqual(a.statistics.windows.windows, 3, "several windows: the canonical grid is padded to 32 x 16 x 16")
    }

    /// Progress counts the network's steps inside windows, up to windows x 12 (x 8 with TTA), never going
    /// back; returning false cancels mid-window; a cancellation token is honoured; the segmenter works
    /// afterwards.
    func testMonitorReportsStepsAndCancels() throws {
        let net = try SegmentTests.network()
        let volume = try randomVolume(SIMD3(24, 16, 16), seed: 4)
        let config = SegmenterConfiguration(window: SIMD3(16, 16, 16), overlap: 0.5, reorient: false)
        let segmenter = try Segmenter(model: net, configuration: config)
        XCTAssertEqual(segmenter.progressUnitsPerWindow, 12)
        var seen: [(Int, Int)] = []
        let result = try segmenter.segment(volume, monitor: SegmentMonitor(progress: { seen.append(($0, $1)); return true }))
        let windows = result.statistics.windows.windows
        XCTAssertEqual(windows, 3, "the grid is padded to 32 x 16 x 16: x starts 0, 8, 16")
        XCTAssertTrue(seen.allSatisfy { $0.1 == windows * 12 }, "total")
        XCTAssertEqual(seen.first?.0, 0)
        XCTAssertEqual(seen.last?.0, windows * 12)
        XCTAssertTrue(zip(seen, seen.dropFirst()).allSatisfy { $0.0 <= $1.0 }, "monotone: \(seen.map(\.0))")
        XCTAssertGreaterThanOrEqual(Set(seen.map(\.0)).count, windows * 12, "every step reported")

        // Cancelled from the progress callback in the middle of the second window.
        XCTAssertThrowsError(try segmenter.segment(volume, monitor: SegmentMonitor(progress: { done, _ in done < 17 }))) { e in
            XCTAssertEqual((e as? DeformUXError)?.kind, .cancelled, "\(e)")
        }
        // Cancelled by a token whose poll says stop (polled between windows and inside the kernels).
        var polls = 0
        let token = Cancellation(interval: 0, poll: { polls += 1; return polls < 3 })
        XCTAssertThrowsError(try segmenter.segment(volume, monitor: SegmentMonitor(cancellation: token))) { e in
            XCTAssertEqual((e as? DeformUXError)?.kind, .cancelled, "\(e)")
        }
        // Still usable, and the same result.
        let again = try segmenter.segment(volume, monitor: SegmentMonitor())
        XCTAssertTrue(again.labels == result.labels, "same labels after cancellations")

        // Flip TTA: 8 forwards per window (one window here).
        var tta = config
        tta.flipTTA = true
        let t = try Segmenter(model: net, configuration: tta)
        var last = (0, 0)
        _ = try t.segment(try randomVolume(SIMD3(16, 16, 16), seed: 5), monitor: SegmentMonitor(progress: { last = ($0, $1); return true }))
        XCTAssertEqual(t.progressUnitsPerWindow, 96)
        XCTAssertEqual(last.0, 96)
        XCTAssertEqual(last.1, 96)

        // Stand-in predictors count windows.
        let standIn = try Segmenter(predictor: IdentityPredictor(channels: 1), configuration: SegmenterConfiguration(window: SIMD3(8, 8, 8)))
        var units: [Int] = []
        _ = try standIn.segment(volume, monitor: SegmentMonitor(progress: { d, _ in units.append(d); return true }))
        XCTAssertEqual(units.last, 5 * 3 * 3, "window 8 at overlap 0.5 over 24 x 16 x 16: starts every 4")
    }

    /// A second monitored call on a segmenter's predictor while one runs gets `.busy`.
    func testOneMonitoredRunAtATime() throws {
        let net = try SegmentTests.network()
        let volume = try randomVolume(SIMD3(16, 16, 16), seed: 6)
        let segmenter = try Segmenter(model: net, configuration: SegmenterConfiguration(window: SIMD3(16, 16, 16), reorient: false))
        var inner: Error?
        _ = try segmenter.segment(volume, monitor: SegmentMonitor(progress: { done, _ in
            if done == 5 && inner == nil {
                do { _ = try segmenter.segment(volume, monitor: SegmentMonitor()) } catch { inner = error }
            }
            return true
        }))
        XCTAssertEqual((inner as? DeformUXError)?.kind, .busy)
    }

    /// Skipping with a data box: only the image's own voxels decide (padding is never body), a window
    /// over padding alone is skipped; the streaming run equals the reference to the bit, over boxes that
    /// cut windows, cover the image, or leave windows outside; without a box the old rule holds.
    func testSkippingJudgesTheDataBoxOnly() throws {
        var rng = SplitMix64(seed: 31)
        let size = SIMD3(20, 12, 9), n = size.x * size.y * size.z
        // Background -1 with a bright block at x 5..<8; padding-like 0.3 in the planes x >= 16.
        var input = [Float](repeating: -1, count: 2 * n)
        for i in 0..<n {
            let x = i / (size.y * size.z)
            if x >= 5 && x < 8 { input[i] = Float(rng.uniform(0.5, 1.0) as Double); input[n + i] = Float(rng.uniform(0.5, 1.0) as Double) }
            if x >= 16 { input[i] = 0.3; input[n + i] = 0.3 }
        }
        let boxes: [SlidingWindowOptions.DataBox?] = [nil, .init(origin: SIMD3(0, 0, 0), size: SIMD3(16, 12, 9)),
                                                      .init(origin: SIMD3(2, 1, 1), size: SIMD3(12, 10, 7)),
                                                      .init(origin: SIMD3(0, 0, 0), size: size)]
        var skipped: [Int] = []
        for box in boxes {
            let options = SlidingWindowOptions(window: SIMD3(8, 8, 8), overlap: 0.5, blend: .gaussian(), batch: 2,
                                               skipThreshold: [0, 0], dataBox: box)
            let predictor = WindowMeanPredictor(inChannels: 2)
            let got = try runStreaming(predictor, input, size, options)
            let (want, weights) = try SlidingWindowReference.blend(predictor, input: input, size: size, options: options)
            assertIdentical(got.logits, want, "logits, box \(String(describing: box))")
            XCTAssertTrue(got.labels == (try SlidingWindowReference.labels(logits: want, weights: weights, classes: 2)))
            skipped.append(got.stats.windowsSkipped)
        }
        // Windows at x 0, 4, 8, 12: the block decides; without a box the 0.3 planes (x >= 16) keep the
        // last window; with a box that ends at 16 they do not count.
        XCTAssertEqual(skipped[0], skipped[3], "a box of the whole image changes nothing")
        XCTAssertGreaterThan(skipped[1], skipped[0], "the 0.3 'padding' outside the box does not keep windows")
        assertThrowsDeformUX(.invalidArgument, ["data box"], "bad box") {
            var o = SlidingWindowOptions(window: SIMD3(8, 8, 8), skipThreshold: [0, 0])
            o.dataBox = .init(origin: SIMD3(-1, 0, 0), size: SIMD3(1, 1, 1))
            _ = try runStreaming(WindowMeanPredictor(inChannels: 2), input, size, o)
        }
    }

    /// An MR head in air: after the MR preset the background maps below 0, the padding the segmenter adds
    /// is 0; windows over background and padding only are skipped, their voxels are background.
    func testSkippingAnMRVolumeWithPadding() throws {
        let size = SIMD3(40, 20, 14)
        var v = [Float](repeating: 0, count: size.x * size.y * size.z)
        var rng = SplitMix64(seed: 32)
        for x in 3..<12 { for y in 4..<16 { for z in 2..<12 { v[(x * size.y + y) * size.z + z] = Float(rng.uniform(50.0, 150.0) as Double) } } }
        let volume = try Volume(size: size, values: v)
        /// One channel in, two classes out: class 1 where the normalised intensity exceeds 0.5.
        struct Threshold: WindowPredictor {
            var inChannels: Int { 1 }
            var outChannels: Int { 2 }
            var sizeMultiple: Int { 16 }
            var preferredBatch: Int { 1 }
            func predict(windows: UnsafePointer<Float>, batch: Int, size: SIMD3<Int>, into: UnsafeMutablePointer<Float>) throws {
                let m = size.x * size.y * size.z
                for b in 0..<batch { for i in 0..<m { into[2 * b * m + i] = 0.5; into[(2 * b + 1) * m + i] = windows[b * m + i] } }
            }
        }
        var config = SegmenterConfiguration(window: SIMD3(16, 16, 16), overlap: 0.5, reorient: false, intensity: .mr())
        let all = try Segmenter(predictor: Threshold(), configuration: config).segment(volume)
        config.skipThreshold = 0
        let counting = CountingPredictor(Threshold())
        let some = try Segmenter(predictor: counting, configuration: config).segment(volume)
        // Network grid 48 x 32 x 16 (4 voxels of padding before x): windows at x 0, 8, 16, 24, 32 (3 along
        // y); the block sits at grid x 7..<16, so the windows from x 16 on hold background and padding only.
        XCTAssertEqual(some.statistics.networkSize, SIMD3(48, 32, 16))
        XCTAssertEqual(some.statistics.windows.windows, 5 * 3)
        XCTAssertEqual(some.statistics.windows.windowsSkipped, 3 * 3)
        XCTAssertEqual(counting.windows, 2 * 3)
        XCTAssertEqual(all.statistics.windows.windowsSkipped, 0)
        var differ = 0
        for x in 0..<size.x { for y in 0..<size.y { for z in 0..<size.z {
            let i = (x * size.y + y) * size.z + z
            if x >= 20 { XCTAssertEqual(some.labels.labels[i], 0, "no run window reaches input x \(x)") }
            if x < 12 && some.labels.labels[i] != all.labels.labels[i] { differ += 1 }
        } } }
        XCTAssertEqual(differ, 0, "where the body is, skipping changes nothing")
        XCTAssertGreaterThan(all.labels.labels.filter { $0 == 1 }.count, 100)
    }

    /// NIfTI in, NIfTI out: labels on the input grid with its affine and header, equal to segmenting the
    /// volume in memory; probabilities as x, y, z, class; the card's model from its file.
    func testSegmentFile() throws {
        let directory = NSTemporaryDirectory() + "deformux-segment-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let net = try SegmentTests.network(seed: 12)
        try net.save(to: directory + "/tiny.safetensors")
        var card = ModelCard(config: SegmentTests.config)
        card.weights = "tiny.safetensors"
        card.classes = ["background", "blob", "rim"]
        try card.write(to: directory + "/tiny.json")

        let size = SIMD3(21, 17, 13)
        let affine = try Affine([0, 0, -2, 40, -1.5, 0, 0, 30, 0, 1.2, 0, -20, 0, 0, 0, 1])
        let volume = try randomVolume(size, seed: 7, affine: affine)
        let input = directory + "/image.nii.gz"
        try NIfTI.write(volume.values(), dims: [size.x, size.y, size.z], affine: try NIfTIAffine(rowMajor: affine.values),
                        description: "test image", to: input)
        let result = try Segmenter.segmentFile(input: input, output: directory + "/labels.nii.gz", model: directory + "/tiny.json",
                                               probabilities: directory + "/p.nii")
        let labels = try NIfTIFile(path: directory + "/labels.nii.gz")
        XCTAssertEqual(labels.header.datatype, .uint8)
        XCTAssertEqual(labels.shape, [size.x, size.y, size.z])
        XCTAssertLessThan(labels.affine.values.enumerated().map { abs($1 - affine.values[$0]) }.max()!, 1e-6)
        XCTAssertTrue(try labels.int32s().map { UInt8($0) } == result.labels.labels, "labels in the file")
        let probabilities = try NIfTIFile(path: directory + "/p.nii")
        XCTAssertEqual(probabilities.shape, [size.x, size.y, size.z, 3])
        let p = try probabilities.floats()
        let n = size.x * size.y * size.z
        for i in stride(from: 0, to: n, by: 7) { XCTAssertEqual(p[i] + p[n + i] + p[2 * n + i], 1, accuracy: 1e-5) }

        // The same as segmenting in memory with the card's configuration resolved for this volume
        // (automatic windows: the canonical grid is 13 x 17 x 21 -> 16 x 32 x 32).
        let c = try ModelCard.loadModel(path: directory + "/tiny.json").card
        let configuration = try c.segmenterConfiguration(size: size, affine: affine)
        XCTAssertNil(c.window)
        XCTAssertEqual(configuration.window, SIMD3(16, 32, 32))
        let memory = try Segmenter(model: net, configuration: configuration).segment(volume)
        XCTAssertEqual(zip(memory.labels.labels, result.labels.labels).filter { $0 != $1 }.count, 0)

        // An existing Segmenter writes the same; bad output names fail before any work.
        let segmenter = try Segmenter(model: net, configuration: configuration)
        try segmenter.segmentFile(input: input, output: directory + "/again.nii")
        XCTAssertTrue(try NIfTIFile(path: directory + "/again.nii").int32s().map { UInt8($0) } == result.labels.labels, "again")
        XCTAssertThrowsError(try segmenter.segmentFile(input: input, output: directory + "/labels.png")) { e in
            XCTAssertTrue("\(e)".contains(".nii"), "\(e)")
        }
        XCTAssertThrowsError(try segmenter.segmentFile(input: directory + "/missing.nii", output: directory + "/x.nii")) { e in
            XCTAssertEqual((e as? DeformUXError)?.errno, ENOENT)
        }
        // A two-channel image for a one-channel model.
        try NIfTI.write(volume.values() + volume.values(), dims: [size.x, size.y, size.z, 2],
                        affine: try NIfTIAffine(rowMajor: affine.values), to: directory + "/two.nii")
        XCTAssertThrowsError(try segmenter.segmentFile(input: directory + "/two.nii", output: directory + "/x.nii")) { e in
            XCTAssertTrue("\(e)".contains("channels"), "\(e)")
        }
    }
}

func worldDistance(_ a: SIMD3<Double>, _ b: SIMD3<Double>) -> Double {
    max(abs(a.x - b.x), max(abs(a.y - b.y), abs(a.z - b.z)))
}
