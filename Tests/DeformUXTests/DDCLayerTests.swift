import XCTest
@testable import DeformUX

/// The DDC layer (`DDCLayerOps`, `DeformableDepthwiseConv3d`): offset branch + deformable kernel, both
/// offset modes, against `DDCLayerReference` in Double.
final class DDCLayerTests: XCTestCase {
    /// Random layer inputs; offset weights scaled so offsets are a few voxels.
    struct LayerData {
        let shape: DDCShape
        let x: [Float], weight: [Float], bias: [Float], offsetWeight: [Float], offsetBias: [Float], gradY: [Float]

        init(_ s: DDCShape, seed: UInt64) {
            var rng = SplitMix64(seed: seed)
            shape = s
            x = rng.floats(s.count)
            weight = rng.floats(s.weightCount)
            bias = rng.floats(s.c)
            let scale = 2.5 / Double(s.c).squareRoot()
            offsetWeight = rng.floats(81 * s.c, -scale, scale)
            offsetBias = rng.floats(81, -1.5, 1.5)
            gradY = rng.floats(s.count)
        }

        func d(_ a: [Float]) -> [Double] { a.map(Double.init) }

        func reference(_ mode: OffsetMode, heldAxis: Int? = nil) -> (y: [Double], offsets: [Double],
                                               g: (gradX: [Double], gradWeight: [Double], gradBias: [Double], gradOffsetWeight: [Double], gradOffsetBias: [Double])) {
            let f = DDCLayerReference.forward(x: d(x), weight: d(weight), bias: d(bias), offsetWeight: d(offsetWeight),
                                              offsetBias: d(offsetBias), mode: mode, heldAxis: heldAxis, shape: shape)
            let g = DDCLayerReference.backward(x: d(x), weight: d(weight), offsetWeight: d(offsetWeight),
                                               offsetBias: d(offsetBias), mode: mode, heldAxis: heldAxis, gradY: d(gradY), shape: shape)
            return (f.y, f.offsets, g)
        }

        func fast(_ mode: OffsetMode, layout: Layout = .channelsFirst, heldAxis: Int? = nil,
                  workspace: Workspace = Workspace()) throws -> LayerRun {
            try LayerRun(x: x, weight: weight, bias: bias, offsetWeight: offsetWeight, offsetBias: offsetBias,
                         gradY: gradY, mode: mode, shape: shape, layout: layout, heldAxis: heldAxis, workspace: workspace)
        }
    }

    let threads = ThreadCountGuard()
    override func tearDown() { threads.restore() }

    static let cases: [(String, DDCShape)] = [
        ("1x1x1 C1", ddcShape(1, 1, 1, 1, 1)),
        ("3x4x5 C5 N2", ddcShape(2, 5, 3, 4, 5)),
        ("7x5x3 C17 N2", ddcShape(2, 17, 7, 5, 3)),
        ("2x3x5 C48", ddcShape(1, 48, 2, 3, 5)),
        ("3x1x9 C16", ddcShape(1, 16, 3, 1, 9)),
        // 4275 voxels: the offset branch's 1x1x1 conv splits voxels into 2 parts (2048 per part
        // minimum). Slow in a debug build: run with 2 threads only (see below).
        ("19x15x15 C2", ddcShape(1, 2, 19, 15, 15)),
    ]

    // Float offsets (sgemm) feed Float sampling; grad offset weight sums over up to 4275 voxels.
    static let tol = (atol: 2e-5, rtol: 1e-5), paramTol = (atol: 3e-4, rtol: 1e-5)

