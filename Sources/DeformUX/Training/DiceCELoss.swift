#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Dice + cross-entropy on logits, forward and backward: exactly MONAI's
/// `DiceCELoss(to_onehot_y=True, softmax=True)` with its defaults (include_background, squared_pred
/// False, jaccard False, smooth_nr = smooth_dr = 1e-5, batch False, reduction "mean",
/// lambda_dice = lambda_ce = 1), the loss of the training recipe (ARCHITECTURE.md section 7).
///
///     logits      N x C x V  (channelsFirst, V = D*H*W)  or  N x V x C  (channelsLast); C >= 2
///     labels      N x V      Int32 class indices in 0..<C
///     gradLogits  like logits (overwritten: the loss starts the backward chain)
///
///     s = softmax over c of logits          g = one_hot(labels)
///     I[n,c] = sum_v s g     P[n,c] = sum_v s     G[n,c] = sum_v g
///     dice = mean over (n, c) of  w[c] * (1 - (2 I + 1e-5) / (P + G + 1e-5))
///     ce   = sum over (n, v) of w[y] * -log s[y]  /  sum over (n, v) of w[y]        (y = label)
///     loss = lambdaDice * dice + lambdaCE * ce
///
/// Class weights `w` (default all 1) follow MONAI's `DiceCELoss(weight=...)`, which passes the same
/// tensor to both terms: `nn.CrossEntropyLoss(weight=w)` (a weighted mean, divided by the summed
/// weights of the labelled voxels) and `DiceLoss(weight=w)` (each (n, c) Dice loss times w[c], then
/// a plain mean over N*C).
///
/// C = 1 is rejected: MONAI then ignores softmax and one-hot and switches to a Dice on raw logits plus
/// binary cross-entropy, which is not this loss.
///
/// Gradient (exact): with D = P + G + 1e-5 and k = lambdaDice * w[c] / (N*C),
///     dL/ds[c] = k * ((2 I + 1e-5) / D^2 - 2 g[c] / D)
///     dL/dlogit[c] = s[c] * (dL/ds[c] - sum_j s[j] dL/ds[j]) + lambdaCE * w[y] / sum(w[y]) * (s[c] - g[c])
///
/// Work: two passes over the voxels in fixed parts of `partVoxels` (never straddling samples). Pass 1
/// computes the softmax (into gradLogits, so pass 2 reads it back instead of recomputing exp) and per
/// part Double sums of I, P, G and the cross-entropy, added in part order: the result does not depend
/// on the thread count or timing. `DiceCELossReference` holds the same loss as plain Double loops.
public enum DiceCELoss {
    /// MONAI's smooth_nr and smooth_dr.
    public static let smooth = 1e-5
    /// Voxels per part of the parallel passes (a fixed partition, so sums are reproducible).
    public static let partVoxels = 8192

    /// Sizes of a loss call. `spatial` is only used to name voxels in error messages.
    public struct Shape: Equatable, Sendable {
        public let n: Int
        public let classes: Int
        public let spatial: [Int]
        /// Voxels per sample (the product of `spatial`).
        public let voxels: Int

        public init(n: Int, classes: Int, spatial: [Int]) throws {
            let op = "dice_ce"
            guard n >= 1 else { throw DeformUXError.invalidArgument(op, "batch size must be at least 1", expected: ">= 1", got: "\(n)") }
            guard classes >= 2 else {
                throw DeformUXError.invalidArgument(op, "needs at least 2 classes (background included); MONAI's single-channel path is a different loss (raw-logit Dice + binary cross-entropy)",
                                                    expected: ">= 2 classes", got: "\(classes)")
            }
            guard spatial.allSatisfy({ $0 >= 1 }) else {
                throw DeformUXError.invalidArgument(op, "spatial sizes must be positive", expected: "sizes >= 1", got: "\(spatial)")
            }
            let v = try Tensor.elementCount(spatial, context: op)
            _ = try Tensor.elementCount([n, classes, v], context: op)
            self.n = n
            self.classes = classes
            self.spatial = spatial
            self.voxels = v
        }

        /// "[n, d, h, w]" for sample n, flat voxel v.
        func describe(sample n: Int, voxel v: Int) -> String {
            var rest = v
            var idx = [Int](repeating: 0, count: spatial.count)
            for a in stride(from: spatial.count - 1, through: 0, by: -1) {
                idx[a] = rest % spatial[a]
                rest /= spatial[a]
            }
            return "[\(([n] + idx).map(String.init).joined(separator: ", "))]"
        }
    }

