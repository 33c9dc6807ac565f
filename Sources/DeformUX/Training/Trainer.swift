// The trainer: one optimiser step on a batch of patches (issue 9 item 4, ARCHITECTURE.md section 7).
import FoundationEssentials

/// Trains a `DeformUXNet` with the paper's recipe: Dice + cross-entropy on softmax logits
/// (`DiceCELoss`), AdamW applied to every parameter (torch.optim.AdamW(model.parameters()), as the
/// released code), optional gradient accumulation and drop path.
///
/// The trainer runs the model (STYLE.md habit 16): it owns a `Session` (saved activations, scratch and
/// packed weights, reused from step to step: after the first step of a patch shape a step allocates
/// nothing) and AdamW's state; the optimiser moments live in the model's parameter store, beside the
/// values and gradients (one allocation). A step holds the model's gradients for its whole duration;
/// other sessions may keep running the model meanwhile (they see the weights of a whole step, never
/// half of an update).
public final class Trainer {
    /// Hyperparameters and options; `learningRate` may be changed between steps (a scheduler does).
    public struct Options: Equatable, Sendable, Codable {
        public var learningRate: Double = 1e-4
        public var beta1: Double = 0.9
        public var beta2: Double = 0.999
        public var eps: Double = 1e-8
        public var weightDecay: Double = 0.08
        /// false: norms and biases (tensors of rank <= 1) get no weight decay. The released code
        /// decays every parameter (true, the default).
        public var decayNormsAndBiases: Bool = true
        /// Micro-batches per optimiser step (their gradients are averaged).
        public var accumulation: Int = 1
        /// Stochastic depth of the encoder blocks (0: none, the released code's default).
        public var dropPath: Double = 0
        /// Per-class weights of the loss (MONAI's `weight`), or nil.
        public var classWeights: [Float]?
        /// Seeds the drop-path masks.
        public var seed: UInt64 = 0
        /// The learning-rate schedule on the validation metric (higher is better): ReduceLROnPlateau
        /// with factor 0.9 and patience 10 (the paper's appendix), or nil for a constant rate.
        public var plateau: ReduceLROnPlateau.Config? = ReduceLROnPlateau.Config()

        public init() {}

        public func validate() throws {
            let op = "Trainer"
            guard accumulation >= 1, accumulation <= 1 << 20 else {
                throw DeformUXError.invalidArgument(op, "accumulation must be in 1...2^20", got: "\(accumulation)")
            }
            guard dropPath >= 0, dropPath < 1 else {
                throw DeformUXError.invalidArgument(op, "drop_path must be in [0, 1)", got: "\(dropPath)")
            }
            try hyperparameters.validate()
            try plateau?.validate()
        }

        var hyperparameters: AdamW.Hyperparameters {
            AdamW.Hyperparameters(learningRate: learningRate, beta1: beta1, beta2: beta2, eps: eps, weightDecay: weightDecay)
        }
    }

    public let model: DeformUXNet
    public private(set) var options: Options
    let session: Session
    private var adam: AdamW
    private let segments: [AdamW.Segment]
    /// Micro-batches accumulated since the last optimiser step.
    public private(set) var accumulated = 0
    private var rng: SplitMix64
    private let encoderBlocks: Int
    /// The schedule (nil: constant learning rate).
    public private(set) var plateau: ReduceLROnPlateau?

    public init(model: DeformUXNet, options: Options = Options()) throws {
        try options.validate()
        self.model = model
        self.options = options
        session = try Session(model: model)
        adam = try AdamW(options.hyperparameters)
        segments = AdamW.segments(for: model.parameters.layout, decayNormsAndBiases: options.decayNormsAndBiases)
        rng = SplitMix64(seed: options.seed)
        encoderBlocks = model.config.depths.reduce(0, +)
        plateau = try options.plateau.map { try ReduceLROnPlateau(config: $0, learningRate: options.learningRate) }
        if let w = options.classWeights, w.count != model.config.outChannels {
            throw DeformUXError.invalidArgument("Trainer", "one class weight per output channel",
                                                expected: "\(model.config.outChannels)", got: "\(w.count)")
        }
    }

    /// Optimiser steps taken.
    public var step: Int { adam.step }

    public var learningRate: Double {
        get { adam.hyperparameters.learningRate }
        set {
            adam.hyperparameters.learningRate = newValue
            options.learningRate = newValue
            if let c = plateau?.config { plateau = try? ReduceLROnPlateau(config: c, learningRate: newValue) }
        }
    }

    /// Reports a validation metric (higher is better, e.g. the mean Dice) to the schedule, which may
    /// lower the learning rate; returns the learning rate now in force.
    @discardableResult
    public func reportValidation(_ metric: Double) -> Double {
        guard var p = plateau else { return learningRate }
        let lr = p.step(metric)
        plateau = p
        adam.hyperparameters.learningRate = lr
        options.learningRate = lr
        return lr
    }