    func testLayerOpsMatchReference() throws {
        let (tol, paramTol) = (Self.tol, Self.paramTol)
        let workspace = Workspace()
        for (index, (name, s)) in Self.cases.enumerated() {
            let data = LayerData(s, seed: UInt64(500 + index))
            let xs = [s.n, s.c, s.d, s.h, s.w], os = [s.n, 81, s.d, s.h, s.w]
            for mode in OffsetMode.allCases {
                let ref = data.reference(mode)
                var runs: [LayerRun] = []
                // 1 and 2 threads channels-first, then 2 threads channels-last; the large case 2 threads.
                let large = s.voxels > 4096
                let configs: [(Int, Layout)] = large ? [(2, .channelsFirst)] : [(1, .channelsFirst), (2, .channelsFirst), (2, .channelsLast)]
                for (t, layout) in configs {
                    try Threads.setCount(t)
                    let l = "case '\(name)' [\(s), \(mode), \(layout)], \(t) thread(s)"
                    let r = try data.fast(mode, layout: layout, workspace: workspace)
                    runs.append(r)
                    assertClose(r.offsets, ref.offsets, atol: tol.atol, rtol: tol.rtol, shape: os, "\(l): offsets")
                    assertClose(r.y, ref.y, atol: tol.atol, rtol: tol.rtol, shape: xs, "\(l): y")
                    assertClose(r.gradX, ref.g.gradX, atol: tol.atol, rtol: tol.rtol, shape: xs, "\(l): grad x")
                    assertClose(r.gradWeight, ref.g.gradWeight, atol: paramTol.atol, rtol: paramTol.rtol, "\(l): grad weight")
                    assertClose(r.gradBias, ref.g.gradBias, atol: paramTol.atol, rtol: paramTol.rtol, "\(l): grad bias")
                    assertClose(r.gradOffsetWeight, ref.g.gradOffsetWeight, atol: paramTol.atol, rtol: paramTol.rtol,
                                shape: [81, s.c], "\(l): grad offset weight")
                    assertClose(r.gradOffsetBias, ref.g.gradOffsetBias, atol: paramTol.atol, rtol: paramTol.rtol, "\(l): grad offset bias")
                }
                if large { continue }
                let l = "case '\(name)' [\(s), \(mode)]"
                assertIdentical(runs[1].y, runs[0].y, shape: xs, "\(l): y, 2 threads vs 1")
                assertClose(runs[1].gradOffsetWeight, runs[0].gradOffsetWeight, atol: 1e-4, rtol: 1e-5, "\(l): grad offset weight, 2 threads vs 1")
                assertClose(runs[2].offsets, runs[1].offsets.map(Double.init), atol: 1e-5, rtol: 1e-5, shape: os, "\(l): offsets, channels-last vs channels-first")
            }
        }
    }

    /// The single-plane ablations: offset channels 3t + axis held at zero, nothing flowing back
    /// through them.
    func testHeldAxisMatchesReference() throws {
        let (tol, paramTol) = (Self.tol, Self.paramTol)
        for (index, (name, s)) in [("3x4x5 C5 N2", ddcShape(2, 5, 3, 4, 5)), ("2x3x5 C17", ddcShape(1, 17, 2, 3, 5))].enumerated() {
            let data = LayerData(s, seed: UInt64(550 + index))
            let xs = [s.n, s.c, s.d, s.h, s.w], os = [s.n, 81, s.d, s.h, s.w]
            for mode in OffsetMode.allCases {
                for axis in 0..<3 {
                    let ref = data.reference(mode, heldAxis: axis)
                    let layout: Layout = axis == 1 ? .channelsLast : .channelsFirst
                    let r = try data.fast(mode, layout: layout, heldAxis: axis)
                    let l = "case '\(name)' [\(s), \(mode), \(layout)], held axis \(axis)"
                    assertClose(r.offsets, ref.offsets, atol: tol.atol, rtol: tol.rtol, shape: os, "\(l): offsets")
                    assertClose(r.y, ref.y, atol: tol.atol, rtol: tol.rtol, shape: xs, "\(l): y")
                    assertClose(r.gradX, ref.g.gradX, atol: tol.atol, rtol: tol.rtol, shape: xs, "\(l): grad x")
                    assertClose(r.gradWeight, ref.g.gradWeight, atol: paramTol.atol, rtol: paramTol.rtol, "\(l): grad weight")
                    assertClose(r.gradOffsetWeight, ref.g.gradOffsetWeight, atol: paramTol.atol, rtol: paramTol.rtol, shape: [81, s.c], "\(l): grad offset weight")
                    assertClose(r.gradOffsetBias, ref.g.gradOffsetBias, atol: paramTol.atol, rtol: paramTol.rtol, "\(l): grad offset bias")
                    // The held channels are exactly zero, and their bias gets no gradient in aligned mode.
                    var nonzero = 0
                    for n in 0..<s.n { for t in 0..<27 { for v in 0..<s.voxels where r.offsets[(n * 81 + 3 * t + axis) * s.voxels + v] != 0 { nonzero += 1 } } }
                    XCTAssertEqual(nonzero, 0, "\(l): held offsets not zero")
                    if mode == .aligned {
                        for t in 0..<27 { XCTAssertEqual(r.gradOffsetBias[3 * t + axis], 0, "\(l): grad offset bias of held channel \(3 * t + axis)") }
                    }
                }
            }
        }
    }

