"""Dice and HD95 (deformux.evaluate): the exact distance transform and the surface distances against
brute force on small volumes, against MONAI where it is installed, and the file-level evaluation."""
import math

import numpy as np
import pytest

from deformux import evaluate as ev
from deformux import nifti


def brute_distances(features, spacing):
    """The distance from every voxel to the nearest feature voxel, by checking every pair."""
    grid = np.argwhere(np.ones(features.shape, bool)) * np.asarray(spacing)
    points = np.argwhere(features) * np.asarray(spacing)
    if len(points) == 0:
        return np.full(features.shape, np.inf)
    return np.sqrt(((grid[:, None, :] - points[None]) ** 2).sum(-1)).min(1).reshape(features.shape)


def brute_surface(mask):
    """Voxels of the mask with a face neighbour outside it or outside the grid, one by one."""
    out = np.zeros_like(mask)
    for i, j, k in np.argwhere(mask):
        for d in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
            n = (i + d[0], j + d[1], k + d[2])
            if not all(0 <= n[a] < mask.shape[a] for a in range(3)) or not mask[n]:
                out[i, j, k] = True
                break
    return out


def brute_hd95(p, g, spacing):
    """Every surface voxel against every other surface voxel, float64 distances, numpy percentile."""
    if not (p.any() or g.any()):
        return math.nan
    if not (p.any() and g.any()):
        return math.inf
    sp, sg = np.argwhere(brute_surface(p)) * spacing, np.argwhere(brute_surface(g)) * spacing
    d = np.sqrt(((sp[:, None, :] - sg[None]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def random_masks(rng, shape):
    p = rng.random(shape) < rng.uniform(0.05, 0.5)
    g = rng.random(shape) < rng.uniform(0.05, 0.5)
    return p, g


def test_distance_transform_is_exact():
    """Against all pairs, on odd, anisotropic, sparse and dense grids, including 1 x 1 x 1 and empty."""
    rng = np.random.default_rng(0)
    cases = [((1, 1, 1), 0.5), ((7, 5, 3), 0.05), ((9, 1, 6), 0.2), ((4, 8, 5), 0.9), ((6, 6, 6), 0.0),
             ((10, 7, 9), 0.01)]
    for shape, density in cases:
        for spacing in ((1.0, 1.0, 1.0), tuple(rng.uniform(0.3, 3.0, 3))):
            features = rng.random(shape) < density
            got = ev.distance_transform_edt(features, spacing)
            want = brute_distances(features, spacing)
            if not features.any():
                assert np.all(np.isinf(got)), (shape, spacing)
                continue
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-9, err_msg=f"{shape} {spacing}")


def test_surface_is_the_face_neighbour_rule():
    rng = np.random.default_rng(1)
    for shape in ((1, 1, 1), (5, 4, 3), (8, 8, 8), (2, 9, 1)):
        mask = rng.random(shape) < 0.6
        np.testing.assert_array_equal(ev.surface(mask), brute_surface(mask), err_msg=str(shape))
    solid = np.zeros((5, 5, 5), bool)
    solid[1:4, 1:4, 1:4] = True
    assert ev.surface(solid).sum() == 26  # a 3^3 cube: all but its centre


def test_hausdorff_distance_against_brute_force():
    rng = np.random.default_rng(2)
    for trial in range(25):
        shape = tuple(int(n) for n in rng.integers(2, 12, 3))
        spacing = tuple(rng.uniform(0.5, 2.5, 3))
        p, g = random_masks(rng, shape)
        got, want = ev.hausdorff_distance(p, g, spacing), brute_hd95(p, g, np.asarray(spacing))
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6), (trial, shape, spacing)
    # The classic (maximum) Hausdorff distance of two points 3 voxels apart along a 2 mm axis.
    a, b = np.zeros((6, 6, 6), bool), np.zeros((6, 6, 6), bool)
    a[1, 2, 2], b[4, 2, 2] = True, True
    assert ev.hausdorff_distance(a, b, (2, 1, 1), percentile=None) == pytest.approx(6.0)
    assert math.isnan(ev.hausdorff_distance(np.zeros_like(a), np.zeros_like(a)))
    assert math.isinf(ev.hausdorff_distance(a, np.zeros_like(a)))
    assert ev.hausdorff_distance(a, a) == 0.0


def test_hausdorff_distance_against_monai():
    torch = pytest.importorskip("torch", reason="MONAI comparison")
    monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI is the reference of HD95")
    import warnings
    rng = np.random.default_rng(3)
    compared = 0
    for trial in range(30):
        shape = tuple(int(n) for n in rng.integers(3, 20, 3))
        spacing = [float(s) for s in rng.uniform(0.5, 2.5, 3)]
        p, g = random_masks(rng, shape)
        if not (p.any() and g.any()):
            continue  # one empty mask: MONAI's quantile of infinities is NaN, ours infinity (see evaluate.py)
        onehot = lambda m: torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))  # noqa: E731
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = float(monai_metrics.compute_hausdorff_distance(onehot(p), onehot(g), percentile=95,
                                                                  spacing=spacing)[0, 0])
        got = ev.hausdorff_distance(p, g, spacing)
        assert got == pytest.approx(want, rel=1e-5), (trial, shape, spacing)
        compared += 1
    assert compared >= 20


