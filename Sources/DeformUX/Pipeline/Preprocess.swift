/// The preprocessing of one volume for the network, in four recorded steps (each file beside this one
/// states its step's exact semantics):
///
///   1. `Reorientation`  closest canonical (RAS+) axis order, no resampling (nibabel as_closest_canonical)
///   2. `Resampling`     to the model's spacing, trilinear (nnU-Net's size rule, half-voxel grid)
///   3. `IntensityNormalization`  the model's preset (clip, then (x - P1) / (P99 - P1))
///   4. `Padding`        to a multiple of the network's size multiple (16) and at least the window,
///                       centred, with a constant value
///
/// `Preprocessing` holds the four records; `restore` (Postprocess.swift) undoes them for labels and
/// probabilities so they land exactly on the input grid with the input affine.

/// Preprocessing step 4: constant padding, centred: along each axis with n voxels the padded size is
/// T = max(n, `minimum`) rounded up to `multiple`, with (T - n) / 2 voxels (rounded down) before and the
/// rest after, like MONAI's `DivisiblePad` / `SpatialPad` (method "symmetric") and the padding
/// `sliding_window_inference` adds when the window is larger than the image. The value is in the
/// network's units (after the intensity step); 0 by default, as MONAI's `cval`.
public struct Padding: Equatable, Sendable {
    public let inputSize: SIMD3<Int>
    /// Voxels added before the input on each axis (the crop that undoes the step starts here).
    public let before: SIMD3<Int>
    public let outputSize: SIMD3<Int>
    public let value: Float
    public let inputAffine: Affine
    /// inputAffine composed with the shift by -before (padded index p is input index p - before).
    public let outputAffine: Affine

    /// Voxels added after the input on each axis.
    public var after: SIMD3<Int> { outputSize &- inputSize &- before }
    public var isIdentity: Bool { inputSize == outputSize }

    public init(size: SIMD3<Int>, affine: Affine, multiple: Int, minimum: SIMD3<Int>, value: Float) throws {
        guard multiple >= 1, multiple <= 4096 else {
            throw DeformUXError.invalidArgument("pad", "bad size multiple", expected: "1...4096", got: "\(multiple)")
        }
        guard size.x >= 1, size.y >= 1, size.z >= 1, minimum.x >= 1, minimum.y >= 1, minimum.z >= 1 else {
            throw DeformUXError.invalidArgument("pad", "empty size", expected: "sizes >= 1",
                                                got: "size \(sizeText(size)), minimum \(sizeText(minimum))")
        }
        guard value.isFinite else {
            throw DeformUXError.invalidArgument("pad", "bad pad value", expected: "a finite value", got: "\(value)")
        }
        var t = SIMD3<Int>(), b = SIMD3<Int>()
        for a in 0..<3 {
            t[a] = (max(size[a], minimum[a]) + multiple - 1) / multiple * multiple
            b[a] = (t[a] - size[a]) / 2
        }
        _ = try voxelCount(t, operation: "pad")
        inputSize = size
        before = b
        outputSize = t
        self.value = value
        inputAffine = affine
        outputAffine = affine * Affine.voxelMap([1, 0, 0, 0, 1, 0, 0, 0, 1], SIMD3(Double(-b.x), Double(-b.y), Double(-b.z)))
    }

    /// The volume padded (every channel), with `outputAffine`.
    public func apply(_ volume: Volume) throws -> Volume {
        guard volume.size == inputSize else {
            throw DeformUXError.shapeMismatch("pad", "volume does not fit this padding", expected: sizeText(inputSize),
                                              got: sizeText(volume.size))
        }
        let out = try Volume(uninitialized: outputSize, channels: volume.channels, affine: outputAffine)
        out.pointer.update(repeating: value, count: out.data.count)
        for c in 0..<volume.channels { copyGrid(volume.grid(channel: c), interior(of: out.grid(channel: c))) }
        return out
    }

    /// A padded volume cropped back to the input grid, with `inputAffine`.
    public func invert(_ volume: Volume) throws -> Volume {
        guard volume.size == outputSize else {
            throw DeformUXError.shapeMismatch("pad", "volume does not fit this padding", expected: sizeText(outputSize),
                                              got: sizeText(volume.size))
        }
        let out = try Volume(uninitialized: inputSize, channels: volume.channels, affine: inputAffine)
        for c in 0..<volume.channels { copyGrid(interior(of: volume.grid(channel: c)), out.grid(channel: c)) }
        return out
    }

    /// Padded labels cropped back to the input grid, with `inputAffine`.
    public func invert(_ labels: LabelMap) throws -> LabelMap {
        guard labels.size == outputSize else {
            throw DeformUXError.shapeMismatch("pad", "label map does not fit this padding", expected: sizeText(outputSize),
                                              got: sizeText(labels.size))
        }
        var out = [UInt8](repeating: 0, count: inputSize.x * inputSize.y * inputSize.z)
        labels.labels.withUnsafeBufferPointer { s in
            out.withUnsafeMutableBufferPointer { o in
                copyGrid(interior(of: Grid(contiguous: UnsafeMutablePointer(mutating: s.baseAddress!), size: outputSize)),
                         Grid(contiguous: o.baseAddress!, size: inputSize))
            }
        }
        return try LabelMap(size: inputSize, labels: out, affine: inputAffine)
    }

