// A model card: the JSON document that says how to run a model (which network, which weights, which
// classes, and the preprocessing and sliding window it was trained for). The trainer writes one beside
// every safetensors file it saves; `segment` reads it. Parsed with FoundationEssentials' JSONDecoder into
// a `JSONValue` tree, then read key by key so that each bad value is named.
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import FoundationEssentials

/// How to run a model (a `.json` file beside its weights). Every key but `weights` (when a model is
/// loaded from the card) is optional; missing keys take the defaults below; keys this version does not
/// know are kept as they are (`extra`) and written back, so older readers pass newer cards through.
///
///     {
///       "name": "brain-tissue",                    default: the card file's stem ("model")
///       "version": "1",                             default "0" (a string; a number is read as its text)
///       "config": {DeformUXNet config JSON},        default: the config in the weights' metadata
///       "weights": "brain-tissue.safetensors",      relative to the card's directory
///       "classes": ["background", "CSF", ...],      index 0 is background; default "background", "class 1", ...
///       "spacing": [1.0, 1.0, 1.0] | null,          mm on the canonical axes; null (default): keep the input's grid
///       "orientation": "RAS" | null,                "RAS" (default): reorient to the closest canonical RAS+ first
///       "intensity": {"kind": "mr" | "ct" | "none", "clip": [lo, hi] | null,
///                     "percentiles": [1, 99] | null, "nonzero": bool},
///                                                   default {"kind": "mr"}: percentiles [1, 99] over non-zero
///                                                   voxels; "ct" needs "clip" and measures over all voxels
///       "window": [96, 96, 96] | null,              multiples of 16; null: 96, reduced on each axis to the
///                                                   network grid rounded up to 16 when that is smaller
///       "overlap": 0.5,                             0 <= overlap < 1
///       "blend": "gaussian" | "constant",           default "gaussian" (sigma = window / 8)
///       "batch": 1 | null,                          windows per forward; null (default): 1
///       "skip_background": {"threshold": -500} | null,  skip windows whose every input value is <= threshold
///                                                   (input units, e.g. HU); default null (run every window)
///       "tta": false,                               flip test-time augmentation (8x the work)
///       "largest_component": false,                 keep the largest 26-connected component of each label
///       "training": {...},                          free-form: command, seed, data, validation Dice, ...
///       "license": "..."                            text, default null
///     }
public struct ModelCard: Equatable, Sendable {
    /// The intensity preset's family (ARCHITECTURE.md section 7).
    public enum IntensityKind: String, Sendable, CaseIterable { case mr, ct, none }

    /// The card's "intensity" object.
    public struct Intensity: Equatable, Sendable {
        public var kind: IntensityKind
        public var clip: [Float]?
        public var percentiles: [Double]?
        public var nonzero: Bool

        /// The kind's defaults: mr and ct scale by percentiles 1 and 99 (over non-zero voxels for mr, all
        /// voxels for ct); none leaves values alone.
        public init(kind: IntensityKind = .mr, clip: [Float]? = nil, percentiles: [Double]?? = nil, nonzero: Bool? = nil) {
            self.kind = kind
            self.clip = clip
            self.percentiles = percentiles ?? (kind == .none ? nil : [1, 99])
            self.nonzero = nonzero ?? (kind == .mr)
        }

        /// The pipeline's preset.
        public var preset: IntensityPreset {
            IntensityPreset(clip: clip.map { $0[0]...$0[1] }, percentiles: percentiles.map { ($0[0], $0[1]) },
                            voxels: nonzero ? .nonzero : .all)
        }
    }

    public enum Blend: String, Sendable, CaseIterable { case gaussian, constant }

