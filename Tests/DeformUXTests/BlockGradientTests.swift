import Foundation
import XCTest
@testable import DeformUX

/// Finite-difference checks of every block's backward (issue 7, STYLE.md habit 9): the engine's
/// `forwardSaving` + `backward` (Float, channels-last, through `RunContext.standalone` with the forms
/// the network uses) against central differences of sum(out * gradOut), where out is the block's Double
/// reference (BlockReference.swift, composed from Kernels/Reference), for every parameter tensor and
/// every input: every entry of tensors of up to 8 entries, a seeded sample of 6 entries (the encoder: 4)
/// of larger ones. Tiny, odd, non-cubic shapes; channel counts that are not multiples of 16 (and one
/// past 16); batches of 1 and 2.
///
/// Deformable offsets are kept away from integers (offset bias +-U(0.4, 0.6), offset weights
/// U(+-0.05/sqrt(fan-in))): trilinear sampling has kinks at integer positions, where a difference
/// quotient straddles two slopes. Each deformable case (and each deformable block inside the encoder)
/// asserts that its offsets are at least 0.05 from an integer before anything is compared.
///
/// Tolerance (`tolerance`): |engine - difference| <= 1e-4 (S + |difference|) per entry, S the largest
/// |difference| among the tensor's checked entries. The differences (h = 1e-6, Double) are far more
/// accurate than that; what is left is the engine's float32 rounding: measured at most 8e-7 for the
/// single blocks and 5e-6 through the encoder (each case prints its worst). Each case also checks the
/// forward against the reference (1e-5 of max |out|), the inference forward against the saving one,
/// and that backward accumulates: a second backward without zeroing gives twice every gradient
/// (parameters and inputs, 1e-6).
final class BlockGradientTests: XCTestCase {
    static let tolerance = 1e-4
    static let step = 1e-6

    // MARK: The engine's side

    /// Fills the store with seeded values (Float, so that the engine and the reference see the same
    /// numbers) chosen by name: offset branches near +-0.5 voxel, gamma U(0.25, 0.75), LayerNorm
    /// weights U(0.5, 1.5), other 1-D parameters (biases, LN biases) U(+-0.3), weights U(+-sqrt(3 /
    /// fan-in)) (unit-variance activations). Returns them in Double.
    static func drawParameters(_ store: ParameterStore, seed: UInt64) -> Values {
        var rng = SplitMix64(seed: seed)
        var values: Values = [:]
        for e in store.layout.entries {
            let draw: () -> Double
            if e.name.hasSuffix("conv_offset.bias") {
                draw = { rng.uniform(0.4, 0.6) * (rng.bool() ? 1 : -1) }
            } else if e.name.hasSuffix("conv_offset.weight") {
                let b = 0.05 / Double(e.count / DDCShape.offsetChannels).squareRoot()
                draw = { rng.uniform(-b, b) }
            } else if e.name.hasSuffix("gamma") {
                draw = { rng.uniform(0.25, 0.75) }
            } else if e.shape.count == 1 && e.name.hasSuffix("weight") {
                draw = { rng.uniform(0.5, 1.5) }
            } else if e.shape.count == 1 {
                draw = { rng.uniform(-0.3, 0.3) }
            } else {
                let b = (3 / Double(e.count / e.shape[0])).squareRoot()
                draw = { rng.uniform(-b, b) }
            }
            let f = (0..<e.count).map { _ in Float(draw()) }
            (store.values + e.offset).update(from: f, count: e.count)
            values[e.name] = f.map(Double.init)
        }
        return values
    }

