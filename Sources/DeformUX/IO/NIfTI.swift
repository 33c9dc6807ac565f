// NIfTI-1 and NIfTI-2 volumes, single file (.nii, or gzip-compressed .nii.gz), read and written by the
// engine itself (zlib for gzip, libc for files; no Foundation).
//
//     0        header: 348 bytes (NIfTI-1) or 540 bytes (NIfTI-2), either byte order (sizeof_hdr says)
//     348/540  4 bytes: extension flag; if byte 0 != 0, extensions follow (esize, ecode, content)
//     vox_off  the voxels: x fastest, then y, z, t, u; dim[1...dim[0]] of them, in the header's datatype
//
// Arrays follow ARCHITECTURE.md section 8: a volume is indexed [x][y][z] like nibabel's get_fdata(), in
// C order, so the file's x-fastest data is transposed, here and only here (transposeFromFile and
// transposeToFile). Data with more than three axes is channel-first: the extra axes (t, then u) lead,
// outermost first, so the array is [u][t][x][y][z] and each 3-D volume is one contiguous [x][y][z]
// block, in the file's order of volumes. For a 4-D file that is [t][x][y][z], i.e. C x D x H x W for
// the network with the volumes as channels.
//
// Every size in the header is checked against the file before any data is touched: a truncated or
// hostile file gives a DeformUXError (.io, naming the file), never a trap or an allocation the file
// cannot back. A .nii.gz is decompressed on demand and never past the size its header declares (plus
// 64 KB to reach the gzip trailer and check its CRC).
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A NIfTI file read into memory and checked: the header (with its extensions) and the voxel bytes.
/// Voxels are converted on request: `floats()` (nibabel's get_fdata(dtype=float32)), `int32s()` (exact
/// label values) or `rawVoxels(into:byteCount:)` (the stored values, unscaled).
public struct NIfTIFile: @unchecked Sendable {
    /// The path the file was read from (or the label given for in-memory bytes); used in errors.
    public let path: String
    public let header: NIfTIHeader
    /// Whether the file was gzip-compressed.
    public let isCompressed: Bool
    /// Header, extensions and voxels, decompressed; voxels at header.voxOffset. Empty once dropped.
    private let content: [UInt8]

    /// The largest decompressed size a gzip file can claim per compressed byte: deflate's limit is
    /// 1032:1, so a header that declares more data than that is lying (a gzip bomb or a damaged file).
    static let maxGzipRatio = 1032
    /// How far past the volume a .nii.gz is decompressed to reach the gzip trailer and check the CRC.
    static let gzipTrailerAllowance = 1 << 16

    /// Reads and checks the file at `path` (.nii or .nii.gz, told apart by the gzip magic bytes).
    public init(path: String) throws {
        let what = "nifti read"
        let (fd, size) = try Files.openRegular(path, what: what)
        defer { close(fd) }
        var magic: [UInt8] = [0, 0]
        let got = try NIfTIFile.readFully(fd, into: &magic, at: 0, count: 2, path: path)
        if got == 2 && magic[0] == gzipMagic.0 && magic[1] == gzipMagic.1 {
            var compressed = [UInt8](repeating: 0, count: size)
            let n = try NIfTIFile.readFully(fd, into: &compressed, at: 0, count: size, path: path)
            guard n == size else {
                throw DeformUXError.io(what, "the file shrank while it was read (\(n) of \(size) bytes)", path: path)
            }
            try self.init(gzip: compressed, path: path)
        } else {
            var source = Source.file(fd: fd, size: size)
            try self.init(source: &source, path: path, compressedSize: nil)
        }
    }

    /// Parses and checks `bytes`, the whole file (.nii or .nii.gz content); `path` labels errors.
    public init(bytes: [UInt8], path: String) throws {
        if bytes.count >= 2 && bytes[0] == gzipMagic.0 && bytes[1] == gzipMagic.1 {
            try self.init(gzip: bytes, path: path)
        } else {
            var source = Source.memory(bytes)
            try self.init(source: &source, path: path, compressedSize: nil)
        }
    }

    private init(gzip compressed: [UInt8], path: String) throws {
        var source = Source.gzip(try GzipReader(compressed, what: "nifti read", path: path))
        try self.init(source: &source, path: path, compressedSize: compressed.count)
    }

    /// Where the bytes come from: bounded reads of a file, an array, or a gzip stream.
    private enum Source {
        case file(fd: Int32, size: Int)
        case memory([UInt8])
        case gzip(GzipReader)

