#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// How a `Segmenter` runs: the sliding window, the preprocessing and the postprocessing in one place
/// (defaults from the model card; the full model's are 96^3 windows at overlap 0.5, gaussian blending).
public struct SegmenterConfiguration: Equatable, Sendable {
    public var window: SIMD3<Int> = SIMD3(96, 96, 96)
    /// 0 <= overlap < 1.
    public var overlap: Double = 0.5
    public var blend: BlendMode = .gaussian()
    /// Windows per predictor call; nil: the predictor's preferred batch.
    public var batch: Int? = nil
    /// Flip test-time augmentation: the average of the logits over the 8 flip combinations (8x the work).
    public var flipTTA: Bool = false
    /// Reorient to the closest canonical (RAS+) orientation before anything else.
    public var reorient: Bool = true
    /// The model's voxel spacing in mm on the canonical axes; nil: keep the input's grid.
    public var spacing: SIMD3<Double>? = nil
    public var intensity: IntensityPreset = .none
    /// Pad the network's grid to a multiple of this; nil: the predictor's size multiple.
    public var padMultiple: Int? = nil
    /// The pad value in the network's units (after the intensity preset).
    public var padValue: Float = 0
    /// Skip windows that lie wholly outside the body: a window is not run when every one of its values
    /// is <= the threshold mapped through the intensity preset (the threshold is in the input's units,
    /// e.g. HU, the same for every channel). Skipped regions that no run window covers are background.
    /// The comparison happens after the preset: with a CT clip whose lower bound is above the threshold,
    /// every value at or below that bound counts as outside (e.g. clip -175...250 with threshold -500:
    /// windows holding only values <= -175 HU are skipped).
    /// The padding the segmenter adds around the image counts as outside whatever its value (after an MR
    /// preset, 0 lies above the mapped background), so only the image's own voxels decide.
    public var skipThreshold: Float? = nil
    /// Keep only the largest 26-connected component of each label (after restoring to the input grid).
    public var largestComponent: Bool = false

    public init(window: SIMD3<Int> = SIMD3(96, 96, 96), overlap: Double = 0.5, blend: BlendMode = .gaussian(),
                batch: Int? = nil, flipTTA: Bool = false, reorient: Bool = true, spacing: SIMD3<Double>? = nil,
                intensity: IntensityPreset = .none, padMultiple: Int? = nil, padValue: Float = 0,
                skipThreshold: Float? = nil, largestComponent: Bool = false) {
        self.window = window
        self.overlap = overlap
        self.blend = blend
        self.batch = batch
        self.flipTTA = flipTTA
        self.reorient = reorient
        self.spacing = spacing
        self.intensity = intensity
        self.padMultiple = padMultiple
        self.padValue = padValue
        self.skipThreshold = skipThreshold
        self.largestComponent = largestComponent
    }
}

/// What one segmentation did and how long each stage took.
public struct SegmentationStatistics: Equatable, Sendable {
    /// The sliding window's counts (windows run and skipped, the accumulator bound).
    public var windows = SlidingWindowStatistics()
    /// The grid the network saw (after resampling and padding).
    public var networkSize = SIMD3<Int>(0, 0, 0)
    public var preprocessSeconds = 0.0
    /// Time inside the predictor.
    public var predictSeconds = 0.0
    /// Gathering windows, blending, argmax/softmax.
    public var blendSeconds = 0.0
    /// Restoring to the input grid and the connected-component filter.
    public var postprocessSeconds = 0.0
    public var totalSeconds = 0.0

    public init() {}
}

/// A segmentation on the input's grid.
public struct Segmentation: @unchecked Sendable {
    /// The labels, on the input grid with the input affine.
    public let labels: LabelMap
    /// Per-class probabilities on the input grid (outChannels x X x Y x Z), when asked for. They are the
    /// model's: the connected-component filter changes labels only.
    public let probabilities: Volume?
    public let statistics: SegmentationStatistics
    /// What the preprocessing did (and how it was undone).
    public let preprocessing: Preprocessing
}

/// Segments whole volumes with a predictor (the network's inference session, or a stand-in): preprocess,
/// sliding windows, postprocess. Its working memory (the network's input grid, the accumulator ring,
/// window batches, label buffers) belongs to it and is reused from one volume to the next (STYLE.md
/// habit 16); `release()` frees it. One call at a time: a second concurrent call gets `.busy`.
public final class Segmenter {
    public let predictor: any WindowPredictor
    public let configuration: SegmenterConfiguration

    private let windows = SlidingWindowInference()
    private let components = LargestComponent()
    private let memory = Workspace()
    private var networkLabels: [UInt8] = []
    private let busy: UnsafeMutablePointer<pthread_mutex_t>

