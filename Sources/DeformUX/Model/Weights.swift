/// Loading and saving a network's weights under the released code's state-dict names.
extension DeformUXNet {
    /// Metadata key under which saved files record the configuration (JSON, the Python names).
    public static let configMetadataKey = "deformux.config"

    /// Loads weights from a safetensors file. Strict (the default): every missing, unexpected and
    /// mis-shaped key is listed in one error and nothing is loaded. Names may carry a `module.` prefix
    /// or the prototype names (`convxnet.`, `.dcn.`).
    @discardableResult
    public func load(from path: String, strict: Bool = true) throws -> StateDictReport {
        try parameters.load(safetensors: path, strict: strict)
    }

    /// Writes every parameter as F32 safetensors (atomically), with the configuration in the metadata.
    public func save(to path: String) throws {
        try parameters.save(safetensors: path, metadata: [DeformUXNet.configMetadataKey: config.json,
                                                           "format": "pt"])
    }

    /// Loads from borrowed float32 buffers (name, shape, values), with the rules of `load(from:strict:)`.
    @discardableResult
    public func loadStateDict(_ items: [Safetensors.Item], strict: Bool = true) throws -> StateDictReport {
        var sources: [(name: String, shape: [Int])] = []
        for item in items {
            _ = try Tensor.elementCount(item.shape, context: "load state dict: tensor \(item.name)")
            sources.append((item.name, item.shape))
        }
        let (report, plan) = parameters.planLoad(sources)
        if strict && !report.isComplete {
            throw DeformUXError.invalidArgument("load_state_dict", "the tensors do not match the model's parameters; nothing was loaded\n\(report)")
        }
        try parameters.write("load state dict") {
            for (entry, source) in plan {
                let e = parameters.layout.entries[entry]
                (parameters.values + e.offset).update(from: items[source].values, count: e.count)
            }
        }
        return report
    }
}
