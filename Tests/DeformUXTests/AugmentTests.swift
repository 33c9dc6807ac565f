import XCTest
@testable import DeformUX

final class AugmentTests: XCTestCase {
    let threads = ThreadCountGuard()
    override func tearDown() { threads.restore() }

    /// A 2-channel 13 x 11 x 9 volume with distinct, non-zero values and labels 0..4.
    func volume() -> OwnedVolume {
        OwnedVolume(channels: 2, size: [13, 11, 9], image: { c, i, j, k in Float(c * 1000 + i * 100 + j * 10 + k) + 0.5 },
                    label: { i, j, k in Int32((i * 7 + j * 3 + k) % 5) })
    }

    func run(_ aug: Augmentation, _ p: Augmentation.Parameters, _ v: OwnedVolume, origin: [Int], patch: [Int]) throws -> ([Float], [Int32]) {
        let pv = patch.reduce(1, *)
        var image = [Float](repeating: .nan, count: v.channels * pv), labels = [Int32](repeating: -1, count: pv)
        try image.withUnsafeMutableBufferPointer { ib in
            try labels.withUnsafeMutableBufferPointer { lb in
                try aug.apply(p, volume: v.volume(), origin: origin, patchSize: patch, image: ib.baseAddress!, labels: lb.baseAddress!)
            }
        }
        return (image, labels)
    }

    /// What a plain crop (with zero padding) holds at patch voxel (o0, o1, o2).
    func cropValue(_ v: OwnedVolume, _ c: Int, _ origin: [Int], _ o: [Int]) -> (Float, Int32) {
        let i = origin[0] + o[0], j = origin[1] + o[1], k = origin[2] + o[2]
        guard i >= 0, i < v.size[0], j >= 0, j < v.size[1], k >= 0, k < v.size[2] else { return (0, 0) }
        return (v.value(c, i, j, k), v.label(i, j, k))
    }

    func testIdentityIsTheCropExactly() throws {
        let v = volume()
        let aug = try Augmentation(config: .none)
        // inside; touching the far corner; and hanging out (zero padding), odd and even patch sizes
        for (origin, patch) in [([2, 3, 1], [6, 5, 7]), ([7, 6, 2], [6, 5, 7]), ([-2, 8, -1], [5, 6, 4]), ([0, 0, 0], [13, 11, 9])] {
            let (image, labels) = try run(aug, .identity, v, origin: origin, patch: patch)
            var wantImage = image, wantLabels = labels
            for c in 0..<2 {
                for o0 in 0..<patch[0] { for o1 in 0..<patch[1] { for o2 in 0..<patch[2] {
                    let (x, l) = cropValue(v, c, origin, [o0, o1, o2])
                    let idx = (o0 * patch[1] + o1) * patch[2] + o2
                    wantImage[c * patch.reduce(1, *) + idx] = x
                    wantLabels[idx] = l
                } } }
            }
            assertIdentical(image, wantImage, shape: [2] + patch, "identity warp image, origin \(origin), patch \(patch)")
            XCTAssertEqual(labels, wantLabels, "identity warp labels, origin \(origin), patch \(patch)")
        }
    }