    /// The engine's gradients: `body` runs the block's forwardSaving and backward once on a context
    /// over `store` (with `forms`), adding the inputs' gradients into the tensors it is given (zeros,
    /// shaped as `inputShapes`), and returns the forward's output. Runs it twice without zeroing and
    /// checks that the second run doubled every gradient (backward adds, STYLE.md habit 2). Returns the
    /// first output and the first run's gradients (parameters by name, inputs by their names).
    static func engineGradients(_ label: String, store: ParameterStore, forms: [WeightSnapshot.Form],
                                inputShapes: [String: [Int]],
                                _ body: (RunContext, [String: Tensor]) throws -> [Float]) throws -> (out: [Float], grads: Values) {
        store.zeroGradients()
        let ctx = try RunContext.standalone(store: store, forms: forms, gradients: true)
        var inputGrads: [String: Tensor] = [:]
        for (name, shape) in inputShapes { inputGrads[name] = try Tensor(zeros: shape) }
        func snapshot() throws -> Values {
            var g: Values = [:]
            for e in store.layout.entries {
                g[e.name] = UnsafeBufferPointer(start: store.gradients + e.offset, count: e.count).map(Double.init)
            }
            for (name, t) in inputGrads { g[name] = try t.toArray().map(Double.init) }
            return g
        }
        let out = try body(ctx, inputGrads)
        let first = try snapshot()
        _ = try body(ctx, inputGrads)
        let second = try snapshot()
        for (name, g1) in first {
            let scale = g1.reduce(0) { max($0, abs($1)) }
            assertClose(second[name] ?? [], g1.map { 2 * $0 }, atol: 1e-6 * scale, rtol: 1e-6,
                        "\(label): a second backward should add the same gradient again (\(name))")
        }
        return (out, first)
    }

    /// A parameter layout with one form per entry (copies unless a layer asks for packing).
    static func copyForms(_ layout: ParameterLayout) -> [WeightSnapshot.Form] {
        [WeightSnapshot.Form](repeating: .copy, count: layout.entries.count)
    }

    static func tensor(_ values: [Double], _ shape: [Int]) throws -> Tensor {
        try Tensor(shape: shape, values: values.map(Float.init))
    }

    static func dot(_ a: [Double], _ b: [Double]) -> Double { zip(a, b).reduce(0) { $0 + $1.0 * $1.1 } }

    // MARK: The comparison

    /// `count` distinct indices of 0..<n from `rng` (all of them when n <= count).
    static func sample(_ n: Int, _ count: Int, _ rng: inout SplitMix64) -> [Int] {
        if n <= count + 2 { return Array(0..<n) }
        var picked = Set<Int>()
        while picked.count < count { picked.insert(rng.int(0...(n - 1))) }
        return picked.sorted()
    }

    /// Compares the engine's gradients (every name in `engine`) with central differences of
    /// `objective` at all or a sample of entries. `cached`: cheaper objectives that give the same
    /// value for the names they list (they reuse a part of the forward those names do not affect).
    /// Returns the worst |engine - difference| / (S + |difference|) over all checked entries.
    @discardableResult
    static func compareWithDifferences(_ label: String, engine: Values, values: Values, shapes: [String: [Int]],
                                       objective: @escaping (Values) -> Double,
                                       cached: [(names: Set<String>, objective: (Values) -> Double)] = [],
                                       samples: Int = 6, seed: UInt64 = 1,
                                       file: StaticString = #filePath, line: UInt = #line) -> Double {
        var rng = SplitMix64(seed: seed)
        var worst = (ratio: 0.0, name: "")
        for name in engine.keys.sorted() {
            guard let g = engine[name], let x = values[name], g.count == x.count else {
                XCTFail("\(label): \(name) has no values or a gradient of another size", file: file, line: line)
                continue
            }
            let indices = sample(x.count, samples, &rng)
            let f = cached.first { $0.names.contains(name) }?.objective ?? objective
            let want = centralDifferences(x, at: indices, h: step) { v in
                var changed = values
                changed[name] = v
                return f(changed)
            }
            let got = indices.map { g[$0] }
            let scale = max(want.reduce(0) { max($0, abs($1)) }, 1e-12)
            var firstBad: Int?
            for (k, (a, b)) in zip(got, want).enumerated() {
                let ratio = Swift.abs(a - b) / (scale + Swift.abs(b))
                if ratio > worst.ratio { worst = (ratio, name) }
                if firstBad == nil, !(ratio <= tolerance) { firstBad = k }
            }
            let at = firstBad.map { " (first mismatch at entry \(indices[$0]) = \(multiIndex(indices[$0], shapes[name] ?? [x.count])))" } ?? ""
            assertClose(got, want, atol: tolerance * scale, rtol: tolerance,
                        "\(label): d/d \(name), \(indices.count) of \(x.count) entries\(at)", file: file, line: line)
        }
        print("\(label): worst |engine - difference| / (S + |difference|) \(String(format: "%.1e", worst.ratio)) (\(worst.name))")
        return worst.ratio
    }