    /// Options beyond MONAI's defaults.
    public struct Options: Equatable, Sendable, Codable {
        /// Per-class weights (C values, >= 0), applied to both terms as MONAI's `weight`. nil: all 1.
        public var classWeights: [Float]?
        public var lambdaDice: Double
        public var lambdaCE: Double

        public init(classWeights: [Float]? = nil, lambdaDice: Double = 1, lambdaCE: Double = 1) {
            self.classWeights = classWeights
            self.lambdaDice = lambdaDice
            self.lambdaCE = lambdaCE
        }
    }

    /// The loss and its two terms (unweighted by the lambdas): total = lambdaDice * dice + lambdaCE * crossEntropy.
    public struct Value: Equatable, Sendable {
        public var total: Double
        public var dice: Double
        public var crossEntropy: Double
    }

    // MARK: Tensor API (validated)

    /// The loss of `logits` (N x C x spatial... channels-first, or N x spatial... x C channels-last) against
    /// `labels` (N * spatial values, C order).
    public static func forward(logits: Tensor, labels: [Int32], layout: Layout = .channelsFirst,
                               options: Options = Options()) throws -> Value {
        let shape = try validate(logits: logits, labelCount: labels.count, layout: layout)
        return try labels.withUnsafeBufferPointer { l in
            guard let lp = l.baseAddress else { throw DeformUXError.internal("dice_ce", "empty labels") }
            return try forward(logits: logits.pointer, labels: lp, shape: shape, layout: layout, options: options)
        }
    }

    /// The loss and dL/dlogits (a new tensor shaped like `logits`), times `gradientScale`.
    public static func backward(logits: Tensor, labels: [Int32], layout: Layout = .channelsFirst,
                                options: Options = Options(), gradientScale: Float = 1) throws -> (Value, Tensor) {
        let shape = try validate(logits: logits, labelCount: labels.count, layout: layout)
        let grad = try Tensor(uninitialized: logits.shape)
        let value = try labels.withUnsafeBufferPointer { l in
            guard let lp = l.baseAddress else { throw DeformUXError.internal("dice_ce", "empty labels") }
            return try backward(logits: logits.pointer, labels: lp, gradLogits: grad.pointer, shape: shape,
                                layout: layout, options: options, gradientScale: gradientScale)
        }
        return (value, grad)
    }

    /// Checks rank, contiguity and the label count; returns the shape.
    public static func validate(logits: Tensor, labelCount: Int, layout: Layout) throws -> Shape {
        let op = "dice_ce"
        guard logits.rank >= 2 else {
            throw DeformUXError.shapeMismatch(op, "logits must be N x C x spatial... (channels-first) or N x spatial... x C (channels-last)",
                                              expected: "rank >= 2", got: "shape \(logits.shape)")
        }
        try logits.requireContiguous("\(op) logits")
        let s = logits.shape
        let classes = layout == .channelsFirst ? s[1] : s[s.count - 1]
        let spatial = layout == .channelsFirst ? Array(s[2...]) : Array(s[1..<(s.count - 1)])
        let shape = try Shape(n: s[0], classes: classes, spatial: spatial)
        guard labelCount == shape.n * shape.voxels else {
            throw DeformUXError.shapeMismatch(op, "labels must hold one class index per voxel (N x spatial...)",
                                              expected: "\(shape.n * shape.voxels) values for logits of shape \(s)", got: "\(labelCount)")
        }
        return shape
    }

    // MARK: Pointer API (the trainer and the C ABI call these)

    /// The loss only. Throws for bad labels or weights (naming the first bad label and where).
    public static func forward(logits: UnsafePointer<Float>, labels: UnsafePointer<Int32>, shape: Shape,
                               layout: Layout = .channelsFirst, options: Options = Options()) throws -> Value {
        try run(logits: logits, labels: labels, gradLogits: nil, shape: shape, layout: layout, options: options,
                gradientScale: 1)
    }

