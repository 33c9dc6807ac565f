#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Sliding-window inference with MONAI's `sliding_window_inference` semantics (MONAI 1.6), in bounded
/// memory.
///
/// Windows: on each axis, when the window is larger than the image, the image is padded to the window
/// with `padValue` ((w - n) // 2 before, the rest after; here the padding is virtual: windows read it,
/// nothing is allocated). The scan interval is w when w equals the padded size, else
/// max(1, int(w * (1 - overlap))); starts are 0, interval, 2 * interval, ... with the last one moved back
/// so the window ends flush with the image (MONAI's `_get_scan_interval` and `dense_patch_slices`).
/// Windows run in MONAI's order: x slowest, z fastest.
///
/// Blending: each window's logits are multiplied by the importance map and added up; the weights are
/// added up beside them; the blended logits are the quotient (float32, windows added in MONAI's order,
/// product then sum, so the same arithmetic as MONAI's `output += p * w; count += w; output / count`).
/// The importance map is MONAI's `compute_importance_map`: constant ones, or gaussian with sigma
/// `sigmaScale * w` per axis, exp(-x^2 / (2 sigma^2)) at x = -(w-1)/2 ... (w-1)/2, the product over the
/// axes (not normalised: MONAI 1.x dropped the division by the maximum), then clamped below at
/// max(min(map), 1e-3) (the corners of a sigma-1/8 map fall to about 4e-11, so they become 1e-3).
///
/// Bounded memory: the blended logits are never held for the whole volume. Windows run in x-major
/// order, so once a batch starts at x = s, no later window touches x < s: the planes x < s are final.
/// The accumulator is a ring of `accumulatorPlanes` x-planes (Cout logit sums and one weight sum per
/// voxel), plane x in slot x % planes; before each batch the planes no remaining window touches are
/// finalised (blended, argmax into uint8 labels, softmax into probabilities only when asked) and their
/// slots zeroed for reuse. The ring holds max over batches of (end of the batch's last window - start of
/// its first window) planes: the window depth when a batch stays within one x-position (batch <= windows
/// per x-position), and never more than the image.
///
/// Options: flip test-time augmentation (each window predicted under the 8 combinations of flips of
/// its three axes, each result flipped back, the 8 logits summed in a fixed order and multiplied by
/// 1/8: the average of the logits, as nnU-Net v2's mirroring does); skipping windows whose input is
/// background (every value of channel c <= skipThreshold[c], for every channel; the virtual padding
/// counts as input): skipped windows are not run and add nothing; voxels that no run window covers
/// are labelled 0 (background), with probability 1 for class 0 and logits 0.
public enum BlendMode: Equatable, Sendable {
    /// Every voxel of a window weighs 1 (MONAI "constant").
    case constant
    /// MONAI "gaussian" with sigma = sigmaScale * window size per axis (MONAI's default 0.125).
    case gaussian(sigmaScale: Double = 0.125)
}

/// MONAI's `compute_importance_map`.
public enum ImportanceMap {
    /// The map for a window (w0 x w1 x w2 floats, C order).
    public static func make(window: SIMD3<Int>, mode: BlendMode) throws -> [Float] {
        let n = try voxelCount(window, operation: "importance map")
        guard window.x >= 1, window.y >= 1, window.z >= 1 else {
            throw DeformUXError.invalidArgument("importance map", "empty window", expected: "sizes >= 1",
                                                got: sizeText(window))
        }
        guard case let .gaussian(sigmaScale) = mode else { return [Float](repeating: 1, count: n) }
        guard sigmaScale.isFinite, sigmaScale > 0 else {
            throw DeformUXError.invalidArgument("importance map", "bad sigma scale", expected: "a finite value > 0",
                                                got: "\(sigmaScale)")
        }
        // 1-D gaussians, float32 as torch computes them: x^2 / (-2 sigma^2), then exp.
        let axes: [[Float]] = (0..<3).map { a in
            let w = window[a]
            let sigma = Double(w) * sigmaScale
            let denominator = Float(-2 * sigma * sigma)
            return (0..<w).map { i in
                let x = Float(-Double(w - 1) / 2 + Double(i))
                return Float(exp(Double((x * x) / denominator)))
            }
        }
        var map = [Float](repeating: 0, count: n)
        var i = 0
        for a in 0..<window.x {
            for b in 0..<window.y {
                let ab = axes[0][a] * axes[1][b]
                for c in 0..<window.z { map[i] = ab * axes[2][c]; i += 1 }
            }
        }
        // Clamp below at max(min, 1e-3), as MONAI does to keep every weight positive.
        let lowest = map.min() ?? 1
        if Double(lowest) < 1e-3 {
            let floor = Float(1e-3)
            for j in 0..<n where map[j] < floor { map[j] = floor }
        }
        return map
    }
}

