import Foundation
import XCTest
@testable import DeformUX

/// One case of Tests/Fixtures/nifti (tools/make_nifti_fixtures.py): a file and what nibabel 5 read from
/// it (under numpy 2), with its get_fdata(float32) and unscaled data in the engine's layout.
struct NIfTIFixture {
    let entry: [String: Any]
    var name: String { entry["name"] as? String ?? "?" }
    var path: String { NIfTIFixture.directory.appendingPathComponent(entry["file"] as? String ?? "").path }

    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Fixtures/nifti")

    static func manifest() throws -> [String: Any] {
        let data = try Data(contentsOf: directory.appendingPathComponent("manifest.json"))
        return try JSONSerialization.jsonObject(with: data) as? [String: Any] ?? [:]
    }

    static func all() throws -> [NIfTIFixture] {
        let cases = try manifest()["cases"] as? [[String: Any]] ?? []
        return cases.map(NIfTIFixture.init(entry:))
    }

    func ints(_ key: String) -> [Int] { (entry[key] as? [NSNumber] ?? []).map(\.intValue) }
    /// Floats are stored as repr strings (Foundation's JSON number parsing is not correctly rounded).
    func doubles(_ key: String) -> [Double]? { (entry[key] as? [String])?.compactMap(Double.init) }
    func double(_ key: String) -> Double { (entry[key] as? String).flatMap(Double.init) ?? .infinity }
    func int(_ key: String) -> Int { (entry[key] as? NSNumber)?.intValue ?? -1 }
    func bool(_ key: String) -> Bool { (entry[key] as? NSNumber)?.boolValue ?? false }

    func bytes(_ suffix: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: NIfTIFixture.directory.appendingPathComponent("\(name).\(suffix)")))
    }

    var floats: [Float] {
        get throws {
            let b = try bytes("f32")
            return (0..<(b.count / 4)).map { i in
                Float(bitPattern: UInt32(b[4 * i]) | UInt32(b[4 * i + 1]) << 8 | UInt32(b[4 * i + 2]) << 16 | UInt32(b[4 * i + 3]) << 24)
            }
        }
    }
}

/// A temporary directory removed at the end of the test.
final class TemporaryDirectory {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "deformux-nifti-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String) -> String { "\(path)/\(name)" }
    var contents: [String] { ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted() }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Runs `body` and checks that it throws a DeformUXError of `kind` whose description contains every
/// string of `mentions`; returns the error.
@discardableResult
func expectError(_ kind: DeformUXError.Kind, _ mentions: [String], _ label: String,
                 file: StaticString = #filePath, line: UInt = #line, _ body: () throws -> Void) -> DeformUXError? {
    do {
        try body()
        XCTFail("\(label): no error, expected \(kind) mentioning \(mentions)", file: file, line: line)
    } catch let e as DeformUXError {
        XCTAssertEqual(e.kind, kind, "\(label): \(e)", file: file, line: line)
        for m in mentions where !e.description.contains(m) {
            XCTFail("\(label): \"\(e.description)\" does not mention \"\(m)\"", file: file, line: line)
        }
        return e
    } catch {
        XCTFail("\(label): \(error) is not a DeformUXError", file: file, line: line)
    }
    return nil
}

final class NIfTITests: XCTestCase {
    // MARK: agreement with nibabel

