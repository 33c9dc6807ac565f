// The NIfTI-1 and NIfTI-2 headers (https://nifti.nimh.nih.gov/nifti-1, nifti2.h), parsed into one Swift
// struct, and the three affines a header defines, computed exactly as nibabel 5 does:
//
//   sform   the srow_x/y/z rows                                   (Nifti1Header.get_sform)
//   qform   quaternion b, c, d (a >= 0 from the unit norm), pixdim (qfac = pixdim[0]), qoffset
//                                                                 (get_qform, quaternions.fillpositive/quat2mat)
//   base    the Analyze fallback: diag(-pixdim1, pixdim2, pixdim3), centred on the grid
//                                                                 (AnalyzeHeader.get_base_affine)
//   best    sform if sform_code != 0, else qform if qform_code != 0, else base  (get_best_affine)
//
// nibabel runs check_fix on every header it reads; the fields here are the fixed ones (the raw bytes are
// kept in `raw`): pixdim[1...3] of 0 become 1 and negative ones their absolute value, a qfac other than
// -1 or 1 becomes 1, and sform/qform codes outside 0...5 become 0. The quaternion is evaluated in
// extended precision (Float80 on x86-64), as nibabel evaluates it in numpy's longdouble.
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The voxel types the engine reads and writes, by their NIfTI datatype codes. Complex, RGB, RGBA,
/// binary and float128 data are not supported.
public enum NIfTIDataType: Int, Sendable, CaseIterable, CustomStringConvertible {
    case uint8 = 2
    case int16 = 4
    case int32 = 8
    case float32 = 16
    case float64 = 64
    case int8 = 256
    case uint16 = 512
    case uint32 = 768
    case int64 = 1024
    case uint64 = 1280

    /// Bytes per voxel.
    public var size: Int {
        switch self {
        case .uint8, .int8: return 1
        case .int16, .uint16: return 2
        case .int32, .uint32, .float32: return 4
        case .int64, .uint64, .float64: return 8
        }
    }

    public var isInteger: Bool { self != .float32 && self != .float64 }

    /// numpy's name of the type ("uint8", "float32", ...).
    public var description: String {
        switch self {
        case .uint8: return "uint8"
        case .int16: return "int16"
        case .int32: return "int32"
        case .float32: return "float32"
        case .float64: return "float64"
        case .int8: return "int8"
        case .uint16: return "uint16"
        case .uint32: return "uint32"
        case .int64: return "int64"
        case .uint64: return "uint64"
        }
    }

    /// The names of NIfTI codes this reader rejects, for error messages.
    static func unsupportedName(_ code: Int) -> String? {
        switch code {
        case 0: return "unknown (0)"
        case 1: return "binary (1)"
        case 32: return "complex64 (32)"
        case 128: return "RGB24 (128)"
        case 1536: return "float128 (1536)"
        case 1792: return "complex128 (1792)"
        case 2048: return "complex256 (2048)"
        case 2304: return "RGBA32 (2304)"
        default: return nil
        }
    }
}

/// A 4 x 4 affine (voxel indices i, j, k -> world millimetres x, y, z), row-major.
public struct NIfTIAffine: Equatable, Sendable, CustomStringConvertible {
    /// The 16 entries, row-major; the last row is normally 0 0 0 1.
    public private(set) var values: [Double]

    public static let identity = NIfTIAffine(unchecked: [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1])

    /// From 16 row-major values.
    public init(rowMajor values: [Double]) throws {
        guard values.count == 16 else {
            throw DeformUXError.invalidArgument("NIfTIAffine", "an affine has 16 values (4 x 4, row-major)", got: "\(values.count)")
        }
        self.values = values
    }

    /// From four rows of four values.
    public init(rows: [[Double]]) throws {
        guard rows.count == 4, rows.allSatisfy({ $0.count == 4 }) else {
            throw DeformUXError.invalidArgument("NIfTIAffine", "an affine is 4 rows of 4 values", got: "\(rows.map(\.count))")
        }
        values = rows.flatMap { $0 }
    }

    init(unchecked values: [Double]) { self.values = values }

    public subscript(row: Int, column: Int) -> Double {
        get { values[4 * row + column] }
        set { values[4 * row + column] = newValue }
    }

    public var rows: [[Double]] { (0..<4).map { Array(values[(4 * $0)..<(4 * $0 + 4)]) } }

    /// The voxel sizes along i, j, k: the lengths of the first three columns (what resampling needs,
    /// whatever pixdim says).
    public var spacing: [Double] {
        (0..<3).map { c in (0..<3).reduce(0.0) { $0 + self[$1, c] * self[$1, c] }.squareRoot() }
    }

