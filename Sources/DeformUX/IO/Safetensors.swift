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

/// A parsed, validated safetensors file. Opening one reads only the 8-byte header length and the header
/// (both checked before anything else is read or allocated); tensor bytes are read from the file when a
/// tensor is copied, straight into the caller's memory, so a wrong multi-GB file fails fast and a right
/// one is never held in memory twice.
///
/// Checked when opening: the header length is at most `maxHeaderBytes` and inside the file; the header
/// is UTF-8 JSON, an object, with no key given twice in any of its objects; every entry has a known
/// dtype, a shape whose element count does not overflow, and `data_offsets` inside the data section
/// that match shape x dtype size; and the tensors tile the data section exactly (sorted by offset, each
/// begins where the previous one ends, the last ends at the end of the file: no gaps, no overlaps, no
/// trailing bytes, as the format requires).
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

    /// Where the data section's bytes come from: the open file, or the bytes given.
    private let source: SafetensorsSource
    /// Offset of the data section in `source` (8 + header length).
    private let dataStart: Int
    private let indexByName: [String: Int]

    /// Header length limit: a larger header is certainly not a weight file.
    public static let maxHeaderBytes = 100 * 1024 * 1024

    /// Opens and validates the file at `path`, reading its header only.
    public init(path: String) throws {
        let what = "safetensors \(path)"
        let file = try SafetensorsSource(openingFile: path, what: what)
        let size = file.size
        guard size >= 8 else {
            throw DeformUXError.io(what, "file is \(size) bytes, too short for the 8-byte header length", path: path)
        }
        var lengthBytes = [UInt8](repeating: 0, count: 8)
        try lengthBytes.withUnsafeMutableBytes { b in
            if let base = b.baseAddress { try file.read(into: base, at: 0, count: 8, what: what) }
        }
        let headerLength = try SafetensorsFile.checkedHeaderLength(lengthBytes, fileSize: size, what: what, path: path)
        // Allocated only now, for a length checked against the limit and the file's size.
        var header = [UInt8](repeating: 0, count: headerLength)
        try header.withUnsafeMutableBytes { b in
            if let base = b.baseAddress { try file.read(into: base, at: 8, count: headerLength, what: what) }
        }
        try self.init(header: header[...], fileSize: size, source: file, path: path)
    }

    /// Parses and validates `bytes` (a whole file in memory); `path` labels error messages.
    public init(bytes: [UInt8], path: String) throws {
        let what = "safetensors \(path)"
        guard bytes.count >= 8 else {
            throw DeformUXError.io(what, "file is \(bytes.count) bytes, too short for the 8-byte header length", path: path)
        }
        let headerLength = try SafetensorsFile.checkedHeaderLength(Array(bytes[0..<8]), fileSize: bytes.count, what: what, path: path)
        try self.init(header: bytes[8..<(8 + headerLength)], fileSize: bytes.count,
                      source: SafetensorsSource(bytes: bytes), path: path)
    }

    /// The header length N from the first 8 bytes (little-endian), checked against the limit and the file.
    private static func checkedHeaderLength(_ first8: [UInt8], fileSize: Int, what: String, path: String) throws -> Int {
        var n: UInt64 = 0
        for i in 0..<8 { n |= UInt64(first8[i]) << (8 * UInt64(i)) }
        guard n <= UInt64(SafetensorsFile.maxHeaderBytes) else {
            throw DeformUXError.io(what, "header length \(n) bytes is larger than the \(SafetensorsFile.maxHeaderBytes)-byte limit (not a safetensors file?)", path: path)
        }
        guard Int(n) <= fileSize - 8 else {
            throw DeformUXError.io(what, "header length \(n) bytes runs past the end of the file (\(fileSize) bytes; truncated?)", path: path)
        }
        return Int(n)
    }

    /// Validates the header (bytes 8..<8+N of a file of `fileSize` bytes) against the data section.
    private init(header headerBytes: ArraySlice<UInt8>, fileSize: Int, source: SafetensorsSource, path: String) throws {
        let what = "safetensors \(path)"
        let dataStart = 8 + headerBytes.count
        let dataLength = fileSize - dataStart
        let header: Safetensors.ParsedHeader
        do {
            header = try Safetensors.parseHeader(headerBytes, what: what)
        } catch var e as DeformUXError {
            e.path = path
            throw e
        }
        func fail(_ subject: String, _ message: String) -> DeformUXError {
            DeformUXError.io(subject, message, path: path)
        }

        var entries: [Entry] = []
        entries.reserveCapacity(header.tensors.count)
        for raw in header.tensors.sorted(by: { $0.name < $1.name }) {
            let t = "\(what): tensor \(raw.name)"
            guard let dtype = SafetensorsDType(rawValue: raw.dtype) else {
                let known = SafetensorsDType.allCases.map(\.rawValue).joined(separator: ", ")
                throw fail(t, "dtype \"\(raw.dtype)\" is not supported (expected one of \(known))")
            }
            let count: Int
            do {
                count = try Tensor.elementCount(raw.shape, context: t)
            } catch let e as DeformUXError {
                var bad = e  // a bad file, not a bad argument
                bad.kind = .io
                bad.path = path
                throw bad
            }
            guard raw.offsets.count == 2 else {
                throw fail(t, "data_offsets must be [begin, end], got \(raw.offsets)")
            }
            let begin = raw.offsets[0], end = raw.offsets[1]
            guard begin >= 0, begin <= end else {
                throw fail(t, "data_offsets [\(begin), \(end)] are not an increasing pair of non-negative offsets")
            }
            guard end <= dataLength else {
                throw fail(t, "data_offsets [\(begin), \(end)] run past the data section (\(dataLength) bytes; truncated file?)")
            }
            let expected = count * dtype.size  // count <= Int.max / 8 (elementCount)
            guard end - begin == expected else {
                throw fail(t, "\(end - begin) data bytes for shape \(raw.shape) of \(dtype.rawValue), expected \(count) x \(dtype.size) = \(expected)")
            }
            entries.append(Entry(name: raw.name, dtype: dtype, shape: raw.shape, byteRange: begin..<end, count: count))
        }

        // The tensors tile the data section: in offset order each begins where the last ended, and the
        // last ends at the end of the file. (A gap could hide other content; the format forbids it.)
        let byStart = entries.sorted {
            ($0.byteRange.lowerBound, $0.byteRange.upperBound, $0.name) < ($1.byteRange.lowerBound, $1.byteRange.upperBound, $1.name)
        }
        var position = 0
        var previous: Entry?
        for e in byStart {
            let r = e.byteRange
            if r.lowerBound < position, let p = previous {
                throw fail(what, "tensors \(p.name) (bytes \(p.byteRange.lowerBound)..<\(p.byteRange.upperBound)) and \(e.name) (bytes \(r.lowerBound)..<\(r.upperBound)) overlap")
            }
            if r.lowerBound > position {
                throw fail(what, "bytes \(position)..<\(r.lowerBound) of the data section belong to no tensor (a gap before tensor \(e.name)); tensors must tile the data section")
            }
            position = r.upperBound
            previous = e
        }
        guard position == dataLength else {
            throw fail(what, "the data section has \(dataLength - position) bytes after the last tensor (bytes \(position)..<\(dataLength) belong to no tensor); tensors must tile the data section")
        }

        self.path = path
        self.entries = entries
        self.metadata = header.metadata
        self.source = source
        self.dataStart = dataStart
        var index: [String: Int] = [:]
        for (i, e) in entries.enumerated() { index[e.name] = i }
        indexByName = index
    }

    /// Tensor names, sorted.
    public var names: [String] { entries.map(\.name) }

    public func entry(_ name: String) -> Entry? { indexByName[name].map { entries[$0] } }

    /// Converts the tensor `name` to Float into `destination`, which holds `count` floats (the tensor's
    /// element count, checked). Reads the tensor's bytes from the file (an io error if the file changed
    /// since it was opened and they are no longer there).
    public func copy(_ name: String, into destination: UnsafeMutablePointer<Float>, count: Int) throws {
        guard let e = entry(name) else {
            throw DeformUXError.invalidArgument("safetensors \(path)", "no tensor named \(name)")
        }
        guard count == e.count else {
            throw DeformUXError.shapeMismatch("safetensors \(path)", "tensor \(name) has \(e.count) elements (shape \(e.shape)), destination holds \(count)")
        }
        let what = "safetensors \(path): tensor \(name)"
        let start = dataStart + e.byteRange.lowerBound
        #if _endian(little)
        if e.dtype == .f32 {
            try source.read(into: UnsafeMutableRawPointer(destination), at: start, count: e.byteRange.count, what: what)
            return
        }
        #endif
        // Other dtypes (and F32 on big-endian machines): through a bounded buffer, converted chunk by chunk.
        let perChunk = max(1, min(e.count, Safetensors.conversionChunkBytes / e.dtype.size))
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: perChunk * e.dtype.size, alignment: 16)
        defer { buffer.deallocate() }
        var done = 0
        while done < e.count {
            let n = min(perChunk, e.count - done)
            try source.read(into: buffer, at: start + done * e.dtype.size, count: n * e.dtype.size, what: what)
            Safetensors.convert(UnsafeRawPointer(buffer), dtype: e.dtype, count: n, to: destination + done)
            done += n
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

/// The bytes of a safetensors file: an open file descriptor (closed when the last SafetensorsFile
/// using it goes), read with pread so that concurrent copies need no lock, or bytes in memory.
final class SafetensorsSource: @unchecked Sendable {
    private let fd: Int32
    private let bytes: [UInt8]
    let size: Int
    let path: String

    /// Opens `path` for reading; it must be a regular file.
    init(openingFile path: String, what: String) throws {
        let (fd, size) = try Files.openRegular(path, what: what)
        self.fd = fd
        self.bytes = []
        self.size = size
        self.path = path
    }

    init(bytes: [UInt8]) {
        fd = -1
        self.bytes = bytes
        size = bytes.count
        path = ""
    }

    deinit {
        if fd >= 0 { close(fd) }
    }

    /// Reads `count` bytes at `offset` into `destination`; an io error if they are not all there.
    func read(into destination: UnsafeMutableRawPointer, at offset: Int, count: Int, what: String) throws {
        guard count > 0 else { return }
        guard offset >= 0, offset <= size, count <= size - offset else {
            throw DeformUXError.io(what, "bytes \(offset)..<\(offset + count) are outside the file (\(size) bytes)", path: path.isEmpty ? nil : path)
        }
        if fd < 0 {
            bytes.withUnsafeBytes { b in
                if let base = b.baseAddress { destination.copyMemory(from: base + offset, byteCount: count) }
            }
            return
        }
        var done = 0
        while done < count {
            let r = pread(fd, destination + done, count - done, off_t(offset + done))
            if r < 0 {
                let code = errno
                if code == EINTR { continue }
                throw DeformUXError.io(what, "read failed after \(done) of \(count) bytes at offset \(offset): \(Files.errnoText(code))", path: path, errno: code)
            }
            if r == 0 {
                throw DeformUXError.io(what, "the file ended after \(offset + done) of the \(size) bytes it had when opened (changed while reading?)", path: path)
            }
            done += r
        }
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

        try Files.atomicWrite(path, what: what) { fd in
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
        }
    }

    /// The JSON header (keys in the order given, `__metadata__` first), space-padded so that 8 + its
    /// length is a multiple of 8. Offsets pack the tensors back to back in the order given.
    static func headerBytes(_ tensors: [(String, [Int])], counts: [Int], metadata: [String: String]) -> [UInt8] {
        var parts: [String] = []
        if !metadata.isEmpty {
            let kv = metadata.keys.sorted().map { "\(JSONText.string($0)):\(JSONText.string(metadata[$0] ?? ""))" }
            parts.append("\"__metadata__\":{\(kv.joined(separator: ","))}")
        }
        var offset = 0
        for ((name, shape), count) in zip(tensors, counts) {
            let end = offset + count * 4
            let dims = shape.map(String.init).joined(separator: ",")
            parts.append("\(JSONText.string(name)):{\"dtype\":\"F32\",\"shape\":[\(dims)],\"data_offsets\":[\(offset),\(end)]}")
            offset = end
        }
        var bytes = Array("{\(parts.joined(separator: ","))}".utf8)
        while bytes.count % 8 != 0 { bytes.append(0x20) }
        return bytes
    }

    // MARK: reading

    /// Bytes per read when converting F16/BF16/F64 (bounded scratch, whatever the tensor's size).
    static let conversionChunkBytes = 1 << 20

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
        // JSONDecoder keeps one of two equal keys silently (and other readers may keep the other one):
        // a header that means different things to different readers is rejected.
        if let (container, key) = firstRepeatedKey(header) {
            let subject: String
            switch container.count {
            case 0: subject = key == "__metadata__" ? "" : "tensor "
            case 1: subject = container[0] == "__metadata__" ? "__metadata__: key " : "tensor \(container[0]): key "
            default: subject = "\(container.joined(separator: " > ")): key "
            }
            let where_ = container.isEmpty ? "the header" : "its object"
            throw DeformUXError.io(what, "\(subject)\"\(key)\" is given twice in \(where_); every key must be unique")
        }
        if let (name, problem) = object.problems.sorted(by: { $0.0 < $1.0 }).first {
            let subject = name == "__metadata__" ? "" : "tensor \(name): "
            throw DeformUXError.io(what, "\(subject)\(problem)")
        }
        return ParsedHeader(tensors: object.tensors, metadata: object.metadata ?? [:])
    }

    /// The first key that appears twice in one object of the JSON text `json` (at any depth): the keys
    /// of the objects around it (outermost first) and the key. Nil if every object's keys are unique.
    /// Keys are compared after decoding their escapes, as Swift Strings (so also when two spellings
    /// decode to the same key). Expects valid JSON (JSONDecoder has accepted it); on anything else it
    /// stops and returns nil. Iterative: nesting depth costs no stack.
    static func firstRepeatedKey(_ json: ArraySlice<UInt8>) -> (container: [String], key: String)? {
        struct Frame {
            let isObject: Bool
            /// The key this container is the value of (nil at the top or inside an array).
            let name: String?
            var keys: Set<String> = []
            var lastKey: String?
        }
        let quote = UInt8(ascii: "\""), backslash = UInt8(ascii: "\\")
        var stack: [Frame] = []
        var expectKey = false
        var i = json.startIndex
        let end = json.endIndex

        /// Decodes the string starting at the quote at `i`; leaves `i` after the closing quote.
        func string() -> String? {
            var utf8: [UInt8] = []
            i += 1
            while i < end {
                let c = json[i]
                if c == quote { i += 1; return String(decoding: utf8, as: UTF8.self) }
                if c != backslash { utf8.append(c); i += 1; continue }
                guard i + 1 < end else { return nil }
                let e = json[i + 1]
                i += 2
                switch e {
                case UInt8(ascii: "b"): utf8.append(0x08)
                case UInt8(ascii: "f"): utf8.append(0x0C)
                case UInt8(ascii: "n"): utf8.append(0x0A)
                case UInt8(ascii: "r"): utf8.append(0x0D)
                case UInt8(ascii: "t"): utf8.append(0x09)
                case UInt8(ascii: "u"):
                    func hex4() -> UInt32? {
                        guard i + 4 <= end else { return nil }
                        var v: UInt32 = 0
                        for k in 0..<4 {
                            let h = json[i + k]
                            switch h {
                            case UInt8(ascii: "0")...UInt8(ascii: "9"): v = v << 4 | UInt32(h - UInt8(ascii: "0"))
                            case UInt8(ascii: "a")...UInt8(ascii: "f"): v = v << 4 | UInt32(h - UInt8(ascii: "a") + 10)
                            case UInt8(ascii: "A")...UInt8(ascii: "F"): v = v << 4 | UInt32(h - UInt8(ascii: "A") + 10)
                            default: return nil
                            }
                        }
                        i += 4
                        return v
                    }
                    guard var v = hex4() else { return nil }
                    if (0xD800..<0xDC00).contains(v), i + 1 < end, json[i] == backslash, json[i + 1] == UInt8(ascii: "u") {
                        let save = i
                        i += 2
                        if let low = hex4(), (0xDC00..<0xE000).contains(low) {
                            v = 0x10000 + ((v - 0xD800) << 10) + (low - 0xDC00)
                        } else {
                            i = save
                        }
                    }
                    utf8.append(contentsOf: String(Character(Unicode.Scalar(v) ?? "\u{FFFD}")).utf8)
                default: utf8.append(e)  // \" \\ \/
                }
            }
            return nil
        }

        while i < end {
            let c = json[i]
            switch c {
            case 0x20, 0x09, 0x0A, 0x0D, UInt8(ascii: ":"):
                i += 1
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                let name = stack.last.flatMap { $0.isObject ? $0.lastKey : nil }
                stack.append(Frame(isObject: c == UInt8(ascii: "{"), name: name))
                expectKey = c == UInt8(ascii: "{")
                i += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                guard !stack.isEmpty else { return nil }
                stack.removeLast()
                expectKey = false
                i += 1
            case UInt8(ascii: ","):
                expectKey = stack.last?.isObject ?? false
                i += 1
            case quote:
                guard let s = string() else { return nil }
                if expectKey, !stack.isEmpty {
                    if stack[stack.count - 1].keys.contains(s) {
                        return (stack.compactMap(\.name), s)
                    }
                    stack[stack.count - 1].keys.insert(s)
                    stack[stack.count - 1].lastKey = s
                    expectKey = false
                }
            default:  // a number, true, false or null
                while i < end, !"{}[],: \t\r\n".utf8.contains(json[i]) { i += 1 }
            }
        }
        return nil
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
                let e = errno
                if e == EINTR { continue }
                throw DeformUXError.io(what, "write failed: \(Files.errnoText(e))", errno: e)
            }
            p += w
            left -= w
        }
    }
}

/// libc's write(2) (inside `Safetensors` the name `write` means the static functions above).
private func posixWrite(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Int {
    write(fd, p, n)
}