    /// Every fixture: header fields, the three affines and the voxels as nibabel reads them. The
    /// affines and float32 voxels are bit-identical (the qform on x86-64, where both evaluate it in
    /// 80-bit extended precision; elsewhere to 1e-12).
    func testFixturesAgreeWithNibabel() throws {
        let fixtures = try NIfTIFixture.all()
        XCTAssertGreaterThanOrEqual(fixtures.count, 40, "fixtures missing from \(NIfTIFixture.directory.path)")
        for f in fixtures {
            let file: NIfTIFile
            do { file = try NIfTIFile(path: f.path) } catch { XCTFail("\(f.name): \(error)"); continue }
            let h = file.header
            XCTAssertEqual(h.version, f.int("version"), f.name)
            XCTAssertEqual(h.isBigEndian, f.bool("big_endian"), f.name)
            XCTAssertEqual(file.isCompressed, f.bool("gzip"), f.name)
            XCTAssertEqual(h.datatype.rawValue, f.int("datatype"), f.name)
            XCTAssertEqual(file.shape, f.ints("shape"), f.name)
            XCTAssertEqual(file.arrayShape, f.ints("array_shape"), f.name)
            XCTAssertEqual(h.sformCode, f.int("sform_code"), f.name)
            XCTAssertEqual(h.qformCode, f.int("qform_code"), f.name)
            XCTAssertEqual(h.pixdim, f.doubles("pixdim"), f.name)
            XCTAssertEqual(h.zooms, f.doubles("zooms"), f.name)
            XCTAssertEqual(h.voxOffset, f.int("vox_offset"), f.name)
            XCTAssertEqual(h.descrip, f.entry["descrip"] as? String, f.name)
            let slope = f.double("scl_slope")
            XCTAssertTrue(h.sclSlope == slope || (h.sclSlope.isNaN && slope.isNaN), "\(f.name): scl_slope \(h.sclSlope) vs \(slope)")
            XCTAssertEqual(h.sclInter, f.double("scl_inter"), f.name)
            XCTAssertEqual(h.scaling?.slope ?? 1, f.double("applied_slope"), "\(f.name): the slope nibabel applies")
            XCTAssertEqual(h.scaling?.intercept ?? 0, f.double("applied_inter"), "\(f.name): the intercept nibabel applies")
            checkAffine(file.affine, f.doubles("affine"), "\(f.name) affine")
            checkAffine(h.sform, f.doubles("sform"), "\(f.name) sform")
            if let q = f.doubles("qform") {
                if let mine = h.qform { checkAffine(mine, q, "\(f.name) qform") } else { XCTFail("\(f.name): qform is nil, nibabel has \(q)") }
            } else {
                XCTAssertNil(h.qform, "\(f.name): nibabel refuses this qform")
            }
            let exts = (f.entry["extensions"] as? [[Any]]) ?? []
            XCTAssertEqual(h.extensions.count, exts.count, f.name)
            for (mine, theirs) in zip(h.extensions, exts) {
                XCTAssertEqual(mine.code, (theirs[0] as? NSNumber)?.intValue, f.name)
                var content = mine.content  // nibabel strips the NUL padding
                while content.last == 0 { content.removeLast() }
                XCTAssertEqual(content.map { String(format: "%02x", $0) }.joined(), theirs[1] as? String, f.name)
            }

            let shape = file.arrayShape
            assertIdentical(try file.floats(), try f.floats, shape: shape, "\(f.name) floats")
            var raw = [UInt8](repeating: 0, count: file.voxelCount * h.datatype.size)
            try raw.withUnsafeMutableBytes { try file.rawVoxels(into: $0.baseAddress!, byteCount: $0.count) }
            XCTAssertEqual(raw, try f.bytes("raw"), "\(f.name) raw voxels")  // little-endian host
            let t = try file.tensor()
            XCTAssertEqual(t.shape, [h.volumeCount] + h.spatialShape, f.name)
        }
    }

    func checkAffine(_ got: NIfTIAffine, _ want: [Double]?, _ label: String, file: StaticString = #filePath, line: UInt = #line) {
        guard let want else { XCTFail("\(label): missing in the manifest", file: file, line: line); return }
        #if arch(x86_64)
        XCTAssertEqual(got.values, want, label, file: file, line: line)
        #else
        assertClose(got.values, want, atol: 1e-12, rtol: 1e-12, label, file: file, line: line)
        #endif
    }

    /// int32s(): exact for integer data, checked otherwise.
    func testInt32ReadingIsExactOrRefuses() throws {
        for f in try NIfTIFixture.all() {
            let file = try NIfTIFile(path: f.path)
            let values = try f.floats
            let fits = values.allSatisfy { $0 == $0.rounded() && abs($0) <= 2_147_483_520 }
            let type = file.header.datatype
            if type == .int32 { continue }  // exact whatever float32 makes of it: below
            if fits && (type == .uint8 || type == .int8 || type == .int16 || type == .uint16) {
                XCTAssertEqual(try file.int32s().map(Float.init), values, f.name)
            } else if !fits {
                expectError(.invalidArgument, ["int32", "voxel"], f.name) { _ = try file.int32s() }
            }
        }
        // int32 data is taken as stored, beyond float32's exact range
        let file = try NIfTIFile(path: NIfTIFixture.directory.appendingPathComponent("dtype_int32.nii").path)
        var raw = [Int32](repeating: 0, count: file.voxelCount)
        try raw.withUnsafeMutableBytes { try file.rawVoxels(into: $0.baseAddress!, byteCount: $0.count) }
        XCTAssertEqual(try file.int32s(), raw)
        XCTAssertTrue(raw.contains(Int32.max) && raw.contains(Int32.min))
    }

    /// The bundled MNI152 T1: shape, the affine of /work/shared/data/README.md (RAS, 1 mm, origin -98,
    /// -134, -72), and nibabel's voxel sum and sample voxels.
    func testBundledMNI152() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("data/mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").path
        let start = Date()
        let file = try NIfTIFile(path: path)
        let values = try file.floats()
        let seconds = Date().timeIntervalSince(start)
        print("MNI152 T1 read + floats: \(String(format: "%.1f", seconds * 1000)) ms (debug build)")
        let mni = try NIfTIFixture.manifest()["mni"] as? [String: Any] ?? [:]
        XCTAssertEqual(file.shape, [197, 233, 189])
        XCTAssertEqual(file.header.datatype, .uint8)
        XCTAssertTrue(file.isCompressed)
        XCTAssertEqual(file.affine.values, [1, 0, 0, -98, 0, 1, 0, -134, 0, 0, 1, -72, 0, 0, 0, 1])
        XCTAssertEqual(file.affine.values, (mni["affine"] as? [String])?.compactMap(Double.init))
        XCTAssertEqual(file.header.spacing, [1, 1, 1])
        XCTAssertEqual(values.reduce(0.0) { $0 + Double($1) }, (mni["sum"] as? String).flatMap(Double.init))
        let (ny, nz) = (233, 189)
        for p in (mni["points"] as? [[Any]]) ?? [] {
            let (x, y, z) = ((p[0] as? NSNumber)?.intValue ?? 0, (p[1] as? NSNumber)?.intValue ?? 0, (p[2] as? NSNumber)?.intValue ?? 0)
            XCTAssertEqual(Double(values[(x * ny + y) * nz + z]), (p[3] as? String).flatMap(Double.init), "voxel \(x), \(y), \(z)")
        }
        let labels = try file.int32s()
        XCTAssertEqual(labels.max(), 255)
    }

