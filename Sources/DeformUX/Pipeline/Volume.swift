#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Volumes on a grid in world space: the pipeline's input (`Volume`, float32 images) and output
/// (`LabelMap`, uint8 labels), each with the 4x4 affine of its grid.
///
/// Axis order follows ARCHITECTURE.md section 8: a volume is indexed like nibabel's `img.get_fdata()`,
/// [x][y][z] in voxel space, C order (z fastest), with channels first: [c][x][y][z]. The affine maps a
/// voxel index (i, j, k, 1) to world millimetres, as the NIfTI file's sform/qform does.

/// A 4x4 affine, row-major, in Double: world = A * (i, j, k, 1). The bottom row is (0, 0, 0, 1).
public struct Affine: Equatable, Sendable, CustomStringConvertible {
    /// The 16 entries, row-major.
    public private(set) var values: [Double]

    /// From 12 (3x4, the bottom row implied) or 16 (4x4) row-major values. Throws on other counts,
    /// non-finite entries or a bottom row other than (0, 0, 0, 1).
    public init(_ values: [Double]) throws {
        var v = values
        if v.count == 12 { v += [0, 0, 0, 1] }
        guard v.count == 16 else {
            throw DeformUXError.invalidArgument("Affine", "wrong number of entries",
                                                expected: "12 (3x4) or 16 (4x4) row-major values", got: "\(values.count)")
        }
        guard v.allSatisfy({ $0.isFinite }) else {
            throw DeformUXError.invalidArgument("Affine", "non-finite entry", expected: "finite values", got: "\(values)")
        }
        guard v[12] == 0, v[13] == 0, v[14] == 0, v[15] == 1 else {
            throw DeformUXError.invalidArgument("Affine", "bad bottom row", expected: "(0, 0, 0, 1)",
                                                got: "(\(v[12]), \(v[13]), \(v[14]), \(v[15]))")
        }
        self.values = v
    }

    /// From rows (3 or 4 rows of 4 values).
    public init(rows: [[Double]]) throws {
        guard rows.count == 3 || rows.count == 4, rows.allSatisfy({ $0.count == 4 }) else {
            throw DeformUXError.invalidArgument("Affine", "wrong shape", expected: "3x4 or 4x4 rows",
                                                got: "\(rows.count) rows of \(rows.map(\.count)) values")
        }
        try self.init(rows.flatMap { $0 })
    }

    private init(unchecked values: [Double]) { self.values = values }

    public static let identity = Affine(unchecked: [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1])

    /// A diagonal affine: voxel sizes `spacing` (mm) and the world position of voxel (0, 0, 0).
    public init(spacing: SIMD3<Double>, origin: SIMD3<Double> = .zero) {
        self.init(unchecked: [spacing.x, 0, 0, origin.x, 0, spacing.y, 0, origin.y, 0, 0, spacing.z, origin.z, 0, 0, 0, 1])
    }

    /// Entry (row, column), both 0..<4 (internal: `values` is the checked public view).
    subscript(row: Int, column: Int) -> Double {
        values[row * 4 + column]
    }

    /// The product `a * b` (apply b first).
    public static func * (a: Affine, b: Affine) -> Affine {
        var m = [Double](repeating: 0, count: 16)
        for r in 0..<4 {
            for c in 0..<4 {
                var s = 0.0
                for k in 0..<4 { s += a.values[r * 4 + k] * b.values[k * 4 + c] }
                m[r * 4 + c] = s
            }
        }
        return Affine(unchecked: m)
    }

    /// Voxel sizes: the lengths of the first three columns (nibabel's `voxel_sizes(affine)`).
    public var spacing: SIMD3<Double> {
        var s = SIMD3<Double>()
        for c in 0..<3 {
            var n = 0.0
            for r in 0..<3 { n += values[r * 4 + c] * values[r * 4 + c] }
            s[c] = n.squareRoot()
        }
        return s
    }