        /// Appends bytes to `content` until it holds `count` (or the source ends).
        func fill(_ content: inout [UInt8], to count: Int, path: String) throws {
            guard content.count < count else { return }
            switch self {
            case .file(let fd, let size):
                let start = content.count
                let end = min(count, size)
                guard end > start else { return }
                content += [UInt8](repeating: 0, count: end - start)
                let n = try NIfTIFile.readFully(fd, into: &content, at: start, count: end - start, path: path)
                content.removeLast(end - start - n)
            case .memory(let bytes):
                let end = min(count, bytes.count)
                if end > content.count { content += bytes[content.count..<end] }
            case .gzip(let reader):
                // In chunks, so that memory follows what the stream really holds, not what the header says.
                var chunk = [UInt8](repeating: 0, count: min(count - content.count, 1 << 22))
                while content.count < count {
                    let want = min(count - content.count, chunk.count)
                    let n = try chunk.withUnsafeMutableBytes { b -> Int in
                        guard let base = b.baseAddress else { return 0 }
                        return try reader.read(into: base, count: want)
                    }
                    if n == 0 { break }
                    content += chunk[0..<n]
                }
            }
        }

        /// Bytes the source holds in all, where known before decompressing.
        var size: Int? {
            switch self {
            case .file(_, let size): return size
            case .memory(let bytes): return bytes.count
            case .gzip: return nil
            }
        }
    }

    private init(source: inout Source, path: String, compressedSize: Int?) throws {
        let what = "nifti read"
        func fail(_ message: String, expected: String? = nil, got: String? = nil) -> DeformUXError {
            DeformUXError.io(what, message, path: path, expected: expected, got: got)
        }
        // sizeof_hdr first, then exactly the header and its 4 extension bytes (nothing past what the
        // header says is read, as nibabel reads).
        var content: [UInt8] = []
        try source.fill(&content, to: 4, path: path)
        guard content.count >= 4 else {
            throw fail("the file is \(content.count) bytes long, too short for a NIfTI header", expected: "at least 348 bytes")
        }
        if let (version, _) = content.withUnsafeBytes({ NIfTIHeader.sniff($0) }) {
            let need = version == 1 ? NIfTIHeader.size1 : NIfTIHeader.size2
            try source.fill(&content, to: need + 4, path: path)
            guard content.count >= need + 4 else {
                throw fail("the file is \(content.count) bytes long, shorter than a NIfTI-\(version) header and its 4 extension bytes (truncated?)",
                           expected: "at least \(need + 4) bytes", got: "\(content.count)")
            }
        }
        let header = try content.withUnsafeBytes { try NIfTIHeader.parse($0, path: path) }

        // The data the header declares, checked for overflow.
        var voxels = 1
        for n in header.shape {
            let (p, overflow) = voxels.multipliedReportingOverflow(by: n)
            guard !overflow else { throw fail("the shape \(header.shape) has more voxels than fit in memory") }
            voxels = p
        }
        let (dataBytes, o1) = voxels.multipliedReportingOverflow(by: header.datatype.size)
        let (needed, o2) = header.voxOffset.addingReportingOverflow(dataBytes)
        guard !o1, !o2, needed <= Int.max / 2 else {
            throw fail("the shape \(header.shape) of \(header.datatype) at vox_offset \(header.voxOffset) is larger than any file")
        }
        if let size = source.size, needed > size {
            throw fail("the file is truncated: vox_offset \(header.voxOffset) + \(header.shape) voxels of \(header.datatype) need \(needed) bytes",
                       expected: "\(needed) bytes", got: "\(size) bytes")
        }
        if let compressedSize {
            let limit = compressedSize.multipliedReportingOverflow(by: NIfTIFile.maxGzipRatio)
            guard limit.overflow || needed <= limit.partialValue + (1 << 16) else {
                throw fail("the header declares \(needed) bytes (vox_offset \(header.voxOffset) + \(header.shape) voxels of \(header.datatype)), more than a \(compressedSize)-byte gzip file can hold (deflate compresses at most \(NIfTIFile.maxGzipRatio):1): damaged file or gzip bomb")
            }
        }
        content.reserveCapacity(min(needed, 1 << 28))
        try source.fill(&content, to: needed, path: path)
        guard content.count >= needed else {
            throw fail("the file is truncated: vox_offset \(header.voxOffset) + \(header.shape) voxels of \(header.datatype) need \(needed) bytes\(compressedSize == nil ? "" : " decompressed")",
                       expected: "\(needed) bytes", got: "\(content.count) bytes")
        }
        if content.count > needed { content.removeLast(content.count - needed) }
        if case .gzip(let reader) = source {
            try reader.verifyEnd(limit: NIfTIFile.gzipTrailerAllowance)
        }

        var checked = header
        checked.extensions = try content.withUnsafeBytes { try NIfTIFile.parseExtensions($0, header: header, path: path) }
        self.path = path
        self.header = checked
        self.isCompressed = compressedSize != nil
        self.content = content
    }

