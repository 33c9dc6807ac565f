/// NIfTI in, NIfTI out: a file read by the engine's reader, segmented, and the labels written on the
/// input's grid with the input's header and affine (uint8, atomically), for Swift-only users and the
/// command line's `deformux predict`.
extension Volume {
    /// The image of a NIfTI file: a 3-D file is one channel, a 4-D file [t][x][y][z] (the reader's
    /// channel-first layout) gives t channels; values as nibabel's get_fdata(dtype=float32); the
    /// file's affine (nibabel's img.affine).
    public init(nifti file: NIfTIFile) throws {
        let op = "segment \(file.path)"
        let shape = file.arrayShape
        guard shape.count == 3 || shape.count == 4 else {
            throw DeformUXError.invalidArgument(op, "the image must be 3-D (x, y, z) or 4-D with the channels last (x, y, z, c)",
                                                got: "shape \(file.shape)")
        }
        let channels = shape.count == 4 ? shape[0] : 1
        let size = SIMD3(shape[shape.count - 3], shape[shape.count - 2], shape[shape.count - 1])
        let affine: Affine
        do {
            affine = try Affine(file.affine.values)
        } catch let e as DeformUXError {
            throw e.renamed(operation: op)
        }
        let data = try Tensor(uninitialized: [channels, size.x, size.y, size.z])
        try file.floats(into: data.pointer, count: data.count)
        try self.init(data, affine: affine)
    }
}

extension Segmenter {
    /// Segments the NIfTI image at `input` and writes the labels to `output` (.nii or .nii.gz; uint8 on
    /// the input's grid, with the input's header and affine; atomic) and, when `probabilities` names a
    /// file, the per-class probabilities (float32, x, y, z, class). Returns what the segmentation did.
    @discardableResult
    public func segmentFile(input: String, output: String, probabilities: String? = nil,
                            monitor: SegmentMonitor = SegmentMonitor()) throws -> Segmentation {
        try Segmenter.checkOutputNames(output, probabilities)
        let file = try NIfTIFile(path: input)
        let volume = try Volume(nifti: file)
        let result = try segment(volume, probabilities: probabilities != nil, monitor: monitor)
        try Segmenter.write(result, like: file, labels: output, probabilities: probabilities)
        return result
    }

    /// Segments the NIfTI image at `input` with the model at `model` (a card or weights, as
    /// `ModelCard.loadModel` reads them), its windows resolved for this image; `adjust` may change the
    /// card first (overlap, window, tta, ...). Writes as `segmentFile(input:output:probabilities:monitor:)`.
    @discardableResult
    public static func segmentFile(input: String, output: String, model: String, probabilities: String? = nil,
                                   adjust: (inout ModelCard) throws -> Void = { _ in },
                                   monitor: SegmentMonitor = SegmentMonitor()) throws -> Segmentation {
        try checkOutputNames(output, probabilities)
        let loaded = try ModelCard.loadModel(path: model)
        var card = loaded.card
        try adjust(&card)
        try card.check(against: loaded.model.config, operation: "segment")
        let file = try NIfTIFile(path: input)
        let volume = try Volume(nifti: file)
        let configuration = try card.segmenterConfiguration(size: volume.size, affine: volume.affine)
        let segmenter = try Segmenter(model: loaded.model, configuration: configuration)
        let result = try segmenter.segment(volume, probabilities: probabilities != nil, monitor: monitor)
        try write(result, like: file, labels: output, probabilities: probabilities, description: "deformux: \(card.name)")
        return result
    }

    /// Output names are checked before any work, so a typo does not cost a segmentation.
    static func checkOutputNames(_ paths: String?...) throws {
        for case let p? in paths where !(p.hasSuffix(".nii") || p.hasSuffix(".nii.gz")) {
            throw DeformUXError.invalidArgument("segment", "output files are NIfTI", expected: "a name ending in .nii or .nii.gz",
                                                got: p)
        }
    }

    static func write(_ result: Segmentation, like file: NIfTIFile, labels: String, probabilities: String?,
                      description: String = "deformux labels") throws {
        let s = result.labels.size
        let affine = try NIfTIAffine(rowMajor: result.labels.affine.values)
        let template = file.header
        try NIfTI.write(result.labels.labels, dims: [s.x, s.y, s.z], affine: affine, template: template,
                        description: description, to: labels)
        if let probabilities, let p = result.probabilities {
            try NIfTI.write(raw: p.pointer, datatype: .float32, dims: [s.x, s.y, s.z, p.channels], affine: affine,
                            template: template, description: "deformux class probabilities", to: probabilities)
        }
    }
}