    /// One micro-batch: forward, loss, backward (gradients accumulate), and, once `accumulation`
    /// micro-batches are in, the AdamW update. images: N x Cin x D x H x W (D, H, W multiples of 16);
    /// labels: N x D x H x W class indices. Returns the loss before the update.
    @discardableResult
    public func step(images: Tensor, labels: UnsafePointer<Int32>, progress: DeformUXNet.Progress? = nil,
                     cancellation: Cancellation? = nil) throws -> DiceCELoss.Value {
        let op = "Trainer.step"
        try model.validateInput(images.shape, operation: op)
        let n = images.shape[0], spatial = Array(images.shape.dropFirst(2))
        let shape = try DiceCELoss.Shape(n: n, classes: model.config.outChannels, spatial: spatial)
        let lossOptions = DiceCELoss.Options(classWeights: options.classWeights)
        let scale = Float(1) / Float(options.accumulation)
        let store = model.parameters
        return try store.withGradients(op) {
            if accumulated == 0 { store.zeroGradients() }
            let masks = options.dropPath > 0
                ? DropPathMasks(maxRate: options.dropPath, blocks: encoderBlocks, samples: n, rng: &rng) : nil
            var value = DiceCELoss.Value(total: 0, dice: 0, crossEntropy: 0)
            _ = try session.trainingStep(images, dropPath: masks, progress: progress, cancellation: cancellation) { logits in
                // The logits become their gradient in place (they are not needed after the loss).
                value = try DiceCELoss.backward(logits: logits.pointer, labels: labels, gradLogits: logits.pointer,
                                                shape: shape, layout: .channelsLast, options: lossOptions,
                                                gradientScale: scale)
                return value.total
            }
            accumulated += 1
            if accumulated == options.accumulation {
                try store.write(op) {
                    try adam.update(values: store.values, gradients: store.gradients, m: store.firstMoments,
                                    v: store.secondMoments, bufferCount: store.layout.totalCount, segments: segments)
                }
                store.zeroGradients()
                accumulated = 0
            }
            return value
        }
    }

    // MARK: State (for resuming)

    /// What a checkpoint needs besides the weights and the moments.
    struct State: Codable {
        var adam: AdamW
        var options: Options
        var accumulated: Int
        var rngState: UInt64
        var plateau: ReduceLROnPlateau?
    }

    static let stateMetadataKey = "deformux.trainer"

    /// Writes the optimiser state (AdamW's moments as `exp_avg.<name>` / `exp_avg_sq.<name>`, step,
    /// hyperparameters, drop-path generator) as safetensors, atomically. The weights are the model's
    /// (`DeformUXNet.save`). Gradients of an unfinished accumulation are not saved: save between
    /// optimiser steps.
    public func saveState(to path: String) throws {
        let op = "Trainer.saveState"
        guard accumulated == 0 else {
            throw DeformUXError.invalidArgument(op, "save between optimiser steps (a gradient accumulation is in progress)")
        }
        let store = model.parameters
        let state = State(adam: adam, options: options, accumulated: accumulated, rngState: rng.state, plateau: plateau)
        let json: String
        do {
            json = String(decoding: try JSONEncoder().encode(state), as: UTF8.self)
        } catch {
            throw DeformUXError.internal(op, "cannot encode the trainer state: \(error)")
        }
        var items: [Safetensors.Item] = []
        for e in store.layout.entries {
            items.append(Safetensors.Item(name: "exp_avg." + e.name, shape: e.shape, values: UnsafePointer(store.firstMoments + e.offset)))
            items.append(Safetensors.Item(name: "exp_avg_sq." + e.name, shape: e.shape, values: UnsafePointer(store.secondMoments + e.offset)))
        }
        try store.withGradients(op) {
            try withExtendedLifetime(store) {
                try Safetensors.write(items, metadata: [Trainer.stateMetadataKey: json, "format": "pt"], to: path)
            }
        }
    }

    /// Restores what `saveState` wrote (the model's weights are loaded separately). Strict: every
    /// moment tensor must be present with its parameter's shape.
    public func loadState(from path: String) throws {
        let op = "Trainer.loadState"
        let file = try SafetensorsFile(path: path)
        guard let json = file.metadata[Trainer.stateMetadataKey] else {
            throw DeformUXError.io(op, "no \(Trainer.stateMetadataKey) in the metadata: not a trainer state file", path: path)
        }
        let state: State
        do {
            state = try JSONDecoder().decode(State.self, from: Data(json.utf8))
        } catch {
            throw DeformUXError.io(op, "the trainer state in the metadata is not valid: \(error)", path: path)
        }
        try state.options.validate()
        let store = model.parameters
        var problems: [String] = []
        let byName = Dictionary(file.entries.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        for e in store.layout.entries {
            for key in ["exp_avg.", "exp_avg_sq."] where byName[key + e.name]?.shape != e.shape {
                problems.append(key + e.name)
            }
        }
        guard problems.isEmpty else {
            throw DeformUXError.io(op, "missing or mis-shaped moments: \(problems.prefix(8).joined(separator: ", "))\(problems.count > 8 ? ", ..." : "")",
                                   path: path)
        }
        try store.withGradients(op) {
            for e in store.layout.entries {
                try file.copy("exp_avg." + e.name, into: store.firstMoments + e.offset, count: e.count)
                try file.copy("exp_avg_sq." + e.name, into: store.secondMoments + e.offset, count: e.count)
            }
            store.zeroGradients()
        }
        adam = state.adam
        options = state.options
        accumulated = 0
        rng = SplitMix64(state: state.rngState)
        plateau = state.plateau
    }

    /// Frees what the trainer's session keeps between steps.
    public func releaseMemory() throws { try session.releaseMemory() }
}
