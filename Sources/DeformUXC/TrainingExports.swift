// Training behind opaque handles (deformux.h): the loss (dfx_dice_ce), the trainer (dfx_trainer_*: one
// optimiser step per call, its state for resuming) and the patch sampler (dfx_sampler_*: random crops
// with augmentation from volumes the sampler keeps copies of).
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import DeformUX
import FoundationEssentials

// MARK: Loss

/// MONAI's DiceCELoss(to_onehot_y=True, softmax=True) of channels-first logits (n x c x spatial) and
/// int32 labels (n x spatial); writes dL/dlogits into grad (may be NULL) and (total, dice, ce) into out.
@_cdecl("dfx_dice_ce")
public func dfx_dice_ce(_ logits: UnsafePointer<Float>?, _ labels: UnsafePointer<Int32>?, _ n: Int64, _ c: Int64,
                        _ d: Int64, _ h: Int64, _ w: Int64, _ classWeights: UnsafePointer<Float>?,
                        _ grad: UnsafeMutablePointer<Float>?, _ out: UnsafeMutablePointer<Double>?) -> Int32 {
    guarded {
        let op = "dice_ce"
        for (name, v) in [("n", n), ("c", c), ("d", d), ("h", h), ("w", w)] where v < 1 || v > Int64(Int32.max) {
            throw DeformUXError.invalidArgument(op, "\(name) must be in 1...2^31-1", got: "\(v)")
        }
        let shape = try DiceCELoss.Shape(n: Int(n), classes: Int(c), spatial: [Int(d), Int(h), Int(w)])
        let weights = classWeights.map { Array(UnsafeBufferPointer(start: $0, count: Int(c))) }
        let options = DiceCELoss.Options(classWeights: weights)
        let logits = try require(logits, op, "logits"), labels = try require(labels, op, "labels")
        let value: DiceCELoss.Value
        if let grad {
            value = try DiceCELoss.backward(logits: logits, labels: labels, gradLogits: grad, shape: shape,
                                            layout: .channelsFirst, options: options)
        } else {
            value = try DiceCELoss.forward(logits: logits, labels: labels, shape: shape, layout: .channelsFirst,
                                           options: options)
        }
        if let out { out[0] = value.total; out[1] = value.dice; out[2] = value.crossEntropy }
    }
}

// MARK: Trainer

final class TrainerHandle {
    let trainer: Trainer
    let model: ModelHandleRef
    init(_ t: Trainer, _ m: ModelHandleRef) { trainer = t; model = m }
}

/// Keeps a model handle alive (the trainer's model).
typealias ModelHandleRef = AnyObject

