import Foundation
@testable import DeformUX

/// Parameters and inputs of a reference by name: parameters under their state-dict names (PyTorch
/// layouts, as in the store), inputs under names of the test's choosing ("x", "skip", ...). Double.
typealias Values = [String: [Double]]

extension Dictionary where Key == String, Value == [Double] {
    /// The named array; an empty one (which the references' preconditions reject) when missing.
    func get(_ name: String) -> [Double] { self[name] ?? [] }
}

/// The network's blocks in Double, composed from the plain-loop references of
/// Sources/DeformUX/Kernels/Reference (`ConvReference`, `NormReference`, `DeformConv3dReference`,
/// `DDCLayerReference`, `StandardDeformConv3dReference`) exactly as ARCHITECTURE.md writes them, on
/// channels-last activations (N x D x H x W x C, as the engine's layers). The oracle of the block
/// gradient checks (BlockGradientTests: central differences of sum(out * gradOut)) and of the fused
/// path tests. Untuned on purpose; nothing here calls the engine's kernels or layers.
enum BlockReference {
    // MARK: Pieces

    /// [a, b] along channels (a's channels first), per voxel.
    static func concat(_ a: [Double], _ ca: Int, _ b: [Double], _ cb: Int) -> [Double] {
        let voxels = a.count / ca
        var out = [Double](repeating: 0, count: voxels * (ca + cb))
        for v in 0..<voxels {
            for i in 0..<ca { out[v * (ca + cb) + i] = a[v * ca + i] }
            for i in 0..<cb { out[v * (ca + cb) + ca + i] = b[v * cb + i] }
        }
        return out
    }

    /// PyTorch Conv3d (`prefix` + "weight", and "bias" if `bias`) on x of sizes `v`; returns y and its sizes.
    static func conv(_ x: [Double], _ v: Volume5, _ p: Values, _ prefix: String, cout: Int, kernel k: Int,
                     stride: Int = 1, padding: Int = 0, groups: Int = 1, bias: Bool) -> ([Double], Volume5) {
        let y = ConvReference.conv3d(x: x, n: v.n, cin: v.c, d: v.d, h: v.h, w: v.w, weight: p.get(prefix + "weight"),
                                     bias: bias ? p.get(prefix + "bias") : nil, cout: cout, kernel: k, stride: stride,
                                     padding: padding, groups: groups)
        let o = { (s: Int) in (s + 2 * padding - k) / stride + 1 }
        return (y, Volume5(n: v.n, d: o(v.d), h: o(v.h), w: o(v.w), c: cout))
    }

    static func instanceNorm(_ x: [Double], _ v: Volume5) -> [Double] {
        NormReference.instanceNorm(x, n: v.n, voxels: v.voxels, channels: v.c)
    }

    static func leakyReLU(_ x: [Double]) -> [Double] { x.map { NormReference.leakyReLU($0, slope: 0.01) } }

    static func gelu(_ x: [Double]) -> [Double] { x.map { NormReference.gelu($0, erf: Foundation.erf) } }

    /// Channel LayerNorm with `prefix` + "weight" / "bias", eps 1e-6.
    static func layerNorm(_ x: [Double], channels: Int, _ p: Values, _ prefix: String) -> [Double] {
        NormReference.channelLayerNorm(x, weight: p.get(prefix + "weight"), bias: p.get(prefix + "bias"), channels: channels)
    }

    // MARK: Decoder blocks