    /// The two modes differ only through the mapping: check what `official` reads, by hand.
    func testOfficialModeReadsThePaddedBufferFlat() {
        let s = ddcShape(2, 3, 2, 3, 4)
        let data = LayerData(s, seed: 520)
        let x = data.d(data.x), w = data.d(data.offsetWeight), b = data.d(data.offsetBias)
        let aligned = DDCLayerReference.offsets(x: x, offsetWeight: w, offsetBias: b, mode: .aligned, shape: s)
        let official = DDCLayerReference.offsets(x: x, offsetWeight: w, offsetBias: b, mode: .official, shape: s)
        // P (N x 81 x 4 x 5 x 6): flat index i of the official field is P's flat index i.
        let (dp, hp, wp) = (s.d + 2, s.h + 2, s.w + 2)
        let pv = dp * hp * wp
        var mismatches = 0
        for i in 0..<s.offsetCount {
            let n = i / (81 * pv), o = (i / pv) % 81, r = i % pv
            let (pd, ph, pw) = (r / (hp * wp), (r / wp) % hp, r % wp)
            let inside = pd >= 1 && pd <= s.d && ph >= 1 && ph <= s.h && pw >= 1 && pw <= s.w
            let want = inside ? aligned[(n * 81 + o) * s.voxels + ((pd - 1) * s.h + ph - 1) * s.w + pw - 1] : b[o]
            if official[i] != want { mismatches += 1 }
        }
        XCTAssertEqual(mismatches, 0, "official offsets differ from P read flat at \(mismatches) places")
        // Offsets of voxel 0, channel 0 of sample 0 are P's corner: the bias only.
        XCTAssertEqual(official[0], b[0])
    }

    /// Finite differences of the layer oracle through the offset branch, both modes (Double).
    func testLayerReferenceFiniteDifferences() {
        let h = 1e-6
        let tol = (atol: 1e-6, rtol: 1e-5)
        for (index, (name, s)) in [("2x2x2 C2", ddcShape(1, 2, 2, 2, 2)), ("1x2x3 C1 N2", ddcShape(2, 1, 1, 2, 3))].enumerated() {
            let data = LayerData(s, seed: UInt64(530 + index))
            let x = data.d(data.x), w = data.d(data.weight), b = data.d(data.bias)
            let ow = data.d(data.offsetWeight), ob = data.d(data.offsetBias), gy = data.d(data.gradY)
            for mode in OffsetMode.allCases {
                func loss(_ x: [Double], _ ow: [Double], _ ob: [Double]) -> Double {
                    let y = DDCLayerReference.forward(x: x, weight: w, bias: b, offsetWeight: ow, offsetBias: ob, mode: mode, shape: s).y
                    return zip(y, gy).reduce(0) { $0 + $1.0 * $1.1 }
                }
                let g = DDCLayerReference.backward(x: x, weight: w, offsetWeight: ow, offsetBias: ob, mode: mode, gradY: gy, shape: s)
                let nx = centralDifferences(x, h: h) { loss($0, ow, ob) }
                let now = centralDifferences(ow, h: h) { loss(x, $0, ob) }
                let nob = centralDifferences(ob, h: h) { loss(x, ow, $0) }
                let l = "case '\(name)' [\(s), \(mode)]"
                assertClose(g.gradX, nx, atol: tol.atol, rtol: tol.rtol, "\(l): grad x vs finite differences")
                assertClose(g.gradOffsetWeight, now, atol: tol.atol, rtol: tol.rtol, shape: [81, s.c], "\(l): grad offset weight vs finite differences")
                assertClose(g.gradOffsetBias, nob, atol: tol.atol, rtol: tol.rtol, "\(l): grad offset bias vs finite differences")
            }
        }
    }

