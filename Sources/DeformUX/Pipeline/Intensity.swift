/// Preprocessing step 3: the model's intensity preset (ARCHITECTURE.md section 7: clip, then
/// (x - P1) / (P99 - P1)), applied per channel on the resampled grid, before padding.
///
/// `ct(clip: lo...hi)`: x -> clip(x, lo, hi), then (x - P1) / (P99 - P1) with the percentiles of the
/// clipped values. `mr()`: (x - P1) / (P99 - P1) without clipping. Percentiles are numpy.percentile's
/// default ("linear", Hyndman & Fan type 7) on float32, to the bit (see `Percentile`). Which voxels
/// they are taken over is part of the preset: `.all`, or `.nonzero` (voxels whose value before
/// clipping is not 0; all voxels if every one is 0), the nnU-Net / MONAI `nonzero` convention for MR
/// background. Defaults: CT over all voxels, MR over non-zero voxels. When P99 == P1 the scale is
/// skipped and x - P1 is returned (MONAI `ScaleIntensityRange` does the same).
public struct IntensityPreset: Equatable, Sendable {
    public enum Voxels: Equatable, Sendable {
        /// Every voxel of the (resampled) volume.
        case all
        /// Voxels whose value is not 0.
        case nonzero
    }

    /// Values are clamped to this range first (nil: no clipping).
    public var clip: ClosedRange<Float>?
    /// Percentiles mapped to 0 and 1 (nil: no scaling; the preset is then just the clip, or nothing).
    public var percentiles: (lower: Double, upper: Double)?
    public var voxels: Voxels

    public init(clip: ClosedRange<Float>?, percentiles: (lower: Double, upper: Double)?, voxels: Voxels) {
        self.clip = clip
        self.percentiles = percentiles
        self.voxels = voxels
    }

    /// Leave intensities as they are.
    public static let none = IntensityPreset(clip: nil, percentiles: nil, voxels: .all)

    /// CT: clip to `clip` (HU, e.g. -175...250 for abdomen), then (x - P1) / (P99 - P1).
    public static func ct(clip: ClosedRange<Float>, voxels: Voxels = .all) -> IntensityPreset {
        IntensityPreset(clip: clip, percentiles: (1, 99), voxels: voxels)
    }

    /// MR: (x - P1) / (P99 - P1), percentiles over the non-zero voxels by default.
    public static func mr(voxels: Voxels = .nonzero) -> IntensityPreset {
        IntensityPreset(clip: nil, percentiles: (1, 99), voxels: voxels)
    }

    public static func == (a: IntensityPreset, b: IntensityPreset) -> Bool {
        a.clip == b.clip && a.voxels == b.voxels
            && a.percentiles.map { [$0.lower, $0.upper] } == b.percentiles.map { [$0.lower, $0.upper] }
    }

    func validate(_ operation: String) throws {
        if let c = clip, !(c.lowerBound.isFinite && c.upperBound.isFinite) {
            throw DeformUXError.invalidArgument(operation, "bad clip range", expected: "finite bounds", got: "\(c)")
        }
        if let p = percentiles {
            guard p.lower >= 0, p.upper <= 100, p.lower <= p.upper else {
                throw DeformUXError.invalidArgument(operation, "bad percentiles", expected: "0 <= lower <= upper <= 100",
                                                    got: "\(p.lower), \(p.upper)")
            }
        }
    }
}

/// The intensity step as it was applied to one volume: the preset and, per channel, the percentile
/// values it measured. x -> (clip(x) - lower[c]) / (upper[c] - lower[c]), in float32.
public struct IntensityNormalization: Equatable, Sendable {
    public let preset: IntensityPreset
    /// P_lower per channel (0 when the preset does not scale).
    public let lower: [Float]
    /// P_upper per channel (1 when the preset does not scale).
    public let upper: [Float]

    /// The normalisation of `channels` channels with the given percentile values.
    public init(preset: IntensityPreset, lower: [Float], upper: [Float]) throws {
        try preset.validate("intensity")
        guard lower.count == upper.count, !lower.isEmpty else {
            throw DeformUXError.invalidArgument("intensity", "one lower and one upper value per channel",
                                                expected: "equal non-zero counts", got: "\(lower.count) and \(upper.count)")
        }
        self.preset = preset
        self.lower = lower
        self.upper = upper
    }