    private init(path: String, header: NIfTIHeader, isCompressed: Bool, content: [UInt8]) {
        self.path = path
        self.header = header
        self.isCompressed = isCompressed
        self.content = content
    }

    /// The same header without the voxel bytes (to keep as a template for writing; reading voxels from
    /// it throws).
    public func droppingVoxels() -> NIfTIFile {
        NIfTIFile(path: path, header: header, isCompressed: isCompressed, content: [])
    }

    /// Whether the voxel bytes are held (false after droppingVoxels()).
    public var hasVoxels: Bool { !content.isEmpty }

    /// The extensions between the header and vox_offset, read as nibabel does: only when the first
    /// extension byte is non-zero, while at least 16 bytes remain before vox_offset. Each must lie
    /// before vox_offset (nibabel reads on into the data; this reader rejects that).
    static func parseExtensions(_ bytes: UnsafeRawBufferPointer, header: NIfTIHeader, path: String) throws -> [NIfTIExtension] {
        let start = header.version == 1 ? NIfTIHeader.size1 : NIfTIHeader.size2
        guard bytes[start] != 0 else { return [] }
        var extensions: [NIfTIExtension] = []
        var position = start + 4
        while header.voxOffset - position >= 16 {
            let rawSize = bytes.loadUnaligned(fromByteOffset: position, as: Int32.self)
            let rawCode = bytes.loadUnaligned(fromByteOffset: position + 4, as: Int32.self)
            let esize = Int(header.isBigEndian ? Int32(bigEndian: rawSize) : Int32(littleEndian: rawSize))
            let ecode = Int(header.isBigEndian ? Int32(bigEndian: rawCode) : Int32(littleEndian: rawCode))
            guard esize >= 8, esize <= header.voxOffset - position else {
                throw DeformUXError.io("nifti read", "header extension \(extensions.count) at byte \(position) has size \(esize), which does not fit between its start and vox_offset \(header.voxOffset)",
                                       path: path, expected: "8...\(header.voxOffset - position)", got: "\(esize)")
            }
            extensions.append(NIfTIExtension(code: ecode, content: Array(bytes[(position + 8)..<(position + esize)])))
            position += esize
        }
        return extensions
    }

    /// pread(2) until `count` bytes are in `buffer[offset...]` or the file ends; returns the count read.
    static func readFully(_ fd: Int32, into buffer: inout [UInt8], at offset: Int, count: Int, path: String) throws -> Int {
        var done = 0
        try buffer.withUnsafeMutableBytes { b in
            guard let base = b.baseAddress else { return }
            while done < count {
                let r = pread(fd, base + offset + done, count - done, off_t(offset + done))
                if r < 0 {
                    let e = errno
                    if e == EINTR { continue }
                    throw DeformUXError.io("nifti read", "read failed: \(String(cString: strerror(e)))", path: path, errno: e)
                }
                if r == 0 { break }
                done += r
            }
        }
        return done
    }

    // MARK: layout

    /// The data shape as nibabel reports it (x, y, z[, t[, u]]).
    public var shape: [Int] { header.shape }

    /// The shape of the arrays this reader returns: [x, y, z] for rank <= 3 (rank 1 and 2 padded with
    /// 1), else [t, x, y, z] or [u, t, x, y, z] (channel-first; see the file comment).
    public var arrayShape: [Int] {
        let extra = header.dim[0] > 3 ? Array(header.shape[3...].reversed()) : []
        return extra + header.spatialShape
    }

    /// Voxels in all volumes.
    public var voxelCount: Int { header.spatialShape.reduce(1, *) * header.volumeCount }

    /// The best affine (nibabel's img.affine).
    public var affine: NIfTIAffine { header.affine }

    // MARK: voxels

