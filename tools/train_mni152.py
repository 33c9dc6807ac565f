#!/usr/bin/env python3
"""Trains, evaluates and packages deformux's bundled default model: a reduced-width DeformUX-Net for
brain tissue (CSF, grey matter, white matter) on the MNI152 template (data/mni152, the task of the data
notes: deformux.data), with this engine on the CPU.

    python3 tools/train_mni152.py train [--out runs/brain-tissue] [--steps 2500] [--resume]
    python3 tools/train_mni152.py evaluate [--model python/deformux/models/brain-tissue.json] [--json]
                                           [--window X,Y,Z] [--overlap 0.5]
    python3 tools/train_mni152.py package --run runs/brain-tissue      # -> python/deformux/models/

The recipe (every number is recorded in the model card):
- network: DeformUX-Net, feature_size (16, 32, 64, 128), hidden_size 256 (6.2 M parameters; the paper's
  is (48, 96, 192, 384) / 768, 55.8 M), dense MLP, aligned offsets; 1 input channel, 4 classes;
- data: the training slices (z < 60 and z >= 132) of the T1 and of NOISY_COPIES noisy versions of it
  (deformux.data.noisy_t1 with seeds 1000 + i: other fields and noise than the evaluation's seeds 0..2),
  each normalised as segment() normalises a whole volume (the MR preset: (x - P1) / (P99 - P1) over
  non-zero voxels) and then cut, so that training sees the intensities inference will;
- patches 64 x 64 x 48 (the training slabs are 60 and 57 slices thick), 2 per volume, centres on
  foreground / background 2:1, batch 2; augmentation: rotation up to 15 degrees and scaling 0.1 (each
  with probability 0.3), intensity shift 0.15 and a Legendre bias field up to 40% (0.6 each), Gaussian
  noise up to 8% of the range (0.4);
- Dice + CE, AdamW (lr 1e-3, weight decay 0.08 on every parameter), nnU-Net's poly decay of the rate,
  2500 steps;
- validation every 500 steps by sliding windows (64 x 64 x 48, overlap 0.5, gaussian blending) over the
  whole T1, Dice on the validation slices (68 <= z < 124); the best weights are kept.

Why these choices (measured while building it, README "The bundled model"): the decoder's InstanceNorms
take their statistics over the window, and the validation slices (the middle of the brain: ventricles,
deep grey matter, large white-matter regions) look unlike anything in the training slabs, so windows
and patches that hold more of a cross-section generalise better than 48^3 ones (a model trained at 48^3
scored 0.38 / 0.61 / 0.67 with 48^3 windows and 0.68 / 0.83 / 0.82 with 96 x 96 x 48 windows).

`evaluate` reports, for a model card, the per-class Dice on the validation slices of the clean T1 and of
the noisy variant (seeds 0, 1, 2 and their mean) through deformux.segment on the whole volume, beside the
two-threshold baseline fitted on the training slices. Deterministic given the seed and the thread count
(a different thread count changes float rounding of reductions, not the recipe).
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import deformux
from deformux.data import mni152, noisy_t1, VALIDATION_Z, TRAINING_Z
from deformux.train import INTENSITY_PRESETS, normalize_intensity, dice_per_class

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "python" / "deformux" / "models"
NAME = "brain-tissue"
CONFIG = dict(in_channels=1, out_channels=4, feature_size=(16, 32, 64, 128), hidden_size=256)
PATCH = (64, 64, 48)
WINDOW = (64, 64, 48)
POS_NEG = (2.0, 1.0)
NOISY_COPIES = 1
EVAL_SEEDS = (0, 1, 2)
AUGMENTATION = {
    "rotationProbability": 0.3, "rotationDegrees": [15, 15, 15],
    "scaleProbability": 0.3, "scaleRange": [0.1, 0.1, 0.1],
    "shiftProbability": 0.6, "shiftRange": 0.15,
    "noiseProbability": 0.4, "noiseMaxFraction": 0.08,
    "biasFieldProbability": 0.6, "biasFieldMaxAmplitude": 0.4, "biasFieldDegree": 3,
    "intensityRange": 1, "padding": "zeros",
}
PRESET = INTENSITY_PRESETS["mr"]
LICENSE = ("Trained on the MNI ICBM152 2009a nonlinear symmetric template (as packaged by nilearn). "
           "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
           "Institute, McGill University. Permission to use, copy, modify, and distribute this software and "
           "its documentation for any purpose and without fee is hereby granted, provided that the above "
           "copyright notice appear in all copies. The authors and McGill University make no representations "
           "about the suitability of this software for any purpose. It is provided \"as is\" without express "
           "or implied warranty. Cite: Fonov et al., NeuroImage 54(1):313-327, 2011; Fonov et al., NeuroImage "
           "47 S102, 2009. nilearn packaging: BSD-3-Clause.")


def training_slabs(volume, labels):
    """The training slices of a (normalised) volume as two cases."""
    (a0, a1), (b0, _) = TRAINING_Z
    return [(volume[..., a0:a1], labels[..., a0:a1]), (volume[..., b0:], labels[..., b0:])]


def cases(mni, noisy_copies):
    out = []
    volumes = [mni.t1] + [noisy_t1(mni.t1, 1000 + i) for i in range(noisy_copies)]
    for v in volumes:
        normalised = normalize_intensity(v[None].astype(np.float32), PRESET)
        for image, label in training_slabs(normalised, mni.labels):
            out.append({"image": np.ascontiguousarray(image), "label": np.ascontiguousarray(label),
                        "affine": mni.affine, "normalized": True})
    return out


def validation_mask(shape):
    mask = np.zeros(shape, bool)
    mask[:, :, VALIDATION_Z[0]:VALIDATION_Z[1]] = True
    return mask


def cmd_train(args):
    mni = mni152()
    if args.threads:
        deformux.set_num_threads(args.threads)
    model = deformux.DeformUXNet(**CONFIG, seed=args.seed)
    val = [{"name": "mni152", "image": mni.t1[None], "label": mni.labels, "affine": mni.affine,
            "mask": validation_mask(mni.t1.shape)}]
    command = "python3 tools/train_mni152.py " + " ".join(sys.argv[1:])
    t0 = time.time()
    run = deformux.train(
        cases(mni, NOISY_COPIES), model, out=args.out, patch_size=PATCH, steps=args.steps, lr=args.lr, pos_neg=POS_NEG,
        weight_decay=0.08, scheduler="poly", augmentation=AUGMENTATION, intensity=PRESET, classes=list(mni.classes),
        validation=val, validate_every=args.validate_every, window=WINDOW, overlap=0.5, seed=args.seed,
        resume=args.resume, progress=not args.no_progress, name=NAME, license=LICENSE, command=command)
    print(f"trained {run['steps']} steps in {time.time() - t0:.0f} s; best: {run['best']}")


def thresholds_baseline(image, mni):
    """Two intensity thresholds chosen on the training slices (grid over quantiles, best mean Dice), then
    applied inside the brain mask; Dice on the validation slices."""
    train = np.zeros(image.shape, bool)
    (a0, a1), (b0, _) = TRAINING_Z
    train[:, :, a0:a1] = True
    train[:, :, b0:] = True
    brain = mni.labels > 0
    v, l = image[brain & train], mni.labels[brain & train]
    qs = np.quantile(v, np.linspace(0.02, 0.98, 97))
    best = None
    for i, a in enumerate(qs):
        for b in qs[i + 1:]:
            p = np.where(v < a, 1, np.where(v < b, 2, 3))
            d = np.mean([2 * np.sum((p == k) & (l == k)) / (np.sum(p == k) + np.sum(l == k)) for k in (1, 2, 3)])
            if best is None or d > best[0]:
                best = (d, a, b)
    _, a, b = best
    pred = np.where(brain, np.where(image < a, 1, np.where(image < b, 2, 3)), 0)
    return dice_per_class(pred, mni.labels, 4, validation_mask(image.shape))


def evaluate(model_path, baseline=True, window=None, overlap=None):
    mni = mni152()
    seg = deformux.Segmenter(model_path, window=window, overlap=overlap)
    mask = validation_mask(mni.t1.shape)
    rows = {}
    images = {"clean": mni.t1}
    images.update({f"noisy seed {s}": noisy_t1(mni.t1, s) for s in EVAL_SEEDS})
    for name, image in images.items():
        t0 = time.time()
        labels = seg.segment(image, affine=mni.affine, progress=False)
        dice = dice_per_class(labels, mni.labels, 4, mask)
        rows[name] = {"dice": dict(zip(mni.classes[1:], dice)), "mean": float(np.mean(dice)),
                      "seconds": time.time() - t0}
        if baseline:
            b = thresholds_baseline(image, mni)
            rows[name]["thresholds"] = dict(zip(mni.classes[1:], b))
    noisy = [rows[f"noisy seed {s}"]["mean"] for s in EVAL_SEEDS]
    return {"model": str(model_path), "rows": rows, "noisy_mean": float(np.mean(noisy))}


def cmd_evaluate(args):
    window = tuple(int(v) for v in args.window.split(",")) if args.window else None
    result = evaluate(args.model, baseline=not args.no_baseline, window=window, overlap=args.overlap)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_result(result)


def print_result(result):
    print(f"{'volume':<16}{'CSF':>8}{'GM':>8}{'WM':>8}{'mean':>8}   thresholds CSF / GM / WM   seconds")
    for name, r in result["rows"].items():
        d = list(r["dice"].values())
        t = " / ".join(f"{v:.3f}" for v in r.get("thresholds", {}).values())
        print(f"{name:<16}" + "".join(f"{v:8.4f}" for v in d) + f"{r['mean']:8.4f}   {t:<26} {r['seconds']:7.1f}")
    print(f"noisy variant, mean Dice over seeds {EVAL_SEEDS}: {result['noisy_mean']:.4f}")


def cmd_package(args):
    """Copies a run's best weights into the package as the default model, with its card completed by the
    evaluation (clean and noisy Dice through segment())."""
    run = Path(args.run)
    card = json.loads((run / f"{args.checkpoint}.json").read_text())
    MODELS.mkdir(parents=True, exist_ok=True)
    weights = MODELS / f"{NAME}.safetensors"
    tmp = weights.with_suffix(".tmp")
    shutil.copyfile(run / f"{args.checkpoint}.safetensors", tmp)
    os.replace(tmp, weights)
    card["name"] = NAME
    card["weights"] = weights.name
    if args.window:  # inference windows other than the training run's (chosen on the validation slices)
        card["window"] = [int(v) for v in args.window.split(",")]
    card["description"] = ("Brain tissue (CSF, grey matter, white matter) in T1-weighted MRI: a reduced-width "
                           "DeformUX-Net trained by deformux on the CPU on the MNI152 template "
                           "(tools/train_mni152.py). A demonstration model: one template, so it has not seen "
                           "the anatomy or contrast of other scanners.")
    card_path = MODELS / f"{NAME}.json"
    tmp_card = card_path.with_suffix(".tmp")
    tmp_card.write_text(json.dumps(card, indent=1) + "\n")
    os.replace(tmp_card, card_path)
    result = evaluate(card_path, baseline=True)
    card["training"]["evaluation"] = {
        "command": "python3 tools/train_mni152.py evaluate",
        "validation": "Dice on the validation slices (68 <= z < 124) of the whole-volume segmentation",
        "clean": result["rows"]["clean"]["dice"],
        "noisy": {k: v["dice"] for k, v in result["rows"].items() if k.startswith("noisy")},
        "noisy_mean": result["noisy_mean"],
        "thresholds_baseline": {k: v["thresholds"] for k, v in result["rows"].items()},
    }
    tmp_card.write_text(json.dumps(card, indent=1) + "\n")
    os.replace(tmp_card, card_path)
    print(f"wrote {weights} and {card_path}")
    print_result(result)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--out", default="runs/brain-tissue")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validate-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("evaluate")
    p.add_argument("--model", default=str(MODELS / f"{NAME}.json"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--window", default=None, help="override the card's window, X,Y,Z")
    p.add_argument("--overlap", type=float, default=None, help="override the card's overlap")
    p = sub.add_parser("package")
    p.add_argument("--run", default="runs/brain-tissue")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"))
    p.add_argument("--window", default=None, help="the card's inference window, X,Y,Z (default: the run's)")
    args = parser.parse_args(argv)
    {"train": cmd_train, "evaluate": cmd_evaluate, "package": cmd_package}[args.command](args)


if __name__ == "__main__":
    main()