    /// The layer class, as the network runs it (channels-last, computing with a runner's context): a
    /// fresh layer (zero offset branch) is a plain depthwise conv; with parameters set it equals the
    /// functional ops; backward adds into the store's gradients.
    func testLayerClass() throws {
        let s = ddcShape(2, 17, 3, 4, 5)
        let data = LayerData(s, seed: 540)
        let xs = [s.n, s.c, s.d, s.h, s.w]
        for mode in OffsetMode.allCases {
            var layout = ParameterLayout()
            let layer = try DeformableDepthwiseConv3d(channels: s.c, offsetMode: mode, prefix: "ddc.", layout: &layout)
            let store = try ParameterStore(layout: layout)
            var rng = SplitMix64(seed: 1)
            layer.initialize(store, rng: &rng)
            let x = try toChannelsLast(try Tensor(shape: xs, values: data.x))
            let w = Array(UnsafeBufferPointer(start: store.value(layer.weight), count: s.weightCount))
            let b = Array(UnsafeBufferPointer(start: store.value(layer.bias), count: s.c))
            let plain = DeformConv3dReferenceTests.depthwiseConv(data.d(data.x), w.map(Double.init), b.map(Double.init), s)
            var ctx = try RunContext.standalone(store: store, gradients: true)
            func run() throws -> [Float] { try toChannelsFirst(try layer.forward(x, ctx)).toArray() }
            // In official mode a zero offset branch still gives zero offsets (P is all zeros).
            assertClose(try run(), plain, atol: 1e-5, rtol: 1e-5, shape: xs, "fresh layer (\(mode)) vs depthwise conv")

            try store.set("ddc.weight", shape: [s.c, 1, 3, 3, 3], values: data.weight)
            try store.set("ddc.bias", shape: [s.c], values: data.bias)
            try store.set("ddc.conv_offset.weight", shape: [81, s.c, 1, 1, 1], values: data.offsetWeight)
            try store.set("ddc.conv_offset.bias", shape: [81], values: data.offsetBias)
            try ctx.refresh(from: store)
            let ops = try data.fast(mode)
            assertIdentical(try run(), ops.y, shape: xs, "layer class (\(mode)) y vs DDCLayerOps")
            store.zeroGradients()
            let gy = try toChannelsLast(try Tensor(shape: xs, values: data.gradY))
            let gx = try Tensor(zeros: x.shape)
            try layer.backward(x, gradY: gy, ctx, gradX: gx)
            let gxOnce = try toChannelsFirst(gx).toArray()
            try layer.backward(x, gradY: gy, ctx, gradX: gx)  // a second step adds
            assertClose(gxOnce, ops.gradX, atol: 1e-5, rtol: 1e-5, shape: xs, "layer class (\(mode)) grad x vs DDCLayerOps")
            assertClose(try toChannelsFirst(gx).toArray(), ops.gradX.map { 2 * $0 }, atol: 2e-5, rtol: 1e-5, shape: xs,
                        "layer class (\(mode)) grad x, two steps")
            func grad(_ name: String) throws -> [Float] { try store.gradientTensor(name).toArray() }
            assertClose(try grad("ddc.weight"), ops.gradWeight.map { 2 * $0 }, atol: 1e-5, rtol: 1e-6, "layer class (\(mode)) grad weight, two steps")
            assertClose(try grad("ddc.bias"), ops.gradBias.map { 2 * $0 }, atol: 1e-5, rtol: 1e-6, "layer class (\(mode)) grad bias, two steps")
            assertClose(try grad("ddc.conv_offset.weight"), ops.gradOffsetWeight.map { 2 * $0 }, atol: 1e-5, rtol: 1e-6, "layer class (\(mode)) grad offset weight, two steps")
            assertClose(try grad("ddc.conv_offset.bias"), ops.gradOffsetBias.map { 2 * $0 }, atol: 1e-5, rtol: 1e-6, "layer class (\(mode)) grad offset bias, two steps")
            ctx = try RunContext.standalone(store: store)
        }
        // Validation names the layer and the argument.
        var layout = ParameterLayout()
        let layer = try DeformableDepthwiseConv3d(channels: 4, layout: &layout)
        let store = try ParameterStore(layout: layout)
        let ctx = try RunContext.standalone(store: store, gradients: true)
        for bad in [[1, 2, 2, 2, 3], [4, 2, 2, 2]] {
            XCTAssertThrowsError(try layer.forward(Tensor(zeros: bad), ctx)) { e in
                XCTAssertTrue((e as? DeformUXError)?.description.contains("DDC layer") == true, "x \(bad): \(e)")
            }
        }
        XCTAssertThrowsError(try layer.backward(Tensor(zeros: [1, 2, 2, 2, 4]), gradY: Tensor(zeros: [1, 2, 2, 3, 4]), ctx,
                                                gradX: nil)) { e in
            XCTAssertTrue((e as? DeformUXError)?.description.contains("grad_output") == true, "\(e)")
        }
        XCTAssertThrowsError(try DeformableDepthwiseConv3d(channels: 0, layout: &layout))
    }
}
