#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import DeformUX

/// `deformux bench segment`: one whole segmentation (issue 8's benchmark): by default a synthetic
/// 250 x 250 x 150 volume at overlap 0.5 with the full-size network (random weights), 75 windows of
/// 96^3. Prints the total time, windows, seconds per window, the time outside the windows and its share,
/// and the peak RSS. `--input` segments a NIfTI file instead (e.g. the bundled MNI152 T1), `--pad` adds
/// background around it, `--skip-threshold` skips windows holding only background.
struct BenchSegment: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "segment",
        abstract: "Time a whole segmentation: total, windows, seconds per window, time outside the windows, peak RSS.",
        discussion: "The default (full-size network, 250 x 250 x 150, 75 windows) takes about 10 minutes on 2 cores."
    )

    @OptionGroup var model: ModelOptions
    @Option(help: "Synthetic volume X,Y,Z.") var size = "250,250,150"
    @Option(help: "A NIfTI image instead of the synthetic volume.") var input: String?
    @Option(help: "Background voxels added on every side of the image.") var pad = 0
    @Option(help: "Window overlap in [0, 1).") var overlap = 0.5
    @Option(help: "Window: N, X,Y,Z or auto.") var window = "96"
    @Option(help: "Skip windows whose every input value is <= this (the card's skip_background).") var skipThreshold: Float?
    @Option(help: "Also write the labels here (timed).") var output: String?
    @Option(help: "Worker threads.") var threads = 2
    @Flag(help: "No progress bar.") var noProgress = false

    func run() throws {
        try Threads.setCount(threads)
        let config = try model.config()
        let tRead = now()
        var (size, values, affine, source) = try image()
        if pad > 0 {
            let n = size &+ SIMD3(repeating: 2 * pad)
            var padded = [Float](repeating: 0, count: n.x * n.y * n.z)
            for x in 0..<size.x { for y in 0..<size.y {
                let src = (x * size.y + y) * size.z, dst = ((x + pad) * n.y + y + pad) * n.z + pad
                for z in 0..<size.z { padded[dst + z] = values[src + z] }
            } }
            affine = affine * (try Affine([1, 0, 0, Double(-pad), 0, 1, 0, Double(-pad), 0, 0, 1, Double(-pad), 0, 0, 0, 1]))
            (size, values) = (n, padded)
        }
        let volume = try Volume(size: size, values: values, affine: affine)
        let readSeconds = now() - tRead

        let net = try DeformUXNet(config: config, seed: 1)
        var card = ModelCard(config: config)
        card.window = try parseWindow(window)
        card.overlap = overlap
        card.skipThreshold = skipThreshold
        let configuration = try card.segmenterConfiguration(size: volume.size, affine: volume.affine)
        let segmenter = try Segmenter(model: net, configuration: configuration)
        let bar = ProgressLine(label: "segment", enabled: !noProgress)
        let result = try segmenter.segment(volume, monitor: SegmentMonitor(progress: bar.update))
        bar.finish()
        var writeSeconds = 0.0
        if let output {
            let t = now()
            try NIfTI.write(result.labels.labels, dims: [size.x, size.y, size.z], affine: try NIfTIAffine(rowMajor: affine.values), to: output)
            writeSeconds = now() - t
        }
        let s = result.statistics
        let total = s.totalSeconds + readSeconds + writeSeconds
        let outside = total - s.predictSeconds
        let run = s.windows.windowsRun
        print("deformux bench segment: \(source) \(size.x) x \(size.y) x \(size.z)\(pad > 0 ? " (padded by \(pad))" : ""), window \(configuration.window.x)x\(configuration.window.y)x\(configuration.window.z), overlap \(overlap), \(Threads.count) threads")
        print("  network           \(config.block.rawValue) widths \(config.featureSize) hidden \(config.hiddenSize), \(config.outChannels) classes, \(net.parameterCount) parameters (random weights)")
        print("  network grid      \(s.networkSize.x) x \(s.networkSize.y) x \(s.networkSize.z)")
        print("  windows           \(s.windows.windows) (\(run) run, \(s.windows.windowsSkipped) skipped\(skipThreshold.map { " at threshold \($0)" } ?? ""))")
        print("  total             \(decimal(total, 2, width: 10)) s")
        if run > 0 { print("  in the network    \(decimal(s.predictSeconds, 2, width: 10)) s   (\(decimal(s.predictSeconds / Double(run), 3)) s per window)") }
        print("  outside windows   \(decimal(outside, 2, width: 10)) s   (\(decimal(100 * outside / max(total, 1e-9), 2))% of the total): preprocess \(decimal(s.preprocessSeconds, 2)), blend \(decimal(s.blendSeconds, 2)), postprocess \(decimal(s.postprocessSeconds, 2)), read \(decimal(readSeconds, 2)), write \(decimal(writeSeconds, 2))")
        print("  accumulator       \(decimal(Double(s.windows.accumulatorBytes) / 1048576, 1, width: 10)) MB")
        print("  peak RSS          \(decimal(peakRSSMegabytes(), 1, width: 10)) MB")
    }

    /// The image: a NIfTI file's first volume, or the synthetic head-like volume (a bright ellipsoid with
    /// noise on a dark background; the same recipe as the Python benchmark).
    func image() throws -> (SIMD3<Int>, [Float], Affine, String) {
        if let input {
            let file = try NIfTIFile(path: input)
            let v = try Volume(nifti: file)
            let n = v.size.x * v.size.y * v.size.z
            return (v.size, Array(v.values()[0..<n]), v.affine, input)
        }
        let d = size.split(separator: ",").compactMap { Int(String($0).trimmingCharacters(in: " ")) }
        guard d.count == 3, d.allSatisfy({ $0 >= 1 && $0 <= 4096 }) else { throw ValidationError("--size must be X,Y,Z, got \(size)") }
        var rng = SplitMix64(seed: 1)
        var values = [Float](repeating: 0, count: d[0] * d[1] * d[2])
        func axis(_ i: Int, _ n: Int) -> Float { n > 1 ? -1 + 2 * Float(i) / Float(n - 1) : 0 }
        for x in 0..<d[0] { for y in 0..<d[1] { for z in 0..<d[2] {
            let (a, b, c) = (axis(x, d[0]), axis(y, d[1]), axis(z, d[2]))
            let r = a * a / 0.8 + b * b / 0.9 + c * c / 0.85
            let noise = Float(Double(rng.next() >> 11) / Double(1 << 53) - 0.5) * 40
            values[(x * d[1] + y) * d[2] + z] = (r < 1 ? 400 + 200 * cosf(6 * r) : 0) + noise
        } } }
        return (SIMD3(d[0], d[1], d[2]), values, .identity, "synthetic")
    }
}
