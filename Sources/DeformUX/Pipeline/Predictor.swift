/// What the sliding window runs on each batch of windows: the network's inference session, or a stand-in
/// (STYLE.md habit 11) that lets the pipeline be checked apart from the model.
///
/// `predict` gets `batch` windows of `inChannels` x w0 x w1 x w2 floats (channels first, contiguous,
/// C order: batch x Cin x w0 x w1 x w2) and writes batch x `outChannels` x w0 x w1 x w2 logits into
/// `into` (the same spatial size: the pipeline blends logits voxel by voxel). It is called from one
/// thread at a time; a network parallelises inside it. It may throw; the pipeline passes the error on.
public protocol WindowPredictor {
    /// Input channels of a window (the volume's channels).
    var inChannels: Int { get }
    /// Output channels (classes; at most 256 so that labels fit uint8).
    var outChannels: Int { get }
    /// Window sizes must be multiples of this on every axis (16 for DeformUX-Net's four 2x
    /// downsamplings; 1 for stand-ins). The padding step also pads the volume to a multiple of it.
    var sizeMultiple: Int { get }
    /// The batch the predictor runs best at, used when the configuration leaves the batch open.
    var preferredBatch: Int { get }

    /// windows: batch x inChannels x size; into: batch x outChannels x size (overwritten in full).
    func predict(windows: UnsafePointer<Float>, batch: Int, size: SIMD3<Int>, into: UnsafeMutablePointer<Float>) throws
}

/// Stand-in: the logits are the input (outChannels == inChannels). Through the pipeline it gives back
/// the preprocessed volume (blended), so labels are the argmax over the input's channels.
public struct IdentityPredictor: WindowPredictor {
    public let inChannels: Int
    public var outChannels: Int { inChannels }
    public let sizeMultiple: Int
    public let preferredBatch: Int

    public init(channels: Int, sizeMultiple: Int = 1, preferredBatch: Int = 1) {
        inChannels = channels
        self.sizeMultiple = sizeMultiple
        self.preferredBatch = preferredBatch
    }

    public func predict(windows: UnsafePointer<Float>, batch: Int, size: SIMD3<Int>,
                        into: UnsafeMutablePointer<Float>) throws {
        into.update(from: windows, count: batch * inChannels * size.x * size.y * size.z)
    }
}

/// Stand-in: logits x * scale[c] + shift[c] per channel c (outChannels == inChannels), computed in
/// float32 as written (no fused multiply-add), so tests can predict the result exactly.
public struct AffinePredictor: WindowPredictor {
    public let scale: [Float]
    public let shift: [Float]
    public var inChannels: Int { scale.count }
    public var outChannels: Int { scale.count }
    public let sizeMultiple: Int
    public let preferredBatch: Int

    public init(scale: [Float], shift: [Float], sizeMultiple: Int = 1, preferredBatch: Int = 1) throws {
        guard !scale.isEmpty, scale.count == shift.count else {
            throw DeformUXError.invalidArgument("AffinePredictor", "one scale and one shift per channel",
                                                expected: "equal non-zero counts",
                                                got: "\(scale.count) scales, \(shift.count) shifts")
        }
        self.scale = scale
        self.shift = shift
        self.sizeMultiple = sizeMultiple
        self.preferredBatch = preferredBatch
    }

    public func predict(windows: UnsafePointer<Float>, batch: Int, size: SIMD3<Int>,
                        into: UnsafeMutablePointer<Float>) throws {
        let n = size.x * size.y * size.z
        let c = scale.count
        for b in 0..<batch {
            for ch in 0..<c {
                let a = scale[ch], t = shift[ch]
                let src = windows + (b * c + ch) * n
                let dst = into + (b * c + ch) * n
                for i in 0..<n { dst[i] = src[i] * a + t }
            }
        }
    }
}

/// The affine stand-in's formula for one value of channel c (0..<channels): value * scale[c] + shift[c],
/// what tests expect back from a pipeline.
extension AffinePredictor {
    func apply(_ value: Float, channel: Int) -> Float { value * scale[channel] + shift[channel] }
}