    /// Checks the configuration against the predictor.
    public init(predictor: any WindowPredictor, configuration: SegmenterConfiguration = SegmenterConfiguration()) throws {
        self.predictor = predictor
        self.configuration = configuration
        busy = .allocate(capacity: 1)
        pthread_mutex_init(busy, nil)
        try SlidingWindowInference.validate(predictor, slidingOptions(skip: nil), "Segmenter")
        try preprocessOptions().intensity.validate("Segmenter")
        if let m = configuration.padMultiple, m < 1 || m > 4096 {
            throw DeformUXError.invalidArgument("Segmenter", "bad pad multiple", expected: "1...4096", got: "\(m)")
        }
        if let t = configuration.skipThreshold, t.isNaN {
            throw DeformUXError.invalidArgument("Segmenter", "bad skip threshold", expected: "a number", got: "NaN")
        }
        _ = try SlidingWindowPlan(imageSize: SIMD3(1, 1, 1), window: configuration.window, overlap: configuration.overlap)
        if let s = configuration.spacing, !(0..<3).allSatisfy({ s[$0].isFinite && s[$0] > 0 }) {
            throw DeformUXError.invalidArgument("Segmenter", "bad spacing", expected: "finite spacings > 0 mm", got: "\(s)")
        }
        if case let .gaussian(sigma) = configuration.blend, !(sigma.isFinite && sigma > 0) {
            throw DeformUXError.invalidArgument("Segmenter", "bad gaussian sigma scale", expected: "a finite value > 0",
                                                got: "\(sigma)")
        }
    }

    deinit {
        pthread_mutex_destroy(busy)
        busy.deallocate()
    }

    /// Bytes of working memory kept between volumes.
    public var retainedBytes: Int {
        windows.retainedBytes + memory.bytes + networkLabels.capacity + components.retainedBytes
    }

    /// Frees the working memory (the next volume allocates it again).
    public func release() {
        windows.release()
        memory.release()
        components.release()
        networkLabels = []
    }

    private func slidingOptions(skip: [Float]?, data: SlidingWindowOptions.DataBox? = nil) -> SlidingWindowOptions {
        SlidingWindowOptions(window: configuration.window, overlap: configuration.overlap, blend: configuration.blend,
                             batch: configuration.batch ?? max(predictor.preferredBatch, 1), flipTTA: configuration.flipTTA,
                             padValue: configuration.padValue, skipThreshold: skip, dataBox: data)
    }

    private func preprocessOptions() -> PreprocessOptions {
        PreprocessOptions(reorient: configuration.reorient, spacing: configuration.spacing,
                          intensity: configuration.intensity,
                          padMultiple: configuration.padMultiple ?? max(predictor.sizeMultiple, 1),
                          minimumSize: configuration.window, padValue: configuration.padValue)
    }

    /// Segments `volume`: labels on its grid with its affine, probabilities when asked.
    public func segment(_ volume: Volume, probabilities: Bool = false,
                        progress: WindowProgress? = nil) throws -> Segmentation {
        try segmentation(of: volume, probabilities: probabilities) { labels, probs in
            try segment(volume, labelsInto: labels, probabilitiesInto: probs, progress: progress)
        }
    }

    /// A `Segmentation` of `volume`: allocates the labels (and the probabilities when asked) and has `run`
    /// fill them.
    func segmentation(of volume: Volume, probabilities: Bool,
                      _ run: (UnsafeMutablePointer<UInt8>, UnsafeMutablePointer<Float>?) throws
                          -> (statistics: SegmentationStatistics, preprocessing: Preprocessing)) throws -> Segmentation {
        let n = try voxelCount(volume.size, operation: "segment")
        var labels = [UInt8](repeating: 0, count: n)
        let probs = probabilities ? try Volume(uninitialized: volume.size, channels: predictor.outChannels,
                                               affine: volume.affine) : nil
        let (stats, record) = try labels.withUnsafeMutableBufferPointer { l in try run(l.baseAddress!, probs?.pointer) }
        return Segmentation(labels: try LabelMap(size: volume.size, labels: labels, affine: volume.affine),
                            probabilities: probs, statistics: stats, preprocessing: record)
    }

    /// Segments `volume` into memory the caller owns (the C ABI's path): `labels` holds X * Y * Z bytes
    /// (C order, the volume's grid); `probabilities`, when given, outChannels * X * Y * Z floats.
    public func segment(_ volume: Volume, labelsInto labels: UnsafeMutablePointer<UInt8>,
                        probabilitiesInto probabilities: UnsafeMutablePointer<Float>? = nil,
                        progress: WindowProgress? = nil) throws -> (statistics: SegmentationStatistics, preprocessing: Preprocessing) {
        guard pthread_mutex_trylock(busy) == 0 else {
            throw DeformUXError.busy("segment", "this Segmenter is already segmenting a volume (one call at a time)")
        }
        defer { pthread_mutex_unlock(busy) }
        return try run(volume, labels, probabilities, progress)
    }