    /// The voxels as nibabel's get_fdata(dtype=np.float32) gives them (scl_slope and scl_inter applied
    /// in float64, then rounded to float32), in `arrayShape` order.
    public func floats() throws -> [Float] {
        let n = voxelCount
        return try [Float](unsafeUninitializedCapacity: n) { buffer, initialised in
            if let base = buffer.baseAddress { try floats(into: base, count: n) }
            initialised = n
        }
    }

    /// `floats()` into `destination`, which holds `count` floats (the voxel count, checked).
    public func floats(into destination: UnsafeMutablePointer<Float>, count: Int) throws {
        try requireVoxels(count: count, "floats")
        let layout = self.layout
        try content.withUnsafeBytes { raw in
            guard let base = raw.baseAddress else { throw DeformUXError.internal("nifti read", "no voxel bytes") }
            let src = base + header.voxOffset
            let swapped = header.isBigEndian != hostIsBigEndian
            if let (slope, inter) = header.scaling {
                // nibabel's apply_read_scaling in float64: multiply unless the slope is 1, add unless
                // the intercept is 0 (which keeps -0.0 and NaN payloads as numpy does).
                func scaled<T: NIfTIElement>(_: T.Type) {
                    transposeFromFile(T.self, src, swapped, layout, destination) { v in
                        var x = v.doubleValue
                        if slope != 1 { x = x * slope }
                        if inter != 0 { x = x + inter }
                        return Float(x)
                    }
                }
                switch header.datatype {
                case .uint8: scaled(UInt8.self)
                case .int8: scaled(Int8.self)
                case .int16: scaled(Int16.self)
                case .uint16: scaled(UInt16.self)
                case .int32: scaled(Int32.self)
                case .uint32: scaled(UInt32.self)
                case .int64: scaled(Int64.self)
                case .uint64: scaled(UInt64.self)
                case .float32: scaled(Float.self)
                case .float64: scaled(Double.self)
                }
            } else {
                // Integers go through float64 as in nibabel (exact up to 32 bits; int64 and uint64 are
                // rounded twice, as numpy's astype via float64 does).
                switch header.datatype {
                case .uint8: transposeFromFile(UInt8.self, src, swapped, layout, destination) { Float($0) }
                case .int8: transposeFromFile(Int8.self, src, swapped, layout, destination) { Float($0) }
                case .int16: transposeFromFile(Int16.self, src, swapped, layout, destination) { Float($0) }
                case .uint16: transposeFromFile(UInt16.self, src, swapped, layout, destination) { Float($0) }
                case .int32: transposeFromFile(Int32.self, src, swapped, layout, destination) { Float(Double($0)) }
                case .uint32: transposeFromFile(UInt32.self, src, swapped, layout, destination) { Float(Double($0)) }
                case .int64: transposeFromFile(Int64.self, src, swapped, layout, destination) { Float(Double($0)) }
                case .uint64: transposeFromFile(UInt64.self, src, swapped, layout, destination) { Float(Double($0)) }
                case .float32: transposeFromFile(Float.self, src, swapped, layout, destination) { $0 }
                case .float64: transposeFromFile(Double.self, src, swapped, layout, destination) { Float($0) }
                }
            }
        }
    }

    /// The voxels as exact integers, for label maps, in `arrayShape` order. Integer data without
    /// scaling is taken as stored; float or scaled data must hold integers (after nibabel's scaling, in
    /// float64). Every value must fit in Int32; otherwise this throws, naming the first voxel that does not.
    public func int32s() throws -> [Int32] {
        let n = voxelCount
        return try [Int32](unsafeUninitializedCapacity: n) { buffer, initialised in
            if let base = buffer.baseAddress { try int32s(into: base, count: n) }
            initialised = n
        }
    }

