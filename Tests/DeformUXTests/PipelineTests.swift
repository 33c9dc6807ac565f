import Foundation
import XCTest
@testable import DeformUX

/// The whole pipeline (Segmenter: preprocess, sliding window, postprocess) with stand-in networks.
final class PipelineTests: XCTestCase {
    func maxAbsDifference(_ a: SIMD3<Double>, _ b: SIMD3<Double>) -> Double {
        max(abs(a.x - b.x), abs(a.y - b.y), abs(a.z - b.z))
    }

    /// A multi-channel volume with a clear argmax per voxel, and its affine.
    func separatedVolume(_ rng: inout SplitMix64, _ size: SIMD3<Int>, channels: Int, affine: Affine = .identity) throws -> (Volume, [UInt8]) {
        let (values, argmax) = separatedChannels(&rng, channels: channels, voxels: size.x * size.y * size.z)
        return (try Volume(size: size, channels: channels, values: values, affine: affine), argmax)
    }

    static let lps = try! Affine([-0.8, 0, 0, 40, 0, -1.1, 0, 30, 0, 0, 2, -10])
    static let permuted = try! Affine([0, 0, -1.5, 10, 0.9, 0, 0, -20, 0, 1.2, 0, 5])
    static let oblique = try! Affine([0.94, -0.34, 0, 1, 0.34, 0.94, 0, 2, 0, 0, -1.3, 3])

    /// Identity and affine stand-ins through the whole pipeline: the labels are the argmax of the
    /// stand-in's formula applied to the input's channels, exactly, on the input grid with the input
    /// affine, for reoriented affines, window larger than the volume (padded) and smaller, each overlap,
    /// batch 1 and 3, gaussian and constant blending, and whole-factor upsampling (factor 3: each input
    /// voxel's nearest network voxel sits on it); probabilities are the softmax of the formula within
    /// 1e-6. (The channels are separated by at least 0.1 after the affine map, so float rounding in the
    /// blend cannot move the argmax.)
    func testStandInsReproduceTheInputThroughThePipeline() throws {
        var rng = SplitMix64(seed: 91)
        let channels = 3
        let affinePredictor = try AffinePredictor(scale: [1.0, 1.2, 1.1], shift: [0.05, -0.05, 0], sizeMultiple: 2)
        let geometries: [(String, SIMD3<Int>, Affine, SIMD3<Int>, SIMD3<Double>?)] = [
            ("RAS, window larger", SIMD3(7, 5, 3), .identity, SIMD3(8, 8, 8), nil),
            ("LPS, window equal to padded", SIMD3(8, 7, 6), PipelineTests.lps, SIMD3(8, 8, 8), nil),
            ("permuted, odd, window smaller", SIMD3(13, 9, 11), PipelineTests.permuted, SIMD3(6, 4, 6), nil),
            ("oblique, upsampled x3", SIMD3(5, 4, 3), PipelineTests.oblique, SIMD3(6, 6, 6),
             PipelineTests.oblique.spacing / 3),
        ]
        var cases = 0
        for (name, size, affine, window, spacing) in geometries {
            let (volume, argmax) = try separatedVolume(&rng, size, channels: channels, affine: affine)
            let n = size.x * size.y * size.z
            let x = volume.values()
            for predictor in [IdentityPredictor(channels: channels, sizeMultiple: 2) as any WindowPredictor, affinePredictor] {
                let isAffine = predictor is AffinePredictor
                let logits = isAffine ? (0..<(channels * n)).map { affinePredictor.apply(x[$0], channel: $0 / n) } : x
                let softmax = try SlidingWindowReference.probabilities(logits: logits, weights: [Float](repeating: 1, count: n),
                                                                   classes: channels)
                for overlap in [0.0, 0.25, 0.5, 0.75] {
                    for batch in [1, 3] {
                        for blend in [BlendMode.gaussian(), .constant] {
                            let label = "\(name) \(isAffine ? "affine" : "identity") overlap \(overlap) batch \(batch) \(blend)"
                            let config = SegmenterConfiguration(window: window, overlap: overlap, blend: blend, batch: batch,
                                                                spacing: spacing)
                            let s = try Segmenter(predictor: predictor, configuration: config).segment(volume, probabilities: true)
                            XCTAssertEqual(s.labels.size, size, label)
                            XCTAssertEqual(s.labels.affine, affine, label)
                            XCTAssertEqual(s.labels.labels, argmax, "\(label): labels")
                            assertClose(s.probabilities?.values() ?? [], softmax, atol: 1e-6, rtol: 0,
                                        shape: [channels, size.x, size.y, size.z], "\(label): probabilities")
                            let net = s.statistics.networkSize
                            XCTAssertTrue(net.x % 2 == 0 && net.y % 2 == 0 && net.z % 2 == 0, "\(label): padded to the multiple")
                            XCTAssertTrue(net.x >= window.x && net.y >= window.y && net.z >= window.z, "\(label): at least the window")
                            XCTAssertEqual(s.statistics.windows.windowsRun, s.statistics.windows.windows)
                            cases += 1
                        }
                    }
                }
            }
        }
        XCTAssertEqual(cases, 4 * 2 * 4 * 2 * 2)
    }

