/// Where the channels of an activation are. The Python/C API speaks PyTorch's channels-first layout;
/// the network runs channels-last, so that a voxel's channels are one contiguous vector (what the
/// convolution and DDC kernels and the channel LayerNorm want).
public enum Layout: Sendable, Equatable {
    /// N x C x D x H x W
    case channelsFirst
    /// N x D x H x W x C
    case channelsLast
}

/// One sample's activation seen as a logical matrix of channels x voxels, stored in either layout.
/// Row-major storage: channels-first is the matrix itself (leading dimension = voxels),
/// channels-last is its transpose (leading dimension = channels).
struct ChannelMatrix {
    let pointer: UnsafeMutablePointer<Float>
    let channels: Int
    let voxels: Int
    let layout: Layout

    /// The columns `r` (a voxel range) as a GEMM operand.
    func columns(_ r: Range<Int>) -> GemmOperand {
        switch layout {
        case .channelsFirst: return GemmOperand(pointer: pointer + r.lowerBound, ld: voxels, transposed: false)
        case .channelsLast: return GemmOperand(pointer: pointer + r.lowerBound * channels, ld: channels, transposed: true)
        }
    }
}
