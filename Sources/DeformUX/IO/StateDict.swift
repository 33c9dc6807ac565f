// Loading and saving a ParameterStore by PyTorch state-dict names (STYLE.md habit 4): a name-to-range
// copy. Loading is strict by default: every missing, unexpected and mis-shaped key is reported by name
// in one error before anything is written.

/// What a state-dict load matched. Names are sorted.
public struct StateDictReport: Sendable, Equatable, CustomStringConvertible {
    public struct ShapeMismatch: Sendable, Equatable {
        /// The parameter's name in the store.
        public let name: String
        public let expected: [Int]
        public let got: [Int]
    }

    /// Store parameters that were (or, for a failed strict load, would have been) filled.
    public var loaded: [String] = []
    /// Store parameters no source tensor maps to.
    public var missing: [String] = []
    /// Source tensors (as named in the source) that map to no parameter.
    public var unexpected: [String] = []
    /// Parameters whose source tensor has another shape.
    public var mismatched: [ShapeMismatch] = []
    /// Parameters that two or more source tensors map to after name normalisation (e.g. both
    /// `module.x` and `x`), listed as "param <- a, b".
    public var duplicates: [String] = []

    public init() {}

    /// True when every parameter was matched exactly once and nothing was left over.
    public var isComplete: Bool {
        missing.isEmpty && unexpected.isEmpty && mismatched.isEmpty && duplicates.isEmpty
    }

    /// One line per problem kind, every name listed.
    public var description: String {
        var lines = ["\(loaded.count) loaded, \(missing.count) missing, \(unexpected.count) unexpected, \(mismatched.count) with the wrong shape, \(duplicates.count) given twice"]
        if !missing.isEmpty { lines.append("  missing (\(missing.count)): " + missing.joined(separator: ", ")) }
        if !unexpected.isEmpty { lines.append("  unexpected (\(unexpected.count)): " + unexpected.joined(separator: ", ")) }
        if !mismatched.isEmpty {
            lines.append("  wrong shape (\(mismatched.count)): "
                + mismatched.map { "\($0.name) expected \($0.expected) got \($0.got)" }.joined(separator: ", "))
        }
        if !duplicates.isEmpty { lines.append("  given twice (\(duplicates.count)): " + duplicates.joined(separator: "; ")) }
        return lines.joined(separator: "\n")
    }
}

extension ParameterStore {
    /// The name a checkpoint key stands for in the engine: a leading `module.` (DataParallel) is
    /// dropped, and the released code's prototype names are mapped (ARCHITECTURE.md section 5):
    /// encoder prefix `convxnet.` -> `deformuxnet_3d.`, `.dcn.` -> `.ddc.`.
    public static func normalizedParameterName(_ name: String) -> String {
        var s = Substring(name)
        while s.hasPrefix("module.") { s = s.dropFirst("module.".count) }
        var out = String(s)
        if out.hasPrefix("convxnet.") { out = "deformuxnet_3d." + out.dropFirst("convxnet.".count) }
        if out.contains(".dcn.") { out = out.replacing(".dcn.", with: ".ddc.") }
        return out
    }

    /// Matches source tensors (name, shape) with the store's parameters. Returns the report and, for
    /// each matched parameter entry index, the index of its source tensor.
    func planLoad(_ sources: [(name: String, shape: [Int])]) -> (StateDictReport, [(entry: Int, source: Int)]) {
        var report = StateDictReport()
        var byTarget: [String: [Int]] = [:]
        for (i, s) in sources.enumerated() {
            byTarget[ParameterStore.normalizedParameterName(s.name), default: []].append(i)
        }
        var plan: [(entry: Int, source: Int)] = []
        for (index, e) in layout.entries.enumerated() {
            guard let found = byTarget.removeValue(forKey: e.name) else {
                report.missing.append(e.name)
                continue
            }
            if found.count > 1 {
                report.duplicates.append("\(e.name) <- " + found.map { sources[$0].name }.sorted().joined(separator: ", "))
                continue
            }
            let s = sources[found[0]]
            if s.shape != e.shape {
                report.mismatched.append(.init(name: e.name, expected: e.shape, got: s.shape))
                continue
            }
            report.loaded.append(e.name)
            plan.append((index, found[0]))
        }
        report.unexpected = byTarget.values.flatMap { $0.map { sources[$0].name } }
        report.loaded.sort()
        report.missing.sort()
        report.unexpected.sort()
        report.mismatched.sort { $0.name < $1.name }
        report.duplicates.sort()
        return (report, plan)
    }

