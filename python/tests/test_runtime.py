"""The binding as a runtime: threads, the GIL, zero copies, versions and the installed files."""
import importlib.metadata
import shutil
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import deformux
from deformux import _C, ops
from helpers import assert_close, f32, main_thread_rate_during, rng


def inputs(shape, seed=0):
    r = rng(seed)
    n, c, d, h, w = shape
    return (f32(r.standard_normal(shape)), f32(r.uniform(-2, 2, (n, 81, d, h, w))),
            f32(r.standard_normal((c, 1, 3, 3, 3))), f32(r.standard_normal(c)), f32(r.standard_normal(shape)))


# ---- threads ----

def test_set_and_get_num_threads():
    for n in (1, 2, 3, 1):
        deformux.set_num_threads(n)
        assert deformux.get_num_threads() == n


@pytest.mark.parametrize("n", [0, -1, -100])
def test_set_num_threads_rejects_non_positive(n):
    before = deformux.get_num_threads()
    with pytest.raises(ValueError, match="set_num_threads"):
        deformux.set_num_threads(n)
    assert deformux.get_num_threads() == before


@pytest.mark.parametrize("n", [1.0, "2", None, True])
def test_set_num_threads_rejects_non_int(n):
    with pytest.raises(TypeError, match="set_num_threads"):
        deformux.set_num_threads(n)


def test_set_num_threads_too_many_is_a_value_error():
    with pytest.raises(ValueError, match="set_num_threads"):
        deformux.set_num_threads(10**6)
    with pytest.raises(ValueError, match="set_num_threads"):
        deformux.set_num_threads(2**40)


def test_results_do_not_depend_on_thread_count():
    """Threads split work by index, so 1 and 2 (and 3) threads agree to float32 rounding."""
    x, off, wt, b, g = inputs((2, 19, 9, 7, 11), seed=1)
    results = {}
    for n in (1, 2, 3):
        deformux.set_num_threads(n)
        results[n] = (ops.deform_conv3d(x, off, wt, b),) + ops.deform_conv3d_backward(x, off, wt, g)
    names = ["y", "grad_x", "grad_offsets", "grad_weight", "grad_bias"]
    for n in (2, 3):
        for name, a, e in zip(names, results[n], results[1]):
            assert_close(a, e, f"{name} with {n} threads vs 1", rtol=1e-5, atol=1e-6)
    # the same call twice gives the same bits
    deformux.set_num_threads(2)
    assert np.array_equal(ops.deform_conv3d(x, off, wt, b), results[2][0])


def test_concurrent_calls_from_python_threads():
    """Calls may run concurrently (the header's promise); each gets its own, correct result."""
    cases = [inputs((1, 5, 6, 7, 8), seed=s) for s in range(4)]
    expected = [ops.deform_conv3d_backward(x, off, wt, g) for x, off, wt, _, g in cases]
    got = [None] * len(cases)
    errors = []

    def work(i):
        try:
            x, off, wt, _, g = cases[i]
            for _ in range(3):
                got[i] = ops.deform_conv3d_backward(x, off, wt, g)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(len(cases)):
        for a, e in zip(got[i], expected[i]):
            assert_close(a, e, f"case {i}", rtol=1e-5, atol=1e-6)


# ---- the GIL ----

def test_gil_is_released_during_engine_calls():
    """While a worker thread is inside engine calls (each >= ~80 ms), the main thread keeps counting
    in a Python loop at a good fraction of its solo rate (measured: 50-100%). Were the GIL held, the
    main thread would get only the switch interval (5 ms) between calls: 5/85 of its rate at most
    (measured with the same engine call made through ctypes.PyDLL, which holds the GIL: 26% for
    19 ms calls)."""
    deformux.set_num_threads(1)  # leave a core for the counting thread on a 2-core machine
    c = 4
    while True:
        x, off, wt, _, g = inputs((1, c, 24, 24, 24), seed=2)
        start = time.perf_counter()
        ops.deform_conv3d_backward(x, off, wt, g)
        one_call = time.perf_counter() - start
        if one_call >= 0.08 or c >= 256:
            break
        c *= 2
    calls = max(3, int(np.ceil(0.8 / one_call)))
    rate, solo_rate = main_thread_rate_during(lambda: ops.deform_conv3d_backward(x, off, wt, g), calls)
    print(f"one call {one_call * 1e3:.0f} ms x {calls}; main loop {rate:.3g}/s vs solo {solo_rate:.3g}/s")
    assert rate >= 0.3 * solo_rate, (f"main thread counted at {rate:.3g}/s during engine calls, solo "
                                     f"{solo_rate:.3g}/s: the GIL seems to be held")