    /// The forward's output against the reference's (1e-5 of max |reference|).
    static func checkForward(_ label: String, _ got: [Float], _ want: [Double], shape: [Int],
                             file: StaticString = #filePath, line: UInt = #line) {
        let scale = want.reduce(0) { max($0, abs($1)) }
        assertClose(got, want, atol: 1e-5 * scale, rtol: 1e-5, shape: shape, "\(label): forward", file: file, line: line)
    }

    /// Fails unless every offset `offsets` holds (held channels of `heldAxis` aside) is at least `margin`
    /// from an integer, so that no sampling position sits near a kink of the trilinear sampling.
    static func assertOffsetsAwayFromIntegers(_ label: String, _ offsets: [Double], voxels: Int, heldAxis: Int?,
                                              margin: Double = 0.05, file: StaticString = #filePath, line: UInt = #line) {
        var closest = 1.0
        for (i, o) in offsets.enumerated() where heldAxis == nil || (i / voxels) % 81 % 3 != heldAxis {
            closest = min(closest, abs(o - o.rounded()))
        }
        XCTAssertGreaterThan(closest, margin, "\(label): an offset is \(closest) from an integer", file: file, line: line)
    }

    // MARK: ResBlock and UpBlock

    /// ResBlock(c1 + c2 -> cout) on [x, x2] (x2 when c2 > 0, the UpBlock's skip).
    func checkResBlock(_ label: String, n: Int, d: Int, h: Int, w: Int, c1: Int, c2: Int = 0, cout: Int, seed: UInt64) throws {
        var layout = ParameterLayout()
        let block = try ResBlock("b.", cin: c1 + c2, cout: cout, layout: &layout)
        var forms = Self.copyForms(layout)
        block.forms(&forms)
        let store = try ParameterStore(layout: layout)
        var values = Self.drawParameters(store, seed: seed)
        var rng = SplitMix64(seed: seed &+ 1)
        let v = Volume5(n: n, d: d, h: h, w: w, c: c1)
        let xs = [n, d, h, w, c1], x2s = [n, d, h, w, c2], os = [n, d, h, w, cout]
        values["x"] = rng.floats(v.count).map(Double.init)
        if c2 > 0 { values["x2"] = rng.floats(n * v.voxels * c2).map(Double.init) }
        let gOut = rng.floats(n * v.voxels * cout).map(Double.init)
        var inputShapes = ["x": xs]
        if c2 > 0 { inputShapes["x2"] = x2s }
        let (out, grads) = try Self.engineGradients(label, store: store, forms: forms, inputShapes: inputShapes) { ctx, g in
            let x = try Self.tensor(values.get("x"), xs)
            let x2 = c2 > 0 ? try Self.tensor(values.get("x2"), x2s) : nil
            let (out, saved) = try block.forwardSaving(x, x2, ctx)
            let inference = try block.forward(x, x2, ctx).toArray()
            XCTAssertEqual(inference, try out.toArray(), "\(label): forward and forwardSaving differ")
            let result = try out.toArray()
            try block.backward(try Self.tensor(gOut, os), saved, ctx, gradX: g["x"], gradX2: g["x2"])
            return result
        }
        let reference = { (p: Values) in
            BlockReference.resBlock(p.get("x"), c2 > 0 ? p.get("x2") : nil, c2: c2, v, cout: cout, p, "b.")
        }
        Self.checkForward(label, out, reference(values), shape: os)
        Self.compareWithDifferences(label, engine: grads, values: values,
                                    shapes: Dictionary(uniqueKeysWithValues: layout.entries.map { ($0.name, $0.shape) }).merging(inputShapes) { a, _ in a },
                                    objective: { Self.dot(reference($0), gOut) }, seed: seed)
    }

