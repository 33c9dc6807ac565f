import Foundation
import XCTest
@testable import DeformUX

/// Model cards: the shared cases of Tests/Fixtures/model_card/cases.json (python/tests/test_card.py reads
/// the same file through the C ABI), round trips, loading a model from a card or a sidecar, and errors.
final class ModelCardTests: XCTestCase {
    static let fixture = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/model_card/cases.json")

    var directory = ""

    override func setUpWithError() throws {
        directory = NSTemporaryDirectory() + "deformux-card-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: directory)
    }

    func text(_ object: Any) throws -> String {
        String(decoding: try JSONSerialization.data(withJSONObject: object, options: [.fragmentsAllowed]), as: UTF8.self)
    }

    func testSharedCases() throws {
        let root = try JSONSerialization.jsonObject(with: Data(contentsOf: ModelCardTests.fixture)) as? [String: Any]
        let cases = try XCTUnwrap(root?["cases"] as? [[String: Any]])
        XCTAssertGreaterThan(cases.count, 20)
        for c in cases {
            let name = c["name"] as? String ?? "?"
            let input = try text(c["card"] as Any)
            if let expected = c["normalized"] as? [String: Any] {
                let card = try ModelCard(json: input)
                let got = try JSONSerialization.jsonObject(with: Data(card.json.utf8)) as? [String: Any]
                XCTAssertEqual(got.map { $0 as NSDictionary }, expected as NSDictionary, "\(name): \(card.json)")
                // What a card writes, it reads back as the same card.
                XCTAssertEqual(try ModelCard(json: card.json), card, name)
                XCTAssertEqual(try ModelCard(json: card.jsonValue.prettyJSON()), card, name)
            } else {
                let want = try XCTUnwrap(c["error"] as? String, name)
                XCTAssertThrowsError(try ModelCard(json: input), name) { e in
                    let d = (e as? DeformUXError)?.description ?? "\(e)"
                    XCTAssertTrue(d.contains(want), "\(name): \"\(d)\" lacks \"\(want)\"")
                    XCTAssertEqual((e as? DeformUXError)?.kind, .invalidArgument, name)
                }
            }
        }
    }

    func testNotJSONAndCardFiles() throws {
        XCTAssertThrowsError(try ModelCard(json: "{\"name\": ")) { e in
            XCTAssertTrue("\(e)".contains("not valid JSON"), "\(e)")
        }
        // A card file: its stem is the default name; written atomically and read back.
        var card = ModelCard(config: DeformUXNetConfig(outChannels: 3, featureSize: [4, 8, 8, 8], hiddenSize: 8))
        card.classes = ["background", "a", "b"]
        card.training = ["seed": .number(3), "log": .array([.string("x"), .null])]
        card.extra = ["future": .object(["k": .bool(true)])]
        let path = directory + "/tiny.json"
        try card.write(to: path)
        var back = try ModelCard(path: path)
        XCTAssertEqual(back, card)
        // Without a "name" the file's stem names the card.
        try "{}".write(toFile: directory + "/unnamed.json", atomically: true, encoding: .utf8)
        back = try ModelCard(path: directory + "/unnamed.json")
        XCTAssertEqual(back.name, "unnamed")
        XCTAssertThrowsError(try ModelCard(path: directory + "/missing.json")) { e in
            XCTAssertEqual((e as? DeformUXError)?.errno, ENOENT)
        }
        XCTAssertThrowsError(try ModelCard(path: directory)) { e in
            XCTAssertEqual((e as? DeformUXError)?.kind, .io)
        }
    }

    func testDefaultsAndConfiguration() throws {
        let card = ModelCard()
        XCTAssertNil(card.window)
        XCTAssertEqual(card.classNames(count: 3), ["background", "class 1", "class 2"])
        // Automatic windows: 96, or the grid rounded up to 16 where that is smaller.
        XCTAssertEqual(card.window(forNetworkGrid: SIMD3(250, 40, 7)), SIMD3(96, 48, 16))
        XCTAssertEqual(card.window(forNetworkGrid: SIMD3(96, 97, 80)), SIMD3(96, 96, 80))
        let c = card.segmenterConfiguration()
        XCTAssertEqual(c.window, SIMD3(96, 96, 96))
        XCTAssertEqual(c.intensity, .mr())
        XCTAssertTrue(c.reorient)
        XCTAssertNil(c.spacing)
        // Resolved for a volume: on its canonical (reoriented) and resampled grid.
        // Columns: i -> -x (2 mm), j -> -z (1 mm), k -> +y (3 mm).
        let lps = try Affine([-2, 0, 0, 0, 0, 0, 3, 0, 0, -1, 0, 0, 0, 0, 0, 1])
        var spaced = card
        spaced.spacing = SIMD3(1, 1, 1)
        let r = try spaced.segmenterConfiguration(size: SIMD3(30, 20, 50), affine: lps)
        // Canonical x from i (30 voxels of 2 mm -> 60 at 1 mm), y from k (50 x 3 mm -> 150), z from j (20 x 1 mm).
        XCTAssertEqual(r.window, SIMD3(64, 96, 32))
        var ct = try ModelCard(json: "{\"intensity\": {\"kind\": \"ct\", \"clip\": [-175, 250]}, \"skip_background\": {\"threshold\": -500}}")
        XCTAssertEqual(ct.segmenterConfiguration().intensity, .ct(clip: -175...250))
        XCTAssertEqual(ct.segmenterConfiguration().skipThreshold, -500)
        ct.window = SIMD3(32, 32, 32)
        XCTAssertEqual(try ct.segmenterConfiguration(size: SIMD3(300, 300, 300), affine: .identity).window, SIMD3(32, 32, 32))
    }