    /// Measures the preset's percentiles on `volume` (per channel).
    public init(preset: IntensityPreset, measuring volume: Volume) throws {
        try preset.validate("intensity")
        let n = volume.size.x * volume.size.y * volume.size.z
        let scratch = try TensorStorage(count: n, zeroed: false)
        self = try IntensityNormalization(preset: preset,
                                          measuring: (0..<volume.channels).map { volume.grid(channel: $0) },
                                          scratch: scratch.pointer)
    }

    /// Measures on grids (one per channel); `scratch` holds at least one grid's voxel count of floats.
    init(preset: IntensityPreset, measuring grids: [Grid<Float>], scratch: UnsafeMutablePointer<Float>) throws {
        var lo = [Float](repeating: 0, count: grids.count), hi = [Float](repeating: 1, count: grids.count)
        if let p = preset.percentiles {
            for (c, g) in grids.enumerated() {
                // Gather the voxels the preset measures (clipped), in C order.
                var n = 0
                var nonzero = 0
                for x in 0..<g.size.x {
                    for y in 0..<g.size.y {
                        let row = g.base + g.offset(x, y, 0)
                        for z in 0..<g.size.z {
                            let v = row[z * g.strides.z]
                            if preset.voxels == .nonzero {
                                if v == 0 { continue }
                                nonzero += 1
                            }
                            scratch[n] = preset.clip.map { min(max(v, $0.lowerBound), $0.upperBound) } ?? v
                            n += 1
                        }
                    }
                }
                if preset.voxels == .nonzero && nonzero == 0 {
                    // Every voxel is 0: measure over all of them (all 0, so P_lower = P_upper = clip(0)).
                    let zero = preset.clip.map { min(max(0, $0.lowerBound), $0.upperBound) } ?? 0
                    scratch[0] = zero
                    n = 1
                }
                let values = UnsafeMutableBufferPointer(start: scratch, count: n)
                let q = try Percentile.compute(values, [p.lower, p.upper])
                lo[c] = q[0]
                hi[c] = q[1]
            }
        }
        try self.init(preset: preset, lower: lo, upper: hi)
    }

    /// One value of channel `c` (0..<channels) mapped (clip, then scale).
    @inline(__always) func map(_ value: Float, channel c: Int) -> Float {
        var v = value
        if let r = preset.clip { v = min(max(v, r.lowerBound), r.upperBound) }
        guard preset.percentiles != nil else { return v }
        let range = upper[c] - lower[c]
        return range == 0 ? v - lower[c] : (v - lower[c]) / range
    }

    /// Maps a grid of channel `c` in place, in parallel over x-planes.
    func apply(_ g: Grid<Float>, channel c: Int) {
        if preset.clip == nil && preset.percentiles == nil { return }
        let parts = min(Threads.count, g.size.x)
        parallelFor(parts) { part in
            for x in Threads.range(part, of: parts, total: g.size.x) {
                for y in 0..<g.size.y {
                    let row = g.base + g.offset(x, y, 0)
                    for z in 0..<g.size.z { row[z * g.strides.z] = map(row[z * g.strides.z], channel: c) }
                }
            }
        }
    }

    /// The volume with the intensities mapped.
    public func apply(_ volume: Volume) throws -> Volume {
        guard volume.channels == lower.count else {
            throw DeformUXError.shapeMismatch("intensity", "wrong channel count", expected: "\(lower.count)",
                                              got: "\(volume.channels)")
        }
        let out = try Volume(uninitialized: volume.size, channels: volume.channels, affine: volume.affine)
        out.pointer.update(from: volume.pointer, count: volume.data.count)
        for c in 0..<volume.channels { apply(out.grid(channel: c), channel: c) }
        return out
    }

    /// Undoes the scaling (x * (upper - lower) + lower); clipped values stay clipped.
    public func invert(_ volume: Volume) throws -> Volume {
        guard volume.channels == lower.count else {
            throw DeformUXError.shapeMismatch("intensity", "wrong channel count", expected: "\(lower.count)",
                                              got: "\(volume.channels)")
        }
        let out = try Volume(uninitialized: volume.size, channels: volume.channels, affine: volume.affine)
        let n = volume.size.x * volume.size.y * volume.size.z
        for c in 0..<volume.channels {
            let src = volume.pointer + c * n, dst = out.pointer + c * n
            let range = upper[c] - lower[c]
            for i in 0..<n {
                dst[i] = preset.percentiles == nil ? src[i] : (range == 0 ? src[i] + lower[c] : src[i] * range + lower[c])
            }
        }
        return out
    }
}

