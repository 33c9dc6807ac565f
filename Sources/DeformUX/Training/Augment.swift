#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Patch augmentation in one resampling pass: the crop and a random affine about the patch centre are
/// applied together, so rotated corners read real voxels of the volume (not padding of a pre-cut crop),
/// and the image is interpolated once.
///
/// Geometry (MONAI's `RandAffine` conventions: rotation then scale, angles about the array axes in
/// intrinsic "XYZ" order, grid centred on the patch). For output voxel o of a patch of size P cut at
/// `origin`:
///
///     u = o - (P - 1) / 2                       offset from the patch centre, voxels
///     p = origin + (P - 1) / 2 + R S u          source position in the volume
///     R = R0(a0) R1(a1) R2(a2),  S = diag(s0, s1, s2)
///
/// where Rk rotates the plane of the two other axes (MONAI's create_rotate). The identity (a = 0,
/// s = 1) reproduces the plain crop exactly; sines and cosines of multiples of 90 degrees are exact, so
/// a quarter turn is an exact transpose and flip. Image: trilinear; labels: nearest (ties to even, as
/// grid_sample's nearest). Outside the volume, `padding` decides: `.zeros` (image 0, label 0: MONAI's
/// constant pad, and grid_sample's "zeros" where a corner outside counts 0) or `.border` (coordinates
/// clamped to the volume: grid_sample's "border"). MONAI's RandAffine defaults to "reflection" on the
/// cut patch; cutting after the warp makes that padding mostly unnecessary.
///
/// Intensity, in this order, per voxel of every image channel:
///
///     x = warp(image)
///     x = x * field(p)                  bias field, if drawn
///     x = x + sigma * N(0, 1)           Gaussian noise, if drawn (independent per voxel and channel)
///     x = x + shift                     intensity shift, if drawn (one value per patch, all channels)
///
/// The bias field is a smooth multiplicative field attached to the volume (like a scanner's): with
/// normalised coordinates xi = clamp(2 p / (L - 1) - 1, -1, 1) per axis,
///
///     q(p)     = sum over i+j+k in 1...degree of c_ijk P_i(x0) P_j(x1) P_k(x2)     (P = Legendre)
///     field(p) = 1 + amplitude * q(p) / sum |c_ijk|
///
/// so |field - 1| <= amplitude everywhere (|P_n| <= 1 on [-1, 1]). This is MONAI's RandBiasField's
/// Legendre basis, normalised so that "up to +-20%" is a bound rather than MONAI's exp of a sum whose
/// range depends on the degree.
public struct Augmentation: Sendable {
    public enum Padding: String, Sendable, Codable { case zeros, border }

    public struct Config: Equatable, Sendable, Codable {
        /// Rotation: with this probability, angle a_k uniform in [-range_k, range_k] degrees per axis.
        public var rotationProbability: Double
        public var rotationDegrees: [Double]
        /// Scaling: with this probability, s_k = 1 + uniform in [-range_k, range_k] per axis.
        public var scaleProbability: Double
        public var scaleRange: [Double]
        /// Intensity shift: with this probability, + uniform in [-range, range].
        public var shiftProbability: Double
        public var shiftRange: Double
        /// Gaussian noise: with this probability, sigma uniform in [0, maxFraction] * intensityRange
        /// (MONAI's RandGaussianNoise draws its std the same way).
        public var noiseProbability: Double
        public var noiseMaxFraction: Double
        /// Bias field: with this probability, amplitude uniform in [0, maxAmplitude] and coefficients
        /// uniform in [-1, 1].
        public var biasFieldProbability: Double
        public var biasFieldMaxAmplitude: Double
        public var biasFieldDegree: Int
        /// The image's intensity range, the unit of the noise sigma: 1 after the percentile scaling
        /// (P1..P99 -> 0..1) of the preprocessing.
        public var intensityRange: Double
        public var padding: Padding

