/// The configuration of a DeformUX-Net (ARCHITECTURE.md), covering the paper's final model, the
/// released code's variants, 3D UX-Net and the ablations of the paper's Table 3.
public struct DeformUXNetConfig: Sendable, Equatable, Codable {
    /// The encoder block: DeformUX (depthwise deformable 3x3x3) or 3D UX-Net (depthwise k x k x k).
    public enum Block: String, Sendable, Codable, CaseIterable { case deformux, uxnet }
    /// The block's MLP: ordinary 1x1x1 convs (the paper's final model) or groups=C (the released code).
    public enum MLP: String, Sendable, Codable, CaseIterable { case dense, grouped, none }
    /// Which offset axes are learnt (Table 3): all three, or one plane with the third axis held at 0.
    /// Axes follow section 8: D, H, W are x, y, z.
    public enum OffsetPlanes: String, Sendable, Codable, CaseIterable { case all, xy, xz, yz }
    /// The deformable conv: depthwise (the paper) or a full C -> C deformable conv (`standard`, Table 3).
    public enum Deformable: String, Sendable, Codable, CaseIterable { case depthwise, standard }

    public var inChannels: Int
    public var outChannels: Int
    public var featureSize: [Int]
    public var depths: [Int]
    public var hiddenSize: Int
    public var block: Block
    public var mlp: MLP
    public var offsetMode: OffsetMode
    /// UX-Net's depthwise kernel size (odd).
    public var kernelSize: Int
    /// Kernel of the offset branch: 1 (the paper) or 3 (Table 3).
    public var offsetKernel: Int
    public var offsetPlanes: OffsetPlanes
    public var deformable: Deformable

    public init(inChannels: Int = 1, outChannels: Int = 16, featureSize: [Int] = [48, 96, 192, 384],
                depths: [Int] = [2, 2, 2, 2], hiddenSize: Int = 768, block: Block = .deformux,
                mlp: MLP? = nil, offsetMode: OffsetMode = .aligned, kernelSize: Int = 7,
                offsetKernel: Int = 1, offsetPlanes: OffsetPlanes = .all, deformable: Deformable = .depthwise) {
        self.inChannels = inChannels
        self.outChannels = outChannels
        self.featureSize = featureSize
        self.depths = depths
        self.hiddenSize = hiddenSize
        self.block = block
        // 3D UX-Net's released code uses the grouped MLP; DeformUX-Net's final model the dense one.
        self.mlp = mlp ?? (block == .uxnet ? .grouped : .dense)
        self.offsetMode = offsetMode
        self.kernelSize = kernelSize
        self.offsetKernel = offsetKernel
        self.offsetPlanes = offsetPlanes
        self.deformable = deformable
    }

    /// Bounds of `validate`: widths (channels), blocks per stage, UX-Net kernel size.
    public static let maxWidth = 16384, maxDepth = 64, maxKernelSize = 31

    /// The state-dict prefix of the encoder.
    public var encoderPrefix: String { block == .deformux ? "deformuxnet_3d." : "uxnet_3d." }

    /// Checks every field; the message names the field, what was expected and what came.
    public func validate() throws {
        func fail(_ m: String) -> DeformUXError { DeformUXError.invalidArgument("DeformUXNet config", "\(m)") }
        // Upper bounds far above any real network, so that every size computed from a configuration
        // fits in memory arithmetic (and a typo gives a message instead of a 1 TB allocation).
        let maxWidth = DeformUXNetConfig.maxWidth, maxDepth = DeformUXNetConfig.maxDepth
        guard (1...maxWidth).contains(inChannels) else { throw fail("in_channels must be in 1...\(maxWidth), got \(inChannels)") }
        guard (1...maxWidth).contains(outChannels) else { throw fail("out_channels must be in 1...\(maxWidth), got \(outChannels)") }
        guard featureSize.count == 4, featureSize.allSatisfy({ (1...maxWidth).contains($0) }) else {
            throw fail("feature_size must be 4 widths in 1...\(maxWidth), got \(featureSize)")
        }
        guard depths.count == 4, depths.allSatisfy({ (0...maxDepth).contains($0) }) else {
            throw fail("depths must be 4 block counts in 0...\(maxDepth), got \(depths)")
        }
        guard (1...maxWidth).contains(hiddenSize) else { throw fail("hidden_size must be in 1...\(maxWidth), got \(hiddenSize)") }
        guard (1...DeformUXNetConfig.maxKernelSize).contains(kernelSize), kernelSize % 2 == 1 else {
            throw fail("kernel_size must be odd and in 1...\(DeformUXNetConfig.maxKernelSize), got \(kernelSize)")
        }
        guard offsetKernel == 1 || offsetKernel == 3 else {
            throw fail("offset_kernel must be 1 or 3, got \(offsetKernel)")
        }
        if block == .uxnet {
            guard offsetPlanes == .all, deformable == .depthwise, offsetKernel == 1 else {
                throw fail("offset options (offset_kernel, offset_planes, deformable) apply to block=deformux only")
            }
        }
        if offsetKernel == 3 || deformable == .standard {
            guard offsetMode == .aligned else {
                throw fail("offset_mode official reproduces the released 1x1x1 offset conv; use aligned with offset_kernel 3 or deformable standard")
            }
        }
    }
}
