"""Segmentation metrics: per-class Dice and the 95th-percentile Hausdorff distance (HD95) in mm.

    results = deformux.evaluate.evaluate(pred, gt, spacing=(1, 1, 1.5))    # label arrays on one grid
    results = deformux.evaluate.evaluate_files("pred.nii.gz", "gt.nii.gz")  # spacing from the affine
    results[1]["dice"], results[1]["hd95"]

Definitions (NumPy only; scipy is not needed):
- Dice of label c: 2 |P & G| / (|P| + |G|) with P = (pred == c), G = (gt == c); NaN when both are empty.
- HD95 of label c as MONAI 1.6's ``compute_hausdorff_distance(percentile=95)`` (euclidean, symmetric,
  spacing from the affine): the surface of a mask is its voxels with a 6-neighbour outside the mask (or
  outside the grid); for every surface voxel of P the distance in mm to the nearest surface voxel of G,
  and the other way round; HD95 is the larger of the two directions' 95th percentiles (linear
  interpolation, as torch.quantile and numpy.percentile). NaN when both masks are empty, infinity when
  exactly one is (MONAI returns NaN there too: torch.quantile interpolates between infinities; its
  maximum, percentile=None, is infinity as here).
- Distances come from an exact Euclidean distance transform (Felzenszwalb & Huttenlocher, "Distance
  Transforms of Sampled Functions", Theory of Computing 8, 2012: the lower envelope of parabolas, one
  axis at a time, with the voxel spacing), computed on the bounding box of P | G plus a margin of one
  voxel (exact: every surface voxel of both masks lies inside it).
"""
import math

import numpy as np

__all__ = ["dice", "hausdorff_distance", "evaluate", "evaluate_files", "surface", "distance_transform_edt",
           "format_table"]


def _squared_distances_1d(f, step):
    """For each row of f (L x n, float64 squared distances, inf where there is nothing):
    d[i] = min_j f[j] + (step * (i - j))^2, by the lower envelope of parabolas (Felzenszwalb-Huttenlocher),
    vectorised over the rows: the envelope of every row is advanced one column at a time."""
    rows_count, n = f.shape
    pos = np.arange(n, dtype=np.float64) * step
    pos2 = pos * pos
    v = np.zeros((rows_count, n), np.int64)          # columns of the envelope's parabolas
    z = np.full((rows_count, n + 1), np.inf)          # boundaries between them
    z[:, 0] = -np.inf
    k = np.full(rows_count, -1, np.int64)             # index of the last parabola, -1: none yet
    rows = np.arange(rows_count)

    def intersection(r, kk, q):
        vk = v[r, kk]
        return ((f[r, q] + pos2[q]) - (f[r, vk] + pos2[vk])) / (2.0 * (pos[q] - pos[vk]))

    for q in range(n):
        active = np.isfinite(f[:, q])
        if not active.any():
            continue
        first = active & (k < 0)
        if first.any():
            k[first] = 0
            v[first, 0] = q
        r = rows[active & ~first]
        if r.size == 0:
            continue
        kk = k[r].copy()
        s = intersection(r, kk, q)
        pop = np.nonzero(s <= z[r, kk])[0]
        while pop.size:
            # z[r, 0] is -inf, so kk never drops below 0
            kk[pop] -= 1
            s[pop] = intersection(r[pop], kk[pop], q)
            pop = pop[s[pop] <= z[r[pop], kk[pop]]]
        kk += 1
        v[r, kk] = q
        z[r, kk] = s
        z[r, kk + 1] = np.inf
        k[r] = kk

    out = np.empty_like(f)
    kk = np.zeros(rows_count, np.int64)
    for q in range(n):
        adv = np.nonzero(z[rows, kk + 1] < pos[q])[0]
        while adv.size:
            kk[adv] += 1
            adv = adv[z[adv, kk[adv] + 1] < pos[q]]
        vq = v[rows, kk]
        out[:, q] = (pos[q] - pos[vq]) ** 2 + f[rows, vq]   # rows without features: f is inf, so inf
    return out


def distance_transform_edt(features, spacing=(1.0, 1.0, 1.0)):
    """The Euclidean distance (float64, in the units of `spacing`) from every voxel of a 3-D grid to the
    nearest True voxel of `features`; infinity everywhere if there is none. (scipy's
    ``distance_transform_edt(~features, sampling=spacing)``.)"""
    features = np.asarray(features, dtype=bool)
    if features.ndim != 3:
        raise ValueError(f"distance_transform_edt: features must be 3-D, got shape {features.shape}")
    spacing = [float(s) for s in spacing]
    d = np.where(features, 0.0, np.inf)
    for axis in range(3):
        moved = np.ascontiguousarray(np.moveaxis(d, axis, -1))
        shape = moved.shape
        moved = _squared_distances_1d(moved.reshape(-1, shape[-1]), spacing[axis]).reshape(shape)
        d = np.moveaxis(moved, -1, axis)
    return np.sqrt(d)


def surface(mask):
    """The voxels of `mask` with at least one of their 6 face neighbours outside the mask or the grid
    (MONAI's edges: mask XOR binary_erosion(mask), the grid's outside counting as background)."""
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    core = m[1:-1, 1:-1, 1:-1]
    eroded = core.copy()
    for axis in range(3):
        for shift in (-1, 1):
            sl = [slice(1, -1)] * 3
            sl[axis] = slice(1 + shift, m.shape[axis] - 1 + shift)
            eroded &= m[tuple(sl)]
    return core & ~eroded


