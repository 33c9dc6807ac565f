#!/usr/bin/env python3
"""Writes whole-network fixtures to Tests/Fixtures/network/ from the PyTorch reference
(tools/reference_model.py). Needs torch and numpy (and, for interop_tiny.safetensors only, the
`safetensors` package); the Swift tests that read the files need none of them.

    python3 tools/make_network_fixtures.py                 # rewrites every file; deterministic (fixed seeds)
    python3 tools/make_network_fixtures.py --out DIR       # elsewhere (python/tests/test_tools.py compares)
    python3 tools/make_network_fixtures.py --only uxnet    # some variants only (no manifest)

Files are described in Tests/Fixtures/network/README.md. In short, per variant V:
    V.safetensors      weights, F32, state-dict names of ARCHITECTURE.md section 5; __metadata__ holds
                       "deformux.config" (JSON) and "deformux.fixture" (V)
    V.io.safetensors   input (N x 1 x D x H x W), output logits (N x 3 x D x H x W), skip0..skip3 (the
                       encoder's normed stage outputs x2..x5); gradient variants also grad_output (an
                       input of the backward, drawn like the input) and grad_input
    V.grad.safetensors gradient variants only: d sum(output * grad_output) / d parameter, under the
                       parameter's state-dict name
    V.json             the configuration, the shapes and the files, for reading without safetensors
Weights are float32; the forward pass (and, for gradient variants, autograd's backward) runs in float64
from them and its results are rounded to float32.

A variant is a `Variant` (configuration, input shape, seed); `make_variant` builds its model and writes
its files, and `reference_outputs` computes what goes into V.io.safetensors besides the input (and the
parameter gradients of a gradient variant): add an output there and every variant gets it.
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(REPO, "Tests", "Fixtures", "network")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "python", "deformux"))  # convert.py alone (not the package)
from reference_model import ChannelLayerNorm, DDC, Block, DeformUXNet  # noqa: E402
from ddc_torch_impl import layer_offsets, held_axis  # noqa: E402
from convert import write_safetensors, read_safetensors, normalize_name, expected_shapes, CONFIG_KEY  # noqa: E402

OUT_CHANS = 3


@dataclass(frozen=True)
class Variant:
    """One fixture: the network `DeformUXNet(1, out_channels, feature_size, depths, hidden_size, **options)` with
    weights from `seed`, run on a standard-normal input of `input_shape` (N x 1 x D x H x W)."""
    name: str
    input_shape: tuple
    seed: int
    options: dict = field(default_factory=dict)  # block, mlp, offset_mode, the Table 3 ablation options
    feature_size: tuple = (8, 12, 16, 24)  # small, and two widths that are not powers of two
    depths: tuple = (2, 2, 2, 2)
    hidden_size: int = 32
    # A gradient variant: offsets kept away from integer sampling positions (`randomize`), a grad_output
    # drawn after the input, and the float64 gradients written (V.grad.safetensors, grad_input).
    gradients: bool = False
    out_channels: int = OUT_CHANS


VARIANTS = [
    Variant("dense_aligned", (1, 1, 32, 32, 32), 1, dict(block="deformux", mlp="dense", offset_mode="aligned")),
    Variant("grouped_official", (1, 1, 32, 16, 32), 2, dict(block="deformux", mlp="grouped", offset_mode="official")),
    # N = 2: the official mode's flat read of the padded offset buffer crosses the sample boundary.
    Variant("dense_official_n2", (2, 1, 16, 32, 16), 3, dict(block="deformux", mlp="dense", offset_mode="official")),
    Variant("uxnet", (1, 1, 32, 32, 32), 4, dict(block="uxnet", mlp="grouped", offset_mode="aligned")),
]

# The paper's Table 3 ablations (ARCHITECTURE.md section 3), smaller (the files total about 2 MB): one
# block per stage, widths 4..8. Every input has an axis of 32, so that stage 3 is not a single voxel.
ABLATION = dict(feature_size=(4, 6, 8, 8), depths=(1, 1, 1, 1), hidden_size=8)
ABLATIONS = [
    Variant("ablation_offset_kernel3", (1, 1, 16, 32, 16), 11, dict(offset_kernel=3), **ABLATION),
    Variant("ablation_planes_xy", (1, 1, 32, 16, 16), 12, dict(offset_planes="xy"), **ABLATION),
    # official offsets: the held axis is zeroed in the flat-read field
    Variant("ablation_planes_xz", (1, 1, 16, 32, 16), 13,
            dict(offset_planes="xz", offset_mode="official", mlp="grouped"), **ABLATION),
    Variant("ablation_planes_yz", (1, 1, 16, 16, 32), 14, dict(offset_planes="yz"), **ABLATION),
    Variant("ablation_mlp_none", (1, 1, 16, 32, 16), 15, dict(mlp="none"), **ABLATION),
    Variant("ablation_standard", (1, 1, 32, 16, 16), 16, dict(deformable="standard"), **ABLATION),
]

# Whole-network gradients (issue 7): every variant of the backward, small (weights + gradients + io about
# 300 KB each). Widths 3..6 (none a power of two past 4), one or two blocks per stage. Offsets stay away
# from integer sampling positions (`randomize`): trilinear sampling has kinks there, where a float32
# engine and a float64 reference may take different sides. N = 2 for the official mode (its flat read
# crosses the sample boundary) and one 32 x 16 x 16 input so that stage 3 is not a single voxel.
GRAD = dict(feature_size=(3, 4, 5, 6), depths=(1, 1, 1, 1), hidden_size=6, gradients=True, out_channels=2)
GRADIENT_VARIANTS = [
    Variant("grad_dense_aligned", (1, 1, 32, 16, 16), 21, dict(block="deformux", mlp="dense", offset_mode="aligned"),
            **{**GRAD, "depths": (2, 1, 1, 1)}),
    Variant("grad_grouped_official_n2", (2, 1, 16, 32, 16), 22,
            dict(block="deformux", mlp="grouped", offset_mode="official"), **GRAD),
    Variant("grad_uxnet", (1, 1, 16, 16, 32), 23, dict(block="uxnet", mlp="grouped", offset_mode="aligned"), **GRAD),
    Variant("grad_offset_kernel3", (1, 1, 16, 32, 16), 24, dict(offset_kernel=3), **GRAD),
    Variant("grad_planes_xy", (1, 1, 32, 16, 16), 25, dict(offset_planes="xy"), **GRAD),
    Variant("grad_planes_xz", (1, 1, 16, 32, 16), 26, dict(offset_planes="xz", offset_mode="official", mlp="grouped"),
            **GRAD),
    Variant("grad_planes_yz", (1, 1, 16, 16, 32), 27, dict(offset_planes="yz"), **GRAD),
    Variant("grad_mlp_none", (1, 1, 16, 32, 16), 28, dict(mlp="none"), **GRAD),
    Variant("grad_standard", (1, 1, 32, 16, 16), 29, dict(deformable="standard"), **GRAD),
]


def randomize(model, gen, half_offsets=False):
    """PyTorch's default init, plus non-trivial values where the default is trivial: the offset branch
    (zero at init), gamma (1e-6), LayerNorm weight/bias (1/0), so that the fixtures see every term.
    `half_offsets` (gradient variants): offsets near +-0.5 voxel instead of about +-1 (bias +-U(0.4, 0.6),
    small weights), so that every sampling position stays far from an integer (checked by
    `offset_distance_from_integers`)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DDC):
                c = m.conv_offset.weight[0].numel()  # fan-in: C (1x1x1 branch) or 27 C (3x3x3)
                if half_offsets:
                    # sum of c terms of size ~|x| * 0.05 / sqrt(c): a few hundredths of a voxel
                    m.conv_offset.weight.uniform_(-0.05 / c ** 0.5, 0.05 / c ** 0.5, generator=gen)
                    m.conv_offset.bias.uniform_(0.4, 0.6, generator=gen)
                    sign = torch.randint(0, 2, m.conv_offset.bias.shape, generator=gen) * 2 - 1
                    m.conv_offset.bias.mul_(sign.to(m.conv_offset.bias.dtype))
                    continue
                # offsets of about +-1 voxel: sum of c terms of size ~|x| * 0.6 / sqrt(c), plus a bias
                m.conv_offset.weight.uniform_(-0.6 / c ** 0.5, 0.6 / c ** 0.5, generator=gen)
                m.conv_offset.bias.uniform_(-1.0, 1.0, generator=gen)
            if isinstance(m, ChannelLayerNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.3, 0.3, generator=gen)
            if isinstance(m, Block):
                m.gamma.uniform_(0.25, 0.75, generator=gen)


