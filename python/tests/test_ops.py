"""The engine against the NumPy reference, on a table of awkward cases.

Tolerance (float32 engine vs float64 oracle): |engine - ref| <= 1e-5 + 1e-4 * max|ref| per tensor,
for forward and backward alike (helpers.assert_close prints the max error and where on failure)."""
import zlib

import numpy as np
import pytest

import ddc_reference as ref
import deformux
from deformux import ops
from helpers import assert_close, f32, rng

RTOL, ATOL = 1e-4, 1e-5


def offsets_for(kind, r, n, d, h, w):
    shape = (n, 81, d, h, w)
    if kind == "small":          # within a voxel or two, fractional parts away from integers
        return r.integers(-2, 2, size=shape) + r.uniform(0.1, 0.9, size=shape)
    if kind == "zero":           # a plain depthwise 3x3x3 conv (a fresh block)
        return np.zeros(shape)
    if kind == "integer":        # whole-voxel shifts: sampling exactly on the grid
        return r.integers(-2, 3, size=shape).astype(np.float64)
    if kind == "far":            # mostly outside the volume
        return r.uniform(-40, 40, size=shape)
    if kind == "huge":           # 1e6 and -1e6 mixed with small
        o = r.uniform(-1, 1, size=shape)
        o[:, ::3] = 1e6
        o[:, 1::5] = -1e6
        return o
    if kind == "nan":            # NaN and infinities: those samples are 0
        o = r.uniform(-1.5, 1.5, size=shape)
        o[:, ::4] = np.nan
        o[:, 1::7] = np.inf
        o[:, 2::9] = -np.inf
        return o
    raise ValueError(kind)


# name: (N, C, D, H, W, offsets kind, with bias)
CASES = {
    "1x1x1": (1, 1, 1, 1, 1, "small", True),
    "1x1x1_C3_N2": (2, 3, 1, 1, 1, "small", True),
    "7x5x3_C5": (1, 5, 7, 5, 3, "small", True),
    "3x4x5_C16": (1, 16, 3, 4, 5, "small", False),
    "4x3x5_C17_N2": (2, 17, 4, 3, 5, "small", True),
    "2x9x4_C33": (1, 33, 2, 9, 4, "small", True),
    "5x5x5_zero_offsets": (1, 3, 5, 5, 5, "zero", True),
    "6x4x3_integer_offsets": (1, 4, 6, 4, 3, "integer", True),
    "4x4x4_far_outside": (1, 3, 4, 4, 4, "far", True),
    "3x5x4_huge_offsets": (2, 2, 3, 5, 4, "huge", True),
    "5x3x4_nan_inf_offsets": (1, 3, 5, 3, 4, "nan", True),
    "1x8x1_thin": (1, 2, 1, 8, 1, "small", True),
}


def make_case(name, seed=0):
    n, c, d, h, w, kind, with_bias = CASES[name]
    r = rng(zlib.crc32(name.encode()) + seed)
    x = f32(r.standard_normal((n, c, d, h, w)))
    off = f32(offsets_for(kind, r, n, d, h, w))
    wt = f32(r.standard_normal((c, 1, 3, 3, 3)))
    b = f32(r.standard_normal(c)) if with_bias else None
    g = f32(r.standard_normal((n, c, d, h, w)))
    return x, off, wt, b, g


@pytest.mark.parametrize("name", list(CASES))
def test_deform_conv3d_forward_matches_reference(name):
    x, off, wt, b, _ = make_case(name)
    y = ops.deform_conv3d(x, off, wt, b)
    assert y.dtype == np.float32 and y.shape == x.shape and y.flags.c_contiguous
    assert_close(y, ref.deform_conv3d(x, off, wt, b), f"{name}: y", RTOL, ATOL)


@pytest.mark.parametrize("name", list(CASES))
def test_deform_conv3d_backward_matches_reference(name):
    x, off, wt, _, g = make_case(name)
    got = ops.deform_conv3d_backward(x, off, wt, g)
    expected = ref.deform_conv3d_backward(x, off, wt, g)
    for label, a, e in zip(["grad_x", "grad_offsets", "grad_weight", "grad_bias"], got, expected):
        assert a.dtype == np.float32 and a.shape == e.shape, f"{name}: {label} dtype/shape"
        assert_close(a, e, f"{name}: {label}", RTOL, ATOL)


def test_zero_offsets_is_a_depthwise_conv():
    """With zero offsets the DDC is a depthwise 3x3x3 conv with zero padding (checked independently
    of the reference, by shifting a padded copy)."""
    r = rng(3)
    x = f32(r.standard_normal((1, 4, 5, 6, 7)))
    wt = f32(r.standard_normal((4, 1, 3, 3, 3)))
    b = f32(r.standard_normal(4))
    y = ops.deform_conv3d(x, np.zeros((1, 81, 5, 6, 7), np.float32), wt, b)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1), (1, 1)))
    expected = np.zeros(x.shape) + b[None, :, None, None, None]
    for i in range(3):
        for j in range(3):
            for k in range(3):
                expected += wt[None, :, 0, i, j, k, None, None, None] * xp[:, :, i:i + 5, j:j + 6, k:k + 7]
    assert_close(y, expected, "depthwise", RTOL, ATOL)