    func testResBlockIdentityResidual() throws {
        try checkResBlock("ResBlock 6->6 (identity residual) N2 3x4x5", n: 2, d: 3, h: 4, w: 5, c1: 6, cout: 6, seed: 10)
    }

    func testResBlockIdentityResidualPastSIMDWidth() throws {
        try checkResBlock("ResBlock 17->17 N1 2x3x3", n: 1, d: 2, h: 3, w: 3, c1: 17, cout: 17, seed: 11)
    }

    func testResBlockWithConv3() throws {
        try checkResBlock("ResBlock 5->7 (conv3 residual) N1 5x3x4", n: 1, d: 5, h: 3, w: 4, c1: 5, cout: 7, seed: 12)
    }

    func testResBlockWithTwoSources() throws {
        try checkResBlock("ResBlock [3 + 4]->5 (two sources) N2 3x3x5", n: 2, d: 3, h: 3, w: 5, c1: 3, c2: 4, cout: 5, seed: 13)
    }

    /// UpBlock(cin -> cout): x at half resolution (n x d x h x w x cin), skip at full (cout channels).
    func checkUpBlock(_ label: String, n: Int, d: Int, h: Int, w: Int, cin: Int, cout: Int, seed: UInt64) throws {
        var layout = ParameterLayout()
        let block = try UpBlock("u.", cin: cin, cout: cout, layout: &layout)
        var forms = Self.copyForms(layout)
        block.forms(&forms)
        let store = try ParameterStore(layout: layout)
        var values = Self.drawParameters(store, seed: seed)
        var rng = SplitMix64(seed: seed &+ 1)
        let v = Volume5(n: n, d: d, h: h, w: w, c: cin)
        let xs = [n, d, h, w, cin], ss = [n, 2 * d, 2 * h, 2 * w, cout]
        values["x"] = rng.floats(v.count).map(Double.init)
        values["skip"] = rng.floats(ss.reduce(1, *)).map(Double.init)
        let gOut = rng.floats(ss.reduce(1, *)).map(Double.init)
        let inputShapes = ["x": xs, "skip": ss]
        let (out, grads) = try Self.engineGradients(label, store: store, forms: forms, inputShapes: inputShapes) { ctx, g in
            let x = try Self.tensor(values.get("x"), xs), skip = try Self.tensor(values.get("skip"), ss)
            let (out, saved) = try block.forwardSaving(x, skip: skip, ctx)
            XCTAssertEqual(try block.forward(x, skip: skip, ctx).toArray(), try out.toArray(), "\(label): forward and forwardSaving differ")
            let result = try out.toArray()
            guard let gx = g["x"], let gs = g["skip"] else { throw DeformUXError.internal("test", "no input gradients") }
            try block.backward(try Self.tensor(gOut, ss), saved, ctx, gradX: gx, gradSkip: gs)
            return result
        }
        let reference = { (p: Values) in BlockReference.upBlock(p.get("x"), v, skip: p.get("skip"), cout: cout, p, "u.") }
        Self.checkForward(label, out, reference(values), shape: ss)
        Self.compareWithDifferences(label, engine: grads, values: values,
                                    shapes: Dictionary(uniqueKeysWithValues: layout.entries.map { ($0.name, $0.shape) }).merging(inputShapes) { a, _ in a },
                                    objective: { Self.dot(reference($0), gOut) }, seed: seed)
    }

    func testUpBlock() throws {
        try checkUpBlock("UpBlock 6->4 N2 2x1x2 -> 4x2x4", n: 2, d: 2, h: 1, w: 2, cin: 6, cout: 4, seed: 20)
        try checkUpBlock("UpBlock 3->5 N1 1x2x2 -> 2x4x4", n: 1, d: 1, h: 2, w: 2, cin: 3, cout: 5, seed: 21)
    }

    // MARK: Encoder blocks

