import XCTest
@testable import DeformUX

/// The fused inference paths are tested twins of the plain composition of the kernels (STYLE.md habit
/// 17, issue 7), in Float, to float rounding (|fused - plain| <= 1e-5 (max |plain| + |plain|)):
///
/// - `ResBlock.forward`: InstanceNorm + LeakyReLU folded into conv2's input read
///   (`Conv3d.InputTransform`), the norms' statistics gathered by the convs that write them, the last
///   norm, residual add and LeakyReLU in one pass (`InstanceNorm.applyAffine`); against `Conv3d.forward`
///   without transform or statistics, `InstanceNorm.statistics` per sample, the normalisation,
///   LeakyReLU and `Activation.add`, each over whole tensors.
/// - `EncoderBlock.forward`: LayerNorm in place, the MLP in chunks of `EncoderBlock.mlpChunk` voxels
///   with the residual written over them; against `ChannelLayerNorm.forward` into a new tensor, then
///   `Pointwise.forward` (dense) or `GroupedPointwise3d.expand`/`reduce` and `Activation.gelu` over
///   the whole tensor, then x + gamma * m. The spatial conv is the same call on both sides.
///
/// Shapes are past the SIMD width in channels and past one chunk / one thread part in voxels, with a
/// partial last chunk.
final class FusedPathTests: XCTestCase {
    static let tolerance = 1e-5

    static func assertTwins(_ fused: [Float], _ plain: [Float], shape: [Int], _ label: String,
                            file: StaticString = #filePath, line: UInt = #line) {
        let scale = plain.reduce(0.0) { max($0, abs(Double($1))) }
        assertClose(fused, plain, atol: tolerance * scale, rtol: tolerance, shape: shape,
                    "\(label): fused forward vs plain composition", file: file, line: line)
        XCTAssertGreaterThan(scale, 0, "\(label): an all-zero output tests nothing", file: file, line: line)
        let worst = zip(fused, plain).reduce(0.0) { max($0, abs(Double($1.0) - Double($1.1))) } / max(scale, 1e-30)
        print("\(label): max |fused - plain| / max |plain| \(String(format: "%.1e", worst))")
    }

    /// The store of a layout with seeded values (as the gradient checks draw them) and a context.
    static func setUp(_ layout: ParameterLayout, forms: [WeightSnapshot.Form], seed: UInt64) throws -> (ParameterStore, RunContext) {
        let store = try ParameterStore(layout: layout)
        _ = BlockGradientTests.drawParameters(store, seed: seed)
        return (store, try RunContext.standalone(store: store, forms: forms))
    }

    // MARK: ResBlock

    /// InstanceNorm (per sample and channel, channels-last N x V x C) of y in place, then LeakyReLU if
    /// `leaky`, by `InstanceNorm.statistics` and a plain loop.
    static func instanceNorm(_ y: Tensor, leaky: Bool, _ ws: Workspace) throws {
        let v = try Volume5(y, "test")
        var mean = [Float](repeating: 0, count: v.c), rstd = [Float](repeating: 0, count: v.c)
        for s in 0..<v.n {
            let p = y.pointer + s * v.voxels * v.c
            try InstanceNorm.statistics(x: p, voxels: v.voxels, channels: v.c, mean: &mean, rstd: &rstd, workspace: ws)
            for i in 0..<(v.voxels * v.c) {
                let z = (p[i] - mean[i % v.c]) * rstd[i % v.c]
                p[i] = leaky && z < 0 ? z * ResBlock.slope : z
            }
        }
    }

    func checkResBlock(_ label: String, n: Int, d: Int, h: Int, w: Int, c1: Int, c2: Int = 0, cout: Int, seed: UInt64) throws {
        var layout = ParameterLayout()
        let block = try ResBlock("b.", cin: c1 + c2, cout: cout, layout: &layout)
        var forms = BlockGradientTests.copyForms(layout)
        block.forms(&forms)
        let (store, ctx) = try Self.setUp(layout, forms: forms, seed: seed)
        var rng = SplitMix64(seed: seed &+ 1)
        let x = try Tensor(shape: [n, d, h, w, c1], values: rng.floats(n * d * h * w * c1))
        let x2 = c2 > 0 ? try Tensor(shape: [n, d, h, w, c2], values: rng.floats(n * d * h * w * c2)) : nil
        let fused = try block.forward(x, x2, ctx).toArray()

        let ws = Workspace()
        let weight = { (name: String) in try store.tensor("b.\(name).conv.weight") }
        let a = try Conv3d.forward(x: x, x2: x2, weight: try weight("conv1"), bias: nil, padding: 1, workspace: ws)
        try Self.instanceNorm(a, leaky: true, ws)
        let b = try Conv3d.forward(x: a, weight: try weight("conv2"), bias: nil, padding: 1, workspace: ws)
        try Self.instanceNorm(b, leaky: false, ws)
        let residual: Tensor
        if block.conv3 != nil {
            residual = try Conv3d.forward(x: x, x2: x2, weight: try weight("conv3"), bias: nil, workspace: ws)
            try Self.instanceNorm(residual, leaky: false, ws)
        } else {
            residual = x
        }
        Activation.add(residual.pointer, into: b.pointer, count: b.count)
        let plain = try b.toArray().map { $0 < 0 ? $0 * ResBlock.slope : $0 }
        Self.assertTwins(fused, plain, shape: b.shape, label)
    }

