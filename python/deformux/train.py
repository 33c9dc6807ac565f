"""The training loop (issue 9 item 4): ``deformux.train(data, ...)`` and ``deformux train --data DIR --out RUN``.

    run = deformux.train("Task04_Hippocampus", out="runs/hippo", patch_size=(64, 64, 64), steps=2000)
    run = deformux.train([{"image": t1, "label": seg, "affine": A}, ...], model=m, out="runs/x", steps=500)
    run = deformux.train("Task04_Hippocampus", out="runs/hippo", resume=True)   # continue where it stopped

What a run does, per optimiser step: draws ``volumes_per_step`` training volumes (a seeded permutation per
epoch), ``samples_per_volume`` random crops of each (foreground / background centres 1:1) with the
augmentation (``"paper"``: rotation -30..30 degrees, scaling 0.1 per axis, intensity shift 0.1;
``"mr_robust"`` adds noise and a bias field), and one :class:`deformux.Trainer` step (Dice + CE, AdamW).
Every ``validate_every`` steps it segments the whole validation volumes with sliding windows (the same
code path as :func:`deformux.segment`), reports the mean Dice to ReduceLROnPlateau (factor 0.9, patience
10), and keeps the best weights. In ``out``:

    last.safetensors, last.json                               the latest weights and their model card
    last.trainer.safetensors, last.loop.json                  the rest of the resumable checkpoint (optimiser, loop)
    best.safetensors, best.json                               the best weights and their model card
    metrics.jsonl                                             one JSON object per log event

Everything random comes from the seed and is saved in the checkpoint, so a resumed run gives the same
weights as an uninterrupted one. Ctrl-C saves a resumable checkpoint (the weights of the last complete
step) before raising KeyboardInterrupt.
"""
import json
import math
import os
import sys
import time

import numpy as np

from ._atomic import atomic_write
from .model import DeformUXNet
from .training import PatchSampler, Trainer

__all__ = ["train", "load_dataset", "dice_per_class", "normalize_intensity", "to_ras", "INTENSITY_PRESETS"]

#: Intensity presets (stored in the model card so that inference repeats them exactly).
#: "ct": clip to [lo, hi] then (x - P1) / (P99 - P1) over all voxels; "mr": percentiles over non-zero
#: voxels only; "none".
INTENSITY_PRESETS = {
    "ct": {"kind": "ct", "clip": [-175.0, 250.0], "percentiles": [1.0, 99.0], "nonzero": False},
    "mr": {"kind": "mr", "percentiles": [1.0, 99.0], "nonzero": True},
    "none": {"kind": "none"},
}


# ---- data ----

