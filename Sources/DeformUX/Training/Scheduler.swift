/// `torch.optim.lr_scheduler.ReduceLROnPlateau`, exactly, for one learning rate (one parameter group).
/// The recipe (ARCHITECTURE.md section 7) steps it with the validation Dice: mode max, factor 0.9,
/// patience 10; torch's defaults otherwise (threshold 1e-4 relative, cooldown 0, min_lr 0, eps 1e-8).
///
/// On `step(metric)` (torch's order):
///
///     lastEpoch += 1
///     if better(metric, best) { best = metric; numBadEpochs = 0 } else { numBadEpochs += 1 }
///     if cooldownCounter > 0 { cooldownCounter -= 1; numBadEpochs = 0 }
///     if numBadEpochs > patience {
///         new = max(lr * factor, minLR); if lr - new > eps { lr = new }
///         cooldownCounter = cooldown; numBadEpochs = 0
///     }
///
/// better(a, best): max/rel a > best * (1 + threshold); max/abs a > best + threshold;
/// min/rel a < best * (1 - threshold); min/abs a < best - threshold. NaN is never better (it counts
/// as a bad epoch). Before the first metric, best is -inf (max) or +inf (min).
///
/// The whole state is this value (Codable): a checkpoint saves it and a resumed run continues exactly.
public struct ReduceLROnPlateau: Equatable, Sendable {
    public enum Mode: String, Sendable, Codable { case min, max }
    public enum ThresholdMode: String, Sendable, Codable { case rel, abs }

    public struct Config: Equatable, Sendable, Codable {
        public var mode: Mode
        public var factor: Double
        public var patience: Int
        public var threshold: Double
        public var thresholdMode: ThresholdMode
        public var cooldown: Int
        public var minLR: Double
        public var eps: Double

        /// Defaults: the training recipe (mode max for a Dice metric, factor 0.9, patience 10) and torch's
        /// defaults for the rest.
        public init(mode: Mode = .max, factor: Double = 0.9, patience: Int = 10, threshold: Double = 1e-4,
                    thresholdMode: ThresholdMode = .rel, cooldown: Int = 0, minLR: Double = 0, eps: Double = 1e-8) {
            self.mode = mode
            self.factor = factor
            self.patience = patience
            self.threshold = threshold
            self.thresholdMode = thresholdMode
            self.cooldown = cooldown
            self.minLR = minLR
            self.eps = eps
        }

        /// torch checks factor < 1; the rest are checked here so nonsense fails early.
        public func validate() throws {
            let op = "ReduceLROnPlateau"
            guard factor >= 0, factor < 1 else {
                throw DeformUXError.invalidArgument(op, "factor should be < 1.0", expected: "0 <= factor < 1", got: "\(factor)")
            }
            guard patience >= 0, cooldown >= 0 else {
                throw DeformUXError.invalidArgument(op, "patience and cooldown must be >= 0", expected: ">= 0", got: "\(patience), \(cooldown)")
            }
            for (name, v) in [("threshold", threshold), ("min_lr", minLR), ("eps", eps)] where !(v >= 0 && v.isFinite) {
                throw DeformUXError.invalidArgument(op, "invalid \(name)", expected: "finite >= 0", got: "\(v)")
            }
        }
    }

    public let config: Config
    /// The current learning rate (the optimiser's lr; set `AdamW.hyperparameters.learningRate` from it).
    public private(set) var learningRate: Double
    /// The best metric so far; -inf (max) or +inf (min) before the first.
    public private(set) var best: Double
    public private(set) var numBadEpochs: Int
    public private(set) var cooldownCounter: Int
    /// Steps taken (torch's last_epoch).
    public private(set) var lastEpoch: Int

    public init(config: Config = Config(), learningRate: Double) throws {
        try config.validate()
        guard learningRate >= 0, learningRate.isFinite else {
            throw DeformUXError.invalidArgument("ReduceLROnPlateau", "invalid learning rate", expected: "finite >= 0", got: "\(learningRate)")
        }
        self.config = config
        self.learningRate = learningRate
        self.best = config.mode == .max ? -.infinity : .infinity
        self.numBadEpochs = 0
        self.cooldownCounter = 0
        self.lastEpoch = 0
    }

    /// Records one validation metric; returns the (possibly reduced) learning rate.
    @discardableResult
    public mutating func step(_ metric: Double) -> Double {
        lastEpoch += 1
        if isBetter(metric, than: best) {
            best = metric
            numBadEpochs = 0
        } else {
            numBadEpochs += 1
        }
        if cooldownCounter > 0 {
            cooldownCounter -= 1
            numBadEpochs = 0  // bad epochs in cooldown are ignored
        }
        if numBadEpochs > config.patience {
            let reduced = max(learningRate * config.factor, config.minLR)
            if learningRate - reduced > config.eps { learningRate = reduced }
            cooldownCounter = config.cooldown
            numBadEpochs = 0
        }
        return learningRate
    }

    public func isBetter(_ a: Double, than best: Double) -> Bool {
        switch (config.mode, config.thresholdMode) {
        case (.min, .rel): return a < best * (1 - config.threshold)
        case (.min, .abs): return a < best - config.threshold
        case (.max, .rel): return a > best * (config.threshold + 1)
        case (.max, .abs): return a > best + config.threshold
        }
    }
}

extension ReduceLROnPlateau: Codable {
    enum CodingKeys: String, CodingKey { case config, learningRate, best, numBadEpochs, cooldownCounter, lastEpoch }

    /// `best` is written as a number, or as the string "inf" / "-inf" (JSON has no infinities).
    public func encode(to encoder: Swift.Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(config, forKey: .config)
        try c.encode(learningRate, forKey: .learningRate)
        if best.isFinite { try c.encode(best, forKey: .best) } else { try c.encode(best > 0 ? "inf" : "-inf", forKey: .best) }
        try c.encode(numBadEpochs, forKey: .numBadEpochs)
        try c.encode(cooldownCounter, forKey: .cooldownCounter)
        try c.encode(lastEpoch, forKey: .lastEpoch)
    }

    public init(from decoder: Swift.Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        try self.init(config: try c.decode(Config.self, forKey: .config), learningRate: try c.decode(Double.self, forKey: .learningRate))
        if let text = try? c.decode(String.self, forKey: .best) {
            guard text == "inf" || text == "-inf" else {
                throw DeformUXError.invalidArgument("ReduceLROnPlateau", "bad saved best", expected: "a number, \"inf\" or \"-inf\"", got: text)
            }
            best = text == "inf" ? .infinity : -.infinity
        } else {
            best = try c.decode(Double.self, forKey: .best)
        }
        numBadEpochs = try c.decode(Int.self, forKey: .numBadEpochs)
        cooldownCounter = try c.decode(Int.self, forKey: .cooldownCounter)
        lastEpoch = try c.decode(Int.self, forKey: .lastEpoch)
        guard numBadEpochs >= 0, cooldownCounter >= 0, lastEpoch >= 0, !best.isNaN else {
            throw DeformUXError.invalidArgument("ReduceLROnPlateau", "bad saved state", expected: "counters >= 0, best not NaN",
                                                got: "\(numBadEpochs), \(cooldownCounter), \(lastEpoch), \(best)")
        }
    }
}