/// Where the windows go: MONAI's rule (see the top of this file).
public struct SlidingWindowPlan: Equatable, Sendable {
    public let imageSize: SIMD3<Int>
    public let window: SIMD3<Int>
    public let overlap: Double
    /// The virtual padding before the image when the window is larger ((w - n) // 2, else 0).
    public let padBefore: SIMD3<Int>
    /// max(image, window) per axis: the frame the windows tile.
    public let paddedSize: SIMD3<Int>
    public let interval: SIMD3<Int>
    /// Window starts per axis, ascending, in the padded frame.
    public let starts: [[Int]]

    /// The number of windows.
    public var count: Int { starts[0].count * starts[1].count * starts[2].count }

    public init(imageSize: SIMD3<Int>, window: SIMD3<Int>, overlap: Double) throws {
        guard imageSize.x >= 1, imageSize.y >= 1, imageSize.z >= 1 else {
            throw DeformUXError.invalidArgument("sliding window", "empty image", expected: "sizes >= 1",
                                                got: sizeText(imageSize))
        }
        guard window.x >= 1, window.y >= 1, window.z >= 1 else {
            throw DeformUXError.invalidArgument("sliding window", "bad window", expected: "sizes >= 1",
                                                got: sizeText(window))
        }
        guard overlap.isFinite, overlap >= 0, overlap < 1 else {
            throw DeformUXError.invalidArgument("sliding window", "bad overlap", expected: "0 <= overlap < 1",
                                                got: "\(overlap)")
        }
        self.imageSize = imageSize
        self.window = window
        self.overlap = overlap
        var pad = SIMD3<Int>(), padded = SIMD3<Int>(), interval = SIMD3<Int>()
        var starts: [[Int]] = []
        for a in 0..<3 {
            padded[a] = max(imageSize[a], window[a])
            pad[a] = max(window[a] - imageSize[a], 0) / 2
            let axis = SlidingWindowPlan.axisStarts(size: padded[a], window: window[a], overlap: overlap)
            interval[a] = axis.interval
            starts.append(axis.starts)
        }
        padBefore = pad
        paddedSize = padded
        self.interval = interval
        self.starts = starts
    }

    /// MONAI's scan interval and starts along one axis of `size` >= `window` voxels.
    public static func axisStarts(size: Int, window: Int, overlap: Double) -> (interval: Int, starts: [Int]) {
        // _get_scan_interval: int(roi * (1 - overlap)) in float64, at least 1; the roi itself when it
        // equals the image.
        let interval = size == window ? window : max(Int((Double(window) * (1 - overlap)).rounded(.towardZero)), 1)
        // dense_patch_slices: the first d with d * interval + window >= size is the last window.
        var starts: [Int] = []
        var d = 0
        while true {
            let s = d * interval
            starts.append(s - max(s + window - size, 0))
            if s + window >= size { break }
            d += 1
        }
        return (interval, starts)
    }

    /// Window i's start in the padded frame (i in 0..<count, MONAI's order: x slowest, z fastest).
    func start(_ i: Int) -> SIMD3<Int> {
        let nz = starts[2].count, ny = starts[1].count
        return SIMD3(starts[0][i / (ny * nz)], starts[1][(i / nz) % ny], starts[2][i % nz])
    }