    public var name: String = "model"
    public var version: String = "0"
    /// nil: the configuration recorded in the weights' metadata.
    public var config: DeformUXNetConfig?
    /// The weights file, relative to the card's directory (or absolute); nil when the card is a sidecar
    /// or describes a model given in memory.
    public var weights: String?
    /// Class names, index 0 background; nil: "background", "class 1", ... (`classNames(count:)`).
    public var classes: [String]?
    public var spacing: SIMD3<Double>?
    /// Reorient to the closest canonical RAS+ orientation first (the card's "orientation": "RAS"); false
    /// for "orientation": null (the input's axes as they are).
    public var reorient: Bool = true
    public var intensity = Intensity()
    /// nil: automatic (96, reduced to small images; `window(forNetworkGrid:)`).
    public var window: SIMD3<Int>? = SIMD3(96, 96, 96)
    public var overlap: Double = 0.5
    public var blend: Blend = .gaussian
    public var batch: Int?
    /// skip_background's threshold in input units; nil: no skipping.
    public var skipThreshold: Float?
    public var tta: Bool = false
    public var largestComponent: Bool = false
    /// Free-form (how the model was trained and how well it did).
    public var training: [String: JSONValue] = [:]
    public var license: String?
    /// Keys this version does not know, kept and written back.
    public var extra: [String: JSONValue] = [:]

    /// The keys this version reads.
    public static let knownKeys = ["name", "version", "config", "weights", "classes", "spacing", "orientation",
                                   "intensity", "window", "overlap", "blend", "batch", "skip_background", "tta",
                                   "largest_component", "training", "license"]

    /// The defaults (a model without a card): keep the input's grid, MR percentile preset, automatic
    /// windows, overlap 0.5, gaussian blending.
    public init(config: DeformUXNetConfig? = nil) {
        self.config = config
        window = nil
    }

    /// The window for an image whose network grid (after reorientation and resampling, before padding)
    /// is `grid`: the card's window, or automatically 96 per axis, reduced to the grid rounded up to a
    /// multiple of 16 where that is smaller (a window larger than the image only adds padding).
    public func window(forNetworkGrid grid: SIMD3<Int>) -> SIMD3<Int> {
        if let window { return window }
        var w = SIMD3<Int>()
        for a in 0..<3 { w[a] = min(96, max(16, (grid[a] + 15) / 16 * 16)) }
        return w
    }

    /// The class names for a network with `count` output channels: the card's (checked by `check`) or
    /// "background", "class 1", ..., "class count-1".
    public func classNames(count: Int) -> [String] {
        if let classes, classes.count == count { return classes }
        return (0..<count).map { $0 == 0 ? "background" : "class \($0)" }
    }

    /// Checks the card against a network's configuration: same configuration if the card has one, one
    /// class name per output channel, input channels for the skip threshold.
    public func check(against model: DeformUXNetConfig, operation: String = "model card") throws {
        if let config, config != model {
            throw DeformUXError.invalidArgument(operation, "the card describes another network", expected: config.json,
                                                got: model.json)
        }
        if let classes, classes.count != model.outChannels {
            throw DeformUXError.invalidArgument(operation, "the card must name one class per output channel",
                                                expected: "\(model.outChannels) classes", got: "\(classes.count)")
        }
    }

    /// The segmenter's configuration for an image whose network grid is `grid` (nil: automatic windows
    /// become 96). The card's call options (tta, largest_component) are part of it.
    public func segmenterConfiguration(networkGrid grid: SIMD3<Int>? = nil) -> SegmenterConfiguration {
        SegmenterConfiguration(window: grid.map { window(forNetworkGrid: $0) } ?? (window ?? SIMD3(96, 96, 96)),
                               overlap: overlap, blend: blend == .gaussian ? .gaussian() : .constant, batch: batch,
                               flipTTA: tta, reorient: reorient, spacing: spacing, intensity: intensity.preset,
                               skipThreshold: skipThreshold, largestComponent: largestComponent)
    }

    /// The segmenter's configuration for a volume of `size` voxels with `affine`: windows resolved for
    /// its network grid (reorientation and resampling as the card asks).
    public func segmenterConfiguration(size: SIMD3<Int>, affine: Affine) throws -> SegmenterConfiguration {
        guard window == nil else { return segmenterConfiguration() }
        let options = PreprocessOptions(reorient: reorient, spacing: spacing, intensity: intensity.preset, padMultiple: 16)
        let plan = try Preprocessing.plan(size: size, affine: affine, options: options)
        return segmenterConfiguration(networkGrid: plan.resampling.outputSize)
    }
}

// MARK: Reading

extension ModelCard {
    /// The largest card file read (a card is a few KB; training logs belong elsewhere).
    public static let maxFileBytes = 16 << 20