    /// The loss, and `gradientScale * dL/dlogits` written (not added) into `gradLogits`, which may be
    /// `logits` itself (in place: the logits are not needed after the loss). A scale of 1/k averages k
    /// accumulated micro-batches.
    public static func backward(logits: UnsafePointer<Float>, labels: UnsafePointer<Int32>,
                                gradLogits: UnsafeMutablePointer<Float>, shape: Shape,
                                layout: Layout = .channelsFirst, options: Options = Options(),
                                gradientScale: Float = 1) throws -> Value {
        try run(logits: logits, labels: labels, gradLogits: gradLogits, shape: shape, layout: layout, options: options,
                gradientScale: gradientScale)
    }

    // MARK: Implementation

    /// Where logit (n, c, v) lives.
    struct Indexing {
        let classes: Int
        let voxels: Int
        let layout: Layout
        /// Offset of (n, v, class 0) and the stride between classes.
        @inline(__always) func base(_ n: Int, _ v: Int) -> Int {
            layout == .channelsFirst ? n * classes * voxels + v : (n * voxels + v) * classes
        }
        var classStride: Int { layout == .channelsFirst ? voxels : 1 }
    }

    static func checkOptions(_ options: Options, classes: Int) throws -> [Double] {
        let op = "dice_ce"
        guard options.lambdaDice >= 0, options.lambdaCE >= 0, options.lambdaDice.isFinite, options.lambdaCE.isFinite else {
            throw DeformUXError.invalidArgument(op, "lambda_dice and lambda_ce must be finite and >= 0",
                                                expected: ">= 0", got: "\(options.lambdaDice), \(options.lambdaCE)")
        }
        guard let w = options.classWeights else { return [Double](repeating: 1, count: classes) }
        guard w.count == classes else {
            throw DeformUXError.invalidArgument(op, "class weights need one value per class (background included)",
                                                expected: "\(classes) values", got: "\(w.count)")
        }
        if let i = w.firstIndex(where: { !($0 >= 0 && $0.isFinite) }) {
            throw DeformUXError.invalidArgument(op, "class weights must be finite and >= 0", expected: "weight[\(i)] >= 0",
                                                got: "\(w[i])")
        }
        return w.map(Double.init)
    }

    static func checkLabels(_ labels: UnsafePointer<Int32>, shape: Shape) throws {
        let total = shape.n * shape.voxels
        let c = Int32(clamping: shape.classes)
        var i = 0
        while i < total {
            let l = labels[i]
            if l < 0 || l >= c {
                throw DeformUXError.invalidArgument("dice_ce", "label at \(shape.describe(sample: i / shape.voxels, voxel: i % shape.voxels)) (N x spatial) is not a class index",
                                                    expected: "0..<\(shape.classes)", got: "\(l)")
            }
            i += 1
        }
    }