    /// Window i's first voxel in image coordinates (negative where it hangs over the virtual padding).
    func origin(_ i: Int) -> SIMD3<Int> { start(i) &- padBefore }
}

/// The sliding window's settings.
public struct SlidingWindowOptions: Equatable, Sendable {
    public var window: SIMD3<Int>
    /// Overlap of neighbouring windows, 0 <= overlap < 1, the same on every axis.
    public var overlap: Double
    public var blend: BlendMode
    /// Windows per predictor call.
    public var batch: Int
    /// Average the logits over the 8 flip combinations of each window.
    public var flipTTA: Bool
    /// The value of the virtual padding when the window is larger than the image (MONAI's cval).
    public var padValue: Float
    /// Skip a window when every value of channel c in it is <= skipThreshold[c] (one per input channel).
    public var skipThreshold: [Float]?
    /// The box of the image that holds data; the rest of the image is padding (the segmenter's, whose
    /// value after the intensity preset may lie above the threshold although it is no body). When set,
    /// skipping judges a window by its voxels inside the box only, and a window with none is skipped.
    public var dataBox: DataBox?

    /// A box of voxels: `origin` and `size` (each >= 1) inside the image.
    public struct DataBox: Equatable, Sendable {
        public var origin: SIMD3<Int>
        public var size: SIMD3<Int>
        public init(origin: SIMD3<Int>, size: SIMD3<Int>) {
            self.origin = origin
            self.size = size
        }
    }

    public init(window: SIMD3<Int> = SIMD3(96, 96, 96), overlap: Double = 0.5, blend: BlendMode = .gaussian(),
                batch: Int = 1, flipTTA: Bool = false, padValue: Float = 0, skipThreshold: [Float]? = nil,
                dataBox: DataBox? = nil) {
        self.window = window
        self.overlap = overlap
        self.blend = blend
        self.batch = batch
        self.flipTTA = flipTTA
        self.padValue = padValue
        self.skipThreshold = skipThreshold
        self.dataBox = dataBox
    }

    /// The part of a window (image coordinates `origin` ..< `origin + window`) that skipping inspects:
    /// the window inside the image, and inside the data box when there is one; nil when that is empty.
    func inspected(origin o: SIMD3<Int>, image size: SIMD3<Int>) -> (lo: SIMD3<Int>, hi: SIMD3<Int>)? {
        var lo = SIMD3(max(o.x, 0), max(o.y, 0), max(o.z, 0))
        var hi = SIMD3(min(o.x + window.x, size.x), min(o.y + window.y, size.y), min(o.z + window.z, size.z))
        if let box = dataBox {
            for a in 0..<3 {
                lo[a] = max(lo[a], box.origin[a])
                hi[a] = min(hi[a], box.origin[a] + box.size[a])
            }
        }
        return (0..<3).allSatisfy({ lo[$0] < hi[$0] }) ? (lo, hi) : nil
    }
}

/// What a sliding-window run did.
public struct SlidingWindowStatistics: Equatable, Sendable {
    public var windows = 0
    public var windowsRun = 0
    public var windowsSkipped = 0
    public var batches = 0
    public var predictorCalls = 0
    /// The ring's depth in x-planes (the bound computed before the run).
    public var accumulatorPlanes = 0
    /// The most x-planes that were live at once (never above accumulatorPlanes).
    public var accumulatorPlanesHighWater = 0
    /// Bytes of the ring (Cout + 1 floats per voxel of accumulatorPlanes planes).
    public var accumulatorBytes = 0
    public var predictSeconds = 0.0
    /// Gathering windows, flips, blending and finalising.
    public var blendSeconds = 0.0

    public init() {}
}

/// Called with (windows done, windows total) before the first batch and after each; return false to
/// cancel (the run then throws DeformUXError `.cancelled`).
public typealias WindowProgress = (_ done: Int, _ total: Int) -> Bool