    /// EncoderBlock with channels `c` under `config`'s block, MLP, offset options.
    func checkEncoderBlock(_ label: String, _ config: DeformUXNetConfig, n: Int, d: Int, h: Int, w: Int, c: Int,
                           seed: UInt64) throws {
        var layout = ParameterLayout()
        let prefix = "s."
        let block = try EncoderBlock(prefix, channels: c, config: config, index: 0, layout: &layout)
        var forms = Self.copyForms(layout)
        block.forms(&forms)
        let store = try ParameterStore(layout: layout)
        var values = Self.drawParameters(store, seed: seed)
        var rng = SplitMix64(seed: seed &+ 1)
        let v = Volume5(n: n, d: d, h: h, w: w, c: c)
        let xs = v.shape
        values["x"] = rng.floats(v.count).map(Double.init)
        let gOut = rng.floats(v.count).map(Double.init)
        if config.block == .deformux {
            Self.assertOffsetsAwayFromIntegers(label, BlockReference.offsets(values.get("x"), v, config, values, prefix + "ddc."),
                                               voxels: v.voxels, heldAxis: BlockReference.heldAxis(config.offsetPlanes))
        }
        let (out, grads) = try Self.engineGradients(label, store: store, forms: forms, inputShapes: ["x": xs]) { ctx, g in
            let x = try Self.tensor(values.get("x"), xs)
            let (out, saved) = try block.forwardSaving(x, ctx)
            let result = try out.toArray()
            let inference = try block.forward(x, ctx).toArray()
            assertClose(inference, result, atol: 1e-6, rtol: 1e-6, shape: xs, "\(label): forward and forwardSaving")
            guard let gx = g["x"] else { throw DeformUXError.internal("test", "no input gradient") }
            try block.backward(try Self.tensor(gOut, xs), saved, ctx, gradX: gx)
            return result
        }
        let reference = { (p: Values) in BlockReference.encoderBlock(p.get("x"), v, config, p, prefix) }
        Self.checkForward(label, out, reference(values), shape: xs)
        // Parameters after the spatial conv reuse its output.
        let y = BlockReference.spatial(values.get("x"), v, config, values, prefix)
        let spatialNames = Set(layout.entries.map(\.name).filter { $0.contains(".ddc.") || $0.contains(".dwconv.") } + ["x"])
        let tailNames = Set(layout.entries.map(\.name)).subtracting(spatialNames)
        Self.compareWithDifferences(label, engine: grads, values: values,
                                    shapes: Dictionary(uniqueKeysWithValues: layout.entries.map { ($0.name, $0.shape) }).merging(["x": xs]) { a, _ in a },
                                    objective: { Self.dot(reference($0), gOut) },
                                    cached: [(tailNames, { p in Self.dot(BlockReference.blockTail(p.get("x"), y: y, v, config, p, prefix), gOut) })],
                                    seed: seed)
    }

    static func deformux(_ mlp: DeformUXNetConfig.MLP, _ mode: OffsetMode = .aligned, offsetKernel: Int = 1,
                         planes: DeformUXNetConfig.OffsetPlanes = .all, standard: Bool = false) -> DeformUXNetConfig {
        DeformUXNetConfig(block: .deformux, mlp: mlp, offsetMode: mode, offsetKernel: offsetKernel, offsetPlanes: planes,
                          deformable: standard ? .standard : .depthwise)
    }

    static func uxnet(_ k: Int, _ mlp: DeformUXNetConfig.MLP = .grouped) -> DeformUXNetConfig {
        DeformUXNetConfig(block: .uxnet, mlp: mlp, kernelSize: k)
    }

    func testEncoderBlockDenseAligned() throws {
        try checkEncoderBlock("DeformUX block, dense MLP, aligned, C5 N1 3x4x3", Self.deformux(.dense), n: 1, d: 3, h: 4, w: 3, c: 5, seed: 30)
    }

    func testEncoderBlockPastSIMDWidth() throws {
        try checkEncoderBlock("DeformUX block, dense MLP, aligned, C17 N1 2x3x2", Self.deformux(.dense), n: 1, d: 2, h: 3, w: 2, c: 17, seed: 31)
    }

    func testEncoderBlockGroupedAligned() throws {
        try checkEncoderBlock("DeformUX block, grouped MLP, aligned, C6 N1 3x3x4", Self.deformux(.grouped), n: 1, d: 3, h: 3, w: 4, c: 6, seed: 32)
    }