    /// `int32s()` into `destination`, which holds `count` values (the voxel count, checked).
    public func int32s(into destination: UnsafeMutablePointer<Int32>, count: Int) throws {
        try requireVoxels(count: count, "int32s")
        let layout = self.layout
        let scaling = header.scaling
        try content.withUnsafeBytes { raw in
            guard let base = raw.baseAddress else { throw DeformUXError.internal("nifti read", "no voxel bytes") }
            let src = base + header.voxOffset
            let swapped = header.isBigEndian != hostIsBigEndian
            // First find any voxel that is not an Int32 (file order), then convert without checks.
            func value<T: NIfTIElement>(_ v: T) -> Double {
                var x = v.doubleValue
                if let (slope, inter) = scaling {
                    if slope != 1 { x = x * slope }
                    if inter != 0 { x = x + inter }
                }
                return x
            }
            func check<T: NIfTIElement>(_: T.Type) throws {
                for i in 0..<count {
                    let x = value(T.load(src, i * MemoryLayout<T>.size, swapped))
                    guard x == x.rounded(), x >= -2147483648, x <= 2147483647 else {
                        let at = layout.arrayIndex(ofFileIndex: i)
                        throw DeformUXError.invalidArgument("nifti read", "voxel \(at) of \(path) is \(x), not an integer in the int32 range: int32 reading is for label maps (read floats instead)")
                    }
                }
            }
            func convert<T: NIfTIElement>(_: T.Type) throws {
                // Unscaled integers of at most 16 bits, and int32, always fit; everything else is checked.
                let alwaysFits = scaling == nil && (MemoryLayout<T>.size <= 2 && T.self != Float.self || T.self == Int32.self)
                if !alwaysFits { try check(T.self) }
                transposeFromFile(T.self, src, swapped, layout, destination) { Int32(value($0)) }
            }
            switch header.datatype {
            case .uint8: try convert(UInt8.self)
            case .int8: try convert(Int8.self)
            case .int16: try convert(Int16.self)
            case .uint16: try convert(UInt16.self)
            case .int32: try convert(Int32.self)
            case .uint32: try convert(UInt32.self)
            case .int64: try convert(Int64.self)
            case .uint64: try convert(UInt64.self)
            case .float32: try convert(Float.self)
            case .float64: try convert(Double.self)
            }
        }
    }

    /// The voxels as stored (the header's datatype, unscaled), in this machine's byte order, in
    /// `arrayShape` order, into `destination` of `byteCount` bytes (voxel count x datatype size, checked).
    public func rawVoxels(into destination: UnsafeMutableRawPointer, byteCount: Int) throws {
        let size = header.datatype.size
        guard byteCount == voxelCount * size else {
            throw DeformUXError.shapeMismatch("nifti read", "\(path) holds \(voxelCount) voxels of \(header.datatype) (\(voxelCount * size) bytes), the destination \(byteCount) bytes")
        }
        try requireVoxels(count: voxelCount, "rawVoxels")
        let layout = self.layout
        let swapped = header.isBigEndian != hostIsBigEndian
        try content.withUnsafeBytes { raw in
            guard let base = raw.baseAddress else { throw DeformUXError.internal("nifti read", "no voxel bytes") }
            let src = base + header.voxOffset
            switch size {
            case 1: transposeFromFile(UInt8.self, src, false, layout, destination.assumingMemoryBound(to: UInt8.self)) { $0 }
            case 2: transposeFromFile(UInt16.self, src, swapped, layout, destination.assumingMemoryBound(to: UInt16.self)) { $0 }
            case 4: transposeFromFile(UInt32.self, src, swapped, layout, destination.assumingMemoryBound(to: UInt32.self)) { $0 }
            default: transposeFromFile(UInt64.self, src, swapped, layout, destination.assumingMemoryBound(to: UInt64.self)) { $0 }
            }
        }
    }

    /// `floats()` as a Tensor of shape [volumes, x, y, z] (C x D x H x W: add N in front for the network).
    public func tensor() throws -> Tensor {
        let s = header.spatialShape
        let t = try Tensor(uninitialized: [header.volumeCount, s[0], s[1], s[2]])
        try floats(into: t.pointer, count: voxelCount)
        return t
    }

    private func requireVoxels(count: Int, _ name: String) throws {
        guard count == voxelCount else {
            throw DeformUXError.shapeMismatch("nifti read", "\(path) holds \(voxelCount) voxels (array shape \(arrayShape)), the destination \(count)")
        }
        guard hasVoxels else {
            throw DeformUXError.invalidArgument("nifti read", "\(name): the voxels of \(path) were dropped (droppingVoxels); read the file again")
        }
    }

    private var layout: VolumeLayout {
        let s = header.spatialShape
        return VolumeLayout(nx: s[0], ny: s[1], nz: s[2], volumes: header.volumeCount)
    }
}

private let hostIsBigEndian = 1.bigEndian == 1

// MARK: the one transposition

/// A file's voxel grid: `volumes` blocks of nx * ny * nz voxels.
struct VolumeLayout {
    let nx, ny, nz, volumes: Int

    var volumeSize: Int { nx * ny * nz }

