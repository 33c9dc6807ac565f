import Foundation
import XCTest
@testable import DeformUX

/// The pipeline against MONAI, numpy, nibabel and torch: fixtures in Tests/Fixtures/pipeline, written
/// by tools/make_pipeline_fixtures.py (see there for what each file holds).
final class PipelineFixtureTests: XCTestCase {
    /// Window positions: MONAI's padding, scan interval, starts per axis and the window order.
    func testWindowPositionsMatchMONAI() throws {
        let cases = try PipelineFixture.cases("windows.json")
        XCTAssertGreaterThan(cases.count, 50)
        for c in cases {
            let image = c.size("image"), window = c.size("window"), overlap = c.double("overlap")
            let label = "image \(sizeText(image)) window \(sizeText(window)) overlap \(overlap)"
            let plan = try SlidingWindowPlan(imageSize: image, window: window, overlap: overlap)
            XCTAssertEqual(plan.padBefore, c.size("pad_before"), label)
            XCTAssertEqual(plan.interval, c.size("interval"), label)
            let axis = (c["axis_starts"] as? [[Any]])?.map { $0.compactMap { ($0 as? NSNumber)?.intValue } } ?? []
            XCTAssertEqual(plan.starts, axis, label)
            XCTAssertEqual(plan.count, c.int("count"), label)
            if let order = c["starts"] as? [[Any]] {
                let want = order.map { $0.compactMap { ($0 as? NSNumber)?.intValue } }
                let got = (0..<plan.count).map { i -> [Int] in let s = plan.start(i); return [s.x, s.y, s.z] }
                XCTAssertEqual(got, want, "\(label): window order")
            }
        }
    }

    /// compute_importance_map: torch evaluates exp in float32 (SLEEF, within 1 ulp); we round the
    /// double exp, so values agree within 2 ulp (rtol 3e-7); the clamp at 1e-3 is exact.
    func testImportanceMapMatchesMONAI() throws {
        for c in try PipelineFixture.cases("importance.json") {
            let size = c.size("size")
            let mode: BlendMode = c.string("mode") == "constant" ? .constant : .gaussian(sigmaScale: c.double("sigma_scale"))
            let got = try ImportanceMap.make(window: size, mode: mode)
            assertClose(got, c.floats("values"), atol: 0, rtol: 3e-7, shape: [size.x, size.y, size.z],
                        "importance \(sizeText(size)) \(mode)")
        }
    }

    /// sliding_window_inference with a window-mean stand-in: our streaming blend and the naive
    /// reference both match MONAI. Tolerance atol 1e-6 (values within -2..2; measured 1.2e-7, 1 ulp):
    /// the stand-in's window mean is summed differently (torch: float32 cascade; here Double), and the
    /// importance map agrees within 2 ulp.
    func testBlendMatchesMONAI() throws {
        for c in try PipelineFixture.cases("blend.json") {
            let shape = c.ints("shape")
            let size = SIMD3(shape[1], shape[2], shape[3])
            let mode: BlendMode = c.string("mode") == "constant" ? .constant : .gaussian()
            let options = SlidingWindowOptions(window: c.size("window"), overlap: c.double("overlap"), blend: mode,
                                               batch: c.int("batch"))
            let label = "shape \(shape) window \(sizeText(options.window)) overlap \(options.overlap) \(mode) batch \(options.batch)"
            let predictor = WindowMeanPredictor(inChannels: shape[0])
            let input = c.floats("input"), want = c.floats("output")
            let streaming = try runStreaming(predictor, input, size, options)
            assertClose(streaming.logits, want, atol: 1e-6, rtol: 0, shape: shape, "streaming vs MONAI, \(label)")
            let reference = try SlidingWindowReference.blend(predictor, input: input, size: size, options: options)
            assertClose(reference.logits, want, atol: 1e-6, rtol: 0, shape: shape, "reference vs MONAI, \(label)")
        }
    }

