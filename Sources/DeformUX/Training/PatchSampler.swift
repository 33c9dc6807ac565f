/// One training volume, borrowed for the duration of a call (nothing is copied or kept):
///
///     image   Cin x D x H x W float32 (channels-first, C order), already preprocessed
///     labels  D x H x W Int32 class indices (0 = background)
///
/// D, H, W are the NIfTI x, y, z (ARCHITECTURE.md section 8).
public struct TrainingVolume {
    public let image: UnsafePointer<Float>
    public let labels: UnsafePointer<Int32>
    public let channels: Int
    /// [D, H, W]
    public let size: [Int]
    public var voxels: Int { size[0] * size[1] * size[2] }

    public init(image: UnsafePointer<Float>, labels: UnsafePointer<Int32>, channels: Int, size: [Int]) throws {
        let op = "TrainingVolume"
        guard size.count == 3, size.allSatisfy({ $0 >= 1 }) else {
            throw DeformUXError.shapeMismatch(op, "a volume has three positive sizes D x H x W", expected: "[D, H, W], each >= 1", got: "\(size)")
        }
        guard channels >= 1 else {
            throw DeformUXError.invalidArgument(op, "the image needs at least one channel", expected: ">= 1", got: "\(channels)")
        }
        _ = try Tensor.elementCount([channels] + size, context: op)
        self.image = image
        self.labels = labels
        self.channels = channels
        self.size = size
    }
}

/// Where crops may be centred in one volume: the foreground voxels (label != 0) and the background
/// voxels (label == 0, and any image channel > `imageThreshold` when a threshold is given), exactly
/// MONAI's `map_binary_to_indices(label, image, image_threshold)`, in the same flat C order.
///
/// Built once per volume in one pass. Instead of MONAI's index lists (4 bytes per voxel) it keeps, per
/// row (d, h), how many foreground and background voxels come before the row; the k-th voxel is found
/// by a binary search over rows and a scan of one row. 16 bytes per row of W voxels.
public struct CropCandidates: Sendable {
    public let size: [Int]
    public let imageThreshold: Float?
    public let foregroundCount: Int
    public let backgroundCount: Int
    /// Rows (d, h) = D*H; entry r counts the voxels of rows before r (D*H + 1 entries).
    let foregroundBefore: [Int]
    let backgroundBefore: [Int]

    /// Scans `volume`; validates its labels (>= 0, and < `classes` when given), naming the first bad
    /// voxel.
    public init(volume: TrainingVolume, imageThreshold: Float?, classes: Int? = nil) throws {
        let op = "CropCandidates"
        if let classes, classes < 1 {
            throw DeformUXError.invalidArgument(op, "invalid class count", expected: ">= 1", got: "\(classes)")
        }
        let (d, h, w) = (volume.size[0], volume.size[1], volume.size[2])
        let rows = d * h
        let voxels = volume.voxels
        let limit = Int32(clamping: classes ?? Int(Int32.max))
        var fg = [Int](repeating: 0, count: rows + 1), bg = fg
        var nf = 0, nb = 0
        for r in 0..<rows {
            fg[r] = nf
            bg[r] = nb
            for x in 0..<w {
                let i = r * w + x
                let l = volume.labels[i]
                if l < 0 || l >= limit {
                    throw DeformUXError.invalidArgument(op, "label at [\(r / h), \(r % h), \(x)] is not a class index",
                                                        expected: classes.map { "0..<\($0)" } ?? ">= 0", got: "\(l)")
                }
                if l != 0 {
                    nf += 1
                } else if CropCandidates.isBackground(volume, i, voxels: voxels, threshold: imageThreshold) {
                    nb += 1
                }
            }
        }
        fg[rows] = nf
        bg[rows] = nb
        size = volume.size
        self.imageThreshold = imageThreshold
        foregroundCount = nf
        backgroundCount = nb
        foregroundBefore = fg
        backgroundBefore = bg
    }

    @inline(__always)
    static func isBackground(_ v: TrainingVolume, _ i: Int, voxels: Int, threshold: Float?) -> Bool {
        guard v.labels[i] == 0 else { return false }
        guard let t = threshold else { return true }
        for c in 0..<v.channels where v.image[c * voxels + i] > t { return true }
        return false
    }

    /// The flat index (C order over D x H x W) of the k-th foreground or background voxel, k < count.
    public func voxel(foreground: Bool, rank k: Int, in volume: TrainingVolume) throws -> Int {
        let before = foreground ? foregroundBefore : backgroundBefore
        let count = foreground ? foregroundCount : backgroundCount
        guard volume.size == size else {
            throw DeformUXError.shapeMismatch("CropCandidates", "candidates were built for another volume", expected: "\(size)", got: "\(volume.size)")
        }
        guard k >= 0, k < count else {
            throw DeformUXError.invalidArgument("CropCandidates", "rank out of range", expected: "0..<\(count)", got: "\(k)")
        }
        // the last row r with before[r] <= k
        var lo = 0, hi = before.count - 1
        while hi - lo > 1 {
            let mid = (lo + hi) / 2
            if before[mid] <= k { lo = mid } else { hi = mid }
        }
        let w = size[2]
        var left = k - before[lo]
        for x in 0..<w {
            let i = lo * w + x
            let hit = foreground ? volume.labels[i] != 0
                : CropCandidates.isBackground(volume, i, voxels: volume.voxels, threshold: imageThreshold)
            if hit {
                if left == 0 { return i }
                left -= 1
            }
        }
        throw DeformUXError.internal("CropCandidates", "row \(lo) has fewer candidates than counted (was the volume changed?)")
    }
}