    func testResBlockFusedForwardIsThePlainComposition() throws {
        try checkResBlock("ResBlock 20->20 (identity) N2 5x6x7", n: 2, d: 5, h: 6, w: 7, c1: 20, cout: 20, seed: 70)
        try checkResBlock("ResBlock 7->19 (conv3) N1 16x12x12 (2 thread parts)", n: 1, d: 16, h: 12, w: 12, c1: 7, cout: 19, seed: 71)
        try checkResBlock("ResBlock [5 + 6]->9 (two sources) N2 4x5x6", n: 2, d: 4, h: 5, w: 6, c1: 5, c2: 6, cout: 9, seed: 72)
    }

    // MARK: EncoderBlock

    func checkEncoderBlock(_ label: String, _ config: DeformUXNetConfig, n: Int, d: Int, h: Int, w: Int, c: Int,
                           seed: UInt64) throws {
        var layout = ParameterLayout()
        let block = try EncoderBlock("s.", channels: c, config: config, index: 0, layout: &layout)
        var forms = BlockGradientTests.copyForms(layout)
        block.forms(&forms)
        let (store, ctx) = try Self.setUp(layout, forms: forms, seed: seed)
        var rng = SplitMix64(seed: seed &+ 1)
        let x = try Tensor(shape: [n, d, h, w, c], values: rng.floats(n * d * h * w * c))
        let voxels = n * d * h * w
        XCTAssertGreaterThan(voxels, EncoderBlock.mlpChunk, "\(label): the MLP should run in more than one chunk")
        let fused = try block.forward(x, ctx).toArray()

        let ws = Workspace()
        let p = { (name: String) in try store.tensor("s.\(name)") }
        // The spatial conv: the same layer on both sides.
        let y: Tensor
        switch block.spatial {
        case .deformable(let ddc): y = try ddc.forward(x, ctx)
        case .depthwise: y = try DepthwiseConv3d.forward(x: x, weight: try p("dwconv.weight"), bias: try p("dwconv.bias"), workspace: ws)
        }
        let z = try Tensor(zeros: x.shape)
        ChannelLayerNorm.forward(x: y.pointer, weight: try p("norm.weight").pointer, bias: try p("norm.bias").pointer,
                                 y: z.pointer, voxels: voxels, channels: c)
        var m = z
        if config.mlp != .none {
            let hidden = try Tensor(zeros: [voxels, 4 * c])
            m = try Tensor(zeros: x.shape)
            let (w1, b1, w2, b2) = (try p("pwconv1.weight"), try p("pwconv1.bias"), try p("pwconv2.weight"), try p("pwconv2.bias"))
            if config.mlp == .dense {
                Pointwise.forward(x: z.pointer, weight: w1.pointer, bias: b1.pointer, y: hidden.pointer,
                                  shape: .init(n: 1, cin: c, cout: 4 * c, voxels: voxels, xLayout: .channelsLast, yLayout: .channelsLast))
                Activation.gelu(x: hidden.pointer, y: hidden.pointer, count: hidden.count)
                Pointwise.forward(x: hidden.pointer, weight: w2.pointer, bias: b2.pointer, y: m.pointer,
                                  shape: .init(n: 1, cin: 4 * c, cout: c, voxels: voxels, xLayout: .channelsLast, yLayout: .channelsLast))
            } else {
                GroupedPointwise3d.expand(x: z.pointer, weight: w1.pointer, bias: b1.pointer, y: hidden.pointer,
                                          voxels: voxels, channels: c, ratio: 4)
                Activation.gelu(x: hidden.pointer, y: hidden.pointer, count: hidden.count)
                GroupedPointwise3d.reduce(x: hidden.pointer, weight: w2.pointer, bias: b2.pointer, y: m.pointer,
                                          voxels: voxels, channels: c, ratio: 4)
            }
        }
        let gamma = try p("gamma").toArray(), xs = try x.toArray(), ms = try m.toArray()
        let plain = (0..<xs.count).map { xs[$0] + gamma[$0 % c] * ms[$0] }
        Self.assertTwins(fused, plain, shape: x.shape, label)
    }

    func testEncoderBlockFusedForwardIsThePlainComposition() throws {
        // 2 x 648 voxels: chunks of 512, the last partial.
        try checkEncoderBlock("DeformUX block, dense MLP, C20 N2 9x8x9",
                              DeformUXNetConfig(mlp: .dense), n: 2, d: 9, h: 8, w: 9, c: 20, seed: 80)
        try checkEncoderBlock("DeformUX block, grouped MLP, official, C7 N1 11x9x7",
                              DeformUXNetConfig(mlp: .grouped, offsetMode: .official), n: 1, d: 11, h: 9, w: 7, c: 7, seed: 81)
        try checkEncoderBlock("DeformUX block, no MLP, C6 N1 8x9x10", DeformUXNetConfig(mlp: .none), n: 1, d: 8, h: 9, w: 10, c: 6, seed: 82)
        try checkEncoderBlock("UX-Net block, dwconv k5, grouped MLP, C17 N1 10x9x8",
                              DeformUXNetConfig(block: .uxnet, mlp: .grouped, kernelSize: 5), n: 1, d: 10, h: 9, w: 8, c: 17, seed: 83)
    }
}