    /// N = 2: the official mode's flat read of the padded offset buffer crosses the sample boundary.
    func testEncoderBlockGroupedOfficialTwoSamples() throws {
        try checkEncoderBlock("DeformUX block, grouped MLP, official, C4 N2 3x2x3", Self.deformux(.grouped, .official),
                              n: 2, d: 3, h: 2, w: 3, c: 4, seed: 33)
    }

    func testEncoderBlockDenseOfficial() throws {
        try checkEncoderBlock("DeformUX block, dense MLP, official, C5 N1 3x4x3", Self.deformux(.dense, .official),
                              n: 1, d: 3, h: 4, w: 3, c: 5, seed: 34)
    }

    func testEncoderBlockNoMLP() throws {
        try checkEncoderBlock("DeformUX block, no MLP, aligned, C5 N1 4x3x3", Self.deformux(.none), n: 1, d: 4, h: 3, w: 3, c: 5, seed: 35)
    }

    func testEncoderBlockOffsetKernel3() throws {
        try checkEncoderBlock("DeformUX block, 3x3x3 offset branch, C4 N1 3x4x3", Self.deformux(.dense, offsetKernel: 3),
                              n: 1, d: 3, h: 4, w: 3, c: 4, seed: 36)
    }

    func testEncoderBlockPlanes() throws {
        try checkEncoderBlock("DeformUX block, xy plane (W held), C4 N1 3x3x4", Self.deformux(.dense, planes: .xy),
                              n: 1, d: 3, h: 3, w: 4, c: 4, seed: 37)
        try checkEncoderBlock("DeformUX block, xz plane (H held), official, C4 N2 3x2x3",
                              Self.deformux(.grouped, .official, planes: .xz), n: 2, d: 3, h: 2, w: 3, c: 4, seed: 38)
        try checkEncoderBlock("DeformUX block, yz plane (D held), C4 N1 4x3x3", Self.deformux(.dense, planes: .yz),
                              n: 1, d: 4, h: 3, w: 3, c: 4, seed: 39)
    }

    func testEncoderBlockStandardDeformable() throws {
        try checkEncoderBlock("DeformUX block, standard deformable conv, C3 N1 3x3x3", Self.deformux(.dense, standard: true),
                              n: 1, d: 3, h: 3, w: 3, c: 3, seed: 40)
    }

    func testEncoderBlockUXNet() throws {
        try checkEncoderBlock("UX-Net block, dwconv k3, grouped MLP, C5 N2 3x4x5", Self.uxnet(3), n: 2, d: 3, h: 4, w: 5, c: 5, seed: 41)
        try checkEncoderBlock("UX-Net block, dwconv k5, grouped MLP, C4 N1 5x4x3", Self.uxnet(5), n: 1, d: 5, h: 4, w: 3, c: 4, seed: 42)
        // A kernel larger than the volume: most taps read the padding.
        try checkEncoderBlock("UX-Net block, dwconv k7, dense MLP, C3 N1 3x5x4", Self.uxnet(7, .dense), n: 1, d: 3, h: 5, w: 4, c: 3, seed: 43)
    }

    // MARK: Encoder, head and single layers