    /// Affine stand-in behind the MR preset: the probabilities are the softmax of
    /// a[c] * (x - P1[c]) / (P99[c] - P1[c]) + b[c] with numpy's percentiles (1e-5), and the labels are
    /// its argmax wherever the top two logits differ by more than 1e-4.
    func testAffineStandInBehindTheIntensityPreset() throws {
        var rng = SplitMix64(seed: 92)
        let size = SIMD3(10, 9, 7), channels = 2
        let n = size.x * size.y * size.z
        var values = rng.floats(channels * n, 0, 300)
        for i in stride(from: 0, to: values.count, by: 7) { values[i] = 0 }  // background for the non-zero rule
        let volume = try Volume(size: size, channels: channels, values: values, affine: PipelineTests.lps)
        let predictor = try AffinePredictor(scale: [1.5, -0.5], shift: [0.25, 0.5])
        let config = SegmenterConfiguration(window: SIMD3(4, 4, 4), overlap: 0.5, intensity: .mr())
        let s = try Segmenter(predictor: predictor, configuration: config).segment(volume, probabilities: true)
        var expected = [Float](repeating: 0, count: channels * n)
        for c in 0..<channels {
            let nonzero = Array(values[(c * n)..<((c + 1) * n)]).filter { $0 != 0 }
            let p1 = try Percentile.of(nonzero, 1), p99 = try Percentile.of(nonzero, 99)
            XCTAssertEqual(s.preprocessing.intensity.lower[c], p1)
            XCTAssertEqual(s.preprocessing.intensity.upper[c], p99)
            for i in 0..<n { expected[c * n + i] = predictor.apply((values[c * n + i] - p1) / (p99 - p1), channel: c) }
        }
        let softmax = try SlidingWindowReference.probabilities(logits: expected, weights: [Float](repeating: 1, count: n), classes: channels)
        assertClose(s.probabilities?.values() ?? [], softmax, atol: 1e-5, rtol: 0, "probabilities")
        var checked = 0
        for i in 0..<n where abs(expected[i] - expected[n + i]) > 1e-4 {
            XCTAssertEqual(s.labels.labels[i], expected[n + i] > expected[i] ? 1 : 0, "label at \(i)")
            checked += 1
        }
        XCTAssertGreaterThan(checked, n * 9 / 10)
    }