private func trainerHandle(_ p: OpaquePointer?, _ op: String) throws -> TrainerHandle {
    guard let p else { throw DeformUXError.invalidArgument(op, "trainer must not be NULL") }
    return Unmanaged<TrainerHandle>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

/// The trainer's options from JSON with the Python names (all optional): learning_rate, betas [b1, b2],
/// eps, weight_decay, decay_norms_and_biases, accumulation, drop_path, class_weights, seed, scheduler
/// (false: constant learning rate), plateau_factor, plateau_patience.
func trainerOptions(_ json: String, _ op: String) throws -> Trainer.Options {
    struct Raw: Decodable {
        var learning_rate: Double?, betas: [Double]?, eps: Double?, weight_decay: Double?
        var decay_norms_and_biases: Bool?, accumulation: Int?, drop_path: Double?, class_weights: [Float]?
        var seed: UInt64?
        var scheduler: Bool?, plateau_factor: Double?, plateau_patience: Int?
    }
    let raw: Raw
    do { raw = try JSONDecoder().decode(Raw.self, from: Data(json.utf8)) } catch {
        throw DeformUXError.invalidArgument(op, "options are not a valid JSON object of the trainer's options: \(error)")
    }
    var o = Trainer.Options()
    if let v = raw.learning_rate { o.learningRate = v }
    if let b = raw.betas {
        guard b.count == 2 else { throw DeformUXError.invalidArgument(op, "betas must be two numbers", got: "\(b)") }
        o.beta1 = b[0]; o.beta2 = b[1]
    }
    if let v = raw.eps { o.eps = v }
    if let v = raw.weight_decay { o.weightDecay = v }
    if let v = raw.decay_norms_and_biases { o.decayNormsAndBiases = v }
    if let v = raw.accumulation { o.accumulation = v }
    if let v = raw.drop_path { o.dropPath = v }
    o.classWeights = raw.class_weights
    if let v = raw.seed { o.seed = v }
    if raw.scheduler == false {
        o.plateau = nil
    } else {
        var c = ReduceLROnPlateau.Config()
        if let v = raw.plateau_factor { c.factor = v }
        if let v = raw.plateau_patience { c.patience = v }
        o.plateau = c
    }
    try o.validate()
    return o
}

@_cdecl("dfx_trainer_create")
public func dfx_trainer_create(_ model: OpaquePointer?, _ optionsJSON: UnsafePointer<CChar>?,
                               _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guarded {
        let op = "trainer_create"
        guard let out else { throw DeformUXError.invalidArgument(op, "out must not be NULL") }
        out.pointee = nil
        guard let model else { throw DeformUXError.invalidArgument(op, "model must not be NULL") }
        let m = Unmanaged<ModelHandle>.fromOpaque(UnsafeRawPointer(model)).takeUnretainedValue()
        let options = try trainerOptions(optionsJSON.map { String(cString: $0) } ?? "{}", op)
        let t = TrainerHandle(try Trainer(model: m.net, options: options), m)
        out.pointee = OpaquePointer(Unmanaged.passRetained(t).toOpaque())
    }
}

@_cdecl("dfx_trainer_free")
public func dfx_trainer_free(_ trainer: OpaquePointer?) {
    guard let trainer else { return }
    Unmanaged<TrainerHandle>.fromOpaque(UnsafeRawPointer(trainer)).release()
}

/// One micro-batch (and, when the accumulation is complete, the AdamW update): images n x Cin x d x h
/// x w, labels n x d x h x w (int32 class indices). out (may be NULL): loss before the update (total,
/// dice, cross-entropy).
@_cdecl("dfx_trainer_step")
public func dfx_trainer_step(_ trainer: OpaquePointer?, _ images: UnsafePointer<Float>?, _ n: Int64, _ d: Int64,
                             _ h: Int64, _ w: Int64, _ labels: UnsafePointer<Int32>?, _ out: UnsafeMutablePointer<Double>?,
                             _ progress: ProgressCallback?, _ user: UnsafeMutableRawPointer?) -> Int32 {
    guarded {
        let op = "trainer_step"
        let t = try trainerHandle(trainer, op)
        for (name, v) in [("n", n), ("d", d), ("h", h), ("w", w)] where v < 0 {
            throw DeformUXError.invalidArgument(op, "\(name) must be >= 0", got: "\(v)")
        }
        let shape = [Int(n), t.trainer.model.config.inChannels, Int(d), Int(h), Int(w)]
        try t.trainer.model.validateInput(shape, operation: op)
        let x = try Tensor(borrowing: UnsafeMutablePointer(mutating: try require(images, op, "images")), shape: shape)
        let (p, c) = callbacks(progress, user, total: 2 * DeformUXNet.forwardSteps)
        let value = try t.trainer.step(images: x, labels: try require(labels, op, "labels"), progress: p, cancellation: c)
        if let out { out[0] = value.total; out[1] = value.dice; out[2] = value.crossEntropy }
    }
}

/// The learning rate, optimiser steps taken and micro-batches accumulated; any pointer may be NULL.
@_cdecl("dfx_trainer_info")
public func dfx_trainer_info(_ trainer: OpaquePointer?, _ learningRate: UnsafeMutablePointer<Double>?,
                             _ step: UnsafeMutablePointer<Int64>?, _ accumulated: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded {
        let t = try trainerHandle(trainer, "trainer_info").trainer
        learningRate?.pointee = t.learningRate
        step?.pointee = Int64(t.step)
        accumulated?.pointee = Int64(t.accumulated)
    }
}

@_cdecl("dfx_trainer_set_learning_rate")
public func dfx_trainer_set_learning_rate(_ trainer: OpaquePointer?, _ learningRate: Double) -> Int32 {
    guarded {
        let op = "trainer_set_learning_rate"
        let t = try trainerHandle(trainer, op).trainer
        guard learningRate.isFinite, learningRate >= 0 else {
            throw DeformUXError.invalidArgument(op, "the learning rate must be finite and >= 0", got: "\(learningRate)")
        }
        t.learningRate = learningRate
    }
}

/// Reports a validation metric (higher is better) to the ReduceLROnPlateau schedule; *lr receives the
/// learning rate now in force.
@_cdecl("dfx_trainer_report_validation")
public func dfx_trainer_report_validation(_ trainer: OpaquePointer?, _ metric: Double,
                                          _ lr: UnsafeMutablePointer<Double>?) -> Int32 {
    guarded {
        let op = "trainer_report_validation"
        let t = try trainerHandle(trainer, op).trainer
        guard metric.isFinite else { throw DeformUXError.invalidArgument(op, "the metric must be finite", got: "\(metric)") }
        let v = t.reportValidation(metric)
        lr?.pointee = v
    }
}

@_cdecl("dfx_trainer_save_state")
public func dfx_trainer_save_state(_ trainer: OpaquePointer?, _ path: UnsafePointer<CChar>?) -> Int32 {
    guarded {
        let op = "trainer_save_state"
        try trainerHandle(trainer, op).trainer.saveState(to: String(cString: try require(path, op, "path")))
    }
}

@_cdecl("dfx_trainer_load_state")
public func dfx_trainer_load_state(_ trainer: OpaquePointer?, _ path: UnsafePointer<CChar>?) -> Int32 {
    guarded {
        let op = "trainer_load_state"
        try trainerHandle(trainer, op).trainer.loadState(from: String(cString: try require(path, op, "path")))
    }
}

// MARK: Patch sampler

/// Volumes (copies) and the sampler's configuration.
final class SamplerHandle {
    let sampler: PatchSampler
    let augmentation: Augmentation
    let classes: Int
    var images: [Tensor] = []
    var labels: [UnsafeMutableBufferPointer<Int32>] = []
    var volumes: [TrainingVolume] = []
    var candidates: [CropCandidates] = []
    let lock = OwnedLock("sampler")

    init(sampler: PatchSampler, augmentation: Augmentation, classes: Int) {
        self.sampler = sampler; self.augmentation = augmentation; self.classes = classes
    }

    deinit { for l in labels { l.deallocate() } }
}

private func samplerHandle(_ p: OpaquePointer?, _ op: String) throws -> SamplerHandle {
    guard let p else { throw DeformUXError.invalidArgument(op, "sampler must not be NULL") }
    return Unmanaged<SamplerHandle>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

/// config_json: {"sampler": PatchSampler.Config (patchSize, samplesPerVolume, positive, negative,
/// imageThreshold), "augmentation": Augmentation.Config or "preset": "paper" | "mrRobust" | "none",
/// "classes": C}.
@_cdecl("dfx_sampler_create")
public func dfx_sampler_create(_ configJSON: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guarded {
        let op = "sampler_create"
        guard let out else { throw DeformUXError.invalidArgument(op, "out must not be NULL") }
        out.pointee = nil
        struct Raw: Decodable {
            var sampler: PatchSampler.Config?
            var augmentation: Augmentation.Config?
            var preset: String?
            var classes: Int
        }
        let raw: Raw
        do {
            raw = try JSONDecoder().decode(Raw.self, from: Data(String(cString: try require(configJSON, op, "config_json")).utf8))
        } catch let e as DeformUXError {
            throw e
        } catch {
            throw DeformUXError.invalidArgument(op, "the configuration is not valid: \(error)")
        }
        var aug = raw.augmentation ?? .paper
        switch raw.preset {
        case nil: break
        case "paper": aug = .paper
        case "mrRobust": aug = .mrRobust
        case "none": aug = .none
        case let other?:
            throw DeformUXError.invalidArgument(op, "unknown augmentation preset", expected: "paper, mrRobust or none",
                                                got: other)
        }
        guard raw.classes >= 2, raw.classes <= 256 else {
            throw DeformUXError.invalidArgument(op, "classes must be in 2...256", got: "\(raw.classes)")
        }
        let h = SamplerHandle(sampler: try PatchSampler(config: raw.sampler ?? PatchSampler.Config()),
                              augmentation: try Augmentation(config: aug), classes: raw.classes)
        out.pointee = OpaquePointer(Unmanaged.passRetained(h).toOpaque())
    }
}

@_cdecl("dfx_sampler_free")
public func dfx_sampler_free(_ sampler: OpaquePointer?) {
    guard let sampler else { return }
    Unmanaged<SamplerHandle>.fromOpaque(UnsafeRawPointer(sampler)).release()
}

/// Adds a volume (copied): image channels x size[0] x size[1] x size[2] float32, labels size[0] x size[1]
/// x size[2] int32 in 0..<classes. *index receives its index.
@_cdecl("dfx_sampler_add")
public func dfx_sampler_add(_ sampler: OpaquePointer?, _ image: UnsafePointer<Float>?, _ channels: Int64,
                            _ size: UnsafePointer<Int64>?, _ labels: UnsafePointer<Int32>?,
                            _ index: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded {
        let op = "sampler_add"
        let s = try samplerHandle(sampler, op)
        let size3 = try require(size, op, "size")
        let dims = (0..<3).map { size3[$0] }
        for v in dims + [channels] where v < 1 || v > Int64(Int32.max) {
            throw DeformUXError.invalidArgument(op, "sizes and channels must be in 1...2^31-1", got: "\(dims), \(channels)")
        }
        let sz = dims.map { Int($0) }
        let voxels = try Tensor.elementCount(sz, context: op)
        let img = try Tensor(uninitialized: [Int(channels)] + sz)
        img.pointer.update(from: try require(image, op, "image"), count: img.count)
        let lab = UnsafeMutableBufferPointer<Int32>.allocate(capacity: max(voxels, 1))
        guard let lp = lab.baseAddress else { throw DeformUXError.outOfMemory(op, "labels") }
        lp.update(from: try require(labels, op, "labels"), count: voxels)
        do {
            let v = try TrainingVolume(image: UnsafePointer(img.pointer), labels: UnsafePointer(lp), channels: Int(channels), size: sz)
            let c = try CropCandidates(volume: v, imageThreshold: s.sampler.config.imageThreshold, classes: s.classes)
            try s.lock.withLock(op) {
                s.images.append(img); s.labels.append(lab); s.volumes.append(v); s.candidates.append(c)
                index?.pointee = Int64(s.volumes.count - 1)
            }
        } catch {
            lab.deallocate()
            throw error
        }
    }
}

/// Draws samplesPerVolume augmented patches from each of `count` volumes (indices), advancing the
/// generator whose state is *rng_state: images count*samplesPerVolume x C x patch, labels (int32) count*
/// samplesPerVolume x patch.
@_cdecl("dfx_sampler_batch")
public func dfx_sampler_batch(_ sampler: OpaquePointer?, _ indices: UnsafePointer<Int64>?, _ count: Int64,
                              _ rngState: UnsafeMutablePointer<UInt64>?, _ images: UnsafeMutablePointer<Float>?,
                              _ labels: UnsafeMutablePointer<Int32>?) -> Int32 {
    guarded {
        let op = "sampler_batch"
        let s = try samplerHandle(sampler, op)
        guard count >= 1, count <= 1 << 16 else { throw DeformUXError.invalidArgument(op, "count must be in 1...65536", got: "\(count)") }
        let idx = try require(indices, op, "indices"), state = try require(rngState, op, "rng_state")
        let images = try require(images, op, "images"), labels = try require(labels, op, "labels")
        try s.lock.withLock(op) {
            var vols: [TrainingVolume] = [], cands: [CropCandidates] = []
            for i in 0..<Int(count) {
                let k = idx[i]
                guard k >= 0, k < Int64(s.volumes.count) else {
                    throw DeformUXError.invalidArgument(op, "no volume with this index", expected: "0..<\(s.volumes.count)", got: "\(k)")
                }
                vols.append(s.volumes[Int(k)]); cands.append(s.candidates[Int(k)])
            }
            var rng = SplitMix64(state: state.pointee)
            try s.sampler.makeBatch(volumes: vols, candidates: cands, augmentation: s.augmentation, rng: &rng,
                                    images: images, labels: labels)
            state.pointee = rng.state
        }
    }
}
