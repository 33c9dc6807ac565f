"""The demo job: a deformable resampling of the bundled MNI152 T1 with the DDC operator.

The DDC samples x at p = o - 1 + (i, j, k) + delta for each of its 27 taps. With the same displacement
delta(o) on every tap, and weights that form a normalised 3x3x3 smoothing kernel, it computes
"smooth, then warp by delta". Here delta is a rotation by `angle` degrees about the D axis (the
volume's x axis, left-right) through the volume centre, so the output is the T1 tilted in the y-z
(sagittal) plane and lightly smoothed.

The offsets of the whole MNI volume would be 81 x 197 x 233 x 189 floats (2.8 GB), so the volume is
processed in slabs along D. A rotation about D moves nothing along D, so a slab plus a halo of
2 slices on each side gives exactly the voxels the whole-volume operator would read.
"""
import numbers
import os
import re
import time
from importlib import resources
from pathlib import Path

import numpy as np

from . import get_num_threads, nifti, ops

T1_NAME = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
HALO = 2  # slices of D read beyond each slab: taps reach 1 voxel, trilinear neighbours 1 more


def bundled_t1_path():
    """The bundled MNI152 T1: package data of an installed package, else the repository's data/."""
    packaged = resources.files("deformux") / "data" / "mni152" / T1_NAME
    if packaged.is_file():
        return Path(str(packaged))
    repo = Path(__file__).resolve().parents[2] / "data" / "mni152" / T1_NAME  # editable install
    if repo.is_file():
        return repo
    raise FileNotFoundError(f"the bundled MNI152 T1 ({T1_NAME}) is missing from {packaged} and {repo}; "
                            "reinstall deformux or pass --input")


def smoothing_weight(channels):
    """(C, 1, 3, 3, 3): the separable [1, 2, 1] / 4 kernel on each axis, summing to 1."""
    k = np.array([1.0, 2.0, 1.0]) / 4.0
    kernel = np.einsum("i,j,k->ijk", k, k, k).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(kernel, (channels, 1, 3, 3, 3)))


def rotation_offsets(d, h, w, angle_deg):
    """(1, 81, d, h, w) offsets: the displacement of a rotation about the D axis through the centre of
    the H x W plane, the same on every tap (channel 3*t + a; a = 0 D stays 0)."""
    theta = np.deg2rad(angle_deg)
    ch, cw = (h - 1) / 2.0, (w - 1) / 2.0
    hh, ww = np.meshgrid(np.arange(h, dtype=np.float64) - ch, np.arange(w, dtype=np.float64) - cw,
                         indexing="ij")
    dh = np.cos(theta) * hh - np.sin(theta) * ww - hh
    dw = np.sin(theta) * hh + np.cos(theta) * ww - ww
    offsets = np.zeros((1, ops.OFFSET_CHANNELS, d, h, w), dtype=np.float32)
    offsets[0, 1::3] = dh.astype(np.float32)
    offsets[0, 2::3] = dw.astype(np.float32)
    return offsets


def deform_volume(volume, angle_deg=10.0, slab=16):
    """Runs the DDC over a 3D float32 volume [D][H][W] slab by slab. Returns (output, engine seconds)."""
    d, h, w = volume.shape
    weight = smoothing_weight(1)
    out = np.empty_like(volume)
    engine_seconds = 0.0
    cached = {}
    for z0 in range(0, d, slab):
        z1 = min(d, z0 + slab)
        lo, hi = max(0, z0 - HALO), min(d, z1 + HALO)
        x = np.ascontiguousarray(volume[lo:hi])[None, None]  # (1, 1, slices, H, W)
        offsets = cached.get(hi - lo)
        if offsets is None:  # the displacement does not depend on D: one array per slab thickness
            offsets = cached[hi - lo] = rotation_offsets(hi - lo, h, w, angle_deg)
        start = time.perf_counter()
        y = ops.deform_conv3d(x, offsets, weight)
        engine_seconds += time.perf_counter() - start
        out[z0:z1] = y[0, 0, z0 - lo:z1 - lo]
    return out, engine_seconds