    /// The same image stored with permuted and flipped axes (and the affine that keeps every voxel at
    /// its world position) gives the same labels, moved the same way, to the bit: both reorient to the
    /// same canonical grid. A window-mean stand-in makes the labels depend on where the windows fall.
    func testReorientedVolumeGivesReorientedLabels() throws {
        var rng = SplitMix64(seed: 93)
        let size = SIMD3(9, 7, 5), channels = 2
        let n = size.x * size.y * size.z
        let values = rng.floats(channels * n, -1, 1)
        let affines: [(String, Affine)] = [("RAS", Affine(spacing: SIMD3(1, 1.5, 2))), ("LPS", PipelineTests.lps),
                                           ("oblique", PipelineTests.oblique)]
        for (name, affine) in affines {
            let volume = try Volume(size: size, channels: channels, values: values, affine: affine)
            // Stored axes: new 0 = old 1, new 1 = old 2 flipped, new 2 = old 0 flipped.
            let newSize = SIMD3(size.y, size.z, size.x)
            func old(_ u: SIMD3<Int>) -> SIMD3<Int> { SIMD3(size.x - 1 - u.z, u.x, size.z - 1 - u.y) }
            let map = Affine.voxelMap([0, 0, -1, 1, 0, 0, 0, -1, 0], SIMD3(Double(size.x - 1), 0, Double(size.z - 1)))
            var moved = [Float](repeating: 0, count: channels * n)
            for c in 0..<channels {
                for a in 0..<newSize.x {
                    for b in 0..<newSize.y {
                        for d in 0..<newSize.z {
                            let v = old(SIMD3(a, b, d))
                            moved[c * n + (a * newSize.y + b) * newSize.z + d] = values[c * n + (v.x * size.y + v.y) * size.z + v.z]
                        }
                    }
                }
            }
            let other = try Volume(size: newSize, channels: channels, values: moved, affine: affine * map)
            // The same world position for a voxel and its moved copy.
            let w1 = affine.apply(SIMD3(2, 3, 4)), w2 = other.affine.apply(SIMD3(3, Double(size.z - 1 - 4), Double(size.x - 1 - 2)))
            XCTAssertLessThan(maxAbsDifference(w1, w2), 1e-9)
            let config = SegmenterConfiguration(window: SIMD3(4, 4, 4), overlap: 0.5, blend: .gaussian(), batch: 2)
            let segmenter = try Segmenter(predictor: WindowMeanPredictor(inChannels: channels), configuration: config)
            let a = try segmenter.segment(volume, probabilities: true)
            let b = try segmenter.segment(other, probabilities: true)
            XCTAssertEqual(b.labels.affine, other.affine)
            var mismatches = 0
            for i in 0..<newSize.x {
                for j in 0..<newSize.y {
                    for k in 0..<newSize.z {
                        let v = old(SIMD3(i, j, k))
                        if b.labels[i, j, k] != a.labels[v.x, v.y, v.z] { mismatches += 1 }
                        for c in 0..<channels {
                            let pb = b.probabilities!.values()[c * n + (i * newSize.y + j) * newSize.z + k]
                            let pa = a.probabilities!.values()[c * n + (v.x * size.y + v.y) * size.z + v.z]
                            if pb != pa { mismatches += 1 }
                        }
                    }
                }
            }
            XCTAssertEqual(mismatches, 0, "\(name): labels and probabilities of the moved volume")
            XCTAssertGreaterThan(Set(a.labels.labels).count, 1, "\(name): both classes occur")
        }
    }

    /// A volume flipped in voxel space (same affine, reorientation off) gives flipped labels, with the
    /// identity stand-in.
    func testFlippedVolumeGivesFlippedLabels() throws {
        var rng = SplitMix64(seed: 94)
        let size = SIMD3(11, 6, 7), channels = 3
        let (volume, argmax) = try separatedVolume(&rng, size, channels: channels)
        let n = size.x * size.y * size.z
        var flipped = [Float](repeating: 0, count: channels * n)
        let v = volume.values()
        for c in 0..<channels {
            for x in 0..<size.x { for y in 0..<size.y { for z in 0..<size.z {
                flipped[c * n + (x * size.y + y) * size.z + z] = v[c * n + ((size.x - 1 - x) * size.y + y) * size.z + (size.z - 1 - z)]
            } } }
        }
        let config = SegmenterConfiguration(window: SIMD3(4, 4, 4), overlap: 0.25, reorient: false)
        let segmenter = try Segmenter(predictor: IdentityPredictor(channels: channels), configuration: config)
        let a = try segmenter.segment(volume)
        let b = try segmenter.segment(try Volume(size: size, channels: channels, values: flipped))
        XCTAssertEqual(a.labels.labels, argmax)
        for x in 0..<size.x { for y in 0..<size.y { for z in 0..<size.z {
            XCTAssertEqual(b.labels[x, y, z], a.labels[size.x - 1 - x, y, size.z - 1 - z])
        } } }
    }

