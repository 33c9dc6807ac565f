import Foundation
import XCTest
@testable import DeformUX

/// Tests/Fixtures/training/*.json, written by tools/make_training_fixtures.py (MONAI and PyTorch).
enum TrainingFixtures {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Fixtures/training")

    /// The "cases" array of `name`.json.
    static func cases(_ name: String) throws -> [[String: Any]] {
        let data = try Data(contentsOf: directory.appendingPathComponent(name + ".json"))
        guard let root = try JSONSerialization.jsonObject(with: data) as? [String: Any],
              let cases = root["cases"] as? [[String: Any]], !cases.isEmpty else {
            throw DeformUXError.io("fixture \(name)", "no cases")
        }
        return cases
    }
}

/// Typed reads from a fixture case; a missing or mistyped key fails the test with its name.
struct FixtureCase {
    let dict: [String: Any]
    var name: String { dict["name"] as? String ?? "?" }

    func value(_ key: String) throws -> Any {
        guard let v = dict[key] else { throw DeformUXError.io("fixture \(name)", "no key \(key)") }
        return v
    }

    func int(_ key: String) throws -> Int {
        guard let v = try value(key) as? NSNumber else { throw DeformUXError.io("fixture \(name)", "\(key) is not a number") }
        return v.intValue
    }

    func double(_ key: String) throws -> Double {
        guard let v = try value(key) as? NSNumber else { throw DeformUXError.io("fixture \(name)", "\(key) is not a number") }
        return v.doubleValue
    }

    func doubles(_ key: String) throws -> [Double] { try FixtureCase.doubles(try value(key), "\(name).\(key)") }
    func floats(_ key: String) throws -> [Float] { try doubles(key).map { Float($0) } }
    func ints(_ key: String) throws -> [Int] { try doubles(key).map { Int($0) } }

    /// An exact Double written as a float.hex() string; null reads as nil.
    func hex(_ key: String) throws -> Double? { try FixtureCase.hex(try value(key), "\(name).\(key)") }

    /// A list of float.hex() strings; null reads as NaN.
    func hexes(_ key: String) throws -> [Double] {
        guard let a = try value(key) as? [Any] else { throw DeformUXError.io("fixture", "\(name).\(key) is not a list") }
        return try a.map { try FixtureCase.hex($0, "\(name).\(key)") ?? .nan }
    }

    static func hex(_ v: Any, _ what: String) throws -> Double? {
        if v is NSNull { return nil }
        guard let s = v as? String, let d = Double(s) else { throw DeformUXError.io("fixture", "\(what) is not a hex float string") }
        return d
    }

    /// A list of numbers; JSON null reads as NaN.
    static func doubles(_ v: Any, _ what: String) throws -> [Double] {
        guard let a = v as? [Any] else { throw DeformUXError.io("fixture", "\(what) is not a list") }
        return try a.map { x in
            if x is NSNull { return .nan }
            guard let n = x as? NSNumber else { throw DeformUXError.io("fixture", "\(what) holds a non-number") }
            return n.doubleValue
        }
    }
}

/// Channels-first N x C x V <-> channels-last N x V x C.
func toChannelsLast<T>(_ a: [T], n: Int, c: Int, v: Int) -> [T] {
    var out = a
    for i in 0..<n { for k in 0..<c { for j in 0..<v { out[(i * v + j) * c + k] = a[(i * c + k) * v + j] } } }
    return out
}

func toChannelsFirst<T>(_ a: [T], n: Int, c: Int, v: Int) -> [T] {
    var out = a
    for i in 0..<n { for k in 0..<c { for j in 0..<v { out[(i * c + k) * v + j] = a[(i * v + j) * c + k] } } }
    return out
}