    /// The encoder: stem (k7 s2 conv + LN), stages with LN + k2 s2 downsampling and blocks, out norms;
    /// the objective sums every skip against its own gradient.
    func checkEncoder(_ label: String, _ config: DeformUXNetConfig, n: Int, d: Int, h: Int, w: Int, seed: UInt64) throws {
        var layout = ParameterLayout()
        let encoder = try Encoder(config: config, layout: &layout)
        var forms = Self.copyForms(layout)
        encoder.forms(&forms)
        let store = try ParameterStore(layout: layout)
        var values = Self.drawParameters(store, seed: seed)
        var rng = SplitMix64(seed: seed &+ 1)
        let v = Volume5(n: n, d: d, h: h, w: w, c: config.inChannels)
        let xs = v.shape
        values["x"] = rng.floats(v.count).map(Double.init)
        let skipsWant = BlockReference.encoder(values.get("x"), v, config, values) { h, vh, prefix in
            guard config.block == .deformux else { return }
            Self.assertOffsetsAwayFromIntegers("\(label), \(prefix)", BlockReference.offsets(h, vh, config, values, prefix + "ddc."),
                                               voxels: vh.voxels, heldAxis: BlockReference.heldAxis(config.offsetPlanes))
        }
        let gSkips = skipsWant.map { s in rng.floats(s.count).map(Double.init) }
        var skipShapes: [[Int]] = []
        let (out, grads) = try Self.engineGradients(label, store: store, forms: forms, inputShapes: ["x": xs]) { ctx, g in
            let (skips, saved) = try encoder.forwardSaving(try Self.tensor(values.get("x"), xs), ctx)
            skipShapes = skips.map(\.shape)
            let result = try skips.flatMap { try $0.toArray() }
            let inference = try encoder.forward(try Self.tensor(values.get("x"), xs), ctx).flatMap { try $0.toArray() }
            assertClose(inference, result, atol: 1e-6, rtol: 1e-6, "\(label): forward and forwardSaving")
            try encoder.backward(try zip(gSkips, skips).map { try Self.tensor($0, $1.shape) }, saved, ctx, gradInput: g["x"])
            return result
        }
        XCTAssertEqual(skipShapes.map { $0.reduce(1, *) }, skipsWant.map(\.count), "\(label): skip sizes")
        Self.checkForward(label, out, skipsWant.flatMap { $0 }, shape: [out.count])
        let objective = { (p: Values, stem: ([Double], Volume5)?) -> Double in
            zip(BlockReference.encoder(p.get("x"), v, config, p, fromStem: stem), gSkips).reduce(0) { $0 + Self.dot($1.0, $1.1) }
        }
        // Everything after the stem conv reuses its output.
        let stem = BlockReference.stem(values.get("x"), v, config, values)
        let stemNames: Set<String> = ["x", config.encoderPrefix + "downsample_layers.0.0.weight", config.encoderPrefix + "downsample_layers.0.0.bias"]
        let later = Set(layout.entries.map(\.name)).subtracting(stemNames)
        Self.compareWithDifferences(label, engine: grads, values: values,
                                    shapes: Dictionary(uniqueKeysWithValues: layout.entries.map { ($0.name, $0.shape) }).merging(["x": xs]) { a, _ in a },
                                    objective: { objective($0, nil) }, cached: [(later, { objective($0, stem) })],
                                    samples: 4, seed: seed)
    }

    /// UX-Net k3 blocks in every stage; input 15 x 16 x 17 (odd: the stem's and the k2 s2 convs' floors),
    /// stage sizes 8x8x9, 4x4x4, 2x2x2, 1x1x1.
    func testEncoderUXNet() throws {
        let config = DeformUXNetConfig(featureSize: [3, 4, 5, 6], depths: [1, 1, 1, 1], block: .uxnet, kernelSize: 3)
        try checkEncoder("Encoder, UX-Net k3 blocks, F 3/4/5/6, N1 15x16x17", config, n: 1, d: 15, h: 16, w: 17, seed: 50)
    }

    /// DeformUX blocks (official offsets, N = 2) in the two smallest stages (2x2x2: most samples touch
    /// the border; 1x1x1), two in a row in stage 3; stages 0 and 1 without blocks; Cin 2.
    func testEncoderDeformUXOfficial() throws {
        let config = DeformUXNetConfig(inChannels: 2, featureSize: [3, 4, 5, 4], depths: [0, 0, 1, 2], block: .deformux,
                                       mlp: .dense, offsetMode: .official)
        try checkEncoder("Encoder, DeformUX official blocks, Cin 2, N2 16x15x16", config, n: 2, d: 16, h: 15, w: 16, seed: 51)
    }

