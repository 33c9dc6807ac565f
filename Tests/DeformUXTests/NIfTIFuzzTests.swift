import Foundation
import XCTest
@testable import DeformUX

/// Random damage to small valid NIfTI files (NIfTI-1 and -2, both byte orders, plain and gzip): every
/// mutated file either reads (and then every conversion stays within bounds) or is rejected with a
/// DeformUXError of kind .io that names the file; nothing traps. Deterministic (seeded).
final class NIfTIFuzzTests: XCTestCase {
    static func seeds() throws -> [[UInt8]] {
        let names = ["dtype_int16.nii", "bigendian_float64_scaled.nii", "nifti2_float32.nii", "extensions.nii",
                     "rank5.nii", "gzip_float32.nii.gz", "nifti2_bigendian_gzip_int32.nii.gz", "gzip_members.nii.gz"]
        return try names.map { [UInt8](try Data(contentsOf: NIfTIFixture.directory.appendingPathComponent($0))) }
    }

    func put<T: FixedWidthInteger>(_ v: T, at o: Int, in b: inout [UInt8], bigEndian: Bool) {
        guard o >= 0, o + MemoryLayout<T>.size <= b.count else { return }
        withUnsafeBytes(of: bigEndian ? v.bigEndian : v.littleEndian) { for (i, x) in $0.enumerated() { b[o + i] = x } }
    }

