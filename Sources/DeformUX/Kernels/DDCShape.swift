/// Sizes of a depthwise deformable 3x3x3 convolution (ARCHITECTURE.md section 3):
/// x and y are N x C x D x H x W, offsets N x 81 x D x H x W, weight C x 1 x 3 x 3 x 3, bias C.
public struct DDCShape: Equatable, Sendable, CustomStringConvertible {
    public static let taps = 27
    public static let offsetChannels = 81

    public var n: Int, c: Int, d: Int, h: Int, w: Int

    /// Checks every size is >= 1 and that all buffer sizes fit in memory arithmetic.
    public init(n: Int, c: Int, d: Int, h: Int, w: Int) throws {
        for (name, v) in [("N", n), ("C", c), ("D", d), ("H", h), ("W", w)] {
            // Sizes are bounded before any arithmetic on them (the padding adds 2 to D, H and W).
            guard v <= Int(Int32.max) else {
                throw DeformUXError.invalidArgument("deform_conv3d", "size \(name) is too large", expected: "at most 2^31 - 1",
                                                    got: "\(v)")
            }
            guard v >= 1 else {
                throw DeformUXError.invalidArgument("deform_conv3d", "size \(name) must be >= 1, got \(v) (shape N=\(n) C=\(c) D=\(d) H=\(h) W=\(w))")
            }
        }
        _ = try Tensor.elementCount([n, max(c, DDCShape.offsetChannels), d + 2, h + 2, w + 2], context: "deform_conv3d")
        self.n = n; self.c = c; self.d = d; self.h = h; self.w = w
    }

    /// Voxels of one channel.
    public var voxels: Int { d * h * w }
    /// Elements of x (and y).
    public var count: Int { n * c * voxels }
    /// Elements of the offset field.
    public var offsetCount: Int { n * DDCShape.offsetChannels * voxels }
    public var weightCount: Int { c * DDCShape.taps }

    public var description: String { "N=\(n) C=\(c) D=\(d) H=\(h) W=\(w)" }
}
