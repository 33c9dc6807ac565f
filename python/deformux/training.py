"""Training on the CPU (issue 9; ARCHITECTURE.md section 7): the per-step trainer and the patch sampler,
both run by the engine.

    t = deformux.Trainer(model, lr=1e-4, weight_decay=0.08)
    loss = t.train_step(images, labels)          # images (N, Cin, D, H, W) float32, labels (N, D, H, W) ints

    s = deformux.PatchSampler(patch_size=(96, 96, 96), classes=4, augmentation="paper")
    s.add(image, labels)                          # image (C, X, Y, Z) or (X, Y, Z) float32, labels (X, Y, Z)
    images, labels, rng_state = s.batch([0], rng_state)

The whole loop (data folders, validation, checkpoints, resume) is :func:`deformux.train`.
"""
import json
import numbers
import os

import numpy as np

from . import _C
from .model import DeformUXNet

__all__ = ["Trainer", "PatchSampler", "AUGMENTATIONS"]

#: Augmentation presets of the patch sampler: the paper's recipe (rotation -30..30 degrees about each axis,
#: scaling 0.1 per axis, intensity shift 0.1), plus noise and a bias field for MR robustness, or none.
AUGMENTATIONS = {"paper": "paper", "mr_robust": "mrRobust", "none": "none"}


def _number(op, name, v, minimum=None, maximum=None, integer=False):
    kinds = numbers.Integral if integer else numbers.Real
    if isinstance(v, bool) or not isinstance(v, kinds):
        raise TypeError(f"{op}: {name} must be {'an int' if integer else 'a number'}, got {type(v).__name__}")
    v = int(v) if integer else float(v)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum) or v != v:
        raise ValueError(f"{op}: {name} must be in [{minimum}, {maximum}], got {v}")
    return v


class Trainer:
    """One optimiser step per call on a batch of patches, with the paper's recipe: Dice + cross-entropy
    (:func:`deformux.losses.dice_ce`), AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 0.08)
    applied to every parameter as ``torch.optim.AdamW(model.parameters())`` does in the released code
    (``exclude_norm_and_bias_from_weight_decay=True`` exempts norms and biases), gradient accumulation
    over ``accumulation`` calls, drop path (stochastic depth, rate 0 by default, seeded), and
    ReduceLROnPlateau (factor 0.9, patience 10) on the metric given to :meth:`report_validation`.

    The trainer keeps its working memory between steps (saved activations sized once per patch shape)
    and the optimiser moments in the model's parameter store. After a step the model's weights (and
    ``model.state_dict()``) are the updated ones.
    """

    def __init__(self, model, lr=1e-4, weight_decay=0.08, betas=(0.9, 0.999), eps=1e-8, accumulation=1,
                 exclude_norm_and_bias_from_weight_decay=False, drop_path=0.0, class_weights=None, seed=0,
                 scheduler=True, plateau_factor=0.9, plateau_patience=10):
        op = "Trainer"
        if not isinstance(model, DeformUXNet):
            raise TypeError(f"{op}: model must be a deformux.DeformUXNet, got {type(model).__name__}")
        betas = tuple(betas)
        if len(betas) != 2:
            raise ValueError(f"{op}: betas must be two numbers, got {betas}")
        options = {
            "learning_rate": _number(op, "lr", lr, 0),
            "weight_decay": _number(op, "weight_decay", weight_decay, 0),
            "betas": [_number(op, "betas[0]", betas[0], 0, 1), _number(op, "betas[1]", betas[1], 0, 1)],
            "eps": _number(op, "eps", eps, 0),
            "accumulation": _number(op, "accumulation", accumulation, 1, 1 << 20, integer=True),
            "decay_norms_and_biases": not bool(exclude_norm_and_bias_from_weight_decay),
            "drop_path": _number(op, "drop_path", drop_path, 0, 0.999),
            "seed": _number(op, "seed", seed, 0, 2**64 - 1, integer=True),
            "scheduler": bool(scheduler),
            "plateau_factor": _number(op, "plateau_factor", plateau_factor, 0, 1),
            "plateau_patience": _number(op, "plateau_patience", plateau_patience, 0, 1 << 30, integer=True),
        }
        if class_weights is not None:
            w = np.asarray(class_weights, dtype=np.float64)
            if w.shape != (model.config["out_channels"],):
                raise ValueError(f"{op}: class_weights must have {model.config['out_channels']} values, got shape {w.shape}")
            options["class_weights"] = [float(v) for v in w]
        self.model = model
        self.options = options
        self._handle = _C.trainer_create(model._handle, json.dumps(options))
        self.last_loss = None

    def train_step(self, images, labels, progress=None):
        """One micro-batch (and, every ``accumulation`` calls, the AdamW update) on images
        (N, Cin, D, H, W) float32 (D, H, W multiples of 16) and labels (N, D, H, W) of any integer dtype.
        Returns the loss before the update as a float (its Dice and cross-entropy parts are in
        ``last_loss``). Ctrl-C or a ``progress`` callback returning False cancels the step (the weights
        are then those of the last complete step)."""
        op = "Trainer.train_step"
        self.model._check_input(op, images, "images")
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iub":
            raise TypeError(f"{op}: labels must be integers (class indices), got dtype {labels.dtype}")
        want = (images.shape[0],) + images.shape[2:]
        if labels.shape != want:
            raise ValueError(f"{op}: labels must have shape (N, D, H, W) = {want}, got {labels.shape}")
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        if progress is not None and not callable(progress):
            raise TypeError(f"{op}: progress must be callable or None")
        total, dice, ce = _C.trainer_step(self._handle, images, labels, progress)
        self.last_loss = {"loss": total, "dice": dice, "cross_entropy": ce}
        return total

    @property
    def learning_rate(self):
        return _C.trainer_info(self._handle)[0]

    @learning_rate.setter
    def learning_rate(self, value):
        _C.trainer_set_learning_rate(self._handle, _number("Trainer", "learning_rate", value, 0))

    def report_validation(self, metric):
        """Reports a validation metric (higher is better, e.g. the mean Dice) to the ReduceLROnPlateau
        schedule (factor 0.9, patience 10 by default); returns the learning rate now in force."""
        return _C.trainer_report_validation(self._handle, _number("Trainer", "metric", metric))

    @property
    def step(self):
        """Optimiser steps taken."""
        return _C.trainer_info(self._handle)[1]

    def accumulation_done(self):
        """True between optimiser steps (no micro-batch of a gradient accumulation pending)."""
        return _C.trainer_info(self._handle)[2] == 0

    def save_state(self, path):
        """Writes the optimiser state (moments, step, hyperparameters, drop-path generator), atomically;
        the weights are saved with ``model.save``."""
        _C.trainer_save_state(self._handle, os.fsdecode(path))

    def load_state(self, path):
        """Restores what :meth:`save_state` wrote (load the weights with ``model.load``)."""
        _C.trainer_load_state(self._handle, os.fsdecode(path))


