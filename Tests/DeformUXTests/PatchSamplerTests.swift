import Foundation
import XCTest
@testable import DeformUX

/// A test volume that owns its memory (TrainingVolume only borrows).
final class OwnedVolume {
    let image: UnsafeMutablePointer<Float>
    let labels: UnsafeMutablePointer<Int32>
    let channels: Int
    let size: [Int]
    var voxels: Int { size.reduce(1, *) }

    init(channels: Int, size: [Int], image: [Float], labels: [Int32]) {
        self.channels = channels
        self.size = size
        self.image = .allocate(capacity: max(image.count, 1))
        self.labels = .allocate(capacity: max(labels.count, 1))
        self.image.initialize(from: image, count: image.count)
        self.labels.initialize(from: labels, count: labels.count)
    }

    /// Image values from a formula of (channel, i, j, k), labels from another.
    convenience init(channels: Int = 1, size: [Int], image: (Int, Int, Int, Int) -> Float, label: (Int, Int, Int) -> Int32) {
        var img: [Float] = [], lab: [Int32] = []
        for c in 0..<channels { for i in 0..<size[0] { for j in 0..<size[1] { for k in 0..<size[2] { img.append(image(c, i, j, k)) } } } }
        for i in 0..<size[0] { for j in 0..<size[1] { for k in 0..<size[2] { lab.append(label(i, j, k)) } } }
        self.init(channels: channels, size: size, image: img, labels: lab)
    }

    deinit {
        image.deallocate()
        labels.deallocate()
    }

    func volume() throws -> TrainingVolume { try TrainingVolume(image: image, labels: labels, channels: channels, size: size) }
    func label(_ i: Int, _ j: Int, _ k: Int) -> Int32 { labels[(i * size[1] + j) * size[2] + k] }
    func value(_ c: Int, _ i: Int, _ j: Int, _ k: Int) -> Float { image[c * voxels + (i * size[1] + j) * size[2] + k] }
}

final class PatchSamplerTests: XCTestCase {
    let threads = ThreadCountGuard()
    override func tearDown() { threads.restore() }

    /// MONAI's correct_crop_centers and map_binary_to_indices (fixture crop.json).
    func testMatchesMONAI() throws {
        let data = try Data(contentsOf: TrainingFixtures.directory.appendingPathComponent("crop.json"))
        guard let root = try JSONSerialization.jsonObject(with: data) as? [String: Any],
              let centres = root["centres"] as? [[String: Any]], let idx = root["indices"] as? [String: Any] else {
            return XCTFail("bad crop.json")
        }
        for c in centres {
            let f = FixtureCase(dict: c)
            let size = try f.int("size"), patch = try f.int("patch")
            let want = try f.ints("corrected")
            let got = (0..<size).map { PatchSampler.correctCentre($0, patch: patch, size: size) }
            XCTAssertEqual(got, want, "correct_crop_centers, size \(size), patch \(patch)")
        }
        let f = FixtureCase(dict: idx)
        let shape = try f.ints("shape")
        let owned = OwnedVolume(channels: 2, size: shape, image: try f.floats("image"), labels: try f.ints("labels").map { Int32($0) })
        let volume = try owned.volume()
        for (threshold, fgKey, bgKey) in [(Float(0), "foreground", "background"), (nil, "foreground_no_image", "background_no_image")] {
            let cand = try CropCandidates(volume: volume, imageThreshold: threshold)
            let wantFg = try f.ints(fgKey), wantBg = try f.ints(bgKey)
            XCTAssertEqual(cand.foregroundCount, wantFg.count)
            XCTAssertEqual(cand.backgroundCount, wantBg.count)
            XCTAssertEqual(try (0..<cand.foregroundCount).map { try cand.voxel(foreground: true, rank: $0, in: volume) }, wantFg,
                           "foreground voxels, threshold \(String(describing: threshold))")
            XCTAssertEqual(try (0..<cand.backgroundCount).map { try cand.voxel(foreground: false, rank: $0, in: volume) }, wantBg,
                           "background voxels, threshold \(String(describing: threshold))")
        }
    }

    /// A 24 x 20 x 16 volume: foreground is a 4 x 3 x 2 block, image 0 in an outer shell (not background
    /// with threshold 0).
    func blockVolume() -> OwnedVolume {
        OwnedVolume(size: [24, 20, 16], image: { _, i, j, k in (i < 2 || j < 2 || k < 2) ? 0 : 1 + Float(i) / 100 },
                    label: { i, j, k in (i >= 10 && i < 14 && j >= 3 && j < 6 && k >= 13 && k < 15) ? Int32(1 + (i + j + k) % 2) : 0 })
    }

