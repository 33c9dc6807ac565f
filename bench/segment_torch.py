#!/usr/bin/env python3
"""PyTorch reference timing for a whole segmentation: the network of tools/reference_model.py (the DDC via
grid_sample) run over a volume with MONAI-style sliding windows (monai.inferers.sliding_window_inference
with gaussian blending when MONAI is installed, else the same rule written out here), the same synthetic
volume and preprocessing as `deformux bench segment` (MR percentiles over non-zero voxels, centred padding
to a multiple of 16). Prints total time, windows, seconds per window, the time outside the windows and its
share, and the peak RSS. Skips cleanly without torch.

    python3 bench/segment_torch.py [--size 250,250,150] [--overlap 0.5] [--window 96] [--threads 2]
                                   [--feature-size 48,96,192,384] [--hidden-size 768] [--out-channels 16]
                                   [--compare]

The full default (75 windows of 96^3) takes about 18 minutes on 2 cores. --compare (small networks)
copies the weights of a deformux network built with the same seed into the PyTorch model and reports how
many labels deformux.segment gives differently (needs the deformux package).
"""
import argparse
import os
import resource
import sys
import time

import numpy as np


def synthetic_volume(size, seed=1):
    """deformux.bench._synthetic_volume: a bright ellipsoid with noise on a dark background."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in size]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    r = x * x / 0.8 + y * y / 0.9 + z * z / 0.85
    volume = np.where(r < 1, 400 + 200 * np.cos(6 * r), 0).astype(np.float32)
    volume += rng.normal(0, 20, size=tuple(size)).astype(np.float32)
    return volume


def preprocess(volume, multiple=16, minimum=(96, 96, 96)):
    """MR preset ((x - P1) / (P99 - P1), percentiles over non-zero voxels), then centred zero padding to
    max(n, window) rounded up to `multiple`. Returns the padded array and the crop that undoes it."""
    nonzero = volume[volume != 0]
    lo, hi = np.percentile(nonzero if nonzero.size else volume, [1, 99]).astype(np.float32)
    x = (volume - lo) / (hi - lo) if hi > lo else volume - lo
    target = [-(-max(n, m) // multiple) * multiple for n, m in zip(volume.shape, minimum)]
    before = [(t - n) // 2 for t, n in zip(target, volume.shape)]
    padded = np.zeros(target, np.float32)
    crop = tuple(slice(b, b + n) for b, n in zip(before, volume.shape))
    padded[crop] = x
    return padded, crop


def sliding_window(torch, x, window, overlap, predictor, classes):
    """MONAI 1.x sliding_window_inference (gaussian, sigma 0.125 w, importance clamped at 1e-3), written
    out: window starts with scan interval int(w * (1 - overlap)), the last flush with the end."""
    size = x.shape[2:]

    def starts(n, w):
        interval = w if n == w else max(int(w * (1 - overlap)), 1)
        out, d = [], 0
        while True:
            s = d * interval
            out.append(s - max(s + w - n, 0))
            if s + w >= n:
                return out
            d += 1

    gauss = []
    for w in window:
        sigma = 0.125 * w
        t = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
        gauss.append(torch.exp(t * t / (-2 * sigma * sigma)))
    importance = gauss[0][:, None, None] * gauss[1][None, :, None] * gauss[2][None, None, :]
    importance = torch.clamp(importance, min=max(float(importance.min()), 1e-3))
    out = torch.zeros((1, classes) + tuple(size))
    count = torch.zeros((1, 1) + tuple(size))
    for a in starts(size[0], window[0]):
        for b in starts(size[1], window[1]):
            for c in starts(size[2], window[2]):
                sl = (slice(None), slice(None), slice(a, a + window[0]), slice(b, b + window[1]), slice(c, c + window[2]))
                out[sl] += predictor(x[sl]) * importance
                count[sl] += importance
    return out / count


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="250,250,150")
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--window", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--feature-size", default="48,96,192,384")
    ap.add_argument("--hidden-size", type=int, default=768)
    ap.add_argument("--out-channels", type=int, default=16)
    ap.add_argument("--no-monai", action="store_true", help="use the sliding window written out here")
    ap.add_argument("--compare", action="store_true", help="same weights as deformux; count differing labels")
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("segment_torch: torch is not installed; skipped")
        return 0
    monai_swi = None
    if not a.no_monai:
        try:
            from monai.inferers import sliding_window_inference as monai_swi
        except ImportError:
            monai_swi = None
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
    from reference_model import DeformUXNet

    torch.set_num_threads(a.threads)
    size = [int(v) for v in a.size.split(",")]
    features = tuple(int(v) for v in a.feature_size.split(","))
    window = (a.window,) * 3
    torch.manual_seed(0)
    net = DeformUXNet(in_chans=1, out_chans=a.out_channels, feature_size=features, hidden_size=a.hidden_size).eval()
    if a.compare:
        import deformux
        engine = deformux.DeformUXNet(out_channels=a.out_channels, feature_size=features, hidden_size=a.hidden_size,
                                      seed=1)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in engine.state_dict().items()})

    t0 = time.perf_counter()
    volume = synthetic_volume(size)
    padded, crop = preprocess(volume, minimum=window)
    x = torch.from_numpy(padded)[None, None]
    inside = [0.0, 0]

    def predictor(batch):
        t = time.perf_counter()
        with torch.no_grad():
            y = net(batch)
        inside[0] += time.perf_counter() - t
        inside[1] += batch.shape[0]
        return y

    with torch.no_grad():
        if monai_swi is not None:
            logits = monai_swi(x, window, 1, predictor, overlap=a.overlap, mode="gaussian")
        else:
            logits = sliding_window(torch, x, window, a.overlap, predictor, a.out_channels)
    labels = torch.argmax(logits[0], dim=0).numpy().astype(np.uint8)[crop]
    total = time.perf_counter() - t0
    outside = total - inside[0]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch {torch.__version__} reference segmentation: synthetic {' x '.join(map(str, size))}, window {a.window}^3, "
          f"overlap {a.overlap}, {a.threads} threads, {'MONAI sliding_window_inference' if monai_swi else 'sliding window written out'}")
    print(f"  network           widths {list(features)} hidden {a.hidden_size}, {a.out_channels} classes")
    print(f"  windows           {inside[1]}")
    print(f"  total             {total:10.2f} s")
    print(f"  in the network    {inside[0]:10.2f} s   ({inside[0] / max(inside[1], 1):.3f} s per window)")
    print(f"  outside windows   {outside:10.2f} s   ({100 * outside / total:.2f}% of the total)")
    print(f"  peak RSS          {rss:10.1f} MB")
    if a.compare:
        ours = deformux.segment(volume, engine, window=a.window, overlap=a.overlap, spacing=1, progress=False)
        differ = int((ours != labels).sum())
        counts = np.bincount(labels.ravel(), minlength=a.out_channels).tolist()
        print(f"  deformux labels   {differ} of {labels.size} voxels differ ({100 * differ / labels.size:.4f}%); "
              f"voxels per label here {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