class PatchSampler:
    """Random training patches with augmentation, drawn by the engine: MONAI's
    ``RandCropByPosNegLabeld(pos=1, neg=1, num_samples=2)`` (crops centred on foreground or background 1:1),
    then one resampling pass per patch for the augmentation (``"paper"``: rotation -30..30 degrees about
    each axis, scaling 1 +- 0.1 per axis, intensity shift +- 0.1; ``"mr_robust"`` adds Gaussian noise and a
    smooth +-20% bias field; ``"none"``). Volumes are copied into the engine when added."""

    def __init__(self, patch_size=(96, 96, 96), classes=2, samples_per_volume=2, positive=1.0, negative=1.0,
                 augmentation="paper", image_threshold=None):
        op = "PatchSampler"
        patch = tuple(_number(op, "patch_size", p, 1, 4096, integer=True) for p in
                      ((patch_size,) * 3 if isinstance(patch_size, numbers.Integral) else patch_size))
        if len(patch) != 3:
            raise ValueError(f"{op}: patch_size must have 3 values, got {patch}")
        config = {
            "classes": _number(op, "classes", classes, 2, 256, integer=True),
            "sampler": {"patchSize": list(patch),
                        "samplesPerVolume": _number(op, "samples_per_volume", samples_per_volume, 1, 1024, integer=True),
                        "positive": _number(op, "positive", positive, 0),
                        "negative": _number(op, "negative", negative, 0)},
        }
        if image_threshold is not None:
            config["sampler"]["imageThreshold"] = _number(op, "image_threshold", image_threshold)
        if isinstance(augmentation, dict):
            config["augmentation"] = augmentation
        elif augmentation in AUGMENTATIONS:
            config["preset"] = AUGMENTATIONS[augmentation]
        else:
            raise ValueError(f"{op}: augmentation must be one of {', '.join(AUGMENTATIONS)} or a dict, got {augmentation!r}")
        self.patch_size = patch
        self.samples_per_volume = config["sampler"]["samplesPerVolume"]
        self.classes = config["classes"]
        self._handle = _C.sampler_create(json.dumps(config))
        self.channels = None
        self.count = 0

    def add(self, image, labels):
        """Adds a volume: image (C, X, Y, Z) or (X, Y, Z) float32, labels (X, Y, Z) integers in 0..classes-1.
        Returns its index."""
        op = "PatchSampler.add"
        image = np.asarray(image)
        if image.dtype != np.float32:
            raise TypeError(f"{op}: image must be float32, got {image.dtype}; use image.astype(np.float32)")
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4:
            raise ValueError(f"{op}: image must be (C, X, Y, Z) or (X, Y, Z), got shape {image.shape}")
        if self.channels is not None and image.shape[0] != self.channels:
            raise ValueError(f"{op}: every volume needs {self.channels} channels, got {image.shape[0]}")
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iub" or labels.shape != image.shape[1:]:
            raise ValueError(f"{op}: labels must be integers of shape {image.shape[1:]}, got {labels.dtype} {labels.shape}")
        index = _C.sampler_add(self._handle, np.ascontiguousarray(image), np.ascontiguousarray(labels, dtype=np.int32))
        self.channels = image.shape[0]
        self.count += 1
        return index

    def batch(self, indices, rng_state):
        """``samples_per_volume`` patches from each volume in ``indices``, drawn with the generator state
        ``rng_state`` (an int). Returns (images (N, C, *patch) float32, labels (N, *patch) int32, new state):
        the same state gives the same batch."""
        if self.channels is None:
            raise ValueError("PatchSampler.batch: no volume has been added")
        indices = [int(i) for i in indices]
        n = len(indices) * self.samples_per_volume
        images = np.empty((n, self.channels) + self.patch_size, np.float32)
        labels = np.empty((n,) + self.patch_size, np.int32)
        state = _C.sampler_batch(self._handle, indices, int(rng_state) & (2**64 - 1), images, labels)
        return images, labels, state