    /// Parses a card. `path` (if any) names the file in messages and gives the default name (its stem).
    public init(json text: String, path: String? = nil) throws {
        let op = path.map { "model card \($0)" } ?? "model card"
        let root: JSONValue
        do {
            root = try JSONDecoder().decode(JSONValue.self, from: Data(text.utf8))
        } catch {
            throw DeformUXError.invalidArgument(op, "not valid JSON", expected: "a JSON object",
                                                got: String(text.prefix(120)))
        }
        guard case let .object(o) = root else {
            throw DeformUXError.invalidArgument(op, "a model card is a JSON object", got: String(text.prefix(120)))
        }
        self.init()
        window = SIMD3(96, 96, 96)
        if let path { name = ModelCard.stem(path) }
        try read(o, op)
    }

    /// Reads the card at `path` (at most `maxFileBytes`).
    public init(path: String) throws {
        let bytes = try readSmallFile(path, limit: ModelCard.maxFileBytes, what: "model card \(path)")
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw DeformUXError.io("model card \(path)", "the file is not UTF-8 text", path: path)
        }
        try self.init(json: text, path: path)
    }

    private mutating func read(_ o: [String: JSONValue], _ op: String) throws {
        func fail(_ key: String, _ expected: String, _ got: JSONValue) -> DeformUXError {
            DeformUXError.invalidArgument(op, "bad \"\(key)\"", expected: expected, got: got.json)
        }
        func present(_ k: String) -> JSONValue? {
            guard let v = o[k], v != .null else { return nil }
            return v
        }
        func string(_ k: String) throws -> String? {
            guard let v = present(k) else { return nil }
            guard case let .string(s) = v else { throw fail(k, "a string", v) }
            return s
        }
        func bool(_ k: String) throws -> Bool? {
            guard let v = present(k) else { return nil }
            guard case let .bool(b) = v else { throw fail(k, "true or false", v) }
            return b
        }
        func numbers(_ k: String, _ v: JSONValue, count: Int) throws -> [Double] {
            guard case let .array(a) = v, a.count == count else { throw fail(k, "\(count) numbers", v) }
            return try a.map { e in
                guard case let .number(x) = e, x.isFinite else { throw fail(k, "\(count) numbers", v) }
                return x
            }
        }
        func integer(_ k: String, _ v: JSONValue, _ range: ClosedRange<Int>) throws -> Int {
            guard case let .number(x) = v, x.isFinite, x == x.rounded(), x >= Double(range.lowerBound),
                  x <= Double(range.upperBound) else { throw fail(k, "an integer in \(range)", v) }
            return Int(x)
        }

        if let s = try string("name") { name = s }
        if let v = present("version") {
            switch v {
            case let .string(s): version = s
            case .number: version = v.json
            default: throw fail("version", "a string", v)
            }
        }
        if let v = present("config") {
            guard case .object = v else { throw fail("config", "a DeformUXNet configuration object", v) }
            do {
                config = try DeformUXNetConfig(json: v.json)
            } catch let e as DeformUXError {
                throw DeformUXError.invalidArgument(op, "bad \"config\": \(e.message)", expected: e.expected, got: e.got)
            }
        }
        weights = try string("weights")
        if let weights, weights.isEmpty { throw fail("weights", "a file name", .string(weights)) }
        if let v = present("classes") {
            guard case let .array(a) = v, !a.isEmpty, a.count <= 256 else { throw fail("classes", "1 to 256 names", v) }
            classes = try a.map { e in
                guard case let .string(s) = e else { throw fail("classes", "a list of strings", v) }
                return s
            }
        }
        if let v = present("spacing") {
            let s = try numbers("spacing", v, count: 3)
            guard s.allSatisfy({ $0 > 0 && $0 < 1e6 }) else { throw fail("spacing", "three spacings > 0 mm, or null", v) }
            spacing = SIMD3(s[0], s[1], s[2])
        }
        if let v = o["orientation"] {
            switch v {
            case .null: reorient = false
            case .string("RAS"): reorient = true
            default: throw fail("orientation", "\"RAS\" or null (keep the input's axes)", v)
            }
        }
        if let v = present("intensity") {
            guard case let .object(io) = v else { throw fail("intensity", "an object with \"kind\"", v) }
            let kindValue = io["kind"] ?? .string("mr")
            guard case let .string(k) = kindValue, let kind = IntensityKind(rawValue: k) else {
                throw fail("intensity.kind", "\"mr\", \"ct\" or \"none\"", kindValue)
            }
            var clip: [Float]?
            if let c = io["clip"], c != .null {
                let r = try numbers("intensity.clip", c, count: 2)
                guard r[0] <= r[1], abs(r[0]) < 3e38, abs(r[1]) < 3e38 else { throw fail("intensity.clip", "[lo, hi] with lo <= hi", c) }
                clip = [Float(r[0]), Float(r[1])]
            }
            var percentiles: [Double]?? = nil
            if let p = io["percentiles"] {
                if p == .null {
                    percentiles = .some(nil)
                } else {
                    let r = try numbers("intensity.percentiles", p, count: 2)
                    guard r[0] >= 0, r[0] <= r[1], r[1] <= 100 else {
                        throw fail("intensity.percentiles", "[lower, upper] with 0 <= lower <= upper <= 100", p)
                    }
                    percentiles = .some(r)
                }
            }
            var nonzero: Bool?
            if let n = io["nonzero"], n != .null {
                guard case let .bool(b) = n else { throw fail("intensity.nonzero", "true or false", n) }
                nonzero = b
            }
            if kind == .ct && clip == nil { throw fail("intensity", "\"clip\": [lo, hi] for kind \"ct\"", v) }
            if kind == .none, case let .some(.some(p)) = percentiles {
                throw fail("intensity.percentiles", "null for kind \"none\" (no scaling)", .array(p.map { .number($0) }))
            }
            let unknown = io.keys.filter { !["kind", "clip", "percentiles", "nonzero"].contains($0) }.sorted()
            guard unknown.isEmpty else {
                throw fail("intensity", "only kind, clip, percentiles and nonzero", .string(unknown.joined(separator: ", ")))
            }
            intensity = Intensity(kind: kind, clip: clip, percentiles: percentiles, nonzero: nonzero)
        }
        if let v = o["window"] {
            if v == .null {
                window = nil
            } else {
                guard case let .array(a) = v, a.count == 3 else { throw fail("window", "three multiples of 16, or null", v) }
                let w = try a.map { try integer("window", $0, 16...4096) }
                guard w.allSatisfy({ $0 % 16 == 0 }) else { throw fail("window", "three multiples of 16, or null", v) }
                window = SIMD3(w[0], w[1], w[2])
            }
        }
        if let v = present("overlap") {
            guard case let .number(x) = v, x >= 0, x < 1 else { throw fail("overlap", "a number with 0 <= overlap < 1", v) }
            overlap = x
        }
        if let v = present("blend") {
            guard case let .string(s) = v, let b = Blend(rawValue: s) else { throw fail("blend", "\"gaussian\" or \"constant\"", v) }
            blend = b
        }
        if let v = present("batch") { batch = try integer("batch", v, 1...4096) }
        if let v = present("skip_background") {
            guard case let .object(so) = v, so.count == 1, case let .number(t)? = so["threshold"], abs(t) < 3e38 else {
                throw fail("skip_background", "null or {\"threshold\": a number in the input's units}", v)
            }
            skipThreshold = Float(t)
        }
        if let b = try bool("tta") { tta = b }
        if let b = try bool("largest_component") { largestComponent = b }
        if let v = present("training") {
            guard case let .object(t) = v else { throw fail("training", "an object", v) }
            training = t
        }
        license = try string("license")
        for (k, v) in o where !ModelCard.knownKeys.contains(k) { extra[k] = v }
    }

    /// "dir/name.json" -> "name".
    static func stem(_ path: String) -> String {
        var base = path.split(separator: "/").last.map(String.init) ?? path
        for suffix in [".json", ".safetensors"] where base.hasSuffix(suffix) { base.removeLast(suffix.count) }
        return base.isEmpty ? "model" : base
    }
}

