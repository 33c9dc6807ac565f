#!/usr/bin/env python3
"""Writes the training fixtures to Tests/Fixtures/training/ from MONAI and PyTorch. Needs torch, numpy
and monai (pip install monai); the Swift tests that read the files need none of them.

    /work/venv-torch/bin/python tools/make_training_fixtures.py      # deterministic (fixed seeds)

Files (JSON; float32 inputs are written as the exact decimal of their float32 value):
    dice_ce.json   MONAI DiceCELoss(to_onehot_y=True, softmax=True, ...) cases: logits (N x C x spatial,
                   channels-first, C order), labels (N x spatial), optional weight and lambdas; the loss
                   and dL/dlogits from torch autograd, both computed in float64 from the float32 logits.
    adamw.json     torch.optim.AdamW cases: flat parameter tensors, the gradient of every step, the
                   learning rate of every step, values after steps 1, 2 and the last, exp_avg and
                   exp_avg_sq after the last; float32 throughout, as training runs.
    plateau.json   torch.optim.lr_scheduler.ReduceLROnPlateau cases: configuration, metric sequence
                   (null = NaN) and after every step the lr, best, num_bad_epochs, cooldown_counter and
                   last_epoch. Metrics, learning rates and best are exact: float.hex() strings (JSON
                   readers need not round decimals correctly, and these are compared for equality).
    crop.json      MONAI's correct_crop_centers for every centre of two volume sizes and several patch
                   sizes, and map_binary_to_indices (foreground / background voxel lists, with and
                   without image threshold 0) of a small two-channel volume.
"""
import json
import math
import os
import warnings

import numpy as np
import torch
from monai.losses import DiceCELoss

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "Tests", "Fixtures", "training")


def f32list(a):
    return [float(x) for x in np.asarray(a, dtype=np.float32).ravel()]


def f64list(a):
    return [float(x) for x in np.asarray(a, dtype=np.float64).ravel()]


# ---------------------------------------------------------------- DiceCELoss

# name, N, C, spatial, logit scale, seed, weight, lambda_dice, lambda_ce, label rule
LOSS_CASES = [
    ("c2", 1, 2, (3, 4, 5), 2.0, 1, None, 1.0, 1.0, "random"),
    ("c4_n2_absent", 2, 4, (5, 3, 4), 2.0, 2, None, 1.0, 1.0, "absent"),
    ("c4_n2_weighted_lambdas", 2, 4, (4, 4, 3), 2.0, 3, [0.2, 1.0, 2.0, 0.5], 0.7, 1.3, "random"),
    ("c3_n2_1x1x1", 2, 3, (1, 1, 1), 1.0, 4, None, 1.0, 1.0, "random"),
    ("c5_confident_7x5x3", 1, 5, (7, 5, 3), 8.0, 5, None, 1.0, 1.0, "random"),
    ("c3_weight0_background", 1, 3, (2, 3, 4), 2.0, 6, [0.0, 1.0, 3.0], 1.0, 1.0, "random"),
]


def loss_case(name, n, c, spatial, scale, seed, weight, ld, lce, rule):
    gen = torch.Generator().manual_seed(seed)
    logits32 = (torch.randn((n, c) + spatial, generator=gen) * scale).float()
    labels = torch.randint(0, c, (n,) + spatial, generator=gen, dtype=torch.int64)
    if rule == "absent":
        # sample 0 has no class 3; sample 1 has neither class 1 nor class 2
        labels[0][labels[0] == 3] = 0
        labels[1][(labels[1] == 1) | (labels[1] == 2)] = 3
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, weight=w, lambda_dice=ld, lambda_ce=lce)
    x = logits32.double().requires_grad_(True)
    loss = loss_fn(x, labels[:, None])
    loss.backward()
    case = {
        "name": name, "n": n, "classes": c, "spatial": list(spatial),
        "logits": f32list(logits32), "labels": [int(v) for v in labels.ravel()],
        "lambda_dice": ld, "lambda_ce": lce,
        "loss": float(loss), "grad": f64list(x.grad),
    }
    if weight is not None:
        case["weight"] = weight
    return case


# ---------------------------------------------------------------- AdamW

# name, shapes, steps, lr per step, (beta1, beta2), eps, weight decay of group 0 / group 1, which
# tensors are in group 1 (no decay), gradient scale, seed
ADAM_CASES = [
    ("default", [(5, 4), (7,), (3, 2, 2)], 10, [1e-3] * 10, (0.9, 0.999), 1e-8, (0.08, None), [], 1.0, 11),
    ("no_decay_group_lr_change", [(6, 3), (6,), (4,), (2, 5)], 10, [1e-3] * 4 + [9e-4] * 6, (0.9, 0.999), 1e-8,
     (0.08, 0.0), [1, 2], 1.0, 12),
    ("tiny_and_zero_grads", [(17,), (4, 4)], 10, [1e-4] * 10, (0.9, 0.999), 1e-8, (0.08, None), [], 1e-6, 13),
    ("other_betas", [(9,)], 10, [3e-3] * 10, (0.8, 0.95), 1e-6, (0.5, None), [], 1.0, 14),
]


