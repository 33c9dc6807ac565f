#!/usr/bin/env python3
"""Trains, evaluates and packages deformux's bundled default model: a reduced-width DeformUX-Net for
brain tissue (CSF, grey matter, white matter) on the MNI152 template (data/mni152, the task of the data
notes: deformux.data), with this engine on the CPU.

    python3 tools/train_mni152.py all [--out runs/brain-tissue]      # the thirteen stages of STAGES (~8.5 h)
    python3 tools/train_mni152.py train --out RUN [--init W] [--patch X,Y,Z] [--mosaics N] [--heads N] ... [--resume]
    python3 tools/train_mni152.py evaluate [--model python/deformux/models/brain-tissue.json] [--json]
                                           [--window X,Y,Z] [--overlap 0.5]
    python3 tools/train_mni152.py package --run runs/brain-tissue/stage13 [--checkpoint best|last] [--window X,Y,Z] [--tta]
    python3 tools/train_mni152.py ceiling [--model CARD] [--no-model]  # Dice of intensity rules (ceiling())

The recipe (every number is recorded in the model card):
- network: DeformUX-Net, feature_size (16, 32, 64, 128), hidden_size 256 (6.2 M parameters; the paper's
  is (48, 96, 192, 384) / 768, 55.8 M), dense MLP, aligned offsets; 1 input channel, 4 classes;
- data: the training slices (z < 60 and z >= 132) of the T1 and of NOISY_COPIES noisy versions of it
  (deformux.data.noisy_t1 with seeds 1000 + i: other fields and noise than the evaluation's seeds 0..2),
  each normalised as segment() normalises a whole volume (the MR preset: (x - P1) / (P99 - P1) over
  non-zero voxels) and then cut, so that training sees the intensities inference will;
- thirteen stages (STAGES), each a `train` run from the previous one's last weights, all with Dice + CE,
  AdamW (weight decay 0.08 on every parameter), nnU-Net's poly decay of the rate, crops centred on
  foreground / background 2:1, and augmentation: rotation up to 15 degrees and scaling 0.1 (each with
  probability 0.3), intensity shift 0.15 and a Legendre bias field up to 40% (0.6 each), Gaussian noise
  up to 8% of the range (0.4):
  1. patches 64 x 64 x 48, 2 per volume (batch 2), lr 1e-3, 2500 steps;
  2. whole cross-sections, 192 x 224 x 48, batch 1, lr 3e-4, a 600-step schedule stopped at step 200;
  3. patches 128 x 128 x 48, batch 1, lr 3e-4, a 1400-step schedule stopped at step 800, half of the
     cases mosaics (mosaics()): blocks of the training slabs tiled at random, rich in grey and white matter;
  4. whole synthetic heads (heads(): the training slices in place, the slices between them filled from
     training voxels only) in the inference's window, 208 x 240 x 192, batch 1, lr 1.5e-4, a 160-step
     schedule stopped at step 80;
  5. the same with heads whose middle is larger and richer in white matter, lr 1e-4, a 120-step schedule
     stopped at step 80;
  6. the same, milder noise and bias field (up to 6% and 25%), lr 7e-5, 80 steps;
  7. the same, milder augmentation still (shift up to 0.05, rotation and scaling with probability 0.1), and
     24 blobs (add_blobs(): ellipsoids of tissue-like intensity labelled by the training slices' intensity
     rule) in each head of the clean T1, lr 6e-5, a 100-step schedule stopped at step 50;
  8. 48 blobs, most of them about the grey/white boundary, lr 6e-5, 100 steps;
  9. 96 blobs, lr 5e-5, 80 steps;
  10. 144 blobs, lr 5e-5, 80 steps;
  11. 192 blobs, lr 5e-5, 80 steps;
  12. 240 blobs, lr 5e-5, 80 steps;
  13. 288 blobs, lr 5e-5, 80 steps;
- packaging: the last weights, inference on the whole padded head as one window (208 x 240 x 192) with
  flip test-time augmentation (the logits averaged over the 8 flips), and the output biases calibrated
  on the training slices (calibrate());
- validation by sliding windows (the stage's patch as window, overlap 0.5, gaussian blending) over the
  whole T1, Dice on the validation slices (68 <= z < 124).

Why these choices (measured while building it, README "The bundled model"): the decoder's InstanceNorms
take their statistics over the window, and the validation slices (the middle of the brain: ventricles,
deep grey matter, white matter about 19% of a window) look unlike anything in the training slabs (white
matter 2-4%), so a network trained on the slabs alone shifts every class one step darker there (white
matter called grey, grey called CSF). Larger patches and mosaics rich in white matter narrow that gap;
training on whole synthetic heads in the inference's own window closes most of the rest. What the
heads cannot show is the deep grey matter (putamen, pallidum, thalamus: large, smooth regions of
intermediate brightness inside white matter, all in the validation slices); blobs labelled by the
intensity rule of the training voxels teach the network to fall back on intensity in such unfamiliar
places.

`evaluate` reports, for a model card, the per-class Dice on the validation slices of the clean T1 and of
the noisy variant (seeds 0, 1, 2 and their mean) through deformux.segment on the whole volume, beside the
two-threshold baseline fitted on the training slices. Deterministic given the seed and the thread count
(a different thread count changes float rounding of reductions, not the recipe).
"""
import argparse
import json
import os
import shlex
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