    // MARK: round trips

    func roundTrip<T: NIfTIScalar & Equatable>(_ values: [T], dims: [Int], suffix: String, affine: NIfTIAffine,
                                                  in dir: TemporaryDirectory, _ label: String) throws -> NIfTIFile {
        let path = dir.file("\(label)\(suffix)")
        try NIfTI.write(values, dims: dims, affine: affine, to: path)
        let file = try NIfTIFile(path: path)
        XCTAssertEqual(file.header.datatype, T.niftiDataType, label)
        XCTAssertEqual(file.shape, dims, label)
        XCTAssertEqual(file.isCompressed, suffix == ".nii.gz", label)
        var back = [T](repeating: values[0], count: values.count)
        try back.withUnsafeMutableBytes { try file.rawVoxels(into: $0.baseAddress!, byteCount: $0.count) }
        XCTAssertEqual(back, values, "\(label): raw voxels")
        return file
    }

    /// Every datatype, plain and gzip, 3-D to 5-D: the voxels come back bit for bit, the affine to float32
    /// precision, and the layout is the reader's ([x][y][z], extra axes first).
    func testRoundTripEveryDatatype() throws {
        let dir = TemporaryDirectory()
        var rng = SplitMix64(seed: 88)
        let affine = try NIfTIAffine(rows: [[-0.9, 0.1, 0, 90], [0.05, 1.1, -0.2, -126], [0, 0.3, 2.0, -72], [0, 0, 0, 1]])
        for (i, dims) in [[5, 4, 3], [7, 5, 3, 2], [3, 2, 4, 2, 3], [1, 1, 1], [6, 5]].enumerated() {
            let n = dims.reduce(1, *)
            for suffix in [".nii", ".nii.gz"] {
                let label = "case\(i)\(suffix)"
                _ = try roundTrip((0..<n).map { _ in UInt8(rng.int(0...255)) }, dims: dims, suffix: suffix, affine: affine, in: dir, "u8-\(label)")
                _ = try roundTrip((0..<n).map { _ in Int8(rng.int(-128...127)) }, dims: dims, suffix: suffix, affine: affine, in: dir, "i8-\(label)")
                _ = try roundTrip((0..<n).map { _ in Int16(rng.int(-32768...32767)) }, dims: dims, suffix: suffix, affine: affine, in: dir, "i16-\(label)")
                _ = try roundTrip((0..<n).map { _ in UInt16(rng.int(0...65535)) }, dims: dims, suffix: suffix, affine: affine, in: dir, "u16-\(label)")
                _ = try roundTrip((0..<n).map { _ in Int32(truncatingIfNeeded: rng.next()) }, dims: dims, suffix: suffix, affine: affine, in: dir, "i32-\(label)")
                _ = try roundTrip((0..<n).map { _ in UInt32(truncatingIfNeeded: rng.next()) }, dims: dims, suffix: suffix, affine: affine, in: dir, "u32-\(label)")
                _ = try roundTrip((0..<n).map { _ in Int64(bitPattern: rng.next()) }, dims: dims, suffix: suffix, affine: affine, in: dir, "i64-\(label)")
                _ = try roundTrip((0..<n).map { _ in rng.next() }, dims: dims, suffix: suffix, affine: affine, in: dir, "u64-\(label)")
                _ = try roundTrip((0..<n).map { _ in rng.uniform(-1e6, 1e6) }, dims: dims, suffix: suffix, affine: affine, in: dir, "f64-\(label)")
                let floats = rng.floats(n, -100, 100)
                let file = try roundTrip(floats, dims: dims, suffix: suffix, affine: affine, in: dir, "f32-\(label)")
                XCTAssertEqual(try file.floats(), floats, label)
                XCTAssertEqual(file.header.sclSlope, 1)
                XCTAssertEqual(file.header.sclInter, 0)
                XCTAssertEqual(file.header.sformCode, 1)
                XCTAssertEqual(file.header.qformCode, 1)
                XCTAssertEqual(file.header.affineSource, .sform)
                let rounded = affine.values.map { Double(Float($0)) }
                XCTAssertEqual(file.affine.values, rounded, "\(label): the sform is the affine rounded to float32")
                // the qform keeps the affine up to its shears (none here beyond rounding of the rotation fit)
                XCTAssertEqual(file.header.pixdim[1...3].map { $0 }, affine.spacing.map { Double(Float($0)) }, label)
            }
        }
        // the layout: value at [x][y][z] of a 3-D write is the file's x + nx * (y + ny * z)
        let dims = [4, 3, 2]
        let ramp = (0..<24).map { Float($0) }
        let path = dir.file("ramp.nii")
        try NIfTI.write(ramp, dims: dims, affine: .identity, to: path)
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let stored = (0..<24).map { i in bytes.withUnsafeBytes { Float(bitPattern: $0.loadUnaligned(fromByteOffset: 352 + 4 * i, as: UInt32.self)) } }
        for x in 0..<4 { for y in 0..<3 { for z in 0..<2 {
            XCTAssertEqual(stored[x + 4 * (y + 3 * z)], ramp[(x * 3 + y) * 2 + z])
        } } }
        XCTAssertEqual(dir.contents.filter { $0.hasPrefix(".") }, [], "temporary files left behind")
    }