def _percentile(distances, q):
    # float32 distances, as MONAI hands them to torch.quantile (linear interpolation)
    return float(np.percentile(distances.astype(np.float32), q))


def hausdorff_distance(pred, gt, spacing=(1.0, 1.0, 1.0), percentile=95.0):
    """The symmetric percentile Hausdorff distance between two boolean masks (mm); see the module text.
    percentile=None gives the maximum (the classic Hausdorff distance)."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"hausdorff_distance: masks must be 3-D of one shape, got {p.shape} and {g.shape}")
    union = p | g
    if not union.any():
        return math.nan
    if not p.any() or not g.any():
        return math.inf
    # The bounding box of both masks plus one voxel (every surface voxel lies inside it).
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.nonzero(union.any(axis=other))[0]
        box.append(slice(max(hit[0] - 1, 0), hit[-1] + 2))
    box = tuple(box)
    ep, eg = surface(p[box]), surface(g[box])
    to_g = distance_transform_edt(eg, spacing)[ep]
    to_p = distance_transform_edt(ep, spacing)[eg]
    if percentile is None:
        return float(max(to_g.max(), to_p.max()))
    return max(_percentile(to_g, percentile), _percentile(to_p, percentile))


def dice(pred, gt, label):
    """Dice of one label (NaN when neither array has it)."""
    p, g = np.asarray(pred) == label, np.asarray(gt) == label
    total = int(p.sum()) + int(g.sum())
    return math.nan if total == 0 else 2.0 * int((p & g).sum()) / total


def _labels(pred, gt, labels):
    if labels is not None:
        return [int(l) for l in labels]
    present = np.union1d(np.unique(pred), np.unique(gt))
    return [int(l) for l in present if l != 0]


def evaluate(pred, gt, *, labels=None, spacing=(1.0, 1.0, 1.0), hd=True, percentile=95.0):
    """Per-label metrics of two integer label arrays on one grid: {label: {"dice", "hd95", "pred_voxels",
    "gt_voxels"}}. labels: which to report (default: every non-zero label in either array); spacing:
    mm per axis (for HD95); hd=False skips the distances."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"evaluate: prediction and reference must have one shape, got {pred.shape} and {gt.shape}")
    if pred.ndim != 3:
        raise ValueError(f"evaluate: label maps must be 3-D, got shape {pred.shape}")
    for name, a in (("prediction", pred), ("reference", gt)):
        if a.dtype.kind not in "biu":
            raise TypeError(f"evaluate: the {name} must hold integer labels, got dtype {a.dtype}")
    s = np.asarray(spacing, dtype=np.float64)
    if s.shape != (3,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"evaluate: spacing must be three sizes > 0, got {spacing!r}")
    results = {}
    for label in _labels(pred, gt, labels):
        p, g = pred == label, gt == label
        entry = {"dice": dice(pred, gt, label), "pred_voxels": int(p.sum()), "gt_voxels": int(g.sum())}
        if hd:
            entry["hd95"] = hausdorff_distance(p, g, tuple(s), percentile)
        results[label] = entry
    return results


def evaluate_files(pred_path, gt_path, *, labels=None, hd=True, atol=1e-3):
    """evaluate() on two NIfTI label maps (read as exact integers), with the spacing of the reference's
    affine. The grids must agree: same shape, affines equal to `atol` mm."""
    from . import nifti

    pred, gt = nifti.load(pred_path, dtype="int32"), nifti.load(gt_path, dtype="int32")
    if pred.array.shape != gt.array.shape:
        raise ValueError(f"evaluate: {pred_path} has shape {pred.array.shape}, {gt_path} has {gt.array.shape}; "
                         f"the label maps must be on one grid")
    if not np.allclose(pred.affine, gt.affine, atol=atol, rtol=0):
        raise ValueError(f"evaluate: the affines of {pred_path} and {gt_path} differ (by up to "
                         f"{np.abs(pred.affine - gt.affine).max():.3g} mm); the label maps must be on one grid")
    spacing = np.sqrt((gt.affine[:3, :3] ** 2).sum(axis=0))
    return evaluate(pred.array, gt.array, labels=labels, spacing=tuple(spacing), hd=hd), tuple(float(x) for x in spacing)


def format_table(results, names=None):
    """The results as a text table (one row per label, then the mean over labels with finite values)."""
    lines = [f"{'label':>5}  {'name':<16} {'Dice':>7} {'HD95 mm':>9} {'pred vox':>10} {'ref vox':>10}"]

    def number(x, digits):
        return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else (
            "inf" if isinstance(x, float) and math.isinf(x) else f"{x:.{digits}f}")

    for label, r in results.items():
        name = (names or {}).get(label, "")
        lines.append(f"{label:>5}  {name:<16} {number(r['dice'], 4):>7} {number(r.get('hd95'), 2):>9} "
                     f"{r['pred_voxels']:>10} {r['gt_voxels']:>10}")
    dices = [r["dice"] for r in results.values() if math.isfinite(r["dice"])]
    hds = [r["hd95"] for r in results.values() if "hd95" in r and math.isfinite(r["hd95"])]
    if results:
        lines.append(f"{'mean':>5}  {'':<16} {number(float(np.mean(dices)) if dices else math.nan, 4):>7} "
                     f"{number(float(np.mean(hds)) if hds else math.nan, 2):>9}")
    return "\n".join(lines)
