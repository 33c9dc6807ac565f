"""Bad inputs are rejected in Python, before anything reaches C, with the argument named; and the
extension re-checks what it is handed (it never trusts the Python layer)."""
import numpy as np
import pytest

import deformux
from deformux import _C, ops
from helpers import f32, rng

N, C, D, H, W = 1, 3, 4, 5, 6


def good():
    r = rng(0)
    return {
        "x": f32(r.standard_normal((N, C, D, H, W))),
        "offsets": f32(r.uniform(-1, 1, (N, 81, D, H, W))),
        "weight": f32(r.standard_normal((C, 1, 3, 3, 3))),
        "bias": f32(r.standard_normal(C)),
        "grad_output": f32(r.standard_normal((N, C, D, H, W))),
        "offset_weight": f32(r.standard_normal((81, C, 1, 1, 1))),
        "offset_bias": f32(r.standard_normal(81)),
    }


# each public function with the arguments it takes, in order
FUNCTIONS = {
    "deform_conv3d": (ops.deform_conv3d, ["x", "offsets", "weight", "bias"]),
    "deform_conv3d_backward": (ops.deform_conv3d_backward, ["x", "offsets", "weight", "grad_output"]),
    "ddc_layer": (ops.ddc_layer, ["x", "weight", "bias", "offset_weight", "offset_bias"]),
    "ddc_layer_backward": (ops.ddc_layer_backward, ["x", "weight", "offset_weight", "offset_bias", "grad_output"]),
}
CASES = [(f, arg) for f, (_, args) in FUNCTIONS.items() for arg in args]
IDS = [f"{f}-{arg}" for f, arg in CASES]


def call(fname, **changes):
    fn, args = FUNCTIONS[fname]
    values = good()
    values.update(changes)
    return fn(*[values[a] for a in args])


def test_good_inputs_pass():
    for fname in FUNCTIONS:
        call(fname)


@pytest.mark.parametrize("fname,arg", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.int64, np.bool_, object, np.complex64])
def test_wrong_dtype_is_a_type_error(fname, arg, dtype):
    bad = good()[arg].astype(dtype)
    with pytest.raises(TypeError, match=f"{fname}: {arg} must have dtype float32"):
        call(fname, **{arg: bad})


@pytest.mark.parametrize("fname,arg", CASES, ids=IDS)
def test_float64_error_suggests_astype(fname, arg):
    with pytest.raises(TypeError, match=rf"use {arg}\.astype\(np\.float32\)"):
        call(fname, **{arg: good()[arg].astype(np.float64)})


@pytest.mark.parametrize("fname,arg", CASES, ids=IDS)
def test_non_native_byte_order_is_a_type_error(fname, arg):
    with pytest.raises(TypeError, match=f"{arg} must have dtype float32"):
        call(fname, **{arg: good()[arg].astype(">f4")})


NON_ARRAYS = [(f, arg, v) for f, arg in CASES for v in (None, 1.0, "x", "list")
              if not (v is None and arg == "bias")]  # bias=None means no bias


@pytest.mark.parametrize("fname,arg,value", NON_ARRAYS, ids=[f"{f}-{a}-{v}" for f, a, v in NON_ARRAYS])
def test_non_array_is_a_type_error(fname, arg, value):
    if value == "list":
        value = good()[arg].tolist()
    with pytest.raises(TypeError, match=f"{fname}: {arg} must be a numpy.ndarray"):
        call(fname, **{arg: value})


@pytest.mark.parametrize("fname,arg", CASES, ids=IDS)
def test_wrong_rank_is_a_value_error(fname, arg):
    bad = good()[arg][None]
    with pytest.raises(ValueError, match=f"{fname}: {arg} must have"):
        call(fname, **{arg: bad})


@pytest.mark.parametrize("fname,arg", [c for c in CASES if c[1] != "x"], ids=[i for c, i in zip(CASES, IDS) if c[1] != "x"])
def test_mismatched_shape_is_a_value_error(fname, arg):
    a = good()[arg]
    bad = np.zeros(a.shape[:-1] + (a.shape[-1] + 1,), np.float32)
    with pytest.raises(ValueError, match=rf"{fname}: {arg} must have shape"):
        call(fname, **{arg: bad})


def test_shape_message_names_expected_and_got():
    bad = np.zeros((1, 80, 4, 5, 6), np.float32)
    x = np.zeros((1, 3, 4, 5, 6), np.float32)
    with pytest.raises(ValueError) as e:
        ops.deform_conv3d(x, bad, np.zeros((3, 1, 3, 3, 3), np.float32))
    assert str(e.value) == ("deform_conv3d: offsets must have shape (1, 81, 4, 5, 6) for x of shape "
                            "(1, 3, 4, 5, 6), got (1, 80, 4, 5, 6)")