        /// The paper's recipe (appendix A.1: rotation -30..30 degrees, scaling 0.1 per axis, intensity
        /// shift 0.1) with the released scripts' probabilities (RandAffined prob 1.0, RandShiftIntensityd
        /// prob 0.5). The released scripts rotate about the third axis only, by up to pi/15 (12 degrees)
        /// or pi/30 (6 degrees) depending on the dataset; set `rotationDegrees` to [0, 0, 12] for that.
        public init(rotationProbability: Double = 1, rotationDegrees: [Double] = [30, 30, 30],
                    scaleProbability: Double = 1, scaleRange: [Double] = [0.1, 0.1, 0.1],
                    shiftProbability: Double = 0.5, shiftRange: Double = 0.1,
                    noiseProbability: Double = 0, noiseMaxFraction: Double = 0.05,
                    biasFieldProbability: Double = 0, biasFieldMaxAmplitude: Double = 0.2, biasFieldDegree: Int = 3,
                    intensityRange: Double = 1, padding: Padding = .zeros) {
            self.rotationProbability = rotationProbability
            self.rotationDegrees = rotationDegrees
            self.scaleProbability = scaleProbability
            self.scaleRange = scaleRange
            self.shiftProbability = shiftProbability
            self.shiftRange = shiftRange
            self.noiseProbability = noiseProbability
            self.noiseMaxFraction = noiseMaxFraction
            self.biasFieldProbability = biasFieldProbability
            self.biasFieldMaxAmplitude = biasFieldMaxAmplitude
            self.biasFieldDegree = biasFieldDegree
            self.intensityRange = intensityRange
            self.padding = padding
        }

        /// The paper's recipe (the defaults).
        public static let paper = Config()
        /// The recipe plus MR robustness: Gaussian noise up to 5% of the intensity range and a bias
        /// field up to +-20%, each with probability 0.5 (the noisy variant of the brain-tissue task).
        public static let mrRobust = Config(noiseProbability: 0.5, biasFieldProbability: 0.5)
        /// No augmentation: plain crops.
        public static let none = Config(rotationProbability: 0, scaleProbability: 0, shiftProbability: 0)
    }

    /// The random draws for one patch (what `draw` produced; also constructible by hand for tests).
    public struct Parameters: Equatable, Sendable {
        /// R S, row-major 3 x 3: source offset = matrix * output offset.
        public var matrix: [Double]
        public var biasAmplitude: Double
        /// One coefficient per `Augmentation.biasTerms(degree:)` term.
        public var biasCoefficients: [Double]
        public var noiseSigma: Double
        /// Seeds the noise streams (one per channel and output plane, so threads do not matter).
        public var noiseKey: UInt64
        public var shift: Float

        public static let identity = Parameters(matrix: [1, 0, 0, 0, 1, 0, 0, 0, 1], biasAmplitude: 0,
                                                biasCoefficients: [], noiseSigma: 0, noiseKey: 0, shift: 0)

        public init(matrix: [Double], biasAmplitude: Double, biasCoefficients: [Double], noiseSigma: Double,
                    noiseKey: UInt64, shift: Float) {
            self.matrix = matrix
            self.biasAmplitude = biasAmplitude
            self.biasCoefficients = biasCoefficients
            self.noiseSigma = noiseSigma
            self.noiseKey = noiseKey
            self.shift = shift
        }
    }

    public let config: Config
    /// (i, j, k) with 1 <= i + j + k <= degree, in lexicographic order.
    public let biasTerms: [(Int, Int, Int)]