    /// Mutates an uncompressed file: header fields that size or place the data, or random bytes.
    func damage(_ bytes: inout [UInt8], _ rng: inout SplitMix64) {
        let v2 = bytes.count >= 4 && (bytes[0] == 0x1C || bytes[3] == 0x1C)  // 540 = 0x21C
        let be = bytes.count >= 4 && bytes[0] == 0
        let headerSize = v2 ? 540 : 348
        let dimAt = v2 ? 16 : 40
        let dimSize = v2 ? 8 : 2
        func int(_ v: Int64, at o: Int) {
            if v2 && dimSize == 8 { put(v, at: o, in: &bytes, bigEndian: be) } else { put(Int16(truncatingIfNeeded: v), at: o, in: &bytes, bigEndian: be) }
        }
        let extremes: [Int64] = [0, -1, 1, 2, 7, 8, 255, -32768, 32767, 1 << 31, -(1 << 40), Int64.max, Int64.min]
        switch rng.int(0...9) {
        case 0:  // truncate anywhere
            bytes.removeLast(rng.int(1...bytes.count))
        case 1:  // flip bits in the header
            for _ in 0..<rng.int(1...6) { bytes[rng.int(0...(min(bytes.count, headerSize + 4) - 1))] ^= UInt8(1 << rng.int(0...7)) }
        case 2:  // a dimension (or the rank) to an extreme
            int(extremes[rng.int(0...(extremes.count - 1))], at: dimAt + dimSize * rng.int(0...7))
        case 3:  // every dimension large: products that overflow or need terabytes
            for i in 1...7 { int(Int64(rng.int(1000...32767)), at: dimAt + dimSize * i) }
            int(Int64(rng.int(3...7)), at: dimAt)
        case 4:  // vox_offset
            if v2 {
                put(extremes[rng.int(0...(extremes.count - 1))] &+ Int64(rng.int(0...600)), at: 168, in: &bytes, bigEndian: be)
            } else {
                let choices: [Float] = [0, -1, 351, 352.5, 1e9, 3e38, .infinity, .nan, Float(rng.int(0...2000))]
                put(choices[rng.int(0...(choices.count - 1))].bitPattern, at: 108, in: &bytes, bigEndian: be)
            }
        case 5:  // datatype and bitpix
            let codes: [Int16] = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, -1, 3]
            put(codes[rng.int(0...(codes.count - 1))], at: v2 ? 12 : 70, in: &bytes, bigEndian: be)
            if rng.bool() { put(Int16(rng.int(-8...128)), at: v2 ? 14 : 72, in: &bytes, bigEndian: be) }
        case 6:  // the extension flag and a bogus extension size
            if bytes.count > headerSize + 12 {
                bytes[headerSize] = UInt8(rng.int(0...255))
                put(Int32(truncatingIfNeeded: extremes[rng.int(0...(extremes.count - 1))]), at: headerSize + 4, in: &bytes, bigEndian: be)
            }
        case 7:  // sizeof_hdr and magic
            let at = v2 ? 4 + rng.int(0...7) : 344 + rng.int(0...3)
            if rng.bool() { put(Int32(rng.bool() ? 348 : 540), at: 0, in: &bytes, bigEndian: rng.bool()) } else if at < bytes.count { bytes[at] ^= UInt8(rng.int(1...255)) }
        case 8:  // scaling and affine fields to NaN or extremes
            let floats: [Float] = [.nan, .infinity, -.infinity, 0, 1e30, -1e-30]
            let offsets = v2 ? [176, 184, 352, 360, 368, 400, 432] : [112, 116, 256, 260, 264, 280, 296, 76, 80]
            let value = floats[rng.int(0...(floats.count - 1))]
            let o = offsets[rng.int(0...(offsets.count - 1))]
            if v2 { put(Double(value).bitPattern, at: o, in: &bytes, bigEndian: be) } else { put(value.bitPattern, at: o, in: &bytes, bigEndian: be) }
            if rng.bool() { put(Int16(rng.int(-2...6)), at: v2 ? 344 + 4 * rng.int(0...1) : 252 + 2 * rng.int(0...1), in: &bytes, bigEndian: be) }
        default:  // random bytes anywhere
            for _ in 0..<rng.int(1...16) { bytes[rng.int(0...(bytes.count - 1))] = UInt8(rng.int(0...255)) }
        }
    }

    /// Mutates a gzip file's compressed bytes (header, deflate data, trailer) or truncates it.
    func damageGzip(_ bytes: inout [UInt8], _ rng: inout SplitMix64) {
        switch rng.int(0...3) {
        case 0: bytes.removeLast(rng.int(1...bytes.count))
        case 1: for _ in 0..<rng.int(1...4) { bytes[rng.int(0...(bytes.count - 1))] ^= UInt8(1 << rng.int(0...7)) }
        case 2: bytes[rng.int(max(0, bytes.count - 8)...(bytes.count - 1))] ^= UInt8(rng.int(1...255))  // CRC / length
        default: bytes += (0..<rng.int(1...64)).map { _ in UInt8(rng.int(0...255)) }  // junk after the member
        }
    }

    func testRandomlyDamagedFilesNeverTrap() throws {
        let seeds = try NIfTIFuzzTests.seeds()
        // the uncompressed content of each gzip seed, damaged and recompressed too (header damage behind gzip)
        var rng = SplitMix64(seed: 2027)
        var read = 0, rejected = 0
        var messages = Set<String>()
        for round in 0..<4000 {
            let seed = seeds[round % seeds.count]
            var bytes = seed
            let isGzip = seed[0] == 0x1F && seed[1] == 0x8B
            if isGzip {
                if rng.int(0...2) == 0 {
                    damageGzip(&bytes, &rng)
                } else {
                    // damage the decompressed file, then compress it again
                    var plain = try NIfTIFile.decompressForTest(seed)
                    damage(&plain, &rng)
                    bytes = try NIfTIFuzzTests.gzip(plain)
                }
            } else {
                for _ in 0..<rng.int(1...2) where !bytes.isEmpty { damage(&bytes, &rng) }
            }
            let label = "fuzz-\(round).nii"
            do {
                let file = try NIfTIFile(bytes: bytes, path: label)
                // Everything the file claims must now be readable within bounds.
                let floats = try file.floats()
                XCTAssertEqual(floats.count, file.voxelCount)
                XCTAssertEqual(file.arrayShape.reduce(1, *), file.voxelCount)
                var raw = [UInt8](repeating: 0, count: file.voxelCount * file.header.datatype.size)
                try raw.withUnsafeMutableBytes { try file.rawVoxels(into: $0.baseAddress!, byteCount: $0.count) }
                do { _ = try file.int32s() } catch let e as DeformUXError {
                    XCTAssertEqual(e.kind, .invalidArgument, "round \(round): \(e)")
                }
                _ = file.header.affine
                _ = file.header.qform
                read += 1
            } catch let e as DeformUXError {
                XCTAssertEqual(e.kind, .io, "round \(round): \(e)")
                XCTAssertEqual(e.path, label, "round \(round): \(e)")
                XCTAssertTrue(e.description.contains(label), "round \(round): \(e.description)")
                messages.insert(String(e.message.prefix(40)))
                rejected += 1
            }
        }
        print("NIfTI fuzz: \(read) read, \(rejected) rejected, \(messages.count) distinct messages")
        XCTAssertEqual(read + rejected, 4000)
        XCTAssertGreaterThan(rejected, 1500, "most damage should be detected")
        XCTAssertGreaterThan(read, 300, "some damage is harmless (random voxel bytes, unused fields)")
        XCTAssertGreaterThan(messages.count, 20, "the rejections should come from many different checks")
    }

    static func gzip(_ bytes: [UInt8]) throws -> [UInt8] {
        let dir = TemporaryDirectory()
        let path = dir.file("z.gz")
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        let writer = try GzipWriter(fd: fd, level: 1, what: "fuzz", path: path)
        try bytes.withUnsafeBytes { try writer.write($0) }
        try writer.finish()
        close(fd)
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    }
}

extension NIfTIFile {
    /// A whole gzip stream, decompressed (test helper; the reader itself never does this).
    static func decompressForTest(_ gz: [UInt8]) throws -> [UInt8] {
        let reader = try GzipReader(gz, what: "test", path: "test")
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = try chunk.withUnsafeMutableBytes { try reader.read(into: $0.baseAddress!, count: $0.count) }
            if n == 0 { break }
            out += chunk[0..<n]
        }
        return out
    }
}
