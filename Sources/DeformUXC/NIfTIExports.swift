// NIfTI volumes behind an opaque handle (deformux.h: dfx_nifti_*). A handle holds one file read into
// memory and checked (header, extensions, voxel bytes); dfx_nifti_read converts the voxels into the
// caller's buffer, dfx_nifti_release_voxels drops them (the header stays, e.g. as a writing template).
// The header goes out as JSON text (every field; doubles in shortest round-trip form, NaN and Infinity
// as Python's json reads them); the shapes and affines also have direct calls.
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import DeformUX

final class NIfTIHandle {
    private var file: NIfTIFile
    /// A fork-safe short lock (Tensor/Locks.swift): a forked child never inherits it held.
    private let lock = ShortLock()

    init(_ file: NIfTIFile) {
        self.file = file
    }

    /// The file as it is now (a copy sharing its bytes: conversions run without the lock).
    var current: NIfTIFile { lock.withLock { file } }

    func releaseVoxels() {
        lock.withLock { file = file.droppingVoxels() }
    }
}

private func niftiHandle(_ p: OpaquePointer?, _ op: String) throws -> NIfTIHandle {
    guard let p else { throw DeformUXError.invalidArgument(op, "nifti must not be NULL") }
    return Unmanaged<NIfTIHandle>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

// MARK: JSON

private func json(_ x: Double) -> String {
    if x.isNaN { return "NaN" }
    if x.isInfinite { return x > 0 ? "Infinity" : "-Infinity" }
    return "\(x)"
}

private func json(_ xs: [Double]) -> String { "[" + xs.map(json).joined(separator: ", ") + "]" }
private func json(_ xs: [Int]) -> String { "[" + xs.map(String.init).joined(separator: ", ") + "]" }

private func json(_ s: String) -> String { JSONText.string(s) }

/// Every header field of `file`, as one JSON object (documented in deformux.h).
func niftiHeaderJSON(_ file: NIfTIFile) -> String {
    let h = file.header
    let source = ["pixdim", "qform", "sform"][h.affineSource.rawValue]
    let extensions = h.extensions.map { e in
        "{\"code\": \(e.code), \"content\": \"" + e.content.map { String(format2: $0) }.joined() + "\"}"
    }
    let fields: [(String, String)] = [
        ("version", "\(h.version)"), ("big_endian", "\(h.isBigEndian)"), ("compressed", "\(file.isCompressed)"),
        ("datatype", "\(h.datatype.rawValue)"), ("dtype", json(h.datatype.description)), ("bitpix", "\(h.bitpix)"),
        ("dim", json(h.dim)), ("shape", json(h.shape)), ("array_shape", json(file.arrayShape)),
        ("voxel_count", "\(file.voxelCount)"),
        ("pixdim", json(h.pixdim)), ("zooms", json(h.zooms)), ("spacing", json(h.spacing)),
        ("vox_offset", "\(h.voxOffset)"), ("scl_slope", json(h.sclSlope)), ("scl_inter", json(h.sclInter)),
        ("cal_min", json(h.calMin)), ("cal_max", json(h.calMax)),
        ("slice_duration", json(h.sliceDuration)), ("toffset", json(h.toffset)),
        ("slice_start", "\(h.sliceStart)"), ("slice_end", "\(h.sliceEnd)"), ("slice_code", "\(h.sliceCode)"),
        ("xyzt_units", "\(h.xyztUnits)"), ("dim_info", "\(h.dimInfo)"),
        ("intent_code", "\(h.intentCode)"), ("intent_p", json(h.intentParameters)), ("intent_name", json(h.intentName)),
        ("descrip", json(h.descrip)), ("aux_file", json(h.auxFile)),
        ("qform_code", "\(h.qformCode)"), ("sform_code", "\(h.sformCode)"),
        ("quatern", json(h.quaternion)), ("qoffset", json(h.qoffset)), ("srow", json(h.srow)),
        ("affine", json(h.affine.values)), ("affine_source", json(source)),
        ("qform", h.qform.map { json($0.values) } ?? "null"), ("sform", json(h.sform.values)),
        ("extensions", "[" + extensions.joined(separator: ", ") + "]"),
    ]
    return "{" + fields.map { "\"\($0.0)\": \($0.1)" }.joined(separator: ", ") + "}"
}

private extension String {
    /// Two lowercase hex digits.
    init(format2 byte: UInt8) {
        let digits = Array("0123456789abcdef")
        self = String([digits[Int(byte >> 4)], digits[Int(byte & 15)]])
    }
}

// MARK: exports

/// Reads and checks the file at path (.nii or .nii.gz); *out receives the handle.
@_cdecl("dfx_nifti_open")
public func dfx_nifti_open(_ path: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guarded("nifti_open") {
        guard let out else { throw DeformUXError.invalidArgument("nifti_open", "out must not be NULL") }
        out.pointee = nil
        let p = try require(path, "nifti_open", "path")
        let h = NIfTIHandle(try NIfTIFile(path: String(cString: p)))
        out.pointee = OpaquePointer(Unmanaged.passRetained(h).toOpaque())
    }
}

@_cdecl("dfx_nifti_free")
public func dfx_nifti_free(_ nifti: OpaquePointer?) {
    guard let nifti else { return }
    Unmanaged<NIfTIHandle>.fromOpaque(UnsafeRawPointer(nifti)).release()
}

/// The header as JSON text.
@_cdecl("dfx_nifti_header_json")
public func dfx_nifti_header_json(_ nifti: OpaquePointer?, _ buf: UnsafeMutablePointer<CChar>?, _ cap: Int64,
                                  _ needed: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded("nifti_header_json") {
        // The text convention of deformux.h (ModelExports.swift's copyOut): truncated and terminated.
        try copyOut(niftiHeaderJSON(try niftiHandle(nifti, "nifti_header_json").current), buf, cap, needed,
                    "nifti_header_json")
    }
}

/// The array layout of dfx_nifti_read: rank 3 ([x, y, z]), 4 ([t, x, y, z]) or 5 ([u, t, x, y, z]);
/// the datatype code and the voxel count. Any pointer may be NULL.
@_cdecl("dfx_nifti_array_shape")
public func dfx_nifti_array_shape(_ nifti: OpaquePointer?, _ rank: UnsafeMutablePointer<Int32>?,
                                  _ shape: UnsafeMutablePointer<Int64>?, _ datatype: UnsafeMutablePointer<Int32>?,
                                  _ count: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded("nifti_array_shape") {
        let f = try niftiHandle(nifti, "nifti_array_shape").current
        let s = f.arrayShape
        rank?.pointee = Int32(s.count)
        if let shape { for (i, n) in s.enumerated() { shape[i] = Int64(n) } }
        datatype?.pointee = Int32(f.header.datatype.rawValue)
        count?.pointee = Int64(f.voxelCount)
    }
}

/// One of the affines (DFX_NIFTI_AFFINE_*), row-major, into out[16]; *code receives the sform or qform
/// code, or for the best affine its source (DFX_NIFTI_AFFINE_SFORM, _QFORM, or _BEST meaning pixdim).
@_cdecl("dfx_nifti_affine")
public func dfx_nifti_affine(_ nifti: OpaquePointer?, _ which: Int32, _ out: UnsafeMutablePointer<Double>?,
                             _ code: UnsafeMutablePointer<Int32>?) -> Int32 {
    guarded("nifti_affine") {
        let op = "nifti_affine"
        let h = try niftiHandle(nifti, op).current.header
        let out = try require(out, op, "out")
        let affine: NIfTIAffine
        switch which {
        case 0:
            affine = h.affine
            code?.pointee = [0, 1, 2][h.affineSource.rawValue]
        case 1:
            guard let q = h.qform else {
                throw DeformUXError.invalidArgument(op, "the qform quaternion of this file is invalid (b^2 + c^2 + d^2 > 1)")
            }
            affine = q
            code?.pointee = Int32(h.qformCode)
        case 2:
            affine = h.sform
            code?.pointee = Int32(h.sformCode)
        default:
            throw DeformUXError.invalidArgument(op, "which must be 0 (best), 1 (qform) or 2 (sform)", got: "\(which)")
        }
        for i in 0..<16 { out[i] = affine.values[i] }
    }
}

/// The voxels into out (count values, the voxel count): kind DFX_NIFTI_FLOAT32 (float), _INT32
/// (int32_t, exact labels) or _RAW (the file's datatype, this machine's byte order, unscaled).
@_cdecl("dfx_nifti_read")
public func dfx_nifti_read(_ nifti: OpaquePointer?, _ kind: Int32, _ out: UnsafeMutableRawPointer?, _ count: Int64) -> Int32 {
    guarded("nifti_read") {
        let op = "nifti_read"
        let f = try niftiHandle(nifti, op).current
        let out = try require(out, op, "out")
        guard count == Int64(f.voxelCount) else {
            throw DeformUXError.shapeMismatch(op, "the volume holds \(f.voxelCount) voxels (array shape \(f.arrayShape)), count is \(count)")
        }
        switch kind {
        case 0: try f.floats(into: out.assumingMemoryBound(to: Float.self), count: Int(count))
        case 1: try f.int32s(into: out.assumingMemoryBound(to: Int32.self), count: Int(count))
        case 2: try f.rawVoxels(into: out, byteCount: Int(count) * f.header.datatype.size)
        default:
            throw DeformUXError.invalidArgument(op, "kind must be 0 (float32), 1 (int32) or 2 (raw)", got: "\(kind)")
        }
    }
}

/// Drops the voxel bytes; the header stays readable (and usable as a template).
@_cdecl("dfx_nifti_release_voxels")
public func dfx_nifti_release_voxels(_ nifti: OpaquePointer?) -> Int32 {
    guarded("nifti_release_voxels") { try niftiHandle(nifti, "nifti_release_voxels").releaseVoxels() }
}

/// The header bytes as in the file (348 or 540, its byte order), into buf if cap allows; *needed = size.
@_cdecl("dfx_nifti_raw_header")
public func dfx_nifti_raw_header(_ nifti: OpaquePointer?, _ buf: UnsafeMutablePointer<UInt8>?, _ cap: Int64,
                                 _ needed: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded("nifti_raw_header") {
        let raw = try niftiHandle(nifti, "nifti_raw_header").current.header.raw
        needed?.pointee = Int64(raw.count)
        guard let buf, cap >= Int64(raw.count) else { return }
        for (i, b) in raw.enumerated() { buf[i] = b }
    }
}

/// Writes a NIfTI-1 file (.nii, or .nii.gz): data of `datatype` in the reader's array order for
/// dims[0 ..< ndim] (x, y, z[, t[, u]]), the affine (row-major 16 doubles), an optional template
/// handle, an optional description, a gzip level (-1: the default, 1).
@_cdecl("dfx_nifti_write")
public func dfx_nifti_write(_ path: UnsafePointer<CChar>?, _ data: UnsafeRawPointer?, _ datatype: Int32,
                            _ ndim: Int32, _ dims: UnsafePointer<Int64>?, _ affine: UnsafePointer<Double>?,
                            _ template: OpaquePointer?, _ description: UnsafePointer<CChar>?,
                            _ compressionLevel: Int32) -> Int32 {
    guarded("nifti_write") {
        let op = "nifti_write"
        let path = String(cString: try require(path, op, "path"))
        let data = try require(data, op, "data")
        let dims = try require(dims, op, "dims")
        let affine = try require(affine, op, "affine")
        guard let type = NIfTIDataType(rawValue: Int(datatype)) else {
            let known = NIfTIDataType.allCases.map { "\($0.rawValue) (\($0))" }.joined(separator: ", ")
            throw DeformUXError.invalidArgument(op, "datatype must be a NIfTI code of one of \(known)", got: "\(datatype)")
        }
        guard (1...5).contains(ndim) else {
            throw DeformUXError.invalidArgument(op, "ndim must be 1...5", got: "\(ndim)")
        }
        guard compressionLevel == -1 || (0...9).contains(compressionLevel) else {
            throw DeformUXError.invalidArgument(op, "compression_level must be -1 (default) or 0...9", got: "\(compressionLevel)")
        }
        let template = try template.map { try niftiHandle($0, op).current.header }
        try NIfTI.write(raw: data, datatype: type, dims: (0..<Int(ndim)).map { Int(dims[$0]) },
                        affine: try NIfTIAffine(rowMajor: (0..<16).map { affine[$0] }), template: template,
                        description: description.map { String(cString: $0) },
                        compressionLevel: compressionLevel == -1 ? 1 : Int(compressionLevel), to: path)
    }
}
