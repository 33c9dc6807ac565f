#!/usr/bin/env python3
"""Writes whole-network fixtures to Tests/Fixtures/network/ from the PyTorch reference
(tools/reference_model.py). Needs torch and numpy (and, for interop_tiny.safetensors only, the
`safetensors` package); the Swift tests that read the files need none of them.

    python3 tools/make_network_fixtures.py            # rewrites every file; deterministic (fixed seeds)

Files are described in Tests/Fixtures/network/README.md. In short, per variant V:
    V.safetensors      weights, F32, state-dict names of ARCHITECTURE.md section 5; __metadata__ holds
                       "deformux.config" (JSON) and "deformux.fixture" (V)
    V.io.safetensors   input (N x 1 x D x H x W), output logits (N x 3 x D x H x W), skip0..skip3 (the
                       encoder's normed stage outputs x2..x5)
    V.json             the configuration, the shapes and the files, for reading without safetensors
Weights are float32; the forward pass runs in float64 from them and its results are rounded to float32.
"""
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(REPO, "Tests", "Fixtures", "network")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "python", "deformux"))  # convert.py alone (not the package)
from reference_model import ChannelLayerNorm, DDC, Block, DeformUXNet  # noqa: E402
from convert import write_safetensors, read_safetensors, normalize_name, CONFIG_KEY  # noqa: E402

FEATURES = [8, 12, 16, 24]  # small, and two widths that are not powers of two
HIDDEN = 32
OUT_CHANS = 3

# name, block, mlp, offset mode, input shape N x 1 x D x H x W, seed
VARIANTS = [
    ("dense_aligned", "deformux", "dense", "aligned", (1, 1, 32, 32, 32), 1),
    ("grouped_official", "deformux", "grouped", "official", (1, 1, 32, 16, 32), 2),
    # N = 2: the official mode's flat read of the padded offset buffer crosses the sample boundary.
    ("dense_official_n2", "deformux", "dense", "official", (2, 1, 16, 32, 16), 3),
    ("uxnet", "uxnet", "grouped", "aligned", (1, 1, 32, 32, 32), 4),
]


def randomize(model, gen):
    """PyTorch's default init, plus non-trivial values where the default is trivial: the offset branch
    (zero at init), gamma (1e-6), LayerNorm weight/bias (1/0), so that the fixtures see every term."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DDC):
                c = m.weight.shape[0]
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


def make_variant(name, block, mlp, mode, shape, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    model = DeformUXNet(1, OUT_CHANS, FEATURES, hidden_size=HIDDEN, block=block, mlp=mlp, offset_mode=mode)
    randomize(model, gen)
    state = {k: f32(v) for k, v in model.state_dict().items()}
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    with torch.no_grad():
        m64 = model.double()
        y, skips = m64.forward_all(x.double())
    config = dict(model.config)
    meta = {CONFIG_KEY: json.dumps(config, sort_keys=True), "deformux.fixture": name}
    write_safetensors(os.path.join(OUT, f"{name}.safetensors"), state, meta)
    io = {"input": f32(x), "output": f32(y)}
    for i, s in enumerate(skips):
        io[f"skip{i}"] = f32(s)
    write_safetensors(os.path.join(OUT, f"{name}.io.safetensors"), io, {"deformux.fixture": name})
    desc = {
        "name": name,
        "config": config,
        "weights": f"{name}.safetensors",
        "io": f"{name}.io.safetensors",
        "shapes": {k: list(v.shape) for k, v in io.items()},
        "parameter_count": int(sum(v.size for v in state.values())),
        "output_max_abs": float(np.abs(io["output"]).max()),
    }
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(desc, f, indent=1, sort_keys=True)
        f.write("\n")
    # Round trip through our numpy reader, checked against the model.
    back, meta_back = read_safetensors(os.path.join(OUT, f"{name}.safetensors"))
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
    assert json.loads(meta_back[CONFIG_KEY]) == config
    return state, desc


def make_released_layout(state, source):
    """The weights of `source` under the released code's names, for the name-mapping tests."""
    renamed = {released_name(k): v for k, v in state.items()}
    assert all(normalize_name(k) in state for k in renamed)
    write_safetensors(os.path.join(OUT, "released_layout.safetensors"), renamed,
                      {"deformux.fixture": "released_layout", "deformux.same_as": source})
    desc = {"name": "released_layout", "same_weights_as": source, "weights": "released_layout.safetensors",
            "io": f"{source}.io.safetensors",
            "note": "keys are module.convxnet.* with .dcn. for the DDC (and module.* for the decoder); "
                    "they normalise to the keys of " + source + ".safetensors. No deformux.config metadata."}
    with open(os.path.join(OUT, "released_layout.json"), "w") as f:
        json.dump(desc, f, indent=1, sort_keys=True)
        f.write("\n")


def make_interop():
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
    path = os.path.join(OUT, "interop_tiny.safetensors")
    save_file(t, path, metadata={"format": "pt"})  # one key: the Rust writer orders keys at random
    os.chmod(path, 0o644)


def main():
    os.makedirs(OUT, exist_ok=True)
    manifest = []
    states = {}
    for v in VARIANTS:
        state, desc = make_variant(*v)
        states[v[0]] = state
        manifest.append(desc["name"])
        print(f"{desc['name']}: {desc['parameter_count']} parameters, input {desc['shapes']['input']}, "
              f"max |logit| {desc['output_max_abs']:.3g}")
    make_released_layout(states["grouped_official"], "grouped_official")
    manifest.append("released_layout")
    make_interop()
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump({"variants": manifest}, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"total {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
