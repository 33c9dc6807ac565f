#!/usr/bin/env python3
"""DeformUX-Net (and 3D UX-Net) in PyTorch, written from /work/shared/design/ARCHITECTURE.md: the oracle
for the Swift engine's whole-network tests (tools/make_network_fixtures.py) and the source of test
checkpoints for python/deformux/convert.py. Needs torch; the engine never does.

Module and parameter names are exactly the state-dict keys of ARCHITECTURE.md section 5 (the released
code's): `deformuxnet_3d.` (or `uxnet_3d.`) encoder, `encoder1..5`, `decoder5..1`, `out`.
The DDC is tools/ddc_torch_impl.py (grid_sample), with the `aligned` / `official` offset modes and the
paper's Table 3 ablations as options (ARCHITECTURE.md section 3): `offset_kernel=3`, `offset_planes`
"xy" / "xz" / "yz", `deformable="standard"`, and `mlp="none"`.

    python3 tools/reference_model.py --check-counts     # section 6's parameter counts, exactly
"""
import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddc_torch_impl import ddc_layer  # noqa: E402


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the C values of each voxel of N x C x D x H x W: biased variance, eps inside the
    square root, per-channel weight and bias (the released code's LayerNorm(data_format="channels_first"))."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


class DDC(nn.Module):
    """Depthwise deformable 3x3x3 conv with one tri-planar offset field (81 channels) from a 1x1x1 conv.

    The Table 3 ablations (section 3): `offset_kernel` 3 (a 3x3x3 offset conv, padding 1, aligned only),
    `offset_planes` "xy" / "xz" / "yz" (the third axis's offset channels held at zero), `deformable`
    "standard" (a full C -> C deformable conv, weight C x C x 3 x 3 x 3, instead of the depthwise one)."""

    def __init__(self, c, offset_mode="aligned", offset_kernel=1, offset_planes="all", deformable="depthwise"):
        super().__init__()
        assert offset_mode in ("aligned", "official") and offset_kernel in (1, 3)
        assert offset_planes in ("all", "xy", "xz", "yz") and deformable in ("depthwise", "standard")
        assert offset_mode == "aligned" or (offset_kernel == 1 and deformable == "depthwise")
        self.offset_mode = offset_mode
        self.offset_planes = offset_planes
        groups = c if deformable == "depthwise" else 1
        ref = nn.Conv3d(c, c, 3, padding=1, groups=groups)  # PyTorch's default init for the weights
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone())
        self.conv_offset = nn.Conv3d(c, 81, offset_kernel)
        nn.init.zeros_(self.conv_offset.weight)  # a fresh block is a plain depthwise conv
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x):
        y, _ = ddc_layer(x, self.weight, self.bias, self.conv_offset.weight, self.conv_offset.bias,
                         self.offset_mode, self.offset_planes)
        return y


class Block(nn.Module):
    """ConvNeXt-ordered block: x + gamma * pw2(GELU(pw1(LN(spatial(x))))) (section 2). `block` is
    "deformux" (the DDC, named `ddc`) or "uxnet" (depthwise Conv3d k7 named `dwconv`). `mlp` "none" (the
    Table 3 ablation) drops pw1, GELU and pw2: x + gamma * LN(spatial(x))."""

    def __init__(self, c, block="deformux", mlp="dense", offset_mode="aligned", kernel_size=7,
                 layer_scale=1e-6, offset_kernel=1, offset_planes="all", deformable="depthwise"):
        super().__init__()
        self.block = block
        self.mlp = mlp
        if block == "deformux":
            self.ddc = DDC(c, offset_mode, offset_kernel, offset_planes, deformable)
        else:
            self.dwconv = nn.Conv3d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = ChannelLayerNorm(c)
        if mlp != "none":
            groups = c if mlp == "grouped" else 1
            self.pwconv1 = nn.Conv3d(c, 4 * c, 1, groups=groups)
            self.act = nn.GELU()  # exact erf form
            self.pwconv2 = nn.Conv3d(4 * c, c, 1, groups=groups)
        self.gamma = nn.Parameter(layer_scale * torch.ones(c))

    def forward(self, x):
        y = self.ddc(x) if self.block == "deformux" else self.dwconv(x)
        y = self.norm(y)
        if self.mlp != "none":
            y = self.pwconv2(self.act(self.pwconv1(y)))
        return x + self.gamma[:, None, None, None] * y