/// Runs sliding-window inference over one image and keeps its working memory (window batches, the
/// accumulator ring) for the next run (STYLE.md habit 16). Not for concurrent use.
public final class SlidingWindowInference {
    private let memory = Workspace()
    /// What the "importance" buffer holds.
    private var importanceKey: (window: SIMD3<Int>, mode: BlendMode)?

    public init() {}

    /// Bytes of working memory held between runs.
    public var retainedBytes: Int { memory.bytes }

    /// Frees the working memory.
    public func release() {
        memory.release()
        importanceKey = nil
    }

    /// Runs `predictor` over `input` (predictor.inChannels x size, C order) and writes the labels
    /// (size, uint8, argmax of the blended logits; first maximum wins) and, when given, the
    /// probabilities (softmax of the blended logits) and the blended logits themselves
    /// (predictor.outChannels x size each).
    public func run(_ predictor: any WindowPredictor, input: UnsafePointer<Float>, size: SIMD3<Int>,
                    options: SlidingWindowOptions, labels: UnsafeMutablePointer<UInt8>,
                    probabilities: UnsafeMutablePointer<Float>? = nil, logits: UnsafeMutablePointer<Float>? = nil,
                    progress: WindowProgress? = nil) throws -> SlidingWindowStatistics {
        let op = "sliding window"
        let cin = predictor.inChannels, cout = predictor.outChannels
        try SlidingWindowInference.validate(predictor, options, op)
        let plan = try SlidingWindowPlan(imageSize: size, window: options.window, overlap: options.overlap)
        let w = options.window
        let wn = w.x * w.y * w.z
        _ = try voxelCount(size, channels: max(cin, cout), operation: op)
        let imp = try importanceMap(w, options.blend)

        var stats = SlidingWindowStatistics()
        stats.windows = plan.count
        let t0 = monotonicSeconds()
        var predictSeconds = 0.0

        // Which windows run (MONAI order).
        let skip = try skippedWindows(plan, input: input, channels: cin, options: options)
        let runList = (0..<plan.count).filter { !skip[$0] }
        stats.windowsRun = runList.count
        stats.windowsSkipped = plan.count - runList.count
        let batch = options.batch
        let batches = stride(from: 0, to: runList.count, by: batch).map { runList[$0..<min($0 + batch, runList.count)] }

        // The ring's depth: max over batches of (end of its last window - start of its first), in the image.
        let X = size.x, plane = size.y * size.z
        func firstPlane(_ i: Int) -> Int { min(max(plan.origin(i).x, 0), X) }
        func endPlane(_ i: Int) -> Int { min(max(plan.origin(i).x + w.x, 0), X) }
        var depth = 0
        for b in batches { depth = max(depth, endPlane(b.last!) - firstPlane(b.first!)) }
        stats.accumulatorPlanes = depth
        stats.accumulatorBytes = (cout + 1) * depth * plane * 4

        // Working memory (kept between runs).
        let ring = depth * plane
        let acc = try memory.buffer("accumulator", count: max(cout * ring, 1))
        let weights = try memory.buffer("weights", count: max(ring, 1))
        acc.update(repeating: 0, count: cout * ring)
        weights.update(repeating: 0, count: ring)
        let inCount = try Tensor.elementCount([batch, cin, wn], context: op)
        let outCount = try Tensor.elementCount([batch, cout, wn], context: op)
        let windowsIn = try memory.buffer("windows", count: inCount)
        let windowsOut = try memory.buffer("logits", count: outCount)
        let flipped = options.flipTTA ? try memory.buffer("flipped", count: inCount) : nil
        let averaged = options.flipTTA ? try memory.buffer("averaged", count: outCount) : nil
        let parts = Threads.count
        let rowScratch = try memory.buffer("rows", count: 2 * parts * size.z)

        let fin = Finaliser(acc: acc, weights: weights, depth: depth, size: size, classes: cout, labels: labels,
                            probabilities: probabilities, logits: logits, scratch: rowScratch, parts: parts)

        var done = stats.windowsSkipped
        if let progress, !progress(done, plan.count) {
            throw DeformUXError.cancelled(op, "cancelled by the progress callback before the first window")
        }
        var finalised = 0
        // Planes at or past `touched` have had nothing added (their ring slots may still hold another
        // plane's sums: a finalised range can be longer than the ring).
        var touched = 0
        for b in batches {
            let lo = firstPlane(b.first!)
            fin.finalise(finalised..<lo, touched: touched)
            finalised = lo
            stats.accumulatorPlanesHighWater = max(stats.accumulatorPlanesHighWater, endPlane(b.last!) - finalised)
            guard stats.accumulatorPlanesHighWater <= depth else {
                throw DeformUXError.internal(op, "accumulator ring overrun: \(stats.accumulatorPlanesHighWater) planes live, \(depth) held")
            }

            let origins = b.map { plan.origin($0) }
            gather(input, size: size, channels: cin, origins: origins, window: w, padValue: options.padValue, into: windowsIn)
            let logitsOut: UnsafeMutablePointer<Float>
            let p0 = monotonicSeconds()
            if let flipped, let averaged {
                for combo in 0..<8 {
                    let flips = flipCombination(combo)
                    if combo == 0 {
                        try predictor.predict(windows: windowsIn, batch: b.count, size: w, into: windowsOut)
                    } else {
                        flipWindows(windowsIn, into: flipped, count: b.count * cin, window: w, flips: flips, add: false)
                        try predictor.predict(windows: flipped, batch: b.count, size: w, into: windowsOut)
                    }
                    stats.predictorCalls += 1
                    try checkFinite(windowsOut, b.count * cout * wn, op)
                    if combo == 0 {
                        averaged.update(from: windowsOut, count: b.count * cout * wn)
                    } else {
                        flipWindows(windowsOut, into: averaged, count: b.count * cout, window: w, flips: flips, add: true)
                    }
                }
                scale(averaged, b.count * cout * wn, by: 0.125)
                logitsOut = averaged
            } else {
                try predictor.predict(windows: windowsIn, batch: b.count, size: w, into: windowsOut)
                stats.predictorCalls += 1
                try checkFinite(windowsOut, b.count * cout * wn, op)
                logitsOut = windowsOut
            }
            predictSeconds += monotonicSeconds() - p0

            touched = max(touched, endPlane(b.last!))
            for (j, o) in origins.enumerated() {
                accumulate(logitsOut + j * cout * wn, origin: o, window: w, importance: imp, classes: cout,
                           size: size, depth: depth, acc: acc, weights: weights)
            }
            stats.batches += 1
            done += b.count
            if let progress, !progress(done, plan.count) {
                throw DeformUXError.cancelled(op, "cancelled by the progress callback after \(done) of \(plan.count) windows")
            }
        }
        fin.finalise(finalised..<X, touched: touched)
        stats.predictSeconds = predictSeconds
        stats.blendSeconds = monotonicSeconds() - t0 - predictSeconds
        return stats
    }