    /// Resampling labels and back: exact for the identity and for whole upsampling factors (2, 3 and
    /// mixed), and always the original shape and affine; the resampled affine puts new voxel j at old
    /// index (j + 0.5) * n / m - 0.5; restoring network-grid labels through all four steps lands on the
    /// input grid exactly.
    func testResampleAndRestoreLabelsExactly() throws {
        var rng = SplitMix64(seed: 95)
        let size = SIMD3(7, 5, 4)
        let n = size.x * size.y * size.z
        let labels = try LabelMap(size: size, labels: (0..<n).map { _ in UInt8(rng.int(0...5)) }, affine: PipelineTests.oblique)
        let spacing = PipelineTests.oblique.spacing
        for (name, factor, exact) in [("same", SIMD3<Double>(1, 1, 1), true), ("x2", SIMD3(2, 2, 2), true),
                                      ("x3 x1 x2", SIMD3(3, 1, 2), true), ("down", SIMD3(0.6, 0.85, 1), false),
                                      ("odd up", SIMD3(1.4, 2.2, 1.3), false)] {
            let r = try Resampling(size: size, affine: labels.affine, targetSpacing: spacing / factor)
            let up = try r.apply(labels)
            let back = try r.invert(up)
            XCTAssertEqual(back.size, size, name)
            XCTAssertEqual(back.affine, labels.affine, name)
            if exact { XCTAssertEqual(back.labels, labels.labels, "\(name): labels survive the round trip") }
            for a in 0..<3 {
                XCTAssertEqual(r.outputSize[a], max(1, Int((Double(size[a]) * factor[a]).rounded(.toNearestOrEven))), "\(name) size")
            }
            let j = SIMD3<Double>(1, 2, 0)
            let old = (j + 0.5) * SIMD3(Double(size.x), Double(size.y), Double(size.z))
                / SIMD3(Double(r.outputSize.x), Double(r.outputSize.y), Double(r.outputSize.z)) - 0.5
            XCTAssertLessThan(maxAbsDifference(r.outputAffine.apply(j), r.inputAffine.apply(old)), 1e-9, "\(name): grid rule")
        }
        // Through all four steps: canonical, upsampled x2, padded; restore gives the labels back.
        let options = PreprocessOptions(spacing: spacing / 2, padMultiple: 16, minimumSize: SIMD3(8, 8, 40))
        let volume = try Volume(size: size, values: labels.labels.map { Float($0) }, affine: labels.affine)
        let (_, record) = try Preprocessing.run(volume, options: options)
        let canonical = try record.resampling.apply(try record.reorientation.apply(labels))
        let net = record.networkSize
        var padded = [UInt8](repeating: 9, count: net.x * net.y * net.z)
        let b = record.padding.before, c = canonical.size
        for x in 0..<c.x { for y in 0..<c.y { for z in 0..<c.z {
            padded[((x + b.x) * net.y + y + b.y) * net.z + z + b.z] = canonical[x, y, z]
        } } }
        XCTAssertEqual(net, SIMD3(16, 16, 48))
        let restored = try record.restore(try LabelMap(size: net, labels: padded, affine: record.networkAffine))
        XCTAssertEqual(restored, labels, "restore(preprocess(labels))")
    }