def test_dice_and_evaluate():
    pred = np.zeros((6, 5, 4), np.uint8)
    gt = np.zeros_like(pred)
    pred[1:4, 1:3, 1:3] = 1   # 12 voxels
    gt[2:5, 1:3, 1:3] = 1     # 12 voxels, 8 shared
    pred[5, 4, 3] = 2         # label 2 only in the prediction
    assert ev.dice(pred, gt, 1) == pytest.approx(2 * 8 / 24)
    assert ev.dice(pred, gt, 2) == 0.0
    assert math.isnan(ev.dice(pred, gt, 7))
    results = ev.evaluate(pred, gt, spacing=(1, 1, 2))
    assert sorted(results) == [1, 2]
    assert results[1]["pred_voxels"] == 12 and results[1]["gt_voxels"] == 12
    assert results[1]["hd95"] == pytest.approx(brute_hd95(pred == 1, gt == 1, np.array([1, 1, 2.0])))
    assert math.isinf(results[2]["hd95"])
    assert sorted(ev.evaluate(pred, gt, labels=[1], hd=False)[1]) == ["dice", "gt_voxels", "pred_voxels"]
    text = ev.format_table(results, names={1: "one"})
    assert "one" in text and "inf" in text and "mean" in text
    with pytest.raises(ValueError, match="shape"):
        ev.evaluate(pred, gt[:5])
    with pytest.raises(TypeError, match="integer"):
        ev.evaluate(pred.astype(np.float32), gt)
    with pytest.raises(ValueError, match="spacing"):
        ev.evaluate(pred, gt, spacing=(1, 0, 1))


def test_evaluate_files_uses_the_affine_spacing(tmp_path):
    rng = np.random.default_rng(4)
    pred = (rng.random((9, 8, 7)) < 0.4).astype(np.uint8) * 2
    gt = (rng.random((9, 8, 7)) < 0.4).astype(np.uint8) * 2
    affine = np.array([[0, 0, 3.0, 0], [1.5, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    nifti.save(tmp_path / "p.nii.gz", pred, affine)
    nifti.save(tmp_path / "g.nii", gt, affine)
    results, spacing = ev.evaluate_files(tmp_path / "p.nii.gz", tmp_path / "g.nii")
    assert spacing == pytest.approx((1.5, 2.0, 3.0))
    assert results[2]["hd95"] == pytest.approx(brute_hd95(pred == 2, gt == 2, np.array([1.5, 2.0, 3.0])))
    nifti.save(tmp_path / "shifted.nii", gt, affine + np.array([[0, 0, 0, 5.0]] + [[0] * 4] * 3))
    with pytest.raises(ValueError, match="affines"):
        ev.evaluate_files(tmp_path / "p.nii.gz", tmp_path / "shifted.nii")
    nifti.save(tmp_path / "small.nii", gt[:5], affine)
    with pytest.raises(ValueError, match="shape"):
        ev.evaluate_files(tmp_path / "p.nii.gz", tmp_path / "small.nii")