def test_nan_offsets_give_finite_output_and_gradients():
    x, off, wt, b, g = make_case("5x3x4_nan_inf_offsets")
    assert np.isnan(off).any()
    assert np.all(np.isfinite(ops.deform_conv3d(x, off, wt, b)))
    for grad in ops.deform_conv3d_backward(x, off, wt, g):
        assert np.all(np.isfinite(grad))


def test_offsets_far_outside_give_bias_only():
    r = rng(4)
    x = f32(r.standard_normal((1, 3, 3, 4, 5)))
    off = np.full((1, 81, 3, 4, 5), 1e6, np.float32)
    b = f32([1.5, -2.0, 0.25])
    y = ops.deform_conv3d(x, off, f32(r.standard_normal((3, 1, 3, 3, 3))), b)
    assert np.array_equal(y, np.broadcast_to(b[None, :, None, None, None], y.shape))


def test_inputs_are_not_modified():
    x, off, wt, b, g = make_case("7x5x3_C5")
    copies = [a.copy() for a in (x, off, wt, b, g)]
    ops.deform_conv3d(x, off, wt, b)
    ops.deform_conv3d_backward(x, off, wt, g)
    for a, c in zip((x, off, wt, b, g), copies):
        assert np.array_equal(a, c)


def test_read_only_inputs_are_accepted():
    x, off, wt, b, _ = make_case("7x5x3_C5")
    for a in (x, off, wt, b):
        a.flags.writeable = False
    assert_close(ops.deform_conv3d(x, off, wt, b), ref.deform_conv3d(x, off, wt, b), "y", RTOL, ATOL)


# ---- the DDC layer ----

LAYER_CASES = {
    "1x1x1": (1, 1, 1, 1, 1),
    "7x5x3_C3": (1, 3, 7, 5, 3),
    "4x3x5_C17_N2": (2, 17, 4, 3, 5),
    "3x3x3_C2_N2": (2, 2, 3, 3, 3),
}


def make_layer_case(name):
    n, c, d, h, w = LAYER_CASES[name]
    r = rng(zlib.crc32(name.encode()) + 7)
    x = f32(r.standard_normal((n, c, d, h, w)))
    wt = f32(r.standard_normal((c, 1, 3, 3, 3)))
    b = f32(r.standard_normal(c))
    wo = f32(r.standard_normal((81, c, 1, 1, 1)) * (1.0 / np.sqrt(c)))
    bo = f32(r.uniform(-1.5, 1.5, 81))
    g = f32(r.standard_normal((n, c, d, h, w)))
    return x, wt, b, wo, bo, g


@pytest.mark.parametrize("mode", ["aligned", "official"])
@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_ddc_layer_forward_matches_reference(name, mode):
    x, wt, b, wo, bo, _ = make_layer_case(name)
    y, off = ops.ddc_layer(x, wt, b, wo, bo, offset_mode=mode, return_offsets=True)
    y_ref, off_ref = ref.ddc_layer(x, wt, b, wo, bo, mode)
    assert_close(off, off_ref, f"{name}/{mode}: offsets", RTOL, ATOL)
    # y from the engine's own offsets (float32 rounding of an offset moves a sample by ~1e-7 voxels)
    assert_close(y, ref.deform_conv3d(x, off, wt, b), f"{name}/{mode}: y vs operator", RTOL, ATOL)
    assert_close(y, y_ref, f"{name}/{mode}: y", 1e-3, 1e-4)
    y_only = ops.ddc_layer(x, wt, b, wo, bo, offset_mode=mode)
    assert np.array_equal(y_only, y)


@pytest.mark.parametrize("mode", ["aligned", "official"])
@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_ddc_layer_backward_matches_reference(name, mode):
    x, wt, _, wo, bo, g = make_layer_case(name)
    got = ops.ddc_layer_backward(x, wt, wo, bo, g, offset_mode=mode)
    expected = ref.ddc_layer_backward(x, wt, wo, bo, g, mode)
    labels = ["grad_x", "grad_weight", "grad_bias", "grad_offset_weight", "grad_offset_bias"]
    for label, a, e in zip(labels, got, expected):
        assert a.dtype == np.float32 and a.shape == e.shape, f"{name}/{mode}: {label} dtype/shape"
        assert_close(a, e, f"{name}/{mode}: {label}", 1e-3, 1e-4)


def test_ddc_layer_zero_offset_conv_equals_operator_with_zero_offsets():
    """A fresh block (conv_offset initialised to zero) is a plain depthwise conv, in both modes."""
    x, wt, b, wo, bo, _ = make_layer_case("7x5x3_C3")
    y0 = ops.deform_conv3d(x, np.zeros((1, 81) + x.shape[2:], np.float32), wt, b)
    for mode in ("aligned", "official"):
        y = ops.ddc_layer(x, wt, b, np.zeros_like(wo), np.zeros_like(bo), offset_mode=mode)
        assert_close(y, y0, f"{mode}", RTOL, ATOL)


def test_ddc_layer_without_bias_equals_zero_bias():
    x, wt, b, wo, bo, _ = make_layer_case("7x5x3_C3")
    assert np.array_equal(ops.ddc_layer(x, wt, None, wo, bo), ops.ddc_layer(x, wt, np.zeros_like(b), wo, bo))


def test_top_level_package():
    assert deformux.ops is ops
    assert issubclass(deformux.DeformUXError, RuntimeError)
