import XCTest
@testable import DeformUX

/// The paper's Table 3 ablations: the standard (full) deformable conv, the 3x3x3 offset branch,
/// single-plane offsets and no MLP. Kernels against plain-loop references; whole networks against the
/// PyTorch transcription (Tests/Fixtures/network/ablation_*, written by tools/make_network_fixtures.py)
/// at the main variants' bound, and they count their parameters.
final class AblationTests: XCTestCase {
    // MARK: Whole networks against PyTorch (atol 1e-4, rtol 1e-4, as NetworkTests)

    func testOffsetKernel3MatchesPyTorch() throws { try NetworkTests.runFixture("ablation_offset_kernel3") }
    /// Each plane fixture's logits change by 0.15 to 0.33 when its weights run with another offset_planes
    /// setting (its V.json, checked by the generator), so a swapped axis mapping cannot pass these.
    func testPlaneXYMatchesPyTorch() throws { try NetworkTests.runFixture("ablation_planes_xy") }
    /// Official offsets: the held axis (H) is zeroed in the flat-read field.
    func testPlaneXZOfficialMatchesPyTorch() throws { try NetworkTests.runFixture("ablation_planes_xz") }
    func testPlaneYZMatchesPyTorch() throws { try NetworkTests.runFixture("ablation_planes_yz") }
    func testNoMLPMatchesPyTorch() throws { try NetworkTests.runFixture("ablation_mlp_none") }
    func testStandardDeformableMatchesPyTorch() throws { try NetworkTests.runFixture("ablation_standard") }

    // MARK: Kernels and counts

    /// The standard deformable conv (channels-last) against its plain-loop reference in Double.
    func testStandardDeformableConvMatchesReference() throws {
        let cases: [(String, DDCShape)] = [
            ("C3 4x5x3", try DDCShape(n: 1, c: 3, d: 4, h: 5, w: 3)),
            ("C17 N2 3x3x2", try DDCShape(n: 2, c: 17, d: 3, h: 3, w: 2)),
            ("C1 1x1x1", try DDCShape(n: 1, c: 1, d: 1, h: 1, w: 1)),
        ]
        for (label, s) in cases {
            var rng = SplitMix64(seed: UInt64(s.count))
            let x = rng.floats(s.count), off = rng.floats(s.offsetCount, -2.5, 2.5)
            let w = rng.floats(s.c * s.c * 27), b = rng.floats(s.c)
            let want = StandardDeformConv3dReference.forward(x: x.map(Double.init), offsets: off.map(Double.init),
                                                             weight: w.map(Double.init), bias: b.map(Double.init),
                                                             shape: s, cout: s.c)
            let xl = ConvReference.toChannelsLast(x, n: s.n, c: s.c, voxels: s.voxels)
            var y = [Float](repeating: .nan, count: s.count)
            try xl.withUnsafeBufferPointer { xp in
                try off.withUnsafeBufferPointer { op in
                    try w.withUnsafeBufferPointer { wp in
                        try b.withUnsafeBufferPointer { bp in
                            try y.withUnsafeMutableBufferPointer { yp in
                                try StandardDeformConv3d.forward(x: xp.baseAddress!, offsets: op.baseAddress!, weight: wp.baseAddress!,
                                                                 bias: bp.baseAddress!, y: yp.baseAddress!, shape: s, cout: s.c,
                                                                 workspace: Workspace())
                            }
                        }
                    }
                }
            }
            let got = ConvReference.toChannelsFirst(y, n: s.n, c: s.c, voxels: s.voxels)
            let scale = Double(s.c * 27)
            assertClose(got, want, atol: 1e-5 * scale, rtol: 1e-5, shape: [s.n, s.c, s.d, s.h, s.w], "standard DDC \(label)")
        }
    }