class Encoder(nn.Module):
    """Stem (k7 s2 conv + LN), 4 stages of blocks with LN + k2 s2 downsampling between them; returns the
    normed stage outputs (norm0..3), while the un-normed stage output feeds the next stage."""

    def __init__(self, in_chans, dims, depths, **block_args):
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(nn.Conv3d(in_chans, dims[0], 7, stride=2, padding=3),
                                                    ChannelLayerNorm(dims[0])))
        for i in range(1, 4):
            self.downsample_layers.append(nn.Sequential(ChannelLayerNorm(dims[i - 1]),
                                                        nn.Conv3d(dims[i - 1], dims[i], 2, stride=2)))
        self.stages = nn.ModuleList(nn.Sequential(*[Block(dims[i], **block_args) for _ in range(depths[i])])
                                    for i in range(4))
        for i in range(4):
            self.add_module(f"norm{i}", ChannelLayerNorm(dims[i]))

    def forward(self, x):
        outs = []
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
            outs.append(getattr(self, f"norm{i}")(x))
        return outs


class ConvOnly(nn.Module):
    """MONAI's Convolution(conv_only=True): the conv sits under `.conv`."""

    def __init__(self, cin, cout, k, stride=1, bias=False, transposed=False):
        super().__init__()
        if transposed:
            self.conv = nn.ConvTranspose3d(cin, cout, k, stride=stride, bias=bias)
        else:
            self.conv = nn.Conv3d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)

    def forward(self, x):
        return self.conv(x)


class ResBlock(nn.Module):
    """MONAI UnetResBlock (kernel 3, stride 1, instance norm without affine, LeakyReLU 0.01)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = ConvOnly(cin, cout, 3)
        self.conv2 = ConvOnly(cout, cout, 3)
        self.downsample = cin != cout
        if self.downsample:
            self.conv3 = ConvOnly(cin, cout, 1)

    @staticmethod
    def norm(x):
        return F.instance_norm(x, eps=1e-5)

    def forward(self, x):
        out = F.leaky_relu(self.norm(self.conv1(x)), 0.01)
        out = self.norm(self.conv2(out))
        residual = self.norm(self.conv3(x)) if self.downsample else x
        return F.leaky_relu(out + residual, 0.01)


class BasicBlock(nn.Module):
    """MONAI UnetrBasicBlock(res_block=True): the ResBlock under `.layer`."""

    def __init__(self, cin, cout):
        super().__init__()
        self.layer = ResBlock(cin, cout)

    def forward(self, x):
        return self.layer(x)


class UpBlock(nn.Module):
    """MONAI UnetrUpBlock: ConvTranspose3d k2 s2 (no bias), cat [up, skip], ResBlock(2 Cout -> Cout)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.transp_conv = ConvOnly(cin, cout, 2, stride=2, transposed=True)
        self.conv_block = ResBlock(2 * cout, cout)

    def forward(self, x, skip):
        return self.conv_block(torch.cat([self.transp_conv(x), skip], dim=1))