    static func validate(_ predictor: any WindowPredictor, _ options: SlidingWindowOptions, _ op: String) throws {
        let cin = predictor.inChannels, cout = predictor.outChannels, m = predictor.sizeMultiple
        guard cin >= 1 else {
            throw DeformUXError.invalidArgument(op, "predictor has no input channels", expected: ">= 1", got: "\(cin)")
        }
        guard cout >= 1, cout <= 256 else {
            throw DeformUXError.invalidArgument(op, "predictor's class count does not fit uint8 labels",
                                                expected: "1...256 output channels", got: "\(cout)")
        }
        guard m >= 1 else {
            throw DeformUXError.invalidArgument(op, "predictor's size multiple", expected: ">= 1", got: "\(m)")
        }
        let w = options.window
        guard w.x >= 1, w.y >= 1, w.z >= 1, w.x % m == 0, w.y % m == 0, w.z % m == 0 else {
            throw DeformUXError.invalidArgument(op, "bad window size", expected: "sizes >= 1 and multiples of \(m)",
                                                got: sizeText(w))
        }
        guard options.batch >= 1, options.batch <= 4096 else {
            throw DeformUXError.invalidArgument(op, "bad batch", expected: "1...4096 windows", got: "\(options.batch)")
        }
        guard options.padValue.isFinite else {
            throw DeformUXError.invalidArgument(op, "bad pad value", expected: "a finite value", got: "\(options.padValue)")
        }
        if let box = options.dataBox, !(0..<3).allSatisfy({ box.origin[$0] >= 0 && box.size[$0] >= 1 }) {
            throw DeformUXError.invalidArgument(op, "bad data box", expected: "origin >= 0 and size >= 1",
                                                got: "origin \(box.origin), size \(box.size)")
        }
        if let t = options.skipThreshold {
            guard t.count == cin, t.allSatisfy({ !$0.isNaN }) else {
                throw DeformUXError.invalidArgument(op, "skip threshold: one number per input channel",
                                                    expected: "\(cin) values", got: "\(t)")
            }
        }
    }