def f32(t):
    return t.detach().to(torch.float32).contiguous().numpy()


def released_name(name):
    """The released code's prototype layout: module. (DataParallel), convxnet., .dcn."""
    if name.startswith("deformuxnet_3d."):
        name = "convxnet." + name[len("deformuxnet_3d."):]
    return "module." + name.replace(".ddc.", ".dcn.")


def build_model(v):
    """The variant's float32 model: PyTorch's default initialisation from the global seed, then
    `randomize` from its own generator. Returns (model, generator) (the input is drawn from it next)."""
    torch.manual_seed(v.seed)
    gen = torch.Generator().manual_seed(1000 + v.seed)
    model = DeformUXNet(1, v.out_channels, list(v.feature_size), depths=list(v.depths), hidden_size=v.hidden_size,
                        **v.options)
    randomize(model, gen, half_offsets=v.gradients)
    return model, gen


def reference_outputs(model64, x64, grad_output64=None):
    """What V.io.safetensors holds besides the input, computed in float64, and the parameter gradients.
    Forward variants: the logits and the skips, and None. Gradient variants (`grad_output64` given):
    grad_output and grad_input = d sum(logits * grad_output) / dx by autograd (their logits and skips
    are left out to keep the files small: the forward variants check the forward), and that sum's
    gradient for every parameter by state-dict name."""
    if grad_output64 is None:
        with torch.no_grad():
            y, skips = model64.forward_all(x64)
        io = {"output": y}
        for i, s in enumerate(skips):
            io[f"skip{i}"] = s
        return io, None
    x = x64.clone().requires_grad_(True)
    model64.zero_grad(set_to_none=True)
    y = model64(x)
    (y * grad_output64).sum().backward()
    grads = {}
    for name, p in model64.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        grads[name] = p.grad
    return {"grad_output": grad_output64, "grad_input": x.grad}, grads