    /// The intensity presets: CT clips, then scales by the percentiles of the clipped values; a constant
    /// image gives x - P1 (no division by zero); exact against the formula with numpy's percentiles.
    func testIntensityPresets() throws {
        var rng = SplitMix64(seed: 96)
        let size = SIMD3(6, 5, 4)
        let n = size.x * size.y * size.z
        let hu = rng.floats(n, -1000, 1000)
        let volume = try Volume(size: size, values: hu)
        let norm = try IntensityNormalization(preset: .ct(clip: -175...250), measuring: volume)
        let clipped = hu.map { min(max($0, -175), 250) }
        let p1 = try Percentile.of(clipped, 1), p99 = try Percentile.of(clipped, 99)
        XCTAssertEqual(norm.lower, [p1])
        XCTAssertEqual(norm.upper, [p99])
        assertIdentical(try norm.apply(volume).values(), clipped.map { ($0 - p1) / (p99 - p1) }, "ct preset")
        let constant = try Volume(size: size, values: [Float](repeating: 7, count: n))
        let flat = try IntensityNormalization(preset: .mr(voxels: .all), measuring: constant)
        XCTAssertEqual(try flat.apply(constant).values(), [Float](repeating: 0, count: n), "P99 == P1: x - P1")
        let zeros = try Volume(size: size, values: [Float](repeating: 0, count: n))
        let nz = try IntensityNormalization(preset: .mr(), measuring: zeros)
        XCTAssertEqual(nz.lower, [0], "all-zero volume with the non-zero rule: measured over all voxels")
        XCTAssertEqual(try IntensityNormalization(preset: .none, measuring: volume).apply(volume).values(), hu)
    }

    /// Largest connected component per label against a naive oracle (label propagation to a fixed
    /// point), on random sparse label maps; and hand cases: corner contact connects (26-connectivity),
    /// ties keep the component that comes first in C order.
    func testLargestComponentMatchesNaiveOracle() throws {
        var rng = SplitMix64(seed: 97)
        let filter = LargestComponent()
        for trial in 0..<20 {
            let size = SIMD3(rng.int(1...9), rng.int(1...8), rng.int(1...7))
            let n = size.x * size.y * size.z
            let density = rng.uniform(0.1, 0.6)
            let raw = (0..<n).map { _ in rng.uniform(0, 1) < density ? UInt8(rng.int(1...3)) : 0 }
            var map = try LabelMap(size: size, labels: raw)
            filter.apply(&map)
            XCTAssertEqual(map.labels, naiveLargestComponent(raw, size), "trial \(trial), size \(sizeText(size))")
        }
        // Two voxels touching at a corner are one component; a lone voxel of the same label elsewhere is
        // dropped.
        var corner = [UInt8](repeating: 0, count: 27)
        corner[0] = 1; corner[13] = 1; corner[26] = 1  // (0,0,0), (1,1,1), (2,2,2): a diagonal
        var m = try LabelMap(size: SIMD3(3, 3, 3), labels: corner)
        filter.apply(&m)
        XCTAssertEqual(m.labels, corner, "a diagonal is connected")
        var tie = [UInt8](repeating: 0, count: 5)
        tie[0] = 2; tie[4] = 2
        var t = try LabelMap(size: SIMD3(5, 1, 1), labels: tie)
        filter.apply(&t)
        XCTAssertEqual(t.labels, [2, 0, 0, 0, 0], "tie: the first in C order stays")
    }

    /// The oracle: component ids by repeated min-propagation over 26 neighbours of the same label.
    func naiveLargestComponent(_ labels: [UInt8], _ s: SIMD3<Int>) -> [UInt8] {
        let n = labels.count
        var id = (0..<n).map { $0 }
        var changed = true
        while changed {
            changed = false
            for i in 0..<n where labels[i] != 0 {
                let x = i / (s.y * s.z), y = (i / s.z) % s.y, z = i % s.z
                for dx in -1...1 { for dy in -1...1 { for dz in -1...1 {
                    let a = x + dx, b = y + dy, c = z + dz
                    guard a >= 0, a < s.x, b >= 0, b < s.y, c >= 0, c < s.z else { continue }
                    let j = (a * s.y + b) * s.z + c
                    if labels[j] == labels[i] && id[j] < id[i] { id[i] = id[j]; changed = true }
                } } }
            }
        }
        var size = [Int: Int]()
        for i in 0..<n where labels[i] != 0 { size[id[i], default: 0] += 1 }
        var keep = [UInt8: Int]()  // label -> component id (its first voxel)
        for (component, count) in size.sorted(by: { $0.key < $1.key }) {
            let l = labels[component]
            if let k = keep[l], size[k]! >= count { continue }
            keep[l] = component
        }
        return (0..<n).map { labels[$0] != 0 && keep[labels[$0]] == id[$0] ? labels[$0] : 0 }
    }