    /// World coordinates of a (possibly fractional) voxel index.
    public func apply(_ voxel: SIMD3<Double>) -> SIMD3<Double> {
        var w = SIMD3<Double>()
        for r in 0..<3 {
            w[r] = values[r * 4] * voxel.x + values[r * 4 + 1] * voxel.y + values[r * 4 + 2] * voxel.z + values[r * 4 + 3]
        }
        return w
    }

    /// The largest absolute difference between corresponding entries.
    public func maxAbsDifference(_ other: Affine) -> Double {
        zip(values, other.values).reduce(0) { max($0, abs($1.0 - $1.1)) }
    }

    /// A voxel-space map: new index u goes to old index `m * u + t` (m a 3x3 row-major matrix).
    static func voxelMap(_ m: [Double], _ t: SIMD3<Double>) -> Affine {
        Affine(unchecked: [m[0], m[1], m[2], t.x, m[3], m[4], m[5], t.y, m[6], m[7], m[8], t.z, 0, 0, 0, 1])
    }

    public var description: String {
        (0..<4).map { r in "[" + (0..<4).map { c in "\(values[r * 4 + c])" }.joined(separator: ", ") + "]" }
            .joined(separator: ", ")
    }
}

/// "XxYxZ" for messages.
func sizeText(_ s: SIMD3<Int>) -> String { "\(s.x)x\(s.y)x\(s.z)" }

/// The number of voxels of a grid, checked for overflow (and for the 8-byte headroom the engine keeps).
func voxelCount(_ s: SIMD3<Int>, channels: Int = 1, operation: String) throws -> Int {
    try Tensor.elementCount([channels, s.x, s.y, s.z], context: operation)
}

/// A float32 image: channels x X x Y x Z, C order (channels first, z fastest), and its affine.
///
/// The data is a contiguous `Tensor` of shape [C, X, Y, Z]; it may borrow memory owned by the caller
/// (a NumPy array behind the C ABI), which must then stay alive while the volume is used. The pipeline
/// never writes into a volume it is given.
public struct Volume: @unchecked Sendable {
    /// [C, X, Y, Z], contiguous.
    public let data: Tensor
    public let affine: Affine

    public var channels: Int { data.shape[0] }
    /// (X, Y, Z).
    public var size: SIMD3<Int> { SIMD3(data.shape[1], data.shape[2], data.shape[3]) }
    /// Voxel sizes in mm (the affine's column lengths).
    public var spacing: SIMD3<Double> { affine.spacing }
    /// The first element; C x X x Y x Z floats.
    public var pointer: UnsafeMutablePointer<Float> { data.pointer }

    /// A volume over `data` ([C, X, Y, Z], contiguous, every size >= 1).
    public init(_ data: Tensor, affine: Affine = .identity) throws {
        guard data.rank == 4 else {
            throw DeformUXError.shapeMismatch("Volume", "wrong rank", expected: "[C, X, Y, Z] (rank 4)",
                                              got: "shape \(data.shape)")
        }
        guard data.shape.allSatisfy({ $0 >= 1 }) else {
            throw DeformUXError.shapeMismatch("Volume", "empty dimension", expected: "every size >= 1",
                                              got: "shape \(data.shape)")
        }
        try data.requireContiguous("Volume")
        self.data = data
        self.affine = affine
    }

    /// A volume holding a copy of `values` ([C][X][Y][Z], C order).
    public init(size: SIMD3<Int>, channels: Int = 1, values: [Float], affine: Affine = .identity) throws {
        try self.init(Tensor(shape: [channels, size.x, size.y, size.z], values: values), affine: affine)
    }

    /// A volume over memory owned by the caller (not copied).
    public init(borrowing pointer: UnsafeMutablePointer<Float>, size: SIMD3<Int>, channels: Int = 1,
                affine: Affine = .identity) throws {
        try self.init(Tensor(borrowing: pointer, shape: [channels, size.x, size.y, size.z]), affine: affine)
    }