    public var isFinite: Bool { values.allSatisfy(\.isFinite) }

    /// nibabel's np.allclose(a, b): |a - b| <= 1e-8 + 1e-5 |b| everywhere.
    public func isClose(to other: NIfTIAffine) -> Bool {
        zip(values, other.values).allSatisfy { abs($0 - $1) <= 1e-8 + 1e-5 * abs($1) }
    }

    public var description: String {
        rows.map { "[" + $0.map { "\($0)" }.joined(separator: ", ") + "]" }.joined(separator: "\n")
    }
}

/// A header extension: its code (NIFTI_ECODE_*) and its content, kept byte for byte (trailing padding
/// included) so that a writer can carry it over.
public struct NIfTIExtension: Equatable, Sendable {
    public var code: Int
    public var content: [UInt8]

    public init(code: Int, content: [UInt8]) {
        self.code = code
        self.content = content
    }

    /// Bytes on disk: esize and ecode, the content, NUL-padded to a multiple of 16.
    public var sizeOnDisk: Int { (8 + content.count + 15) / 16 * 16 }
}

/// Where a header's best affine comes from.
public enum NIfTIAffineSource: Int, Sendable {
    /// Neither code is set: nibabel's Analyze-style fallback from pixdim (centred, x flipped).
    case pixdim = 0
    case qform = 1
    case sform = 2
}