    func testCheckAgainstTheNetwork() throws {
        let config = DeformUXNetConfig(outChannels: 3, featureSize: [4, 8, 8, 8], hiddenSize: 8)
        var card = ModelCard(config: config)
        XCTAssertNoThrow(try card.check(against: config))
        card.classes = ["background", "a"]
        XCTAssertThrowsError(try card.check(against: config)) { e in XCTAssertTrue("\(e)".contains("one class per output channel"), "\(e)") }
        card.classes = nil
        var other = config
        other.offsetMode = .official
        XCTAssertThrowsError(try card.check(against: other)) { e in XCTAssertTrue("\(e)".contains("another network"), "\(e)") }
        let net = try DeformUXNet(config: other)
        XCTAssertThrowsError(try Segmenter(model: net, card: card))
    }

    /// A model from a card (weights relative to the card), from weights with a sidecar card, and from
    /// weights alone; the weights are the saved ones.
    func testLoadModel() throws {
        let config = DeformUXNetConfig(outChannels: 2, featureSize: [4, 8, 8, 8], hiddenSize: 8)
        let net = try DeformUXNet(config: config, seed: 11)
        try FileManager.default.createDirectory(atPath: directory + "/w", withIntermediateDirectories: true)
        try net.save(to: directory + "/w/tiny.safetensors")
        var card = ModelCard(config: config)
        card.name = "tiny"
        card.weights = "w/tiny.safetensors"
        card.overlap = 0.25
        try card.write(to: directory + "/tiny.json")
        let x = try Tensor(zeros: [1, 1, 16, 16, 16])
        for i in 0..<x.count { x.pointer[i] = Float(i % 13) / 13 }
        let want = try net.forward(x).toArray()

        let (a, cardA) = try ModelCard.loadModel(path: directory + "/tiny.json")
        XCTAssertEqual(cardA.overlap, 0.25)
        XCTAssertEqual(try a.forward(x).toArray(), want)

        // Weights alone: the defaults, named after the file, configuration from its metadata.
        let (b, cardB) = try ModelCard.loadModel(path: directory + "/w/tiny.safetensors")
        XCTAssertEqual(cardB.name, "tiny")
        XCTAssertEqual(cardB.config, config)
        XCTAssertNil(cardB.window)
        XCTAssertEqual(try b.forward(x).toArray(), want)

        // Weights with a sidecar card.
        var sidecar = ModelCard()
        sidecar.name = "side"
        sidecar.classes = ["background", "thing"]
        try sidecar.write(to: directory + "/w/tiny.json")
        let (_, cardC) = try ModelCard.loadModel(path: directory + "/w/tiny.safetensors")
        XCTAssertEqual(cardC.name, "side")
        XCTAssertEqual(cardC.classNames(count: 2), ["background", "thing"])

        // Errors: no weights in the card, another network, missing files, unknown file kinds.
        try "{\"name\": \"x\"}".write(toFile: directory + "/noweights.json", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try ModelCard.loadModel(path: directory + "/noweights.json")) { e in
            XCTAssertTrue("\(e)".contains("names no weights"), "\(e)")
        }
        var wrong = card
        wrong.config = DeformUXNetConfig(outChannels: 3, featureSize: [4, 8, 8, 8], hiddenSize: 8)
        try wrong.write(to: directory + "/wrong.json")
        XCTAssertThrowsError(try ModelCard.loadModel(path: directory + "/wrong.json")) { e in
            XCTAssertTrue("\(e)".contains("differs from the one recorded"), "\(e)")
        }
        var missing = card
        missing.weights = "nowhere.safetensors"
        try missing.write(to: directory + "/missing.json")
        XCTAssertThrowsError(try ModelCard.loadModel(path: directory + "/missing.json")) { e in
            XCTAssertEqual((e as? DeformUXError)?.errno, ENOENT, "\(e)")
        }
        XCTAssertThrowsError(try ModelCard.loadModel(path: directory + "/none.json")) { e in
            XCTAssertEqual((e as? DeformUXError)?.errno, ENOENT, "\(e)")
        }
        XCTAssertThrowsError(try ModelCard.loadModel(path: directory + "/tiny.pth")) { e in
            XCTAssertTrue("\(e)".contains(".safetensors"), "\(e)")
        }
    }
}