    /// numpy.percentile (linear) of float32 arrays, to the bit, over all voxels and over non-zero ones
    /// (the latter also through IntensityNormalization's .nonzero preset at q = 1 and 99).
    func testPercentilesMatchNumpy() throws {
        for c in try PipelineFixture.cases("percentile.json") {
            let name = c.string("name")
            let values = c.floats("values"), qs = c.doubles("q")
            var copy = values
            let got = try copy.withUnsafeMutableBufferPointer { try Percentile.compute($0, qs) }
            assertIdentical(got, c.floats("all"), "percentile \(name) over all values, q \(qs)")
            for (i, q) in qs.enumerated() {
                XCTAssertEqual(try Percentile.of(values, q), c.floats("all")[i], "percentile \(name) q \(q) alone")
            }
            if c["nonzero"] is [Any] {
                var nz = values.filter { $0 != 0 }
                let gotNZ = try nz.withUnsafeMutableBufferPointer { try Percentile.compute($0, qs) }
                assertIdentical(gotNZ, c.floats("nonzero"), "percentile \(name) over non-zero values")
                let volume = try Volume(size: SIMD3(values.count, 1, 1), values: values)
                let norm = try IntensityNormalization(preset: .mr(voxels: .nonzero), measuring: volume)
                let i1 = qs.firstIndex(of: 1)!, i99 = qs.firstIndex(of: 99)!
                XCTAssertEqual(norm.lower, [c.floats("nonzero")[i1]], "\(name): P1 of the non-zero voxels")
                XCTAssertEqual(norm.upper, [c.floats("nonzero")[i99]], "\(name): P99 of the non-zero voxels")
            }
        }
    }

    /// nibabel: io_orientation, and as_closest_canonical's shape, affine (to 1e-9 mm) and data (exact).
    func testReorientationMatchesNibabel() throws {
        for c in try PipelineFixture.cases("orientation.json") {
            let name = c.string("name")
            let affine = try Affine(c.doubles("affine"))
            let size = c.size("shape")
            let ornt = (c["ornt"] as? [[Any]])?.map { $0.compactMap { ($0 as? NSNumber)?.intValue } } ?? []
            let r = try Reorientation(affine: affine, size: size)
            XCTAssertEqual(r.axes, ornt.map { $0[0] }, "\(name): axes")
            XCTAssertEqual(r.flips, ornt.map { $0[1] == -1 }, "\(name): flips")
            XCTAssertEqual(r.canonicalSize, c.size("canonical_shape"), "\(name): canonical shape")
            let want = try Affine(c.doubles("canonical_affine"))
            XCTAssertLessThan(r.canonicalAffine.maxAbsDifference(want), 1e-9, "\(name): canonical affine \(r.canonicalAffine) vs \(want)")
            let n = size.x * size.y * size.z
            let volume = try Volume(size: size, values: (0..<n).map { Float($0) }, affine: affine)
            let canonical = try r.apply(volume)
            assertIdentical(canonical.values(), c.floats("canonical_data"), "\(name): canonical data")
            XCTAssertEqual(canonical.affine, r.canonicalAffine)
            // and back, exactly
            let back = try r.invert(canonical)
            assertIdentical(back.values(), volume.values(), "\(name): inverse")
            XCTAssertEqual(back.affine, affine)
        }
    }

    /// torch interpolate: trilinear (align_corners=False) within 2e-6 (values in -5..5, where 1 ulp is
    /// 4.8e-7; measured 1 ulp: torch sums the 8 corners in another order), nearest-exact exactly.
    func testResamplingMatchesTorch() throws {
        for c in try PipelineFixture.cases("resample.json") {
            let from = c.size("from"), to = c.size("to")
            let label = "\(sizeText(from)) -> \(sizeText(to))"
            let r = try Resampling(size: from, affine: .identity, outputSize: to)
            let image = try r.apply(try Volume(size: from, values: c.floats("input")))
            assertClose(image.values(), c.floats("trilinear"), atol: 2e-6, rtol: 0, shape: [to.x, to.y, to.z], "trilinear \(label)")
            let labels = try LabelMap(size: from, labels: c.floats("labels").map { UInt8($0) })
            let near = try r.apply(labels)
            XCTAssertEqual(near.labels, c.floats("nearest").map { UInt8($0) }, "nearest-exact \(label)")
        }
    }
}