def offset_distance_from_integers(model64, x64):
    """The smallest distance from an integer of any offset the DDCs read in a forward of x (held plane
    channels, exactly 0, excepted): the sampling positions' distance from the kinks of trilinear
    sampling (and from the -1 / size borders)."""
    ddcs = [m for m in model64.modules() if isinstance(m, DDC)]
    if not ddcs:
        return None
    worst = [1.0]

    def hook(m, inputs, _):
        o = layer_offsets(inputs[0], m.conv_offset.weight, m.conv_offset.bias, m.offset_mode, m.offset_planes)
        axis = held_axis(m.offset_planes)
        if axis is not None:
            keep = [a for a in range(81) if a % 3 != axis]
            o = o[:, keep]
        worst[0] = min(worst[0], float((o - torch.round(o)).abs().min()))

    handles = [m.register_forward_hook(hook) for m in ddcs]
    with torch.no_grad():
        model64(x64)
    for h in handles:
        h.remove()
    return worst[0]


def make_variant(v, out=OUT):
    """Builds the variant's model and writes V.safetensors, V.io.safetensors and V.json to `out`.
    Returns (float32 state dict, description)."""
    model, gen = build_model(v)
    state = {k: f32(t) for k, t in model.state_dict().items()}
    x = torch.randn(v.input_shape, generator=gen, dtype=torch.float32)
    config = dict(model.config)
    assert set(expected_shapes(config)) == set(state), "convert.expected_shapes disagrees with the reference"
    io = {"input": f32(x)}
    # A gradient variant's grad_output: float32 values (what the engine gets), used in float64.
    g = torch.randn((v.input_shape[0], v.out_channels) + v.input_shape[2:], generator=gen) if v.gradients else None
    model64, x64 = model.double(), x.double()
    outputs, grads = reference_outputs(model64, x64, None if g is None else g.double())
    io.update({k: f32(t) for k, t in outputs.items()})
    meta = {CONFIG_KEY: json.dumps(config, sort_keys=True), "deformux.fixture": v.name}
    write_safetensors(os.path.join(out, f"{v.name}.safetensors"), state, meta)
    write_safetensors(os.path.join(out, f"{v.name}.io.safetensors"), io, {"deformux.fixture": v.name})
    desc = {
        "name": v.name,
        "config": config,
        "weights": f"{v.name}.safetensors",
        "io": f"{v.name}.io.safetensors",
        "shapes": {k: list(a.shape) for k, a in io.items()},
        "parameter_count": int(sum(a.size for a in state.values())),
    }
    if "output" in io:
        desc["output_max_abs"] = float(np.abs(io["output"]).max())
    if grads is not None:
        grads = {k: f32(t) for k, t in grads.items()}
        assert set(grads) == set(state)
        write_safetensors(os.path.join(out, f"{v.name}.grad.safetensors"), grads, {"deformux.fixture": v.name})
        desc["gradients"] = f"{v.name}.grad.safetensors"
        desc["gradient_max_abs"] = float(max(np.abs(a).max() for a in grads.values()))
        desc["grad_input_max_abs"] = float(np.abs(io["grad_input"]).max())
        distance = offset_distance_from_integers(model64, x64)
        if distance is not None:
            assert distance > 0.05, (v.name, distance)
            desc["offset_min_distance_from_integer"] = round(distance, 6)
    if config.get("offset_planes", "all") != "all" and grads is None:
        desc["output_max_change_with_other_planes"] = plane_sensitivity(model64, x64, io["output"], config["offset_planes"])
    elif config.get("offset_planes", "all") != "all":
        desc["grad_input_max_change_with_other_planes"] = plane_sensitivity(
            model64, x64, io["grad_input"], config["offset_planes"], g.double())
    with open(os.path.join(out, f"{v.name}.json"), "w") as f:
        json.dump(desc, f, indent=1, sort_keys=True)
        f.write("\n")
    # Round trip through our numpy reader, checked against the model.
    back, meta_back = read_safetensors(os.path.join(out, f"{v.name}.safetensors"))
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
    assert json.loads(meta_back[CONFIG_KEY]) == config
    return state, desc