    private func checkStrict(_ report: StateDictReport, strict: Bool, source: String) throws {
        guard strict, !report.isComplete else { return }
        throw DeformUXError.invalidArgument("load state dict from \(source)", "the tensors do not match the model's parameters; nothing was loaded\n\(report)")
    }

    /// Loads the parameters from a safetensors file (F32, F16, BF16 or F64, converted to Float).
    ///
    /// Strict (the default): throws one `DeformUXError` listing every missing, unexpected, mis-shaped
    /// and doubly-given name, and loads nothing. Not strict: loads what matches and returns the rest in
    /// the report (missing parameters keep their values).
    @discardableResult
    public func load(safetensors path: String, strict: Bool = true) throws -> StateDictReport {
        let file = try SafetensorsFile(path: path)
        let (report, plan) = planLoad(file.entries.map { ($0.name, $0.shape) })
        try checkStrict(report, strict: strict, source: path)
        try write("load \(path)") {
            for (entry, source) in plan {
                let e = layout.entries[entry]
                try file.copy(file.entries[source].name, into: values + e.offset, count: e.count)
            }
        }
        return report
    }

    /// Loads the parameters from named (shape, row-major values) pairs; see `load(safetensors:strict:)`.
    @discardableResult
    public func load(_ tensors: [String: (shape: [Int], values: [Float])], strict: Bool = true) throws -> StateDictReport {
        let names = tensors.keys.sorted()
        var sources: [(name: String, shape: [Int])] = []
        for name in names {
            guard let t = tensors[name] else { continue }
            let n = try Tensor.elementCount(t.shape, context: "load state dict: tensor \(name)")
            guard n == t.values.count else {
                throw DeformUXError.invalidArgument("load state dict", "tensor \(name) has shape \(t.shape) (\(n) values) but \(t.values.count) values")
            }
            sources.append((name, t.shape))
        }
        let (report, plan) = planLoad(sources)
        try checkStrict(report, strict: strict, source: "a dictionary")
        try write("load state dict") {
            for (entry, source) in plan {
                let e = layout.entries[entry]
                guard let t = tensors[names[source]] else { continue }
                t.values.withUnsafeBufferPointer { b in
                    if let base = b.baseAddress { (values + e.offset).update(from: base, count: e.count) }
                }
            }
        }
        return report
    }

    /// Writes every parameter as F32 under its state-dict name (atomically; see `Safetensors.write`).
    /// Reads the values while no one changes them.
    public func save(safetensors path: String, metadata: [String: String] = [:]) throws {
        let items = layout.entries.map {
            Safetensors.Item(name: $0.name, shape: $0.shape, values: UnsafePointer(values + $0.offset))
        }
        try read("save \(path)") { _ in
            try withExtendedLifetime(self) { try Safetensors.write(items, metadata: metadata, to: path) }
        }
    }

    /// A copy of every parameter by state-dict name.
    public func stateDict() throws -> [String: (shape: [Int], values: [Float])] {
        try read("state dict") { _ in
            var out: [String: (shape: [Int], values: [Float])] = [:]
            for e in layout.entries {
                out[e.name] = (e.shape, Array(UnsafeBufferPointer(start: values + e.offset, count: e.count)))
            }
            return out
        }
    }
}