/// A NIfTI-1 or NIfTI-2 header with its extensions. Values are widened to Int and Double whatever the
/// version stores. The fields are those nibabel reports after its check_fix (see the file comment);
/// `raw` keeps the header bytes as they were in the file. The array fields keep their lengths (dim and
/// pixdim 8, srow 12, the others 3): an assignment of another length is padded or cut.
public struct NIfTIHeader: Equatable, Sendable {
    /// 1 or 2 as read; files are always written as NIfTI-1.
    public var version: Int = 1
    /// The byte order of the file it was read from.
    public var isBigEndian = false
    /// dim[0] (the rank, 1...5 for files this reader accepts) and dim[1...7].
    public var dim: [Int] = [3, 1, 1, 1, 1, 1, 1, 1] { didSet { dim = fixedLength(dim, 8, 1) } }
    public var datatype: NIfTIDataType = .float32
    /// As in the file (nibabel ignores a bitpix that disagrees with the datatype, and so does this reader).
    public var bitpix: Int = 32
    /// pixdim[0] is qfac (-1 or 1), pixdim[1...] the voxel sizes (and time step) in xyzt_units.
    public var pixdim: [Double] = [1, 1, 1, 1, 1, 1, 1, 1] { didSet { pixdim = fixedLength(pixdim, 8, 1) } }
    /// Byte offset of the voxel data in the file.
    public var voxOffset: Int = 352
    public var sclSlope: Double = 1
    public var sclInter: Double = 0
    public var calMax: Double = 0
    public var calMin: Double = 0
    public var sliceDuration: Double = 0
    public var toffset: Double = 0
    public var sliceStart: Int = 0
    public var sliceEnd: Int = 0
    public var sliceCode: Int = 0
    public var xyztUnits: Int = 0
    public var dimInfo: Int = 0
    public var intentCode: Int = 0
    /// intent_p1, intent_p2, intent_p3.
    public var intentParameters: [Double] = [0, 0, 0] { didSet { intentParameters = fixedLength(intentParameters, 3, 0) } }
    public var intentName = ""
    public var descrip = ""
    public var auxFile = ""
    public var qformCode: Int = 0
    public var sformCode: Int = 0
    /// quatern_b, quatern_c, quatern_d.
    public var quaternion: [Double] = [0, 0, 0] { didSet { quaternion = fixedLength(quaternion, 3, 0) } }
    /// qoffset_x, qoffset_y, qoffset_z.
    public var qoffset: [Double] = [0, 0, 0] { didSet { qoffset = fixedLength(qoffset, 3, 0) } }
    /// srow_x, srow_y, srow_z: 12 values, row-major.
    public var srow: [Double] = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0] { didSet { srow = fixedLength(srow, 12, 0) } }
    public var extensions: [NIfTIExtension] = []
    /// The header bytes as read (348 or 540, in the file's byte order); empty for a header made in memory.
    public var raw: [UInt8] = []

    /// A NIfTI-1 header of a 1 x 1 x 1 float32 volume with the identity affine, for building from scratch.
    public init() {}

    /// The data shape as nibabel reports it: dim[1...dim[0]].
    public var shape: [Int] { Array(dim[1...max(1, min(7, dim[0]))]) }

    /// nibabel's get_zooms(): pixdim[1...dim[0]].
    public var zooms: [Double] { Array(pixdim[1...max(1, min(7, dim[0]))]) }

    /// The x, y, z sizes (rank 1 and 2 padded with 1).
    public var spatialShape: [Int] { (1...3).map { $0 <= dim[0] ? dim[$0] : 1 } }

    /// The number of 3-D volumes (the product of dim[4...dim[0]]; 1 for rank <= 3).
    public var volumeCount: Int { dim[0] <= 3 ? 1 : (4...min(dim[0], 7)).reduce(1) { $0 &* dim[$1] } }

    /// The (slope, intercept) nibabel applies, or nil when the data is used as stored: slope 0 or not
    /// finite means "no scaling" (NIfTI-1 section on scl_slope), and so does (1, 0).
    public var scaling: (slope: Double, intercept: Double)? {
        guard sclSlope != 0, sclSlope.isFinite else { return nil }
        if sclSlope == 1 && sclInter == 0 { return nil }
        return (sclSlope, sclInter)
    }

    // MARK: affines

    /// The sform rows with 0 0 0 1 below (whatever sform_code says).
    public var sform: NIfTIAffine { NIfTIAffine(unchecked: srow + [0, 0, 0, 1]) }

    /// The qform (whatever qform_code says), or nil when quaternion b, c, d has a norm above 1 (beyond
    /// rounding), which nibabel rejects.
    public var qform: NIfTIAffine? { try? qformAffine() }

    /// nibabel's fallback affine (AnalyzeHeader.get_base_affine): diag(-pixdim[1], pixdim[2], pixdim[3])
    /// with the grid centre at the origin.
    public var baseAffine: NIfTIAffine {
        let rank = max(1, min(7, dim[0]))
        var m = [Double](repeating: 0, count: 16)
        for a in 0..<3 {
            let n = a < rank ? Double(dim[a + 1]) : 1
            var zoom = a < rank ? pixdim[a + 1] : 1
            if a == 0 { zoom = -zoom }
            let origin = (n - 1) / 2.0
            m[5 * a] = zoom
            m[4 * a + 3] = -origin * zoom
        }
        m[15] = 1
        return NIfTIAffine(unchecked: m)
    }

    /// Which affine `affine` is: sform if sform_code != 0, else qform if qform_code != 0, else pixdim.
    public var affineSource: NIfTIAffineSource {
        if sformCode != 0 { return .sform }
        if qformCode != 0 { return .qform }
        return .pixdim
    }

    /// The best affine, nibabel's get_best_affine() (and img.affine). A header read from a file whose
    /// chosen qform is invalid was rejected; for one edited since, an invalid qform falls back to pixdim.
    public var affine: NIfTIAffine {
        switch affineSource {
        case .sform: return sform
        case .qform: return qform ?? baseAffine
        case .pixdim: return baseAffine
        }
    }

    /// The voxel sizes along i, j, k from the best affine.
    public var spacing: [Double] { affine.spacing }

    /// quatern_b/c/d -> rotation (nibabel's fillpositive + quat2mat), times diag(pixdim[1], pixdim[2],
    /// qfac * pixdim[3]), plus qoffset.
    func qformAffine() throws -> NIfTIAffine {
        #if arch(x86_64) || arch(i386)
        typealias Wide = Float80  // numpy's longdouble on x86
        #else
        typealias Wide = Double
        #endif
        let b = Wide(quaternion[0]), c = Wide(quaternion[1]), d = Wide(quaternion[2])
        var dot: Wide = 0
        dot += b * b
        dot += c * c
        dot += d * d
        let w2 = 1 - dot
        // nibabel's quaternion_threshold: 3 eps of the header's float type.
        let threshold = version == 1 ? Wide(3 * Float.ulpOfOne) : Wide(3 * Double.ulpOfOne)
        let a: Wide
        if abs(w2) < threshold {
            a = 0
        } else if w2 < 0 || w2.isNaN {
            throw DeformUXError.io("nifti read", "qform quaternion (b, c, d) = (\(quaternion[0]), \(quaternion[1]), \(quaternion[2])) has b^2 + c^2 + d^2 = \(Double(dot)) > 1")
        } else {
            a = w2.squareRoot()
        }
        // quat2mat
        var rotation: [Wide] = [1, 0, 0, 0, 1, 0, 0, 0, 1]
        let nq = a * a + b * b + c * c + d * d
        if !(nq < Wide(Double.ulpOfOne)) {
            let s = 2.0 / nq
            let X = b * s, Y = c * s, Z = d * s
            let wX = a * X, wY = a * Y, wZ = a * Z
            let xX = b * X, xY = b * Y, xZ = b * Z
            let yY = c * Y, yZ = c * Z, zZ = d * Z
            rotation = [1.0 - (yY + zZ), xY - wZ, xZ + wY,
                        xY + wZ, 1.0 - (xX + zZ), yZ - wX,
                        xZ - wY, yZ + wX, 1.0 - (xX + yY)]
        }
        let qfac: Double = pixdim[0] == -1 ? -1 : 1
        let vox: [Wide] = [Wide(pixdim[1]), Wide(pixdim[2]), Wide(pixdim[3] * qfac)]
        var m = [Double](repeating: 0, count: 16)
        for i in 0..<3 {
            for j in 0..<3 {
                // np.dot(R, diag(vox)): a sum over k from 0, in order, as numpy's longdouble dot does.
                var sum: Wide = 0
                for k in 0..<3 { sum += rotation[3 * i + k] * (k == j ? vox[j] : 0) }
                m[4 * i + j] = Double(sum)
            }
            m[4 * i + 3] = qoffset[i]
        }
        m[15] = 1
        return NIfTIAffine(unchecked: m)
    }

    /// Sets the qform from `affine` as nibabel's set_qform does: pixdim[1...3] = the column lengths,
    /// qfac = the sign of the determinant, the rotation = the nearest orthogonal matrix (shears are
    /// dropped), as a quaternion with a >= 0. The affine must be finite with a non-singular 3 x 3 part.
    mutating func setQform(_ affine: NIfTIAffine, code: Int) throws {
        let op = "nifti write"
        guard affine.isFinite else { throw DeformUXError.invalidArgument(op, "the affine has non-finite values", got: "\n\(affine)") }
        let zooms = affine.spacing
        guard zooms.allSatisfy({ $0 > 0 }) else {
            throw DeformUXError.invalidArgument(op, "the affine's first three columns must be non-zero (voxel sizes)", got: "column lengths \(zooms)")
        }
        var r = [Double](repeating: 0, count: 9)
        for i in 0..<3 { for j in 0..<3 { r[3 * i + j] = affine[i, j] / zooms[j] } }
        let qfac: Double
        if determinant3(r) > 0 {
            qfac = 1
        } else {
            qfac = -1
            for i in 0..<3 { r[3 * i + 2] = -r[3 * i + 2] }
        }
        guard let rotation = orthogonalPolarFactor(r) else {
            throw DeformUXError.invalidArgument(op, "the affine's 3 x 3 part is singular", got: "\n\(affine)")
        }
        let q = unitQuaternion(of: rotation)
        quaternion = [q.1, q.2, q.3]
        qoffset = [affine[0, 3], affine[1, 3], affine[2, 3]]
        pixdim[0] = qfac
        pixdim[1] = zooms[0]
        pixdim[2] = zooms[1]
        pixdim[3] = zooms[2]
        qformCode = code
    }

    /// Sets srow from `affine`'s first three rows.
    mutating func setSform(_ affine: NIfTIAffine, code: Int) {
        srow = Array(affine.values[0..<12])
        sformCode = code
    }
}

