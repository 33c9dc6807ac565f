/// A per-module account of a DeformUX-Net for one input size: parameters (from the parameter store,
/// by state-dict prefix) and multiply-adds of the convolutions (the DDC counted as a depthwise 3x3x3
/// conv plus its offset branch; norms and activations not counted, as fvcore/thop count them).
public struct ModelSummary: Sendable, CustomStringConvertible {
    public struct Row: Sendable {
        public let module: String
        /// N x C x D x H x W of the module's output.
        public let outputShape: [Int]
        public let parameters: Int
        public let macs: Int
    }

    public let rows: [Row]
    public let totalParameters: Int
    /// Multiply-adds of the whole network (checked against overflow when the summary was made).
    public let totalMACs: Int

    init(rows: [Row]) throws {
        self.rows = rows
        var p = 0, m = 0
        for r in rows {
            p = try checkedSum(p, r.parameters)
            m = try checkedSum(m, r.macs)
        }
        totalParameters = p
        totalMACs = m
    }

    public var description: String {
        var lines = [pad("module", 44) + pad("output", 26) + lpad("parameters", 14) + lpad("GMACs", 10)]
        for r in rows {
            let shape = "(" + r.outputShape.map(String.init).joined(separator: ", ") + ")"
            lines.append(pad(r.module, 44) + pad(shape, 26) + lpad(String(r.parameters), 14)
                         + lpad(decimal(Double(r.macs) / 1e9, 3), 10))
        }
        lines.append(pad("total", 70) + lpad(String(totalParameters), 14) + lpad(decimal(Double(totalMACs) / 1e9, 3), 10))
        return lines.joined(separator: "\n")
    }
}

extension DeformUXNet {
    /// The summary for an input of shape N x Cin x D x H x W (sizes multiples of 16). Every count is
    /// computed with checked arithmetic: an input too large to count throws instead of trapping.
    public func summary(inputShape: [Int]) throws -> ModelSummary {
        try validateInput(inputShape, operation: "summary")
        let c = config, f = c.featureSize
        let n = inputShape[0]
        let size = Array(inputShape[2...])
        func grid(_ level: Int) -> [Int] { size.map { $0 >> level } }
        func vox(_ level: Int) throws -> Int { try checkedProduct([n] + grid(level)) }
        func params(_ prefix: String) -> Int {
            parameters.layout.entries.filter { $0.name.hasPrefix(prefix) }.reduce(0) { $0 + $1.count }
        }
        func resMACs(_ level: Int, _ cin: Int, _ cout: Int) throws -> Int {
            let perVoxel = try checkedSum(checkedProduct([cout, cin, 27]), checkedProduct([cout, cout, 27]),
                                          cin != cout ? checkedProduct([cout, cin]) : 0)
            return try checkedProduct([vox(level), perVoxel])
        }
        var rows: [ModelSummary.Row] = []
        func add(_ module: String, _ channels: Int, _ level: Int, _ macs: Int, prefix: String? = nil) {
            rows.append(.init(module: module, outputShape: [n, channels] + grid(level),
                              parameters: params(prefix ?? module + "."), macs: macs))
        }
        let e = c.encoderPrefix
        add(e + "downsample_layers.0", f[0], 1, try checkedProduct([vox(1), f[0], c.inChannels, 343]))
        for i in 0..<4 {
            let level = i + 1
            if i > 0 { add(e + "downsample_layers.\(i)", f[i], level, try checkedProduct([vox(level), f[i], f[i - 1], 8])) }
            for j in 0..<c.depths[i] {
                let ch = f[i]
                var perVoxel = 0
                switch c.block {
                case .deformux:
                    let k3 = c.offsetKernel * c.offsetKernel * c.offsetKernel
                    perVoxel = try checkedSum(checkedProduct([27, ch, c.deformable == .standard ? ch : 1]),
                                              checkedProduct([DDCShape.offsetChannels, ch, k3]))
                case .uxnet:
                    perVoxel = try checkedProduct([ch, c.kernelSize, c.kernelSize, c.kernelSize])
                }
                switch c.mlp {
                case .dense: perVoxel = try checkedSum(perVoxel, checkedProduct([8, ch, ch]))
                case .grouped: perVoxel = try checkedSum(perVoxel, checkedProduct([8, ch]))
                case .none: break
                }
                add(e + "stages.\(i).\(j)", ch, level, try checkedProduct([vox(level), perVoxel]))
            }
            add(e + "norm\(i)", f[i], level, 0)
        }
        let widths = [c.inChannels] + f + [c.hiddenSize]
        for k in 1...5 {
            let level = k == 1 ? 0 : k - 1
            add("encoder\(k)", widths[k], level, try resMACs(level, widths[k - 1], widths[k]))
        }
        for k in stride(from: 5, through: 2, by: -1) {
            let level = k - 2   // decoder k outputs at the resolution of encoder k-1
            let up = try checkedProduct([vox(level), widths[k], widths[k - 1]])  // k2 s2 transposed: 8 taps per input voxel
            add("decoder\(k)", widths[k - 1], level, try checkedSum(up, resMACs(level, 2 * widths[k - 1], widths[k - 1])))
        }
        add("decoder1", f[0], 0, try resMACs(0, f[0], f[0]))
        add("out", c.outChannels, 0, try checkedProduct([vox(0), c.outChannels, f[0]]))
        return try ModelSummary(rows: rows)
    }
}

/// The product of `factors`, or an error when it overflows (a count for a size no machine can run).
func checkedProduct(_ factors: [Int]) throws -> Int {
    var p = 1
    for f in factors {
        let (r, overflow) = p.multipliedReportingOverflow(by: f)
        guard !overflow else {
            throw DeformUXError.invalidArgument("summary", "the input is too large to count its multiply-adds")
        }
        p = r
    }
    return p
}

/// The sum of `terms`, or an error when it overflows.
func checkedSum(_ terms: Int...) throws -> Int {
    var s = 0
    for t in terms {
        let (r, overflow) = s.addingReportingOverflow(t)
        guard !overflow else {
            throw DeformUXError.invalidArgument("summary", "the input is too large to count its multiply-adds")
        }
        s = r
    }
    return s
}

private func pad(_ s: String, _ width: Int) -> String {
    s.count >= width ? s + " " : s + String(repeating: " ", count: width - s.count)
}

private func lpad(_ s: String, _ width: Int) -> String {
    s.count >= width ? " " + s : String(repeating: " ", count: width - s.count) + s
}

/// `value` with `digits` decimals, right-aligned to `width` characters (no Foundation).
public func decimal(_ value: Double, _ digits: Int, width: Int = 0) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let r = (abs(value) * scale).rounded()
    let whole = Int(r / scale)
    var frac = String(Int(r.truncatingRemainder(dividingBy: scale)))
    while frac.count < digits { frac = "0" + frac }
    let s = (value < 0 && r != 0 ? "-" : "") + String(whole) + (digits > 0 ? "." + frac : "")
    return s.count >= width ? s : String(repeating: " ", count: width - s.count) + s
}
