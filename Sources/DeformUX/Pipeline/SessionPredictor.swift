#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The network as the sliding window's predictor: each batch of windows is one `Session.forward` on the
/// window buffer (borrowed, not copied), the logits written straight into the pipeline's buffer.
///
/// Windows must be multiples of 16 (the network's four 2x downsamplings); channels come from the
/// model's configuration. A monitored segmentation (`Segmenter.segment(_:labelsInto:probabilitiesInto:
/// monitor:)`) also reports the network's steps inside each window and lets its cancellation be polled
/// inside the kernels, so a long window can be interrupted (Ctrl-C from Python) within a fraction of a
/// second rather than at its end.
public final class SessionPredictor: WindowPredictor {
    public let session: Session
    public let inChannels: Int
    public let outChannels: Int
    public var sizeMultiple: Int { 16 }
    /// One window per forward: the network's kernels already use every core on one window, and a batch
    /// of B windows needs B times the activation memory.
    public var preferredBatch: Int { 1 }

    /// The monitored run in progress (set by `monitoring`), used only on the thread running it.
    private var run: Run?
    private let runLock = ShortLock()

    /// Progress bookkeeping of one monitored segmentation.
    final class Run {
        let owner = pthread_self()
        let progress: ((Int, Int) -> Bool)?
        let cancellation: Cancellation?
        /// Progress units per window: the network's steps, times 8 with flip TTA.
        let unitsPerWindow: Int
        var windowsDone = 0
        var windowsTotal = 0
        /// Forwards run since the sliding window last reported (the 8 flips of TTA are 8 forwards).
        var forwardsInBatch = 0

        init(progress: ((Int, Int) -> Bool)?, cancellation: Cancellation?, unitsPerWindow: Int) {
            self.progress = progress
            self.cancellation = cancellation
            self.unitsPerWindow = unitsPerWindow
        }
    }

    public init(session: Session) {
        self.session = session
        inChannels = session.model.config.inChannels
        outChannels = session.model.config.outChannels
    }

    /// A predictor with its own session on `model`.
    public convenience init(model: DeformUXNet) throws {
        self.init(session: try Session(model: model))
    }

    public func predict(windows: UnsafePointer<Float>, batch: Int, size: SIMD3<Int>,
                        into: UnsafeMutablePointer<Float>) throws {
        let x = try Tensor(borrowing: UnsafeMutablePointer(mutating: windows),
                           shape: [batch, inChannels, size.x, size.y, size.z])
        let r = runLock.withLock { run }
        guard let r, pthread_equal(r.owner, pthread_self()) != 0 else {
            try session.forward(x, into: into)
            return
        }
        let steps = DeformUXNet.forwardSteps
        let base = r.windowsDone * r.unitsPerWindow + r.forwardsInBatch * steps * batch
        let total = r.windowsTotal * r.unitsPerWindow
        let progress: DeformUXNet.Progress? = r.progress.map { report in { step, _ in report(base + step * batch, total) } }
        try session.forward(x, into: into, progress: progress, cancellation: r.cancellation)
        r.forwardsInBatch += 1
    }

    /// Runs `body` (one segmentation on the calling thread) with `monitor` observing the windows.
    /// One monitored segmentation at a time per predictor (`.busy` otherwise).
    func monitoring<T>(_ monitor: SegmentMonitor, unitsPerWindow: Int,
                       _ body: (_ windowProgress: @escaping WindowProgress) throws -> T) throws -> T {
        let r = Run(progress: monitor.progress, cancellation: monitor.cancellation, unitsPerWindow: unitsPerWindow)
        let claimed = runLock.withLock { () -> Bool in
            if run != nil { return false }
            run = r
            return true
        }
        guard claimed else {
            throw DeformUXError.busy("segment", "this network predictor is already running a segmentation (one at a time)")
        }
        defer { runLock.withLock { run = nil } }
        return try body { done, total in
            r.windowsDone = done
            r.windowsTotal = total
            r.forwardsInBatch = 0
            if let p = r.progress, !p(done * r.unitsPerWindow, total * r.unitsPerWindow) { return false }
            // Between windows: poll the cancellation too (after the progress, which its poll may repeat).
            if let c = r.cancellation, (try? c.check("segment", "")) == nil { return false }
            return true
        }
    }
}