    /// The input's box inside a padded grid.
    func interior<T>(of padded: Grid<T>) -> Grid<T> { padded.box(origin: before, size: inputSize) }
}

/// What the preprocessing does (the segmenter's configuration supplies these).
public struct PreprocessOptions: Equatable, Sendable {
    /// Reorient to the closest canonical orientation first (models are trained on RAS-canonical data).
    public var reorient: Bool = true
    /// Target voxel spacing in mm on the canonical axes; nil: keep the input's grid.
    public var spacing: SIMD3<Double>? = nil
    public var intensity: IntensityPreset = .none
    /// Pad to a multiple of this on each axis.
    public var padMultiple: Int = 16
    /// Pad to at least this size (the window).
    public var minimumSize: SIMD3<Int> = SIMD3(1, 1, 1)
    /// The pad value, in the network's units (after the intensity step).
    public var padValue: Float = 0

    public init(reorient: Bool = true, spacing: SIMD3<Double>? = nil, intensity: IntensityPreset = .none,
                padMultiple: Int = 16, minimumSize: SIMD3<Int> = SIMD3(1, 1, 1), padValue: Float = 0) {
        self.reorient = reorient
        self.spacing = spacing
        self.intensity = intensity
        self.padMultiple = padMultiple
        self.minimumSize = minimumSize
        self.padValue = padValue
    }
}

/// The four preprocessing steps as applied to one volume: enough to undo them exactly.
public struct Preprocessing: Equatable, Sendable {
    public let reorientation: Reorientation
    public let resampling: Resampling
    public let intensity: IntensityNormalization
    public let padding: Padding

    public var inputSize: SIMD3<Int> { reorientation.inputSize }
    public var inputAffine: Affine { reorientation.inputAffine }
    /// The grid the network sees (padded).
    public var networkSize: SIMD3<Int> { padding.outputSize }
    public var networkAffine: Affine { padding.outputAffine }

    /// Steps 1, 2 and 4 for a grid (they depend on its size and affine only); step 3 is measured on the data.
    struct Plan {
        var reorientation: Reorientation
        var resampling: Resampling
        var padding: Padding
    }

    static func plan(size: SIMD3<Int>, affine: Affine, options: PreprocessOptions) throws -> Plan {
        let reorientation = options.reorient ? try Reorientation(affine: affine, size: size)
                                             : Reorientation(unchanged: size, affine: affine)
        let resampling = try Resampling(size: reorientation.canonicalSize, affine: reorientation.canonicalAffine,
                                        targetSpacing: options.spacing)
        let padding = try Padding(size: resampling.outputSize, affine: resampling.outputAffine,
                                  multiple: options.padMultiple, minimum: options.minimumSize, value: options.padValue)
        return Plan(reorientation: reorientation, resampling: resampling, padding: padding)
    }

    /// Runs the steps on `volume` into `network` (channels x plan.padding.outputSize floats):
    /// the input read through the canonical view, resampled straight into the padded buffer's interior,
    /// normalised there, the border filled with the pad value. `scratch` holds at least one channel of
    /// the resampled grid (for the percentiles).
    static func run(_ plan: Plan, _ volume: Volume, _ preset: IntensityPreset, network: UnsafeMutablePointer<Float>,
                    scratch: UnsafeMutablePointer<Float>) throws -> Preprocessing {
        let padded = plan.padding.outputSize
        let perChannel = padded.x * padded.y * padded.z
        network.update(repeating: plan.padding.value, count: perChannel * volume.channels)
        var interiors: [Grid<Float>] = []
        for c in 0..<volume.channels {
            let interior = plan.padding.interior(of: Grid(contiguous: network + c * perChannel, size: padded))
            resampleLinear(plan.reorientation.canonicalView(of: volume.grid(channel: c)), interior)
            interiors.append(interior)
        }
        let intensity = try IntensityNormalization(preset: preset, measuring: interiors, scratch: scratch)
        for (c, g) in interiors.enumerated() { intensity.apply(g, channel: c) }
        return Preprocessing(reorientation: plan.reorientation, resampling: plan.resampling, intensity: intensity,
                             padding: plan.padding)
    }

    /// Runs all four steps on `volume`: the network's input (on `networkSize`, with `networkAffine`) and
    /// the record that undoes it. The segmenter runs the same code into memory it keeps between volumes.
    public static func run(_ volume: Volume, options: PreprocessOptions) throws -> (Volume, Preprocessing) {
        try options.intensity.validate("preprocess")
        let p = try plan(size: volume.size, affine: volume.affine, options: options)
        let out = try Volume(uninitialized: p.padding.outputSize, channels: volume.channels, affine: p.padding.outputAffine)
        let r = p.resampling.outputSize
        let scratch = try TensorStorage(count: r.x * r.y * r.z, zeroed: false)
        let record = try run(p, volume, options.intensity, network: out.pointer, scratch: scratch.pointer)
        return (out, record)
    }
}

extension Reorientation {
    /// The identity reorientation of a grid (reorientation switched off): the input's own axis order.
    init(unchanged size: SIMD3<Int>, affine: Affine) {
        self.init(axes: [0, 1, 2], flips: [false, false, false], inputSize: size, inputAffine: affine,
                  canonicalSize: size, canonicalAffine: affine)
    }
}