// MARK: parsing

extension NIfTIHeader {
    /// The two header sizes; sizeof_hdr (the first 4 bytes) tells which, and the byte order.
    static let size1 = 348
    static let size2 = 540

    /// Reads sizeof_hdr from the first 4 bytes: (version, big-endian), or nil if neither 348 nor 540
    /// in either byte order.
    static func sniff(_ bytes: UnsafeRawBufferPointer) -> (version: Int, bigEndian: Bool)? {
        guard bytes.count >= 4 else { return nil }
        let le = Int32(littleEndian: bytes.loadUnaligned(fromByteOffset: 0, as: Int32.self))
        let be = Int32(bigEndian: bytes.loadUnaligned(fromByteOffset: 0, as: Int32.self))
        if le == Int32(size1) { return (1, false) }
        if be == Int32(size1) { return (1, true) }
        if le == Int32(size2) { return (2, false) }
        if be == Int32(size2) { return (2, true) }
        return nil
    }

    /// Parses and checks a header from the start of `bytes` (which holds at least 348 or 540 bytes as
    /// sniffed; the caller checked). Extensions are not parsed here (they need the file size).
    /// Errors are .io naming `path`.
    static func parse(_ bytes: UnsafeRawBufferPointer, path: String) throws -> NIfTIHeader {
        let op = "nifti read"
        func fail(_ message: String, expected: String? = nil, got: String? = nil) -> DeformUXError {
            DeformUXError.io(op, message, path: path, expected: expected, got: got)
        }
        guard let (version, bigEndian) = sniff(bytes) else {
            let got = bytes.count >= 4 ? "\(Int32(littleEndian: bytes.loadUnaligned(as: Int32.self)))" : "\(bytes.count) bytes"
            throw fail("sizeof_hdr (the first 4 bytes) is not a NIfTI header size: not a NIfTI file",
                       expected: "348 (NIfTI-1) or 540 (NIfTI-2) in either byte order", got: got)
        }
        let r = FieldReader(bytes: bytes, bigEndian: bigEndian)
        var h = NIfTIHeader()
        var datatypeCode = 0
        h.version = version
        h.isBigEndian = bigEndian
        h.raw = Array(bytes[0..<(version == 1 ? size1 : size2)])
        if version == 1 {
            let magic = Array(bytes[344..<348])
            if magic == Array("ni1\0".utf8) {
                throw fail("this is the header of a two-file NIfTI pair (.hdr/.img); only single-file .nii/.nii.gz is supported")
            }
            guard magic == Array("n+1\0".utf8) else {
                throw fail("the magic string is not that of a single-file NIfTI-1", expected: "\"n+1\\0\"", got: quoted(magic))
            }
            h.dim = (0..<8).map { Int(r.int16(40 + 2 * $0)) }
            h.intentParameters = [Double(r.float32(56)), Double(r.float32(60)), Double(r.float32(64))]
            h.intentCode = Int(r.int16(68))
            h.bitpix = Int(r.int16(72))
            h.sliceStart = Int(r.int16(74))
            h.pixdim = (0..<8).map { Double(r.float32(76 + 4 * $0)) }
            let offset = r.float32(108)
            guard offset.isFinite, offset >= 0, offset < 0x1p62 else {
                throw fail("vox_offset is not a usable byte offset", expected: "a finite offset >= 352", got: "\(offset)")
            }
            h.voxOffset = Int(offset)  // int(vox_offset), as nibabel's get_data_offset
            h.sclSlope = Double(r.float32(112))
            h.sclInter = Double(r.float32(116))
            h.sliceEnd = Int(r.int16(120))
            h.sliceCode = Int(bytes[122])
            h.xyztUnits = Int(bytes[123])
            h.calMax = Double(r.float32(124))
            h.calMin = Double(r.float32(128))
            h.sliceDuration = Double(r.float32(132))
            h.toffset = Double(r.float32(136))
            h.descrip = text(bytes[148..<228])
            h.auxFile = text(bytes[228..<252])
            h.qformCode = Int(r.int16(252))
            h.sformCode = Int(r.int16(254))
            h.quaternion = (0..<3).map { Double(r.float32(256 + 4 * $0)) }
            h.qoffset = (0..<3).map { Double(r.float32(268 + 4 * $0)) }
            h.srow = (0..<12).map { Double(r.float32(280 + 4 * $0)) }
            h.intentName = text(bytes[328..<344])
            h.dimInfo = Int(bytes[39])
            datatypeCode = Int(r.int16(70))
        } else {
            let magic = Array(bytes[4..<12])
            if Array(magic[0..<4]) == Array("ni2\0".utf8) {
                throw fail("this is the header of a two-file NIfTI-2 pair (.hdr/.img); only single-file .nii/.nii.gz is supported")
            }
            guard Array(magic[0..<4]) == Array("n+2\0".utf8) else {
                throw fail("the magic string is not that of a single-file NIfTI-2", expected: "\"n+2\\0\"", got: quoted(Array(magic[0..<4])))
            }
            // nibabel accepts the EOL check bytes \r\n\032\n or all zero (and rejects anything else, which
            // means the file went through a text-mode conversion).
            let eol = Array(magic[4..<8])
            guard eol == [13, 10, 26, 10] || eol == [0, 0, 0, 0] else {
                throw fail("the NIfTI-2 end-of-line check bytes are damaged (the file went through a text-mode conversion?)",
                           expected: "0D 0A 1A 0A", got: eol.map { String($0, radix: 16) }.joined(separator: " "))
            }
            datatypeCode = Int(r.int16(12))
            h.bitpix = Int(r.int16(14))
            h.dim = (0..<8).map { clampToInt(r.int64(16 + 8 * $0)) }
            h.intentParameters = [r.float64(80), r.float64(88), r.float64(96)]
            h.pixdim = (0..<8).map { r.float64(104 + 8 * $0) }
            let offset = r.int64(168)
            guard offset >= 0 else {
                throw fail("vox_offset is negative", expected: "an offset >= 544", got: "\(offset)")
            }
            h.voxOffset = Int(offset)
            h.sclSlope = r.float64(176)
            h.sclInter = r.float64(184)
            h.calMax = r.float64(192)
            h.calMin = r.float64(200)
            h.sliceDuration = r.float64(208)
            h.toffset = r.float64(216)
            h.sliceStart = clampToInt(r.int64(224))
            h.sliceEnd = clampToInt(r.int64(232))
            h.descrip = text(bytes[240..<320])
            h.auxFile = text(bytes[320..<344])
            h.qformCode = Int(r.int32(344))
            h.sformCode = Int(r.int32(348))
            h.quaternion = (0..<3).map { r.float64(352 + 8 * $0) }
            h.qoffset = (0..<3).map { r.float64(376 + 8 * $0) }
            h.srow = (0..<12).map { r.float64(400 + 8 * $0) }
            h.sliceCode = Int(r.int32(496))
            h.xyztUnits = Int(r.int32(500))
            h.intentCode = Int(r.int32(504))
            h.intentName = text(bytes[508..<524])
            h.dimInfo = Int(bytes[524])
        }
        let minimumOffset = version == 1 ? 352 : 544
        guard h.voxOffset >= minimumOffset else {
            throw fail("vox_offset is inside the header (a single-file NIfTI-\(version)'s data starts after the header and its 4 extension bytes)",
                       expected: ">= \(minimumOffset)", got: "\(h.voxOffset)")
        }

        // Rank and sizes.
        let rank = h.dim[0]
        guard (1...7).contains(rank) else {
            throw fail("dim[0] (the number of dimensions) is out of range", expected: "1...7", got: "\(rank)")
        }
        guard rank <= 5 else {
            throw fail("\(rank)-dimensional data is not supported (x, y, z plus at most two more axes, t and u)",
                       expected: "dim[0] <= 5", got: "\(rank), shape \(h.shape)")
        }
        guard h.shape.allSatisfy({ $0 >= 1 }) else {
            throw fail("every dimension must be at least 1", got: "shape \(h.shape)")
        }

        // Voxel type.
        guard let type = NIfTIDataType(rawValue: datatypeCode) else {
            let known = NIfTIDataType.allCases.map { "\($0) (\($0.rawValue))" }.joined(separator: ", ")
            if let name = NIfTIDataType.unsupportedName(datatypeCode) {
                throw fail("datatype \(name) is not supported", expected: "one of \(known)", got: "\(datatypeCode)")
            }
            throw fail("datatype \(datatypeCode) is not a NIfTI data type", expected: "one of \(known)", got: "\(datatypeCode)")
        }
        h.datatype = type

        // Scaling: a valid slope with an infinite or NaN intercept is an error in nibabel too.
        if h.sclSlope != 0, h.sclSlope.isFinite, !h.sclInter.isFinite {
            throw fail("scl_slope \(h.sclSlope) is valid but scl_inter is not finite", got: "scl_inter \(h.sclInter)")
        }

        // nibabel's check_fix.
        for a in 1...3 {
            if h.pixdim[a] == 0 { h.pixdim[a] = 1 }
            if h.pixdim[a] < 0 { h.pixdim[a] = -h.pixdim[a] }
        }
        if h.pixdim[0] != 1 && h.pixdim[0] != -1 { h.pixdim[0] = 1 }
        if !(0...5).contains(h.qformCode) { h.qformCode = 0 }
        if !(0...5).contains(h.sformCode) { h.sformCode = 0 }

        // The chosen affine must exist (nibabel's load fails the same way).
        if h.affineSource == .qform {
            do { _ = try h.qformAffine() } catch let e as DeformUXError {
                throw fail(e.message + " and qform_code is \(h.qformCode) with sform_code 0, so the qform is the affine")
            }
        }
        guard h.affine.isFinite else {
            let name = ["pixdim (no sform or qform code)", "qform", "sform"][h.affineSource.rawValue]
            throw fail("the affine from the \(name) has non-finite values", got: "\n\(h.affine)")
        }
        return h
    }

}

