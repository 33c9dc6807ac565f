"""Benchmarks through the Python package (the same engine as the Swift command line's).

``deformux bench segment``: a whole segmentation, the issue's benchmark: a 250 x 250 x 150 volume at
overlap 0.5 with the full-size network (random weights; 75 windows of 96^3). Prints the total time,
windows, seconds per window, the time outside the windows (preprocessing, blending, postprocessing,
reading and writing) and its share, and the peak RSS. ``--input`` segments a NIfTI file instead (the
bundled MNI152 with ``--input mni152``), ``--pad`` adds background around it, ``--skip-threshold`` lets
windows that hold only background be skipped (what the model card's skip_background does).

``deformux bench model``: one forward of the network at a cubic size (seconds, GFLOP/s, peak RSS).
"""
import json
import os
import resource
import time

import numpy as np

from . import get_num_threads, nifti
from .model import DeformUXNet

__all__ = ["bench_segment", "bench_model", "peak_rss_mb"]


def peak_rss_mb():
    """This process's peak resident set size in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _synthetic_volume(size, seed):
    """A head-like test volume (x, y, z) float32: a bright ellipsoid with noise on a dark background."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in size]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    r = x * x / 0.8 + y * y / 0.9 + z * z / 0.85
    volume = np.where(r < 1, 400 + 200 * np.cos(6 * r), 0).astype(np.float32)
    volume += rng.normal(0, 20, size=tuple(size)).astype(np.float32)
    return volume


def bench_segment(config, size=(250, 250, 150), overlap=0.5, window=(96, 96, 96), input_path=None, pad=0,
                  skip_threshold=None, output=None, seed=1, progress=True, log=print):
    """Runs one segmentation and prints its figures; returns them as a dict."""
    from .segment import Segmenter

    t_read = time.perf_counter()
    if input_path is not None:
        img = nifti.load(input_path)
        volume = img.array if img.array.ndim == 3 else img.array[0]
        affine = img.affine
        source = os.fspath(input_path)
    else:
        volume = _synthetic_volume(size, seed)
        affine = np.eye(4)
        source = "synthetic"
    if pad:
        volume = np.pad(volume, pad)
        affine = affine @ np.array([[1, 0, 0, -pad], [0, 1, 0, -pad], [0, 0, 1, -pad], [0, 0, 0, 1]], np.float64)
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    read_seconds = time.perf_counter() - t_read

    t_build = time.perf_counter()
    model = DeformUXNet(**config, seed=seed)
    card = {"config": model.config, "window": list(window) if window is not None else None, "overlap": overlap,
            "intensity": {"kind": "mr"}}
    if skip_threshold is not None:
        card["skip_background"] = {"threshold": float(skip_threshold)}
    segmenter = Segmenter(model, card=card)
    build_seconds = time.perf_counter() - t_build

    t0 = time.perf_counter()
    labels = segmenter.segment(volume, affine=affine, progress=progress)
    segment_seconds = time.perf_counter() - t0
    s = segmenter.statistics
    write_seconds = 0.0
    if output is not None:
        t_write = time.perf_counter()
        nifti.save(output, labels, affine, dtype=np.uint8)
        write_seconds = time.perf_counter() - t_write

    run = s["windows_run"]
    total = segment_seconds + read_seconds + write_seconds
    outside = total - s["predict_seconds"]
    figures = {
        "source": source, "image_size": list(volume.shape), "network_size": s["network_size"], "window": s["window"],
        "overlap": overlap, "threads": get_num_threads(), "parameters": model.num_parameters(),
        "windows": s["windows"], "windows_run": run, "windows_skipped": s["windows_skipped"],
        "total_seconds": total, "segment_seconds": segment_seconds, "predict_seconds": s["predict_seconds"],
        "seconds_per_window": s["predict_seconds"] / run if run else None,
        "outside_seconds": outside, "outside_share": outside / total if total > 0 else 0.0,
        "preprocess_seconds": s["preprocess_seconds"], "blend_seconds": s["blend_seconds"],
        "postprocess_seconds": s["postprocess_seconds"], "read_seconds": read_seconds, "write_seconds": write_seconds,
        "build_seconds": build_seconds, "peak_rss_mb": peak_rss_mb(),
        "accumulator_mb": s["accumulator_bytes"] / 2**20,
        "labels": {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))},
    }
    c = model.config
    log(f"deformux bench segment: {source} {' x '.join(map(str, volume.shape))}"
        f"{f' (padded by {pad})' if pad else ''}, window {s['window']}, overlap {overlap}, {figures['threads']} threads")
    log(f"  network           {c['block']} widths {c['feature_size']} hidden {c['hidden_size']}, "
        f"{c['out_channels']} classes, {figures['parameters']:,} parameters (random weights)")
    log(f"  network grid      {' x '.join(map(str, s['network_size']))}")
    log(f"  windows           {s['windows']} ({run} run, {s['windows_skipped']} skipped"
        f"{f' at threshold {skip_threshold:g}' if skip_threshold is not None else ''})")
    log(f"  total             {total:10.2f} s")
    if run:
        log(f"  in the network    {s['predict_seconds']:10.2f} s   ({figures['seconds_per_window']:.3f} s per window)")
    log(f"  outside windows   {outside:10.2f} s   ({100 * figures['outside_share']:.2f}% of the total): preprocess "
        f"{s['preprocess_seconds']:.2f}, blend {s['blend_seconds']:.2f}, postprocess {s['postprocess_seconds']:.2f}, "
        f"read {read_seconds:.2f}, write {write_seconds:.2f}")
    log(f"  accumulator       {figures['accumulator_mb']:10.1f} MB")
    log(f"  peak RSS          {figures['peak_rss_mb']:10.1f} MB")
    return figures


def bench_model(config, size=96, repeats=1, warmup=True, seed=1, log=print):
    """Times the network's forward at size^3 (median of `repeats`), prints seconds, GFLOP/s, peak RSS."""
    model = DeformUXNet(**config, seed=seed)
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, size=(1, config.get("in_channels", 1), size, size, size)).astype(np.float32)
    summary = model.summary((size, size, size))
    macs = None
    for line in summary.splitlines():
        if line.startswith("total"):
            macs = float(line.split()[-1]) * 1e9  # the summary's last column: G multiply-adds
    if warmup:
        model.forward(x)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        model.forward(x)
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    log(f"deformux bench model: {size}^3, batch 1, {get_num_threads()} threads")
    log(f"  parameters        {model.num_parameters():,}")
    log(f"  forward           {seconds:10.3f} s" + (f"   ({2 * macs / seconds / 1e9:.1f} GFLOP/s)" if macs else ""))
    log(f"  peak RSS          {peak_rss_mb():10.1f} MB")
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def dumps(figures):
    return json.dumps(figures, indent=2)