/// Random crop positions as MONAI's `RandCropByPosNegLabeld(spatial_size, pos, neg, num_samples,
/// image_key, image_threshold)`, the sampler of the training recipe (pos = neg = 1, 2 samples per
/// volume, image_threshold 0 as in the released 3D UX-Net / DeformUX-Net scripts).
///
/// Per sample (MONAI's `generate_pos_neg_label_crop_centers`): foreground with probability
/// pos / (pos + neg) (independently per sample: 1:1 in expectation, not alternation), else background;
/// a voxel drawn uniformly from that set; if one set is empty every sample uses the other (MONAI warns),
/// if both are, an error. The centre is then moved so the crop fits (MONAI's `correct_crop_centers`):
/// per axis clamped to [P div 2, L - ceil(P / 2)], and the crop starts at centre - P div 2.
///
/// A volume smaller than the patch along an axis is first padded to the patch size, symmetrically
/// (MONAI's `SpatialPad`, method "symmetric": floor of the difference before, the rest after) with
/// image 0 and label 0, virtually: the crop origin is then negative and `Augmentation.apply` reads
/// those voxels as padding. Centres are drawn from the volume's own voxels only; MONAI would also
/// count padded voxels as background when no image threshold is given (with threshold 0 and image 0
/// they are excluded there too).
public struct PatchSampler: Sendable {
    public struct Config: Equatable, Sendable, Codable {
        /// [P0, P1, P2]
        public var patchSize: [Int]
        public var samplesPerVolume: Int
        public var positive: Double
        public var negative: Double
        /// Background must have some image channel above this (MONAI image_key + image_threshold); nil:
        /// every label-0 voxel is background.
        public var imageThreshold: Float?

        public init(patchSize: [Int] = [96, 96, 96], samplesPerVolume: Int = 2, positive: Double = 1,
                    negative: Double = 1, imageThreshold: Float? = 0) {
            self.patchSize = patchSize
            self.samplesPerVolume = samplesPerVolume
            self.positive = positive
            self.negative = negative
            self.imageThreshold = imageThreshold
        }

        /// pos / (pos + neg)
        public var positiveRatio: Double { positive / (positive + negative) }
    }

    /// One crop of a volume.
    public struct Crop: Equatable, Sendable {
        /// The voxel drawn, in the volume's coordinates.
        public var drawn: [Int]
        /// The corrected centre, in the volume's coordinates (it may lie in the padding of a volume
        /// smaller than the patch).
        public var centre: [Int]
        /// The crop's first voxel in the volume's coordinates; negative, or reaching past the end, only
        /// where the volume is smaller than the patch (padding).
        public var origin: [Int]
        public var foreground: Bool
    }

    public let config: Config

    public init(config: Config = Config()) throws {
        let op = "PatchSampler"
        guard config.patchSize.count == 3, config.patchSize.allSatisfy({ $0 >= 1 && $0 <= 4096 }) else {
            throw DeformUXError.invalidArgument(op, "patch size must be three sizes in 1...4096", expected: "[P0, P1, P2]", got: "\(config.patchSize)")
        }
        guard config.samplesPerVolume >= 1 else {
            throw DeformUXError.invalidArgument(op, "samples per volume must be >= 1", got: "\(config.samplesPerVolume)")
        }
        guard config.positive >= 0, config.negative >= 0, config.positive + config.negative > 0,
              config.positive.isFinite, config.negative.isFinite else {
            throw DeformUXError.invalidArgument(op, "pos and neg must be >= 0 and not both 0", got: "pos \(config.positive), neg \(config.negative)")
        }
        if let t = config.imageThreshold, t.isNaN {
            throw DeformUXError.invalidArgument(op, "image threshold is NaN")
        }
        self.config = config
    }