    /// The importance map for `w` and `mode`, kept in the working memory while they stay the same.
    private func importanceMap(_ w: SIMD3<Int>, _ mode: BlendMode) throws -> UnsafePointer<Float> {
        let n = w.x * w.y * w.z
        let p = try memory.buffer("importance", count: n)
        if importanceKey == nil || importanceKey!.window != w || importanceKey!.mode != mode {
            importanceKey = nil
            let map = try ImportanceMap.make(window: w, mode: mode)
            map.withUnsafeBufferPointer { p.update(from: $0.baseAddress!, count: n) }
            importanceKey = (w, mode)
        }
        return UnsafePointer(p)
    }

    /// Which windows are skipped (all false without a threshold).
    private func skippedWindows(_ plan: SlidingWindowPlan, input: UnsafePointer<Float>, channels: Int,
                                options: SlidingWindowOptions) throws -> [Bool] {
        guard let t = options.skipThreshold else { return [Bool](repeating: false, count: plan.count) }
        var skip = [Bool](repeating: false, count: plan.count)
        let size = plan.imageSize, w = plan.window
        let perChannel = size.x * size.y * size.z
        let parts = min(Threads.count, plan.count)
        skip.withUnsafeMutableBufferPointer { out in
            parallelFor(parts) { part in
                for i in Threads.range(part, of: parts, total: plan.count) {
                    let o = plan.origin(i)
                    guard let (lo, hi) = options.inspected(origin: o, image: size) else {
                        out[i] = true  // nothing but padding
                        continue
                    }
                    // The virtual padding counts (as its value) unless a data box says what is data.
                    let hangsOver = o.x < 0 || o.y < 0 || o.z < 0 || o.x + w.x > size.x || o.y + w.y > size.y || o.z + w.z > size.z
                    if options.dataBox == nil && hangsOver && t.contains(where: { options.padValue > $0 }) {
                        continue  // the padding alone is above a threshold
                    }
                    var background = true
                    channelLoop: for c in 0..<channels {
                        let base = input + c * perChannel
                        for x in lo.x..<hi.x {
                            for y in lo.y..<hi.y {
                                let row = base + (x * size.y + y) * size.z
                                for z in lo.z..<hi.z where row[z] > t[c] { background = false; break channelLoop }
                            }
                        }
                    }
                    out[i] = background
                }
            }
        }
        return skip
    }
}

/// The flips of combination k (0..<8): bit 2 flips x, bit 1 y, bit 0 z; 0 is no flip.
@inline(__always) func flipCombination(_ k: Int) -> SIMD3<Int> {
    SIMD3((k >> 2) & 1, (k >> 1) & 1, k & 1)
}

