// The safetensors format (https://github.com/huggingface/safetensors), read and written without any
// dependency beyond FoundationEssentials (JSON) and libc (file IO):
//
//     8 bytes    N, the header length, little-endian UInt64
//     N bytes    JSON object {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//                "__metadata__": {"key": "value", ...}}, padded with spaces
//     the rest   the data section; a tensor's bytes are data[begin..<end], little-endian, C order
//
// Every length and offset is checked before any tensor byte is touched (STYLE.md habit 12): a damaged or
// hostile file gives a DeformUXError naming the file, the tensor and what was wrong, never a trap.
import FoundationEssentials

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The element types the engine reads. Everything is converted to Float on load; files are written as F32.
public enum SafetensorsDType: String, Sendable, CaseIterable {
    case f32 = "F32"
    case f16 = "F16"
    case bf16 = "BF16"
    case f64 = "F64"

    /// Bytes per element.
    public var size: Int {
        switch self {
        case .f32: return 4
        case .f16, .bf16: return 2
        case .f64: return 8
        }
    }
}

/// A parsed, validated safetensors file held in memory (the file is read once; tensors are converted
/// straight from those bytes into the caller's memory).
public struct SafetensorsFile: @unchecked Sendable {
    public struct Entry: Sendable, Equatable {
        public let name: String
        public let dtype: SafetensorsDType
        public let shape: [Int]
        /// Byte range inside the data section (already checked against it).
        public let byteRange: Range<Int>
        /// Elements (the product of `shape`).
        public let count: Int
    }

    /// The file's path, or the label given for in-memory bytes; used in error messages.
    public let path: String
    /// Tensors sorted by name.
    public let entries: [Entry]
    /// The `__metadata__` map (empty if absent).
    public let metadata: [String: String]

    private let bytes: [UInt8]
    private let dataStart: Int
    private let indexByName: [String: Int]

    /// Header length limit: a larger header is certainly not a weight file.
    public static let maxHeaderBytes = 100 * 1024 * 1024

    /// Reads and validates the file at `path`.
    public init(path: String) throws {
        try self.init(bytes: Safetensors.readFile(path), path: path)
    }

