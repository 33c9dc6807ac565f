import Foundation
import XCTest
@testable import DeformUX

/// Random damage to valid safetensors files: every mutated file either parses (and every tensor then
/// reads within bounds) or throws a DeformUXError; nothing traps. Deterministic (seeded), a few
/// thousand cases in well under a second.
final class SafetensorsFuzzTests: XCTestCase {
    func testRandomlyDamagedFilesNeverTrap() throws {
        let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/network")
        let seeds = [try [UInt8](Data(contentsOf: fixtures.appendingPathComponent("interop_tiny.safetensors"))),
                     try [UInt8](Data(contentsOf: fixtures.appendingPathComponent("dense_aligned.io.safetensors")))]
        var rng = SplitMix64(seed: 2026)
        var parsed = 0, rejected = 0
        for round in 0..<3000 {
            var bytes = seeds[round % seeds.count]
            let headerEnd = min(bytes.count, 8 + Int(bytes[0]) + 256 * Int(bytes[1]))
            switch rng.int(0...5) {
            case 0:  // flip bytes in the header
                for _ in 0..<rng.int(1...4) { bytes[rng.int(0...(headerEnd - 1))] ^= UInt8(rng.int(1...255)) }
            case 1:  // truncate anywhere
                bytes.removeLast(rng.int(1...bytes.count))
            case 2:  // overwrite the header length
                let n = rng.bool() ? UInt64(rng.int(0...Int(Int32.max))) : UInt64.max - UInt64(rng.int(0...9))
                for i in 0..<8 { bytes[i] = UInt8((n >> (8 * UInt64(i))) & 0xFF) }
            case 3:  // replace a digit in the JSON (shapes, offsets)
                let digits = (8..<headerEnd).filter { (48...57).contains(bytes[$0]) }
                if let i = digits.randomElement(using: &rng) { bytes[i] = UInt8(48 + rng.int(0...9)) }
            case 4:  // insert junk into the header
                bytes.insert(contentsOf: (0..<rng.int(1...8)).map { _ in UInt8(rng.int(0...255)) },
                             at: rng.int(8...headerEnd))
            default:  // drop a byte of the header
                bytes.remove(at: rng.int(8...(headerEnd - 1)))
            }
            do {
                let file = try SafetensorsFile(bytes: bytes, path: "fuzz-\(round)")
                for e in file.entries { _ = try? file.floats(e.name) }
                parsed += 1
            } catch is DeformUXError {
                rejected += 1
            }
        }
        XCTAssertGreaterThan(rejected, 1000, "most damage should be detected")
        XCTAssertGreaterThan(parsed + rejected, 2999)
    }
}