    /// Segmenter options end to end: windows over air are skipped under a CT preset (threshold in HU),
    /// their region is background; the largest-component filter runs on the input grid.
    func testSkippingAndLargestComponentThroughTheSegmenter() throws {
        let size = SIMD3(40, 16, 16)
        let n = size.x * size.y * size.z
        // Air (-1000 HU) with a "body" block at x 4..<12 (+100 HU) and one stray bright voxel at x 30.
        var hu = [Float](repeating: -1000, count: n)
        let plane = size.y * size.z
        for x in 4..<12 { for i in 0..<plane where (i / size.z) % size.y >= 2 && (i / size.z) % size.y < 12 { hu[x * plane + i] = 100 } }
        hu[30 * plane + 8 * size.z + 8] = 200
        let volume = try Volume(size: size, values: hu)
        // One input channel -> 2 classes: class 1 where the normalised intensity exceeds 0.5.
        struct Threshold: WindowPredictor {
            var inChannels: Int { 1 }
            var outChannels: Int { 2 }
            var sizeMultiple: Int { 8 }
            var preferredBatch: Int { 2 }
            func predict(windows: UnsafePointer<Float>, batch: Int, size: SIMD3<Int>, into: UnsafeMutablePointer<Float>) throws {
                let m = size.x * size.y * size.z
                for b in 0..<batch {
                    for i in 0..<m {
                        into[(2 * b) * m + i] = 0.5
                        into[(2 * b + 1) * m + i] = windows[b * m + i]
                    }
                }
            }
        }
        var config = SegmenterConfiguration(window: SIMD3(8, 16, 16), overlap: 0, blend: .constant,
                                            intensity: .ct(clip: -175...250), skipThreshold: -500)
        let counting = CountingPredictor(Threshold())
        let s = try Segmenter(predictor: counting, configuration: config).segment(volume)
        XCTAssertEqual(s.statistics.windows.windows, 5)
        // Windows at x 0, 8 hold the body, x 24 the stray voxel; x 16 and 32 are air.
        XCTAssertEqual(s.statistics.windows.windowsSkipped, 2)
        XCTAssertEqual(counting.windows, 3)
        XCTAssertEqual(counting.batches, [2, 1], "the configured batch is the predictor's preferred one")
        for i in 0..<n { XCTAssertEqual(s.labels.labels[i], hu[i] > 0 ? 1 : 0, "voxel \(i)") }
        config.largestComponent = true
        let kept = try Segmenter(predictor: Threshold(), configuration: config).segment(volume)
        for i in 0..<n {
            let x = i / plane
            XCTAssertEqual(kept.labels.labels[i], hu[i] > 0 && x < 20 ? 1 : 0, "largest component, voxel \(i)")
        }
    }

