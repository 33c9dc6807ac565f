// The configuration as JSON, with the Python API's snake_case names: how the Python package and the
// C ABI pass a configuration, and how a safetensors file records the model it holds (metadata key
// "deformux.config").
import FoundationEssentials

extension DeformUXNetConfig {
    /// The JSON keys (the Python keyword arguments of `deformux.DeformUXNet`).
    public static let jsonKeys = ["in_channels", "out_channels", "feature_size", "depths", "hidden_size", "block",
                                  "mlp", "offset_mode", "kernel_size", "offset_kernel", "offset_planes", "deformable"]

    /// Parses a JSON object; absent keys (and null) take their defaults, unknown keys are an error.
    public init(json: String) throws {
        let parsed: Parsed
        do {
            parsed = try JSONDecoder().decode(Parsed.self, from: Data(json.utf8))
        } catch let e as DeformUXError {
            throw e
        } catch {
            throw DeformUXError.invalidArgument("DeformUXNet config", "not a valid JSON object: \(json.prefix(200))")
        }
        self = parsed.config
        try validate()
    }

    private struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    /// Decodes key by key so that each wrong value is named.
    private struct Parsed: Decodable {
        var config = DeformUXNetConfig()

        init(from decoder: Decoder) throws {
            func fail(_ m: String) -> DeformUXError { DeformUXError.invalidArgument("DeformUXNet config", "\(m)") }
            let o = try decoder.container(keyedBy: Key.self)
            let unknown = o.allKeys.map(\.stringValue).filter { !DeformUXNetConfig.jsonKeys.contains($0) }.sorted()
            guard unknown.isEmpty else {
                throw fail("unknown key(s) \(unknown.joined(separator: ", ")); known: \(DeformUXNetConfig.jsonKeys.joined(separator: ", "))")
            }
            func value<T: Decodable>(_ k: String, _ type: T.Type, _ what: String) throws -> T? {
                let key = Key(stringValue: k)
                guard o.contains(key), try !o.decodeNil(forKey: key) else { return nil }
                do { return try o.decode(T.self, forKey: key) } catch { throw fail("\(k) must be \(what)") }
            }
            func choice<T: RawRepresentable & CaseIterable>(_ k: String, _: T.Type) throws -> T? where T.RawValue == String {
                guard let s = try value(k, String.self, "a string") else { return nil }
                guard let c = T(rawValue: s) else {
                    throw fail("\(k) must be one of \(T.allCases.map { $0.rawValue }.joined(separator: ", ")), got \(s)")
                }
                return c
            }
            var c = DeformUXNetConfig()
            if let v = try value("in_channels", Int.self, "an integer") { c.inChannels = v }
            if let v = try value("out_channels", Int.self, "an integer") { c.outChannels = v }
            if let v = try value("feature_size", [Int].self, "a list of integers") { c.featureSize = v }
            if let v = try value("depths", [Int].self, "a list of integers") { c.depths = v }
            if let v = try value("hidden_size", Int.self, "an integer") { c.hiddenSize = v }
            if let v = try choice("block", Block.self) { c.block = v }
            // The MLP's default depends on the block (dense for deformux, grouped for uxnet).
            c.mlp = try choice("mlp", MLP.self) ?? (c.block == .uxnet ? .grouped : .dense)
            if let v = try choice("offset_mode", OffsetMode.self) { c.offsetMode = v }
            if let v = try value("kernel_size", Int.self, "an integer") { c.kernelSize = v }
            if let v = try value("offset_kernel", Int.self, "an integer") { c.offsetKernel = v }
            if let v = try choice("offset_planes", OffsetPlanes.self) { c.offsetPlanes = v }
            if let v = try choice("deformable", Deformable.self) { c.deformable = v }
            config = c
        }
    }

    /// The configuration as a JSON object with every key.
    public var json: String {
        func list(_ a: [Int]) -> String { "[" + a.map(String.init).joined(separator: ", ") + "]" }
        let fields: [(String, String)] = [
            ("in_channels", String(inChannels)), ("out_channels", String(outChannels)),
            ("feature_size", list(featureSize)), ("depths", list(depths)), ("hidden_size", String(hiddenSize)),
            ("block", "\"\(block.rawValue)\""), ("mlp", "\"\(mlp.rawValue)\""),
            ("offset_mode", "\"\(offsetMode.rawValue)\""), ("kernel_size", String(kernelSize)),
            ("offset_kernel", String(offsetKernel)), ("offset_planes", "\"\(offsetPlanes.rawValue)\""),
            ("deformable", "\"\(deformable.rawValue)\""),
        ]
        return "{" + fields.map { "\"\($0.0)\": \($0.1)" }.joined(separator: ", ") + "}"
    }
}