    /// Parses and validates `bytes` (the whole file); `path` labels error messages.
    public init(bytes: [UInt8], path: String) throws {
        let what = "safetensors \(path)"
        guard bytes.count >= 8 else {
            throw DeformUXError.io(what, "file is \(bytes.count) bytes, too short for the 8-byte header length")
        }
        var n: UInt64 = 0
        for i in 0..<8 { n |= UInt64(bytes[i]) << (8 * UInt64(i)) }
        guard n <= UInt64(SafetensorsFile.maxHeaderBytes) else {
            throw DeformUXError.io(what, "header length \(n) bytes is larger than the \(SafetensorsFile.maxHeaderBytes)-byte limit (not a safetensors file?)")
        }
        let headerLength = Int(n)
        guard headerLength <= bytes.count - 8 else {
            throw DeformUXError.io(what, "header length \(headerLength) bytes runs past the end of the file (\(bytes.count) bytes; truncated?)")
        }
        let dataStart = 8 + headerLength
        let dataLength = bytes.count - dataStart

        let header = try Safetensors.parseHeader(bytes[8..<dataStart], what: what)

        var entries: [Entry] = []
        entries.reserveCapacity(header.tensors.count)
        for raw in header.tensors.sorted(by: { $0.name < $1.name }) {
            let t = "\(what): tensor \(raw.name)"
            guard let dtype = SafetensorsDType(rawValue: raw.dtype) else {
                let known = SafetensorsDType.allCases.map(\.rawValue).joined(separator: ", ")
                throw DeformUXError.io(t, "dtype \"\(raw.dtype)\" is not supported (expected one of \(known))")
            }
            let count: Int
            do {
                count = try Tensor.elementCount(raw.shape, context: t)
            } catch let e as DeformUXError {
                var bad = e  // a bad file, not a bad argument
                bad.kind = .io
                throw bad
            }
            guard raw.offsets.count == 2 else {
                throw DeformUXError.io(t, "data_offsets must be [begin, end], got \(raw.offsets)")
            }
            let begin = raw.offsets[0], end = raw.offsets[1]
            guard begin >= 0, begin <= end else {
                throw DeformUXError.io(t, "data_offsets [\(begin), \(end)] are not an increasing pair of non-negative offsets")
            }
            guard end <= dataLength else {
                throw DeformUXError.io(t, "data_offsets [\(begin), \(end)] run past the data section (\(dataLength) bytes; truncated file?)")
            }
            let expected = count * dtype.size
            guard end - begin == expected else {
                throw DeformUXError.io(t, "\(end - begin) data bytes for shape \(raw.shape) of \(dtype.rawValue), expected \(count) x \(dtype.size) = \(expected)")
            }
            entries.append(Entry(name: raw.name, dtype: dtype, shape: raw.shape, byteRange: begin..<end, count: count))
        }

        // No two tensors may share bytes (empty tensors occupy none).
        let byStart = entries.filter { !$0.byteRange.isEmpty }.sorted {
            ($0.byteRange.lowerBound, $0.name) < ($1.byteRange.lowerBound, $1.name)
        }
        if byStart.count > 1 {
            for i in 1..<byStart.count where byStart[i].byteRange.lowerBound < byStart[i - 1].byteRange.upperBound {
                let a = byStart[i - 1], b = byStart[i]
                throw DeformUXError.io(what, "tensors \(a.name) (bytes \(a.byteRange.lowerBound)..<\(a.byteRange.upperBound)) and \(b.name) (bytes \(b.byteRange.lowerBound)..<\(b.byteRange.upperBound)) overlap")
            }
        }

        self.path = path
        self.entries = entries
        self.metadata = header.metadata
        self.bytes = bytes
        self.dataStart = dataStart
        var index: [String: Int] = [:]
        for (i, e) in entries.enumerated() { index[e.name] = i }
        indexByName = index
    }

    /// Tensor names, sorted.
    public var names: [String] { entries.map(\.name) }

    public func entry(_ name: String) -> Entry? { indexByName[name].map { entries[$0] } }

    /// Converts the tensor `name` to Float into `destination`, which holds `count` floats (the tensor's
    /// element count, checked).
    public func copy(_ name: String, into destination: UnsafeMutablePointer<Float>, count: Int) throws {
        guard let e = entry(name) else {
            throw DeformUXError.invalidArgument("safetensors \(path)", "no tensor named \(name)")
        }
        guard count == e.count else {
            throw DeformUXError.shapeMismatch("safetensors \(path)", "tensor \(name) has \(e.count) elements (shape \(e.shape)), destination holds \(count)")
        }
        bytes.withUnsafeBytes { raw in
            guard let base = raw.baseAddress else { return }
            Safetensors.convert(base + dataStart + e.byteRange.lowerBound, dtype: e.dtype, count: e.count, to: destination)
        }
    }

    /// The tensor `name` as Float values, row-major.
    public func floats(_ name: String) throws -> [Float] {
        guard let e = entry(name) else {
            throw DeformUXError.invalidArgument("safetensors \(path)", "no tensor named \(name)")
        }
        var out = [Float](repeating: 0, count: e.count)
        try out.withUnsafeMutableBufferPointer { b in
            if let p = b.baseAddress { try copy(name, into: p, count: e.count) }
        }
        return out
    }

    /// The tensor `name` as a new contiguous Tensor.
    public func tensor(_ name: String) throws -> Tensor {
        guard let e = entry(name) else {
            throw DeformUXError.invalidArgument("safetensors \(path)", "no tensor named \(name)")
        }
        let t = try Tensor(zeros: e.shape)
        try copy(name, into: t.pointer, count: e.count)
        return t
    }
}