    func testPositiveRatioCentresAndFit() throws {
        let owned = blockVolume()
        let volume = try owned.volume()
        let sampler = try PatchSampler(config: .init(patchSize: [8, 6, 5], samplesPerVolume: 2))
        let cand = try CropCandidates(volume: volume, imageThreshold: 0, classes: 3)
        XCTAssertEqual(cand.foregroundCount, 24)
        var rng = SplitMix64(seed: 4)
        var fg = 0, total = 0
        var fgHits = [Int: Int]()
        for _ in 0..<10_000 {
            for crop in try sampler.drawCrops(volume: volume, candidates: cand, rng: &rng) {
                total += 1
                let (i, j, k) = (crop.drawn[0], crop.drawn[1], crop.drawn[2])
                if crop.foreground {
                    fg += 1
                    XCTAssertNotEqual(owned.label(i, j, k), 0, "a foreground centre is labelled")
                    fgHits[(i * 20 + j) * 16 + k, default: 0] += 1
                } else {
                    XCTAssertEqual(owned.label(i, j, k), 0, "a background centre is label 0")
                    XCTAssertGreaterThan(owned.value(0, i, j, k), 0, "a background centre has image > threshold 0")
                }
                for a in 0..<3 {
                    // the crop fits, and its centre is the drawn voxel moved as little as possible
                    XCTAssertTrue(crop.origin[a] >= 0 && crop.origin[a] + sampler.config.patchSize[a] <= owned.size[a], "crop \(crop) fits")
                    XCTAssertEqual(crop.centre[a], PatchSampler.correctCentre(crop.drawn[a], patch: sampler.config.patchSize[a], size: owned.size[a]))
                    XCTAssertEqual(crop.origin[a], crop.centre[a] - sampler.config.patchSize[a] / 2)
                }
            }
        }
        // pos = neg = 1: foreground with probability 1/2 per sample; standard error 0.0035 for 20000.
        XCTAssertEqual(Double(fg) / Double(total), 0.5, accuracy: 0.018)
        // each of the 24 foreground voxels equally likely: ~417 each, sd ~20
        XCTAssertEqual(fgHits.count, 24)
        for (voxel, n) in fgHits { XCTAssertTrue(n > 317 && n < 517, "foreground voxel \(voxel) drawn \(n) times") }
    }

    func testOneSidedAndEmptyVolumes() throws {
        let sampler = try PatchSampler(config: .init(patchSize: [2, 2, 2], samplesPerVolume: 50))
        var rng = SplitMix64(seed: 5)
        let allForeground = OwnedVolume(size: [3, 3, 3], image: { _, _, _, _ in 1 }, label: { _, _, _ in 2 })
        let v1 = try allForeground.volume()
        XCTAssertTrue(try sampler.drawCrops(volume: v1, candidates: CropCandidates(volume: v1, imageThreshold: 0), rng: &rng).allSatisfy { $0.foreground })
        let noForeground = OwnedVolume(size: [3, 3, 3], image: { _, _, _, _ in 1 }, label: { _, _, _ in 0 })
        let v2 = try noForeground.volume()
        XCTAssertTrue(try sampler.drawCrops(volume: v2, candidates: CropCandidates(volume: v2, imageThreshold: 0), rng: &rng).allSatisfy { !$0.foreground })
        let empty = OwnedVolume(size: [3, 3, 3], image: { _, _, _, _ in 0 }, label: { _, _, _ in 0 })
        let v3 = try empty.volume()
        XCTAssertThrowsError(try sampler.drawCrops(volume: v3, candidates: CropCandidates(volume: v3, imageThreshold: 0), rng: &rng)) { e in
            XCTAssertTrue("\(e)".contains("no voxel to centre a crop on"), "\(e)")
        }
        // without an image threshold every label-0 voxel is background
        XCTAssertEqual(try CropCandidates(volume: v3, imageThreshold: nil).backgroundCount, 27)
    }