    /// MONAI's UnetResBlock on [x, x2] (x2 optional, c2 channels): conv1 3x3x3 -> IN -> LeakyReLU ->
    /// conv2 3x3x3 -> IN; residual [x, x2] itself when the width does not change, else IN(conv3 1x1x1);
    /// add; LeakyReLU. Convs without bias. `v` describes x (v.c its channels).
    static func resBlock(_ x: [Double], _ x2: [Double]? = nil, c2: Int = 0, _ v: Volume5, cout: Int,
                         _ p: Values, _ prefix: String) -> [Double] {
        let input = x2.map { concat(x, v.c, $0, c2) } ?? x
        var vin = v
        vin.c = v.c + c2
        let (a, va) = conv(input, vin, p, prefix + "conv1.conv.", cout: cout, kernel: 3, padding: 1, bias: false)
        let h = leakyReLU(instanceNorm(a, va))
        let (b, _) = conv(h, va, p, prefix + "conv2.conv.", cout: cout, kernel: 3, padding: 1, bias: false)
        let bn = instanceNorm(b, va)
        let residual: [Double]
        if vin.c == cout {
            residual = input
        } else {
            let (r, _) = conv(input, vin, p, prefix + "conv3.conv.", cout: cout, kernel: 1, bias: false)
            residual = instanceNorm(r, va)
        }
        return leakyReLU(zip(bn, residual).map(+))
    }

    /// MONAI's UnetrUpBlock: ConvTranspose3d k2 s2 (no bias, weight Cin x Cout x 2 x 2 x 2), then the
    /// ResBlock on [upsampled, skip]. `v` describes x; the skip is 2x larger with `cout` channels.
    static func upBlock(_ x: [Double], _ v: Volume5, skip: [Double], cout: Int, _ p: Values, _ prefix: String) -> [Double] {
        let up = ConvReference.convTranspose3d(x: x, n: v.n, cin: v.c, d: v.d, h: v.h, w: v.w,
                                               weight: p.get(prefix + "transp_conv.conv.weight"), bias: nil, cout: cout,
                                               kernel: 2, stride: 2)
        let vu = Volume5(n: v.n, d: 2 * v.d, h: 2 * v.h, w: 2 * v.w, c: cout)
        return resBlock(up, skip, c2: cout, vu, cout: cout, p, prefix + "conv_block.")
    }

    // MARK: Encoder blocks

    /// The offset axis a single-plane ablation holds at zero (ARCHITECTURE.md sections 3 and 8: D, H, W
    /// are x, y, z, so the xy plane holds W, xz holds H, yz holds D).
    static func heldAxis(_ planes: DeformUXNetConfig.OffsetPlanes) -> Int? {
        switch planes {
        case .all: return nil
        case .xy: return 2
        case .xz: return 1
        case .yz: return 0
        }
    }

    /// The offset field the DDC reads (N x 81 x D x H x W, held axis zeroed), for channels-last x.
    static func offsets(_ x: [Double], _ v: Volume5, _ config: DeformUXNetConfig, _ p: Values, _ prefix: String) -> [Double] {
        guard let s = try? DDCShape(n: v.n, c: v.c, d: v.d, h: v.h, w: v.w) else { return [] }
        var off: [Double]
        if config.offsetKernel == 3 {
            // The Table 3 branch: a 3x3x3 conv C -> 81, padding 1 (aligned only).
            let (o, _) = conv(x, v, p, prefix + "conv_offset.", cout: DDCShape.offsetChannels, kernel: 3, padding: 1, bias: true)
            off = ConvReference.toChannelsFirst(o, n: v.n, c: DDCShape.offsetChannels, voxels: v.voxels)
        } else {
            off = DDCLayerReference.offsets(x: ConvReference.toChannelsFirst(x, n: v.n, c: v.c, voxels: v.voxels),
                                            offsetWeight: p.get(prefix + "conv_offset.weight"),
                                            offsetBias: p.get(prefix + "conv_offset.bias"), mode: config.offsetMode, shape: s)
        }
        if let axis = heldAxis(config.offsetPlanes) { off = DDCLayerReference.hold(axis: axis, of: off, shape: s) }
        return off
    }