/// Reading and writing safetensors files.
public enum Safetensors {
    /// One tensor to write: float32 values, row-major, `shape`'s product of them.
    public struct Item {
        public let name: String
        public let shape: [Int]
        public let values: UnsafePointer<Float>
        public init(name: String, shape: [Int], values: UnsafePointer<Float>) {
            self.name = name
            self.shape = shape
            self.values = values
        }
    }

    /// Writes `tensors` (any contiguous Tensors) as an F32 safetensors file.
    public static func write(_ tensors: [String: Tensor], metadata: [String: String] = [:], to path: String) throws {
        var items: [Item] = []
        for (name, t) in tensors {
            try t.requireContiguous("safetensors write \(path): tensor \(name)")
            items.append(Item(name: name, shape: t.shape, values: UnsafePointer(t.pointer)))
        }
        // The Tensors own their memory for the duration of this call (they are held by `tensors`).
        try withExtendedLifetime(tensors) { try write(items, metadata: metadata, to: path) }
    }

    /// Writes `items` as an F32 safetensors file: tensors sorted by name and packed in that order, the
    /// header padded with spaces to a multiple of 8 bytes. Atomic: the bytes go to a temporary file in
    /// the same directory, which is renamed over `path` once complete, so a crash never leaves a
    /// half-written weight file under the final name.
    public static func write(_ items: [Item], metadata: [String: String] = [:], to path: String) throws {
        let what = "safetensors write \(path)"
        let sorted = items.sorted { $0.name < $1.name }
        var counts: [Int] = []
        for i in sorted.indices {
            if i > 0, sorted[i].name == sorted[i - 1].name {
                throw DeformUXError.invalidArgument(what, "tensor \(sorted[i].name) is given twice")
            }
            if sorted[i].name == "__metadata__" {
                throw DeformUXError.invalidArgument(what, "\"__metadata__\" is reserved and cannot name a tensor")
            }
            counts.append(try Tensor.elementCount(sorted[i].shape, context: "\(what): tensor \(sorted[i].name)"))
        }
        let header = headerBytes(sorted.map { ($0.name, $0.shape) }, counts: counts, metadata: metadata)

        let directory: String
        if let slash = path.lastIndex(of: "/") {
            directory = slash == path.startIndex ? "/" : String(path[..<slash])
        } else {
            directory = "."
        }
        let base = path.split(separator: "/").last.map(String.init) ?? path
        let temp = "\(directory)/.\(base).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw DeformUXError.io(what, "cannot create a temporary file in \(directory): \(errnoText())", path: path, errno: Glibc.errno)
        }
        var closed = false
        var renamed = false
        defer {
            if !closed { close(fd) }
            if !renamed { unlink(temp) }
        }
        var length = UInt64(header.count).littleEndian
        try withUnsafeBytes(of: &length) { try writeAll(fd, $0, what) }
        try header.withUnsafeBytes { try writeAll(fd, $0, what) }
        for (item, count) in zip(sorted, counts) {
            #if _endian(little)
            try writeAll(fd, UnsafeRawBufferPointer(start: item.values, count: count * 4), what)
            #else
            var chunk = [UInt32](repeating: 0, count: min(count, 1 << 16))
            var done = 0
            while done < count {
                let n = min(chunk.count, count - done)
                for i in 0..<n { chunk[i] = item.values[done + i].bitPattern.littleEndian }
                try chunk.withUnsafeBytes { try writeAll(fd, UnsafeRawBufferPointer(rebasing: $0[0..<(n * 4)]), what) }
                done += n
            }
            #endif
        }
        guard fsync(fd) == 0 else { throw DeformUXError.io(what, "fsync failed: \(errnoText())", path: path, errno: Glibc.errno) }
        closed = true
        guard close(fd) == 0 else { throw DeformUXError.io(what, "close failed: \(errnoText())", path: path, errno: Glibc.errno) }
        guard rename(temp, path) == 0 else {
            throw DeformUXError.io(what, "cannot rename the temporary file to \(path): \(errnoText())", path: path, errno: Glibc.errno)
        }
        renamed = true
    }

    /// The JSON header (keys in the order given, `__metadata__` first), space-padded so that 8 + its
    /// length is a multiple of 8. Offsets pack the tensors back to back in the order given.
    static func headerBytes(_ tensors: [(String, [Int])], counts: [Int], metadata: [String: String]) -> [UInt8] {
        var parts: [String] = []
        if !metadata.isEmpty {
            let kv = metadata.keys.sorted().map { "\(jsonString($0)):\(jsonString(metadata[$0] ?? ""))" }
            parts.append("\"__metadata__\":{\(kv.joined(separator: ","))}")
        }
        var offset = 0
        for ((name, shape), count) in zip(tensors, counts) {
            let end = offset + count * 4
            let dims = shape.map(String.init).joined(separator: ",")
            parts.append("\(jsonString(name)):{\"dtype\":\"F32\",\"shape\":[\(dims)],\"data_offsets\":[\(offset),\(end)]}")
            offset = end
        }
        var bytes = Array("{\(parts.joined(separator: ","))}".utf8)
        while bytes.count % 8 != 0 { bytes.append(0x20) }
        return bytes
    }

    /// A JSON string literal.
    static func jsonString(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u.value < 0x20 {
                    let hex = String(u.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        return out + "\""
    }

    // MARK: reading

    /// The whole file, read once.
    static func readFile(_ path: String) throws -> [UInt8] {
        let what = "safetensors \(path)"
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw DeformUXError.io(what, "cannot open: \(errnoText())", path: path, errno: Glibc.errno) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw DeformUXError.io(what, "cannot stat: \(errnoText())", path: path, errno: Glibc.errno) }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw DeformUXError.io(what, "not a regular file") }
        let size = Int(st.st_size)
        var bytes = [UInt8](repeating: 0, count: size)
        var done = 0
        try bytes.withUnsafeMutableBytes { buffer in
            guard let base = buffer.baseAddress else { return }
            while done < size {
                let r = read(fd, base + done, size - done)
                if r < 0 {
                    if errno == EINTR { continue }
                    throw DeformUXError.io(what, "read failed after \(done) of \(size) bytes: \(errnoText())", path: path, errno: Glibc.errno)
                }
                if r == 0 { break }
                done += r
            }
        }
        guard done == size else {
            throw DeformUXError.io(what, "file shrank while reading (\(done) of \(size) bytes)")
        }
        return bytes
    }

    struct RawTensor {
        let name: String
        let dtype: String
        let shape: [Int]
        let offsets: [Int]
    }

    struct ParsedHeader {
        var tensors: [RawTensor] = []
        var metadata: [String: String] = [:]
    }

    private struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    /// The header object as decoded by JSONDecoder; per-entry problems are kept (not thrown) so that
    /// the error can name the tensor.
    private struct HeaderObject: Decodable {
        var tensors: [RawTensor] = []
        var metadata: [String: String]?
        var problems: [(String, String)] = []

        init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: Key.self)
            for key in c.allKeys {
                if key.stringValue == "__metadata__" {
                    do {
                        metadata = try c.decode([String: String].self, forKey: key)
                    } catch {
                        problems.append((key.stringValue, "__metadata__ must be an object mapping strings to strings"))
                    }
                    continue
                }
                do {
                    let t = try c.nestedContainer(keyedBy: Key.self, forKey: key)
                    let dtype = try t.decode(String.self, forKey: Key(stringValue: "dtype"))
                    let shape = try t.decode([Int].self, forKey: Key(stringValue: "shape"))
                    let offsets = try t.decode([Int].self, forKey: Key(stringValue: "data_offsets"))
                    tensors.append(RawTensor(name: key.stringValue, dtype: dtype, shape: shape, offsets: offsets))
                } catch {
                    problems.append((key.stringValue, "entry must be an object with \"dtype\" (string), \"shape\" (integers) and \"data_offsets\" (two integers): \(Safetensors.describe(error))"))
                }
            }
        }
    }

    static func parseHeader(_ header: ArraySlice<UInt8>, what: String) throws -> ParsedHeader {
        guard String(validating: header, as: UTF8.self) != nil else {
            throw DeformUXError.io(what, "header is not valid UTF-8")
        }
        // Must be a JSON object (JSONDecoder would also accept e.g. a top-level array into a keyed container error).
        guard let first = header.first(where: { $0 != 0x20 && $0 != 0x09 && $0 != 0x0A && $0 != 0x0D }), first == UInt8(ascii: "{") else {
            throw DeformUXError.io(what, "header is not a JSON object")
        }
        let object: HeaderObject
        do {
            object = try JSONDecoder().decode(HeaderObject.self, from: Data(header))
        } catch {
            throw DeformUXError.io(what, "header is not valid JSON: \(describe(error))")
        }
        if let (name, problem) = object.problems.sorted(by: { $0.0 < $1.0 }).first {
            let subject = name == "__metadata__" ? "" : "tensor \(name): "
            throw DeformUXError.io(what, "\(subject)\(problem)")
        }
        return ParsedHeader(tensors: object.tensors, metadata: object.metadata ?? [:])
    }

    /// A one-line description of a decoding error (the default one is long and nested).
    static func describe(_ error: Error) -> String {
        guard let e = error as? DecodingError else { return "\(error)" }
        switch e {
        case .typeMismatch(_, let c), .valueNotFound(_, let c), .keyNotFound(_, let c), .dataCorrupted(let c):
            let path = c.codingPath.map(\.stringValue).joined(separator: ".")
            return path.isEmpty ? c.debugDescription : "\(path): \(c.debugDescription)"
        @unknown default:
            return "\(error)"
        }
    }

    /// Converts `count` little-endian elements of `dtype` at `source` (any alignment) to Float.
    static func convert(_ source: UnsafeRawPointer, dtype: SafetensorsDType, count: Int,
                        to destination: UnsafeMutablePointer<Float>) {
        switch dtype {
        case .f32:
            #if _endian(little)
            UnsafeMutableRawPointer(destination).copyMemory(from: source, byteCount: count * 4)
            #else
            for i in 0..<count {
                destination[i] = Float(bitPattern: UInt32(littleEndian: source.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)))
            }
            #endif
        case .f64:
            for i in 0..<count {
                destination[i] = Float(Double(bitPattern: UInt64(littleEndian: source.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))))
            }
        case .bf16:
            for i in 0..<count {
                let h = UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))
                destination[i] = Float(bitPattern: UInt32(h) << 16)
            }
        case .f16:
            for i in 0..<count {
                destination[i] = halfToFloat(UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
            }
        }
    }

    /// IEEE 754 binary16 to binary32, exact (subnormals, infinities and NaNs included).
    static func halfToFloat(_ h: UInt16) -> Float {
        let sign = UInt32(h & 0x8000) << 16
        let exponent = Int((h >> 10) & 0x1F)
        let mantissa = UInt32(h & 0x3FF)
        if exponent == 0x1F {
            return Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13))
        }
        if exponent == 0 {
            // Subnormal or zero: mantissa * 2^-24.
            let magnitude = Float(mantissa) * Float(bitPattern: 0x3380_0000)  // 2^-24
            return sign != 0 ? -magnitude : magnitude
        }
        return Float(bitPattern: sign | UInt32(exponent - 15 + 127) << 23 | (mantissa << 13))
    }

    static func writeAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, _ what: String) throws {
        guard var p = buffer.baseAddress else { return }
        var left = buffer.count
        while left > 0 {
            let w = posixWrite(fd, p, left)
            if w < 0 {
                if errno == EINTR { continue }
                throw DeformUXError.io(what, "write failed: \(errnoText())", errno: Glibc.errno)
            }
            p += w
            left -= w
        }
    }

    static func errnoText() -> String {
        String(cString: strerror(errno))
    }
}

/// libc's write(2) (inside `Safetensors` the name `write` means the static functions above).
private func posixWrite(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Int {
    write(fd, p, n)
}