    /// A quarter turn about each axis is an exact transpose and flip of the crop (p = c + R u).
    func testQuarterTurnsAreTransposes() throws {
        let v = volume()
        let aug = try Augmentation(config: .none)
        let patch = [5, 5, 5], origin = [4, 3, 2]
        for axis in 0..<3 {
            for quarter in [1, -1, 2] {
                var angles = [0.0, 0, 0]
                angles[axis] = Double(quarter) * Double.pi / 2
                var p = Augmentation.Parameters.identity
                p.matrix = Augmentation.rotation(angles[0], angles[1], angles[2])
                let (image, labels) = try run(aug, p, v, origin: origin, patch: patch)
                for o0 in 0..<5 { for o1 in 0..<5 { for o2 in 0..<5 {
                    // u = o - 2; source = origin + 2 + R u, R an exact signed permutation
                    let u = [o0 - 2, o1 - 2, o2 - 2]
                    var s = [0, 0, 0]
                    for r in 0..<3 { s[r] = origin[r] + 2 + (0..<3).reduce(0) { $0 + Int(p.matrix[r * 3 + $1]) * u[$1] } }
                    let idx = (o0 * 5 + o1) * 5 + o2
                    XCTAssertEqual(image[idx], v.value(0, s[0], s[1], s[2]), "axis \(axis) quarter \(quarter) at \([o0, o1, o2])")
                    XCTAssertEqual(image[125 + idx], v.value(1, s[0], s[1], s[2]))
                    XCTAssertEqual(labels[idx], v.label(s[0], s[1], s[2]))
                } } }
                // and concretely for axis 2, +90 degrees: out[o0][o1][o2] = crop[o0 ... ] check one transpose
                if axis == 2 && quarter == 1 {
                    // R2(90) = [[0,-1,0],[1,0,0],[0,0,1]]: source = (c0 - u1, c1 + u0, c2 + u2)
                    XCTAssertEqual(image[(0 * 5 + 4) * 5 + 3], v.value(0, origin[0] + 2 - 2, origin[1] + 2 - 2, origin[2] + 3))
                }
            }
        }
    }

    /// Any affine: the image against a plain Double trilinear reference, labels are source labels at the
    /// rounded position.
    func testAffineMatchesReference() throws {
        let v = volume()
        for padding in [Augmentation.Padding.zeros, .border] {
            let aug = try Augmentation(config: .init(padding: padding))
            var rng = SplitMix64(seed: 8)
            for trial in 0..<4 {
                var p = aug.draw(&rng)
                p.shift = 0
                let origin = [trial - 1, 2, 1], patch = [7, 6, 5]
                let (image, labels) = try run(aug, p, v, origin: origin, patch: patch)
                let sourceLabels = Set((0..<v.voxels).map { v.labels[$0] })
                var want = [Double](), wantLabels = [Int32]()
                for c in 0..<2 {
                    for o0 in 0..<7 { for o1 in 0..<6 { for o2 in 0..<5 {
                        let s = sourcePosition(p.matrix, origin: origin, patch: patch, o: [o0, o1, o2], size: v.size, border: padding == .border)
                        want.append(trilinear(v, c, s))
                        if c == 0 { wantLabels.append(nearest(v, s)) }
                    } } }
                }
                // Float weights and sums: relative 1e-6 of values up to ~2300
                assertClose(image, want, atol: 5e-3, rtol: 1e-6, shape: [2] + patch, "\(padding) trial \(trial): image vs Double trilinear")
                XCTAssertEqual(labels, wantLabels, "\(padding) trial \(trial): nearest labels")
                XCTAssertTrue(Set(labels).isSubset(of: sourceLabels.union([0])), "labels come from the source")
            }
        }
    }

    /// origin + (P - 1) / 2 + M (o - (P - 1) / 2), clamped to the volume for border padding.
    func sourcePosition(_ m: [Double], origin: [Int], patch: [Int], o: [Int], size: [Int], border: Bool) -> [Double] {
        var s = [Double](repeating: 0, count: 3)
        for r in 0..<3 {
            var x: Double = Double(origin[r]) + Double(patch[r] - 1) / 2
            for k in 0..<3 {
                let u: Double = Double(o[k]) - Double(patch[k] - 1) / 2
                x += m[r * 3 + k] * u
            }
            s[r] = border ? min(max(x, 0), Double(size[r] - 1)) : x
        }
        return s
    }