def run(input_path=None, output_path="out/demo_ddc.nii.gz", angle=10.0, slab=16, log=print):
    """The demo job. Paths are str, bytes or os.PathLike; `slab` an int or NumPy integer. Returns a dict
    summary (also printed through `log`)."""
    if isinstance(slab, bool) or not isinstance(slab, numbers.Integral):
        raise TypeError(f"demo: --slab must be an int, got {type(slab).__name__}")
    slab = int(slab)
    if slab < 1:
        raise ValueError(f"demo: --slab must be >= 1, got {slab}")
    input_path = Path(os.fsdecode(input_path)) if input_path else bundled_t1_path()
    output_path = os.fsdecode(output_path)
    start = time.perf_counter()
    img = nifti.load(input_path)
    data = img.array  # float32 [x][y][z]; a 4-D file is (t, x, y, z)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise ValueError(f"demo: {input_path} must be a 3D volume, got shape {img.shape}")
    lo, hi = float(data.min()), float(data.max())
    scaled = (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)
    scaled = np.ascontiguousarray(scaled, dtype=np.float32)

    out, engine_seconds = deform_volume(scaled, angle_deg=angle, slab=slab)
    if not np.all(np.isfinite(out)):
        raise RuntimeError("demo: the DDC output has non-finite values")
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    nifti.save(output_path, out, img.affine, header=img, description=f"deformux demo: DDC rotation {angle:g} deg")
    total_seconds = time.perf_counter() - start
    corr = float(np.corrcoef(scaled.ravel(), out.ravel())[0, 1])
    summary = {
        "input": str(input_path), "output": os.path.abspath(output_path), "shape": tuple(scaled.shape),
        "angle_deg": angle, "threads": get_num_threads(), "ddc_ms": engine_seconds * 1000.0,
        "total_ms": total_seconds * 1000.0, "correlation": corr,
        "output_range": (float(out.min()), float(out.max())),
    }
    log(f"deformux demo: DDC deformable resampling (rotation {angle:g} deg about the x axis + 3x3x3 smoothing)")
    log(f"  input        {summary['input']}")
    log(f"  shape        {' x '.join(map(str, summary['shape']))} voxels")
    log(f"  threads      {summary['threads']}")
    log(f"  DDC time     {summary['ddc_ms']:.1f} ms ({summary['total_ms']:.0f} ms with reading and writing)")
    log(f"  output range {summary['output_range'][0]:.4f} .. {summary['output_range'][1]:.4f}")
    log(f"  correlation  {corr:.4f} (input vs output)")
    log(f"  output       {summary['output']}")
    return summary


# ---- the segmentation demo (runs once a model is given or the default model is bundled) ----

def default_model_available():
    """Whether the package bundles its default model (deformux/models/<DEFAULT_MODEL>.json)."""
    from .segment import default_model_path
    return default_model_path().is_file()


def run_segmentation(input_path=None, output_path="out/demo_labels.nii.gz", model=None, png=None, progress=True,
                     log=print, tta=None):
    """Segments the bundled MNI152 T1 (or `input_path`) with `model` (default: the bundled model), writes
    the labels (NIfTI) and a PNG of three orthogonal slices with the labels overlaid, and prints the
    per-class Dice against the bundled reference labels (whole volume and the validation slab) when the
    input is the bundled T1. tta: True / False override the card's flip test-time augmentation. Returns a
    dict summary."""
    from . import data, evaluate, figures
    from .segment import Segmenter

    input_path = Path(os.fsdecode(input_path)) if input_path else data.mni152_path("t1")
    output_path = os.fsdecode(output_path)
    png = os.fsdecode(png) if png else re.sub(r"\.nii(\.gz)?$", "", output_path) + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(output_path)) or ".", exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(png)) or ".", exist_ok=True)
    start = time.perf_counter()
    segmenter = Segmenter(model, tta=tta)
    result = segmenter.segment(input_path, output=output_path, progress=progress)
    labels = result.array
    image = nifti.load(input_path)
    figures.overlay_png(png, image.array if image.array.ndim == 3 else image.array[0], labels, image.affine)
    stats = segmenter.statistics
    summary = {"input": str(input_path), "output": os.path.abspath(output_path), "png": os.path.abspath(png),
               "model": segmenter.card.name, "classes": segmenter.classes, "windows": stats["windows"],
               "windows_run": stats["windows_run"], "seconds": time.perf_counter() - start, "dice": None}
    log(f"deformux demo: segmentation of {input_path.name} with model {segmenter.card.name!r}")
    log(f"  shape        {' x '.join(map(str, labels.shape))} voxels, threads {get_num_threads()}")
    log(f"  windows      {stats['windows_run']} of {stats['windows']} run, {stats['total_seconds']:.1f} s "
        f"({summary['seconds']:.1f} s with reading and writing)")
    if Path(input_path) == data.mni152_path("t1"):
        mni = data.mni152()
        _, validation = mni.split()
        whole = evaluate.evaluate(labels, mni.labels, labels=[1, 2, 3], hd=False)
        held_out = evaluate.evaluate(np.where(validation, labels, 0), np.where(validation, mni.labels, 0),
                                     labels=[1, 2, 3], hd=False)
        summary["dice"] = {mni.classes[k]: {"volume": whole[k]["dice"], "validation": held_out[k]["dice"]}
                           for k in (1, 2, 3)}
        log("  Dice vs the bundled reference labels (volume / validation slab z 68..123):")
        for name, d in summary["dice"].items():
            log(f"    {name:<14} {d['volume']:.4f} / {d['validation']:.4f}")
    log(f"  labels       {summary['output']}")
    log(f"  overlay      {summary['png']}")
    return summary
