#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import DeformUX

/// `deformux predict -i IN -o OUT --model M`: a NIfTI image segmented into a NIfTI label map, for
/// Swift-only users (the Python package's `deformux predict` has the same options).
struct Predict: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "predict",
        abstract: "Segment a NIfTI image (.nii/.nii.gz) into a label map (uint8, the input's grid, affine and header).",
        discussion: "The model is a model card (.json, naming its weights) or weights (.safetensors; a sidecar <stem>.json card is used if present). Windows, overlap and preprocessing come from the card; the options override them."
    )

    @Option(name: [.customShort("i"), .long], help: "The image (.nii or .nii.gz; 4-D files: one channel per volume).")
    var input: String
    @Option(name: [.customShort("o"), .long], help: "The label map to write (.nii or .nii.gz), atomically.")
    var output: String
    @Option(help: "A model card (.json) or weights (.safetensors).") var model: String
    @Option(help: "Window overlap in [0, 1) (default: the card's).") var overlap: Double?
    @Option(help: "Window size: N, X,Y,Z (multiples of 16) or auto (default: the card's).") var window: String?
    @Flag(inversion: .prefixedNo, help: "Flip test-time augmentation, 8x the work (default: the card's).") var tta: Bool?
    @Option(help: "Windows per forward (default: the card's).") var batch: Int?
    @Option(help: "Also write the class probabilities (float32, x, y, z, class) here.") var probabilities: String?
    @Flag(inversion: .prefixedNo, help: "Keep the largest connected component of each label (default: the card's).")
    var largestComponent: Bool?
    @Option(help: "Worker threads (default: all CPUs).") var threads: Int?
    @Flag(help: "No progress bar.") var noProgress = false

    func run() throws {
        if let threads { try Threads.setCount(threads) }
        let window = try self.window.map(parseWindow)
        let bar = ProgressLine(label: "segment", enabled: !noProgress)
        let t0 = now()
        let result = try Segmenter.segmentFile(input: input, output: output, model: model, probabilities: probabilities,
                                               adjust: { card in
            if let overlap { card.overlap = overlap }
            if let window { card.window = window }
            if let tta { card.tta = tta }
            if let batch { card.batch = batch }
            if let largestComponent { card.largestComponent = largestComponent }
        }, monitor: SegmentMonitor(progress: bar.update))
        bar.finish()
        let s = result.statistics
        var counts = [Int](repeating: 0, count: 256)
        for l in result.labels.labels { counts[Int(l)] += 1 }
        let present = counts.enumerated().filter { $0.element > 0 }.map { "\($0.offset): \($0.element)" }
        fputs("deformux predict: \(input) -> \(output): \(result.labels.size.x) x \(result.labels.size.y) x \(result.labels.size.z) voxels, "
              + "\(s.windows.windowsRun) of \(s.windows.windows) windows, \(decimal(now() - t0, 1)) s; voxels per label [\(present.joined(separator: ", "))]\n",
              stderr)
    }
}

/// "96", "96,96,64" or "auto" (nil window: automatic).
func parseWindow(_ text: String) throws -> SIMD3<Int>? {
    if text == "auto" { return nil }
    let parts = text.split(separator: ",", omittingEmptySubsequences: false)
    let w = parts.compactMap { Int(String($0).trimmingCharacters(in: " ")) }
    guard w.count == parts.count, w.count == 1 || w.count == 3, w.allSatisfy({ $0 >= 16 && $0 % 16 == 0 }) else {
        throw ValidationError("--window must be N or X,Y,Z with multiples of 16, or auto; got \(text)")
    }
    return w.count == 1 ? SIMD3(w[0], w[0], w[0]) : SIMD3(w[0], w[1], w[2])
}

/// A one-line progress bar on stderr (only when stderr is a terminal): percentage, elapsed, time left.
final class ProgressLine {
    let label: String
    let enabled: Bool
    var start = 0.0, first: Int? = nil, lastDraw = 0.0, drawn = false

    init(label: String, enabled: Bool) {
        self.label = label
        self.enabled = enabled && isatty(2) != 0
    }

    func update(_ done: Int, _ total: Int) -> Bool {
        let t = now()
        if first == nil { first = done; start = t }
        guard enabled, t - lastDraw >= 0.1 || done >= total else { return true }
        lastDraw = t
        let fraction = total > 0 ? min(max(Double(done) / Double(total), 0), 1) : 0
        let filled = Int((fraction * 30).rounded())
        let elapsed = t - start
        let progressed = done - (first ?? 0)
        let left = progressed > 0 && done < total ? ", \(clock(elapsed * Double(total - done) / Double(progressed))) left" : ""
        fputs("\r\(label) \(Int(fraction * 100))% |" + String(repeating: "#", count: filled) + String(repeating: " ", count: 30 - filled)
              + "| \(clock(elapsed)) elapsed\(left)   ", stderr)
        drawn = true
        return true
    }

    func finish() { if drawn { fputs("\n", stderr) } }

    private func clock(_ seconds: Double) -> String {
        let s = Int(max(seconds, 0))
        let (h, m, r) = (s / 3600, (s % 3600) / 60, s % 60)
        func two(_ x: Int) -> String { x < 10 ? "0\(x)" : "\(x)" }
        return h > 0 ? "\(h):\(two(m)):\(two(r))" : "\(m):\(two(r))"
    }
}