def training_volumes(mni, noisy_copies):
    """The T1 and its noisy training copies (seeds 1000 + i), whole; training uses their training slices."""
    return [mni.t1] + [noisy_t1(mni.t1, 1000 + i) for i in range(noisy_copies)]


def cases(mni, noisy_copies):
    out = []
    for v in training_volumes(mni, noisy_copies):
        normalised = normalize_intensity(v[None].astype(np.float32), PRESET)
        for image, label in training_slabs(normalised, mni.labels):
            out.append({"image": np.ascontiguousarray(image), "label": np.ascontiguousarray(label),
                        "affine": mni.affine, "normalized": True})
    return out


def mosaics(pairs, count, shape, block=(24, 28, 24), seed=0, pools=(0.3, 0.3)):
    """`count` synthetic cases of `shape` tiled from blocks of the training cases (image (C, X, Y, Z), label):
    a fraction pools[0] of the blocks are at least 25% white matter, pools[1] at least 40% grey or white
    matter, the rest drawn anywhere (mostly background); each block flipped at random along each axis.

    Why: the training slabs are mostly background, cortex and cerebellum (white matter is 2-4% of a
    slab-sized window), while the validation slices are the middle of the brain (white matter about 19%).
    The decoder's InstanceNorms normalise over the window, so a network trained only on the slabs
    meets window statistics at inference it never saw and shifts every class one step darker. Mosaics
    give windows whose make-up is like the middle of a brain, and break the anatomy so that the network
    learns the tissue from its intensity and local contrast rather than from where it is."""
    rng = np.random.default_rng(seed)
    bx, by, bz = block
    wm, rich, anywhere = [], [], []
    for k, (_, lab) in enumerate(pairs):
        X, Y, Z = lab.shape
        for x in range(0, X - bx + 1, 4):
            for y in range(0, Y - by + 1, 4):
                for z in range(0, Z - bz + 1, 4):
                    l = lab[x:x + bx, y:y + by, z:z + bz]
                    anywhere.append((k, x, y, z))
                    if np.mean(l >= 2) > 0.4:
                        rich.append((k, x, y, z))
                    if np.mean(l == 3) > 0.25:
                        wm.append((k, x, y, z))
    out = []
    for _ in range(count):
        image = np.empty((pairs[0][0].shape[0],) + tuple(shape), np.float32)
        label = np.empty(tuple(shape), np.int32)
        for i in range(0, shape[0], bx):
            for j in range(0, shape[1], by):
                for m in range(0, shape[2], bz):
                    u = rng.random()
                    pool = wm if u < pools[0] else rich if u < pools[0] + pools[1] else anywhere
                    k, x, y, z = pool[rng.integers(len(pool))]
                    im = pairs[k][0][:, x:x + bx, y:y + by, z:z + bz]
                    lb = pairs[k][1][x:x + bx, y:y + by, z:z + bz]
                    for ax in range(3):
                        if rng.random() < 0.5:
                            im, lb = np.flip(im, ax + 1), np.flip(lb, ax)
                    w = [min(b, n - o) for b, n, o in zip(block, shape, (i, j, m))]
                    image[:, i:i + w[0], j:j + w[1], m:m + w[2]] = im[:, :w[0], :w[1], :w[2]]
                    label[i:i + w[0], j:j + w[1], m:m + w[2]] = lb[:w[0], :w[1], :w[2]]
        out.append((image, label))
    return out


def intensity_rule(volume, labels, fill, bins=100):
    """The label a tissue voxel outside the slices `fill` (the training slices) most often has, by intensity:
    (edges, label per bin) from a histogram over the brain voxels (labels > 0) of a (normalised) volume (C, X,
    Y, Z); a bin without voxels takes its nearest filled bin's label. Thresholds by another name (for the
    template: CSF below about 0.31, white matter above about 0.785), learned from training voxels only."""
    mask = labels > 0
    mask[..., fill[0]:fill[1]] = False
    x, l = volume[0][mask], labels[mask]
    edges = np.linspace(x.min(), x.max(), bins + 1)
    counts = np.zeros((bins, 4))
    np.add.at(counts, (intensity_bins(edges, x), l), 1)
    filled = np.nonzero(counts.sum(1))[0]
    nearest = filled[np.abs(np.arange(bins)[:, None] - filled[None]).argmin(1)]
    return edges, counts[nearest].argmax(1)


def intensity_bins(edges, values):
    """The bin of each value among len(edges) - 1 bins, values beyond the edges in the first or last."""
    return np.clip(np.digitize(values, edges) - 1, 0, len(edges) - 2)


