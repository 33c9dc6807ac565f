/// Preprocessing step 2: resampling to the model's voxel spacing (trilinear for images, nearest for
/// labels), and back.
///
/// Grid rule (nnU-Net's `compute_new_shape`, with the half-voxel convention of
/// `torch.nn.functional.interpolate(align_corners=False)` / skimage `resize`): along each axis with n
/// voxels of spacing s, the target spacing t gives m = max(1, round(n * s / t)) voxels (round half to
/// even, like numpy), covering the same physical extent: the first voxel's outer face and the last
/// voxel's outer face stay where they were. So the new spacing is exactly s * n / m (within half a voxel
/// of t per axis), and new voxel j sits at old index (j + 0.5) * n / m - 0.5; the new affine is the old
/// one composed with that voxel map. When m == n on every axis the step is the identity (no copy).
///
/// Images: trilinear as torch's `interpolate(mode="trilinear", align_corners=False)` computes it in
/// float32 (source index clamped at 0, the upper neighbour clamped at n - 1; same weights and nesting).
/// Labels: nearest as torch's `mode="nearest-exact"`: old index floor((j + 0.5) * n / m), clamped to
/// n - 1, but in exact integer arithmetic ((2j + 1) * n / (2m)), so integer ratios invert exactly: labels
/// upsampled by a whole factor k and mapped back are the original labels, and any label map taken to
/// another grid and back lands on the original grid with the original shape and affine.
public struct Resampling: Equatable, Sendable {
    public let inputSize: SIMD3<Int>
    public let outputSize: SIMD3<Int>
    public let inputAffine: Affine
    /// inputAffine composed with the voxel map new -> old index.
    public let outputAffine: Affine

    /// No resampling: the sizes agree.
    public var isIdentity: Bool { inputSize == outputSize }
    /// The spacing of the resampled grid (s * n / m per axis of the input's spacing s).
    public var outputSpacing: SIMD3<Double> { outputAffine.spacing }

    /// The resampling of a grid of `size` voxels with `affine` to (about) `targetSpacing` mm by the grid
    /// rule above; nil spacing means none (the identity).
    public init(size: SIMD3<Int>, affine: Affine, targetSpacing: SIMD3<Double>?) throws {
        guard let t = targetSpacing else {
            try self.init(size: size, affine: affine, outputSize: size)
            return
        }
        let s = affine.spacing
        var m = SIMD3<Int>()
        for a in 0..<3 {
            guard t[a].isFinite, t[a] > 0 else {
                throw DeformUXError.invalidArgument("resample", "bad target spacing", expected: "finite spacings > 0 mm",
                                                    got: "\(t)")
            }
            guard s[a] > 0 else {
                throw DeformUXError.invalidArgument("resample", "the affine has a zero-length voxel axis",
                                                    expected: "voxel sizes > 0", got: "spacing \(s) from affine \(affine)")
            }
            let exact = Double(size[a]) * s[a] / t[a]
            guard exact.isFinite, exact <= 65536 else {
                throw DeformUXError.invalidArgument("resample", "the target spacing makes the grid too large",
                                                    expected: "at most 65536 voxels per axis",
                                                    got: "\(exact) voxels on axis \(a) (spacing \(s[a]) mm -> \(t[a]) mm)")
            }
            m[a] = max(1, Int(exact.rounded(.toNearestOrEven)))
        }
        try self.init(size: size, affine: affine, outputSize: m)
    }

    /// The resampling of a grid of `size` voxels to `outputSize` voxels over the same extent.
    public init(size: SIMD3<Int>, affine: Affine, outputSize: SIMD3<Int>) throws {
        guard size.x >= 1, size.y >= 1, size.z >= 1, outputSize.x >= 1, outputSize.y >= 1, outputSize.z >= 1 else {
            throw DeformUXError.invalidArgument("resample", "empty grid", expected: "sizes >= 1",
                                                got: "\(sizeText(size)) -> \(sizeText(outputSize))")
        }
        _ = try voxelCount(outputSize, operation: "resample")
        inputSize = size
        self.outputSize = outputSize
        inputAffine = affine
        var m = [Double](repeating: 0, count: 9)
        var t = SIMD3<Double>()
        for a in 0..<3 {
            let r = Double(size[a]) / Double(outputSize[a])
            m[a * 3 + a] = r
            t[a] = (r - 1) / 2
        }
        outputAffine = affine * Affine.voxelMap(m, t)
    }

    private func check(_ size: SIMD3<Int>, _ expected: SIMD3<Int>, _ what: String) throws {
        guard size == expected else {
            throw DeformUXError.shapeMismatch("resample", "\(what) does not fit this resampling",
                                              expected: sizeText(expected), got: sizeText(size))
        }
    }

    /// The volume on the output grid (trilinear), with `outputAffine`.
    public func apply(_ volume: Volume) throws -> Volume {
        try check(volume.size, inputSize, "volume")
        let out = try Volume(uninitialized: outputSize, channels: volume.channels, affine: outputAffine)
        for c in 0..<volume.channels { resampleLinear(volume.grid(channel: c), out.grid(channel: c)) }
        return out
    }

    /// An output-grid volume back on the input grid (trilinear), with `inputAffine`.
    public func invert(_ volume: Volume) throws -> Volume {
        try check(volume.size, outputSize, "volume")
        let out = try Volume(uninitialized: inputSize, channels: volume.channels, affine: inputAffine)
        for c in 0..<volume.channels { resampleLinear(volume.grid(channel: c), out.grid(channel: c)) }
        return out
    }

