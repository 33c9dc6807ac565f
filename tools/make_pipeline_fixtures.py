#!/usr/bin/env python3
"""Writes the inference pipeline's fixtures to Tests/Fixtures/pipeline/ (run from anywhere; needs numpy,
torch, monai and nibabel, the Swift tests that read the files do not).

Each file is JSON; float32 values are written as the exact decimal of their float64 widening, so a
reader that parses a Double and narrows it gets the float32 back bit for bit.

- windows.json      MONAI's window positions: for an image size, window and overlap per axis, the
                    padding sliding_window_inference adds (diff // 2 before), the scan interval and the
                    window starts in the padded frame, in MONAI's order (dense_patch_slices).
- importance.json   compute_importance_map(size, mode, sigma_scale) as float32, C order.
- blend.json        sliding_window_inference outputs for a predictor that is not translation
                    invariant (each output channel is its input plus the window's mean of that channel),
                    so the window positions, the importance map and the normalisation all show.
- percentile.json   numpy.percentile (method "linear") of float32 arrays at scalar q, as float32.
- orientation.json  nibabel: io_orientation of an affine, and as_closest_canonical's shape, affine and
                    data (of arange(prod(shape)) reshaped) for that affine.
- resample.json     torch.nn.functional.interpolate(mode="trilinear", align_corners=False) and
                    mode="nearest-exact", from one size to another.
"""
import json
import os

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures", "pipeline")


def f32list(a):
    return [float(v) for v in np.asarray(a, dtype=np.float32).ravel()]


def write(name, obj):
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, path)
    print("wrote", path, os.path.getsize(path), "bytes")