    /// The 3x3x3 offset branch gives conv3d(x) (padding 1, with bias), channels-first.
    func testThreeCubedOffsetBranchIsAConv() throws {
        let s = try DDCShape(n: 2, c: 5, d: 4, h: 3, w: 5)
        var rng = SplitMix64(seed: 5)
        let xl = rng.floats(s.count), w = rng.floats(81 * s.c * 27), b = rng.floats(81)
        let want = ConvReference.toChannelsFirst(
            ConvReference.conv3d(x: xl.map(Double.init), n: s.n, cin: s.c, d: s.d, h: s.h, w: s.w,
                                 weight: w.map(Double.init), bias: b.map(Double.init), cout: 81, kernel: 3, padding: 1),
            n: s.n, c: 81, voxels: s.voxels)
        let ws = Workspace()
        let packed = try Conv3d.pack(weight: try Tensor(shape: [81, s.c, 3, 3, 3], values: w),
                                     shape: try Conv3d.Shape(n: 1, cin: s.c, cout: 81, d: 1, h: 1, w: 1, kernel: 3, padding: 1))
        let got: [Float] = try xl.withUnsafeBufferPointer { xp in
            try b.withUnsafeBufferPointer { bp in
                let p = try DDCLayerOps.computeOffsets(x: xp.baseAddress!, branch: .conv3(packedWeight: packed.pointer, bias: bp.baseAddress!),
                                                       mode: .aligned, shape: s, layout: .channelsLast, heldAxis: nil,
                                                       workspace: ws)
                return Array(UnsafeBufferPointer(start: p, count: s.offsetCount))
            }
        }
        assertClose(got, want, atol: 1e-4, rtol: 1e-5, shape: [s.n, 81, s.d, s.h, s.w], "3x3x3 offset branch")
    }

    /// Every ablation builds with the right parameter names and counts and runs a forward pass.
    func testAblationNetworksBuildCountAndRun() throws {
        let small = DeformUXNetConfig(outChannels: 2, featureSize: [4, 8, 8, 8], hiddenSize: 8)
        let base = try DeformUXNet(config: small).parameterCount
        let f = small.featureSize, blocks = 2  // blocks per stage
        var threeCubed = small; threeCubed.offsetKernel = 3
        var standard = small; standard.deformable = .standard
        var noMLP = small; noMLP.mlp = .none
        var plane = small; plane.offsetPlanes = .xz
        let cases: [(String, DeformUXNetConfig, Int)] = [
            ("offset kernel 3x3x3", threeCubed, base + blocks * f.reduce(0) { $0 + 81 * $1 * 26 }),
            ("standard deformable", standard, base + blocks * f.reduce(0) { $0 + $1 * ($1 - 1) * 27 }),
            ("no MLP", noMLP, base - blocks * f.reduce(0) { $0 + 8 * $1 * $1 + 5 * $1 }),
            ("xz-plane offsets", plane, base),
        ]
        var rng = SplitMix64(seed: 9)
        let x = try Tensor(shape: [1, 1, 16, 16, 16], values: rng.floats(4096))
        for (label, config, count) in cases {
            let net = try DeformUXNet(config: config, seed: 2)
            XCTAssertEqual(net.parameterCount, count, label)
            // Non-zero offsets, so that the ablation's offset path matters.
            for e in net.parameters.layout.entries where e.name.contains("conv_offset") {
                let p = net.parameters.values + e.offset
                for i in 0..<e.count { p[i] = Float(rng.uniform(-0.5, 0.5)) }
            }
            let y = try net.forward(x)
            XCTAssertEqual(y.shape, [1, 2, 16, 16, 16], label)
            XCTAssertTrue(allFinite(try y.toArray()), "\(label): non-finite logits")
        }
    }

    /// A plane ablation ignores its held axis's offset channels entirely.
    func testHeldAxisOffsetsHaveNoEffect() throws {
        var config = DeformUXNetConfig(outChannels: 2, featureSize: [4, 8, 8, 8], hiddenSize: 8)
        config.offsetPlanes = .xy   // z (W, axis 2) held
        let net = try DeformUXNet(config: config, seed: 4)
        var rng = SplitMix64(seed: 10)
        for e in net.parameters.layout.entries where e.name.contains("conv_offset") {
            let p = net.parameters.values + e.offset
            for i in 0..<e.count { p[i] = Float(rng.uniform(-0.5, 0.5)) }
        }
        let x = try Tensor(shape: [1, 1, 16, 16, 16], values: rng.floats(4096))
        let before = try net.forward(x).toArray()
        // Change only the weights of the W-axis offset channels (3t + 2).
        for e in net.parameters.layout.entries where e.name.hasSuffix("conv_offset.weight") {
            let p = net.parameters.values + e.offset
            let c = e.shape[1]
            for t in 0..<27 { for ci in 0..<c { p[(3 * t + 2) * c + ci] += 3 } }
        }
        XCTAssertEqual(try net.forward(x).toArray(), before)
    }
}
