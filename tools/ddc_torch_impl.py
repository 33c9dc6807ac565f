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
    """x N x C x D x H x W, offsets N x 81 x D x H x W (channel 3t + a), bias Cout or None.
    weight C x 1 x 3 x 3 x 3: the depthwise DDC, y[c] = b[c] + sum_t w[c, t] sample_t(x[c]);
    weight Cout x C x 3 x 3 x 3 (C > 1): the `standard` ablation (Table 3), a full deformable conv with the
    same shared offsets, y[o] = b[o] + sum_c sum_t w[o, c, t] sample_t(x[c])."""
    n, c, d, h, w = x.shape
    p = kernel_positions(n, d, h, w, x.dtype, x.device)[None] + offsets.view(n, 27, 3, d, h, w)
    size = torch.tensor([d, h, w], dtype=x.dtype, device=x.device).view(1, 1, 3, 1, 1, 1)
    g = (2 * p + 1) / size - 1
    # grid_sample wants (x, y, z) = (W, H, D) last: N x (27 D) x H x W x 3.
    grid = g.permute(0, 1, 3, 4, 5, 2).flip(-1).reshape(n, 27 * d, h, w, 3)
    s = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    s = s.view(n, c, 27, d, h, w)
    if weight.shape[1] == 1:
        y = torch.einsum("nctdhw,ct->ncdhw", s, weight.reshape(c, 27))
    else:
        assert weight.shape[1] == c, (weight.shape, x.shape)
        y = torch.einsum("nctdhw,oct->nodhw", s, weight.reshape(weight.shape[0], c, 27))
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1, 1)
    return y


# The offset axes of a plane (ARCHITECTURE.md section 8: D, H, W are x, y, z).
AXES = {"x": 0, "y": 1, "z": 2}


def held_axis(planes):
    """The offset axis a single-plane ablation holds at zero (section 3): the one not in the plane
    ("xy" -> 2, the W axis; "xz" -> 1, H; "yz" -> 0, D). None for "all"."""
    if planes == "all":
        return None
    assert len(planes) == 2 and set(planes) <= set(AXES), planes
    (axis,) = set(AXES.values()) - {AXES[p] for p in planes}
    return axis


def layer_offsets(x, offset_weight, offset_bias, mode, planes="all"):
    """The offset branch: conv C -> 81. With a 1x1x1 kernel, 'aligned': padding 0; 'official': the
    released code's padding 1, whose N x 81 x (D+2) x (H+2) x (W+2) buffer is read flat as
    N x 81 x D x H x W. With a 3x3x3 kernel (the Table 3 ablation; aligned only): padding 1.
    `planes` other than "all" then sets the held axis's channels (3t + axis) to zero."""
    n, c, d, h, w = x.shape
    k = offset_weight.shape[-1]
    if k == 3:
        assert mode == "aligned", "the 3x3x3 offset branch exists in aligned mode only"
        offsets = F.conv3d(x, offset_weight, offset_bias, padding=1)
    elif mode == "aligned":
        offsets = F.conv3d(x, offset_weight, offset_bias)
    else:
        padded = F.conv3d(x, offset_weight, offset_bias, padding=1)
        offsets = padded.reshape(-1)[: n * 81 * d * h * w].view(n, 81, d, h, w)
    axis = held_axis(planes)
    if axis is not None:
        offsets = offsets.clone()
        offsets[:, axis::3] = 0  # constants: no gradient flows back through them
    return offsets


def ddc_layer(x, weight, bias, offset_weight, offset_bias, mode, planes="all"):
    offsets = layer_offsets(x, offset_weight, offset_bias, mode, planes)
    return ddc(x, offsets, weight, bias), offsets