    /// Memory is the segmenter's and reused: a second volume (another size) gives what a fresh segmenter
    /// gives; release frees it; a re-entrant call is refused as busy; the network sees windows of the
    /// configured size only.
    func testSegmenterReusesItsMemory() throws {
        var rng = SplitMix64(seed: 98)
        let config = SegmenterConfiguration(window: SIMD3(16, 16, 16), overlap: 0.5, batch: 2, flipTTA: true)
        let counting = CountingPredictor(WindowMeanPredictor(inChannels: 2, sizeMultiple: 16))
        let segmenter = try Segmenter(predictor: counting, configuration: config)
        for size in [SIMD3(20, 18, 9), SIMD3(9, 30, 17), SIMD3(20, 18, 9)] {
            let volume = try Volume(size: size, channels: 2, values: rng.floats(2 * size.x * size.y * size.z), affine: PipelineTests.lps)
            let a = try segmenter.segment(volume, probabilities: true)
            let fresh = try Segmenter(predictor: WindowMeanPredictor(inChannels: 2, sizeMultiple: 16), configuration: config)
                .segment(volume, probabilities: true)
            XCTAssertEqual(a.labels, fresh.labels, "size \(sizeText(size))")
            assertIdentical(a.probabilities!.values(), fresh.probabilities!.values(), "size \(sizeText(size))")
            XCTAssertEqual(a.statistics.networkSize.x % 16, 0)
            XCTAssertGreaterThan(segmenter.retainedBytes, 0)
        }
        XCTAssertEqual(counting.sizes, [[16, 16, 16]])
        // The network-grid probabilities are not kept past the call.
        let v = try Volume(size: SIMD3(20, 18, 9), channels: 2, values: rng.floats(2 * 20 * 18 * 9))
        _ = try segmenter.segment(v)
        let without = segmenter.retainedBytes
        _ = try segmenter.segment(v, probabilities: true)
        XCTAssertEqual(segmenter.retainedBytes, without, "probabilities leave no retained memory behind")
        segmenter.release()
        XCTAssertEqual(segmenter.retainedBytes, 0)

        final class Reentrant: WindowPredictor {
            var segmenter: Segmenter?
            var volume: Volume?
            var error: DeformUXError?
            var inChannels: Int { 1 }
            var outChannels: Int { 1 }
            var sizeMultiple: Int { 1 }
            var preferredBatch: Int { 1 }
            func predict(windows: UnsafePointer<Float>, batch: Int, size: SIMD3<Int>, into: UnsafeMutablePointer<Float>) throws {
                into.update(from: windows, count: batch * size.x * size.y * size.z)
                if let segmenter, let volume, error == nil {
                    do { _ = try segmenter.segment(volume) } catch let e as DeformUXError { error = e }
                }
            }
        }
        let r = Reentrant()
        let s = try Segmenter(predictor: r, configuration: SegmenterConfiguration(window: SIMD3(2, 2, 2)))
        r.segmenter = s
        r.volume = try Volume(size: SIMD3(3, 3, 3), values: [Float](repeating: 1, count: 27))
        _ = try s.segment(r.volume!)
        XCTAssertEqual(r.error?.kind, .busy)
        r.segmenter = nil
    }

    /// Parts split work by index and every voxel's sums run in window order, so the results do not
    /// depend on the number of threads: 1, 2 and 3 threads give the same bits.
    func testResultsDoNotDependOnTheThreadCount() throws {
        let guardCount = ThreadCountGuard()
        defer { guardCount.restore() }
        var rng = SplitMix64(seed: 99)
        let size = SIMD3(23, 14, 9)
        let volume = try Volume(size: size, channels: 2, values: rng.floats(2 * size.x * size.y * size.z, -1, 1),
                                affine: PipelineTests.oblique)
        let config = SegmenterConfiguration(window: SIMD3(8, 8, 4), overlap: 0.5, batch: 3, flipTTA: true,
                                            spacing: PipelineTests.oblique.spacing * 0.8, intensity: .mr(voxels: .all))
        var results: [Segmentation] = []
        for threads in [1, 2, 3] {
            try Threads.setCount(threads)
            results.append(try Segmenter(predictor: WindowMeanPredictor(inChannels: 2), configuration: config)
                .segment(volume, probabilities: true))
        }
        for r in results.dropFirst() {
            XCTAssertEqual(r.labels, results[0].labels)
            assertIdentical(r.probabilities!.values(), results[0].probabilities!.values(), "probabilities vs 1 thread")
        }
    }

