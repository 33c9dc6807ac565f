"""Test helpers: seeded inputs, a comparison that reports the max error and where it is, and the
GIL check (how fast the main thread runs Python while a worker thread is in engine calls)."""
import json
import threading
import time

import numpy as np

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def rng(seed):
    return np.random.default_rng(seed)


def read_safetensors(path):
    """name -> float32 array, and the metadata (a reader independent of the engine's)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        assert e["dtype"] == "F32", name
        b, end = e["data_offsets"]
        out[name] = np.frombuffer(data[b:end], np.float32).reshape(e["shape"])
    return out, meta


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def assert_close(actual, expected, name, rtol=1e-4, atol=1e-5):
    """|actual - expected| <= atol + rtol * max|expected| everywhere (the tolerance is relative to the
    magnitude of the whole tensor, so values near zero are not held to a relative bound)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{name}: non-finite values at {np.argwhere(~np.isfinite(actual))[:5].tolist()}"
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    tol = atol + rtol * scale
    err = np.abs(actual - expected)
    worst = float(err.max()) if err.size else 0.0
    if worst > tol:
        bad = np.argwhere(err > tol)
        first = tuple(int(i) for i in bad[0])
        raise AssertionError(
            f"{name}: max abs error {worst:.3g} > tolerance {tol:.3g} (atol {atol} + rtol {rtol} x max|expected| "
            f"{scale:.3g}); max rel error {worst / max(scale, 1e-30):.3g}; {len(bad)} of {err.size} mismatch, "
            f"first at {first}: actual {actual[first]!r} expected {expected[first]!r}")
    return worst


def count_rate(stop, seconds):
    """Counts in a Python loop until `stop` is set or `seconds` pass; returns counts per second."""
    count, start = 0, time.perf_counter()
    end = start + seconds
    while not stop.is_set() and time.perf_counter() < end:
        count += 1
    return count / (time.perf_counter() - start)


def main_thread_rate_during(work, calls):
    """(rate, solo rate): how fast this thread counts in a Python loop while a worker thread runs
    `work()` `calls` times, and how fast it counts alone. If `work` releases the GIL the rate stays a
    good fraction of the solo rate (measured 50-100% on 2 cores with the engine on 1 thread); if it holds
    the GIL this thread runs only in the switch intervals (5 ms) between calls: about 5/85 of its solo
    rate for 80 ms calls."""
    solo = count_rate(threading.Event(), 0.3)
    started, done = threading.Event(), threading.Event()

    def worker():
        started.set()
        try:
            for _ in range(calls):
                work()
        finally:
            done.set()

    t = threading.Thread(target=worker)
    t.start()
    started.wait()
    rate = count_rate(done, 120.0)
    t.join()
    return rate, solo