/// Reads fixed-offset fields of a header in its byte order. Offsets are constants inside the header
/// size, which the caller has checked is present.
private struct FieldReader {
    let bytes: UnsafeRawBufferPointer
    let bigEndian: Bool

    func int16(_ o: Int) -> Int16 {
        let v = bytes.loadUnaligned(fromByteOffset: o, as: Int16.self)
        return bigEndian ? Int16(bigEndian: v) : Int16(littleEndian: v)
    }
    func int32(_ o: Int) -> Int32 {
        let v = bytes.loadUnaligned(fromByteOffset: o, as: Int32.self)
        return bigEndian ? Int32(bigEndian: v) : Int32(littleEndian: v)
    }
    func int64(_ o: Int) -> Int64 {
        let v = bytes.loadUnaligned(fromByteOffset: o, as: Int64.self)
        return bigEndian ? Int64(bigEndian: v) : Int64(littleEndian: v)
    }
    func float32(_ o: Int) -> Float {
        let v = bytes.loadUnaligned(fromByteOffset: o, as: UInt32.self)
        return Float(bitPattern: bigEndian ? UInt32(bigEndian: v) : UInt32(littleEndian: v))
    }
    func float64(_ o: Int) -> Double {
        let v = bytes.loadUnaligned(fromByteOffset: o, as: UInt64.self)
        return Double(bitPattern: bigEndian ? UInt64(bigEndian: v) : UInt64(littleEndian: v))
    }
}