    /// The block's spatial conv, channels-last: DeformUX's DDC (depthwise, or the standard C -> C
    /// ablation) with offsets from its offset branch, or 3D UX-Net's depthwise k x k x k conv.
    static func spatial(_ x: [Double], _ v: Volume5, _ config: DeformUXNetConfig, _ p: Values, _ prefix: String) -> [Double] {
        switch config.block {
        case .uxnet:
            let k = config.kernelSize
            return conv(x, v, p, prefix + "dwconv.", cout: v.c, kernel: k, padding: k / 2, groups: v.c, bias: true).0
        case .deformux:
            guard let s = try? DDCShape(n: v.n, c: v.c, d: v.d, h: v.h, w: v.w) else { return [] }
            let xf = ConvReference.toChannelsFirst(x, n: v.n, c: v.c, voxels: v.voxels)
            let off = offsets(x, v, config, p, prefix + "ddc.")
            let w = p.get(prefix + "ddc.weight"), b = p.get(prefix + "ddc.bias")
            let y = config.deformable == .standard
                ? StandardDeformConv3dReference.forward(x: xf, offsets: off, weight: w, bias: b, shape: s, cout: v.c)
                : DeformConv3dReference.forward(x: xf, offsets: off, weight: w, bias: b, shape: s)
            return ConvReference.toChannelsLast(y, n: v.n, c: v.c, voxels: v.voxels)
        }
    }

    /// What follows the spatial conv's output y: out = x + gamma * MLP(LN(y)) (MLP dense or grouped
    /// 1x1x1 convs C -> 4C -> C with GELU between, or nothing for mlp = none).
    static func blockTail(_ x: [Double], y: [Double], _ v: Volume5, _ config: DeformUXNetConfig, _ p: Values,
                          _ prefix: String) -> [Double] {
        let c = v.c
        let z = layerNorm(y, channels: c, p, prefix + "norm.")
        var m = z
        if config.mlp != .none {
            let groups = config.mlp == .grouped ? c : 1
            let (h, vh) = conv(z, v, p, prefix + "pwconv1.", cout: 4 * c, kernel: 1, groups: groups, bias: true)
            m = conv(gelu(h), vh, p, prefix + "pwconv2.", cout: c, kernel: 1, groups: groups, bias: true).0
        }
        let gamma = p.get(prefix + "gamma")
        return (0..<x.count).map { x[$0] + gamma[$0 % c] * m[$0] }
    }

    static func encoderBlock(_ x: [Double], _ v: Volume5, _ config: DeformUXNetConfig, _ p: Values, _ prefix: String) -> [Double] {
        blockTail(x, y: spatial(x, v, config, p, prefix), v, config, p, prefix)
    }

    /// The encoder's four skips x2..x5 for x (channels-last, v.c = Cin): stem (k7 s2 p3 conv + LN),
    /// then per stage: (LN + k2 s2 conv for stages 1-3), the blocks, and the stage's out norm.
    /// `fromStem`: start from this stem conv output instead of computing it (finite differences of the
    /// later parameters reuse it). `blockInput` sees every block's input and prefix.
    static func encoder(_ x: [Double], _ v: Volume5, _ config: DeformUXNetConfig, _ p: Values,
                        fromStem: ([Double], Volume5)? = nil,
                        blockInput: (([Double], Volume5, String) -> Void)? = nil) -> [[Double]] {
        let e = config.encoderPrefix, f = config.featureSize
        var (h, vh) = fromStem ?? stem(x, v, config, p)
        h = layerNorm(h, channels: f[0], p, e + "downsample_layers.0.1.")
        var skips: [[Double]] = []
        for i in 0..<4 {
            if i > 0 {
                let z = layerNorm(h, channels: f[i - 1], p, e + "downsample_layers.\(i).0.")
                (h, vh) = conv(z, vh, p, e + "downsample_layers.\(i).1.", cout: f[i], kernel: 2, stride: 2, bias: true)
            }
            for j in 0..<config.depths[i] {
                blockInput?(h, vh, e + "stages.\(i).\(j).")
                h = encoderBlock(h, vh, config, p, e + "stages.\(i).\(j).")
            }
            skips.append(layerNorm(h, channels: f[i], p, e + "norm\(i)."))
        }
        return skips
    }

    /// The stem conv (Cin -> F0, k7, stride 2, padding 3, bias).
    static func stem(_ x: [Double], _ v: Volume5, _ config: DeformUXNetConfig, _ p: Values) -> ([Double], Volume5) {
        conv(x, v, p, config.encoderPrefix + "downsample_layers.0.0.", cout: config.featureSize[0], kernel: 7, stride: 2,
             padding: 3, bias: true)
    }
}
