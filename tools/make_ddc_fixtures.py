#!/usr/bin/env python3
"""Writes PyTorch fixtures for the DDC kernel and layer to Tests/Fixtures/ddc/ (run from anywhere;
needs torch and numpy, the Swift tests that read the files do not). Deterministic: rerunning it
rewrites identical bytes. `--out DIR` writes elsewhere (python/tests/test_tools.py compares).

Format, readable without dependencies: manifest.txt has one line per case,
    name kind N C D H W mode array:count array:count ...
and <name>.bin holds those arrays in that order as raw little-endian float32, C order. Inputs are
float32; outputs are computed in float64 from them (grid_sample + autograd) and rounded to float32.

kernel arrays: x offsets weight bias grad_y | y grad_x grad_offsets grad_weight grad_bias
layer arrays:  x weight bias offset_weight offset_bias grad_y | y offsets grad_x grad_weight grad_bias
               grad_offset_weight grad_offset_bias
Offsets of kernel cases are odd multiples of 2^-11 (never a whole number, exact in float32): the offset
gradient jumps at whole numbers and grid_sample's coordinate round trip is not exact.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddc_torch_impl import ddc, ddc_layer  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures", "ddc")


def quantized_offsets(rng, shape, r=2.5):
    m = int((r * 2048 - 1) // 2)
    return ((2 * rng.integers(-m, m, size=shape) + 1) / 2048).astype(np.float32)


def offsets_for(rng, shape, kind):
    off = quantized_offsets(rng, shape)
    if kind == "mixed_far":
        # A sixth of the coordinates near +-1e3, a sixth near +-1e6 (such samples are outside); 58% of
        # the (voxel, tap) pairs keep three near coordinates.
        pick = rng.integers(0, 6, size=shape)
        sign = np.where(rng.integers(0, 2, size=shape) == 1, 1.0, -1.0)
        far3 = sign * rng.uniform(500, 1000, size=shape)
        far6 = sign * rng.uniform(5e5, 1e6, size=shape)
        off = np.where(pick == 1, far3, np.where(pick == 2, far6, off)).astype(np.float32)
    return off


def f32(rng, shape, lo=-1.0, hi=1.0):
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


def t64(a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def kernel_case(name, n, c, d, h, w, kind, seed):
    rng = np.random.default_rng(seed)
    x = f32(rng, (n, c, d, h, w))
    off = offsets_for(rng, (n, 81, d, h, w), kind)
    weight = f32(rng, (c, 1, 3, 3, 3))
    bias = f32(rng, (c,))
    gy = f32(rng, (n, c, d, h, w))
    tx, to, tw, tb = t64(x, True), t64(off, True), t64(weight, True), t64(bias, True)
    y = ddc(tx, to, tw, tb)
    y.backward(t64(gy))
    arrays = [("x", x), ("offsets", off), ("weight", weight), ("bias", bias), ("grad_y", gy),
              ("y", y.detach().numpy()), ("grad_x", tx.grad.numpy()), ("grad_offsets", to.grad.numpy()),
              ("grad_weight", tw.grad.numpy()), ("grad_bias", tb.grad.numpy())]
    return name, "kernel", (n, c, d, h, w), "-", arrays


def layer_case(name, n, c, d, h, w, mode, seed):
    rng = np.random.default_rng(seed)
    x = f32(rng, (n, c, d, h, w))
    weight = f32(rng, (c, 1, 3, 3, 3))
    bias = f32(rng, (c,))
    # Offsets of a few voxels: some samples cross the borders.
    ow = f32(rng, (81, c, 1, 1, 1), -0.6, 0.6)
    ob = f32(rng, (81,), -1.5, 1.5)
    gy = f32(rng, (n, c, d, h, w))
    tx, tw, tb, tow, tob = t64(x, True), t64(weight, True), t64(bias, True), t64(ow, True), t64(ob, True)
    y, offsets = ddc_layer(tx, tw, tb, tow, tob, mode)
    y.backward(t64(gy))
    arrays = [("x", x), ("weight", weight), ("bias", bias), ("offset_weight", ow), ("offset_bias", ob),
              ("grad_y", gy), ("y", y.detach().numpy()), ("offsets", offsets.detach().numpy()),
              ("grad_x", tx.grad.numpy()), ("grad_weight", tw.grad.numpy()), ("grad_bias", tb.grad.numpy()),
              ("grad_offset_weight", tow.grad.numpy()), ("grad_offset_bias", tob.grad.numpy())]
    return name, "layer", (n, c, d, h, w), mode, arrays


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.normpath(OUT), help="directory to write to (default: %(default)s)")
    out = ap.parse_args(argv).out
    torch.manual_seed(0)
    cases = [
        kernel_case("kernel_7x5x3_c3_n2", 2, 3, 7, 5, 3, "uniform", 1),
        kernel_case("kernel_1x1x1_c16", 1, 16, 1, 1, 1, "uniform", 2),
        kernel_case("kernel_3x1x9_c17_far", 1, 17, 3, 1, 9, "mixed_far", 3),
        kernel_case("kernel_4x3x5_c48", 1, 48, 4, 3, 5, "uniform", 4),
        kernel_case("kernel_2x6x1_c5_n2_far", 2, 5, 2, 6, 1, "mixed_far", 5),
        layer_case("layer_aligned_3x4x5_c5_n2", 2, 5, 3, 4, 5, "aligned", 11),
        layer_case("layer_official_3x4x5_c5_n2", 2, 5, 3, 4, 5, "official", 12),
        layer_case("layer_official_2x3x3_c17", 1, 17, 2, 3, 3, "official", 13),
        layer_case("layer_aligned_1x1x1_c3", 1, 3, 1, 1, 1, "aligned", 14),
        layer_case("layer_official_1x1x1_c3_n2", 2, 3, 1, 1, 1, "official", 15),
    ]
    os.makedirs(out, exist_ok=True)
    lines = ["# name kind N C D H W mode array:count ... (see tools/make_ddc_fixtures.py); <name>.bin is float32 LE"]
    total = 0
    for name, kind, dims, mode, arrays in cases:
        blob = b"".join(np.ascontiguousarray(a, dtype="<f4").tobytes() for _, a in arrays)
        with open(os.path.join(out, name + ".bin"), "wb") as f:
            f.write(blob)
        total += len(blob)
        fields = [name, kind, *map(str, dims), mode] + [f"{k}:{a.size}" for k, a in arrays]
        lines.append(" ".join(fields))
    with open(os.path.join(out, "manifest.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {len(cases)} cases, {total} bytes, to {out}")


if __name__ == "__main__":
    main()