/// A char[] field: the bytes before the first NUL, as UTF-8 (invalid sequences replaced).
private func text(_ bytes: Slice<UnsafeRawBufferPointer>) -> String {
    let end = bytes.firstIndex(of: 0) ?? bytes.endIndex
    return String(decoding: bytes[bytes.startIndex..<end], as: UTF8.self)
}

/// Bytes shown as a quoted string with escapes, for messages.
private func quoted(_ bytes: [UInt8]) -> String {
    "\"" + bytes.map { (32..<127).contains($0) && $0 != 34 && $0 != 92 ? String(UnicodeScalar($0)) : "\\x" + String($0, radix: 16) }.joined() + "\""
}

/// `values` cut or padded with `fill` to `count` (the header's fixed-size array fields).
private func fixedLength<T>(_ values: [T], _ count: Int, _ fill: T) -> [T] {
    values.count == count ? values : Array(values.prefix(count)) + [T](repeating: fill, count: max(0, count - values.count))
}

/// Int64 -> Int (identical on 64-bit platforms, clamped elsewhere).
private func clampToInt(_ v: Int64) -> Int { Int(clamping: v) }

private func determinant3(_ m: [Double]) -> Double {
    m[0] * (m[4] * m[8] - m[5] * m[7]) - m[1] * (m[3] * m[8] - m[5] * m[6]) + m[2] * (m[3] * m[7] - m[4] * m[6])
}

