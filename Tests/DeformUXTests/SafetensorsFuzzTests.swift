import Foundation
import XCTest
@testable import DeformUX

/// Random damage to valid safetensors files. Every damaged file either opens, and then every tensor in
/// it reads (within bounds: a read that fails is a test failure), or is rejected with a DeformUXError of
/// kind .io that names the file; nothing traps (a trap would end the test process). Damage that always
/// breaks the format (a key given twice) must always be rejected, and say so. Deterministic (seeded).
final class SafetensorsFuzzTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/network")

    /// The kinds of damage; `mustReject` ones always make an invalid file.
    enum Damage: CaseIterable {
        case flipHeaderBytes, truncate, headerLength, replaceDigit, insertJunk, dropHeaderByte
        case negativeNumber, hugeInteger, repeatedTopLevelKey, repeatedEntryKey, repeatedMetadataKey

        var mustReject: Bool { [.repeatedTopLevelKey, .repeatedEntryKey, .repeatedMetadataKey].contains(self) }
    }

    func testRandomlyDamagedFilesOpenAndReadOrAreRejectedWithANamedIOError() throws {
        let seeds = [try [UInt8](Data(contentsOf: Self.fixtures.appendingPathComponent("interop_tiny.safetensors"))),
                     try [UInt8](Data(contentsOf: Self.fixtures.appendingPathComponent("dense_aligned.io.safetensors")))]
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("deformux-fuzz-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }

        var rng = SplitMix64(seed: 2026)
        var parsed: [Damage: Int] = [:], rejected: [Damage: Int] = [:]
        for round in 0..<3300 {
            let damage = Damage.allCases[round % Damage.allCases.count]
            let bytes = damaged(seeds[(round / Damage.allCases.count) % seeds.count], damage, &rng)
            // Every 8th case goes through a file on disk (header read first, tensors read on demand).
            let onDisk = round % 8 == 0
            let label = onDisk ? directory.appendingPathComponent("fuzz-\(round).safetensors").path : "fuzz-\(round)"
            if onDisk { try Data(bytes).write(to: URL(fileURLWithPath: label)) }
            do {
                let file = onDisk ? try SafetensorsFile(path: label) : try SafetensorsFile(bytes: bytes, path: label)
                for e in file.entries {
                    let values = try file.floats(e.name)
                    XCTAssertEqual(values.count, e.count, "\(label) (\(damage)): tensor \(e.name)")
                }
                parsed[damage, default: 0] += 1
                XCTAssertFalse(damage.mustReject, "\(label) (\(damage)) opened; a repeated key must be rejected")
            } catch let e as DeformUXError {
                rejected[damage, default: 0] += 1
                XCTAssertEqual(e.kind, .io, "\(label) (\(damage)): \(e)")
                XCTAssertEqual(e.path, label, "\(label) (\(damage)): the error must carry the path: \(e)")
                XCTAssertTrue(e.description.contains(label), "\(label) (\(damage)): the message must name the file: \(e)")
                if damage.mustReject {
                    XCTAssertTrue(e.message.contains("given twice"), "\(label) (\(damage)): \(e)")
                }
            } catch {
                XCTFail("\(label) (\(damage)): threw \(type(of: error)), not a DeformUXError: \(error)")
            }
            if onDisk { unlink(label) }
        }
        // Each kind of damage ran 300 times; most of it must be caught, and some must still parse (the
        // reader is not rejecting everything).
        for damage in Damage.allCases {
            XCTAssertEqual(parsed[damage, default: 0] + rejected[damage, default: 0], 300, "\(damage)")
        }
        let totalRejected = rejected.values.reduce(0, +), totalParsed = parsed.values.reduce(0, +)
        XCTAssertGreaterThan(totalRejected, 2000, "most damage should be detected: \(rejected)")
        XCTAssertGreaterThan(totalParsed, 50, "some damage is harmless (a digit replaced by itself, ...): \(parsed)")
    }

    // MARK: damage

    private func headerLength(_ bytes: [UInt8]) -> Int {
        (0..<8).reduce(0) { $0 | Int(bytes[$1]) << (8 * $1) }
    }

    private func setHeaderLength(_ bytes: inout [UInt8], _ n: Int) {
        for i in 0..<8 { bytes[i] = UInt8((UInt64(n) >> (8 * UInt64(i))) & 0xFF) }
    }

    /// Inserts `text` into the header at `at`, keeping the header length right (the data is untouched).
    private func insert(_ text: String, into bytes: inout [UInt8], at: Int) {
        bytes.insert(contentsOf: Array(text.utf8), at: at)
        setHeaderLength(&bytes, headerLength(bytes) + text.utf8.count)
    }

    /// The top-level entries of the header: (key start, value start, value end) as byte indices.
    private func entries(_ bytes: [UInt8]) -> [(key: Int, value: Int, end: Int)] {
        let end = 8 + headerLength(bytes)
        var out: [(key: Int, value: Int, end: Int)] = []
        var depth = 0, inString = false, i = 8, keyStart = -1, valueStart = -1
        while i < end {
            let c = bytes[i]
            if inString {
                if c == UInt8(ascii: "\\") { i += 1 } else if c == UInt8(ascii: "\"") { inString = false }
            } else {
                switch c {
                case UInt8(ascii: "\""):
                    inString = true
                    if depth == 1, keyStart < 0 { keyStart = i }
                case UInt8(ascii: ":") where depth == 1: valueStart = i + 1
                case UInt8(ascii: "{"), UInt8(ascii: "["): depth += 1
                case UInt8(ascii: "}"), UInt8(ascii: "]"):
                    depth -= 1
                    if depth == 1, keyStart >= 0 { out.append((keyStart, valueStart, i + 1)); keyStart = -1 }
                case UInt8(ascii: ",") where depth == 1 && keyStart >= 0:
                    out.append((keyStart, valueStart, i)); keyStart = -1
                default: break
                }
            }
            i += 1
        }
        return out
    }

    private func damaged(_ seed: [UInt8], _ damage: Damage, _ rng: inout SplitMix64) -> [UInt8] {
        var bytes = seed
        let headerEnd = 8 + headerLength(bytes)
        let digits = (8..<headerEnd).filter { (48...57).contains(bytes[$0]) }
        switch damage {
        case .flipHeaderBytes:
            for _ in 0..<rng.int(1...4) { bytes[rng.int(0...(headerEnd - 1))] ^= UInt8(rng.int(1...255)) }
        case .truncate:
            bytes.removeLast(rng.int(1...bytes.count))
        case .headerLength:
            let n = rng.bool() ? UInt64(rng.int(0...Int(Int32.max))) : UInt64.max - UInt64(rng.int(0...9))
            for i in 0..<8 { bytes[i] = UInt8((n >> (8 * UInt64(i))) & 0xFF) }
        case .replaceDigit:  // shapes and offsets
            if let i = digits.randomElement(using: &rng) { bytes[i] = UInt8(48 + rng.int(0...9)) }
        case .insertJunk:  // the header length is left as it was: the boundary moves too
            bytes.insert(contentsOf: (0..<rng.int(1...8)).map { _ in UInt8(rng.int(0...255)) }, at: rng.int(8...headerEnd))
        case .dropHeaderByte:
            bytes.remove(at: rng.int(8...(headerEnd - 1)))
        case .negativeNumber:
            if let i = digits.randomElement(using: &rng) { insert("-", into: &bytes, at: i) }
        case .hugeInteger:  // replaces a digit: at or past Int64 and UInt64 limits, or just big
            let huge = ["9223372036854775807", "9223372036854775808", "18446744073709551615", "18446744073709551616",
                        "4611686018427387904", "99999999999999999999999999", "2305843009213693952", "1e300"]
            if let i = digits.randomElement(using: &rng), let h = huge.randomElement(using: &rng) {
                bytes.remove(at: i)
                setHeaderLength(&bytes, headerLength(bytes) - 1)
                insert(h, into: &bytes, at: i)
            }
        case .repeatedTopLevelKey:  // a copy of an entry (or of __metadata__), its value kept or another's
            let all = entries(bytes)
            if let e = all.randomElement(using: &rng), let other = all.randomElement(using: &rng) {
                let key = String(decoding: bytes[e.key..<e.value], as: UTF8.self)
                let value = String(decoding: bytes[other.value..<other.end], as: UTF8.self)
                insert(key + (rng.bool() ? value : String(decoding: bytes[e.value..<e.end], as: UTF8.self)) + ",",
                       into: &bytes, at: 9)
            }
        case .repeatedEntryKey:  // a field of a tensor entry given twice (the first one wins or loses)
            let tensors = entries(bytes).filter { !String(decoding: bytes[$0.key..<$0.value], as: UTF8.self).hasPrefix("\"__metadata__\"") }
            if let e = tensors.randomElement(using: &rng),
               let field = [#""dtype":"F16","#, #""shape":[1],"#, #""data_offsets":[0,4],"#].randomElement(using: &rng),
               let brace = bytes[e.value..<e.end].firstIndex(of: UInt8(ascii: "{")) {
                if rng.bool() {
                    insert(field, into: &bytes, at: brace + 1)
                } else if let close = bytes[e.value..<e.end].lastIndex(of: UInt8(ascii: "}")) {
                    insert("," + field.dropLast(), into: &bytes, at: close)
                }
            }
        case .repeatedMetadataKey:
            let meta = entries(bytes).first { String(decoding: bytes[$0.key..<$0.value], as: UTF8.self) == "\"__metadata__\":" }
            if let m = meta, let brace = bytes[m.value..<m.end].firstIndex(of: UInt8(ascii: "{")) {
                // the first key of the metadata object, given again with another value
                let inner = bytes[(brace + 1)..<m.end]
                if let q1 = inner.firstIndex(of: UInt8(ascii: "\"")),
                   let q2 = bytes[(q1 + 1)..<m.end].firstIndex(of: UInt8(ascii: "\"")) {
                    let key = String(decoding: bytes[q1...q2], as: UTF8.self)
                    insert(key + ":\"other\",", into: &bytes, at: brace + 1)
                }
            }
        }
        return bytes
    }
}