    func testSmallerThanPatchIsPaddedSymmetrically() throws {
        let owned = OwnedVolume(size: [3, 10, 4], image: { _, _, _, _ in 1 }, label: { i, _, _ in Int32(i % 2) })
        let volume = try owned.volume()
        let sampler = try PatchSampler(config: .init(patchSize: [8, 6, 4], samplesPerVolume: 20))
        var rng = SplitMix64(seed: 6)
        for crop in try sampler.drawCrops(volume: volume, candidates: CropCandidates(volume: volume, imageThreshold: 0), rng: &rng) {
            XCTAssertEqual(crop.origin[0], -2, "axis 0: 3 -> 8, 2 before and 3 after (MONAI symmetric pad)")
            XCTAssertTrue(crop.origin[1] >= 0 && crop.origin[1] <= 4)
            XCTAssertEqual(crop.origin[2], 0, "axis 2: patch equals the size")
        }
    }

    func testLabelValidation() throws {
        let owned = OwnedVolume(size: [2, 3, 4], image: { _, _, _, _ in 1 }, label: { i, j, k in (i, j, k) == (1, 2, 1) ? 5 : 0 })
        XCTAssertThrowsError(try CropCandidates(volume: owned.volume(), imageThreshold: 0, classes: 4)) { e in
            XCTAssertTrue("\(e)".contains("[1, 2, 1]") && "\(e)".contains("got 5"), "\(e)")
        }
        XCTAssertNoThrow(try CropCandidates(volume: owned.volume(), imageThreshold: 0))
        let negative = OwnedVolume(size: [1, 1, 2], image: { _, _, _, _ in 1 }, label: { _, _, k in k == 1 ? -1 : 0 })
        XCTAssertThrowsError(try CropCandidates(volume: negative.volume(), imageThreshold: 0))
        XCTAssertThrowsError(try TrainingVolume(image: owned.image, labels: owned.labels, channels: 1, size: [2, 3]))
        XCTAssertThrowsError(try PatchSampler(config: .init(patchSize: [0, 4, 4])))
        XCTAssertThrowsError(try PatchSampler(config: .init(positive: 0, negative: 0)))
    }

    /// The whole batch: same seed -> same batch, restored generator -> same continuation, and the thread
    /// count does not matter.
    func testBatchesAreReproducible() throws {
        let a = OwnedVolume(channels: 2, size: [20, 18, 16], image: { c, i, j, k in Float(c + 1) * sin(Float(i * 3 + j * 2 + k) / 7) + 1 },
                            label: { i, j, k in (i + j) % 5 == 0 && k > 4 ? Int32(1 + k % 3) : 0 })
        let b = OwnedVolume(channels: 2, size: [9, 25, 12], image: { c, i, j, k in Float(c) + Float(i + j + k) / 30 },
                            label: { i, _, k in i > 3 && k < 6 ? 2 : 0 })
        let volumes = [try a.volume(), try b.volume()]
        let cands = try volumes.map { try CropCandidates(volume: $0, imageThreshold: 0) }
        let sampler = try PatchSampler(config: .init(patchSize: [10, 8, 6]))
        let aug = try Augmentation(config: .mrRobust)
        let n = 4, pv = 10 * 8 * 6
        func batch(_ rng: inout SplitMix64) throws -> ([Float], [Int32], [PatchSampler.Patch]) {
            var images = [Float](repeating: .nan, count: n * 2 * pv), labels = [Int32](repeating: -1, count: n * pv)
            let patches = try images.withUnsafeMutableBufferPointer { ib in
                try labels.withUnsafeMutableBufferPointer { lb in
                    try sampler.makeBatch(volumes: volumes, candidates: cands, augmentation: aug, rng: &rng,
                                          images: ib.baseAddress!, labels: lb.baseAddress!)
                }
            }
            return (images, labels, patches)
        }
        try Threads.setCount(1)
        var r1 = SplitMix64(seed: 77)
        let (i1, l1, p1) = try batch(&r1)
        let saved = r1.state
        let (i2, l2, _) = try batch(&r1)
        XCTAssertEqual(p1.map(\.volume), [0, 0, 1, 1])
        XCTAssertTrue(allFinite(i1) && !l1.contains(-1), "every voxel written")
        XCTAssertNotEqual(i1, i2, "the next batch differs")
        try Threads.setCount(2)
        var r2 = SplitMix64(seed: 77)
        let (j1, m1, q1) = try batch(&r2)
        assertIdentical(j1, i1, "images: same seed, 2 threads")
        XCTAssertEqual(m1, l1, "labels: same seed")
        XCTAssertEqual(q1, p1, "patches: same seed")
        var r3 = SplitMix64(state: saved)
        let (j2, m2, _) = try batch(&r3)
        assertIdentical(j2, i2, "images: restored state continues")
        XCTAssertEqual(m2, l2, "labels: restored state continues")
    }
}