    /// The array index [.., x, y, z] (volume index first when there are several) of voxel `i` in file order.
    func arrayIndex(ofFileIndex i: Int) -> [Int] {
        let v = i / volumeSize, r = i % volumeSize
        let x = r % nx, y = (r / nx) % ny, z = r / (nx * ny)
        return volumes > 1 ? [v, x, y, z] : [x, y, z]
    }
}

/// z-slices per block: each (x, y) then writes 16 consecutive values along z (64 bytes of float32), read
/// from 16 file planes.
private let zBlock = 16

/// out[v][x][y][z] = convert(file[v][z][y][x]) for every volume v: the file's x-fastest order into the
/// engine's C-order [x][y][z], in blocks of z-slices. Single-threaded: it is memory-bound (about 20 ms
/// for the 8.7 M voxels of the MNI152 T1 into float32), and a second thread gained nothing measurable on
/// a busy machine.
func transposeFromFile<T: NIfTIElement, U>(_: T.Type, _ src: UnsafeRawPointer, _ swapped: Bool, _ l: VolumeLayout,
                                           _ out: UnsafeMutablePointer<U>, _ convert: (T) -> U) {
    let plane = l.nx * l.ny
    for v in 0..<l.volumes {
        let base = v * l.volumeSize
        for z0 in stride(from: 0, to: l.nz, by: zBlock) {
            let z1 = min(z0 + zBlock, l.nz)
            for x in 0..<l.nx {
                for y in 0..<l.ny {
                    let o = base + (x * l.ny + y) * l.nz
                    var i = base + x + l.nx * y + plane * z0
                    for z in z0..<z1 {
                        out[o + z] = convert(T.load(src, i * MemoryLayout<T>.size, swapped))
                        i += plane
                    }
                }
            }
        }
    }
}

/// file[v][z][y][x] = values[v][x][y][z] for the z-slices z0..<z1 of volume v, into `slab` (which holds
/// (z1 - z0) planes, x fastest), as little-endian bit patterns.
func transposeToFile<T: FixedWidthInteger>(_: T.Type, _ values: UnsafeRawPointer, _ l: VolumeLayout, volume v: Int,
                                           z0: Int, z1: Int, into slab: UnsafeMutableRawPointer) {
    let src = values.assumingMemoryBound(to: T.self) + v * l.volumeSize
    let dst = slab.assumingMemoryBound(to: T.self)
    let plane = l.nx * l.ny
    for y in 0..<l.ny {
        for x in 0..<l.nx {
            let s = (x * l.ny + y) * l.nz
            var d = x + l.nx * y
            for z in z0..<z1 {
                dst[d] = src[s + z].littleEndian
                d += plane
            }
        }
    }
}

// MARK: element types

/// A voxel type as stored in a file: loaded from any alignment in either byte order.
protocol NIfTIElement {
    static func load(_ p: UnsafeRawPointer, _ byteOffset: Int, _ swapped: Bool) -> Self
    var doubleValue: Double { get }
}

extension NIfTIElement where Self: FixedWidthInteger {
    @inline(__always)
    static func load(_ p: UnsafeRawPointer, _ byteOffset: Int, _ swapped: Bool) -> Self {
        let v = p.loadUnaligned(fromByteOffset: byteOffset, as: Self.self)
        return swapped ? v.byteSwapped : v
    }
    @inline(__always) var doubleValue: Double { Double(self) }
}

extension UInt8: NIfTIElement {}
extension Int8: NIfTIElement {}
extension Int16: NIfTIElement {}
extension UInt16: NIfTIElement {}
extension Int32: NIfTIElement {}
extension UInt32: NIfTIElement {}
extension Int64: NIfTIElement {}
extension UInt64: NIfTIElement {}

extension Float: NIfTIElement {
    @inline(__always)
    static func load(_ p: UnsafeRawPointer, _ byteOffset: Int, _ swapped: Bool) -> Float {
        let v = p.loadUnaligned(fromByteOffset: byteOffset, as: UInt32.self)
        return Float(bitPattern: swapped ? v.byteSwapped : v)
    }
    @inline(__always) var doubleValue: Double { Double(self) }
}

extension Double: NIfTIElement {
    @inline(__always)
    static func load(_ p: UnsafeRawPointer, _ byteOffset: Int, _ swapped: Bool) -> Double {
        let v = p.loadUnaligned(fromByteOffset: byteOffset, as: UInt64.self)
        return Double(bitPattern: swapped ? v.byteSwapped : v)
    }
    @inline(__always) var doubleValue: Double { self }
}

// MARK: writing