    /// An uninitialised volume the pipeline fills.
    init(uninitialized size: SIMD3<Int>, channels: Int, affine: Affine) throws {
        try self.init(Tensor(uninitialized: [channels, size.x, size.y, size.z]), affine: affine)
    }

    /// The values, [C][X][Y][Z] in C order.
    public func values() -> [Float] { Array(UnsafeBufferPointer(start: data.pointer, count: data.count)) }

    /// Channel `c` as a grid view.
    func grid(channel c: Int) -> Grid<Float> {
        let s = size
        return Grid(base: data.pointer + c * s.x * s.y * s.z, size: s, strides: SIMD3(s.y * s.z, s.z, 1))
    }
}

/// A label map: uint8 labels [X][Y][Z] (C order) and the affine of its grid.
public struct LabelMap: Equatable, Sendable {
    public let size: SIMD3<Int>
    /// X * Y * Z labels, C order (z fastest).
    public var labels: [UInt8]
    public let affine: Affine

    public init(size: SIMD3<Int>, labels: [UInt8], affine: Affine = .identity) throws {
        guard size.x >= 1, size.y >= 1, size.z >= 1 else {
            throw DeformUXError.shapeMismatch("LabelMap", "empty dimension", expected: "every size >= 1",
                                              got: sizeText(size))
        }
        let n = try voxelCount(size, operation: "LabelMap")
        guard labels.count == n else {
            throw DeformUXError.shapeMismatch("LabelMap", "wrong number of labels", expected: "\(n) (\(sizeText(size)))",
                                              got: "\(labels.count)")
        }
        self.size = size
        self.labels = labels
        self.affine = affine
    }

    /// The label at (x, y, z), each within `size` (internal: `labels` is the public view).
    subscript(x: Int, y: Int, z: Int) -> UInt8 {
        labels[(x * size.y + y) * size.z + z]
    }
}

/// A 3-D grid of `T` seen through element strides (possibly negative) from `base`: how the pipeline
/// reads a reoriented volume without copying it, and writes into a sub-box of a padded buffer.
struct Grid<T> {
    var base: UnsafeMutablePointer<T>
    var size: SIMD3<Int>
    var strides: SIMD3<Int>

    init(base: UnsafeMutablePointer<T>, size: SIMD3<Int>, strides: SIMD3<Int>) {
        self.base = base
        self.size = size
        self.strides = strides
    }

    /// A C-order grid (z fastest) over `base`.
    init(contiguous base: UnsafeMutablePointer<T>, size: SIMD3<Int>) {
        self.init(base: base, size: size, strides: SIMD3(size.y * size.z, size.z, 1))
    }

    @inline(__always) func offset(_ x: Int, _ y: Int, _ z: Int) -> Int {
        x * strides.x + y * strides.y + z * strides.z
    }

    /// The sub-box starting at `origin` with `size`.
    func box(origin: SIMD3<Int>, size: SIMD3<Int>) -> Grid<T> {
        Grid(base: base + offset(origin.x, origin.y, origin.z), size: size, strides: strides)
    }
}

/// Copies `src` into `dst` (same size), in parallel over x-planes.
func copyGrid<T>(_ src: Grid<T>, _ dst: Grid<T>) {
    let s = src.size
    let parts = min(Threads.count, s.x)
    parallelFor(parts) { part in
        for x in Threads.range(part, of: parts, total: s.x) {
            for y in 0..<s.y {
                let from = src.base + src.offset(x, y, 0)
                let to = dst.base + dst.offset(x, y, 0)
                if src.strides.z == 1 && dst.strides.z == 1 {
                    to.update(from: from, count: s.z)
                } else {
                    for z in 0..<s.z { to[z * dst.strides.z] = from[z * src.strides.z] }
                }
            }
        }
    }
}

/// A monotonic clock in seconds, for the statistics.
func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}
