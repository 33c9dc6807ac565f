import ArgumentParser
import DeformUX

/// Options that pick a network configuration, shared by the commands that build one.
struct ModelOptions: ParsableArguments {
    @Option(help: "Input channels.") var inChannels = 1
    @Option(help: "Output channels (classes).") var outChannels = 16
    @Option(help: "Encoder widths, comma-separated.") var featureSize = "48,96,192,384"
    @Option(help: "Blocks per stage, comma-separated.") var depths = "2,2,2,2"
    @Option(help: "Width of encoder5.") var hiddenSize = 768
    @Option(help: "Encoder block: deformux or uxnet.") var block = "deformux"
    @Option(help: "MLP: dense, grouped or none (default: dense for deformux, grouped for uxnet).") var mlp: String?
    @Option(help: "Offset mode: aligned or official.") var offsetMode = "aligned"
    @Option(help: "UX-Net kernel size.") var kernelSize = 7

    func config() throws -> DeformUXNetConfig {
        func ints(_ s: String, _ name: String) throws -> [Int] {
            let v = s.split(separator: ",").map { Int(String($0).trimmingCharacters(in: " ")) }
            guard v.allSatisfy({ $0 != nil }) else { throw ValidationError("--\(name) must be integers separated by commas, got \(s)") }
            return v.compactMap { $0 }
        }
        guard let b = DeformUXNetConfig.Block(rawValue: block) else { throw ValidationError("--block must be deformux or uxnet, got \(block)") }
        guard let m = OffsetMode(rawValue: offsetMode) else { throw ValidationError("--offset-mode must be aligned or official, got \(offsetMode)") }
        var mlpValue: DeformUXNetConfig.MLP?
        if let mlp {
            guard let v = DeformUXNetConfig.MLP(rawValue: mlp) else { throw ValidationError("--mlp must be dense, grouped or none, got \(mlp)") }
            mlpValue = v
        }
        let c = DeformUXNetConfig(inChannels: inChannels, outChannels: outChannels,
                                  featureSize: try ints(featureSize, "feature-size"), depths: try ints(depths, "depths"),
                                  hiddenSize: hiddenSize, block: b, mlp: mlpValue, offsetMode: m, kernelSize: kernelSize)
        try c.validate()
        return c
    }
}

extension String {
    func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}

/// `deformux bench model`: one forward of the whole network, batch 1, a random input.
struct BenchModel: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "model",
        abstract: "Time the network's forward pass and print seconds, GFLOP/s and peak RSS (issue 3's benchmark)."
    )

    @OptionGroup var model: ModelOptions
    @Option(help: "Edge of the cubic input (a multiple of 16).") var size = 96
    @Option(help: "Worker threads.") var threads = 2
    @Option(help: "Timed runs (the median is printed).") var repeats = 1
    @Flag(help: "Skip the warm-up run.") var noWarmup = false

    func run() throws {
        try Threads.setCount(threads)
        let config = try model.config()
        let net = try DeformUXNet(config: config, seed: 1)
        let session = try Session(model: net)
        let x = try benchInput(config, size: size)
        let summary = try net.summary(inputShape: x.shape)
        let builtRSS = currentRSSMegabytes()
        if !noWarmup { _ = try session.forward(x) }
        let seconds = try median(repeats) { _ = try session.forward(x) }
        let gflop = 2 * Double(summary.totalMACs) / 1e9
        print("deformux bench model: \(config.block.rawValue) mlp \(config.mlp.rawValue) offsets \(config.offsetMode.rawValue), \(size)^3, batch 1, \(Threads.count) threads")
        print("  parameters        \(net.parameterCount)")
        print("  multiply-adds     \(decimal(Double(summary.totalMACs) / 1e9, 1)) G")
        print("  forward           \(decimal(seconds, 3, width: 8)) s   (\(decimal(gflop / seconds, 1)) GFLOP/s as direct convolution)")
        print("  peak RSS          \(decimal(peakRSSMegabytes(), 1, width: 8)) MB   (\(decimal(builtRSS, 1)) MB with the model built, before the first forward)")
    }
}