class OutBlock(nn.Module):
    """MONAI UnetOutBlock: 1x1x1 conv with bias under `.conv.conv`."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = ConvOnly(cin, cout, 1, bias=True)

    def forward(self, x):
        return self.conv(x)


class DeformUXNet(nn.Module):
    """The whole network (section 1). block "deformux" names the encoder `deformuxnet_3d`, "uxnet"
    `uxnet_3d`. forward returns logits N x out_chans x S1 x S2 x S3 (no softmax); forward_all also
    returns the encoder's normed stage outputs x2..x5."""

    def __init__(self, in_chans=1, out_chans=14, feature_size=(48, 96, 192, 384), depths=(2, 2, 2, 2),
                 hidden_size=768, block="deformux", mlp="dense", offset_mode="aligned", kernel_size=7,
                 layer_scale=1e-6, offset_kernel=1, offset_planes="all", deformable="depthwise"):
        super().__init__()
        assert block in ("deformux", "uxnet") and mlp in ("dense", "grouped", "none")
        ablations = dict(offset_kernel=offset_kernel, offset_planes=offset_planes, deformable=deformable)
        defaults = dict(offset_kernel=1, offset_planes="all", deformable="depthwise")
        assert block == "deformux" or ablations == defaults, "the offset ablations apply to block deformux"
        # The engine's JSON configuration keys (Sources/DeformUX/Model/ConfigJSON.swift); kernel_size is
        # UX-Net's dwconv kernel and only written for block uxnet, the ablation keys only when not default.
        self.config = dict(in_channels=in_chans, out_channels=out_chans, feature_size=list(feature_size),
                           depths=list(depths), hidden_size=hidden_size, block=block, mlp=mlp,
                           offset_mode=offset_mode)
        if block == "uxnet":
            self.config["kernel_size"] = kernel_size
        self.config.update({k: v for k, v in ablations.items() if v != defaults[k]})
        f = list(feature_size)
        enc = Encoder(in_chans, f, depths, block=block, mlp=mlp, offset_mode=offset_mode,
                      kernel_size=kernel_size, layer_scale=layer_scale, **ablations)
        self.encoder_name = "deformuxnet_3d" if block == "deformux" else "uxnet_3d"
        self.add_module(self.encoder_name, enc)
        self.encoder1 = BasicBlock(in_chans, f[0])
        self.encoder2 = BasicBlock(f[0], f[1])
        self.encoder3 = BasicBlock(f[1], f[2])
        self.encoder4 = BasicBlock(f[2], f[3])
        self.encoder5 = BasicBlock(f[3], hidden_size)
        self.decoder5 = UpBlock(hidden_size, f[3])
        self.decoder4 = UpBlock(f[3], f[2])
        self.decoder3 = UpBlock(f[2], f[1])
        self.decoder2 = UpBlock(f[1], f[0])
        self.decoder1 = BasicBlock(f[0], f[0])
        self.out = OutBlock(f[0], out_chans)

    def forward_all(self, x):
        outs = getattr(self, self.encoder_name)(x)
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(outs[0])
        enc3 = self.encoder3(outs[1])
        enc4 = self.encoder4(outs[2])
        hidden = self.encoder5(outs[3])
        d = self.decoder5(hidden, enc4)
        d = self.decoder4(d, enc3)
        d = self.decoder3(d, enc2)
        d = self.decoder2(d, enc1)
        return self.out(self.decoder1(d)), outs

    def forward(self, x):
        return self.forward_all(x)[0]


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


# ARCHITECTURE.md section 6 (Cin 1, widths 48/96/192/384, hidden 768).
SECTION6 = {
    ("deformux", "dense", 14): 55_790_678, ("deformux", "dense", 16): 55_790_776,
    ("deformux", "grouped", 14): 52_668_758, ("deformux", "grouped", 16): 52_668_856,
    ("uxnet", "grouped", 14): 53_006_510, ("uxnet", "grouped", 16): 53_006_608,
}


def check_counts():
    ok = True
    for (block, mlp, cout), want in SECTION6.items():
        with torch.device("meta"):  # shapes only, no memory
            m = DeformUXNet(1, cout, block=block, mlp=mlp)
        got = parameter_count(m)
        status = "ok" if got == want else "MISMATCH"
        ok &= got == want
        print(f"{block:8s} {mlp:7s} Cout {cout}: {got:,} (section 6: {want:,}) {status}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-counts", action="store_true", help="compare parameter counts with section 6")
    ap.add_argument("--names", action="store_true", help="print the state-dict keys and shapes of the default model")
    args = ap.parse_args()
    if args.names:
        with torch.device("meta"):
            m = DeformUXNet()
        for k, v in m.state_dict().items():
            print(k, tuple(v.shape))
    if args.check_counts or not args.names:
        sys.exit(0 if check_counts() else 1)


if __name__ == "__main__":
    main()
