#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import DeformUX

/// `deformux bench conv`: the convolution kernels at the sizes of a 96^3 DeformUX-Net forward,
/// channels-last, median of several runs after a warm-up. GFLOP/s = 2 * multiply-adds / time, counting
/// a direct convolution's multiply-adds also where the Winograd path does fewer (hence above the
/// machine's peak there).
struct BenchConv: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "conv",
        abstract: "Time the convolution kernels (3x3x3 direct, im2col, 1x1x1, transposed, depthwise) at network sizes."
    )

    @Option(help: "Worker threads.") var threads = 2
    @Option(help: "Timed runs (the median is printed).") var repeats = 3
    @Option(help: "Edge of the network's input patch (the cases scale with it).") var size = 96
    @Option(help: "Run only the cases whose name contains this.") var only: String?

    func run() throws {
        guard threads >= 1, repeats >= 1, size >= 16, size % 16 == 0 else {
            throw ValidationError("--threads and --repeats must be >= 1, --size a multiple of 16")
        }
        try Threads.setCount(threads)
        let s = size, h = size / 2
        print("deformux bench conv: channels-last, \(Threads.count) threads, median of \(repeats) after a warm-up, patch \(s)^3")
        print("  case                                         ms   GFLOP/s  (per CPU-time, \(Threads.count) threads)")

        // The 3x3x3 convolutions that dominate the network.
        try conv3("3x3x3 48->48 @\(s) (decoder1)", cin: 48, cin2: 0, cout: 48, edge: s)
        try conv3("3x3x3 [48+48]->48 @\(s) (decoder2 conv1)", cin: 96, cin2: 48, cout: 48, edge: s)
        try conv3("3x3x3 48->96 @\(h) (encoder2 conv1)", cin: 48, cin2: 0, cout: 96, edge: h)
        try conv3("3x3x3 96->96 @\(h) (encoder2 conv2)", cin: 96, cin2: 0, cout: 96, edge: h)
        try conv3("3x3x3 [96+96]->96 @\(h) (decoder3 conv1)", cin: 192, cin2: 96, cout: 96, edge: h)
        try conv3("3x3x3 192->96 @\(h) (one source)", cin: 192, cin2: 0, cout: 96, edge: h)
        try conv3("3x3x3 1->48 @\(s) (encoder1 conv1)", cin: 1, cin2: 0, cout: 48, edge: s)
        try other("3x3x3 48->48 @\(s) +IN/LReLU in, +stats", cin: 48, cin2: 0, cout: 48, edge: s, k: 3, stride: 1, pad: 1,
                  fused: true)
        try conv3("3x3x3 [192+192]->192 @\(s / 4) (decoder4 conv1)", cin: 384, cin2: 192, cout: 192, edge: s / 4)
        try conv3("3x3x3 [384+384]->384 @\(s / 8) (decoder5 conv1)", cin: 768, cin2: 384, cout: 384, edge: s / 8)
        try conv3("3x3x3 768->768 @\(s / 16) (encoder5 conv2)", cin: 768, cin2: 0, cout: 768, edge: s / 16)

        // Backward of the big 3x3x3 convs: input gradient and weight gradient timed apart.
        try backward("3x3x3 48->48 @\(s)", cin: 48, cin2: 0, cout: 48, edge: s)
        try backward("3x3x3 [96+96]->96 @\(h)", cin: 192, cin2: 96, cout: 96, edge: h)

        // The other kernels at their network sizes.
        try other("7x7x7 s2 1->48 @\(s) (stem)", cin: 1, cin2: 0, cout: 48, edge: s, k: 7, stride: 2, pad: 3)
        try other("2x2x2 s2 48->96 @\(h) (down 1)", cin: 48, cin2: 0, cout: 96, edge: h, k: 2, stride: 2, pad: 0)
        try other("1x1x1 [48+48]->48 @\(s) (decoder2 conv3)", cin: 96, cin2: 48, cout: 48, edge: s, k: 1, stride: 1, pad: 0)
        try other("1x1x1 48->16 @\(s) (head)", cin: 48, cin2: 0, cout: 16, edge: s, k: 1, stride: 1, pad: 0)
        try other("1x1x1 48->192 @\(h) (dense pw1)", cin: 48, cin2: 0, cout: 192, edge: h, k: 1, stride: 1, pad: 0)
        try transposed("convT 2x2x2 96->48 @\(h)->\(s) (decoder2)", cin: 96, cout: 48, edge: h)
        try transposed("convT 2x2x2 192->96 @\(s / 4)->\(h) (decoder3)", cin: 192, cout: 96, edge: s / 4)
        try depthwise("depthwise 7x7x7 C48 @\(h) (UX-Net stage 0)", c: 48, edge: h)
        try grouped("grouped pw1 48->192 @\(h) (UX-Net MLP)", c: 48, expand: true, edge: h)
        try grouped("grouped pw2 192->48 @\(h) (UX-Net MLP)", c: 48, expand: false, edge: h)
        print("  peak RSS \(decimal(peakRSSMegabytes(), 1)) MB")
    }

    func selected(_ name: String) -> Bool { only.map { name.contains($0) } ?? true }

    /// Median wall time in ms; also keeps the median process CPU time of the runs, from which
    /// `report` derives the rate per busy thread (a figure that other load on the machine disturbs less).
    func timeMs(_ body: () throws -> Void) rethrows -> Double {
        try body()  // warm-up: workspaces are allocated here
        var samples: [Double] = [], cpu: [Double] = []
        for _ in 0..<repeats {
            let t0 = now(), c0 = cpuSeconds()
            try body()
            samples.append((now() - t0) * 1e3)
            cpu.append((cpuSeconds() - c0) * 1e3)
        }
        BenchConv.lastCPUms = cpu.sorted()[cpu.count / 2]
        return samples.sorted()[samples.count / 2]
    }

    nonisolated(unsafe) static var lastCPUms = 0.0

    func cpuSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
    }

    func report(_ name: String, ms: Double, macs: Double, extra: String = "") {
        var label = name
        while label.count < 38 { label += " " }
        // CPU-time rate: GFLOP/s if every thread had had a core to itself the whole time.
        let cpuRate = 2 * macs / (BenchConv.lastCPUms / Double(Threads.count)) / 1e6
        print("  \(label) \(decimal(ms, 1, width: 8))  \(decimal(2 * macs / ms / 1e6, 1, width: 8))  \(decimal(cpuRate, 1, width: 8))  \(extra)")
    }

    func conv3(_ name: String, cin: Int, cin2: Int, cout: Int, edge: Int) throws {
        try other(name, cin: cin, cin2: cin2, cout: cout, edge: edge, k: 3, stride: 1, pad: 1)
    }

    /// `fused`: with an input transform (InstanceNorm + LeakyReLU of the input) and output statistics.
    func other(_ name: String, cin: Int, cin2: Int, cout: Int, edge: Int, k: Int, stride: Int, pad: Int,
               fused: Bool = false) throws {
        guard selected(name) else { return }
        let shape = try Conv3d.Shape(n: 1, cin: cin, cout: cout, d: edge, h: edge, w: edge,
                                     kernel: k, stride: stride, padding: pad, cin2: cin2)
        var rng = BenchRNG(seed: 7)
        let voxels = edge * edge * edge
        let x1 = try filled(voxels * shape.cin1, &rng)
        let x2 = cin2 > 0 ? try filled(voxels * cin2, &rng) : nil
        let weight = try filled(shape.weightCount, &rng, scale: 0.05)
        let packed = try Tensor(zeros: [Conv3d.packedCount(shape)])
        let packMs = timeMs { Conv3d.pack(weight: weight.pointer, into: packed.pointer, shape: shape) }
        let y = try Tensor(zeros: [shape.outputCount])
        let ws = Workspace()
        let scale = try filled(cin, &rng), shift = try filled(cin, &rng)
        let transform = fused ? Conv3d.InputTransform(scale: scale.pointer, shift: shift.pointer, leakySlope: 0.01) : nil
        var stats = [Double](repeating: 0, count: 2 * cout)
        let ms = try stats.withUnsafeMutableBufferPointer { sp in
            try timeMs {
                try Conv3d.forward(x: x1.pointer, x2: x2?.pointer, packedWeight: packed.pointer, bias: nil,
                                   y: y.pointer, shape: shape, workspace: ws, inputTransform: transform,
                                   statistics: fused ? sp.baseAddress : nil)
            }
        }
        report(name, ms: ms, macs: Double(shape.macs), extra: "pack \(decimal(packMs, 2)) ms")
    }

    func backward(_ name: String, cin: Int, cin2: Int, cout: Int, edge: Int) throws {
        guard selected("bwd " + name) || selected("backward") else { return }
        let shape = try Conv3d.Shape(n: 1, cin: cin, cout: cout, d: edge, h: edge, w: edge,
                                     kernel: 3, stride: 1, padding: 1, cin2: cin2)
        var rng = BenchRNG(seed: 11)
        let voxels = edge * edge * edge
        let x1 = try filled(voxels * shape.cin1, &rng)
        let x2 = cin2 > 0 ? try filled(voxels * cin2, &rng) : nil
        let weight = try filled(shape.weightCount, &rng, scale: 0.05)
        let gy = try filled(shape.outputCount, &rng)
        let gx1 = try Tensor(zeros: [voxels * shape.cin1])
        let gx2 = cin2 > 0 ? try Tensor(zeros: [voxels * cin2]) : nil
        let gw = try Tensor(zeros: [shape.weightCount])
        let ws = Workspace()
        let packed = try Conv3d.pack(weight: try weight.reshaped([cout, cin, 3, 3, 3]), shape: shape)
        let dgrad = try timeMs {
            try Conv3d.backward(x: x1.pointer, x2: x2?.pointer, packedWeight: packed.pointer, gradY: gy.pointer,
                                gradX: gx1.pointer, gradX2: gx2?.pointer, gradWeight: nil, gradBias: nil,
                                shape: shape, workspace: ws)
        }
        report("bwd input grad " + name, ms: dgrad, macs: Double(shape.macs))
        let wgrad = try timeMs {
            try Conv3d.backward(x: x1.pointer, x2: x2?.pointer, packedWeight: packed.pointer, gradY: gy.pointer,
                                gradX: nil, gradX2: nil, gradWeight: gw.pointer, gradBias: nil,
                                shape: shape, workspace: ws)
        }
        report("bwd weight grad " + name, ms: wgrad, macs: Double(shape.macs))
    }

    func transposed(_ name: String, cin: Int, cout: Int, edge: Int) throws {
        guard selected(name) else { return }
        let shape = try ConvTranspose3d.Shape(n: 1, cin: cin, cout: cout, d: edge, h: edge, w: edge)
        var rng = BenchRNG(seed: 8)
        let x = try filled(shape.inputCount, &rng)
        let weight = try filled(shape.weightCount, &rng, scale: 0.05)
        let packed = try Tensor(zeros: [ConvTranspose3d.packedCount(shape)])
        ConvTranspose3d.pack(weight: weight.pointer, into: packed.pointer, shape: shape)
        let y = try Tensor(zeros: [shape.outputCount])
        let ws = Workspace()
        let ms = try timeMs {
            try ConvTranspose3d.forward(x: x.pointer, packedWeight: packed.pointer, bias: nil, y: y.pointer,
                                        shape: shape, workspace: ws)
        }
        report(name, ms: ms, macs: Double(shape.macs))
    }

    func depthwise(_ name: String, c: Int, edge: Int) throws {
        guard selected(name) else { return }
        let shape = try DepthwiseConv3d.Shape(n: 1, c: c, d: edge, h: edge, w: edge, kernel: 7)
        var rng = BenchRNG(seed: 9)
        let x = try filled(shape.count, &rng)
        let weight = try filled(shape.weightCount, &rng, scale: 0.05)
        let bias = try filled(c, &rng)
        let packed = try Tensor(zeros: [DepthwiseConv3d.packedCount(shape)])
        DepthwiseConv3d.pack(weight: weight.pointer, into: packed.pointer, shape: shape)
        let y = try Tensor(zeros: [shape.count])
        let ws = Workspace()
        let ms = try timeMs {
            try DepthwiseConv3d.forward(x: x.pointer, packedWeight: packed.pointer, bias: bias.pointer, y: y.pointer,
                                        shape: shape, workspace: ws)
        }
        report(name, ms: ms, macs: Double(shape.macs))
        let gx = try Tensor(zeros: [shape.count]), gw = try Tensor(zeros: [shape.weightCount]), gb = try Tensor(zeros: [c])
        let bwd = try timeMs {
            try DepthwiseConv3d.backward(x: x.pointer, packedWeight: packed.pointer, gradY: y.pointer, gradX: gx.pointer,
                                         gradWeight: gw.pointer, gradBias: gb.pointer, shape: shape, workspace: ws)
        }
        report("bwd (all grads) " + name, ms: bwd, macs: 2 * Double(shape.macs))
    }

    func grouped(_ name: String, c: Int, expand: Bool, edge: Int) throws {
        guard selected(name) else { return }
        let voxels = edge * edge * edge
        var rng = BenchRNG(seed: 10)
        let x = try filled(voxels * (expand ? c : 4 * c), &rng)
        let weight = try filled(4 * c, &rng)
        let bias = try filled(expand ? 4 * c : c, &rng)
        let y = try Tensor(zeros: [voxels * (expand ? 4 * c : c)])
        let ms = timeMs {
            if expand {
                GroupedPointwise3d.expand(x: x.pointer, weight: weight.pointer, bias: bias.pointer, y: y.pointer,
                                          voxels: voxels, channels: c, ratio: 4)
            } else {
                GroupedPointwise3d.reduce(x: x.pointer, weight: weight.pointer, bias: bias.pointer, y: y.pointer,
                                          voxels: voxels, channels: c, ratio: 4)
            }
        }
        report(name, ms: ms, macs: Double(voxels * 4 * c))
    }

    func filled(_ count: Int, _ rng: inout BenchRNG, scale: Float = 1) throws -> Tensor {
        let t = try Tensor(zeros: [count])
        for i in 0..<count { t.pointer[i] = scale * rng.uniform() }
        return t
    }
}

/// Uniform floats in [-1, 1) from a 64-bit LCG: enough for timing inputs.
struct BenchRNG {
    var state: UInt64
    init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 | 1 }
    mutating func uniform() -> Float {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return Float(state >> 40) / Float(1 << 23) - 1
    }
}