    static func run(logits: UnsafePointer<Float>, labels: UnsafePointer<Int32>, gradLogits: UnsafeMutablePointer<Float>?,
                    shape: Shape, layout: Layout, options: Options, gradientScale: Float) throws -> Value {
        let weights = try checkOptions(options, classes: shape.classes)
        guard gradientScale.isFinite else {
            throw DeformUXError.invalidArgument("dice_ce", "gradient scale must be finite", got: "\(gradientScale)")
        }
        try checkLabels(labels, shape: shape)
        let nc = shape.n * shape.classes
        let c = shape.classes
        let ix = Indexing(classes: c, voxels: shape.voxels, layout: layout)
        let partsPerSample = (shape.voxels + partVoxels - 1) / partVoxels
        let parts = shape.n * partsPerSample

        // Pass 1: per part, I, P, G per class (3C), then the weighted CE sum and the weight sum (2).
        let stride = 3 * c + 2
        var partials = [Double](repeating: 0, count: parts * stride)
        partials.withUnsafeMutableBufferPointer { pb in
            let partial = pb.baseAddress!
            parallelFor(parts) { part in
                let n = part / partsPerSample
                let lo = (part % partsPerSample) * partVoxels
                let hi = min(lo + partVoxels, shape.voxels)
                let acc = partial + part * stride
                withUnsafeTemporaryAllocation(of: Float.self, capacity: c) { tmp in
                    let scratch = tmp.baseAddress!
                    var ceSum = 0.0, wSum = 0.0
                    for v in lo..<hi {
                        let b = ix.base(n, v)
                        let cs = ix.classStride
                        let y = Int(labels[n * shape.voxels + v])
                        let zy = logits[b + y * cs]  // read before the softmax may overwrite it (in place)
                        // s = softmax(z): subtract the max so exp never overflows.
                        var zmax = logits[b]
                        for k in 1..<c { zmax = max(zmax, logits[b + k * cs]) }
                        let out = gradLogits.map { $0 + b } ?? scratch
                        let os = gradLogits == nil ? 1 : cs
                        var sum: Float = 0
                        for k in 0..<c {
                            let e = exp(logits[b + k * cs] - zmax)
                            out[k * os] = e
                            sum += e
                        }
                        let r = 1 / sum
                        for k in 0..<c {
                            let s = out[k * os] * r
                            out[k * os] = s
                            acc[c + k] += Double(s)  // P
                        }
                        acc[y] += Double(out[y * os])  // I
                        acc[2 * c + y] += 1  // G
                        // -log s[y] = log(sum exp(z - zmax)) - (z[y] - zmax)
                        let nll = Double(log(sum)) - Double(zy - zmax)
                        ceSum += weights[y] * nll
                        wSum += weights[y]
                    }
                    acc[3 * c] += ceSum
                    acc[3 * c + 1] += wSum
                }
            }
        }

        // Reduce in part order.
        var inter = [Double](repeating: 0, count: nc), pred = inter, truth = inter
        var ceSum = 0.0, wSum = 0.0
        for part in 0..<parts {
            let n = part / partsPerSample
            let acc = part * stride
            for k in 0..<c {
                inter[n * c + k] += partials[acc + k]
                pred[n * c + k] += partials[acc + c + k]
                truth[n * c + k] += partials[acc + 2 * c + k]
            }
            ceSum += partials[acc + 3 * c]
            wSum += partials[acc + 3 * c + 1]
        }
        guard wSum > 0 else {
            throw DeformUXError.invalidArgument("dice_ce", "every labelled voxel has class weight 0, so the weighted cross-entropy mean is 0/0 (PyTorch returns NaN)",
                                                expected: "a positive weight for some label present", got: "weights \(weights)")
        }
        var dice = 0.0
        for i in 0..<nc {
            dice += weights[i % c] * (1 - (2 * inter[i] + smooth) / (pred[i] + truth[i] + smooth))
        }
        dice /= Double(nc)
        let ce = ceSum / wSum
        let value = Value(total: options.lambdaDice * dice + options.lambdaCE * ce, dice: dice, crossEntropy: ce)
        guard let grad = gradLogits else { return value }

        // Pass 2: dL/ds[c] = a[n,c] + b[n,c] g[c]; CE coefficient per label class.
        let scale = Double(gradientScale)
        var a = [Float](repeating: 0, count: nc), bcoef = a
        for i in 0..<nc {
            let k = scale * options.lambdaDice * weights[i % c] / Double(nc)
            let d = pred[i] + truth[i] + smooth
            a[i] = Float(k * (2 * inter[i] + smooth) / (d * d))
            bcoef[i] = Float(-k * 2 / d)
        }
        let ceCoef = weights.map { Float(scale * options.lambdaCE * $0 / wSum) }
        a.withUnsafeBufferPointer { ab in
            bcoef.withUnsafeBufferPointer { bb in
                ceCoef.withUnsafeBufferPointer { cb in
                    let a = ab.baseAddress!, bc = bb.baseAddress!, cc = cb.baseAddress!
                    parallelFor(parts) { part in
                        let n = part / partsPerSample
                        let lo = (part % partsPerSample) * partVoxels
                        let hi = min(lo + partVoxels, shape.voxels)
                        let an = a + n * c, bn = bc + n * c
                        let cs = ix.classStride
                        for v in lo..<hi {
                            let g = grad + ix.base(n, v)
                            let y = Int(labels[n * shape.voxels + v])
                            // t = sum_j s[j] dL/ds[j]
                            let sy = g[y * cs]
                            var t = sy * bn[y]
                            for k in 0..<c { t += g[k * cs] * an[k] }
                            let ceY = cc[y]
                            for k in 0..<c {
                                let s = g[k * cs]
                                g[k * cs] = s * (an[k] - t + ceY)
                            }
                            // the one-hot terms of class y: s[y] * b[y] (Dice) and -ceY (CE)
                            g[y * cs] += sy * bn[y] - ceY
                        }
                    }
                }
            }
        }
        return value
    }
}
