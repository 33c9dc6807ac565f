#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import DeformUX

/// `deformux bench ddc`: one DDC layer (offset branch + depthwise deformable 3x3x3 conv), forward and
/// forward+backward, median of several runs after a warm-up.
struct BenchDDC: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ddc",
        abstract: "Time one DDC layer: forward and forward+backward (issue 2's benchmark)."
    )

    @Option(help: "Channels.") var channels = 48
    @Option(help: "Edge of the cubic volume.") var size = 48
    @Option(help: "Batch size.") var batch = 1
    @Option(help: "Worker threads.") var threads = 2
    @Option(help: "Timed runs (the median is printed).") var repeats = 5
    @Option(help: "Offset mode: aligned or official.") var offsetMode = "aligned"
    @Option(help: "Scale of the random offset branch (offsets of about 1.5 voxels at 1; 0 gives zero offsets).")
    var offsetScale: Float = 1

    func run() throws {
        guard let mode = OffsetMode(rawValue: offsetMode) else {
            throw ValidationError("--offset-mode must be aligned or official, got \(offsetMode)")
        }
        guard channels >= 1, size >= 1, batch >= 1, repeats >= 1 else {
            throw ValidationError("--channels, --size, --batch and --repeats must be >= 1")
        }
        try Threads.setCount(threads)
        var layout = ParameterLayout()
        let layer = try DeformableDepthwiseConv3d(channels: channels, offsetMode: mode, layout: &layout)
        let params = try ParameterStore(layout: layout)
        var rng = SplitMix64(seed: 42)
        layer.initialize(params, rng: &rng)
        // A non-zero offset branch: offsets of a few voxels, the regime a trained model is in.
        let ow = params.value(layer.offsetWeight)
        let spread = offsetScale * 2.5 / Float(channels).squareRoot()
        for i in 0..<(81 * channels) { ow[i] = rng.uniform(-spread, spread) }
        let ob = params.value(layer.offsetBias)
        for i in 0..<81 { ob[i] = offsetScale * rng.uniform(-1, 1) }

        let shape = [batch, channels, size, size, size]
        let x = try Tensor(zeros: shape)
        for i in 0..<x.count { x.pointer[i] = rng.uniform(-1, 1) }
        let gy = try Tensor(zeros: shape)
        for i in 0..<gy.count { gy.pointer[i] = rng.uniform(-1, 1) }

        // (median, fastest) in ms: the machine is shared, the fastest run shows what the code can do.
        func timeMs(_ body: () throws -> Void) rethrows -> (Double, Double) {
            try body()  // warm-up: workspaces are allocated here
            var samples: [Double] = []
            for _ in 0..<repeats {
                let t0 = now()
                try body()
                samples.append((now() - t0) * 1e3)
            }
            let sorted = samples.sorted()
            return (sorted[sorted.count / 2], sorted[0])
        }

        // The layer as the network runs it: channels-last activations, a runner's context.
        let ctx = try RunContext.standalone(store: params, gradients: true)
        let xl = try toChannelsLast(x), gyl = try toChannelsLast(gy)
        let gxl = try Tensor(zeros: xl.shape)
        let fwd = try timeMs { _ = try layer.forward(xl, ctx) }
        let fwdBwd = try timeMs {
            _ = try layer.forward(xl, ctx)
            try layer.backward(xl, gradY: gyl, ctx, gradX: gxl)
        }
        // The operator alone, on the offsets the layer computes.
        let offsets = try Tensor(zeros: [batch, 81, size, size, size])
        let s = try DDCShape(n: batch, c: channels, d: size, h: size, w: size)
        let ws = Workspace()
        try DDCLayerOps.forward(x: x.pointer, weight: params.value(layer.weight), bias: params.value(layer.bias),
                                offsetWeight: ow, offsetBias: ob, mode: mode, y: gy.pointer,
                                offsetsOut: offsets.pointer, shape: s, workspace: ws)
        for i in 0..<gy.count { gy.pointer[i] = rng.uniform(-1, 1) }
        let y = try Tensor(zeros: shape)
        let opFwd = try timeMs {
            try DeformConv3d.forward(x: x.pointer, offsets: offsets.pointer, weight: params.value(layer.weight),
                                     bias: params.value(layer.bias), y: y.pointer, shape: s, workspace: ws)
        }
        let gx = try Tensor(zeros: shape), go = try Tensor(zeros: offsets.shape)
        let opBwd = try timeMs {
            try DeformConv3d.backward(x: x.pointer, offsets: offsets.pointer, weight: params.value(layer.weight),
                                      gradY: gy.pointer, gradX: gx.pointer, gradOffsets: go.pointer,
                                      gradWeight: params.gradient(layer.weight), gradBias: params.gradient(layer.bias),
                                      shape: s, workspace: ws)
        }
        let voxels = Double(batch * size * size * size)
        // Multiply-adds: offset branch 81*C per voxel; sampling 8 corners + 1 tap weight per (tap, channel).
        let macs = voxels * Double(channels) * Double(81 + 27 * 9)
        let gflops = 2 * macs / fwd.0 / 1e6
        func ms(_ t: (Double, Double)) -> String { "\(decimal(t.0, 1, width: 8)) ms (fastest \(decimal(t.1, 1)))" }
        print("deformux bench ddc: N=\(batch) C=\(channels) \(size)^3, offset mode \(mode.rawValue), offset scale \(offsetScale), \(Threads.count) threads, median of \(repeats)")
        print("  layer forward           \(ms(fwd))   \(decimal(gflops, 1)) GFLOP/s")
        print("  layer forward+backward  \(ms(fwdBwd))")
        print("  operator forward        \(ms(opFwd))")
        print("  operator backward       \(ms(opBwd))")
        print("  peak RSS                \(decimal(peakRSSMegabytes(), 1, width: 8)) MB")
    }
}

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}

/// The resident set now (VmRSS of /proc/self/status), in MB; 0 where that file is missing.
func currentRSSMegabytes() -> Double {
    guard let f = fopen("/proc/self/status", "r") else { return 0 }
    defer { fclose(f) }
    var line = [CChar](repeating: 0, count: 256)
    while fgets(&line, Int32(line.count), f) != nil {
        let s = String(cString: line)
        if s.hasPrefix("VmRSS:") {
            let digits = s.filter { $0.isNumber }
            return (Double(digits) ?? 0) / 1024
        }
    }
    return 0
}

func peakRSSMegabytes() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return Double(usage.ru_maxrss) / 1024  // kilobytes on Linux
}