def adam_case(name, shapes, steps, lrs, betas, eps, wds, nodecay, gscale, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((torch.rand(s, generator=gen) * 2 - 1).float()) for s in shapes]
    groups = [{"params": [p for i, p in enumerate(params) if i not in nodecay], "weight_decay": wds[0]}]
    if nodecay:
        groups.append({"params": [params[i] for i in nodecay], "weight_decay": wds[1]})
    opt = torch.optim.AdamW(groups, lr=lrs[0], betas=betas, eps=eps)
    initial = [f32list(p.detach()) for p in params]
    grads, after = [], {}
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = lrs[t]
        step_grads = []
        for p in params:
            gr = ((torch.rand(p.shape, generator=gen) * 2 - 1) * gscale).float()
            if name == "tiny_and_zero_grads":
                gr[torch.rand(p.shape, generator=gen) < 0.3] = 0.0  # some exact zeros
            p.grad = gr
            step_grads.append(f32list(gr))
        grads.append(step_grads)
        opt.step()
        if t + 1 in (1, 2, steps):
            after[str(t + 1)] = [f32list(p.detach()) for p in params]
    state = [opt.state[p] for p in params]
    return {
        "name": name, "shapes": [list(s) for s in shapes], "steps": steps, "lr": lrs,
        "beta1": betas[0], "beta2": betas[1], "eps": eps,
        "weight_decay": [wds[0] if i not in nodecay else wds[1] for i in range(len(shapes))],
        "initial": initial, "grads": grads, "after": after,
        "exp_avg": [f32list(s["exp_avg"]) for s in state],
        "exp_avg_sq": [f32list(s["exp_avg_sq"]) for s in state],
    }


# ---------------------------------------------------------------- ReduceLROnPlateau

def plateau_metrics_max():
    # rise, a plateau with improvements below the relative threshold, a later jump, NaN, long plateau
    m = [0.1 * i for i in range(1, 6)]
    m += [0.5 + 0.5e-4 * i for i in range(1, 14)]           # + 5e-5 each: below 1e-4 * best
    m += [0.6, float("nan")] + [0.6] * 30
    m += [0.6 * (1 + 1.5e-4)] + [0.55] * 15
    return m


PLATEAU_CASES = [
    ("max_recipe", dict(mode="max", factor=0.9, patience=10, threshold=1e-4, threshold_mode="rel",
                        cooldown=0, min_lr=0.0, eps=1e-8), 1e-4, plateau_metrics_max()),
    ("min_abs_cooldown_minlr", dict(mode="min", factor=0.5, patience=2, threshold=0.01, threshold_mode="abs",
                                    cooldown=3, min_lr=1e-3, eps=1e-8), 1e-2,
     [1.0, 0.9, 0.895, 0.9, 0.91, 0.88, 0.885, 0.9, 0.9, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5,
      0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),
    ("min_rel_eps", dict(mode="min", factor=0.1, patience=0, threshold=0.1, threshold_mode="rel",
                         cooldown=1, min_lr=0.0, eps=1e-3), 0.5, [3.0, 2.0, 1.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
]


def plateau_case(name, cfg, lr, metrics):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **cfg)
    rows = []
    for m in metrics:
        sched.step(m)
        rows.append({"lr": opt.param_groups[0]["lr"].hex(),
                     "best": None if math.isinf(sched.best) else sched.best.hex(),
                     "num_bad_epochs": sched.num_bad_epochs, "cooldown_counter": sched.cooldown_counter,
                     "last_epoch": sched.last_epoch})
    return {"name": name, "config": cfg, "initial_lr": lr.hex(),
            "metrics": [None if math.isnan(m) else m.hex() for m in metrics], "after": rows}


# ---------------------------------------------------------------- RandCropByPosNegLabeld pieces

def crop_fixture():
    from monai.transforms.utils import correct_crop_centers, map_binary_to_indices
    centres = []
    for size in (10, 11):
        for patch in (1, 2, 4, 5, 9, 10):
            corrected = [int(correct_crop_centers([c], [patch], [size])[0]) for c in range(size)]
            centres.append({"size": size, "patch": patch, "corrected": corrected})
    gen = torch.Generator().manual_seed(21)
    shape = (5, 6, 7)
    labels = torch.randint(0, 3, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.6] = 0          # mostly background
    image = torch.rand((2,) + shape, generator=gen) * 2 - 1        # two channels, half of it <= 0
    image[1, :2] = -1.0                                            # a slab where only channel 0 counts
    fg, bg = map_binary_to_indices(labels[None], image, 0.0)
    fg_all, bg_all = map_binary_to_indices(labels[None], None)
    return {"generator": "monai", "centres": centres,
            "indices": {"shape": list(shape), "labels": [int(v) for v in labels.ravel()],
                        "image": f32list(image), "threshold": 0.0,
                        "foreground": [int(i) for i in fg], "background": [int(i) for i in bg],
                        "background_no_image": [int(i) for i in bg_all],
                        "foreground_no_image": [int(i) for i in fg_all]}}


def write(name, obj):
    path = os.path.join(OUT, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(1)
    import monai
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_cases = [loss_case(*c) for c in LOSS_CASES]
    write("dice_ce.json", {"generator": f"monai {monai.__version__}, torch {torch.__version__}", "cases": loss_cases})
    write("adamw.json", {"generator": f"torch {torch.__version__}", "cases": [adam_case(*c) for c in ADAM_CASES]})
    write("crop.json", crop_fixture())
    write("plateau.json", {"generator": f"torch {torch.__version__}", "cases": [plateau_case(*c) for c in PLATEAU_CASES]})


if __name__ == "__main__":
    main()