    public init(config: Config = Config()) throws {
        let op = "Augmentation"
        let probabilities = [config.rotationProbability, config.scaleProbability, config.shiftProbability,
                             config.noiseProbability, config.biasFieldProbability]
        guard probabilities.allSatisfy({ $0 >= 0 && $0 <= 1 }) else {
            throw DeformUXError.invalidArgument(op, "probabilities must lie in [0, 1]", got: "\(probabilities)")
        }
        guard config.rotationDegrees.count == 3, config.scaleRange.count == 3,
              config.rotationDegrees.allSatisfy({ $0 >= 0 && $0 <= 180 }),
              config.scaleRange.allSatisfy({ $0 >= 0 && $0 < 1 }) else {
            throw DeformUXError.invalidArgument(op, "rotation ranges (degrees, 0...180) and scale ranges (0..<1) need one value per axis",
                                                got: "rotation \(config.rotationDegrees), scale \(config.scaleRange)")
        }
        let amounts = [config.shiftRange, config.noiseMaxFraction, config.biasFieldMaxAmplitude, config.intensityRange]
        guard amounts.allSatisfy({ $0 >= 0 && $0.isFinite }), config.biasFieldMaxAmplitude < 1 else {
            throw DeformUXError.invalidArgument(op, "shift range, noise fraction, intensity range must be finite >= 0 and the bias amplitude in [0, 1)",
                                                got: "\(amounts)")
        }
        guard config.biasFieldDegree >= 1, config.biasFieldDegree <= 3 else {
            throw DeformUXError.invalidArgument(op, "bias field degree", expected: "1...3", got: "\(config.biasFieldDegree)")
        }
        self.config = config
        var terms: [(Int, Int, Int)] = []
        for i in 0...config.biasFieldDegree {
            for j in 0...config.biasFieldDegree {
                for k in 0...config.biasFieldDegree where i + j + k >= 1 && i + j + k <= config.biasFieldDegree {
                    terms.append((i, j, k))
                }
            }
        }
        biasTerms = terms
    }

    /// Draws one patch's parameters. The number of draws depends only on the configuration (every
    /// parameter is drawn even when its augmentation is skipped), in this order: rotation (1 + 3),
    /// scaling (1 + 3), shift (1 + 1), bias field (1 + 1 + terms), noise (1 + 1 + the key).
    public func draw(_ rng: inout SplitMix64) -> Parameters {
        let c = config
        let rotate = rng.bernoulli(c.rotationProbability)
        var angles = [0.0, 0, 0]
        for a in 0..<3 {
            let r = c.rotationDegrees[a] * Double.pi / 180
            angles[a] = rng.uniformDouble(-r, r)
        }
        let scale = rng.bernoulli(c.scaleProbability)
        var factors = [1.0, 1, 1]
        for a in 0..<3 { factors[a] = 1 + rng.uniformDouble(-c.scaleRange[a], c.scaleRange[a]) }
        let shift = rng.bernoulli(c.shiftProbability)
        let shiftValue = rng.uniformDouble(-c.shiftRange, c.shiftRange)
        let bias = rng.bernoulli(c.biasFieldProbability)
        let amplitude = rng.uniformDouble(0, c.biasFieldMaxAmplitude)
        let coefficients = biasTerms.map { _ in rng.uniformDouble(-1, 1) }
        let noise = rng.bernoulli(c.noiseProbability)
        let sigma = rng.uniformDouble(0, c.noiseMaxFraction) * c.intensityRange
        let key = rng.next()
        let r = rotate ? Augmentation.rotation(angles[0], angles[1], angles[2]) : Augmentation.rotation(0, 0, 0)
        var m = r
        if scale { for row in 0..<3 { for col in 0..<3 { m[row * 3 + col] *= factors[col] } } }
        return Parameters(matrix: m, biasAmplitude: bias ? amplitude : 0, biasCoefficients: bias ? coefficients : [],
                          noiseSigma: noise ? sigma : 0, noiseKey: key, shift: shift ? Float(shiftValue) : 0)
    }

    /// R0(a0) R1(a1) R2(a2), row-major (MONAI's create_rotate, intrinsic "XYZ"); angles in radians.
    public static func rotation(_ a0: Double, _ a1: Double, _ a2: Double) -> [Double] {
        var r: [Double] = [1, 0, 0, 0, 1, 0, 0, 0, 1]
        for (axis, angle) in [a0, a1, a2].enumerated() {
            let (s, c) = sinCos(angle)
            var e: [Double] = [1, 0, 0, 0, 1, 0, 0, 0, 1]
            switch axis {
            case 0: e[4] = c; e[5] = -s; e[7] = s; e[8] = c
            case 1: e[0] = c; e[2] = s; e[6] = -s; e[8] = c
            default: e[0] = c; e[1] = -s; e[3] = s; e[4] = c
            }
            var out = [Double](repeating: 0, count: 9)
            for i in 0..<3 { for j in 0..<3 { for k in 0..<3 { out[i * 3 + j] += r[i * 3 + k] * e[k * 3 + j] } } }
            r = out
        }
        return r
    }