// MARK: Writing

extension ModelCard {
    /// The card as a JSON object with every key (defaults written out), then the unknown keys sorted.
    public var json: String { jsonValue.json }

    /// The card as a tree (the known keys in their documented order first).
    public var jsonValue: JSONValue {
        func numbers(_ xs: [Double]) -> JSONValue { .array(xs.map { .number($0) }) }
        var entries: [(String, JSONValue)] = [
            ("name", .string(name)),
            ("version", .string(version)),
            ("config", config.map { (try? JSONDecoder().decode(JSONValue.self, from: Data($0.json.utf8))) ?? .null } ?? .null),
            ("weights", weights.map { .string($0) } ?? .null),
            ("classes", classes.map { .array($0.map { .string($0) }) } ?? .null),
            ("spacing", spacing.map { numbers([$0.x, $0.y, $0.z]) } ?? .null),
            ("orientation", reorient ? .string("RAS") : .null),
            ("intensity", .object(["kind": .string(intensity.kind.rawValue),
                                   "clip": intensity.clip.map { numbers($0.map(Double.init)) } ?? .null,
                                   "percentiles": intensity.percentiles.map(numbers) ?? .null,
                                   "nonzero": .bool(intensity.nonzero)])),
            ("window", window.map { numbers([Double($0.x), Double($0.y), Double($0.z)]) } ?? .null),
            ("overlap", .number(overlap)),
            ("blend", .string(blend.rawValue)),
            ("batch", batch.map { .number(Double($0)) } ?? .null),
            ("skip_background", skipThreshold.map { .object(["threshold": .number(Double($0))]) } ?? .null),
            ("tta", .bool(tta)),
            ("largest_component", .bool(largestComponent)),
            ("training", .object(training)),
            ("license", license.map { .string($0) } ?? .null),
        ]
        for k in extra.keys.sorted() { entries.append((k, extra[k] ?? .null)) }
        return .orderedObject(entries)
    }