def apply_rule(rule, values):
    """The labels intensity_rule()'s `rule` gives these intensities."""
    edges, labels_by_bin = rule
    return labels_by_bin[intensity_bins(edges, values)]


def smooth_field(shape, rng, passes=3, width=5):
    """Zero-mean, unit-std smooth noise: white noise through `passes` box filters of `width` on each axis."""
    f = rng.standard_normal(shape)
    for ax in range(3):
        for _ in range(passes):
            c = np.cumsum(np.pad(f, [(width // 2 + 1, width // 2) if a == ax else (0, 0) for a in range(3)], mode="edge"),
                          axis=ax)
            f = (np.take(c, range(width, c.shape[ax]), axis=ax) - np.take(c, range(0, c.shape[ax] - width), axis=ax)) / width
    return (f - f.mean()) / (f.std() + 1e-12)


def floats(text):
    return tuple(float(v) for v in text.split(","))


BLOB_MEANS = "0.75,0.65,0.88;0.25,0.2,0.45"


def blob_means(text):
    """'share,low,high;...' -> ((share, low, high), ...): the blobs' mean intensities (see add_blobs())."""
    return tuple(floats(part) for part in text.split(";"))


def add_blobs(image, label, rule, count, rng, region, radii=(4, 12), amplitude=0.03, means=blob_means(BLOB_MEANS)):
    """Pastes `count` soft-edged ellipsoids of smooth tissue-like intensity into a synthetic head (image (C, X,
    Y, Z), label (X, Y, Z); in place), centred on grey or white matter inside `region` (a boolean mask, which
    also clips them): each a mean intensity (with probability means[i][0] drawn from U(means[i][1],
    means[i][2])) plus `amplitude` times a smooth field, blended into the head over the ellipsoid's outer
    40%, and labelled inside the ellipsoid by `rule` (intensity_rule()) of the blended intensity.

    Why: the validation slices hold the deep grey nuclei (putamen, pallidum, thalamus): large, smooth regions
    of intermediate brightness inside white matter, a context the training slices never show. Trained on
    heads alone the network called their brighter part white matter where the training slices' own
    intensity rule (and the label) says grey. Blobs show such regions in every context, labelled by the
    rule the training voxels give, so that where the anatomy is unfamiliar the network falls back on
    intensity."""
    centres = np.argwhere(region & (label >= 2))
    if len(centres) == 0:
        return
    for _ in range(count):
        c = centres[rng.integers(len(centres))]
        r = rng.uniform(radii[0], radii[1], 3)
        lo = [max(0, int(c[a] - r[a]) - 1) for a in range(3)]
        hi = [min(label.shape[a], int(c[a] + r[a]) + 2) for a in range(3)]
        g = np.meshgrid(*[(np.arange(lo[a], hi[a]) - c[a]) / r[a] for a in range(3)], indexing="ij")
        rho = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2)
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        inside = (rho < 1) & region[box]
        w = np.clip((1 - rho) / 0.4, 0, 1) * region[box]
        u = rng.random() * sum(m[0] for m in means)
        for share, low, high in means:
            if u < share:
                break
            u -= share
        mean = rng.uniform(low, high)
        field = mean + amplitude * smooth_field(inside.shape, rng)
        for ch in range(image.shape[0]):
            image[ch][box] = (1 - w) * image[ch][box] + w * field
        label[box] = np.where(inside, apply_rule(rule, image[0][box]), label[box])


def heads(volume, labels, count, seed=0, block=(24, 28, 24), fill=(60, 132), pools=(0.75, 0.2), scale=(1.3, 1.2),
          white=0.4, blobs=0, means=blob_means(BLOB_MEANS)):
    """`count` synthetic whole heads built from the training slices of one (normalised) volume (image
    (C, X, Y, Z), labels (X, Y, Z)): the training slices stay where they are; the slices in between
    (`fill`: the validation slices and the guard bands, never read) are the training slices mirrored
    about the fill's edges (lower part from below, upper part from above, split in the fill's middle third),
    with the blocks inside an ellipse the size of the brain's footprint (from the first training slice
    above the fill, enlarged by `scale`) replaced by blocks of the training slices: a fraction pools[0]
    more than `white` white matter, pools[1] more than 40% grey or white matter, the rest more than 10%; each
    block flipped at random along each axis. With `blobs`, that many ellipsoids of tissue-like intensity are
    then pasted into the middle of each head (add_blobs(), labelled by the volume's intensity_rule()).

    Why: inference takes the whole padded head as one window, so the decoder's InstanceNorms normalise
    over a whole head. Trained on patches, the network met other statistics there and needed output
    offsets of up to 7 in log-probability (calibrate()). Whole-head training cases with a brain-sized,
    white-matter-rich middle give windows of the inference's size and make-up from training voxels only."""
    rng = np.random.default_rng(seed)
    X, Y, Z = labels.shape
    f0, f1 = fill
    bx, by, bz = block
    wm, rich, brain = [], [], []
    for x in range(0, X - bx + 1, 4):
        for y in range(0, Y - by + 1, 4):
            for z in list(range(0, f0 - bz + 1, 4)) + list(range(f1, Z - bz + 1, 4)):
                frac = np.bincount(labels[x:x + bx, y:y + by, z:z + bz].ravel(), minlength=4) / (bx * by * bz)
                if frac[3] > white:
                    wm.append((x, y, z))
                if frac[2] + frac[3] > 0.4:
                    rich.append((x, y, z))
                if frac[2] + frac[3] > 0.1:
                    brain.append((x, y, z))
    xs, ys = np.nonzero(labels[:, :, f1] >= 2)
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    rx, ry = (xs.max() - xs.min()) / 2 * scale[0], (ys.max() - ys.min()) / 2 * scale[1]
    if blobs:
        rule = intensity_rule(volume, labels, fill)
        gx, gy = np.meshgrid((np.arange(X) + 0.5 - cx) / rx, (np.arange(Y) + 0.5 - cy) / ry, indexing="ij")
        middle = np.zeros((X, Y, Z), bool)
        middle[..., f0:f1] = (gx ** 2 + gy ** 2 <= 1)[..., None]
    out = []
    for _ in range(count):
        image, label = volume.copy(), labels.copy()
        split = int(rng.integers(f0 + (f1 - f0) // 3, f1 - (f1 - f0) // 3 + 1))  # 84..108 for the template
        z = np.arange(f0, f1)
        source = np.where(z < split, 2 * f0 - 1 - z, 2 * f1 - 1 - z)
        image[..., f0:f1] = volume[..., source]
        label[..., f0:f1] = labels[..., source]
        for i in range(0, X, bx):
            for j in range(0, Y, by):
                for m in range(f0, f1, bz):
                    if ((i + bx / 2 - cx) / rx) ** 2 + ((j + by / 2 - cy) / ry) ** 2 > 1:
                        continue
                    u = rng.random()
                    pool = wm if u < pools[0] else rich if u < pools[0] + pools[1] else brain
                    x, y, k = pool[rng.integers(len(pool))]
                    im = volume[:, x:x + bx, y:y + by, k:k + bz]
                    lb = labels[x:x + bx, y:y + by, k:k + bz]
                    for ax in range(3):
                        if rng.random() < 0.5:
                            im, lb = np.flip(im, ax + 1), np.flip(lb, ax)
                    w = [min(b, n - o) for b, n, o in zip(block, (X, Y, f1), (i, j, m))]
                    image[:, i:i + w[0], j:j + w[1], m:m + w[2]] = im[:, :w[0], :w[1], :w[2]]
                    label[i:i + w[0], j:j + w[1], m:m + w[2]] = lb[:w[0], :w[1], :w[2]]
        if blobs:
            add_blobs(image, label, rule, blobs, rng, middle, means=means)
        out.append((image, label))
    return out


#: The project's accuracy targets on the validation slices (issue 9), recorded in the card beside the result.
TARGETS = {"clean": {"CSF": 0.92, "grey matter": 0.97, "white matter": 0.98}, "noisy_mean": 0.90}


def training_mask(shape):
    mask = np.zeros(shape, bool)
    (a0, a1), (b0, _) = TRAINING_Z
    mask[:, :, a0:a1] = True
    mask[:, :, b0:] = True
    return mask


def validation_mask(shape):
    mask = np.zeros(shape, bool)
    mask[:, :, VALIDATION_Z[0]:VALIDATION_Z[1]] = True
    return mask


def gaussian_smooth(volume, sigma):
    """A Gaussian filter of a 3-D volume (separable, truncated at 4 sigma, edges mirrored with the edge voxel
    repeated, as scipy.ndimage.gaussian_filter does by default), in numpy: the tools need no scipy."""
    r = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.asarray(volume, np.float32)
    for ax in range(3):
        padded = np.pad(out, [(r, r) if a == ax else (0, 0) for a in range(3)], mode="symmetric")
        acc = np.zeros_like(out)
        for i, w in enumerate(kernel):
            acc += np.float32(w) * padded[tuple(slice(i, i + out.shape[a]) if a == ax else slice(None) for a in range(3))]
        out = acc
    return out


def local_rule(features, labels, fit, bins):
    """A label per voxel of the brain (labels > 0) from a lookup table: the joint bins of `features` (volumes;
    `bins` quantile bins of each over the brain) each take the label most voxels of `fit` (a mask) in that
    bin have (a bin without such voxels: background). With one feature, thresholds by another name; with the
    intensity and smoothed copies of it, a classifier of the local neighbourhood's brightness."""
    brain = labels > 0
    flat = np.zeros(labels.shape, np.int64)
    for f in features:
        edges = np.quantile(f[brain], np.linspace(0, 1, bins + 1))
        flat = flat * bins + intensity_bins(edges, f)
    counts = np.zeros((bins ** len(features), 4))
    m = brain & fit
    np.add.at(counts, (flat[m], labels[m]), 1)
    return np.where(brain, counts.argmax(1)[flat], 0)


def ceiling(mni):
    """How far the labels of the validation slices follow from the T1's local brightness: Dice of local_rule()
    with the intensity alone and with Gaussian-smoothed copies of it (sigma 1 and 2.5 voxels), each fitted
    once on the training slices (a fair classifier) and once on the validation slices' own labels (an
    oracle: it looks at the answers it is scored on). Returns [(name, fitted on, Dice per tissue)]."""
    image = mni.t1.astype(np.float32) / 255
    train, val = training_mask(image.shape), validation_mask(image.shape)
    s1, s25 = gaussian_smooth(image, 1.0), gaussian_smooth(image, 2.5)
    rows = []
    for name, features, bins in (("intensity", [image], 256), ("intensity, smoothed (sigma 1)", [image, s1], 48),
                                 ("intensity, smoothed (sigma 1, 2.5)", [image, s1, s25], 24)):
        for fitted, fit in (("training slices", train), ("validation slices (oracle)", val)):
            rows.append((name, fitted, dice_per_class(local_rule(features, mni.labels, fit, bins), mni.labels, 4, val)))
    return rows


def cmd_ceiling(args):
    mni = mni152()
    print(f"{'labels by (local_rule())':<38}{'fitted on':<30}{'CSF':>8}{'GM':>8}{'WM':>8}")
    for name, fitted, dice in ceiling(mni):
        print(f"{name:<38}{fitted:<30}" + "".join(f"{v:8.4f}" for v in dice))
    if not args.no_model:
        seg = deformux.Segmenter(args.model)
        dice = dice_per_class(seg.segment(mni.t1, affine=mni.affine, progress=False), mni.labels, 4,
                              validation_mask(mni.t1.shape))
        print(f"{'the model: ' + Path(args.model).stem:<38}{'training slices':<30}" + "".join(f"{v:8.4f}" for v in dice))


def cmd_train(args):
    mni = mni152()
    if args.threads:
        deformux.set_num_threads(args.threads)
    model = deformux.DeformUXNet(**CONFIG, seed=args.seed)
    if args.init:  # a second stage starts from an earlier run's weights
        model.load(args.init)
    patch = tuple(int(v) for v in args.patch.split(","))
    window = tuple(int(v) for v in args.window.split(",")) if args.window else patch
    val = [{"name": "mni152", "image": mni.t1[None], "label": mni.labels, "affine": mni.affine,
            "mask": validation_mask(mni.t1.shape)}]
    command = "python3 tools/train_mni152.py " + shlex.join(args.argv)
    t0 = time.time()
    if args.heads:  # whole synthetic heads (heads()) instead of the slabs
        sources = [normalize_intensity(v[None].astype(np.float32), PRESET) for v in training_volumes(mni, NOISY_COPIES)]
        data = [{"image": np.ascontiguousarray(im), "label": np.ascontiguousarray(lb), "affine": mni.affine,
                 "normalized": True, "name": f"head{k}_{i}"}
                for k, v in enumerate(sources)
                for i, (im, lb) in enumerate(heads(v, mni.labels, args.heads, seed=args.seed + k, white=args.heads_white,
                                                   pools=floats(args.heads_pools), scale=floats(args.heads_scale),
                                                   # blobs in the clean T1's heads only: a smooth blob would stand
                                                   # out of a noisy copy (augmentation adds noise to both alike)
                                                   blobs=args.heads_blobs if k == 0 else 0,
                                                   means=blob_means(args.heads_blob_means)))]
    else:
        data = cases(mni, NOISY_COPIES)
    if args.mosaics:
        tiles = mosaics([(c["image"], c["label"]) for c in data], args.mosaics, patch, seed=args.seed)
        data = data * args.real_repeat + [{"image": im, "label": lb, "affine": mni.affine, "normalized": True,
                                           "name": f"mosaic{i}"} for i, (im, lb) in enumerate(tiles)]
    run = deformux.train(
        data, model, out=args.out, patch_size=patch, steps=args.steps, lr=args.lr, pos_neg=POS_NEG,
        samples_per_volume=args.samples_per_volume,
        weight_decay=0.08, scheduler="poly", intensity=PRESET, classes=list(mni.classes),
        augmentation=dict(AUGMENTATION, noiseMaxFraction=args.noise, biasFieldMaxAmplitude=args.bias_field,
                          shiftRange=args.shift, rotationProbability=args.spatial, scaleProbability=args.spatial),
        validation=val, validate_every=args.validate_every, window=window, overlap=0.5, seed=args.seed,
        resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress, name=NAME, license=LICENSE, command=command)
    print(f"trained {run['steps']} steps in {time.time() - t0:.0f} s; best: {run['best']}")


#: Stages 5 to 13 train on these heads: a middle larger and richer in white matter than heads()'s defaults
WHITER_HEADS = ["--patch", "208,240,192", "--samples-per-volume", "1", "--heads", "6", "--heads-white", "0.5",
                "--heads-pools", "0.85,0.15", "--heads-scale", "1.4,1.3"]
#: Stages 7 to 13 augment mildly: noise up to 6% and a bias field up to 25% (about the noisy variant's 5% and
#: 20%), intensity shifts up to 0.05, rotations and scalings with probability 0.1 each
MILD = ["--noise", "0.06", "--bias-field", "0.25", "--shift", "0.05", "--spatial", "0.1"]
#: Stages 8 to 13: most blobs about the grey/white boundary (see add_blobs())
NEAR_BOUNDARY = "0.6,0.70,0.82;0.2,0.6,0.9;0.2,0.15,0.45"


def blob_stage(blobs, seed, lr="5e-5", steps=80):
    """Stages 8 to 13: the whiter heads, mild augmentation, `blobs` blobs mostly about the grey/white boundary,
    a whole `steps`-step schedule validated at its middle and end."""
    return WHITER_HEADS + MILD + ["--lr", lr, "--steps", str(steps), "--validate-every", str(steps // 2),
                                  "--heads-blobs", str(blobs), "--heads-blob-means", NEAR_BOUNDARY, "--seed", str(seed)]


#: The bundled model's recipe: thirteen runs of `train`, each starting from the previous one's last weights
#: (`all` runs them into OUT/stage1 ... OUT/stage13).
STAGES = (
    # 1: small patches, high rate, 2500 steps (about 75 min here)
    [],
    # 2: whole cross-sections (192 x 224 x 48), one per step; a 600-step schedule stopped at step 200 (its
    #    validation had levelled off; about 25 min)
    ["--patch", "192,224,48", "--samples-per-volume", "1", "--lr", "3e-4", "--steps", "600", "--stop-after", "200",
     "--validate-every", "100"],
    # 3: 128 x 128 x 48 patches, half of them from 16 mosaics (see mosaics()); a 1400-step schedule stopped
    #    at step 800 (the calibrated whole-head Dice of steps 800 and 1000 had begun to fall; about 40 min)
    ["--patch", "128,128,48", "--samples-per-volume", "1", "--lr", "3e-4", "--steps", "1400", "--stop-after", "800",
     "--validate-every", "200", "--mosaics", "16", "--real-repeat", "4"],
    # 4: whole synthetic heads (heads(): 6 per volume, 12 in all) in the inference's window (208 x 240 x 192),
    #    batch 1, a 160-step schedule at lr 1.5e-4 stopped at step 80 (about 35 min)
    ["--patch", "208,240,192", "--samples-per-volume", "1", "--lr", "1.5e-4", "--steps", "160", "--stop-after", "80",
     "--validate-every", "40", "--heads", "6"],
    # 5: the same with heads whose middle is larger and richer in white matter (about the real head's make-up:
    #    white matter 8% of the window, 18% of the middle), a 120-step schedule at lr 1e-4 stopped at step 80
    #    (about 35 min)
    WHITER_HEADS + ["--lr", "1e-4", "--steps", "120", "--stop-after", "80", "--validate-every", "40"],
    # 6: the same heads (drawn with seed 1), milder noise and bias field, 80 steps at lr 7e-5 (about 35 min)
    WHITER_HEADS + ["--lr", "7e-5", "--steps", "80", "--validate-every", "40", "--noise", "0.06", "--bias-field", "0.25",
                    "--seed", "1"],
    # 7: heads drawn with seed 2, 24 blobs in each head of the clean T1 (add_blobs()), milder augmentation
    #    still; a 100-step schedule at lr 6e-5 stopped at step 50 (about 22 min)
    WHITER_HEADS + MILD + ["--lr", "6e-5", "--steps", "100", "--stop-after", "50", "--validate-every", "50",
                           "--heads-blobs", "24", "--seed", "2"],
    # 8: 48 blobs, most of them about the grey/white boundary, seed 3, 100 steps at lr 6e-5 (about 45 min)
    blob_stage(48, seed=3, lr="6e-5", steps=100),
    # 9 to 13: 48 more blobs each stage, seeds 4 to 8, 80 steps at lr 5e-5 (about 35-40 min each)
    blob_stage(96, seed=4),
    blob_stage(144, seed=5),
    blob_stage(192, seed=6),
    blob_stage(240, seed=7),
    blob_stage(288, seed=8),
)


def cmd_all(args):
    previous = None
    for i, stage in enumerate(STAGES, 1):
        out = os.path.join(args.out, f"stage{i}")
        argv = ["train", "--out", out, *stage] + (["--init", os.path.join(previous, "last.safetensors")] if previous else [])
        if args.no_progress:
            argv.append("--no-progress")
        print("python3 tools/train_mni152.py " + shlex.join(argv), flush=True)
        main(argv)
        previous = out


def thresholds_baseline(image, mni):
    """Two intensity thresholds chosen on the training slices (grid over quantiles, best mean Dice), then
    applied inside the brain mask; Dice on the validation slices."""
    train = training_mask(image.shape)
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


def calibrate(card_path, mni):
    """Offsets for the output layer's biases, fitted on the TRAINING slices only: the logits of the clean
    T1 and of the noisy training copies (segment() with the card's window, so with the statistics the
    decoder's InstanceNorms will see), then a coordinate search (steps 1, 1/2, 1/4, 1/8) on one offset per
    class (background fixed at 0) for the best mean Dice of the three tissues on the training slices.

    Why: with whole-head windows the network sees window statistics unlike its training patches' (the
    middle of the brain is in them) and calls too little white matter, in the training slices too; a
    per-class offset of the logits undoes that shift without looking at the validation slices. Exact for
    one window per volume (the whole head): the blended probabilities are then one softmax of the logits
    (with TTA, of the logits averaged over the 8 flips).
    Returns (offsets, Dice on the training slices before, after)."""
    from deformux.segment import Segmenter
    seg = Segmenter(card_path)
    mask = training_mask(mni.t1.shape)
    logp, truth = [], []
    for v in training_volumes(mni, NOISY_COPIES):
        _, prob = seg.segment(v, affine=mni.affine, return_probabilities=True, progress=False)
        logp.append(np.log(np.clip(prob[:, mask], 1e-12, None)))
        truth.append(mni.labels[mask])
    logp, truth = np.concatenate(logp, axis=1), np.concatenate(truth)

    def score(b):
        return float(np.mean(dice_per_class((logp + b[:, None]).argmax(0), truth, 4)))

    offsets = np.zeros(4, np.float32)
    before = best = score(offsets)
    for step in (1.0, 0.5, 0.25, 0.125):
        improved = True
        while improved:
            improved = False
            for k in (1, 2, 3):
                for d in (-step, step):
                    trial = offsets.copy()
                    trial[k] += d
                    value = score(trial)
                    if value > best + 1e-6:
                        offsets, best, improved = trial, value, True
    return offsets, before, best


def write_json(path, obj):
    """Writes obj as JSON to path atomically (a temporary file beside it, then a rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def cmd_package(args):
    """Copies a run's checkpoint (best or last) into the package as the default model, calibrates its output
    biases on the training slices (calibrate(); --no-calibration skips it) and completes its card with the
    recipe's stages and the evaluation (clean and noisy Dice through segment())."""
    run = Path(args.run)
    card = json.loads((run / f"{args.checkpoint}.json").read_text())
    MODELS.mkdir(parents=True, exist_ok=True)
    weights = MODELS / f"{NAME}.safetensors"
    tmp = weights.with_suffix(".tmp")
    shutil.copyfile(run / f"{args.checkpoint}.safetensors", tmp)
    os.replace(tmp, weights)
    card["name"] = NAME
    card["weights"] = weights.name
    # The recipe is STAGES (`all`); the run's own card holds only its last stage's command.
    package = f"python3 tools/train_mni152.py package --run runs/brain-tissue/stage{len(STAGES)} --checkpoint {args.checkpoint}"
    package += f" --window {args.window}" if args.window else ""
    card["training"]["command"] = f"python3 tools/train_mni152.py all --out runs/brain-tissue && {package}"
    card["training"]["stages"] = ["python3 tools/train_mni152.py train " + shlex.join(
                                      ["--out", f"runs/brain-tissue/stage{i}", *stage]
                                      + (["--init", f"runs/brain-tissue/stage{i - 1}/last.safetensors"] if i > 1 else []))
                                  for i, stage in enumerate(STAGES, 1)]
    t = card["training"]
    t["checkpoint"] = f"{args.checkpoint}: step {t.get('step')} of the last stage's {t.get('steps')}-step schedule"
    # The run's own validation used its patch as window, not the card's: not the model's figures.
    t.pop("validation_dice", None)
    t.pop("best_step", None)
    if args.window:  # inference windows other than the training run's (chosen on the validation slices)
        card["window"] = [int(v) for v in args.window.split(",")]
        t["window_choice"] = ("the whole padded head as one window: the decoder's InstanceNorms then see "
                              "whole-head statistics on every volume, and calibrate() is exact for one window")
    card["description"] = ("Brain tissue (CSF, grey matter, white matter) in T1-weighted MRI: a reduced-width "
                           "DeformUX-Net trained by deformux on the CPU on the MNI152 template "
                           "(tools/train_mni152.py). A demonstration model: one template, so it has not seen "
                           "the anatomy or contrast of other scanners.")
    if args.tta:  # segment() averages the 8 flips of each window; calibration and evaluation then do too
        card["tta"] = True
        card["training"]["command"] += " --tta"
    card_path = MODELS / f"{NAME}.json"
    write_json(card_path, card)
    if not args.no_calibration:
        mni = mni152()
        model = deformux.DeformUXNet(**card["config"])
        model.load(weights)
        offsets, before, after = calibrate(card_path, mni)
        state = model.state_dict()
        state["out.conv.conv.bias"] = state["out.conv.conv.bias"] + offsets
        model.load_state_dict(state)
        model.save(weights)  # atomic
        card["training"]["calibration"] = {
            "what": "per-class offsets added to the output layer's biases (out.conv.conv.bias), fitted on the "
                    "training slices only (clean T1 and the noisy training copies, the card's window) for the best "
                    "mean tissue Dice there; see calibrate() in tools/train_mni152.py",
            "offsets": [float(v) for v in offsets],
            "training_slices_mean_dice": {"before": before, "after": after},
        }
        print(f"calibrated the output biases by {offsets.tolist()}: mean Dice on the training slices {before:.4f} -> {after:.4f}")
    result = evaluate(card_path, baseline=True)
    card["training"]["evaluation"] = {
        "command": "python3 tools/train_mni152.py evaluate",
        "validation": "Dice on the validation slices (68 <= z < 124) of the whole-volume segmentation",
        "clean": result["rows"]["clean"]["dice"],
        "noisy": {k: v["dice"] for k, v in result["rows"].items() if k.startswith("noisy")},
        "noisy_mean": result["noisy_mean"],
        "thresholds_baseline": {k: v["thresholds"] for k, v in result["rows"].items()},
    }
    clean = result["rows"]["clean"]["dice"]
    card["training"]["targets"] = dict(TARGETS, met=bool(all(clean[k] >= v for k, v in TARGETS["clean"].items())
                                                          and result["noisy_mean"] >= TARGETS["noisy_mean"]))
    write_json(card_path, card)
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
    p.add_argument("--patch", default=",".join(map(str, PATCH)), help="patch size X,Y,Z")
    p.add_argument("--window", default=None, help="validation window X,Y,Z (default: the patch)")
    p.add_argument("--samples-per-volume", type=int, default=2)
    p.add_argument("--init", default=None, help="start from these weights (.safetensors)")
    p.add_argument("--mosaics", type=int, default=0, help="add this many mosaic cases (see mosaics())")
    p.add_argument("--heads", type=int, default=0, help="train on this many synthetic whole heads per volume (see heads())")
    p.add_argument("--heads-white", type=float, default=0.4, help="heads(): white-matter share of the white-matter pool's blocks")
    p.add_argument("--heads-pools", default="0.75,0.2", help="heads(): shares of the white-matter and grey-or-white pools")
    p.add_argument("--heads-scale", default="1.3,1.2", help="heads(): the middle's ellipse, times the footprint above the fill")
    p.add_argument("--heads-blobs", type=int, default=0,
                   help="heads(): ellipsoids of tissue-like intensity pasted into the middle of each head of the clean T1")
    p.add_argument("--heads-blob-means", default=BLOB_MEANS,
                   help="heads(): the blobs' mean intensities, 'share,low,high;...' (normalised intensity)")
    p.add_argument("--noise", type=float, default=AUGMENTATION["noiseMaxFraction"], help="augmentation: largest noise, of the range")
    p.add_argument("--bias-field", type=float, default=AUGMENTATION["biasFieldMaxAmplitude"], help="augmentation: largest bias field amplitude")
    p.add_argument("--shift", type=float, default=AUGMENTATION["shiftRange"], help="augmentation: largest intensity shift")
    p.add_argument("--spatial", type=float, default=AUGMENTATION["rotationProbability"],
                   help="augmentation: probability of a rotation and of a scaling")
    p.add_argument("--real-repeat", type=int, default=1, help="list the real cases this many times")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=int, default=None, help="end after this step (the schedule spans --steps)")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("all", help="the bundled model's thirteen stages (STAGES), each from the last one's weights")
    p.add_argument("--out", default="runs/brain-tissue")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("evaluate")
    p.add_argument("--model", default=str(MODELS / f"{NAME}.json"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--window", default=None, help="override the card's window, X,Y,Z")
    p.add_argument("--overlap", type=float, default=None, help="override the card's overlap")
    p = sub.add_parser("ceiling", help="Dice of intensity rules fitted on the training or the validation slices")
    p.add_argument("--model", default=str(MODELS / f"{NAME}.json"))
    p.add_argument("--no-model", action="store_true", help="only the rules, not the model's own Dice")
    p = sub.add_parser("package")
    p.add_argument("--run", default="runs/brain-tissue")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"))
    p.add_argument("--window", default=None, help="the card's inference window, X,Y,Z (default: the run's)")
    p.add_argument("--no-calibration", action="store_true", help="keep the output biases as trained (see calibrate())")
    p.add_argument("--tta", action="store_true", help="the card turns on flip test-time augmentation (8x the work)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    {"train": cmd_train, "all": cmd_all, "evaluate": cmd_evaluate, "package": cmd_package,
     "ceiling": cmd_ceiling}[args.command](args)


if __name__ == "__main__":
    main()