def plane_sensitivity(model64, x64, output, own, grad_output64=None):
    """{planes: max |logit change|} when the plane variant's weights run with each other offset_planes
    setting. Each must exceed the tests' 1e-4 bound by far, so that a fixture passes only with the right
    held axis (a swapped axis mapping in the engine cannot pass). With `grad_output64` (a gradient
    variant) the same for the input gradient (`output` is then grad_input), relative to its max |value|."""
    ddcs = [m for m in model64.modules() if isinstance(m, DDC)]
    change = {}
    for other in ("all", "xy", "xz", "yz"):
        if other == own:
            continue
        for m in ddcs:
            m.offset_planes = other
        if grad_output64 is None:
            with torch.no_grad():
                y = f32(model64(x64))
            change[other] = float(np.abs(y.astype(np.float64) - output).max())
        else:
            y = f32(reference_outputs(model64, x64, grad_output64)[0]["grad_input"])
            change[other] = float(np.abs(y.astype(np.float64) - output).max() / np.abs(output).max())
        assert change[other] > 0.01, (own, other, change[other])
    for m in ddcs:
        m.offset_planes = own
    return change


def make_released_layout(state, source, out=OUT):
    """The weights of `source` under the released code's names, for the name-mapping tests."""
    renamed = {released_name(k): v for k, v in state.items()}
    assert all(normalize_name(k) in state for k in renamed)
    write_safetensors(os.path.join(out, "released_layout.safetensors"), renamed,
                      {"deformux.fixture": "released_layout", "deformux.same_as": source})
    desc = {"name": "released_layout", "same_weights_as": source, "weights": "released_layout.safetensors",
            "io": f"{source}.io.safetensors",
            "note": "keys are module.convxnet.* with .dcn. for the DDC (and module.* for the decoder); "
                    "they normalise to the keys of " + source + ".safetensors. No deformux.config metadata."}
    with open(os.path.join(out, "released_layout.json"), "w") as f:
        json.dump(desc, f, indent=1, sort_keys=True)
        f.write("\n")