    /// Writes the card (indented JSON), atomically.
    public func write(to path: String) throws {
        let bytes = Array((jsonValue.prettyJSON() + "\n").utf8)
        try Files.atomicWrite(path, what: "model card \(path)") { fd in
            try bytes.withUnsafeBytes { try writeAll(fd, $0, what: "model card \(path)", path: path) }
        }
    }
}

// MARK: Loading a model

extension ModelCard {
    /// A network and its card from `path`: a `.json` card (its "weights" resolved against the card's
    /// directory) or a `.safetensors` file (its card from a sidecar `<stem>.json` if there is one, else
    /// the defaults). The configuration is the card's, else the one recorded in the weights' metadata;
    /// when both exist they must agree. Weights are loaded strictly.
    public static func loadModel(path: String) throws -> (model: DeformUXNet, card: ModelCard) {
        let op = "load model"
        var card: ModelCard
        let weightsPath: String
        if path.hasSuffix(".json") {
            card = try ModelCard(path: path)
            guard let w = card.weights else {
                throw DeformUXError.invalidArgument("model card \(path)", "the card names no weights",
                                                    expected: "\"weights\": the safetensors file, relative to the card")
            }
            weightsPath = w.hasPrefix("/") ? w : directory(of: path) + "/" + w
        } else if path.hasSuffix(".safetensors") {
            let sidecar = String(path.dropLast(".safetensors".count)) + ".json"
            if access(sidecar, F_OK) == 0 {
                card = try ModelCard(path: sidecar)
            } else {
                card = ModelCard()
                card.name = stem(path)
            }
            weightsPath = path
        } else {
            throw DeformUXError.invalidArgument(op, "unknown model file", expected: "a model card (.json) or weights (.safetensors)",
                                                got: path)
        }
        let file = try SafetensorsFile(path: weightsPath)
        var recorded: DeformUXNetConfig?
        if let text = file.metadata[DeformUXNet.configMetadataKey] {
            do {
                recorded = try DeformUXNetConfig(json: text)
            } catch let e as DeformUXError {
                throw DeformUXError.io("safetensors \(weightsPath)", "bad \(DeformUXNet.configMetadataKey) metadata: \(e.message)",
                                       path: weightsPath)
            }
        }
        guard let config = card.config ?? recorded else {
            throw DeformUXError.invalidArgument(op, "no network configuration: the card has no \"config\" and \(weightsPath) records none",
                                                expected: "\"config\" in the card, or weights saved by deformux")
        }
        if let recorded, recorded != config {
            throw DeformUXError.invalidArgument(op, "the card's configuration differs from the one recorded in \(weightsPath)",
                                                expected: recorded.json, got: config.json)
        }
        card.config = config
        try card.check(against: config, operation: op)
        let model = try DeformUXNet(config: config)
        try model.load(from: weightsPath)
        return (model, card)
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "" : String(path[..<slash])
    }
}