/// What observes a segmentation: a progress callback and a cancellation token (either may be nil).
///
/// `progress(done, total)` counts work units: with the network as predictor, one unit is one of the
/// network's steps (`DeformUXNet.forwardSteps`) for one window, so total = windows x 12 (x 8 with flip
/// TTA) and the count advances inside windows; with other predictors one unit is one window. It is
/// called before the first window (skipped windows already counted as done), during and after each
/// batch; returning false cancels (`.cancelled`). `cancellation` is polled inside the network's kernels
/// (its poll runs on the calling thread); create it on the thread that calls `segment`.
public struct SegmentMonitor {
    public var progress: ((_ done: Int, _ total: Int) -> Bool)?
    public var cancellation: Cancellation?

    public init(progress: ((_ done: Int, _ total: Int) -> Bool)? = nil, cancellation: Cancellation? = nil) {
        self.progress = progress
        self.cancellation = cancellation
    }
}

extension Segmenter {
    /// A segmenter that runs `model` through its own inference session, configured by `card` (nil: the
    /// defaults of a model without a card, `ModelCard(config:)`: the input's grid, MR percentile preset,
    /// 96^3 windows at overlap 0.5, gaussian blending). Automatic windows (`card.window == nil`) become
    /// 96^3 here; `ModelCard.segmenterConfiguration(size:affine:)` resolves them for one volume.
    ///
    ///     let net = try DeformUXNet(config: config)
    ///     try net.load(from: "model.safetensors")
    ///     let segmentation = try Segmenter(model: net).segment(volume)   // labels on the volume's grid
    public convenience init(model: DeformUXNet, card: ModelCard? = nil) throws {
        let card = card ?? ModelCard(config: model.config)
        try card.check(against: model.config, operation: "Segmenter")
        try self.init(model: model, configuration: card.segmenterConfiguration())
    }

    /// A segmenter that runs `model` through its own inference session with `configuration`.
    public convenience init(model: DeformUXNet, configuration: SegmenterConfiguration) throws {
        try self.init(predictor: try SessionPredictor(model: model), configuration: configuration)
    }

    /// A segmenter that runs the network through `session` (shared with other users of the session,
    /// which take turns).
    public convenience init(session: Session, configuration: SegmenterConfiguration) throws {
        try self.init(predictor: SessionPredictor(session: session), configuration: configuration)
    }

    /// Progress units per window of a monitored segmentation (see `SegmentMonitor`).
    public var progressUnitsPerWindow: Int {
        predictor is SessionPredictor ? DeformUXNet.forwardSteps * (configuration.flipTTA ? 8 : 1) : 1
    }

    /// `segment(_:labelsInto:probabilitiesInto:progress:)` observed by `monitor`: progress inside the
    /// windows and cancellation polled inside the network's kernels (see `SegmentMonitor`).
    public func segment(_ volume: Volume, labelsInto labels: UnsafeMutablePointer<UInt8>,
                        probabilitiesInto probabilities: UnsafeMutablePointer<Float>? = nil,
                        monitor: SegmentMonitor) throws -> (statistics: SegmentationStatistics, preprocessing: Preprocessing) {
        if let network = predictor as? SessionPredictor {
            return try network.monitoring(monitor, unitsPerWindow: progressUnitsPerWindow) { windowProgress in
                try segment(volume, labelsInto: labels, probabilitiesInto: probabilities, progress: windowProgress)
            }
        }
        let c = monitor.cancellation
        return try segment(volume, labelsInto: labels, probabilitiesInto: probabilities, progress: { done, total in
            if let c, (try? c.check("segment", "")) == nil { return false }
            return monitor.progress?(done, total) ?? true
        })
    }

    /// `segment(_:probabilities:progress:)` observed by `monitor`.
    public func segment(_ volume: Volume, probabilities: Bool = false, monitor: SegmentMonitor) throws -> Segmentation {
        try segmentation(of: volume, probabilities: probabilities) { labels, probs in
            try segment(volume, labelsInto: labels, probabilitiesInto: probs, monitor: monitor)
        }
    }
}