/// The Swift types that can be written as NIfTI voxels.
public protocol NIfTIScalar {
    static var niftiDataType: NIfTIDataType { get }
}

extension UInt8: NIfTIScalar { public static var niftiDataType: NIfTIDataType { .uint8 } }
extension Int8: NIfTIScalar { public static var niftiDataType: NIfTIDataType { .int8 } }
extension Int16: NIfTIScalar { public static var niftiDataType: NIfTIDataType { .int16 } }
extension UInt16: NIfTIScalar { public static var niftiDataType: NIfTIDataType { .uint16 } }
extension Int32: NIfTIScalar { public static var niftiDataType: NIfTIDataType { .int32 } }
extension UInt32: NIfTIScalar { public static var niftiDataType: NIfTIDataType { .uint32 } }
extension Int64: NIfTIScalar { public static var niftiDataType: NIfTIDataType { .int64 } }
extension UInt64: NIfTIScalar { public static var niftiDataType: NIfTIDataType { .uint64 } }
extension Float: NIfTIScalar { public static var niftiDataType: NIfTIDataType { .float32 } }
extension Double: NIfTIScalar { public static var niftiDataType: NIfTIDataType { .float64 } }

/// Writing NIfTI-1 files.
public enum NIfTI {
    /// Writes `values` (in the reader's `arrayShape` order: [x][y][z], or [t][x][y][z] / [u][t][x][y][z])
    /// as a single-file NIfTI-1 of `dims` (x, y, z[, t[, u]]), gzip-compressed if `path` ends in
    /// ".nii.gz" (else it must end in ".nii"). See `write(raw:...)` for the header rules.
    public static func write<T: NIfTIScalar>(_ values: [T], dims: [Int], affine: NIfTIAffine,
                                             template: NIfTIHeader? = nil, description: String? = nil,
                                             compressionLevel: Int = 1, to path: String) throws {
        let what = "nifti write"
        let count = try voxelCount(dims, what: what)
        guard values.count == count else {
            throw DeformUXError.shapeMismatch(what, "dims \(dims) hold \(count) voxels", expected: "\(count) values", got: "\(values.count)")
        }
        try values.withUnsafeBytes { b in
            guard let base = b.baseAddress else { throw DeformUXError.internal(what, "no values") }
            try write(raw: base, datatype: T.niftiDataType, dims: dims, affine: affine, template: template,
                      description: description, compressionLevel: compressionLevel, to: path)
        }
    }