    /// Draws `samplesPerVolume` crops of `volume` (whose candidates are `candidates`), in order, each
    /// with two or more draws from `rng` (foreground or not, then the voxel).
    public func drawCrops(volume: TrainingVolume, candidates: CropCandidates, rng: inout SplitMix64) throws -> [Crop] {
        guard candidates.size == volume.size else {
            throw DeformUXError.shapeMismatch("PatchSampler", "candidates were built for another volume", expected: "\(candidates.size)", got: "\(volume.size)")
        }
        guard candidates.imageThreshold == config.imageThreshold else {
            throw DeformUXError.invalidArgument("PatchSampler", "candidates were built with another image threshold",
                                                expected: "\(config.imageThreshold.map { "\($0)" } ?? "none")",
                                                got: "\(candidates.imageThreshold.map { "\($0)" } ?? "none")")
        }
        let nf = candidates.foregroundCount, nb = candidates.backgroundCount
        guard nf + nb > 0 else {
            throw DeformUXError.invalidArgument("PatchSampler", "no voxel to centre a crop on: no foreground label and no background voxel above the image threshold",
                                                expected: "a labelled voxel or an image value > \(config.imageThreshold.map { "\($0)" } ?? "-inf")", got: "none")
        }
        let ratio = nf == 0 ? 0 : (nb == 0 ? 1 : config.positiveRatio)
        var crops: [Crop] = []
        crops.reserveCapacity(config.samplesPerVolume)
        for _ in 0..<config.samplesPerVolume {
            let foreground = rng.bernoulli(ratio)
            let k = rng.index(below: foreground ? nf : nb)
            let flat = try candidates.voxel(foreground: foreground, rank: k, in: volume)
            let drawn = [flat / (volume.size[1] * volume.size[2]), (flat / volume.size[2]) % volume.size[1], flat % volume.size[2]]
            crops.append(try crop(around: drawn, volumeSize: volume.size, foreground: foreground))
        }
        return crops
    }

    /// The crop for a drawn voxel: pad (virtually), correct the centre, place the crop.
    public func crop(around drawn: [Int], volumeSize: [Int], foreground: Bool) throws -> Crop {
        guard drawn.count == 3, volumeSize.count == 3, volumeSize.allSatisfy({ $0 >= 1 }) else {
            throw DeformUXError.invalidArgument("PatchSampler", "a voxel and a volume size have three values",
                                                got: "voxel \(drawn), size \(volumeSize)")
        }
        var centre = drawn, origin = drawn
        for a in 0..<3 {
            let p = config.patchSize[a], l = volumeSize[a]
            let padded = max(l, p)
            let before = (padded - l) / 2
            let c = PatchSampler.correctCentre(drawn[a] + before, patch: p, size: padded)
            centre[a] = c - before
            origin[a] = c - p / 2 - before
        }
        return Crop(drawn: drawn, centre: centre, origin: origin, foreground: foreground)
    }

    /// MONAI's `correct_crop_centers` for one axis of a volume at least as large as the patch:
    /// clamp to [P div 2, floor(L + 1 - P / 2) - 1] = [P div 2, L - ceil(P / 2)].
    public static func correctCentre(_ c: Int, patch p: Int, size l: Int) -> Int {
        min(max(c, p / 2), l - (p + 1) / 2)
    }
}

extension PatchSampler {
    /// One patch of a batch: its volume (index into the batch's volumes), crop and augmentation draws.
    public struct Patch: Equatable, Sendable {
        public var volume: Int
        public var crop: Crop
        public var parameters: Augmentation.Parameters
    }

    /// Fills a batch of patches from `volumes` (with their `candidates`, same order):
    ///
    ///     images  N x Cin x P0 x P1 x P2 float32     N = volumes.count * samplesPerVolume
    ///     labels  N x P0 x P1 x P2 Int32
    ///
    /// Patch n comes from volume n / samplesPerVolume. Draw order, fixed: for each volume, its crops
    /// (all of them first, as MONAI's crop transform returns its samples together), then for each of
    /// those crops its augmentation parameters. Everything is a function of `rng`'s state on entry, so
    /// the same seed gives the same batch, and a restored state the same continuation.
    @discardableResult
    public func makeBatch(volumes: [TrainingVolume], candidates: [CropCandidates], augmentation: Augmentation,
                          rng: inout SplitMix64, images: UnsafeMutablePointer<Float>,
                          labels: UnsafeMutablePointer<Int32>) throws -> [Patch] {
        let op = "PatchSampler.makeBatch"
        guard !volumes.isEmpty, volumes.count == candidates.count else {
            throw DeformUXError.invalidArgument(op, "one candidate set per volume, at least one volume",
                                                expected: "\(volumes.count) candidate sets", got: "\(candidates.count)")
        }
        let channels = volumes[0].channels
        if let i = volumes.firstIndex(where: { $0.channels != channels }) {
            throw DeformUXError.shapeMismatch(op, "all volumes of a batch need the same channel count",
                                              expected: "\(channels) (volume 0)", got: "\(volumes[i].channels) (volume \(i))")
        }
        let patchVoxels = try Tensor.elementCount(config.patchSize, context: op)
        _ = try Tensor.elementCount([volumes.count * config.samplesPerVolume, channels, patchVoxels], context: op)
        var patches: [Patch] = []
        for (v, volume) in volumes.enumerated() {
            let crops = try drawCrops(volume: volume, candidates: candidates[v], rng: &rng)
            for crop in crops {
                let n = patches.count
                let parameters = augmentation.draw(&rng)
                try augmentation.apply(parameters, volume: volume, origin: crop.origin, patchSize: config.patchSize,
                                       image: images + n * channels * patchVoxels, labels: labels + n * patchVoxels)
                patches.append(Patch(volume: v, crop: crop, parameters: parameters))
            }
        }
        return patches
    }
}