def make_interop(out=OUT):
    """A tiny file written by the reference implementation (the `safetensors` package, torch
    flavour), with every dtype the engine reads. Values are exact in their dtypes."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        print("safetensors package missing: interop_tiny.safetensors not rewritten")
        return
    t = {
        "a_f32": torch.tensor([[-1.0, -0.5, 0.0], [0.5, 1.0, 1.5]], dtype=torch.float32),
        "b_f16": torch.tensor([1.0, -2.5, 2.0 ** -10, 65504.0, 2.0 ** -24, -0.0], dtype=torch.float16),
        "c_bf16": torch.tensor([1.0, -3.5, 256.0, 0.15625], dtype=torch.bfloat16),
        "d_f64": torch.tensor([[0.1], [-1e-3], [1e30]], dtype=torch.float64),
        "e_scalar": torch.tensor(3.25, dtype=torch.float32),
        "f_empty": torch.zeros((0, 4), dtype=torch.float32),
    }
    path = os.path.join(out, "interop_tiny.safetensors")
    save_file(t, path, metadata={"format": "pt"})  # one key: the Rust writer orders keys at random
    os.chmod(path, 0o644)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=OUT, help="directory to write to (default: %(default)s)")
    names = [v.name for v in VARIANTS + ABLATIONS + GRADIENT_VARIANTS] + ["released_layout", "interop_tiny"]
    ap.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                    help="write these only (and no manifest); one of: " + ", ".join(names))
    args = ap.parse_args(argv)
    wanted = set(args.only or names)
    os.makedirs(args.out, exist_ok=True)
    states = {}
    for v in VARIANTS + ABLATIONS + GRADIENT_VARIANTS:
        if v.name not in wanted and not (v.name == "grouped_official" and "released_layout" in wanted):
            continue
        state, desc = make_variant(v, args.out)
        states[v.name] = state
        size = (f"max |logit| {desc['output_max_abs']:.3g}" if "output_max_abs" in desc else
                f"max |gradient| {desc['gradient_max_abs']:.3g}, offsets >= {desc.get('offset_min_distance_from_integer', '(none)')} from integers")
        print(f"{desc['name']}: {desc['parameter_count']} parameters, input {desc['shapes']['input']}, {size}")
    if "released_layout" in wanted:
        make_released_layout(states["grouped_official"], "grouped_official", args.out)
    if "interop_tiny" in wanted:
        make_interop(args.out)
    if args.only is None:
        manifest = [v.name for v in VARIANTS] + ["released_layout"] + [v.name for v in ABLATIONS]
        with open(os.path.join(args.out, "manifest.json"), "w") as f:
            json.dump({"variants": manifest, "gradient_variants": [v.name for v in GRADIENT_VARIANTS]}, f, indent=1)
            f.write("\n")
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"total {total / 1e6:.2f} MB in {args.out}")


if __name__ == "__main__":
    main()
