/// Preprocessing step 1: reorientation to the closest canonical (RAS+) orientation without resampling,
/// as nibabel's `as_closest_canonical` does: a permutation of the axes and flips, chosen from the affine
/// by `io_orientation` (nibabel 5.4). Voxels are moved, never interpolated, so the step is exactly
/// invertible; the pipeline never copies the data for it (it reads the input through a strided view).
///
/// io_orientation: RS = the affine's 3x3 part with unit columns; R = the closest orthogonal matrix
/// (polar decomposition, R = RS (RS^T RS)^(-1/2)); input axes are taken strongest first (largest
/// max |R[:, i]|, stable on ties), each goes to the output axis where its column of R is largest in
/// magnitude (that row is then removed from consideration), flipped when that entry is negative.
/// An affine whose 3x3 part is singular has no orientation and is rejected.
public struct Reorientation: Equatable, Sendable {
    /// For input axis i: the canonical axis it becomes (nibabel's `ornt[i, 0]`).
    public let axes: [Int]
    /// For input axis i: whether it runs against its canonical axis (`ornt[i, 1] == -1`).
    public let flips: [Bool]
    public let inputSize: SIMD3<Int>
    public let inputAffine: Affine
    /// The reoriented grid: canonicalSize[axes[i]] = inputSize[i].
    public let canonicalSize: SIMD3<Int>
    /// The input affine composed with the voxel map from canonical to input indices (nibabel's
    /// `affine @ inv_ornt_aff(ornt, shape)`): the same world positions for the same voxels.
    public let canonicalAffine: Affine

    /// Nothing to do: the input is already in canonical order.
    public var isIdentity: Bool { axes == [0, 1, 2] && flips == [false, false, false] }

    init(axes: [Int], flips: [Bool], inputSize: SIMD3<Int>, inputAffine: Affine, canonicalSize: SIMD3<Int>,
         canonicalAffine: Affine) {
        self.axes = axes
        self.flips = flips
        self.inputSize = inputSize
        self.inputAffine = inputAffine
        self.canonicalSize = canonicalSize
        self.canonicalAffine = canonicalAffine
    }

    /// The reorientation of a grid of `size` voxels with `affine`.
    public init(affine: Affine, size: SIMD3<Int>) throws {
        let (axes, flips) = try Reorientation.orientation(of: affine)
        self.axes = axes
        self.flips = flips
        inputSize = size
        inputAffine = affine
        var cs = SIMD3<Int>()
        // Canonical index u -> input index v: v[i] = flip ? n[i] - 1 - u[axes[i]] : u[axes[i]].
        var m = [Double](repeating: 0, count: 9)
        var t = SIMD3<Double>()
        for i in 0..<3 {
            cs[axes[i]] = size[i]
            m[i * 3 + axes[i]] = flips[i] ? -1 : 1
            t[i] = flips[i] ? Double(size[i] - 1) : 0
        }
        canonicalSize = cs
        canonicalAffine = affine * Affine.voxelMap(m, t)
    }