    /// Labels on the output grid (nearest), with `outputAffine`.
    public func apply(_ labels: LabelMap) throws -> LabelMap {
        try check(labels.size, inputSize, "label map")
        return try LabelMap(size: outputSize, labels: nearestLabels(labels.labels, inputSize, outputSize),
                            affine: outputAffine)
    }

    /// Output-grid labels back on the input grid (nearest): same shape, same affine as the input.
    public func invert(_ labels: LabelMap) throws -> LabelMap {
        try check(labels.size, outputSize, "label map")
        return try LabelMap(size: inputSize, labels: nearestLabels(labels.labels, outputSize, inputSize),
                            affine: inputAffine)
    }

    private func nearestLabels(_ labels: [UInt8], _ from: SIMD3<Int>, _ to: SIMD3<Int>) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: to.x * to.y * to.z)
        labels.withUnsafeBufferPointer { s in
            out.withUnsafeMutableBufferPointer { o in
                // Both hold >= 1 labels (LabelMap's invariant).
                resampleNearest(Grid(contiguous: UnsafeMutablePointer(mutating: s.baseAddress!), size: from),
                                Grid(contiguous: o.baseAddress!, size: to))
            }
        }
        return out
    }
}

/// One axis of a trilinear resampling from n to m voxels: for each output index, the two input indices
/// and their weights, computed in float32 as torch's CPU `upsample_trilinear3d` does.
struct LinearAxis {
    var i0: [Int], i1: [Int], w0: [Float], w1: [Float]

    init(from n: Int, to m: Int) {
        i0 = []; i1 = []; w0 = []; w1 = []
        i0.reserveCapacity(m); i1.reserveCapacity(m); w0.reserveCapacity(m); w1.reserveCapacity(m)
        let scale = Float(n) / Float(m)
        for d in 0..<m {
            let src = max(scale * (Float(d) + 0.5) - 0.5, 0)
            let a = min(Int(src.rounded(.down)), n - 1)
            let l1 = min(max(src - Float(a), 0), 1)
            i0.append(a)
            i1.append(a < n - 1 ? a + 1 : a)
            w0.append(1 - l1)
            w1.append(l1)
        }
    }
}

/// The input index of output index `d` when nearest-resampling n voxels to m: floor((d + 0.5) * n / m)
/// in exact integer arithmetic, at most n - 1.
@inline(__always) func nearestIndex(_ d: Int, from n: Int, to m: Int) -> Int {
    min((2 * d + 1) * n / (2 * m), n - 1)
}

/// Trilinear resampling of `src` onto `dst` (their sizes define the scale per axis); a plain copy when
/// the sizes agree. Parallel over the x-planes of `dst`.
func resampleLinear(_ src: Grid<Float>, _ dst: Grid<Float>) {
    if src.size == dst.size { copyGrid(src, dst); return }
    let ax = LinearAxis(from: src.size.x, to: dst.size.x)
    let ay = LinearAxis(from: src.size.y, to: dst.size.y)
    let az = LinearAxis(from: src.size.z, to: dst.size.z)
    // Input offsets along z, once.
    let z0 = az.i0.map { $0 * src.strides.z }, z1 = az.i1.map { $0 * src.strides.z }
    let parts = min(Threads.count, dst.size.x)
    parallelFor(parts) { part in
        for x in Threads.range(part, of: parts, total: dst.size.x) {
            let px0 = src.base + ax.i0[x] * src.strides.x, px1 = src.base + ax.i1[x] * src.strides.x
            let wx0 = ax.w0[x], wx1 = ax.w1[x]
            for y in 0..<dst.size.y {
                let oy0 = ay.i0[y] * src.strides.y, oy1 = ay.i1[y] * src.strides.y
                let wy0 = ay.w0[y], wy1 = ay.w1[y]
                let r00 = px0 + oy0, r01 = px0 + oy1, r10 = px1 + oy0, r11 = px1 + oy1
                let out = dst.base + dst.offset(x, y, 0)
                for z in 0..<dst.size.z {
                    let a = z0[z], b = z1[z], wz0 = az.w0[z], wz1 = az.w1[z]
                    // torch's nesting: x outermost, each level t0 * w0 + t1 * w1.
                    let v00 = r00[a] * wz0 + r00[b] * wz1
                    let v01 = r01[a] * wz0 + r01[b] * wz1
                    let v10 = r10[a] * wz0 + r10[b] * wz1
                    let v11 = r11[a] * wz0 + r11[b] * wz1
                    let v0 = v00 * wy0 + v01 * wy1
                    let v1 = v10 * wy0 + v11 * wy1
                    out[z * dst.strides.z] = v0 * wx0 + v1 * wx1
                }
            }
        }
    }
}

/// Nearest ("nearest-exact") resampling of `src` onto `dst`; a plain copy when the sizes agree.
func resampleNearest<T>(_ src: Grid<T>, _ dst: Grid<T>) {
    if src.size == dst.size { copyGrid(src, dst); return }
    let zs = (0..<dst.size.z).map { nearestIndex($0, from: src.size.z, to: dst.size.z) * src.strides.z }
    let parts = min(Threads.count, dst.size.x)
    parallelFor(parts) { part in
        for x in Threads.range(part, of: parts, total: dst.size.x) {
            let sx = nearestIndex(x, from: src.size.x, to: dst.size.x)
            for y in 0..<dst.size.y {
                let sy = nearestIndex(y, from: src.size.y, to: dst.size.y)
                let row = src.base + sx * src.strides.x + sy * src.strides.y
                let out = dst.base + dst.offset(x, y, 0)
                for z in 0..<dst.size.z { out[z * dst.strides.z] = row[zs[z]] }
            }
        }
    }
}
