"""Losses on NumPy arrays, computed by the engine (Sources/DeformUX/Training/DiceCELoss.swift).

    loss, grad_logits = deformux.losses.dice_ce(logits, labels)

``dice_ce`` is exactly MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` with its defaults:
softmax over classes, one-hot labels, background included, Dice per (sample, class) as
``1 - (2 I + 1e-5) / (P + G + 1e-5)`` averaged, plus cross-entropy averaged over voxels, weights 1 and 1.
"""
import numpy as np

from . import _C

__all__ = ["dice_ce"]


def dice_ce(logits, labels, class_weights=None, return_parts=False):
    """The Dice + cross-entropy loss of ``logits`` (N, C, D, H, W) float32 against ``labels`` (N, D, H, W)
    of any integer dtype (class indices 0..C-1), and its gradient with respect to the logits.

    ``class_weights`` (C floats, optional) weight both terms as MONAI's ``weight`` does. Returns
    ``(loss, grad_logits)`` (a float and a float32 array shaped like the logits), or with
    ``return_parts=True`` ``((loss, dice, cross_entropy), grad_logits)``.

    Raises TypeError for non-float32 logits or non-integer labels, ValueError for mismatched shapes,
    C < 2, or a label outside 0..C-1 (the message names the first one and where it is).
    """
    op = "dice_ce"
    if not isinstance(logits, np.ndarray) or logits.dtype != np.float32:
        raise TypeError(f"{op}: logits must be a float32 numpy array, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}; use logits.astype(np.float32)")
    if logits.ndim != 5:
        raise ValueError(f"{op}: logits must have shape (N, C, D, H, W), got {logits.shape}")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        raise TypeError(f"{op}: labels must be integers (class indices), got dtype {labels.dtype}")
    want = (logits.shape[0],) + logits.shape[2:]
    if labels.shape != want:
        raise ValueError(f"{op}: labels must have shape (N, D, H, W) = {want}, got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise ValueError(f"{op}: labels must be class indices in 0..{logits.shape[1] - 1}, got {bad}")
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    logits = np.ascontiguousarray(logits)
    if class_weights is not None:
        class_weights = np.ascontiguousarray(class_weights, dtype=np.float32)
        if class_weights.shape != (logits.shape[1],):
            raise ValueError(f"{op}: class_weights must have one value per class ({logits.shape[1]}), "
                             f"got shape {class_weights.shape}")
    grad = np.empty_like(logits)
    parts = _C.dice_ce(logits, labels, class_weights, grad)
    return (parts if return_parts else parts[0]), grad