    /// nibabel's `io_orientation(affine)`: for each input axis, its output axis and whether it is flipped.
    public static func orientation(of affine: Affine) throws -> (axes: [Int], flips: [Bool]) {
        // RS: the 3x3 part with unit columns (zero columns are left as they are, as nibabel does).
        var rs = [Double](repeating: 0, count: 9)
        for c in 0..<3 {
            var n = 0.0
            for r in 0..<3 { n += affine[r, c] * affine[r, c] }
            let zoom = n == 0 ? 1 : n.squareRoot()
            for r in 0..<3 { rs[r * 3 + c] = affine[r, c] / zoom }
        }
        // Polar factor: RS^T RS = V diag(l) V^T, R = RS V diag(l^-1/2) V^T. The singular values of RS
        // are sqrt(l); nibabel keeps those above max * 3 * eps, and all three must stay.
        var mtm = [Double](repeating: 0, count: 9)
        for i in 0..<3 {
            for j in 0..<3 {
                var s = 0.0
                for k in 0..<3 { s += rs[k * 3 + i] * rs[k * 3 + j] }
                mtm[i * 3 + j] = s
            }
        }
        let (lambda, v) = symmetricEigen3(mtm)
        let singular = lambda.map { max($0, 0).squareRoot() }
        let tol = (singular.max() ?? 0) * 3 * Double.ulpOfOne
        guard singular.allSatisfy({ $0 > tol }) else {
            throw DeformUXError.invalidArgument("reorient", "the affine's 3x3 part is singular: no orientation",
                                                expected: "three independent voxel axes", got: "affine \(affine)")
        }
        // inverse square root of RS^T RS
        var isq = [Double](repeating: 0, count: 9)
        for i in 0..<3 {
            for j in 0..<3 {
                var s = 0.0
                for k in 0..<3 { s += v[i * 3 + k] * v[j * 3 + k] / singular[k] }
                isq[i * 3 + j] = s
            }
        }
        var r = [Double](repeating: 0, count: 9)
        for i in 0..<3 {
            for j in 0..<3 {
                var s = 0.0
                for k in 0..<3 { s += rs[i * 3 + k] * isq[k * 3 + j] }
                r[i * 3 + j] = s
            }
        }
        // Strongest input axis first (largest max R^2 of its column), stable on ties.
        var strength = [Double](repeating: 0, count: 3)
        for c in 0..<3 {
            for row in 0..<3 { strength[c] = max(strength[c], r[row * 3 + c] * r[row * 3 + c]) }
        }
        var order = [0, 1, 2]
        // insertion sort, descending, stable
        for i in 1..<3 {
            var j = i
            while j > 0 && strength[order[j]] > strength[order[j - 1]] { order.swapAt(j, j - 1); j -= 1 }
        }
        var axes = [-1, -1, -1]
        var flips = [false, false, false]
        for inAxis in order {
            // np.allclose(col, 0): every |entry| <= 1e-8.
            guard (0..<3).contains(where: { abs(r[$0 * 3 + inAxis]) > 1e-8 }) else {
                throw DeformUXError.invalidArgument("reorient", "an input axis has no output direction",
                                                    expected: "an affine with three independent axes", got: "affine \(affine)")
            }
            var best = 0
            for row in 1..<3 where abs(r[row * 3 + inAxis]) > abs(r[best * 3 + inAxis]) { best = row }
            axes[inAxis] = best
            flips[inAxis] = r[best * 3 + inAxis] < 0
            for c in 0..<3 { r[best * 3 + c] = 0 }
        }
        return (axes, flips)
    }

    /// The input grid seen in canonical order (no copy): `grid` is an input-ordered grid of `inputSize`.
    func canonicalView<T>(of grid: Grid<T>) -> Grid<T> {
        var base = grid.base
        var strides = SIMD3<Int>()
        for i in 0..<3 {
            strides[axes[i]] = flips[i] ? -grid.strides[i] : grid.strides[i]
            if flips[i] { base += (inputSize[i] - 1) * grid.strides[i] }
        }
        return Grid(base: base, size: canonicalSize, strides: strides)
    }

    private func check(_ size: SIMD3<Int>, _ expected: SIMD3<Int>, _ what: String) throws {
        guard size == expected else {
            throw DeformUXError.shapeMismatch("reorient", "\(what) does not fit this reorientation",
                                              expected: sizeText(expected), got: sizeText(size))
        }
    }

    /// The volume in canonical order, with `canonicalAffine`.
    public func apply(_ volume: Volume) throws -> Volume {
        try check(volume.size, inputSize, "volume")
        let out = try Volume(uninitialized: canonicalSize, channels: volume.channels, affine: canonicalAffine)
        for c in 0..<volume.channels { copyGrid(canonicalView(of: volume.grid(channel: c)), out.grid(channel: c)) }
        return out
    }