    /// Bad volumes and configurations give DeformUXErrors saying what was expected.
    func testBadInputsGiveClearErrors() throws {
        let p = IdentityPredictor(channels: 2, sizeMultiple: 16)
        let good = SegmenterConfiguration(window: SIMD3(16, 16, 16))
        let segmenter = try Segmenter(predictor: p, configuration: good)
        let oneChannel = try Volume(size: SIMD3(4, 4, 4), values: [Float](repeating: 0, count: 64))
        assertThrowsDeformUX(.shapeMismatch, ["2 channels", "got 1"], "channel count") { _ = try segmenter.segment(oneChannel) }
        var values = [Float](repeating: 0, count: 128)
        values[64 + 21] = .nan
        let nan = try Volume(size: SIMD3(4, 4, 4), channels: 2, values: values)
        assertThrowsDeformUX(.invalidArgument, ["non-finite", "channel 1, voxel (1, 1, 1)"], "NaN voxel") { _ = try segmenter.segment(nan) }
        let singular = try Volume(size: SIMD3(4, 4, 4), channels: 2, values: [Float](repeating: 0, count: 128),
                                  affine: try Affine([1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]))
        assertThrowsDeformUX(.invalidArgument, ["singular"], "singular affine") { _ = try segmenter.segment(singular) }
        var noReorient = good
        noReorient.reorient = false
        noReorient.spacing = SIMD3(1, 1, 1)
        assertThrowsDeformUX(.invalidArgument, ["zero-length voxel axis"], "singular affine, resampling without reorientation") {
            _ = try Segmenter(predictor: p, configuration: noReorient).segment(singular)
        }

        var c = good
        c.window = SIMD3(16, 16, 24)
        assertThrowsDeformUX(.invalidArgument, ["multiples of 16", "16x16x24"], "window") { _ = try Segmenter(predictor: p, configuration: c) }
        c = good; c.overlap = 1
        assertThrowsDeformUX(.invalidArgument, ["overlap"], "overlap") { _ = try Segmenter(predictor: p, configuration: c) }
        c = good; c.spacing = SIMD3(1, 0, 1)
        assertThrowsDeformUX(.invalidArgument, ["spacing"], "spacing") { _ = try Segmenter(predictor: p, configuration: c) }
        c = good; c.padMultiple = 0
        assertThrowsDeformUX(.invalidArgument, ["pad multiple"], "pad multiple") { _ = try Segmenter(predictor: p, configuration: c) }
        c = good; c.batch = 0
        assertThrowsDeformUX(.invalidArgument, ["batch"], "batch") { _ = try Segmenter(predictor: p, configuration: c) }
        c = good; c.intensity = IntensityPreset(clip: nil, percentiles: (99, 1), voxels: .all)
        assertThrowsDeformUX(.invalidArgument, ["percentiles"], "percentiles") { _ = try Segmenter(predictor: p, configuration: c) }
        c = good; c.spacing = SIMD3(1e-5, 1, 1)
        let big = try Segmenter(predictor: p, configuration: c)
        let v = try Volume(size: SIMD3(4, 4, 4), channels: 2, values: [Float](repeating: 0, count: 128))
        assertThrowsDeformUX(.invalidArgument, ["too large", "65536"], "huge resampled grid") { _ = try big.segment(v) }

        assertThrowsDeformUX(.invalidArgument, ["12 (3x4) or 16 (4x4)"], "affine entries") { _ = try Affine([1, 2, 3]) }
        assertThrowsDeformUX(.invalidArgument, ["finite"], "affine NaN") { _ = try Affine([Double](repeating: .nan, count: 12)) }
        assertThrowsDeformUX(.shapeMismatch, ["[C, X, Y, Z]"], "volume rank") { _ = try Volume(try Tensor(zeros: [4, 4, 4])) }
        assertThrowsDeformUX(.shapeMismatch, ["64"], "label count") { _ = try LabelMap(size: SIMD3(4, 4, 4), labels: [0]) }
    }
}
