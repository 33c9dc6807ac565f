"""Test helpers: seeded inputs and a comparison that reports the max error and where it is."""
import numpy as np

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def rng(seed):
    return np.random.default_rng(seed)


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