/// The orthogonal factor of the polar decomposition of the 3 x 3 matrix `m` (row-major): the orthogonal
/// matrix nearest to m, which nibabel computes as P Q from the SVD m = P S Q. Newton's iteration
/// X <- (X + X^-T) / 2 converges to it quadratically for any non-singular m. nil if m is singular.
func orthogonalPolarFactor(_ m: [Double]) -> [Double]? {
    var x = m
    for _ in 0..<100 {
        let det = determinant3(x)
        guard det.isFinite, abs(det) > 1e-300 else { return nil }
        // X^-T = cofactor(X) / det
        let cof: [Double] = [
            x[4] * x[8] - x[5] * x[7], x[5] * x[6] - x[3] * x[8], x[3] * x[7] - x[4] * x[6],
            x[2] * x[7] - x[1] * x[8], x[0] * x[8] - x[2] * x[6], x[1] * x[6] - x[0] * x[7],
            x[1] * x[5] - x[2] * x[4], x[2] * x[3] - x[0] * x[5], x[0] * x[4] - x[1] * x[3],
        ]
        var next = [Double](repeating: 0, count: 9)
        var change = 0.0
        for i in 0..<9 {
            next[i] = 0.5 * (x[i] + cof[i] / det)
            change = max(change, abs(next[i] - x[i]))
        }
        x = next
        if change < 1e-15 { return x }
    }
    return x
}

/// The unit quaternion (a, b, c, d) with a >= 0 of the rotation matrix `m` (row-major), by Shepperd's
/// method: the largest of 4a^2, 4b^2, 4c^2, 4d^2 is taken from the diagonal, the rest from sums and
/// differences of off-diagonal pairs. Same convention as nibabel's quat2mat.
func unitQuaternion(of m: [Double]) -> (Double, Double, Double, Double) {
    let trace = m[0] + m[4] + m[8]
    var q: (Double, Double, Double, Double)
    if trace > 0 {
        let s = (trace + 1).squareRoot() * 2  // 4a
        q = (s / 4, (m[7] - m[5]) / s, (m[2] - m[6]) / s, (m[3] - m[1]) / s)
    } else if m[0] > m[4] && m[0] > m[8] {
        let s = (1 + m[0] - m[4] - m[8]).squareRoot() * 2  // 4b
        q = ((m[7] - m[5]) / s, s / 4, (m[1] + m[3]) / s, (m[2] + m[6]) / s)
    } else if m[4] > m[8] {
        let s = (1 + m[4] - m[0] - m[8]).squareRoot() * 2  // 4c
        q = ((m[2] - m[6]) / s, (m[1] + m[3]) / s, s / 4, (m[5] + m[7]) / s)
    } else {
        let s = (1 + m[8] - m[0] - m[4]).squareRoot() * 2  // 4d
        q = ((m[3] - m[1]) / s, (m[2] + m[6]) / s, (m[5] + m[7]) / s, s / 4)
    }
    if q.0 < 0 { q = (-q.0, -q.1, -q.2, -q.3) }
    return q
}