    /// Writes voxels of `datatype` at `raw` (this machine's byte order, the reader's `arrayShape` order)
    /// as single-file little-endian NIfTI-1.
    ///
    /// The header: `template`'s fields (intent, units, description, extensions, ...) or defaults (units
    /// mm and s), then: dim = `dims`, datatype and bitpix from the data, scl_slope 1 and scl_inter 0 (the
    /// values are written as they are; a label map written with a float image's template comes out as
    /// uint8 or int16 with no scaling), cal_min/cal_max cleared when the datatype changes, vox_offset
    /// = 352 + the extensions. The affine: if the template's own sform or qform affine is close to
    /// `affine` (numpy's allclose, as nibabel's update_header decides), the template's sform and qform
    /// fields are kept as they are; otherwise both are set from `affine` (nibabel's set_sform/set_qform:
    /// pixdim[1...3] = the column lengths, qfac the determinant's sign, shears dropped from the qform),
    /// with the template's codes where they are non-zero and else code 1 (scanner).
    /// Atomic: a temporary file in the same directory, fsync, rename.
    public static func write(raw: UnsafeRawPointer, datatype: NIfTIDataType, dims: [Int], affine: NIfTIAffine,
                             template: NIfTIHeader? = nil, description: String? = nil,
                             compressionLevel: Int = 1, to path: String) throws {
        let what = "nifti write"
        let compressed = path.hasSuffix(".nii.gz")
        guard compressed || path.hasSuffix(".nii") else {
            throw DeformUXError.invalidArgument(what, "the file name must end in .nii or .nii.gz", got: path)
        }
        guard (0...9).contains(compressionLevel) else {
            throw DeformUXError.invalidArgument(what, "compressionLevel must be 0...9", got: "\(compressionLevel)")
        }
        _ = try voxelCount(dims, what: what)
        guard dims.allSatisfy({ $0 <= Int(Int16.max) }) else {
            throw DeformUXError.invalidArgument(what, "NIfTI-1 holds dimensions up to 32767", got: "dims \(dims)")
        }
        var h = try header(dims: dims, datatype: datatype, affine: affine, template: template, description: description)
        let headerBytes = try h.nifti1Bytes(what: what, path: path, legacy: template)
        h.raw = Array(headerBytes[0..<NIfTIHeader.size1])

        let s = h.spatialShape
        let layout = VolumeLayout(nx: s[0], ny: s[1], nz: s[2], volumes: h.volumeCount)
        try Files.atomicWrite(path, what: what) { fd in
            let gzip = compressed ? try GzipWriter(fd: fd, level: Int32(compressionLevel), what: what, path: path) : nil
            func emit(_ bytes: UnsafeRawBufferPointer) throws {
                if let gzip { try gzip.write(bytes) } else { try writeAll(fd, bytes, what: what, path: path) }
            }
            try headerBytes.withUnsafeBytes { try emit($0) }
            // The voxels, a slab of z-slices at a time, transposed to the file's x-fastest order.
            let planeBytes = layout.nx * layout.ny * datatype.size
            let slabZ = max(1, min(layout.nz, (1 << 22) / max(planeBytes, 1)))
            var slab = [UInt8](repeating: 0, count: slabZ * planeBytes)
            for v in 0..<layout.volumes {
                for z0 in stride(from: 0, to: layout.nz, by: slabZ) {
                    let z1 = min(z0 + slabZ, layout.nz)
                    try slab.withUnsafeMutableBytes { b in
                        guard let base = b.baseAddress else { return }
                        switch datatype.size {
                        case 1: transposeToFile(UInt8.self, raw, layout, volume: v, z0: z0, z1: z1, into: base)
                        case 2: transposeToFile(UInt16.self, raw, layout, volume: v, z0: z0, z1: z1, into: base)
                        case 4: transposeToFile(UInt32.self, raw, layout, volume: v, z0: z0, z1: z1, into: base)
                        default: transposeToFile(UInt64.self, raw, layout, volume: v, z0: z0, z1: z1, into: base)
                        }
                        try emit(UnsafeRawBufferPointer(start: base, count: (z1 - z0) * planeBytes))
                    }
                }
            }
            try gzip?.finish()
        }
    }

    /// The header `write` puts in the file (see there).
    static func header(dims: [Int], datatype: NIfTIDataType, affine: NIfTIAffine, template: NIfTIHeader?,
                       description: String?) throws -> NIfTIHeader {
        var h = template ?? NIfTIHeader()
        if template == nil {
            h.xyztUnits = 2 | 8  // NIFTI_UNITS_MM | NIFTI_UNITS_SEC
        }
        h.version = 1
        h.isBigEndian = false
        h.raw = []
        h.dim = [dims.count] + dims + [Int](repeating: 1, count: 7 - dims.count)
        if let template, template.datatype != datatype {
            h.calMin = 0
            h.calMax = 0
        }
        h.datatype = datatype
        h.bitpix = datatype.size * 8
        h.sclSlope = 1
        h.sclInter = 0
        h.voxOffset = 352 + h.extensions.reduce(0) { $0 + $1.sizeOnDisk }
        if let description { h.descrip = description }
        guard affine.isFinite else {
            throw DeformUXError.invalidArgument("nifti write", "the affine has non-finite values", got: "\n\(affine)")
        }
        if let template, template.affineSource != .pixdim, template.affine.isClose(to: affine) {
            return h  // the template's sform and qform fields say the same: keep them as they are
        }
        let sformCode = template.map { $0.sformCode > 0 ? $0.sformCode : 1 } ?? 1
        let qformCode = template.map { $0.qformCode > 0 ? $0.qformCode : 1 } ?? 1
        h.setSform(affine, code: sformCode)
        try h.setQform(affine, code: qformCode)
        return h
    }

    static func voxelCount(_ dims: [Int], what: String) throws -> Int {
        guard (1...5).contains(dims.count) else {
            throw DeformUXError.invalidArgument(what, "dims must be x, y, z and at most two more sizes (t, u)", got: "\(dims)")
        }
        guard dims.allSatisfy({ $0 >= 1 }) else {
            throw DeformUXError.invalidArgument(what, "every dimension must be at least 1", got: "\(dims)")
        }
        var n = 1
        for d in dims {
            let (p, overflow) = n.multipliedReportingOverflow(by: d)
            guard !overflow, p <= Int.max / 8 else { throw DeformUXError.invalidArgument(what, "dims \(dims) are too large") }
            n = p
        }
        return n
    }
}