@pytest.mark.parametrize("fname", list(FUNCTIONS))
def test_x_with_wrong_rank_is_a_value_error(fname):
    with pytest.raises(ValueError, match=rf"{fname}: x must have rank 5 \(N, C, D, H, W\), got rank 4"):
        call(fname, x=np.zeros((C, D, H, W), np.float32))


@pytest.mark.parametrize("fname", list(FUNCTIONS))
@pytest.mark.parametrize("axis", range(5))
def test_zero_size_dimension_is_a_value_error(fname, axis):
    shape = [N, C, D, H, W]
    shape[axis] = 0
    n, c, d, h, w = shape
    changes = {
        "x": np.zeros(shape, np.float32),
        "offsets": np.zeros((n, 81, d, h, w), np.float32),
        "grad_output": np.zeros(shape, np.float32),
        "weight": np.zeros((c, 1, 3, 3, 3), np.float32),
        "bias": np.zeros(c, np.float32),
        "offset_weight": np.zeros((81, c, 1, 1, 1), np.float32),
    }
    with pytest.raises(ValueError, match="zero-size dimension"):
        call(fname, **changes)


@pytest.mark.parametrize("fname,arg", CASES, ids=IDS)
def test_non_contiguous_is_a_value_error(fname, arg):
    a = good()[arg]
    doubled = np.repeat(a, 2, axis=-1)
    strided = doubled[..., ::2]
    assert not strided.flags.c_contiguous and strided.shape == a.shape
    with pytest.raises(ValueError, match=rf"{fname}: {arg} must be C-contiguous; use np.ascontiguousarray\({arg}\)"):
        call(fname, **{arg: strided})


def test_fortran_order_is_a_value_error():
    x = np.asfortranarray(good()["x"])
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        ops.deform_conv3d(x, good()["offsets"], good()["weight"])


@pytest.mark.parametrize("mode", ["Aligned", "padded", ""])
def test_bad_offset_mode_is_a_value_error(mode):
    with pytest.raises(ValueError, match="ddc_layer: offset_mode must be 'aligned' or 'official'"):
        ops.ddc_layer(*[good()[a] for a in FUNCTIONS["ddc_layer"][1]], offset_mode=mode)
    with pytest.raises(ValueError, match="offset_mode"):
        ops.ddc_layer_backward(*[good()[a] for a in FUNCTIONS["ddc_layer_backward"][1]], offset_mode=mode)


def test_offset_mode_must_be_a_string():
    with pytest.raises(TypeError, match="offset_mode"):
        ops.ddc_layer(*[good()[a] for a in FUNCTIONS["ddc_layer"][1]], offset_mode=1)


# ---- the extension checks again ----

def test_extension_rejects_wrong_buffers_itself():
    g = good()
    x, off, wt, b = g["x"], g["offsets"], g["weight"], g["bias"]
    y = np.empty_like(x)
    with pytest.raises(TypeError, match="float32"):
        _C.deform_conv3d_forward(None, x.astype(np.float64), off, wt, b, y)
    with pytest.raises(ValueError, match="offsets has size 80 on axis 1, expected 81"):
        _C.deform_conv3d_forward(None, x, off[:, :80].copy(), wt, b, y)
    with pytest.raises(ValueError, match="y has size"):
        _C.deform_conv3d_forward(None, x, off, wt, b, np.empty((1, 3, 4, 5, 5), np.float32))
    with pytest.raises(ValueError, match="rank"):
        _C.deform_conv3d_forward(None, x[0], off, wt, b, y)
    with pytest.raises(TypeError, match="C-contiguous"):
        _C.deform_conv3d_forward(None, np.repeat(x, 2, axis=-1)[..., ::2], off, wt, b, y)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(TypeError, match="writable"):
        _C.deform_conv3d_forward(None, x, off, wt, b, ro)
    with pytest.raises(TypeError):
        _C.deform_conv3d_forward(None, [1.0], off, wt, b, y)


def test_engine_errors_map_to_value_error_with_its_message():
    """Zero sizes reach the engine only through the raw extension: DFX_ERR_INVALID_ARGUMENT."""
    x = np.zeros((1, 0, 2, 2, 2), np.float32)
    with pytest.raises(ValueError) as e:
        _C.deform_conv3d_forward(None, x, np.zeros((1, 81, 2, 2, 2), np.float32),
                                 np.zeros((0, 1, 3, 3, 3), np.float32), None, np.zeros_like(x))
    assert e.value.status == 1 and e.value.operation == "deform_conv3d"
    assert str(e.value).startswith("deform_conv3d: size C must be >= 1, got 0")
    assert _C.last_error() != ""
    with pytest.raises(ValueError, match="offset_mode"):
        g = good()
        _C.ddc_layer_forward(None, g["x"], g["weight"], g["bias"], g["offset_weight"], g["offset_bias"], 7,
                             np.empty_like(g["x"]), None)


def test_deformux_error_is_a_runtime_error():
    assert issubclass(deformux.DeformUXError, RuntimeError)
    assert deformux.DeformUXError.__module__ == "deformux"