    /// Trilinear interpolation in Double, corners outside counting 0.
    func trilinear(_ v: OwnedVolume, _ c: Int, _ s: [Double]) -> Double {
        let f: [Double] = s.map { (x: Double) -> Double in x.rounded(.down) }
        var acc = 0.0
        for corner in 0..<8 {
            var idx = [0, 0, 0]
            var w = 1.0
            var inside = true
            for a in 0..<3 {
                let bit = (corner >> (2 - a)) & 1
                idx[a] = Int(f[a]) + bit
                let t = s[a] - f[a]
                w *= bit == 1 ? t : 1 - t
                if idx[a] < 0 || idx[a] >= v.size[a] { inside = false }
            }
            if inside { acc += w * Double(v.value(c, idx[0], idx[1], idx[2])) }
        }
        return acc
    }

    /// The label at the rounded position (ties to even), 0 outside.
    func nearest(_ v: OwnedVolume, _ s: [Double]) -> Int32 {
        let n: [Int] = s.map { (x: Double) -> Int in Int(x.rounded(.toNearestOrEven)) }
        for a in 0..<3 where n[a] < 0 || n[a] >= v.size[a] { return 0 }
        return v.label(n[0], n[1], n[2])
    }

    func testDrawStatistics() throws {
        let aug = try Augmentation(config: .mrRobust)
        var rng = SplitMix64(seed: 9)
        var shifts = 0, noises = 0, biases = 0
        let n = 4000
        for _ in 0..<n {
            let p = aug.draw(&rng)
            // columns of R S have length s_k in [0.9, 1.1]; R S is never far from a rotation
            for col in 0..<3 {
                let len = (0..<3).reduce(0.0) { $0 + p.matrix[$1 * 3 + col] * p.matrix[$1 * 3 + col] }.squareRoot()
                XCTAssertTrue(len >= 0.9 - 1e-12 && len <= 1.1 + 1e-12, "column \(col) length \(len)")
            }
            if p.shift != 0 { shifts += 1; XCTAssertLessThanOrEqual(abs(p.shift), 0.1) }
            if p.noiseSigma > 0 { noises += 1; XCTAssertLessThanOrEqual(p.noiseSigma, 0.05) }
            if p.biasAmplitude > 0 { biases += 1; XCTAssertLessThanOrEqual(p.biasAmplitude, 0.2); XCTAssertEqual(p.biasCoefficients.count, 19) }
        }
        // probability 0.5 each: standard error 0.0079 for 4000
        for (name, k) in [("shift", shifts), ("noise", noises), ("bias", biases)] {
            XCTAssertEqual(Double(k) / Double(n), 0.5, accuracy: 0.04, name)
        }
        let off = try Augmentation(config: .none)
        let p = off.draw(&rng)
        XCTAssertEqual(p.matrix, Augmentation.Parameters.identity.matrix)
        XCTAssertEqual(p.shift, 0)
        XCTAssertEqual(p.noiseSigma, 0)
        XCTAssertEqual(p.biasAmplitude, 0)
    }