# ---- zero copies ----

def test_inputs_and_outputs_are_passed_to_the_extension_as_they_are(monkeypatch):
    """ops hands the caller's float32 C-contiguous arrays to the extension without copying, and
    returns the very arrays it allocated and the extension filled."""
    seen = {}

    def recorder(name, real):
        def wrapped(workspace, *args):  # the first argument is the calling thread's workspace
            seen[name] = args
            return real(workspace, *args)
        return wrapped

    for name in ("deform_conv3d_forward", "deform_conv3d_backward", "ddc_layer_forward", "ddc_layer_backward"):
        monkeypatch.setattr(_C, name, recorder(name, getattr(_C, name)))
    x, off, wt, b, g = inputs((1, 3, 4, 5, 6))
    r = rng(9)
    wo, bo = f32(r.standard_normal((81, 3, 1, 1, 1)) * 0.3), f32(r.standard_normal(81))

    y = ops.deform_conv3d(x, off, wt, b)
    args = seen["deform_conv3d_forward"]
    assert args[0] is x and args[1] is off and args[2] is wt and args[3] is b and args[4] is y

    grads = ops.deform_conv3d_backward(x, off, wt, g)
    args = seen["deform_conv3d_backward"]
    assert args[0] is x and args[1] is off and args[2] is wt and args[3] is g
    assert all(a is e for a, e in zip(args[4:], grads))

    y, offsets = ops.ddc_layer(x, wt, b, wo, bo, return_offsets=True)
    args = seen["ddc_layer_forward"]
    assert args[0] is x and args[1] is wt and args[2] is b and args[3] is wo and args[4] is bo
    assert args[6] is y and args[7] is offsets

    grads = ops.ddc_layer_backward(x, wt, wo, bo, g)
    args = seen["ddc_layer_backward"]
    assert args[0] is x and args[1] is wt and args[2] is wo and args[3] is bo and args[5] is g
    assert all(a is e for a, e in zip(args[6:], grads))


def test_extension_fills_caller_buffers_in_place():
    x, off, wt, b, _ = inputs((1, 3, 4, 5, 6))
    y = np.full(x.shape, np.nan, np.float32)
    before = y.ctypes.data
    assert _C.deform_conv3d_forward(None, x, off, wt, b, y) is None
    assert y.ctypes.data == before and np.all(np.isfinite(y))
    assert np.array_equal(y, ops.deform_conv3d(x, off, wt, b))


def test_no_python_side_copies_of_inputs():
    """Python-visible allocations during a call are the outputs only (NumPy reports its buffers to
    tracemalloc); a copy of the 81-channel offsets would be 81/C times the output."""
    x, off, wt, b, g = inputs((1, 4, 16, 16, 16))
    ops.deform_conv3d(x, off, wt, b)  # warm up
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        y = ops.deform_conv3d(x, off, wt, b)
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        grads = ops.deform_conv3d_backward(x, off, wt, g)
        peak_backward = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    slack = 64 * 1024
    assert peak <= y.nbytes + slack, f"forward: peak {peak} bytes for a {y.nbytes}-byte output"
    out_bytes = sum(a.nbytes for a in grads)
    assert peak_backward <= out_bytes + slack, f"backward: peak {peak_backward} for {out_bytes} of outputs"


# ---- versions and installed files ----

def test_versions_agree():
    assert deformux.__version__ == importlib.metadata.version("deformux")
    assert deformux.engine_version() == deformux.__version__ == _C.__version__


def test_package_is_the_installed_one_with_its_library():
    pkg = Path(deformux.__file__).parent
    assert Path(_C.__file__).parent == pkg
    assert (pkg / "libDeformUXC.so").is_file(), f"libDeformUXC.so is not next to the extension in {pkg}"


@pytest.mark.skipif(shutil.which("ldd") is None, reason="no ldd")
def test_extension_needs_no_swift_runtime():
    pkg = Path(deformux.__file__).parent
    for lib in (Path(_C.__file__), pkg / "libDeformUXC.so"):
        out = subprocess.run(["ldd", str(lib)], check=True, stdout=subprocess.PIPE, text=True).stdout
        assert "not found" not in out, f"{lib.name}: unresolved libraries:\n{out}"
        assert "libswift" not in out and "libFoundation" not in out and "libdispatch" not in out, \
            f"{lib.name} needs the Swift runtime (build with -static-stdlib):\n{out}"
    out = subprocess.run(["ldd", str(_C.__file__)], check=True, stdout=subprocess.PIPE, text=True).stdout
    assert str(pkg / "libDeformUXC.so") in out, f"_C does not load the bundled library:\n{out}"