    private func run(_ volume: Volume, _ labels: UnsafeMutablePointer<UInt8>, _ probabilities: UnsafeMutablePointer<Float>?,
                     _ progress: WindowProgress?) throws -> (statistics: SegmentationStatistics, preprocessing: Preprocessing) {
        let op = "segment"
        let t0 = monotonicSeconds()
        let cin = predictor.inChannels, cout = predictor.outChannels
        guard volume.channels == cin else {
            throw DeformUXError.shapeMismatch(op, "the volume's channels do not match the predictor's input",
                                              expected: "\(cin) channel\(cin == 1 ? "" : "s")", got: "\(volume.channels)")
        }
        try requireFinite(volume, op)

        // Preprocess into the network's grid (memory kept between volumes).
        let options = preprocessOptions()
        let plan = try Preprocessing.plan(size: volume.size, affine: volume.affine, options: options)
        let netSize = plan.padding.outputSize
        let netVoxels = try voxelCount(netSize, channels: max(cin, cout), operation: op) / max(cin, cout)
        let network = try memory.buffer("network input", count: cin * netVoxels)
        let r = plan.resampling.outputSize
        let scratch = try memory.buffer("percentile scratch",
                                        count: options.intensity.percentiles == nil ? 1 : r.x * r.y * r.z)
        let record = try Preprocessing.run(plan, volume, options.intensity, network: network, scratch: scratch)
        let skip = configuration.skipThreshold.map { t in (0..<cin).map { record.intensity.map(t, channel: $0) } }
        let t1 = monotonicSeconds()

        // Sliding windows over the network's grid.
        if networkLabels.count < netVoxels { networkLabels = [UInt8](repeating: 0, count: netVoxels) }
        let netProbabilities = probabilities == nil ? nil : try memory.buffer("network probabilities", count: cout * netVoxels)
        // The full per-class probabilities are the one buffer that scales with the classes times the whole
        // grid, and they are asked for rarely: not kept past this call.
        defer { memory.release(prefixes: ["network probabilities"]) }
        let windowStats = try networkLabels.withUnsafeMutableBufferPointer { l in
            // Skipping looks at the resampled image only, not at the padding around it.
            let data = SlidingWindowOptions.DataBox(origin: plan.padding.before, size: plan.padding.inputSize)
            return try windows.run(predictor, input: network, size: netSize, options: slidingOptions(skip: skip, data: data),
                            labels: l.baseAddress!, probabilities: netProbabilities, progress: progress)
        }
        let t2 = monotonicSeconds()

        // Back onto the input grid.
        networkLabels.withUnsafeBufferPointer { record.restoreLabels($0.baseAddress!, into: labels) }
        if let probabilities, let netProbabilities {
            let m = volume.size.x * volume.size.y * volume.size.z
            for c in 0..<cout { record.restoreChannel(netProbabilities + c * netVoxels, into: probabilities + c * m) }
        }
        if configuration.largestComponent { components.apply(labels, size: volume.size) }
        let t3 = monotonicSeconds()

        var stats = SegmentationStatistics()
        stats.windows = windowStats
        stats.networkSize = netSize
        stats.preprocessSeconds = t1 - t0
        stats.predictSeconds = windowStats.predictSeconds
        stats.blendSeconds = (t2 - t1) - windowStats.predictSeconds
        stats.postprocessSeconds = t3 - t2
        stats.totalSeconds = t3 - t0
        return (stats, record)
    }
}

/// Throws when a volume holds NaN or infinity (percentiles, resampling and labels would be meaningless),
/// naming the first such voxel.
func requireFinite(_ volume: Volume, _ op: String) throws {
    let n = volume.data.count
    let p = volume.pointer
    let parts = min(Threads.count, max(n / 65536, 1))
    var firstBad = [Int](repeating: Int.max, count: parts)
    firstBad.withUnsafeMutableBufferPointer { bad in
        parallelFor(parts) { part in
            for i in Threads.range(part, of: parts, total: n) where !p[i].isFinite { bad[part] = i; break }
        }
    }
    if let i = firstBad.min(), i != Int.max {
        let s = volume.size
        let c = i / (s.x * s.y * s.z), x = (i / (s.y * s.z)) % s.x, y = (i / s.z) % s.y, z = i % s.z
        throw DeformUXError.invalidArgument(op, "the volume holds a non-finite value", expected: "finite intensities",
                                            got: "\(p[i]) at channel \(c), voxel (\(x), \(y), \(z))")
    }
}