// MARK: writing

extension NIfTIHeader {
    /// The 348 bytes of this header as little-endian NIfTI-1, then the 4 extension flag bytes and the
    /// extensions. Fields NIfTI-1 cannot hold (a NIfTI-2 template's 64-bit values) are rejected when
    /// they are sizes and written as 0 otherwise; floats are rounded to float32.
    /// `legacy`: a NIfTI-1 header whose unused Analyze fields are carried over.
    func nifti1Bytes(what: String, path: String, legacy: NIfTIHeader? = nil) throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: NIfTIHeader.size1 + 4)
        func put<T: FixedWidthInteger>(_ v: T, _ o: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (i, x) in $0.enumerated() { b[o + i] = x } }
        }
        func i16(_ v: Int, _ o: Int) { put(Int16(exactly: v) ?? 0, o) }
        func f32(_ v: Double, _ o: Int) { put(Float(v).bitPattern, o) }
        func chars(_ s: String, _ o: Int, _ n: Int) {
            // At most n - 1 bytes (a NUL always ends the field), cut at a character boundary.
            var bytes: [UInt8] = []
            for ch in s.unicodeScalars {
                let utf8 = Array(String(ch).utf8)
                if bytes.count + utf8.count > n - 1 { break }
                bytes += utf8
            }
            for (i, x) in bytes.enumerated() { b[o + i] = x }
        }
        put(Int32(NIfTIHeader.size1), 0)
        if let legacy, legacy.version == 1, legacy.raw.count == NIfTIHeader.size1 {
            let raw = legacy.raw
            // The Analyze fields NIfTI-1 keeps unused (data_type, db_name, extents, session_error,
            // regular, glmax, glmin), carried over from a NIfTI-1 template as nibabel carries them.
            for i in 4..<32 { b[i] = raw[i] }
            b[38] = raw[38]
            raw.withUnsafeBytes { r in
                let reader = FieldReader(bytes: r, bigEndian: legacy.isBigEndian)
                put(reader.int32(32), 32)
                put(reader.int16(36), 36)
                put(reader.int32(140), 140)
                put(reader.int32(144), 144)
            }
        }
        b[39] = UInt8(truncatingIfNeeded: dimInfo)
        for i in 0..<8 {
            guard let d = Int16(exactly: dim[i]) else {
                throw DeformUXError.invalidArgument(what, "NIfTI-1 holds dimensions up to 32767", got: "dim \(dim)")
            }
            put(d, 40 + 2 * i)
        }
        for i in 0..<3 { f32(intentParameters[i], 56 + 4 * i) }
        i16(intentCode, 68)
        put(Int16(datatype.rawValue), 70)
        put(Int16(datatype.size * 8), 72)
        i16(sliceStart, 74)
        for i in 0..<8 { f32(pixdim[i], 76 + 4 * i) }
        f32(Double(voxOffset), 108)
        f32(sclSlope, 112)
        f32(sclInter, 116)
        i16(sliceEnd, 120)
        b[122] = UInt8(exactly: sliceCode) ?? 0
        b[123] = UInt8(exactly: xyztUnits) ?? 0
        f32(calMax, 124)
        f32(calMin, 128)
        f32(sliceDuration, 132)
        f32(toffset, 136)
        chars(descrip, 148, 80)
        chars(auxFile, 228, 24)
        i16(qformCode, 252)
        i16(sformCode, 254)
        for i in 0..<3 { f32(quaternion[i], 256 + 4 * i) }
        for i in 0..<3 { f32(qoffset[i], 268 + 4 * i) }
        for i in 0..<12 { f32(srow[i], 280 + 4 * i) }
        chars(intentName, 328, 16)
        for (i, x) in "n+1\0".utf8.enumerated() { b[344 + i] = x }
        if !extensions.isEmpty {
            b[348] = 1
            for e in extensions {
                var chunk = [UInt8](repeating: 0, count: e.sizeOnDisk)
                withUnsafeBytes(of: Int32(e.sizeOnDisk).littleEndian) { for (i, x) in $0.enumerated() { chunk[i] = x } }
                withUnsafeBytes(of: Int32(truncatingIfNeeded: e.code).littleEndian) { for (i, x) in $0.enumerated() { chunk[4 + i] = x } }
                for (i, x) in e.content.enumerated() { chunk[8 + i] = x }
                b += chunk
            }
        }
        return b
    }
}
