#!/usr/bin/env python3
"""Writes Tests/Fixtures/training/train_step.* from PyTorch: one training step of a small DeformUX-Net
(tools/reference_model.py) with MONAI's DiceCELoss(to_onehot_y=True, softmax=True) and
torch.optim.AdamW, in float64, so that the engine's Trainer (loss, backward, AdamW) is checked against it.

    /work/venv-torch/bin/python tools/make_train_step_fixture.py [--out DIR]

Needs torch, numpy and monai (the Swift and Python tests that read the files need none of them). Files:
    train_step.safetensors   the weights before the step (F32, state-dict names, deformux.config in the
                             metadata), `input` (N x 1 x D x H x W), `labels` (N x D x H x W, class indices
                             stored as F32), `after.<name>` (the weights after one AdamW step) and
                             `grad.<name>` (the float64 gradients rounded to F32; tests use their size to
                             tell which elements AdamW's first step may send either way)
    the metadata also holds "loss" (the float64 loss before the step) and "optimizer" (lr, betas, eps,
    weight_decay as JSON).
Deterministic: rerunning it rewrites identical bytes.
"""
import argparse
import json
import os
import sys
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_network_fixtures import Variant, build_model, f32, write_safetensors, CONFIG_KEY  # noqa: E402

OUT = os.path.join(os.path.dirname(HERE), "Tests", "Fixtures", "training")
# Small widths, offsets kept away from integer sampling positions (a gradient variant), 3 classes.
VARIANT = Variant("train_step", (2, 1, 32, 16, 16), 31, dict(block="deformux", mlp="dense", offset_mode="aligned"),
                  feature_size=(3, 4, 5, 6), depths=(1, 1, 1, 1), hidden_size=6, gradients=True, out_channels=3)
OPTIMIZER = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.08}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=OUT)
    out = ap.parse_args(argv).out
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    from monai.losses import DiceCELoss
    model, gen = build_model(VARIANT)
    before = {k: f32(v) for k, v in model.state_dict().items()}
    x = torch.randn(*VARIANT.input_shape, generator=gen)
    n, _, d, h, w = VARIANT.input_shape
    labels = torch.randint(0, VARIANT.out_channels, (n, d, h, w), generator=gen)
    model64 = model.double()
    opt = torch.optim.AdamW(model64.parameters(), lr=OPTIMIZER["lr"], betas=tuple(OPTIMIZER["betas"]),
                            eps=OPTIMIZER["eps"], weight_decay=OPTIMIZER["weight_decay"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = DiceCELoss(to_onehot_y=True, softmax=True)(model64(x.double()), labels[:, None])
    loss.backward()
    grads = {k: f32(p.grad) for k, p in model64.named_parameters()}
    opt.step()
    after = {k: f32(v) for k, v in model64.state_dict().items()}
    tensors = dict(before)
    tensors["input"] = f32(x)
    tensors["labels"] = labels.to(torch.float32).numpy()
    for k in before:
        tensors["after." + k] = after[k]
        tensors["grad." + k] = grads[k]
    config = dict(in_channels=1, out_channels=VARIANT.out_channels, feature_size=list(VARIANT.feature_size),
                  depths=list(VARIANT.depths), hidden_size=VARIANT.hidden_size, **VARIANT.options)
    meta = {CONFIG_KEY: json.dumps(config, sort_keys=True), "loss": repr(loss.detach().item()),
            "optimizer": json.dumps(OPTIMIZER, sort_keys=True)}
    path = os.path.join(out, "train_step.safetensors")
    write_safetensors(path, tensors, meta)
    print(f"wrote {path} ({os.path.getsize(path)} bytes), loss {loss.detach().item():.6f}")


if __name__ == "__main__":
    main()
