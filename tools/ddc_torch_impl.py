"""The DDC (ARCHITECTURE.md section 3) in PyTorch with grid_sample, shared by the fixture generator
(tools/make_ddc_fixtures.py) and the benchmark (bench/ddc_torch.py).

grid_sample(mode="bilinear") on a 5-D input is trilinear; padding_mode="zeros" makes every neighbour
outside the volume count 0, which also makes every sample with a coordinate <= -1 or >= size exactly 0,
the DDC's rule. align_corners=False maps voxel p to (2p + 1) / size - 1 and works for size-1 axes
(align_corners=True would divide by size - 1).
"""
import torch
import torch.nn.functional as F


def kernel_positions(n, d, h, w, dtype, device=None):
    """Base sampling positions o - 1 + (i, j, k): 27 x 3 x D x H x W (axis order D, H, W)."""
    zd, zh, zw = torch.meshgrid(torch.arange(d, dtype=dtype, device=device),
                                torch.arange(h, dtype=dtype, device=device),
                                torch.arange(w, dtype=dtype, device=device), indexing="ij")
    base = torch.stack([zd, zh, zw])  # 3 x D x H x W
    taps = torch.tensor([[i - 1, j - 1, k - 1] for i in range(3) for j in range(3) for k in range(3)],
                        dtype=dtype, device=device)  # 27 x 3, tap t = i*9 + j*3 + k
    return base[None] + taps[:, :, None, None, None]


def ddc(x, offsets, weight, bias):
    """x N x C x D x H x W, offsets N x 81 x D x H x W (channel 3t + a), weight C x 1 x 3 x 3 x 3, bias C or None."""
    n, c, d, h, w = x.shape
    p = kernel_positions(n, d, h, w, x.dtype, x.device)[None] + offsets.view(n, 27, 3, d, h, w)
    size = torch.tensor([d, h, w], dtype=x.dtype, device=x.device).view(1, 1, 3, 1, 1, 1)
    g = (2 * p + 1) / size - 1
    # grid_sample wants (x, y, z) = (W, H, D) last: N x (27 D) x H x W x 3.
    grid = g.permute(0, 1, 3, 4, 5, 2).flip(-1).reshape(n, 27 * d, h, w, 3)
    s = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    s = s.view(n, c, 27, d, h, w)
    y = torch.einsum("nctdhw,ct->ncdhw", s, weight.reshape(c, 27))
    if bias is not None:
        y = y + bias.view(1, c, 1, 1, 1)
    return y


def layer_offsets(x, offset_weight, offset_bias, mode):
    """The offset branch: 1x1x1 conv C -> 81. 'aligned': padding 0. 'official': the released code's
    padding 1, whose N x 81 x (D+2) x (H+2) x (W+2) buffer is read flat as N x 81 x D x H x W."""
    n, c, d, h, w = x.shape
    if mode == "aligned":
        return F.conv3d(x, offset_weight, offset_bias)
    padded = F.conv3d(x, offset_weight, offset_bias, padding=1)
    return padded.reshape(-1)[: n * 81 * d * h * w].view(n, 81, d, h, w)


def ddc_layer(x, weight, bias, offset_weight, offset_bias, mode):
    offsets = layer_offsets(x, offset_weight, offset_bias, mode)
    return ddc(x, offsets, weight, bias), offsets