/// numpy.percentile with the default method ("linear"), for float32 data and scalar q, to the bit.
///
/// numpy (2.x) takes the virtual index (n - 1) * (q / 100) in float64, its floor i and fraction g, and
/// (since q is a Python scalar and therefore "weak") interpolates in float32: a = v[i], b = v[i + 1],
/// d = b - a; the result is a + d * Float(g) when g < 0.5 and b - d * Float(1 - g) otherwise; an index
/// at or past n - 1 gives the largest value. The order statistics come from an in-place selection
/// (three-way quickselect, O(n)), not a sort.
public enum Percentile {
    /// The percentiles `qs` (each in 0...100) of `values` (finite, at least one), reordering `values`.
    public static func compute(_ values: UnsafeMutableBufferPointer<Float>, _ qs: [Double]) throws -> [Float] {
        let n = values.count
        guard n >= 1, let base = values.baseAddress else {
            throw DeformUXError.invalidArgument("percentile", "no values", expected: "at least one value", got: "0")
        }
        // Ranks needed, ascending: each selection leaves [0, k) <= v[k] <= [k + 1, n), so later ranks are
        // searched only to the right of earlier ones.
        var plans: [(q: Double, i: Int, g: Double)] = []
        for q in qs {
            guard q >= 0, q <= 100 else {
                throw DeformUXError.invalidArgument("percentile", "q out of range", expected: "0...100", got: "\(q)")
            }
            let virtual = Double(n - 1) * (q / 100)
            if virtual >= Double(n - 1) {
                plans.append((q, n - 1, 0))
            } else {
                let i = Int(virtual.rounded(.down))
                plans.append((q, i, virtual - Double(i)))
            }
        }
        var ranks = Set<Int>()
        for p in plans {
            ranks.insert(p.i)
            if p.i + 1 < n { ranks.insert(p.i + 1) }
        }
        var lo = 0
        for k in ranks.sorted() {
            select(base, lo, n, k)
            lo = k + 1
        }
        return plans.map { p in
            if p.i >= n - 1 { return base[n - 1] }
            let a = base[p.i], b = base[p.i + 1]
            let d = b - a
            return p.g >= 0.5 ? b - d * Float(1 - p.g) : a + d * Float(p.g)
        }
    }

    /// The percentile `q` of `values` (numpy.percentile(values, q)).
    public static func of(_ values: [Float], _ q: Double) throws -> Float {
        var copy = values
        return try copy.withUnsafeMutableBufferPointer { try compute($0, [q])[0] }
    }

    /// Rearranges v[lo..<hi] so that v[k] holds the value a sort would put there, smaller-or-equal
    /// values before it and greater-or-equal after it. Three-way partitions (many equal values are
    /// common: clipped CT, background) around a median-of-three pivot; after 64 rounds without
    /// converging, the range is sorted.
    static func select(_ v: UnsafeMutablePointer<Float>, _ lo0: Int, _ hi0: Int, _ k: Int) {
        var lo = lo0, hi = hi0
        var rounds = 0
        while hi - lo > 1 {
            rounds += 1
            if rounds > 64 {
                var range = UnsafeMutableBufferPointer(start: v + lo, count: hi - lo)
                range.sort()
                return
            }
            let a = v[lo], b = v[lo + (hi - lo) / 2], c = v[hi - 1]
            let pivot = max(min(a, b), min(max(a, b), c))
            // [lo, lt) < pivot, [lt, i) == pivot, [gt, hi) > pivot
            var lt = lo, i = lo, gt = hi
            while i < gt {
                let x = v[i]
                if x < pivot {
                    v.swapAt(lt, i); lt += 1; i += 1
                } else if x > pivot {
                    gt -= 1; v.swapAt(i, gt)
                } else {
                    i += 1
                }
            }
            if k < lt { hi = lt } else if k >= gt { lo = gt } else { return }
        }
    }
}

extension UnsafeMutablePointer {
    @inline(__always) fileprivate func swapAt(_ i: Int, _ j: Int) {
        let t = self[i]; self[i] = self[j]; self[j] = t
    }
}