/// Reads a whole (small) file: at most `limit` bytes, checked against the file's size first.
func readSmallFile(_ path: String, limit: Int, what: String) throws -> [UInt8] {
    let (fd, size) = try Files.openRegular(path, what: what)
    defer { close(fd) }
    guard size >= 0, size <= limit else {
        throw DeformUXError.io(what, "the file is too large", path: path, expected: "at most \(limit) bytes", got: "\(size) bytes")
    }
    var bytes = [UInt8](repeating: 0, count: size)
    var done = 0
    while done < size {
        let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + done, size - done) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else {
            let e = errno
            throw DeformUXError.io(what, n == 0 ? "the file shrank while it was read" : "read failed: \(String(cString: strerror(e)))",
                                   path: path, errno: n == 0 ? 0 : e)
        }
        done += n
    }
    return bytes
}

// MARK: JSON values

/// A JSON value: what a card keeps of the keys it does not interpret ("training", unknown keys).
public indirect enum JSONValue: Equatable, Sendable, Decodable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])
    /// An object written with its keys in this order (how cards write their known keys first).
    case orderedObject([(String, JSONValue)])

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null; return }
        if let b = try? c.decode(Bool.self) { self = .bool(b); return }
        if let x = try? c.decode(Double.self) { self = .number(x); return }
        if let s = try? c.decode(String.self) { self = .string(s); return }
        if let a = try? c.decode([JSONValue].self) { self = .array(a); return }
        self = .object(try c.decode([String: JSONValue].self))
    }

    public static func == (a: JSONValue, b: JSONValue) -> Bool {
        switch (a.normalised, b.normalised) {
        case (.null, .null): return true
        case let (.bool(x), .bool(y)): return x == y
        case let (.number(x), .number(y)): return x == y
        case let (.string(x), .string(y)): return x == y
        case let (.array(x), .array(y)): return x == y
        case let (.object(x), .object(y)): return x == y
        default: return false
        }
    }

    /// orderedObject as object (for comparison).
    private var normalised: JSONValue {
        if case let .orderedObject(entries) = self { return .object(Dictionary(entries, uniquingKeysWith: { _, b in b })) }
        return self
    }

    /// Compact JSON text (object keys sorted, except an orderedObject's).
    public var json: String { text(indent: nil, level: 0) }

    /// Indented JSON text (two spaces).
    public func prettyJSON() -> String { text(indent: "  ", level: 0) }

    private func text(indent: String?, level: Int) -> String {
        let newline = indent.map { "\n" + String(repeating: $0, count: level + 1) } ?? ""
        let close = indent.map { "\n" + String(repeating: $0, count: level) } ?? ""
        let separator = indent == nil ? ", " : ","
        func members(_ entries: [(String, JSONValue)]) -> String {
            if entries.isEmpty { return "{}" }
            return "{" + entries.map { newline + JSONText.string($0.0) + ": " + $0.1.text(indent: indent, level: level + 1) }
                .joined(separator: separator) + close + "}"
        }
        switch self {
        case .null: return "null"
        case let .bool(b): return b ? "true" : "false"
        case let .number(x): return JSONValue.number(x)
        case let .string(s): return JSONText.string(s)
        case let .array(a):
            // Arrays of scalars stay on one line.
            let flat = a.allSatisfy { if case .array = $0 { return false }; if case .object = $0 { return false }
                                      if case .orderedObject = $0 { return false }; return true }
            if a.isEmpty { return "[]" }
            if flat || indent == nil { return "[" + a.map { $0.text(indent: nil, level: 0) }.joined(separator: ", ") + "]" }
            return "[" + a.map { newline + $0.text(indent: indent, level: level + 1) }.joined(separator: separator) + close + "]"
        case let .object(o): return members(o.keys.sorted().map { ($0, o[$0] ?? .null) })
        case let .orderedObject(entries): return members(entries)
        }
    }

    /// Integers (up to 2^53) without a fraction; others in Swift's shortest round-trip form.
    static func number(_ x: Double) -> String {
        if x == x.rounded(), abs(x) < 9.007_199_254_740_992e15 { return String(Int64(x)) }
        return "\(x)"
    }

}