    /// A single ConvLayer (the head: 1x1x1 with bias; the stem: k7 s2 p3; downsampling: k2 s2).
    func checkConvLayer(_ label: String, _ prefix: String, input v: Volume5, cout: Int, kernel: Int, stride: Int = 1,
                        padding: Int = 0, bias: Bool, seed: UInt64) throws {
        var layout = ParameterLayout()
        let layer = try ConvLayer(prefix, cin: v.c, cout: cout, kernel: kernel, stride: stride, padding: padding, bias: bias,
                                  layout: &layout)
        var forms = Self.copyForms(layout)
        layer.forms(&forms)
        let store = try ParameterStore(layout: layout)
        var values = Self.drawParameters(store, seed: seed)
        var rng = SplitMix64(seed: seed &+ 1)
        values["x"] = rng.floats(v.count).map(Double.init)
        let reference = { (p: Values) in
            BlockReference.conv(p.get("x"), v, p, prefix, cout: cout, kernel: kernel, stride: stride, padding: padding, bias: bias)
        }
        let os = reference(values).1.shape
        let gOut = rng.floats(os.reduce(1, *)).map(Double.init)
        let (out, grads) = try Self.engineGradients(label, store: store, forms: forms, inputShapes: ["x": v.shape]) { ctx, g in
            let x = try Self.tensor(values.get("x"), v.shape)
            let y = try layer.forward(x, nil, ctx)
            XCTAssertEqual(y.shape, os, "\(label): output shape")
            try layer.backward(x, gradY: try Self.tensor(gOut, os), ctx, gradX: g["x"])
            return try y.toArray()
        }
        Self.checkForward(label, out, reference(values).0, shape: os)
        Self.compareWithDifferences(label, engine: grads, values: values,
                                    shapes: Dictionary(uniqueKeysWithValues: layout.entries.map { ($0.name, $0.shape) }).merging(["x": v.shape]) { a, _ in a },
                                    objective: { Self.dot(reference($0).0, gOut) }, seed: seed)
    }

    func testHead() throws {
        try checkConvLayer("head (out.conv.conv, 1x1x1 with bias) 5->3 N2 3x4x5", "out.conv.conv.",
                           input: Volume5(n: 2, d: 3, h: 4, w: 5, c: 5), cout: 3, kernel: 1, bias: true, seed: 60)
    }

    func testStemAndDownsamplingConvs() throws {
        try checkConvLayer("stem conv k7 s2 p3 2->3 N1 7x6x5", "stem.", input: Volume5(n: 1, d: 7, h: 6, w: 5, c: 2),
                           cout: 3, kernel: 7, stride: 2, padding: 3, bias: true, seed: 61)
        try checkConvLayer("downsampling conv k2 s2 3->4 N2 5x4x3", "down.", input: Volume5(n: 2, d: 5, h: 4, w: 3, c: 3),
                           cout: 4, kernel: 2, stride: 2, bias: true, seed: 62)
    }

    func testLayerNorm() throws {
        let v = Volume5(n: 2, d: 3, h: 2, w: 3, c: 5)
        var layout = ParameterLayout()
        let norm = try LayerNormLayer("norm.", channels: v.c, layout: &layout)
        let store = try ParameterStore(layout: layout)
        var values = Self.drawParameters(store, seed: 63)
        var rng = SplitMix64(seed: 64)
        values["x"] = rng.floats(v.count).map(Double.init)
        let gOut = rng.floats(v.count).map(Double.init)
        let label = "channel LayerNorm C5 N2 3x2x3"
        let (out, grads) = try Self.engineGradients(label, store: store, forms: Self.copyForms(layout), inputShapes: ["x": v.shape]) { ctx, g in
            let x = try Self.tensor(values.get("x"), v.shape)
            let y = try norm.forward(x, ctx)
            try norm.backward(x, gradY: try Self.tensor(gOut, v.shape), ctx, gradX: g["x"])
            return try y.toArray()
        }
        let reference = { (p: Values) in BlockReference.layerNorm(p.get("x"), channels: v.c, p, "norm.") }
        Self.checkForward(label, out, reference(values), shape: v.shape)
        Self.compareWithDifferences(label, engine: grads, values: values,
                                    shapes: ["x": v.shape, "norm.weight": [v.c], "norm.bias": [v.c]],
                                    objective: { Self.dot(reference($0), gOut) }, seed: 63)
    }
}