/// Copies windows of `input` (channels x size) at `origins` (image coordinates, possibly hanging over
/// the edge, where `padValue` is read) into `out` (origins.count x channels x window).
func gather(_ input: UnsafePointer<Float>, size: SIMD3<Int>, channels: Int, origins: [SIMD3<Int>], window w: SIMD3<Int>,
            padValue: Float, into out: UnsafeMutablePointer<Float>) {
    let rows = origins.count * channels * w.x
    let perChannel = size.x * size.y * size.z
    let parts = min(Threads.count, rows)
    parallelFor(parts) { part in
        for r in Threads.range(part, of: parts, total: rows) {
            let lx = r % w.x, c = (r / w.x) % channels, j = r / (w.x * channels)
            let o = origins[j]
            let x = o.x + lx
            let z0 = max(-o.z, 0), z1 = min(size.z - o.z, w.z)  // window z range inside the image
            for ly in 0..<w.y {
                let dst = out + ((j * channels + c) * w.x + lx) * w.y * w.z + ly * w.z
                let y = o.y + ly
                guard x >= 0, x < size.x, y >= 0, y < size.y, z0 < z1 else {
                    dst.update(repeating: padValue, count: w.z)
                    continue
                }
                if z0 > 0 { dst.update(repeating: padValue, count: z0) }
                let src = input + c * perChannel + (x * size.y + y) * size.z + o.z
                (dst + z0).update(from: src + z0, count: z1 - z0)
                if z1 < w.z { (dst + z1).update(repeating: padValue, count: w.z - z1) }
            }
        }
    }
}

/// out = flip(src) (or out += flip(src) with `add`) for `count` windows of size w, flipping the axes
/// whose entry in `flips` is 1. A flip is its own inverse, so the same call flips logits back.
func flipWindows(_ src: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>, count: Int, window w: SIMD3<Int>,
                 flips: SIMD3<Int>, add: Bool) {
    let rows = count * w.x
    let parts = min(Threads.count, rows)
    parallelFor(parts) { part in
        for r in Threads.range(part, of: parts, total: rows) {
            let lx = r % w.x, k = r / w.x
            let sx = flips.x == 1 ? w.x - 1 - lx : lx
            for ly in 0..<w.y {
                let sy = flips.y == 1 ? w.y - 1 - ly : ly
                let s = src + ((k * w.x + sx) * w.y + sy) * w.z
                let d = out + ((k * w.x + lx) * w.y + ly) * w.z
                if flips.z == 1 {
                    if add { for z in 0..<w.z { d[z] += s[w.z - 1 - z] } } else { for z in 0..<w.z { d[z] = s[w.z - 1 - z] } }
                } else {
                    if add { for z in 0..<w.z { d[z] += s[z] } } else { d.update(from: s, count: w.z) }
                }
            }
        }
    }
}

func scale(_ p: UnsafeMutablePointer<Float>, _ n: Int, by s: Float) {
    for i in 0..<n { p[i] *= s }
}

/// Throws when the predictor returned NaN or infinity (labels from them would be meaningless).
func checkFinite(_ p: UnsafePointer<Float>, _ n: Int, _ op: String) throws {
    var bad = false
    for i in 0..<n where !p[i].isFinite { bad = true; break }
    if bad {
        let i = (0..<n).first { !p[$0].isFinite } ?? 0
        throw DeformUXError.invalidArgument(op, "the predictor returned a non-finite logit", expected: "finite logits",
                                            got: "\(p[i]) at flat index \(i) of the batch's output")
    }
}

/// Adds one window's logits (classes x window) times the importance map into the ring, and the map into
/// the weights, over the part of the window inside the image. Parallel over the window's x-planes
/// (each plane is one ring slot, so parts write disjoint memory; windows are added in order).
func accumulate(_ logits: UnsafePointer<Float>, origin o: SIMD3<Int>, window w: SIMD3<Int>, importance: UnsafePointer<Float>,
                classes: Int, size: SIMD3<Int>, depth: Int, acc: UnsafeMutablePointer<Float>,
                weights: UnsafeMutablePointer<Float>) {
    let x0 = max(-o.x, 0), x1 = min(size.x - o.x, w.x)
    let y0 = max(-o.y, 0), y1 = min(size.y - o.y, w.y)
    let z0 = max(-o.z, 0), z1 = min(size.z - o.z, w.z)
    guard x0 < x1, y0 < y1, z0 < z1 else { return }
    let plane = size.y * size.z, ring = depth * plane, wn = w.x * w.y * w.z
    let parts = min(Threads.count, x1 - x0)
    parallelFor(parts) { part in
        for lx in Threads.range(part, of: parts, total: x1 - x0).map({ $0 + x0 }) {
            let slot = (o.x + lx) % depth
            for ly in y0..<y1 {
                let imp = importance + (lx * w.y + ly) * w.z
                let voxel = slot * plane + (o.y + ly) * size.z + o.z  // ring offset of window z = 0
                let wrow = weights + voxel
                for z in z0..<z1 { wrow[z] += imp[z] }
                for c in 0..<classes {
                    let arow = acc + c * ring + voxel
                    let lrow = logits + c * wn + (lx * w.y + ly) * w.z
                    for z in z0..<z1 { arow[z] += lrow[z] * imp[z] }
                }
            }
        }
    }
}

