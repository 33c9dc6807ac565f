// Segmentation behind an opaque handle (deformux.h: dfx_segmenter_*, dfx_segment, dfx_model_card_*).
// A segmenter runs a session's network over whole volumes with a model card's settings; it keeps its
// working memory (the network grid, the accumulator ring, window buffers) from one volume to the next.
// Automatic windows (card "window": null) are resolved per volume; the engine's Segmenter is rebuilt
// only when the resolved configuration changes.
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import DeformUX

final class SegmenterHandle {
    let card: ModelCard
    /// Keeps the session (and its model) alive as long as the segmenter.
    let session: SessionHandle
    let predictor: SessionPredictor
    let lock = OwnedLock("segmenter")
    /// The engine's segmenter for the last configuration (guarded by `lock`).
    private var current: Segmenter?
    /// The statistics of the last successful call, as JSON (guarded by `statisticsLock`).
    private var lastStatistics = "null"
    private let statisticsLock = ShortLock()

    init(card: ModelCard, session: SessionHandle) throws {
        try card.check(against: session.session.model.config, operation: "segmenter_create")
        self.card = card
        self.session = session
        predictor = SessionPredictor(session: session.session)
        // Validate the configuration now (window multiples of 16, overlap, batch, ...), with 96^3 for
        // automatic windows.
        current = try Segmenter(predictor: predictor, configuration: card.segmenterConfiguration())
    }

    /// The segmenter for a volume (call holding `lock`).
    func segmenter(for volume: Volume) throws -> Segmenter {
        let configuration = try card.segmenterConfiguration(size: volume.size, affine: volume.affine)
        if let current, current.configuration == configuration { return current }
        current?.release()
        current = nil
        let s = try Segmenter(predictor: predictor, configuration: configuration)
        current = s
        return s
    }

    func releaseMemory() { current?.release() }
    var retainedBytes: Int { current?.retainedBytes ?? 0 }

    var statistics: String {
        get { statisticsLock.withLock { lastStatistics } }
        set { statisticsLock.withLock { lastStatistics = newValue } }
    }
}