    /// The qform written from an affine reproduces it (rotations with both handednesses, anisotropic
    /// voxels), to float32 precision; shears are dropped from the qform but kept in the sform.
    func testWrittenQformMatchesTheAffine() throws {
        let dir = TemporaryDirectory()
        var rng = SplitMix64(seed: 5)
        for i in 0..<20 {
            // a random rotation from a random unit quaternion, then zooms and maybe a flip
            var q: [Double] = (0..<4).map { _ in rng.uniform(-1.0, 1.0) as Double }
            let norm = q.reduce(0) { $0 + $1 * $1 }.squareRoot()
            q = q.map { $0 / norm }
            let (a, b, c, d) = (q[0], q[1], q[2], q[3])
            let r: [[Double]] = [[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                                 [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                                 [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]]
            let zooms: [Double] = [rng.uniform(0.3, 3.0), rng.uniform(0.3, 3.0), rng.uniform(0.3, 3.0) * (i % 2 == 0 ? 1.0 : -1.0)]
            var rows = (0..<3).map { row in (0..<3).map { r[row][$0] * zooms[$0] } + [rng.uniform(-100.0, 100.0) as Double] }
            rows.append([0, 0, 0, 1])
            let affine = try NIfTIAffine(rows: rows)
            let path = dir.file("q\(i).nii")
            try NIfTI.write([Float](repeating: 1, count: 8), dims: [2, 2, 2], affine: affine, to: path)
            let h = try NIfTIFile(path: path).header
            XCTAssertEqual(h.pixdim[0], i % 2 == 0 ? 1 : -1, "case \(i): qfac")
            guard let qform = h.qform else { XCTFail("case \(i): no qform"); continue }
            assertClose(qform.values, affine.values, atol: 2e-5, rtol: 2e-6, "case \(i): qform vs affine")
        }
    }

    /// A label map written with a float image's header as template: uint8, no scaling, the template's
    /// spatial fields kept as they are when the affine is the template's, its codes otherwise.
    func testTemplateHeader() throws {
        let dir = TemporaryDirectory()
        let source = try NIfTIFile(path: NIfTIFixture.directory.appendingPathComponent("scale_float32.nii").path)
        XCTAssertEqual(source.header.sclSlope, 1.5)
        let h0 = source.header
        let labels = (0..<source.voxelCount).map { UInt8($0 % 4) }
        let path = dir.file("labels.nii.gz")
        try NIfTI.write(labels, dims: source.shape, affine: source.affine, template: source.header, to: path)
        let out = try NIfTIFile(path: path)
        let h = out.header
        XCTAssertEqual(h.datatype, .uint8)
        XCTAssertEqual(h.bitpix, 8)
        XCTAssertEqual(h.sclSlope, 1)
        XCTAssertEqual(h.sclInter, 0)
        XCTAssertEqual(try out.int32s(), labels.map(Int32.init))
        XCTAssertEqual(h.sformCode, h0.sformCode)
        XCTAssertEqual(h.qformCode, h0.qformCode)
        XCTAssertEqual(h.srow, h0.srow)
        XCTAssertEqual(h.quaternion, h0.quaternion)
        XCTAssertEqual(h.qoffset, h0.qoffset)
        XCTAssertEqual(h.pixdim, h0.pixdim)
        XCTAssertEqual(h.descrip, h0.descrip)
        XCTAssertEqual(h.xyztUnits, h0.xyztUnits)
        XCTAssertEqual(out.affine, source.affine)
        // the raw NIfTI-1 header bytes: only dim, datatype, bitpix, vox_offset (same here), scl differ
        let a = h.raw, b = h0.raw
        let changed = (0..<348).filter { a[$0] != b[$0] }
        XCTAssertTrue(changed.allSatisfy { (70..<74).contains($0) || (112..<120).contains($0) || (124..<132).contains($0) },
                      "bytes \(changed) changed beyond datatype, bitpix, scl and cal")

        // a different affine (a crop): new sform and qform, the template's codes
        var moved = source.affine
        moved[0, 3] += 10
        try NIfTI.write(labels, dims: source.shape, affine: moved, template: source.header, description: "cropped", to: path)
        let h2 = try NIfTIFile(path: path).header
        XCTAssertEqual(h2.sformCode, h0.sformCode)
        XCTAssertEqual(h2.qformCode, h0.qformCode)
        XCTAssertEqual(h2.affine.values, moved.values.map { Double(Float($0)) })
        XCTAssertEqual(h2.descrip, "cropped")

        // extensions and a NIfTI-2 template (written as NIfTI-1)
        let ext = try NIfTIFile(path: NIfTIFixture.directory.appendingPathComponent("extensions.nii").path)
        try NIfTI.write(labels, dims: ext.shape, affine: ext.affine, template: ext.header, to: path)
        let h3 = try NIfTIFile(path: path).header
        XCTAssertEqual(h3.extensions.map(\.code), ext.header.extensions.map(\.code))
        XCTAssertEqual(h3.extensions.map { Array($0.content.prefix(19)) }, ext.header.extensions.map { Array($0.content.prefix(19)) })
        XCTAssertEqual(h3.voxOffset, 352 + ext.header.extensions.reduce(0) { $0 + $1.sizeOnDisk })
        let two = try NIfTIFile(path: NIfTIFixture.directory.appendingPathComponent("nifti2_float32.nii").path)
        try NIfTI.write(labels, dims: two.shape, affine: two.affine, template: two.header, to: path)
        let h4 = try NIfTIFile(path: path)
        XCTAssertEqual(h4.header.version, 1)
        assertClose(h4.affine.values, two.affine.values, atol: 1e-5, rtol: 1e-6, "NIfTI-2 template affine")
    }

    /// A template whose affine comes from pixdim only gets explicit sform and qform (code 1), so the
    /// written file does not depend on the fallback of its new shape.
    func testTemplateWithoutCodesGetsExplicitAffine() throws {
        let dir = TemporaryDirectory()
        let source = try NIfTIFile(path: NIfTIFixture.directory.appendingPathComponent("affine_pixdim.nii").path)
        XCTAssertEqual(source.header.affineSource, .pixdim)
        let path = dir.file("o.nii")
        try NIfTI.write([Float](repeating: 0, count: 8), dims: [2, 2, 2], affine: source.affine, template: source.header, to: path)
        let h = try NIfTIFile(path: path).header
        XCTAssertEqual(h.sformCode, 1)
        XCTAssertEqual(h.qformCode, 1)
        XCTAssertEqual(h.affine, source.affine)
    }

    /// A header edited by hand keeps its array lengths, so no property or write can index out of range;
    /// text fields longer than NIfTI-1 holds are cut at a character boundary.
    func testEditedHeaderStaysSafe() throws {
        var h = NIfTIHeader()
        h.dim = [9]
        h.pixdim = []
        h.srow = [2, 0]
        h.quaternion = [0.1, 0.2, 0.3, 0.4]
        h.qoffset = []
        h.intentParameters = [1, 2, 3, 4, 5]
        XCTAssertEqual([h.dim.count, h.pixdim.count, h.srow.count, h.quaternion.count, h.qoffset.count, h.intentParameters.count],
                       [8, 8, 12, 3, 3, 3])
        XCTAssertEqual(h.dim, [9, 1, 1, 1, 1, 1, 1, 1])
        XCTAssertEqual(h.quaternion, [0.1, 0.2, 0.3])
        _ = (h.shape, h.zooms, h.spatialShape, h.volumeCount, h.affine, h.qform, h.baseAffine)
        h.sformCode = 2
        h.srow = [1, 0, 0, 5, 0, 1, 0, 6, 0, 0, 1, 7]
        h.intentName = "labels"
        h.descrip = String(repeating: "é", count: 100)  // 200 bytes of UTF-8
        let dir = TemporaryDirectory()
        let path = dir.file("edited.nii")
        try NIfTI.write([UInt8](repeating: 1, count: 8), dims: [2, 2, 2], affine: h.affine, template: h, to: path)
        let back = try NIfTIFile(path: path).header
        XCTAssertEqual(back.intentName, "labels")
        XCTAssertEqual(back.descrip, String(repeating: "é", count: 39))
        XCTAssertEqual(back.sformCode, 2)
        XCTAssertEqual(back.affine, h.affine)
    }

    // MARK: bad files

    /// A valid little-endian NIfTI-1 of a 2 x 3 x 4 uint8 volume (vox_offset 352), for editing.
    static func minimalFile(version: Int = 1) throws -> [UInt8] {
        let dir = TemporaryDirectory()
        let path = dir.file("m.nii")
        try NIfTI.write((0..<24).map { UInt8($0) }, dims: [2, 3, 4], affine: .identity, to: path)
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        XCTAssertEqual(bytes.count, 352 + 24)
        if version == 2 {
            bytes = try [UInt8](Data(contentsOf: NIfTIFixture.directory.appendingPathComponent("nifti2_float32.nii")))
        }
        return bytes
    }

    static func put<T: FixedWidthInteger>(_ v: T, at o: Int, in b: inout [UInt8]) {
        withUnsafeBytes(of: v.littleEndian) { for (i, x) in $0.enumerated() { b[o + i] = x } }
    }

    func testHostileHeadersAreRejected() throws {
        let good = try NIfTITests.minimalFile()
        XCTAssertEqual(try NIfTIFile(bytes: good, path: "good").int32s(), (0..<24).map { Int32($0) })
        typealias Edit = (inout [UInt8]) -> Void
        func put<T: FixedWidthInteger>(_ v: T, _ o: Int, _ b: inout [UInt8]) { NIfTITests.put(v, at: o, in: &b) }
        let cases: [(String, Edit, [String])] = [
            ("empty", { $0 = [] }, ["0 bytes", "too short"]),
            ("3 bytes", { $0 = Array($0[0..<3]) }, ["too short"]),
            ("header only", { $0 = Array($0[0..<300]) }, ["shorter than a NIfTI-1 header"]),
            ("truncated header", { $0 = Array($0[0..<349]) }, ["shorter than a NIfTI-1 header"]),
            ("text", { $0 = Array(String(repeating: "hello", count: 100).utf8) }, ["sizeof_hdr", "not a NIfTI file"]),
            ("sizeof_hdr", { put(Int32(349), 0, &$0) }, ["sizeof_hdr"]),
            ("pair magic", { $0[344...346] = [0x6E, 0x69, 0x31] }, ["two-file"]),
            ("bad magic", { $0[345] = 0x2A }, ["magic"]),
            ("rank 0", { put(Int16(0), 40, &$0) }, ["dim[0]", "1...7"]),
            ("rank 8", { put(Int16(8), 40, &$0) }, ["dim[0]"]),
            ("rank 6", { put(Int16(6), 40, &$0) }, ["not supported"]),
            ("rank -3", { put(Int16(-3), 40, &$0) }, ["dim[0]"]),
            ("zero dim", { put(Int16(0), 44, &$0) }, ["at least 1"]),
            ("negative dim", { put(Int16(-5), 42, &$0) }, ["at least 1"]),
            ("huge dims", { for i in 1...3 { put(Int16.max, 40 + 2 * i, &$0) } }, ["truncated"]),
            ("overflowing dims", { put(Int16(5), 40, &$0); for i in 1...5 { put(Int16.max, 40 + 2 * i, &$0) } }, ["more voxels than fit"]),
            ("complex", { put(Int16(32), 70, &$0) }, ["complex64", "not supported"]),
            ("rgb", { put(Int16(128), 70, &$0) }, ["RGB24"]),
            ("unknown datatype", { put(Int16(3), 70, &$0) }, ["datatype 3"]),
            ("vox_offset 0", { put(Float(0).bitPattern, 108, &$0) }, ["vox_offset", ">= 352"]),
            ("vox_offset small", { put(Float(100).bitPattern, 108, &$0) }, ["vox_offset"]),
            ("vox_offset negative", { put(Float(-400).bitPattern, 108, &$0) }, ["vox_offset"]),
            ("vox_offset nan", { put(Float.nan.bitPattern, 108, &$0) }, ["vox_offset"]),
            ("vox_offset inf", { put(Float.infinity.bitPattern, 108, &$0) }, ["vox_offset"]),
            ("vox_offset huge", { put(Float(3e38).bitPattern, 108, &$0) }, ["vox_offset"]),
            ("vox_offset past the end", { put(Float(1024).bitPattern, 108, &$0) }, ["truncated"]),
            ("data truncated", { $0.removeLast() }, ["truncated", "376 bytes"]),
            ("bad intercept", { put(Float(2).bitPattern, 112, &$0); put(Float.nan.bitPattern, 116, &$0) }, ["scl_inter"]),
            ("invalid chosen qform", { put(Int16(0), 254, &$0); put(Int16(1), 252, &$0); put(Float(0.9).bitPattern, 256, &$0); put(Float(0.9).bitPattern, 260, &$0) }, ["quaternion", "qform_code"]),
            ("nan sform", { put(Float.nan.bitPattern, 280, &$0) }, ["non-finite"]),
            ("extension overruns", { $0[348] = 1; $0 += [UInt8](repeating: 0, count: 32); put(Float(384).bitPattern, 108, &$0); put(Int32(64), 352, &$0) }, ["extension 0", "does not fit"]),
            ("extension size from the data", { $0[348] = 1; $0 += [UInt8](repeating: 0, count: 32); put(Float(384).bitPattern, 108, &$0) }, ["extension 0"]),
            ("extension size negative", { $0[348] = 1; $0 += [UInt8](repeating: 0, count: 32); put(Float(384).bitPattern, 108, &$0); put(Int32(-16), 352, &$0) }, ["extension 0"]),
        ]
        for (label, edit, mentions) in cases {
            var bytes = good
            edit(&bytes)
            let e = expectError(.io, mentions, label) { _ = try NIfTIFile(bytes: bytes, path: "/some/\(label).nii") }
            XCTAssertEqual(e?.path, "/some/\(label).nii", label)
            XCTAssertTrue(e?.description.contains("/some/\(label).nii") ?? false, label)
        }
        // NIfTI-2: damaged EOL bytes, negative vox_offset
        let two = try NIfTITests.minimalFile(version: 2)
        var eol = two
        eol[8] = 0x0A  // \r\n became \n\n
        expectError(.io, ["end-of-line"], "nifti2 eol") { _ = try NIfTIFile(bytes: eol, path: "two") }
        var negative = two
        put(Int64(-1), 168, &negative)
        expectError(.io, ["vox_offset"], "nifti2 vox_offset") { _ = try NIfTIFile(bytes: negative, path: "two") }
        var huge = two
        put(Int64(4), 16, &huge)
        for i in 1...4 { put(Int64(1) << 40, 16 + 8 * i, &huge) }
        expectError(.io, ["more voxels than fit"], "nifti2 overflowing dims") { _ = try NIfTIFile(bytes: huge, path: "two") }
        var bytesOverflow = two
        put(Int64(3), 16, &bytesOverflow)
        for (i, d) in [Int64(1) << 31, Int64(1) << 30, 1].enumerated() { put(d, 24 + 8 * i, &bytesOverflow) }
        expectError(.io, ["larger than any file"], "nifti2 byte count overflow") { _ = try NIfTIFile(bytes: bytesOverflow, path: "two") }
        var large = two
        put(Int64(3), 16, &large)
        for (i, d) in [Int64(1) << 20, Int64(1) << 20, 1].enumerated() { put(d, 24 + 8 * i, &large) }
        expectError(.io, ["truncated", "4398046511648 bytes"], "nifti2 large dims") { _ = try NIfTIFile(bytes: large, path: "two") }
    }

    /// Quirks nibabel accepts, and so does this reader: a bitpix that disagrees with the datatype, a
    /// fractional vox_offset (truncated), trailing bytes after the data, an extension flag with too
    /// little room for an extension.
    func testQuirksNibabelAccepts() throws {
        var bytes = try NIfTITests.minimalFile()
        NIfTITests.put(Int16(64), at: 72, in: &bytes)  // bitpix
        XCTAssertEqual(try NIfTIFile(bytes: bytes, path: "bitpix").floats().count, 24)
        NIfTITests.put(Float(352.75).bitPattern, at: 108, in: &bytes)
        bytes += [1, 2, 3]
        bytes[348] = 1
        let file = try NIfTIFile(bytes: bytes, path: "quirks")
        XCTAssertEqual(file.header.voxOffset, 352)
        XCTAssertEqual(file.header.extensions, [])
        XCTAssertEqual(try file.int32s().count, 24)
    }

    func testGzipDamageIsRejected() throws {
        let good = try NIfTITests.minimalFile()
        let dir = TemporaryDirectory()
        let path = dir.file("g.nii.gz")
        try NIfTI.write((0..<24).map { UInt8($0) }, dims: [2, 3, 4], affine: .identity, to: path)
        let gz = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        XCTAssertEqual(try NIfTIFile(bytes: gz, path: "gz").int32s(), try NIfTIFile(bytes: good, path: "plain").int32s())

        var crc = gz
        crc[crc.count - 6] ^= 0xFF  // the CRC-32 in the trailer
        expectError(.io, ["gzip", "damaged"], "bad crc") { _ = try NIfTIFile(bytes: crc, path: "gz") }
        for cut in [gz.count - 1, gz.count - 8, gz.count / 2, 11, 3] {
            expectError(.io, ["gz"], "truncated to \(cut)") { _ = try NIfTIFile(bytes: Array(gz[0..<cut]), path: "gz") }
        }
        var body = gz
        body[12] ^= 0x55
        do { _ = try NIfTIFile(bytes: body, path: "gz") } catch let e as DeformUXError { XCTAssertEqual(e.kind, .io) }
        // After the member: NUL padding and, as nibabel never reads past the data, anything else too.
        XCTAssertNoThrow(try NIfTIFile(bytes: gz + [0, 0, 0], path: "gz"))
        XCTAssertNoThrow(try NIfTIFile(bytes: gz + [0x41], path: "gz"))
        // A member that ends before the data, followed by garbage: refused.
        let fd = open(dir.file("half.nii.gz"), O_WRONLY | O_CREAT, 0o644)
        let writer = try GzipWriter(fd: fd, level: 6, what: "test", path: "half")
        try good.withUnsafeBytes { try writer.write(UnsafeRawBufferPointer(rebasing: $0[0..<360])) }
        try writer.finish()
        close(fd)
        let half = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir.file("half.nii.gz"))))
        expectError(.io, ["truncated", "360"], "member ends early") { _ = try NIfTIFile(bytes: half, path: "gz") }
        expectError(.io, ["after gzip member"], "garbage after the member") { _ = try NIfTIFile(bytes: half + [0, 0x41], path: "gz") }
        expectError(.io, ["truncated"], "second member cut") { _ = try NIfTIFile(bytes: half + Array(gz[0..<20]), path: "gz") }
        // Bytes after the voxels inside the member are decompressed (up to 64 KB) to check the CRC, but
        // what follows the member is not looked at.
        let fd2 = open(dir.file("tail.nii.gz"), O_WRONLY | O_CREAT, 0o644)
        let tailWriter = try GzipWriter(fd: fd2, level: 6, what: "test", path: "tail")
        try (good + [UInt8](repeating: 7, count: 1000)).withUnsafeBytes { try tailWriter.write($0) }
        try tailWriter.finish()
        close(fd2)
        let tail = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir.file("tail.nii.gz"))))
        XCTAssertEqual(try NIfTIFile(bytes: tail + [0x41, 0x42], path: "gz").int32s(), (0..<24).map { Int32($0) })
        var tailCRC = tail
        tailCRC[tailCRC.count - 7] ^= 1
        expectError(.io, ["damaged"], "bad crc after trailing bytes") { _ = try NIfTIFile(bytes: tailCRC, path: "gz") }
    }

    /// A small gzip file whose header declares far more data than deflate can expand to is refused
    /// before anything is allocated or decompressed beyond the header.
    func testGzipBombIsRefused() throws {
        var header = try NIfTITests.minimalFile()
        NIfTITests.put(Int16(3), at: 40, in: &header)
        for i in 1...3 { NIfTITests.put(Int16(2000), at: 40 + 2 * i, in: &header) }  // 8e9 voxels
        let dir = TemporaryDirectory()
        let fd = open(dir.file("bomb.nii.gz"), O_WRONLY | O_CREAT, 0o644)
        let writer = try GzipWriter(fd: fd, level: 9, what: "test", path: "bomb")
        try header.withUnsafeBytes { try writer.write($0) }
        let zeros = [UInt8](repeating: 0, count: 1 << 20)
        for _ in 0..<4 { try zeros.withUnsafeBytes { try writer.write($0) } }
        try writer.finish()
        close(fd)
        expectError(.io, ["gzip bomb", "bomb.nii.gz"], "bomb") { _ = try NIfTIFile(path: dir.file("bomb.nii.gz")) }
    }

    func testFileSystemErrors() throws {
        let dir = TemporaryDirectory()
        let missing = expectError(.io, ["missing.nii", "No such file"], "missing") { _ = try NIfTIFile(path: dir.file("missing.nii")) }
        XCTAssertEqual(missing?.errno, ENOENT)
        XCTAssertEqual(missing?.path, dir.file("missing.nii"))
        let directory = expectError(.io, ["not a regular file"], "directory") { _ = try NIfTIFile(path: dir.path) }
        XCTAssertEqual(directory?.errno, EISDIR)
        let noDir = expectError(.io, ["temporary file"], "write into a missing directory") {
            try NIfTI.write([Float(0)], dims: [1, 1, 1], affine: .identity, to: dir.file("nope/x.nii"))
        }
        XCTAssertEqual(noDir?.errno, ENOENT)
    }

    func testWriterRejectsBadArguments() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("v.nii")
        try NIfTI.write([Float](repeating: 7, count: 8), dims: [2, 2, 2], affine: .identity, to: path)
        let before = try Data(contentsOf: URL(fileURLWithPath: path))
        let v = [Float](repeating: 0, count: 8)
        expectError(.shapeMismatch, ["8 voxels"], "count") { try NIfTI.write([Float](repeating: 0, count: 7), dims: [2, 2, 2], affine: .identity, to: path) }
        expectError(.invalidArgument, ["dims"], "rank 6") { try NIfTI.write(v, dims: [2, 2, 2, 1, 1, 1], affine: .identity, to: path) }
        expectError(.invalidArgument, ["at least 1"], "zero dim") { try NIfTI.write([Float](), dims: [2, 0, 2], affine: .identity, to: path) }
        expectError(.invalidArgument, ["32767"], "too big for NIfTI-1") { try NIfTI.write([Float](repeating: 0, count: 40000), dims: [40000, 1, 1], affine: .identity, to: path) }
        expectError(.invalidArgument, [".nii"], "suffix") { try NIfTI.write(v, dims: [2, 2, 2], affine: .identity, to: dir.file("v.img")) }
        var nan = NIfTIAffine.identity
        nan[0, 0] = .nan
        expectError(.invalidArgument, ["non-finite"], "nan affine") { try NIfTI.write(v, dims: [2, 2, 2], affine: nan, to: path) }
        var flat = NIfTIAffine.identity
        flat[1, 1] = 0
        expectError(.invalidArgument, ["column"], "zero column") { try NIfTI.write(v, dims: [2, 2, 2], affine: flat, to: path) }
        var singular = NIfTIAffine.identity
        singular[0, 1] = 1
        singular[1, 1] = 0
        singular[0, 0] = 1
        singular[1, 0] = 0
        expectError(.invalidArgument, ["singular"], "singular") { try NIfTI.write(v, dims: [2, 2, 2], affine: singular, to: path) }
        expectError(.invalidArgument, ["compressionLevel"], "level") { try NIfTI.write(v, dims: [2, 2, 2], affine: .identity, compressionLevel: 11, to: dir.file("v.nii.gz")) }
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), before, "a failed write must leave the old file")
        XCTAssertEqual(dir.contents, ["v.nii"])
        XCTAssertThrowsError(try NIfTIAffine(rowMajor: [1, 2, 3]))
        let file = try NIfTIFile(path: path)
        expectError(.shapeMismatch, ["8 voxels"], "destination size") {
            var out = [Float](repeating: 0, count: 3)
            try out.withUnsafeMutableBufferPointer { try file.floats(into: $0.baseAddress!, count: 3) }
        }
        expectError(.invalidArgument, ["dropped"], "dropped voxels") { _ = try file.droppingVoxels().floats() }
    }
}