/// Turns finished x-planes of the ring into labels (and probabilities, logits when asked), then zeroes
/// their slots.
struct Finaliser {
    let acc: UnsafeMutablePointer<Float>
    let weights: UnsafeMutablePointer<Float>
    let depth: Int
    let size: SIMD3<Int>
    let classes: Int
    let labels: UnsafeMutablePointer<UInt8>
    let probabilities: UnsafeMutablePointer<Float>?
    let logits: UnsafeMutablePointer<Float>?
    /// 2 x parts x Z floats: per part, the running maximum and the softmax sum of a row.
    let scratch: UnsafeMutablePointer<Float>
    let parts: Int

    /// Finalises `planes`; those at or past `touched` had no window added and are background without
    /// reading the ring (their slots alias planes finalised in the same call).
    func finalise(_ planes: Range<Int>, touched: Int) {
        if planes.isEmpty { return }
        let Y = size.y, Z = size.z, plane = Y * Z, volume = size.x * plane
        let ring = depth * plane
        let rows = planes.count * Y
        let used = min(parts, rows)
        parallelFor(used) { part in
            let best = scratch + 2 * part * Z, sum = best + Z
            for r in Threads.range(part, of: used, total: rows) {
                let x = planes.lowerBound + r / Y, y = r % Y
                let out = x * plane + y * Z                                 // offset in the image
                let label = labels + out
                guard depth > 0, x < touched else {
                    // No window added anything here: background.
                    label.update(repeating: 0, count: Z)
                    writeBackground(out, Z, volume)
                    continue
                }
                let slotRow = (x % depth) * plane + y * Z                    // offset in the ring
                let w = weights + slotRow
                for z in 0..<Z { best[z] = -.infinity; label[z] = 0 }
                for c in 0..<classes {
                    let a = acc + c * ring + slotRow
                    let lg = logits.map { $0 + c * volume + out }
                    for z in 0..<Z {
                        let v = w[z] > 0 ? a[z] / w[z] : 0
                        if v > best[z] { best[z] = v; label[z] = UInt8(truncatingIfNeeded: c) }
                        lg?[z] = v
                    }
                }
                if let probabilities {
                    for z in 0..<Z { sum[z] = 0 }
                    for c in 0..<classes {
                        let a = acc + c * ring + slotRow
                        let p = probabilities + c * volume + out
                        for z in 0..<Z {
                            let e: Float = w[z] > 0 ? expf(a[z] / w[z] - best[z]) : (c == 0 ? 1 : 0)
                            p[z] = e
                            sum[z] += e
                        }
                    }
                    for c in 0..<classes {
                        let p = probabilities + c * volume + out
                        for z in 0..<Z { p[z] /= sum[z] }
                    }
                }
                for c in 0..<classes { (acc + c * ring + slotRow).update(repeating: 0, count: Z) }
                w.update(repeating: 0, count: Z)
            }
        }
    }

    private func writeBackground(_ out: Int, _ Z: Int, _ volume: Int) {
        for c in 0..<classes {
            probabilities.map { ($0 + c * volume + out).update(repeating: c == 0 ? 1 : 0, count: Z) }
            logits.map { ($0 + c * volume + out).update(repeating: 0, count: Z) }
        }
    }
}