private func segmenterHandle(_ p: OpaquePointer?, _ op: String) throws -> SegmenterHandle {
    guard let p else { throw DeformUXError.invalidArgument(op, "segmenter must not be NULL") }
    return Unmanaged<SegmenterHandle>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

/// Copies `text` into buf (truncated to cap - 1 bytes, NUL-terminated when cap > 0); *needed receives
/// the bytes the whole text needs (deformux.h's text convention).
private func copyText(_ text: String, _ buf: UnsafeMutablePointer<CChar>?, _ cap: Int64,
                      _ needed: UnsafeMutablePointer<Int64>?, _ op: String) throws {
    guard cap >= 0 else { throw DeformUXError.invalidArgument(op, "cap must be >= 0", got: "\(cap)") }
    let bytes = Array(text.utf8)
    needed?.pointee = Int64(bytes.count + 1)
    guard let buf, cap > 0 else { return }
    let n = min(bytes.count, Int(cap) - 1)
    for i in 0..<n { buf[i] = CChar(bitPattern: bytes[i]) }
    buf[n] = 0
}

/// The statistics of one segmentation as JSON: counts, seconds per stage and what the preprocessing did.
private func statisticsJSON(_ s: SegmentationStatistics, _ p: Preprocessing, _ c: SegmenterConfiguration,
                            unitsPerWindow: Int) -> String {
    func size(_ v: SIMD3<Int>) -> String { "[\(v.x), \(v.y), \(v.z)]" }
    func num(_ x: Double) -> String { x.isFinite ? "\(x)" : "null" }
    func floats(_ a: [Float]) -> String { "[" + a.map { num(Double($0)) }.joined(separator: ", ") + "]" }
    let w = s.windows
    let fields: [(String, String)] = [
        ("windows", "\(w.windows)"), ("windows_run", "\(w.windowsRun)"), ("windows_skipped", "\(w.windowsSkipped)"),
        ("batches", "\(w.batches)"), ("forwards", "\(w.predictorCalls)"), ("window", size(c.window)),
        ("units_per_window", "\(unitsPerWindow)"),
        ("accumulator_planes", "\(w.accumulatorPlanes)"), ("accumulator_planes_high_water", "\(w.accumulatorPlanesHighWater)"),
        ("accumulator_bytes", "\(w.accumulatorBytes)"),
        ("input_size", size(p.inputSize)), ("canonical_size", size(p.reorientation.canonicalSize)),
        ("reorientation_axes", "[" + p.reorientation.axes.map(String.init).joined(separator: ", ") + "]"),
        ("reorientation_flips", "[" + p.reorientation.flips.map { $0 ? "true" : "false" }.joined(separator: ", ") + "]"),
        ("resampled_size", size(p.resampling.outputSize)), ("network_size", size(s.networkSize)),
        ("padding_before", size(p.padding.before)),
        ("intensity_lower", floats(p.intensity.lower)), ("intensity_upper", floats(p.intensity.upper)),
        ("preprocess_seconds", num(s.preprocessSeconds)), ("predict_seconds", num(s.predictSeconds)),
        ("blend_seconds", num(s.blendSeconds)), ("postprocess_seconds", num(s.postprocessSeconds)),
        ("total_seconds", num(s.totalSeconds)),
    ]
    return "{" + fields.map { "\"\($0.0)\": \($0.1)" }.joined(separator: ", ") + "}"
}

// MARK: Model cards

/// A model card parsed and checked by the engine, with every default written out (the Python package
/// reads cards through this, so both languages share one parser).
@_cdecl("dfx_model_card_normalize")
public func dfx_model_card_normalize(_ cardJSON: UnsafePointer<CChar>?, _ buf: UnsafeMutablePointer<CChar>?, _ cap: Int64,
                                     _ needed: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded("model_card_normalize") {
        let op = "model_card_normalize"
        guard let cardJSON else { throw DeformUXError.invalidArgument(op, "card_json must not be NULL") }
        try copyText(try ModelCard(json: String(cString: cardJSON)).json, buf, cap, needed, op)
    }
}

// MARK: Segmenter

@_cdecl("dfx_segmenter_create")
public func dfx_segmenter_create(_ session: OpaquePointer?, _ configJSON: UnsafePointer<CChar>?,
                                 _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guarded("segmenter_create") {
        let op = "segmenter_create"
        guard let out else { throw DeformUXError.invalidArgument(op, "out must not be NULL") }
        out.pointee = nil
        guard let session else { throw DeformUXError.invalidArgument(op, "session must not be NULL") }
        let s = Unmanaged<SessionHandle>.fromOpaque(UnsafeRawPointer(session)).takeUnretainedValue()
        let card = try configJSON.map { try ModelCard(json: String(cString: $0)) } ?? ModelCard(config: s.session.model.config)
        let h = try SegmenterHandle(card: card, session: s)
        out.pointee = OpaquePointer(Unmanaged.passRetained(h).toOpaque())
    }
}

@_cdecl("dfx_segmenter_free")
public func dfx_segmenter_free(_ segmenter: OpaquePointer?) {
    guard let segmenter else { return }
    Unmanaged<SegmenterHandle>.fromOpaque(UnsafeRawPointer(segmenter)).release()
}

/// The input and output channel counts of the segmenter's model; either pointer may be NULL.
@_cdecl("dfx_segmenter_channels")
public func dfx_segmenter_channels(_ segmenter: OpaquePointer?, _ inChannels: UnsafeMutablePointer<Int32>?,
                                   _ outChannels: UnsafeMutablePointer<Int32>?) -> Int32 {
    guarded("segmenter_channels") {
        let h = try segmenterHandle(segmenter, "segmenter_channels")
        inChannels?.pointee = Int32(h.predictor.inChannels)
        outChannels?.pointee = Int32(h.predictor.outChannels)
    }
}

/// The configuration the segmenter runs with: its model card with every default written out.
@_cdecl("dfx_segmenter_config_json")
public func dfx_segmenter_config_json(_ segmenter: OpaquePointer?, _ buf: UnsafeMutablePointer<CChar>?, _ cap: Int64,
                                      _ needed: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded("segmenter_config_json") {
        let h = try segmenterHandle(segmenter, "segmenter_config_json")
        try copyText(h.card.json, buf, cap, needed, "segmenter_config_json")
    }
}

/// Segments one volume: image C x X x Y x Z float32 (C order, channels first; x, y, z as nibabel indexes
/// them), its affine (16 doubles, row-major), labels X x Y x Z uint8 out, probabilities C_out x X x Y x Z
/// float32 out (or NULL).
@_cdecl("dfx_segment")
public func dfx_segment(_ segmenter: OpaquePointer?, _ image: UnsafePointer<Float>?, _ channels: Int64,
                        _ size: UnsafePointer<Int64>?, _ affine: UnsafePointer<Double>?,
                        _ labels: UnsafeMutablePointer<UInt8>?, _ probabilities: UnsafeMutablePointer<Float>?,
                        _ progress: ProgressCallback?, _ user: UnsafeMutableRawPointer?) -> Int32 {
    guarded("segment") {
        let op = "segment"
        let h = try segmenterHandle(segmenter, op)
        guard let image else { throw DeformUXError.invalidArgument(op, "image must not be NULL") }
        guard let size else { throw DeformUXError.invalidArgument(op, "size must not be NULL") }
        guard let affine else { throw DeformUXError.invalidArgument(op, "affine must not be NULL") }
        guard let labels else { throw DeformUXError.invalidArgument(op, "labels must not be NULL") }
        let cin = h.predictor.inChannels
        guard channels == Int64(cin) else {
            throw DeformUXError.shapeMismatch(op, "the image's channels do not match the model's input",
                                              expected: "\(cin) channel\(cin == 1 ? "" : "s")", got: "\(channels)")
        }
        for a in 0..<3 where size[a] < 1 || size[a] > Int64(Int32.max) {
            throw DeformUXError.invalidArgument(op, "bad image size", expected: "sizes in 1...\(Int32.max)",
                                                got: "[\(size[0]), \(size[1]), \(size[2])]")
        }
        let s = SIMD3(Int(size[0]), Int(size[1]), Int(size[2]))
        _ = try Tensor.elementCount([max(cin, h.predictor.outChannels), s.x, s.y, s.z], context: op)
        let volume = try Volume(borrowing: UnsafeMutablePointer(mutating: image), size: s, channels: cin,
                                affine: try Affine((0..<16).map { affine[$0] }))

        // The C callback reports progress and is polled inside the network's steps as the cancellation.
        // Polls repeat the last reported numbers; none are made before the first report (the total is
        // known only once the windows are planned).
        final class Last { var done: Int64 = 0; var total: Int64 = 0 }
        let last = Last()
        let monitor = progress.map { cb in
            SegmentMonitor(progress: { done, total in
                last.done = Int64(done)
                last.total = Int64(total)
                return report(cb, user, Int64(done), Int64(total))
            }, cancellation: Cancellation(poll: { last.total == 0 || report(cb, user, last.done, last.total) }))
        } ?? SegmentMonitor()

        try h.lock.withLock(op) {
            let segmenter = try h.segmenter(for: volume)
            let (stats, record) = try segmenter.segment(volume, labelsInto: labels, probabilitiesInto: probabilities,
                                                        monitor: monitor)
            h.statistics = statisticsJSON(stats, record, segmenter.configuration,
                                          unitsPerWindow: segmenter.progressUnitsPerWindow)
        }
    }
}

/// The statistics of the segmenter's last successful dfx_segment, as JSON ("null" before the first).
@_cdecl("dfx_segmenter_statistics_json")
public func dfx_segmenter_statistics_json(_ segmenter: OpaquePointer?, _ buf: UnsafeMutablePointer<CChar>?, _ cap: Int64,
                                          _ needed: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded("segmenter_statistics_json") {
        let h = try segmenterHandle(segmenter, "segmenter_statistics_json")
        try copyText(h.statistics, buf, cap, needed, "segmenter_statistics_json")
    }
}

/// Frees the working memory the segmenter keeps between volumes (not the session's).
@_cdecl("dfx_segmenter_release_memory")
public func dfx_segmenter_release_memory(_ segmenter: OpaquePointer?) -> Int32 {
    guarded("segmenter_release_memory") {
        let h = try segmenterHandle(segmenter, "segmenter_release_memory")
        try h.lock.withLock("segmenter_release_memory") { h.releaseMemory() }
    }
}

/// Bytes of working memory the segmenter keeps between volumes (not counting the session's).
@_cdecl("dfx_segmenter_retained_bytes")
public func dfx_segmenter_retained_bytes(_ segmenter: OpaquePointer?, _ out: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded("segmenter_retained_bytes") {
        let h = try segmenterHandle(segmenter, "segmenter_retained_bytes")
        guard let out else { throw DeformUXError.invalidArgument("segmenter_retained_bytes", "out must not be NULL") }
        out.pointee = Int64(try h.lock.withLock("segmenter_retained_bytes") { h.retainedBytes })
    }
}