def load_dataset(path):
    """The cases of a Medical Segmentation Decathlon or nnU-Net raw folder: a list of dicts
    ``{"name", "images": [paths], "label": path}`` for ``imagesTr``/``labelsTr``, and the dataset's
    description (``dataset.json``: class names, modality). MSD lists its pairs in ``training``; nnU-Net v2
    names channel files ``<case>_0000.nii.gz``, ``<case>_0001...`` beside ``labelsTr/<case>.nii.gz``."""
    path = os.fsdecode(path)
    meta_path = os.path.join(path, "dataset.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(2, f"not a Decathlon / nnU-Net dataset folder: no dataset.json in {path}", meta_path)
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    cases = []
    if isinstance(meta.get("training"), list):
        for item in meta["training"]:  # MSD: one (possibly 4-D) image per case
            if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not isinstance(item.get("label"), str):
                raise ValueError(f"{meta_path}: each entry of 'training' must be {{\"image\": path, \"label\": path}}, "
                                 f"got {item!r}"[:300])
            image = os.path.normpath(os.path.join(path, item["image"]))
            label = os.path.normpath(os.path.join(path, item["label"]))
            cases.append({"name": os.path.basename(image).split(".")[0], "images": [image], "label": label})
    else:  # nnU-Net v2: imagesTr/<case>_<channel>.<ending>
        ending = meta.get("file_ending", ".nii.gz")
        channels = len(meta.get("channel_names", meta.get("modality", {"0": "image"})))
        labels_dir = os.path.join(path, "labelsTr")
        for name in sorted(os.listdir(labels_dir)):
            if not name.endswith(ending) or name.startswith("."):
                continue
            case = name[: -len(ending)]
            images = [os.path.join(path, "imagesTr", f"{case}_{c:04d}{ending}") for c in range(channels)]
            cases.append({"name": case, "images": images, "label": os.path.join(labels_dir, name)})
    if not cases:
        raise ValueError(f"{path}: dataset.json lists no training cases")
    for c in cases:
        for p in c["images"] + [c["label"]]:
            if not os.path.isfile(p):
                raise FileNotFoundError(2, f"{path}: a training file is missing", p)
    return cases, meta


def _classes_and_modality(meta):
    labels = meta.get("labels", {})
    if labels and all(str(k).lstrip("-").isdigit() for k in labels):     # MSD: {"0": "background", ...}
        names = [labels[k] for k in sorted(labels, key=int)]
    elif labels:                                                           # nnU-Net v2: {"background": 0, ...}
        names = [k for k, _ in sorted(labels.items(), key=lambda kv: kv[1] if isinstance(kv[1], int) else 0)]
    else:
        names = None
    modality = meta.get("modality") or meta.get("channel_names") or {}
    kinds = " ".join(str(v).lower() for v in modality.values())
    return names, ("ct" if "ct" in kinds.split() or kinds.strip() == "ct" else "mr")


def io_orientation(affine):
    """nibabel's ``io_orientation``: for each voxel axis, the RAS axis it is closest to and whether it runs
    backwards (the engine's reorientation, Sources/DeformUX/Pipeline/Orientation.swift, computes the same)."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    zooms = np.sqrt((a * a).sum(axis=0))
    zooms[zooms == 0] = 1
    rs = a / zooms
    p, s, qt = np.linalg.svd(rs)
    keep = s > s.max() * 3 * np.finfo(np.float64).eps
    r = p[:, keep] @ qt[keep, :]
    axes, flips = [0, 0, 0], [False] * 3
    for i in range(3):
        column = r[:, i]
        if np.allclose(column, 0):
            raise ValueError(f"train: the affine's voxel axis {i} has no direction: {np.asarray(affine).tolist()}")
        out = int(np.argmax(np.abs(column)))
        axes[i], flips[i] = out, bool(column[out] < 0)
        r[out, :] = 0
    return axes, flips


def to_ras(volume, affine):
    """``volume`` (..., X, Y, Z) with its last three axes permuted and flipped to the closest RAS+ order,
    and the affine of the result: what segment() does first with a card whose orientation is "RAS", so
    training sees the volumes as inference will."""
    affine = np.asarray(affine, dtype=np.float64)
    axes, flips = io_orientation(affine)
    lead = volume.ndim - 3
    size = volume.shape[lead:]
    out = volume
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for i in range(3):
        if flips[i]:
            out = np.flip(out, lead + i)
        m[i, axes[i]] = -1 if flips[i] else 1
        m[i, 3] = size[i] - 1 if flips[i] else 0
    order = [0] * 3
    for i in range(3):
        order[axes[i]] = i
    out = np.transpose(out, list(range(lead)) + [lead + o for o in order])
    return np.ascontiguousarray(out), affine @ m


def _read_case(case):
    from . import nifti
    images = [nifti.load(p) for p in case["images"]]
    label = nifti.load(case["label"], dtype="int32")
    arrays = [im.array[None] if im.array.ndim == 3 else im.array for im in images]
    shapes = {a.shape[1:] for a in arrays} | {label.array.shape}
    if len(shapes) != 1:
        raise ValueError(f"train: case {case['name']}: the images and the label are on different grids: {sorted(shapes)}")
    if not np.allclose(images[0].affine, label.affine, atol=1e-3):
        raise ValueError(f"train: case {case['name']}: the label's affine differs from the image's "
                         f"({case['label']} vs {case['images'][0]})")
    image = np.concatenate(arrays, axis=0).astype(np.float32, copy=False)
    return {"name": case["name"], "image": image, "label": label.array, "affine": images[0].affine}


def _normalize_item(item, i):
    if isinstance(item, dict):
        image, label = item.get("image"), item.get("label")
        affine, mask = item.get("affine"), item.get("mask")
        name = item.get("name", f"case{i}")
    else:
        image, label = item[0], item[1]
        affine, mask, name = (item[2] if len(item) > 2 else None), None, f"case{i}"
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image[None]
    label = np.asarray(label)
    if image.ndim != 4 or label.shape != image.shape[1:] or label.dtype.kind not in "iub":
        raise ValueError(f"train: case {name}: image must be (C, X, Y, Z) or (X, Y, Z) float and label (X, Y, Z) "
                         f"integers of the same grid, got {image.shape} and {label.dtype} {label.shape}")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    normalized = bool(item.get("normalized", False)) if isinstance(item, dict) else False
    return {"name": name, "image": image, "label": label.astype(np.int32), "affine": affine, "mask": mask,
            "normalized": normalized}


def normalize_intensity(image, preset):
    """The model card's intensity preset applied per channel (the engine's segment() repeats it exactly:
    percentiles as numpy.percentile, linear)."""
    kind = preset.get("kind", "none")
    if kind == "none":
        return image
    out = np.empty_like(image)
    for c in range(image.shape[0]):
        raw = x = image[c]
        if preset.get("clip"):
            lo, hi = preset["clip"]
            x = np.clip(x, lo, hi)
        sel = x[raw != 0] if preset.get("nonzero") else x.ravel()   # non-zero before clipping, as the engine
        if sel.size == 0:
            sel = x.ravel()
        p1, p99 = np.percentile(sel, preset.get("percentiles", [1.0, 99.0])).astype(np.float32)
        out[c] = (x - p1) / (p99 - p1) if p99 > p1 else x - p1
    return out


def dice_per_class(pred, label, classes, mask=None):
    """Dice of each class 1..classes-1 (NaN where the class is absent from both), optionally only over
    ``mask``."""
    if mask is not None:
        pred, label = pred[mask], label[mask]
    out = []
    for c in range(1, classes):
        p, g = pred == c, label == c
        denom = p.sum() + g.sum()
        out.append(float(2 * np.logical_and(p, g).sum() / denom) if denom else float("nan"))
    return out


# ---- the loop ----

class _Progress:
    """A one-line progress bar on stderr (only on a terminal), or nothing: step, loss, throughput
    (seconds per step and patches per second) and the time left."""

    def __init__(self, enabled, total, start_step, patches_per_step):
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total
        self.start_step = start_step
        self.patches = patches_per_step
        self.t0 = time.perf_counter()

    def update(self, step, loss, seconds):
        if not self.enabled:
            return
        width = 30
        done = int(width * step / max(self.total, 1))
        elapsed = time.perf_counter() - self.t0
        per_step = elapsed / max(step - self.start_step, 1)
        left = int(per_step * (self.total - step))
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{self.total} loss {loss:.4f} "
                         f"{seconds:.2f} s/step {self.patches / max(seconds, 1e-9):.2f} patches/s "
                         f"{left // 60}:{left % 60:02d} left ")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


def _card(model, config, classes, preset, spacing, window, overlap, extra):
    return {
        "name": extra.get("name", "deformux-model"),
        "version": "1",
        "config": model.config,
        "weights": config,
        "classes": classes,
        "spacing": spacing,
        "orientation": "RAS" if extra.get("reorient", True) else None,
        "intensity": preset,
        "window": list(window),
        "overlap": overlap,
        "blend": "gaussian",
        "training": extra.get("training", {}),
        "license": extra.get("license") or None,
    }


def train(data, model=None, *, out, patch_size=(96, 96, 96), steps=None, epochs=None, volumes_per_step=1,
          samples_per_volume=2, lr=1e-4, weight_decay=0.08, accumulation=1, drop_path=0.0,
          exclude_norm_and_bias_from_weight_decay=False, augmentation="paper", intensity=None, classes=None,
          validation=None, validate_every=100, window=None, overlap=0.5, seed=0, resume=False, progress=True,
          scheduler="plateau", name=None, license=None, command=None, log=None, predict=None, reorient=True,
          pos_neg=(1.0, 1.0), stop_after=None):
    """Trains ``model`` (a :class:`DeformUXNet`; default: the full DeformUX-Net with one input channel per
    image channel and one output per class) on ``data`` and returns a dict describing the run.

    data: a Decathlon / nnU-Net raw folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``), or a list of
    cases, each ``{"image": (C, X, Y, Z) or (X, Y, Z) float, "label": (X, Y, Z) ints, "affine": 4x4}``
    (or ``(image, label[, affine])``). validation: cases in the same form (optional ``"mask"``: the voxels
    to score), an int (hold out that many cases of a folder, seeded), or None (a folder holds out 20%, at
    least one case; in-memory data: no validation). steps or epochs (an epoch = one pass over the
    training volumes, ``volumes_per_step`` at a time). intensity: a preset name ("ct", "mr", "none") or
    dict, stored in the model card (default: from the dataset's modality, else "mr"). classes: the number
    of classes or their names (index 0 background; default: dataset.json's labels, else from the data).
    resume: True or a run folder: continue from ``out``'s last checkpoint.
    stop_after: end the call after this step with a resumable checkpoint, as if interrupted there (the
    schedule still spans ``steps``); ``resume=True`` later goes on to ``steps``.
    predict(model, image, affine) -> labels: the validation segmenter (default: :class:`deformux.Segmenter`
    with the run's model card: the card's window, overlap, intensity preset and orientation).
    scheduler: "plateau" (the paper's ReduceLROnPlateau on the validation Dice, factor 0.9, patience 10),
    "poly" (nnU-Net's lr * (1 - step / steps) ** 0.9, a function of the step, so resuming keeps it) or None
    (constant). A case may carry ``"normalized": True``: its image is already in the network's intensity
    space (the preset is not applied to it again), e.g. a crop normalised with its whole volume's
    percentiles, as segment() normalises whole volumes.
    pos_neg: the weights of crops centred on foreground and on background (MONAI's pos and neg; the paper
    1:1).
    reorient: train on the volumes turned to the closest RAS+ axes (as segment() turns them with the
    card's ``"orientation": "RAS"``); False keeps the voxel order and writes ``"orientation": null``.
    The volumes are used on their own grid (the card's ``spacing`` is null: segment() keeps the input's
    grid); resample them beforehand if their spacings differ much.
    """
    log = log or (lambda *a: print(*a, file=sys.stderr))
    scheduler = {True: "plateau", False: None, "none": None}.get(scheduler, scheduler)
    if scheduler not in ("plateau", "poly", None):
        raise ValueError(f"train: scheduler must be 'plateau', 'poly' or None, got {scheduler!r}")
    out = os.fsdecode(out)
    os.makedirs(out, exist_ok=True)
    meta = {}
    if isinstance(data, (str, bytes, os.PathLike)):
        cases, meta = load_dataset(data)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(cases))
        if validation is None:
            validation = max(1, len(cases) // 5) if len(cases) > 1 else 0
        if isinstance(validation, int):
            held = [cases[i] for i in order[:validation]]
            cases = [cases[i] for i in order[validation:]]
            validation = held
        train_items = [_read_case(c) for c in cases]
        val_items = [_read_case(c) if "images" in c else c for c in (validation or [])]
        names, modality = _classes_and_modality(meta)
    else:
        train_items = list(data)
        val_items = list(validation or [])
        names, modality = None, "mr"
    train_items = [_normalize_item(it, i) for i, it in enumerate(train_items)]
    val_items = [_normalize_item(it, i) for i, it in enumerate(val_items)]
    if reorient:  # validation volumes stay as they are: the segmenter turns them itself and back
        for it in train_items:
            it["image"], affine = to_ras(it["image"], it["affine"])
            it["label"], _ = to_ras(it["label"], it["affine"])
            it["affine"] = affine
    if not train_items:
        raise ValueError("train: no training cases")
    channels = train_items[0]["image"].shape[0]
    if isinstance(classes, (list, tuple)):  # class names, index 0 background
        names, classes = [str(c) for c in classes], len(classes)
    n_classes = classes or (len(names) if names else int(max(it["label"].max() for it in train_items)) + 1)
    names = names or (["background"] + [f"class {c}" for c in range(1, n_classes)])
    preset = INTENSITY_PRESETS[intensity or modality] if not isinstance(intensity, dict) else intensity
    if model is None:
        model = DeformUXNet(in_channels=channels, out_channels=n_classes, seed=seed)
    if model.config["in_channels"] != channels or model.config["out_channels"] != n_classes:
        raise ValueError(f"train: the model takes {model.config['in_channels']} channels and gives "
                         f"{model.config['out_channels']} classes; the data has {channels} and {n_classes}")
    patch = tuple(int(p) for p in ((patch_size,) * 3 if np.isscalar(patch_size) else patch_size))
    window = tuple(window or patch)
    steps_per_epoch = max(1, math.ceil(len(train_items) / volumes_per_step))
    total = steps if steps is not None else (epochs or 1) * steps_per_epoch

    trainer = Trainer(model, lr=lr, weight_decay=weight_decay, accumulation=accumulation, drop_path=drop_path,
                      exclude_norm_and_bias_from_weight_decay=exclude_norm_and_bias_from_weight_decay,
                      seed=seed, scheduler=scheduler == "plateau")
    sampler = PatchSampler(patch_size=patch, classes=n_classes, samples_per_volume=samples_per_volume,
                           augmentation=augmentation, positive=pos_neg[0], negative=pos_neg[1])
    for it in train_items:
        sampler.add(it["image"] if it.get("normalized") else normalize_intensity(it["image"], preset), it["label"])

    card_extra = {"name": name or "deformux-model", "license": license or "", "reorient": bool(reorient),
                  "training": {"command": command, "seed": seed, "steps": total, "patch_size": list(patch),
                               "lr": lr, "weight_decay": weight_decay, "scheduler": scheduler,
                               "augmentation": augmentation, "pos_neg": list(pos_neg),
                               "volumes": len(train_items)}}
    state = {"step": 0, "epoch": 0, "position": 0, "order": None, "sampler_rng": int(seed) & (2**64 - 1),
             "data_rng": np.random.default_rng(seed).bit_generator.state, "best": None, "history": []}
    last = os.path.join(out, "last")
    if resume:
        src = os.path.join(os.fsdecode(resume) if isinstance(resume, (str, bytes, os.PathLike)) else out, "last")
        if not os.path.isfile(src + ".loop.json"):
            raise FileNotFoundError(2, f"train: nothing to resume: no checkpoint in {os.path.dirname(src)}", src + ".loop.json")
        with open(src + ".loop.json", encoding="utf-8") as f:
            state = json.load(f)
        model.load(src + ".safetensors")
        trainer.load_state(src + ".trainer.safetensors")
        if trainer.step != state["step"]:  # a checkpoint cut short between its files
            raise ValueError(f"train: the checkpoint in {os.path.dirname(src)} is inconsistent: the optimiser is at "
                             f"step {trainer.step}, the loop at step {state['step']}")
        log(f"train: resumed from {src} at step {state['step']}")
    data_rng = np.random.default_rng()
    data_rng.bit_generator.state = state["data_rng"]
    metrics_path = os.path.join(out, "metrics.jsonl")

    def emit(event):
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def checkpoint(prefix, card):
        """Weights and card (and for `last` the optimiser and loop state), each file atomically; the loop
        state goes last, so a checkpoint is only resumed from once all of it is on disk."""
        model.save(prefix + ".safetensors")
        with atomic_write(prefix + ".json") as f:
            f.write(json.dumps(card, indent=1).encode())
        if prefix == last:
            trainer.save_state(prefix + ".trainer.safetensors")
            with atomic_write(prefix + ".loop.json") as f:
                f.write(json.dumps({**state, "data_rng": data_rng.bit_generator.state}).encode())

    def last_card():
        card = _card(model, "last.safetensors", names, preset, None, window, overlap, card_extra)
        card["training"] = {**card["training"], "step": state["step"]}
        return card

    def validate():
        if not val_items:
            return None
        seg = predict or validator
        per_class = []
        for it in val_items:
            labels = seg(model, it["image"], it["affine"])
            mask = None if it.get("mask") is None else np.asarray(it["mask"], dtype=bool)
            per_class.append(dice_per_class(labels, it["label"], n_classes, mask))
        dice = np.nanmean(np.array(per_class, dtype=np.float64), axis=0)
        return [float(d) for d in dice]

    validator = None
    if predict is None and val_items:
        validator = _default_predictor(_card(model, "best.safetensors", names, preset, None, window, overlap, card_extra))
    bar = _Progress(progress, total, state["step"], volumes_per_step * samples_per_volume)
    t_last = time.perf_counter()
    end = total if stop_after is None else min(total, int(stop_after))
    try:
        while state["step"] < end:
            if state["order"] is None or state["position"] >= len(state["order"]):
                state["order"] = [int(i) for i in data_rng.permutation(len(train_items))]
                state["position"] = 0
                state["epoch"] += 1 if state["step"] else 0
            if scheduler == "poly":
                trainer.learning_rate = lr * (1 - state["step"] / total) ** 0.9
            indices = state["order"][state["position"]:state["position"] + volumes_per_step]
            images, labels, next_rng = sampler.batch(indices, state["sampler_rng"])
            loss = trainer.train_step(images, labels)
            # Only a completed step moves the loop on (Ctrl-C inside it resumes at the same patches).
            state["sampler_rng"] = next_rng
            state["position"] += len(indices)
            now = time.perf_counter()
            if trainer.step > state["step"]:
                state["step"] = trainer.step
            emit({"event": "step", "step": state["step"], "epoch": state["epoch"], "lr": trainer.learning_rate,
                  "seconds": now - t_last, **trainer.last_loss})
            bar.update(state["step"], loss, now - t_last)
            t_last = now
            if validate_every and state["step"] % validate_every == 0 and trainer.accumulation_done():
                dice = validate()
                if dice is not None:
                    mean = float(np.nanmean(dice))
                    lr_now = trainer.report_validation(mean)
                    improved = state["best"] is None or mean > state["best"]["mean_dice"]
                    record = {"event": "validation", "step": state["step"], "dice": dict(zip(names[1:], dice)),
                              "mean_dice": mean, "lr": lr_now, "best": improved}
                    emit(record)
                    state["history"].append(record)
                    log(f"train: step {state['step']}: validation Dice " +
                        ", ".join(f"{k} {v:.4f}" for k, v in record["dice"].items()) + f" (mean {mean:.4f})")
                    if improved:
                        state["best"] = {"step": state["step"], "mean_dice": mean, "dice": record["dice"]}
                        card = _card(model, "best.safetensors", names, preset, None, window, overlap, card_extra)
                        card["training"]["validation_dice"] = record["dice"]
                        card["training"]["best_step"] = state["step"]
                        checkpoint(os.path.join(out, "best"), card)
                checkpoint(last, last_card())
                t_last = time.perf_counter()
    except KeyboardInterrupt:
        bar.close()
        if trainer.accumulation_done():
            checkpoint(last, last_card())
            log(f"train: interrupted; a resumable checkpoint of step {state['step']} is in {last}.*")
        raise
    bar.close()
    checkpoint(last, last_card())
    return {"out": out, "steps": state["step"], "best": state["best"], "history": state["history"]}


def _default_predictor(card):
    """Validation by the engine's segmenter with the run's model card (what segment() will do with the
    saved model); one segmenter per model, kept for the run (its working memory is reused)."""
    from .segment import Segmenter
    cache = {}

    def predict(m, image, affine):
        if id(m) not in cache:
            cache[id(m)] = Segmenter(m, card=card)
        return cache[id(m)].segment(image, affine=affine, progress=False)
    return predict