/// `deformux bench backward`: one forward and backward of the whole network (the gradients of every
/// parameter, as a training step needs them), batch 1, a random input and output gradient.
struct BenchBackward: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backward",
        abstract: "Time the network's forward + backward and print seconds, GFLOP/s and peak RSS (issue 7's benchmark)."
    )

    @OptionGroup var model: ModelOptions
    @Option(help: "Edge of the cubic input (a multiple of 16).") var size = 96
    @Option(help: "Worker threads.") var threads = 2
    @Option(help: "Timed runs (the median is printed).") var repeats = 1
    @Flag(help: "Skip the warm-up run.") var noWarmup = false
    @Flag(help: "Also compute the input's gradient.") var inputGradient = false

    func run() throws {
        try Threads.setCount(threads)
        let config = try model.config()
        let net = try DeformUXNet(config: config, seed: 1)
        let session = try Session(model: net)
        let x = try benchInput(config, size: size)
        let gy = try Tensor(zeros: [1, config.outChannels, size, size, size])
        var rng = SplitMix64(seed: 8)
        for i in 0..<gy.count { gy.pointer[i] = rng.uniform(-1, 1) }
        let gx = inputGradient ? try Tensor(zeros: x.shape) : nil
        let summary = try net.summary(inputShape: x.shape)
        let builtRSS = currentRSSMegabytes()
        func step() throws {
            net.parameters.zeroGradients()
            try session.backward(x, gradOutput: gy, gradInput: gx?.pointer)
        }
        if !noWarmup { try step() }
        let seconds = try median(repeats) { try step() }
        // A backward is two passes of the forward's multiply-adds (input and weight gradients).
        let gflop = 3 * 2 * Double(summary.totalMACs) / 1e9
        print("deformux bench backward: \(config.block.rawValue) mlp \(config.mlp.rawValue) offsets \(config.offsetMode.rawValue), \(size)^3, batch 1, \(Threads.count) threads")
        print("  parameters        \(net.parameterCount)")
        print("  multiply-adds     \(decimal(3 * Double(summary.totalMACs) / 1e9, 1)) G (forward and backward, counted as 3 x forward)")
        print("  forward+backward  \(decimal(seconds, 3, width: 8)) s   (\(decimal(gflop / seconds, 1)) GFLOP/s as direct convolution)")
        print("  peak RSS          \(decimal(peakRSSMegabytes(), 1, width: 8)) MB   (\(decimal(builtRSS, 1)) MB with the model built)")
    }
}

/// `deformux bench train`: one training step of the whole network (forward, Dice + CE loss, backward,
/// AdamW), batch 1, a random input and random labels.
struct BenchTrain: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train",
        abstract: "Time one training step (forward, loss, backward, AdamW) and print seconds, GFLOP/s and peak RSS (issue 9's benchmark)."
    )

    @OptionGroup var model: ModelOptions
    @Option(help: "Edge of the cubic patch (a multiple of 16).") var size = 96
    @Option(help: "Worker threads.") var threads = 2
    @Option(help: "Timed steps (the median is printed).") var repeats = 1
    @Flag(help: "Skip the warm-up step.") var noWarmup = false

    func run() throws {
        try Threads.setCount(threads)
        let config = try model.config()
        let net = try DeformUXNet(config: config, seed: 1)
        let trainer = try Trainer(model: net)
        let x = try benchInput(config, size: size)
        var rng = SplitMix64(seed: 9)
        let labels = (0..<(size * size * size)).map { _ in Int32(rng.next() % UInt64(config.outChannels)) }
        let summary = try net.summary(inputShape: x.shape)
        let builtRSS = currentRSSMegabytes()
        var loss = 0.0
        try labels.withUnsafeBufferPointer { lp in
            guard let labelPointer = lp.baseAddress else { return }
            if !noWarmup { loss = try trainer.step(images: x, labels: labelPointer).total }
            let seconds = try median(repeats) { loss = try trainer.step(images: x, labels: labelPointer).total }
            let gflop = 3 * 2 * Double(summary.totalMACs) / 1e9
            print("deformux bench train: \(config.block.rawValue) mlp \(config.mlp.rawValue) offsets \(config.offsetMode.rawValue), \(size)^3, batch 1, \(Threads.count) threads")
            print("  parameters        \(net.parameterCount)")
            print("  multiply-adds     \(decimal(3 * Double(summary.totalMACs) / 1e9, 1)) G (forward and backward, counted as 3 x forward)")
            print("  training step     \(decimal(seconds, 3, width: 8)) s   (\(decimal(gflop / seconds, 1)) GFLOP/s as direct convolution; loss \(decimal(loss, 4)))")
            print("  peak RSS          \(decimal(peakRSSMegabytes(), 1, width: 8)) MB   (\(decimal(builtRSS, 1)) MB with the model built)")
        }
    }
}

/// A random input N=1 x Cin x size^3 (seeded).
func benchInput(_ config: DeformUXNetConfig, size: Int) throws -> Tensor {
    var rng = SplitMix64(seed: 7)
    let x = try Tensor(zeros: [1, config.inChannels, size, size, size])
    for i in 0..<x.count { x.pointer[i] = rng.uniform(-1, 1) }
    return x
}

/// The median duration of `repeats` runs of `body`, in seconds.
func median(_ repeats: Int, _ body: () throws -> Void) rethrows -> Double {
    var samples: [Double] = []
    for _ in 0..<max(1, repeats) {
        let t0 = now()
        try body()
        samples.append(now() - t0)
    }
    return samples.sorted()[samples.count / 2]
}