    /// A canonical-order volume back in the input's order, with `inputAffine`.
    public func invert(_ volume: Volume) throws -> Volume {
        try check(volume.size, canonicalSize, "volume")
        let out = try Volume(uninitialized: inputSize, channels: volume.channels, affine: inputAffine)
        for c in 0..<volume.channels { copyGrid(volume.grid(channel: c), canonicalView(of: out.grid(channel: c))) }
        return out
    }

    /// Labels in canonical order, with `canonicalAffine`.
    public func apply(_ labels: LabelMap) throws -> LabelMap {
        try check(labels.size, inputSize, "label map")
        var out = [UInt8](repeating: 0, count: labels.labels.count)
        labels.labels.withUnsafeBufferPointer { s in
            out.withUnsafeMutableBufferPointer { o in
                // Both hold X*Y*Z >= 1 labels (LabelMap's invariant).
                copyGrid(canonicalView(of: Grid(contiguous: UnsafeMutablePointer(mutating: s.baseAddress!), size: inputSize)),
                         Grid(contiguous: o.baseAddress!, size: canonicalSize))
            }
        }
        return try LabelMap(size: canonicalSize, labels: out, affine: canonicalAffine)
    }

    /// Canonical-order labels back in the input's order, with `inputAffine`.
    public func invert(_ labels: LabelMap) throws -> LabelMap {
        try check(labels.size, canonicalSize, "label map")
        var out = [UInt8](repeating: 0, count: labels.labels.count)
        labels.labels.withUnsafeBufferPointer { s in
            out.withUnsafeMutableBufferPointer { o in
                copyGrid(Grid(contiguous: UnsafeMutablePointer(mutating: s.baseAddress!), size: canonicalSize),
                         canonicalView(of: Grid(contiguous: o.baseAddress!, size: inputSize)))
            }
        }
        return try LabelMap(size: inputSize, labels: out, affine: inputAffine)
    }
}

/// Eigenvalues and eigenvectors of a symmetric 3x3 matrix (row-major) by cyclic Jacobi rotations, in
/// Double: returns l and V (row-major, eigenvectors in columns) with A = V diag(l) V^T.
func symmetricEigen3(_ a: [Double]) -> ([Double], [Double]) {
    var m = a
    var v: [Double] = [1, 0, 0, 0, 1, 0, 0, 0, 1]
    for _ in 0..<64 {
        let off = m[1] * m[1] + m[2] * m[2] + m[5] * m[5]
        let scale = m[0] * m[0] + m[4] * m[4] + m[8] * m[8]
        if off <= 1e-32 * scale || off == 0 { break }
        for (p, q) in [(0, 1), (0, 2), (1, 2)] {
            let apq = m[p * 3 + q]
            if apq == 0 { continue }
            let app = m[p * 3 + p], aqq = m[q * 3 + q]
            // The rotation that zeroes A[p][q] (Golub & Van Loan, symmetric Schur decomposition).
            let tau = (aqq - app) / (2 * apq)
            let t = (tau >= 0 ? 1.0 : -1.0) / (abs(tau) + (1 + tau * tau).squareRoot())
            let c = 1 / (1 + t * t).squareRoot(), s = t * c
            // A = J^T A J with J the rotation in the (p, q) plane.
            for k in 0..<3 {
                let akp = m[k * 3 + p], akq = m[k * 3 + q]
                m[k * 3 + p] = c * akp - s * akq
                m[k * 3 + q] = s * akp + c * akq
            }
            for k in 0..<3 {
                let apk = m[p * 3 + k], aqk = m[q * 3 + k]
                m[p * 3 + k] = c * apk - s * aqk
                m[q * 3 + k] = s * apk + c * aqk
            }
            for k in 0..<3 {
                let vkp = v[k * 3 + p], vkq = v[k * 3 + q]
                v[k * 3 + p] = c * vkp - s * vkq
                v[k * 3 + q] = s * vkp + c * vkq
            }
        }
    }
    return ([m[0], m[4], m[8]], v)
}