    /// sin and cos, exact at multiples of 90 degrees (within 1e-12 rad).
    static func sinCos(_ x: Double) -> (Double, Double) {
        let quarter = (x / (Double.pi / 2)).rounded()
        if abs(x - quarter * Double.pi / 2) < 1e-12 {
            switch ((Int(quarter) % 4) + 4) % 4 {
            case 0: return (0, 1)
            case 1: return (1, 0)
            case 2: return (0, -1)
            default: return (-1, 0)
            }
        }
        return (sin(x), cos(x))
    }

    /// Writes one augmented patch: `image` (Cin x P0 x P1 x P2) and `labels` (P0 x P1 x P2), cut at
    /// `origin` (volume coordinates, see `PatchSampler.Crop.origin`). Parallel over output planes.
    public func apply(_ p: Parameters, volume: TrainingVolume, origin: [Int], patchSize: [Int],
                      image: UnsafeMutablePointer<Float>, labels: UnsafeMutablePointer<Int32>) throws {
        let op = "Augmentation.apply"
        guard origin.count == 3, patchSize.count == 3, patchSize.allSatisfy({ $0 >= 1 }) else {
            throw DeformUXError.invalidArgument(op, "origin and patch size need three values (patch sizes >= 1)",
                                                got: "origin \(origin), patch \(patchSize)")
        }
        guard p.matrix.count == 9, p.matrix.allSatisfy({ abs($0) <= 100 }) else {
            throw DeformUXError.invalidArgument(op, "matrix must be 9 values in [-100, 100]", got: "\(p.matrix)")
        }
        guard origin.allSatisfy({ abs($0) <= 1 << 40 }) else {
            throw DeformUXError.invalidArgument(op, "origin out of range", got: "\(origin)")
        }
        guard p.biasCoefficients.isEmpty || p.biasCoefficients.count == biasTerms.count else {
            throw DeformUXError.invalidArgument(op, "bias coefficients", expected: "\(biasTerms.count) values", got: "\(p.biasCoefficients.count)")
        }
        guard p.noiseSigma >= 0, p.noiseSigma.isFinite, p.biasAmplitude >= 0, p.biasAmplitude < 1, p.shift.isFinite else {
            throw DeformUXError.invalidArgument(op, "noise sigma >= 0, bias amplitude in [0, 1), finite shift",
                                                got: "\(p.noiseSigma), \(p.biasAmplitude), \(p.shift)")
        }
        _ = try Tensor.elementCount([volume.channels] + patchSize, context: op)
        let (p0, p1, p2) = (patchSize[0], patchSize[1], patchSize[2])
        let (l0, l1, l2) = (volume.size[0], volume.size[1], volume.size[2])
        let plane = p1 * p2, patchVoxels = p0 * plane, voxels = volume.voxels
        let (m0, m1, m2, m3, m4, m5, m6, m7, m8) = (p.matrix[0], p.matrix[1], p.matrix[2], p.matrix[3], p.matrix[4],
                                                      p.matrix[5], p.matrix[6], p.matrix[7], p.matrix[8])
        let (h0, h1, h2) = (Double(p0 - 1) / 2, Double(p1 - 1) / 2, Double(p2 - 1) / 2)
        let (c0, c1, c2) = (Double(origin[0]) + h0, Double(origin[1]) + h1, Double(origin[2]) + h2)
        let border = config.padding == .border
        let useBias = p.biasAmplitude > 0 && !p.biasCoefficients.isEmpty
        let biasNorm = p.biasCoefficients.reduce(0) { $0 + abs($1) }
        let biasScale = useBias && biasNorm > 0 ? p.biasAmplitude / biasNorm : 0
        let terms = biasTerms
        let coefficients = p.biasCoefficients
        let channels = volume.channels
        let src = volume.image, srcLabels = volume.labels
        let limits = (Double(l0 - 1), Double(l1 - 1), Double(l2 - 1))

        parallelFor(p0) { o0 in
            let u0 = Double(o0) - h0
            for o1 in 0..<p1 {
                let u1 = Double(o1) - h1
                for o2 in 0..<p2 {
                    let u2 = Double(o2) - h2
                    var x = c0 + m0 * u0 + m1 * u1 + m2 * u2
                    var y = c1 + m3 * u0 + m4 * u1 + m5 * u2
                    var z = c2 + m6 * u0 + m7 * u1 + m8 * u2
                    let out = o0 * plane + o1 * p2 + o2
                    // the field is evaluated where the voxel comes from (clamped inside the volume)
                    var field: Float = 1
                    if biasScale > 0 {
                        field = Float(1 + biasScale * Augmentation.biasPolynomial(x, y, z, limits: limits, terms: terms, coefficients: coefficients))
                    }
                    if border {
                        x = min(max(x, 0), limits.0); y = min(max(y, 0), limits.1); z = min(max(z, 0), limits.2)
                    }
                    // labels: nearest, ties to even
                    let n0 = Int(x.rounded(.toNearestOrEven)), n1 = Int(y.rounded(.toNearestOrEven)), n2 = Int(z.rounded(.toNearestOrEven))
                    let inside = n0 >= 0 && n0 < l0 && n1 >= 0 && n1 < l1 && n2 >= 0 && n2 < l2
                    labels[out] = inside ? srcLabels[(n0 * l1 + n1) * l2 + n2] : 0
                    // image: trilinear over the 8 neighbours, a neighbour outside counting 0
                    let f0 = x.rounded(.down), f1 = y.rounded(.down), f2 = z.rounded(.down)
                    let i0 = Int(f0), i1 = Int(f1), i2 = Int(f2)
                    let t0 = Float(x - f0), t1 = Float(y - f1), t2 = Float(z - f2)
                    let w0 = SIMD2<Float>(1 - t0, t0), w1 = SIMD2<Float>(1 - t1, t1), w2 = SIMD2<Float>(1 - t2, t2)
                    for c in 0..<channels {
                        let base = src + c * voxels
                        var acc: Float = 0
                        for a in 0..<2 where i0 + a >= 0 && i0 + a < l0 && w0[a] != 0 {
                            for b in 0..<2 where i1 + b >= 0 && i1 + b < l1 && w1[b] != 0 {
                                for d in 0..<2 where i2 + d >= 0 && i2 + d < l2 && w2[d] != 0 {
                                    acc += w0[a] * w1[b] * w2[d] * base[((i0 + a) * l1 + i1 + b) * l2 + i2 + d]
                                }
                            }
                        }
                        image[c * patchVoxels + out] = acc * field
                    }
                }
            }
            // noise and shift for this plane of every channel
            for c in 0..<channels {
                let row = image + c * patchVoxels + o0 * plane
                if p.noiseSigma > 0 {
                    var g = SplitMix64.stream(key: p.noiseKey, index: c * p0 + o0)
                    g.addNormal(row, count: plane, sigma: p.noiseSigma)
                }
                if p.shift != 0 { for i in 0..<plane { row[i] += p.shift } }
            }
        }
    }

    /// q(p) of the bias field (see the type's comment), coordinates normalised over the volume.
    static func biasPolynomial(_ x: Double, _ y: Double, _ z: Double, limits: (Double, Double, Double),
                               terms: [(Int, Int, Int)], coefficients: [Double]) -> Double {
        func legendre(_ v: Double, _ limit: Double) -> (Double, Double, Double, Double) {
            let t = limit > 0 ? min(max(2 * v / limit - 1, -1), 1) : 0
            return (1, t, (3 * t * t - 1) / 2, (5 * t * t * t - 3 * t) / 2)
        }
        func pick(_ l: (Double, Double, Double, Double), _ n: Int) -> Double {
            switch n { case 0: return l.0; case 1: return l.1; case 2: return l.2; default: return l.3 }
        }
        let lx = legendre(x, limits.0), ly = legendre(y, limits.1), lz = legendre(z, limits.2)
        var q = 0.0
        for (t, term) in terms.enumerated() {
            q += coefficients[t] * pick(lx, term.0) * pick(ly, term.1) * pick(lz, term.2)
        }
        return q
    }
}
