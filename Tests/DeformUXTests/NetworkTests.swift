import Foundation
import XCTest
@testable import DeformUX

/// The whole network: parameter counts (ARCHITECTURE.md section 6), agreement with the PyTorch
/// reference (Tests/Fixtures/network, made by tools/make_network_fixtures.py), strict loading and the
/// input checks.
final class NetworkTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/network")

    static func fixture(_ name: String) -> String { fixtures.appendingPathComponent(name).path }

    // MARK: Parameter counts (section 6 of the spec; these are tests there too)

    func testParameterCountsMatchTheSpecification() throws {
        let cases: [(String, DeformUXNetConfig.Block, DeformUXNetConfig.MLP, Int, Int)] = [
            ("DeformUX-Net dense, Cout 14", .deformux, .dense, 14, 55_790_678),
            ("DeformUX-Net dense, Cout 16", .deformux, .dense, 16, 55_790_776),
            ("DeformUX-Net grouped, Cout 14", .deformux, .grouped, 14, 52_668_758),
            ("DeformUX-Net grouped, Cout 16", .deformux, .grouped, 16, 52_668_856),
            ("3D UX-Net k7, Cout 14", .uxnet, .grouped, 14, 53_006_510),
            ("3D UX-Net k7, Cout 16", .uxnet, .grouped, 16, 53_006_608),
        ]
        for (label, block, mlp, cout, want) in cases {
            let net = try DeformUXNet(config: DeformUXNetConfig(outChannels: cout, block: block, mlp: mlp))
            XCTAssertEqual(net.parameterCount, want, label)
            XCTAssertEqual(try net.summary(inputShape: [1, 1, 96, 96, 96]).totalParameters, want, "\(label): summary")
        }
    }

    func testStateDictNamesFollowTheReleasedCode() throws {
        let net = try DeformUXNet(config: DeformUXNetConfig())
        let names = Set(net.parameters.layout.entries.map(\.name))
        for name in ["deformuxnet_3d.downsample_layers.0.0.weight", "deformuxnet_3d.downsample_layers.0.1.bias",
                     "deformuxnet_3d.downsample_layers.3.1.weight", "deformuxnet_3d.stages.3.1.ddc.conv_offset.weight",
                     "deformuxnet_3d.stages.0.0.gamma", "deformuxnet_3d.norm2.weight",
                     "encoder1.layer.conv3.conv.weight", "encoder5.layer.conv2.conv.weight",
                     "decoder5.transp_conv.conv.weight", "decoder2.conv_block.conv3.conv.weight",
                     "decoder1.layer.conv2.conv.weight", "out.conv.conv.bias"] {
            XCTAssertTrue(names.contains(name), "missing \(name)")
        }
        XCTAssertFalse(names.contains("decoder1.layer.conv3.conv.weight"), "decoder1 keeps its width: no conv3")
        let e = try XCTUnwrap(net.parameters.layout.entry(named: "decoder5.transp_conv.conv.weight"))
        XCTAssertEqual(e.shape, [768, 384, 2, 2, 2], "transposed conv weight is Cin x Cout x 2 x 2 x 2")
        let ux = try DeformUXNet(config: DeformUXNetConfig(block: .uxnet))
        XCTAssertNotNil(ux.parameters.layout.entry(named: "uxnet_3d.stages.1.0.dwconv.weight"))
        XCTAssertEqual(ux.parameters.layout.entry(named: "uxnet_3d.stages.1.0.dwconv.weight")?.shape, [96, 1, 7, 7, 7])
    }

    func testFreshInitialisationFollowsTheReference() throws {
        let net = try DeformUXNet(config: DeformUXNetConfig(featureSize: [8, 12, 16, 24], hiddenSize: 32), seed: 3)
        let p = net.parameters
        XCTAssertTrue(try p.tensor("deformuxnet_3d.stages.0.0.ddc.conv_offset.weight").toArray().allSatisfy { $0 == 0 })
        XCTAssertTrue(try p.tensor("deformuxnet_3d.stages.2.1.ddc.conv_offset.bias").toArray().allSatisfy { $0 == 0 })
        XCTAssertTrue(try p.tensor("deformuxnet_3d.stages.1.0.gamma").toArray().allSatisfy { $0 == 1e-6 })
        XCTAssertTrue(try p.tensor("deformuxnet_3d.norm1.weight").toArray().allSatisfy { $0 == 1 })
        // Conv3d default: uniform +-1/sqrt(fan_in), fan_in = 12 * 27 for encoder3's conv1.
        let w = try p.tensor("encoder3.layer.conv1.conv.weight").toArray()
        let bound = 1 / Float(12 * 27).squareRoot()
        XCTAssertTrue(w.allSatisfy { abs($0) <= bound })
        XCTAssertGreaterThan(w.map { abs($0) }.max() ?? 0, 0.9 * bound)
    }

    // MARK: Agreement with PyTorch

    /// The engine's logits for a fixture variant and the reference's: the model built from the file's
    /// recorded configuration (changed by `configure`, if given), weights loaded strictly (from
    /// `weights`.safetensors if given), run on the variant's input.
    static func fixtureLogits(_ variant: String, weights: String? = nil,
                              configure: (inout DeformUXNetConfig) -> Void = { _ in }) throws -> (got: Tensor, want: [Float]) {
        let weightsFile = try SafetensorsFile(path: fixture("\(weights ?? variant).safetensors"))
        let configFile = weights == nil ? weightsFile : try SafetensorsFile(path: fixture("\(variant).safetensors"))
        let json = try XCTUnwrap(configFile.metadata[DeformUXNet.configMetadataKey], "\(variant): no config")
        var config = try DeformUXNetConfig(json: json)
        configure(&config)
        let net = try DeformUXNet(config: config)
        let report = try net.load(from: fixture("\(weights ?? variant).safetensors"))
        XCTAssertTrue(report.isComplete, "\(variant): \(report)")
        let io = try SafetensorsFile(path: fixture("\(variant).io.safetensors"))
        let y = try net.forward(try io.tensor("input"))
        XCTAssertEqual(y.shape, io.entry("output")?.shape, "\(variant): logits shape")
        return (y, try io.floats("output"))
    }

    /// Runs a fixture variant and compares its logits with the reference's (a float64 forward rounded
    /// to float32) at atol 1e-4, rtol 1e-4 (Tests/Fixtures/network/README.md).
    static func runFixture(_ variant: String, weights: String? = nil, file: StaticString = #filePath, line: UInt = #line) throws {
        let (y, want) = try fixtureLogits(variant, weights: weights)
        assertClose(try y.toArray(), want, atol: 1e-4, rtol: 1e-4, shape: y.shape,
                    "\(weights ?? variant): logits vs PyTorch", file: file, line: line)
    }

    func testDenseAlignedMatchesPyTorch() throws { try Self.runFixture("dense_aligned") }
    func testGroupedOfficialMatchesPyTorch() throws { try Self.runFixture("grouped_official") }
    func testDenseOfficialTwoSamplesMatchesPyTorch() throws { try Self.runFixture("dense_official_n2") }
    func testUXNetMatchesPyTorch() throws { try Self.runFixture("uxnet") }
    /// The released prototype's names (`module.`, `convxnet.`, `.dcn.`) load into the same model.
    func testReleasedLayoutNamesLoad() throws { try Self.runFixture("grouped_official", weights: "released_layout") }

    // MARK: Loading and saving

    func testStrictLoadingListsEveryProblemAndLoadsNothing() throws {
        let net = try DeformUXNet(config: DeformUXNetConfig(outChannels: 3, featureSize: [8, 12, 16, 24], hiddenSize: 32))
        let before = try net.parameters.tensor("encoder1.layer.conv1.conv.weight").toArray()
        var items: [Safetensors.Item] = []
        var keep: [Tensor] = []  // owns the memory the items point to
        for e in net.parameters.layout.entries {
            if e.name == "decoder1.layer.conv2.conv.weight" || e.name == "out.conv.conv.bias" { continue }  // missing
            var shape = e.shape
            if e.name == "deformuxnet_3d.norm0.weight" { shape = [e.shape[0] + 1] }  // mis-shaped
            let t = try Tensor(shape: shape, values: [Float](repeating: 0.5, count: shape.reduce(1, *)))
            keep.append(t)
            items.append(Safetensors.Item(name: e.name, shape: shape, values: t.pointer))
        }
        let surplus = try Tensor(shape: [3], values: [1, 2, 3])
        keep.append(surplus)
        items.append(Safetensors.Item(name: "decoder0.surplus.weight", shape: [3], values: surplus.pointer))
        do {
            try withExtendedLifetime(keep) { _ = try net.loadStateDict(items) }
            XCTFail("strict load of a wrong state dict succeeded")
        } catch let e as DeformUXError {
            for name in ["decoder1.layer.conv2.conv.weight", "out.conv.conv.bias", "decoder0.surplus.weight",
                         "deformuxnet_3d.norm0.weight expected [8] got [9]"] {
                XCTAssertTrue(e.description.contains(name), "the error should name \(name):\n\(e.description)")
            }
        }
        XCTAssertEqual(try net.parameters.tensor("encoder1.layer.conv1.conv.weight").toArray(), before,
                       "a failed strict load must load nothing")
        // Not strict: what matches loads, the rest is reported.
        let report = try withExtendedLifetime(keep) { try net.loadStateDict(items, strict: false) }
        XCTAssertEqual(report.missing, ["decoder1.layer.conv2.conv.weight", "out.conv.conv.bias"])
        XCTAssertEqual(report.unexpected, ["decoder0.surplus.weight"])
        XCTAssertTrue(try net.parameters.tensor("encoder1.layer.conv1.conv.weight").toArray().allSatisfy { $0 == 0.5 })
    }

    func testSaveThenLoadRoundTripsWithTheConfiguration() throws {
        let config = DeformUXNetConfig(outChannels: 2, featureSize: [8, 12, 16, 24], hiddenSize: 32, mlp: .grouped,
                                       offsetMode: .official)
        let a = try DeformUXNet(config: config, seed: 11)
        let path = NSTemporaryDirectory() + "deformux-roundtrip-\(getpid()).safetensors"
        defer { unlink(path) }
        try a.save(to: path)
        let file = try SafetensorsFile(path: path)
        let saved = try DeformUXNetConfig(json: try XCTUnwrap(file.metadata[DeformUXNet.configMetadataKey]))
        XCTAssertEqual(saved, config)
        let b = try DeformUXNet(config: saved, seed: 99)
        try b.load(from: path)
        XCTAssertEqual(try b.parameters.tensor("decoder3.transp_conv.conv.weight").toArray(),
                       try a.parameters.tensor("decoder3.transp_conv.conv.weight").toArray())
    }

    // MARK: Input checks and configuration

    func testInputsMustBeMultiplesOf16() throws {
        let net = try DeformUXNet(config: DeformUXNetConfig(featureSize: [8, 12, 16, 24], hiddenSize: 32))
        for (shape, word) in [([1, 1, 16, 16, 24], "W = 24"), ([1, 1, 8, 16, 16], "D = 8"), ([1, 2, 16, 16, 16], "1 channels"),
                              ([1, 1, 16, 16], "N x 1 x D x H x W")] {
            XCTAssertThrowsError(try net.forward(try Tensor(zeros: shape)), "\(shape)") { error in
                let m = (error as? DeformUXError)?.description ?? "\(error)"
                XCTAssertTrue(m.contains(word), "\(shape): \(m)")
            }
        }
    }

    func testConfigurationJSON() throws {
        let c = try DeformUXNetConfig(json: #"{"block": "uxnet", "out_channels": 14}"#)
        XCTAssertEqual(c.mlp, .grouped, "UX-Net defaults to the grouped MLP")
        XCTAssertEqual(c.outChannels, 14)
        XCTAssertEqual(try DeformUXNetConfig(json: c.json), c)
        for (json, word) in [(#"{"blocks": "uxnet"}"#, "unknown key"), (#"{"mlp": "wide"}"#, "dense, grouped, none"),
                             (#"{"feature_size": [1, 2]}"#, "feature_size"), (#"{"in_channels": "one"}"#, "in_channels"),
                             ("[1, 2]", "JSON object"), (#"{"kernel_size": 4, "block": "uxnet"}"#, "kernel_size")] {
            XCTAssertThrowsError(try DeformUXNetConfig(json: json), json) { error in
                let m = (error as? DeformUXError)?.description ?? "\(error)"
                XCTAssertTrue(m.contains(word), "\(json): \(m)")
            }
        }
    }

    /// Activation memory is reused between passes (StoragePool): a second pass, and a pass after one
    /// of another size, must give identical logits.
    func testRepeatedForwardsAgree() throws {
        let net = try DeformUXNet(config: DeformUXNetConfig(outChannels: 2, featureSize: [4, 8, 8, 8], hiddenSize: 8), seed: 6)
        var rng = SplitMix64(seed: 12)
        let x = try Tensor(shape: [1, 1, 16, 32, 16], values: rng.floats(8192))
        let first = try net.forward(x).toArray()
        XCTAssertEqual(try net.forward(x).toArray(), first)
        _ = try net.forward(try Tensor(shape: [2, 1, 16, 16, 16], values: rng.floats(8192)))
        XCTAssertEqual(try net.forward(x).toArray(), first)
    }

    func testProgressIsReportedAndCancels() throws {
        let net = try DeformUXNet(config: DeformUXNetConfig(featureSize: [4, 4, 4, 4], hiddenSize: 8))
        let x = try Tensor(zeros: [1, 1, 16, 16, 16])
        var steps: [Int] = []
        _ = try net.forward(x) { done, total in steps.append(done); XCTAssertEqual(total, 12); return true }
        XCTAssertEqual(steps, Array(1...12))
        XCTAssertThrowsError(try net.forward(x) { done, _ in done < 3 }) { error in
            guard (error as? DeformUXError)?.kind == .cancelled else { return XCTFail("expected cancelled, got \(error)") }
        }
    }
}
