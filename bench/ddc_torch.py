#!/usr/bin/env python3
"""PyTorch reference timing for one DDC layer (ARCHITECTURE.md section 3) via grid_sample, the way
naive implementations run it: batch 1, C 48, 48^3, float32, 2 threads, random offsets in [-2.5, 2.5].
Prints forward and forward+backward, median of 3 after one warm-up, in ms. Skips cleanly without torch.

    python3 bench/ddc_torch.py [--size 48] [--channels 48] [--threads 2] [--repeats 3]
"""
import argparse
import os
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--channels", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("ddc_torch: torch is not installed; skipped")
        return 0
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
    from ddc_torch_impl import ddc

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    s, c = a.size, a.channels
    x = torch.randn(1, c, s, s, s, requires_grad=True)
    offsets = ((torch.rand(1, 81, s, s, s) * 5) - 2.5).requires_grad_(True)
    weight = (torch.randn(c, 1, 3, 3, 3) * 0.2).requires_grad_(True)
    bias = torch.zeros(c, requires_grad=True)
    gy = torch.randn(1, c, s, s, s)

    def forward():
        with torch.no_grad():
            ddc(x, offsets, weight, bias)

    def forward_backward():
        for t in (x, offsets, weight, bias):
            t.grad = None
        ddc(x, offsets, weight, bias).backward(gy)

    def median_ms(fn):
        fn()  # warm-up
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    f = median_ms(forward)
    fb = median_ms(forward_backward)
    print(f"torch {torch.__version__} grid_sample DDC, N 1, C {c}, {s}^3, {a.threads} threads, median of {a.repeats}:")
    print(f"  forward           {f:9.1f} ms")
    print(f"  forward+backward  {fb:9.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