def windows():
    cases = []
    # (image size, window) per axis; each with every overlap below.
    sizes = [((13, 8, 5), (8, 8, 8)), ((96, 96, 96), (96, 96, 96)), ((250, 150, 97), (96, 96, 96)),
             ((17, 16, 1), (16, 16, 1)), ((100, 33, 7), (33, 32, 3)), ((7, 1, 2), (1, 1, 1)),
             ((3, 9, 31), (5, 4, 16)), ((256, 256, 160), (96, 96, 96))]
    overlaps = [0.0, 0.25, 0.5, 0.75, 0.1, 0.33, 0.9]
    for image, roi in sizes:
        for o in overlaps:
            padded = tuple(max(i, r) for i, r in zip(image, roi))
            pad_before = [max(r - i, 0) // 2 for i, r in zip(image, roi)]
            interval = _get_scan_interval(padded, roi, 3, (o, o, o))
            slices = dense_patch_slices(padded, roi, interval)
            starts = [[int(s.start) for s in sl] for sl in slices]
            per_axis = [sorted({s[a] for s in starts}) for a in range(3)]
            case = {"image": list(image), "window": list(roi), "overlap": o, "pad_before": pad_before,
                    "interval": [int(i) for i in interval], "axis_starts": per_axis, "count": len(starts)}
            if len(starts) <= 500:  # the full order (x slowest, z fastest) for the small cases
                case["starts"] = starts
            cases.append(case)
    write("windows.json", {"cases": cases})


def importance():
    cases = []
    for size, mode, sigma in [((1, 1, 1), "gaussian", 0.125), ((2, 3, 4), "gaussian", 0.125),
                              ((5, 5, 5), "gaussian", 0.125), ((8, 6, 7), "gaussian", 0.125),
                              ((16, 12, 7), "gaussian", 0.125), ((96, 2, 1), "gaussian", 0.125),
                              ((33, 1, 16), "gaussian", 0.125), ((9, 10, 11), "gaussian", 0.25),
                              ((12, 5, 3), "gaussian", 0.05), ((4, 3, 2), "constant", 0.125)]:
        m = compute_importance_map(size, mode=mode, sigma_scale=sigma, device="cpu", dtype=torch.float32)
        cases.append({"size": list(size), "mode": mode, "sigma_scale": sigma, "values": f32list(m.numpy())})
    write("importance.json", {"cases": cases})


def window_mean_predictor(x):
    # (B, C, w0, w1, w2) -> the same shape: x plus the mean of its window, per channel.
    return x + x.mean(dim=(2, 3, 4), keepdim=True)


def blend():
    cases = []
    rng = np.random.default_rng(8)
    specs = [((2, 9, 7, 5), (6, 4, 3), 0.0, "gaussian", 1), ((2, 9, 7, 5), (6, 4, 3), 0.25, "gaussian", 3),
             ((2, 9, 7, 5), (6, 4, 3), 0.5, "gaussian", 2), ((2, 9, 7, 5), (6, 4, 3), 0.75, "gaussian", 4),
             ((2, 9, 7, 5), (6, 4, 3), 0.5, "constant", 1), ((1, 6, 5, 4), (8, 4, 7), 0.5, "gaussian", 1),
             ((1, 6, 5, 4), (6, 5, 4), 0.25, "gaussian", 1), ((2, 5, 11, 4), (5, 4, 3), 0.75, "constant", 5),
             ((1, 17, 3, 6), (7, 3, 6), 0.33, "gaussian", 2)]
    for shape, roi, overlap, mode, batch in specs:
        x = rng.uniform(-1, 1, size=shape).astype(np.float32)
        with torch.no_grad():
            y = sliding_window_inference(torch.from_numpy(x)[None], roi, batch, window_mean_predictor,
                                         overlap=overlap, mode=mode, sigma_scale=0.125, cval=0.0)
        cases.append({"shape": list(shape), "window": list(roi), "overlap": overlap, "mode": mode,
                      "batch": batch, "input": f32list(x), "output": f32list(y[0].numpy())})
    write("blend.json", {"cases": cases})


def percentile():
    cases = []
    rng = np.random.default_rng(3)
    arrays = {
        "one": np.array([2.5], np.float32),
        "two": np.array([-1.0, 3.0], np.float32),
        "three_ties": np.array([1.0, 1.0, 7.0], np.float32),
        "small": rng.normal(size=10).astype(np.float32),
        "ties": rng.integers(-3, 4, size=257).astype(np.float32),
        "wide": (rng.normal(size=1001) * 1000).astype(np.float32),
        "with_zeros": np.where(rng.uniform(size=500) < 0.6, 0, rng.uniform(-100, 1000, size=500)).astype(np.float32),
    }
    qs = [0.0, 0.5, 1.0, 2.5, 37.3, 50.0, 62.5, 99.0, 99.9, 100.0]
    for name, a in arrays.items():
        nz = a[a != 0]
        cases.append({"name": name, "values": f32list(a), "q": qs,
                      "all": [float(np.percentile(a, q)) for q in qs],
                      "nonzero": [float(np.percentile(nz, q)) for q in qs] if nz.size else None})
        assert np.percentile(a, 37.3).dtype == np.float32
    write("percentile.json", {"cases": cases})


def rotation(axis, degrees):
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def orientation():
    cases = []
    rng = np.random.default_rng(5)
    shape = (4, 3, 5)
    mats = {
        "identity": np.eye(3),
        "lps": np.diag([-1.0, -1.0, 1.0]),
        "anisotropic_las": np.diag([-0.7, 1.2, 3.0]),
        "permuted_zxy": np.array([[0, 1.0, 0], [0, 0, 2.0], [1.5, 0, 0]]),
        "permuted_flipped": np.array([[0, 0, -1.0], [-0.9, 0, 0], [0, 1.1, 0]]),
        "oblique_20": rotation(2, 20) @ np.diag([1.0, 1.0, 2.5]),
        "oblique_40_flip": rotation(0, 40) @ rotation(1, -30) @ np.diag([-1.0, 0.8, 1.3]),
        "oblique_70": rotation(1, 70) @ np.diag([0.5, 0.5, 0.5]),
        "sheared": np.array([[1.0, 0.3, 0.0], [0.1, -1.0, 0.2], [0.0, 0.4, 2.0]]),
        "near45": rotation(2, 44.0) @ np.diag([1.0, 1.0, 1.0]),
    }
    for k in range(4):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        mats[f"random_{k}"] = q @ np.diag(rng.uniform(0.4, 3.0, size=3))
    for name, m in mats.items():
        aff = np.eye(4)
        aff[:3, :3] = m
        aff[:3, 3] = rng.uniform(-100, 100, size=3)
        data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        img = nib.Nifti1Image(data, aff)
        can = nib.as_closest_canonical(img)
        ornt = nib.orientations.io_orientation(aff)
        cases.append({"name": name, "affine": [float(v) for v in aff.ravel()], "shape": list(shape),
                      "ornt": [[int(a), int(f)] for a, f in ornt],
                      "canonical_shape": list(can.shape),
                      "canonical_affine": [float(v) for v in can.affine.ravel()],
                      "canonical_data": f32list(np.asarray(can.dataobj))})
    write("orientation.json", {"cases": cases})


def resample():
    cases = []
    rng = np.random.default_rng(11)
    for src, dst in [((5, 4, 3), (7, 9, 2)), ((6, 6, 6), (3, 3, 3)), ((4, 5, 6), (12, 15, 18)),
                     ((7, 1, 3), (3, 2, 5)), ((3, 3, 3), (3, 3, 3)), ((9, 2, 4), (4, 7, 4))]:
        x = rng.uniform(-5, 5, size=src).astype(np.float32)
        labels = rng.integers(0, 6, size=src).astype(np.float32)
        with torch.no_grad():
            lin = F.interpolate(torch.from_numpy(x)[None, None], size=dst, mode="trilinear", align_corners=False)
            near = F.interpolate(torch.from_numpy(labels)[None, None], size=dst, mode="nearest-exact")
        cases.append({"from": list(src), "to": list(dst), "input": f32list(x), "trilinear": f32list(lin[0, 0]),
                      "labels": f32list(labels), "nearest": f32list(near[0, 0])})
    write("resample.json", {"cases": cases})


if __name__ == "__main__":
    windows()
    importance()
    blend()
    percentile()
    orientation()
    resample()