    func testNoiseShiftAndBiasField() throws {
        let size = [40, 36, 32]
        let flat = OwnedVolume(size: size, image: { _, _, _, _ in 0.5 }, label: { _, _, _ in 1 })
        let aug = try Augmentation(config: .mrRobust)
        let patch = [32, 32, 32], origin = [4, 2, 0]
        let count = Double(32 * 32 * 32)
        // Gaussian noise, sigma 0.05: mean 0.5 +- 5 * 0.05 / sqrt(n) = 0.0014; std within 2% (5 standard errors)
        var p = Augmentation.Parameters.identity
        p.noiseSigma = 0.05
        p.noiseKey = 1234
        try Threads.setCount(2)
        let (noisy, _) = try run(aug, p, flat, origin: origin, patch: patch)
        let mean = noisy.reduce(0.0) { $0 + Double($1) } / count
        let sd = (noisy.reduce(0.0) { $0 + (Double($1) - mean) * (Double($1) - mean) } / count).squareRoot()
        XCTAssertEqual(mean, 0.5, accuracy: 0.0014)
        XCTAssertEqual(sd, 0.05, accuracy: 0.001)
        try Threads.setCount(1)
        let (noisy1, _) = try run(aug, p, flat, origin: origin, patch: patch)
        assertIdentical(noisy1, noisy, "noise does not depend on the thread count")
        // neighbouring voxels are independent: lag-1 correlation ~ 0 (standard error 1/sqrt(n) = 0.0055)
        var corr = 0.0
        for i in 0..<(noisy.count - 1) { corr += (Double(noisy[i]) - mean) * (Double(noisy[i + 1]) - mean) }
        XCTAssertEqual(corr / count / (sd * sd), 0, accuracy: 0.03)

        // Shift: exactly + shift
        var q = Augmentation.Parameters.identity
        q.shift = 0.0625
        let (shifted, _) = try run(aug, q, flat, origin: origin, patch: patch)
        XCTAssertTrue(shifted.allSatisfy { $0 == 0.5625 })

        // Bias field: within [1 - a, 1 + a] times the image, smooth, not constant
        var rng = SplitMix64(seed: 10)
        for _ in 0..<5 {
            var b = aug.draw(&rng)
            b.matrix = Augmentation.Parameters.identity.matrix
            b.noiseSigma = 0
            b.shift = 0
            b.biasAmplitude = 0.2
            if b.biasCoefficients.isEmpty { b.biasCoefficients = (0..<19).map { _ in rng.uniformDouble(-1, 1) } }
            let (field, _) = try run(aug, b, flat, origin: origin, patch: patch)
            let ratio = field.map { Double($0) / 0.5 }
            XCTAssertGreaterThanOrEqual(ratio.min() ?? 0, 0.8 - 1e-6)
            XCTAssertLessThanOrEqual(ratio.max() ?? 9, 1.2 + 1e-6)
            XCTAssertGreaterThan((ratio.max() ?? 0) - (ratio.min() ?? 0), 0.01, "the field varies")
            // |d field / d voxel| <= a * max|P_n'| (6 for degree 3) * 2 / (L - 1) per axis
            var worst = 0.0
            for o0 in 0..<32 { for o1 in 0..<32 { for o2 in 0..<31 {
                let i = (o0 * 32 + o1) * 32 + o2
                worst = max(worst, abs(ratio[i + 1] - ratio[i]))
            } } }
            XCTAssertLessThanOrEqual(worst, 0.2 * 6 * 2 / 31, "neighbouring voxels along W")
        }
    }

    func testBorderPadding() throws {
        let v = volume()
        let aug = try Augmentation(config: .init(rotationProbability: 0, scaleProbability: 0, shiftProbability: 0, padding: .border))
        // a patch hanging off the low corner: every voxel reads the clamped position
        let (image, labels) = try run(aug, .identity, v, origin: [-3, -2, 7], patch: [4, 4, 4])
        for o0 in 0..<4 { for o1 in 0..<4 { for o2 in 0..<4 {
            let i = max(o0 - 3, 0), j = max(o1 - 2, 0), k = min(7 + o2, 8)
            let idx = (o0 * 4 + o1) * 4 + o2
            XCTAssertEqual(image[idx], v.value(0, i, j, k))
            XCTAssertEqual(labels[idx], v.label(i, j, k))
        } } }
    }

    func testErrors() throws {
        XCTAssertThrowsError(try Augmentation(config: .init(rotationProbability: 1.5)))
        XCTAssertThrowsError(try Augmentation(config: .init(scaleRange: [0.1, 0.1])))
        XCTAssertThrowsError(try Augmentation(config: .init(biasFieldDegree: 5)))
        let aug = try Augmentation()
        var p = Augmentation.Parameters.identity
        p.matrix = [1, 0, 0, 0, .nan, 0, 0, 0, 1]
        XCTAssertThrowsError(try run(aug, p, volume(), origin: [0, 0, 0], patch: [2, 2, 2]))
        XCTAssertThrowsError(try run(aug, .identity, volume(), origin: [0, 0], patch: [2, 2, 2]))
    }
}
