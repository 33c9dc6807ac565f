import Foundation
import XCTest
@testable import DeformUX

/// Safetensors reading/writing (IO/Safetensors.swift) and strict state-dict loading (IO/StateDict.swift).
final class SafetensorsTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Fixtures/network")

    private var tempDir: URL!

    override func setUpWithError() throws {
        tempDir = FileManager.default.temporaryDirectory
            .appendingPathComponent("deformux-safetensors-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tempDir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: tempDir)
    }

    // MARK: helpers

    /// A file: the 8-byte length (or `length`), the header text, the data bytes.
    private func fileBytes(_ header: String, data: [UInt8], length: UInt64? = nil) -> [UInt8] {
        let h = Array(header.utf8)
        var n = (length ?? UInt64(h.count)).littleEndian
        return withUnsafeBytes(of: &n) { Array($0) } + h + data
    }

    private func floatBytes(_ values: [Float]) -> [UInt8] {
        values.flatMap { v -> [UInt8] in
            let b = v.bitPattern.littleEndian
            return [UInt8(b & 0xFF), UInt8((b >> 8) & 0xFF), UInt8((b >> 16) & 0xFF), UInt8(b >> 24)]
        }
    }

    /// Asserts that parsing `bytes` throws a DeformUXError whose message contains every fragment.
    private func assertRejects(_ bytes: [UInt8], _ fragments: [String], _ label: String,
                               file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try SafetensorsFile(bytes: bytes, path: "case.safetensors")
            XCTFail("\(label): parsed without error", file: file, line: line)
        } catch let e as DeformUXError {
            if ProcessInfo.processInfo.environment["PRINT_ERRORS"] != nil { print("\(label): \(e.description)") }
            for f in fragments + ["case.safetensors"] where !e.description.contains(f) {
                XCTFail("\(label): message does not mention \"\(f)\": \(e.description)", file: file, line: line)
            }
        } catch {
            XCTFail("\(label): threw a non-DeformUXError \(error)", file: file, line: line)
        }
    }

    private func layout(_ params: [(String, [Int])]) throws -> ParameterLayout {
        var l = ParameterLayout()
        for (n, s) in params { _ = try l.add(n, shape: s) }
        return l
    }

    private func values(_ shape: [Int], _ start: Float) -> [Float] {
        (0..<shape.reduce(1, *)).map { start + Float($0) * 0.25 }
    }

    // MARK: writing and reading

    func testRoundTripIsExactSortedAlignedAndAtomic() throws {
        let path = tempDir.appendingPathComponent("rt.safetensors").path
        var rng = SplitMix64(seed: 7)
        let tensors: [String: Tensor] = [
            "z.last": try Tensor(shape: [2, 3, 1, 1, 5], values: rng.floats(30)),
            "a.first": try Tensor(shape: [7], values: rng.floats(7)),
            "scalar": try Tensor(shape: [], values: [-0.0]),
            "empty": try Tensor(shape: [0, 3], values: []),
            "m.specials": try Tensor(shape: [4], values: [.infinity, -.infinity, .leastNonzeroMagnitude, .greatestFiniteMagnitude]),
        ]
        let metadata = ["deformux.config": "{\"a\": [1, 2]}", "note": "line\nbreak \"quoted\" \\ tab\t é"]
        try Safetensors.write(tensors, metadata: metadata, to: path)
        // Overwriting an existing file goes through the same temp-and-rename.
        try Safetensors.write(tensors, metadata: metadata, to: path)

        let f = try SafetensorsFile(path: path)
        XCTAssertEqual(f.names, tensors.keys.sorted())
        XCTAssertEqual(f.metadata, metadata)
        for (name, t) in tensors {
            let e = try XCTUnwrap(f.entry(name), name)
            XCTAssertEqual(e.shape, t.shape, name)
            XCTAssertEqual(e.dtype, .f32, name)
            XCTAssertEqual(try f.floats(name).map(\.bitPattern), try t.toArray().map(\.bitPattern), name)
        }
        // Packed in name order.
        let starts = f.entries.map(\.byteRange.lowerBound)
        XCTAssertEqual(starts, starts.sorted())
        // Header: 8 + N is a multiple of 8, padding is spaces.
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        let n = bytes[0..<8].enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
        XCTAssertEqual((8 + n) % 8, 0)
        let header = bytes[8..<(8 + n)]
        let close = try XCTUnwrap(header.lastIndex(of: UInt8(ascii: "}")))
        XCTAssertTrue(header[(close + 1)...].allSatisfy { $0 == 0x20 }, "header padding must be spaces")
        // No temporary files are left behind.
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: tempDir.path), ["rt.safetensors"])
    }

    func testWriteErrorsAreThrownNotTrapped() throws {
        let t = try Tensor(shape: [2], values: [1, 2])
        XCTAssertThrowsError(try Safetensors.write(["x": t], to: tempDir.path + "/no/such/dir/x.safetensors")) { e in
            XCTAssertTrue((e as? DeformUXError)?.description.contains("no/such/dir") ?? false, "\(e)")
        }
        XCTAssertThrowsError(try Safetensors.write(["__metadata__": t], to: tempDir.path + "/m.safetensors"))
        let p = UnsafePointer(t.pointer)
        XCTAssertThrowsError(try Safetensors.write([.init(name: "a", shape: [2], values: p), .init(name: "a", shape: [2], values: p)],
                                                   to: tempDir.path + "/d.safetensors")) { e in
            XCTAssertTrue("\(e)".contains("a is given twice"), "\(e)")
        }
        XCTAssertThrowsError(try SafetensorsFile(path: tempDir.path + "/missing.safetensors")) { e in
            XCTAssertTrue("\(e)".contains("missing.safetensors") && "\(e)".contains("cannot open"), "\(e)")
        }
    }

    /// interop_tiny.safetensors was written by the `safetensors` Python package (tools/make_network_fixtures.py).
    func testReadsFileWrittenByPythonSafetensors() throws {
        let f = try SafetensorsFile(path: Self.fixtures.appendingPathComponent("interop_tiny.safetensors").path)
        XCTAssertEqual(f.metadata, ["format": "pt"])
        XCTAssertEqual(f.names, ["a_f32", "b_f16", "c_bf16", "d_f64", "e_scalar", "f_empty"])
        XCTAssertEqual(f.entry("a_f32")?.shape, [2, 3])
        XCTAssertEqual(try f.floats("a_f32"), [-1, -0.5, 0, 0.5, 1, 1.5])
        XCTAssertEqual(f.entry("b_f16")?.dtype, .f16)
        let half = try f.floats("b_f16")
        XCTAssertEqual(half, [1, -2.5, 0x1p-10, 65504, 0x1p-24, 0])
        XCTAssertEqual(half[5].sign, .minus)
        XCTAssertEqual(f.entry("c_bf16")?.dtype, .bf16)
        XCTAssertEqual(try f.floats("c_bf16"), [1, -3.5, 256, 0.15625])
        XCTAssertEqual(f.entry("d_f64")?.shape, [3, 1])
        XCTAssertEqual(try f.floats("d_f64"), [Float(0.1), Float(-1e-3), Float(1e30)])
        XCTAssertEqual(f.entry("e_scalar")?.shape, [])
        XCTAssertEqual(try f.floats("e_scalar"), [3.25])
        XCTAssertEqual(f.entry("f_empty")?.shape, [0, 4])
        XCTAssertEqual(try f.floats("f_empty"), [])
        let t = try f.tensor("a_f32")
        XCTAssertEqual(t.shape, [2, 3])
        XCTAssertEqual(t[1, 2], 1.5)
    }

    #if !(os(macOS) && arch(x86_64))
    func testHalfConversionIsExactForAllBitPatterns() {
        for bits in 0...UInt16.max {
            let want = Float(Float16(bitPattern: bits))
            let got = Safetensors.halfToFloat(bits)
            if want.isNaN { XCTAssertTrue(got.isNaN, "half \(bits)") } else {
                XCTAssertEqual(got.bitPattern, want.bitPattern, "half \(String(bits, radix: 16))")
            }
        }
    }
    #endif

    func testNetworkFixtureWeightsCarryTheirConfiguration() throws {
        let f = try SafetensorsFile(path: Self.fixtures.appendingPathComponent("dense_aligned.safetensors").path)
        XCTAssertEqual(f.entries.reduce(0) { $0 + $1.count }, 237_311)
        let config = try XCTUnwrap(f.metadata["deformux.config"])
        XCTAssertTrue(config.contains("\"mlp\": \"dense\""), config)
        XCTAssertEqual(f.entry("deformuxnet_3d.stages.0.0.ddc.conv_offset.weight")?.shape, [81, 8, 1, 1, 1])
    }

    // MARK: corrupt files

    func testEveryCorruptionThrowsANamedError() throws {
        let data = floatBytes([1, 2, 3, 4, 5, 6])
        func h(_ body: String) -> String { "{" + body + "}" }
        let good = h(#""a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}"#)
        XCTAssertNoThrow(try SafetensorsFile(bytes: fileBytes(good, data: data), path: "good"))

        let cases: [(String, [UInt8], [String])] = [
            ("empty file", [], ["too short"]),
            ("5 bytes", [1, 0, 0, 0, 0], ["too short"]),
            ("header length past EOF", fileBytes(good, data: data, length: UInt64(good.utf8.count + data.count + 1)), ["past the end of the file"]),
            ("header length huge", fileBytes(good, data: data, length: UInt64.max), ["limit"]),
            ("truncated data", Array(fileBytes(good, data: data).dropLast(3)), ["tensor b", "past the data section"]),
            ("bad JSON", fileBytes(#"{"a": {"dtype": "F32", "#, data: data), ["not valid JSON"]),
            ("JSON array", fileBytes("[1, 2]", data: data), ["not a JSON object"]),
            ("empty header", fileBytes("", data: data), ["not a JSON object"]),
            ("invalid UTF-8", fileBytes("", data: [0x7B, 0xFF, 0xFE, 0x7D] + data, length: 4), ["UTF-8"]),
            ("unknown dtype", fileBytes(h(#""a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}"#), data: data), ["tensor a", "Q7"]),
            ("integer dtype", fileBytes(h(#""a":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}"#), data: data), ["tensor a", "I32", "not supported"]),
            ("negative size", fileBytes(h(#""a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}"#), data: data), ["tensor a", "negative"]),
            ("shape overflow", fileBytes(h(#""a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}"#), data: data), ["tensor a", "too large"]),
            ("offsets past data", fileBytes(h(#""a":{"dtype":"F32","shape":[2],"data_offsets":[24,32]}"#), data: data), ["tensor a", "past the data section"]),
            ("negative offset", fileBytes(h(#""a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}"#), data: data), ["tensor a", "[-8, 0]"]),
            ("reversed offsets", fileBytes(h(#""a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}"#), data: data), ["tensor a", "[8, 0]"]),
            ("three offsets", fileBytes(h(#""a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,16]}"#), data: data), ["tensor a", "data_offsets"]),
            ("size mismatch", fileBytes(h(#""a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}"#), data: data), ["tensor a", "8 data bytes", "expected 3 x 4 = 12"]),
            ("F16 size mismatch", fileBytes(h(#""a":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}"#), data: data), ["tensor a", "expected 2 x 2 = 4"]),
            ("overlap", fileBytes(h(#""a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}"#), data: data), ["a", "b", "overlap"]),
            ("missing dtype", fileBytes(h(#""w":{"shape":[2],"data_offsets":[0,8]}"#), data: data), ["tensor w", "dtype"]),
            ("shape not integers", fileBytes(h(#""w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}"#), data: data), ["tensor w", "shape"]),
            ("entry not an object", fileBytes(h(#""w":[1,2]"#), data: data), ["tensor w"]),
            ("metadata not strings", fileBytes(h(#""__metadata__":{"k":1}"#), data: data), ["__metadata__"]),
        ]
        for (label, bytes, fragments) in cases {
            assertRejects(bytes, fragments, label)
        }
    }

    /// JSONDecoder keeps one of two equal keys silently (Python's json the last), so a header with a
    /// repeated key means different things to different readers: rejected, in any object.
    func testRepeatedKeysAreRejected() throws {
        let data = floatBytes([1, 2, 3, 4, 5, 6])
        let a = #""a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#
        let b = #""b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}"#
        let cases: [(String, String, [String])] = [
            ("tensor twice, same entry", "{\(a),\(b),\(a)}", ["tensor \"a\" is given twice in the header"]),
            ("tensor twice, other offsets", "{\(a),\(b),\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}",
             ["\"a\" is given twice"]),
            ("escaped spelling of the same key", "{\(a),\(b),\"\\u0061\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
             ["\"a\" is given twice"]),
            ("__metadata__ twice", #"{"__metadata__":{"k":"1"},"# + "\(a),\(b)," + #""__metadata__":{"k":"2"}}"#,
             ["\"__metadata__\" is given twice"]),
            ("metadata key twice", #"{"__metadata__":{"deformux.config":"{}","deformux.config":"{\"mlp\": \"none\"}"},"# + "\(a),\(b)}",
             ["__metadata__: key \"deformux.config\" is given twice"]),
            ("dtype twice", #"{"a":{"dtype":"F16","dtype":"F32","shape":[2],"data_offsets":[0,8]},"# + "\(b)}",
             ["tensor a: key \"dtype\" is given twice"]),
            ("data_offsets twice", #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[16,24],"data_offsets":[0,8]},"# + "\(b)}",
             ["tensor a: key \"data_offsets\" is given twice"]),
        ]
        XCTAssertNoThrow(try SafetensorsFile(bytes: fileBytes("{\(a),\(b)}", data: data), path: "good"))
        for (label, header, fragments) in cases {
            assertRejects(fileBytes(header, data: data), fragments, label)
        }
        // Keys that only look alike are different keys; nested objects may reuse their parent's keys.
        XCTAssertNoThrow(try SafetensorsFile(bytes: fileBytes(#"{"__metadata__":{"a":"x","A":"y","a ":"z"},"# + "\(a),\(b)}", data: data),
                                             path: "distinct keys"))
    }

    /// The format requires the tensors to tile the data section: no gap before, between or after them.
    func testGapsAndTrailingBytesAreRejected() throws {
        func entry(_ name: String, _ begin: Int, _ end: Int) -> String {
            #""\#(name)":{"dtype":"F32","shape":[\#((end - begin) / 4)],"data_offsets":[\#(begin),\#(end)]}"#
        }
        let cases: [(String, String, Int, [String])] = [
            ("gap between", "{\(entry("a", 0, 8)),\(entry("b", 12, 20))}", 20, ["bytes 8..<12", "gap before tensor b", "tile"]),
            ("gap at the start", "{\(entry("a", 4, 12))}", 12, ["bytes 0..<4", "gap before tensor a"]),
            ("trailing bytes", "{\(entry("a", 0, 8)),\(entry("b", 8, 16))}", 20, ["4 bytes after the last tensor", "16..<20"]),
            ("no tensors, some data", #"{"__metadata__":{"k":"v"}}"#, 4, ["4 bytes after the last tensor"]),
            ("empty tensor in a gap", "{\(entry("a", 0, 8)),\(entry("e", 12, 12)),\(entry("b", 12, 16))}", 16, ["bytes 8..<12", "gap before tensor"]),
            ("empty tensor inside another", "{\(entry("a", 0, 8)),\(entry("e", 4, 4))}", 8, ["a", "e", "overlap"]),
        ]
        for (label, header, dataBytes, fragments) in cases {
            assertRejects(fileBytes(header, data: [UInt8](repeating: 0, count: dataBytes)), fragments, label)
        }
        // Empty tensors where the next tensor begins, or at the very end, are allowed; so is no data at all.
        for (label, header, dataBytes) in [("empty first", "{\(entry("e", 0, 0)),\(entry("a", 0, 8))}", 8),
                                            ("empty last", "{\(entry("a", 0, 8)),\(entry("e", 8, 8))}", 8),
                                            ("only metadata", #"{"__metadata__":{"k":"v"}}"#, 0)] {
            XCTAssertNoThrow(try SafetensorsFile(bytes: fileBytes(header, data: [UInt8](repeating: 0, count: dataBytes)), path: label), label)
        }
    }

    /// Opening reads the 8-byte length and the header, checks them, and stops: a wrong file of several GB
    /// (sparse here: no disk used) is rejected without reading or allocating its size. Checked by the
    /// peak resident memory of this process around the call (Linux: VmHWM, reset through clear_refs).
    func testAWrongHugeFileFailsWithoutReadingIt() throws {
        let path = tempDir.appendingPathComponent("huge.safetensors").path
        let header = Array(#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.utf8)
        var n = UInt64(header.count).littleEndian
        try Data(withUnsafeBytes(of: &n) { Array($0) } + header + [UInt8](repeating: 0, count: 8)).write(to: URL(fileURLWithPath: path))
        let size: Int64 = 3 << 30
        guard truncate(path, off_t(size)) == 0 else { throw XCTSkip("cannot make a sparse file here") }
        let before = try peakResidentBytesAfterReset()
        XCTAssertThrowsError(try SafetensorsFile(path: path)) { e in
            let m = "\(e)"
            XCTAssertTrue(m.contains(path) && m.contains("after the last tensor"), m)
            XCTAssertEqual((e as? DeformUXError)?.kind, .io)
        }
        let grown = try peakResidentBytes() - before
        XCTAssertLessThan(grown, 64 << 20, "opening a wrong 3 GB file raised the peak resident memory by \(grown >> 20) MB")
    }

    /// The peak resident memory (VmHWM) after resetting it to the current resident size.
    private func peakResidentBytesAfterReset() throws -> Int {
        #if os(Linux)
        guard (try? "5".write(toFile: "/proc/self/clear_refs", atomically: false, encoding: .utf8)) != nil else {
            throw XCTSkip("cannot reset the peak resident memory (/proc/self/clear_refs)")
        }
        return try peakResidentBytes()
        #else
        throw XCTSkip("measures memory through /proc (Linux)")
        #endif
    }

    private func peakResidentBytes() throws -> Int {
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
              let kb = Int(line.split(separator: " ").dropFirst().first ?? "") else {
            throw XCTSkip("no VmHWM in /proc/self/status")
        }
        return kb * 1024
    }

    /// Tensors are read when copied: a file truncated after opening gives an io error naming it, not a trap.
    func testFileTruncatedAfterOpeningGivesAnError() throws {
        let path = tempDir.appendingPathComponent("shrinks.safetensors").path
        let t = try Tensor(shape: [1000], values: (0..<1000).map(Float.init))
        try Safetensors.write(["w": t, "a": try Tensor(shape: [2], values: [7, 8])], to: path)
        let f = try SafetensorsFile(path: path)
        XCTAssertEqual(try f.floats("a"), [7, 8])
        XCTAssertEqual(truncate(path, off_t(try XCTUnwrap(f.entry("w")).byteRange.lowerBound + 100)), 0)
        XCTAssertThrowsError(try f.floats("w")) { e in
            let m = "\(e)"
            XCTAssertTrue(m.contains(path) && m.contains("tensor w") && m.contains("changed while reading"), m)
            XCTAssertEqual((e as? DeformUXError)?.kind, .io)
        }
    }

    /// F16, BF16 and F64 tensors larger than the conversion buffer convert chunk by chunk, exactly.
    func testLargeConvertedTensorsReadInChunks() throws {
        let count = Safetensors.conversionChunkBytes / 2 * 3 + 17  // F16: three chunks and a bit
        var halves = [UInt16](repeating: 0, count: count)
        for i in 0..<count { halves[i] = UInt16(truncatingIfNeeded: i &* 2654435761 >> 7) & 0x7BFF }  // no NaN/inf
        let doubles = (0..<(count / 3)).map { Double($0) * 0.001 - 7 }
        var data = halves.withUnsafeBytes { Array($0) }
        let f64Begin = data.count
        data += doubles.withUnsafeBytes { Array($0) }
        let header = #"{"h":{"dtype":"F16","shape":[\#(count)],"data_offsets":[0,\#(f64Begin)]},"# +
            #""d":{"dtype":"F64","shape":[\#(doubles.count)],"data_offsets":[\#(f64Begin),\#(data.count)]}}"#
        let path = tempDir.appendingPathComponent("big16.safetensors").path
        try Data(fileBytes(header, data: data)).write(to: URL(fileURLWithPath: path))
        let f = try SafetensorsFile(path: path)
        XCTAssertEqual(try f.floats("h").map(\.bitPattern), halves.map { Safetensors.halfToFloat($0).bitPattern })
        XCTAssertEqual(try f.floats("d"), doubles.map { Float($0) })
    }

    func testCorruptFileOnDiskNamesThePath() throws {
        let path = tempDir.appendingPathComponent("broken.safetensors").path
        let t = try Tensor(shape: [3], values: [1, 2, 3])
        try Safetensors.write(["w": t], to: path)
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        try Data(bytes.dropLast(1)).write(to: URL(fileURLWithPath: path))
        XCTAssertThrowsError(try SafetensorsFile(path: path)) { e in
            let m = "\(e)"
            XCTAssertTrue(m.contains(path) && m.contains("tensor w") && m.contains("truncated"), m)
        }
    }

    // MARK: state dicts

    private let params: [(String, [Int])] = [
        ("deformuxnet_3d.stages.0.0.ddc.weight", [2, 1, 3, 3, 3]),
        ("deformuxnet_3d.stages.0.0.ddc.conv_offset.bias", [81]),
        ("deformuxnet_3d.norm0.weight", [2]),
        ("encoder1.layer.conv1.conv.weight", [2, 1, 3, 3, 3]),
        ("out.conv.conv.bias", [3]),
    ]

    private func fullDict(_ rename: (String) -> String = { $0 }) -> [String: (shape: [Int], values: [Float])] {
        var d: [String: (shape: [Int], values: [Float])] = [:]
        for (i, (n, s)) in params.enumerated() { d[rename(n)] = (s, values(s, Float(i))) }
        return d
    }

    func testStrictLoadListsEveryProblemAndLoadsNothing() throws {
        let store = try ParameterStore(layout: layout(params))
        var d = fullDict()
        d["deformuxnet_3d.norm0.weight"] = nil                       // missing
        d["out.conv.conv.bias"] = nil                                // missing
        d["encoder1.layer.conv1.conv.weight"] = ([2, 1, 1, 1, 1], [1, 2])   // wrong shape
        d["decoder9.bogus"] = ([1], [0])                             // unexpected
        d["module.another.bogus"] = ([1], [0])                       // unexpected
        XCTAssertThrowsError(try store.load(d)) { e in
            let m = (e as? DeformUXError)?.description ?? "not a DeformUXError: \(e)"
            for fragment in ["missing (2): deformuxnet_3d.norm0.weight, out.conv.conv.bias",
                             "unexpected (2): decoder9.bogus, module.another.bogus",
                             "wrong shape (1): encoder1.layer.conv1.conv.weight expected [2, 1, 3, 3, 3] got [2, 1, 1, 1, 1]",
                             "nothing was loaded"] {
                XCTAssertTrue(m.contains(fragment), "missing \"\(fragment)\" in: \(m)")
            }
        }
        XCTAssertTrue(try store.tensor("deformuxnet_3d.stages.0.0.ddc.weight").toArray().allSatisfy { $0 == 0 },
                      "a failed strict load must not write anything")
    }

    func testNonStrictLoadsWhatMatchesAndReportsTheRest() throws {
        let store = try ParameterStore(layout: layout(params))
        var d = fullDict()
        d["out.conv.conv.bias"] = nil
        d["deformuxnet_3d.norm0.weight"] = ([3], [1, 2, 3])
        d["extra"] = ([1], [5])
        let r = try store.load(d, strict: false)
        XCTAssertEqual(r.missing, ["out.conv.conv.bias"])
        XCTAssertEqual(r.unexpected, ["extra"])
        XCTAssertEqual(r.mismatched, [.init(name: "deformuxnet_3d.norm0.weight", expected: [2], got: [3])])
        XCTAssertEqual(r.loaded.count, 3)
        XCTAssertFalse(r.isComplete)
        XCTAssertEqual(try store.tensor("encoder1.layer.conv1.conv.weight").toArray(), values([2, 1, 3, 3, 3], 3))
        XCTAssertEqual(try store.tensor("deformuxnet_3d.norm0.weight").toArray(), [0, 0])
    }

    func testModulePrefixAndPrototypeNamesAreAccepted() throws {
        XCTAssertEqual(ParameterStore.normalizedParameterName("module.convxnet.stages.1.0.dcn.conv_offset.weight"),
                       "deformuxnet_3d.stages.1.0.ddc.conv_offset.weight")
        XCTAssertEqual(ParameterStore.normalizedParameterName("module.module.out.conv.conv.bias"), "out.conv.conv.bias")
        XCTAssertEqual(ParameterStore.normalizedParameterName("uxnet_3d.stages.0.0.dwconv.weight"), "uxnet_3d.stages.0.0.dwconv.weight")

        let store = try ParameterStore(layout: layout(params))
        let d = fullDict { n in
            "module." + (n.hasPrefix("deformuxnet_3d.") ? "convxnet." + n.dropFirst("deformuxnet_3d.".count) : n)
                .replacing(".ddc.", with: ".dcn.")
        }
        XCTAssertTrue(d.keys.contains("module.convxnet.stages.0.0.dcn.weight"))
        let r = try store.load(d)
        XCTAssertTrue(r.isComplete, "\(r)")
        XCTAssertEqual(try store.tensor("deformuxnet_3d.stages.0.0.ddc.conv_offset.bias").toArray(), values([81], 1))
    }

    func testTwoKeysForOneParameterAreRejected() throws {
        let store = try ParameterStore(layout: layout(params))
        var d = fullDict()
        d["module.out.conv.conv.bias"] = ([3], [9, 9, 9])
        XCTAssertThrowsError(try store.load(d)) { e in
            XCTAssertTrue("\(e)".contains("out.conv.conv.bias <- module.out.conv.conv.bias, out.conv.conv.bias"), "\(e)")
        }
    }

    func testSaveAndLoadSafetensorsRoundTrip() throws {
        let store = try ParameterStore(layout: layout(params))
        try store.load(fullDict())
        let path = tempDir.appendingPathComponent("params.safetensors").path
        try store.save(safetensors: path, metadata: ["deformux.config": "{}"])
        XCTAssertEqual(try SafetensorsFile(path: path).metadata, ["deformux.config": "{}"])

        let back = try ParameterStore(layout: layout(params))
        let r = try back.load(safetensors: path)
        XCTAssertTrue(r.isComplete)
        let a = try store.stateDict(), b = try back.stateDict()
        XCTAssertEqual(Set(a.keys), Set(b.keys))
        for (k, v) in a {
            XCTAssertEqual(b[k]?.shape, v.shape, k)
            XCTAssertEqual(b[k]?.values, v.values, k)
        }
        // A model with one parameter more: strict loading names it, from a file too.
        let bigger = try ParameterStore(layout: layout(params + [("decoder1.layer.conv2.conv.weight", [2, 2, 3, 3, 3])]))
        XCTAssertThrowsError(try bigger.load(safetensors: path)) { e in
            let m = "\(e)"
            XCTAssertTrue(m.contains(path) && m.contains("missing (1): decoder1.layer.conv2.conv.weight"), m)
        }
    }

    /// released_layout.safetensors holds grouped_official's weights under module.convxnet.* / .dcn. names.
    func testReleasedLayoutFixtureLoadsUnderEngineNames() throws {
        let reference = try SafetensorsFile(path: Self.fixtures.appendingPathComponent("grouped_official.safetensors").path)
        let store = try ParameterStore(layout: layout(reference.entries.map { ($0.name, $0.shape) }))
        let r = try store.load(safetensors: Self.fixtures.appendingPathComponent("released_layout.safetensors").path)
        XCTAssertTrue(r.isComplete, "\(r)")
        XCTAssertEqual(r.loaded.count, reference.entries.count)
        for name in ["deformuxnet_3d.stages.2.1.ddc.conv_offset.weight", "decoder3.transp_conv.conv.weight"] {
            XCTAssertEqual(try store.tensor(name).toArray(), try reference.floats(name), name)
        }
    }
}
