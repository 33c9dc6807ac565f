"""The DDC operator of DeformUX-Net (ARCHITECTURE.md section 3) on NumPy arrays.

Depthwise deformable 3x3x3 convolution with one offset field shared by all channels:

    x        (N, C, D, H, W)     float32
    offsets  (N, 81, D, H, W)    channel 3*t + a: tap t = i*9 + j*3 + k (i, j, k along D, H, W),
                                 axis a (0 D, 1 H, 2 W), in input voxels
    weight   (C, 1, 3, 3, 3)     bias (C,)
    y        (N, C, D, H, W)

    p = o - 1 + (i, j, k) + delta      per axis, for output voxel o and tap (i, j, k)
    sample = 0 if any coordinate of p is <= -1 or >= its size (NaN counts as outside), else the
             trilinear interpolation of the 8 integer neighbours, a neighbour outside counting 0
    y[c] = bias[c] + sum_t weight[c, t] * sample_t(x[c])

Array policy (the same for every function here):
    * Inputs must be numpy arrays of dtype float32 (native byte order). Anything else, float64
      included, raises TypeError: nothing is converted silently; use ``a.astype(np.float32)``.
    * Inputs must be C-contiguous (else ValueError; use ``np.ascontiguousarray(a)``), have the rank
      and shape given above (else ValueError naming the argument), and no zero-size dimension.
    * Inputs are never copied: the engine reads the arrays you pass. Outputs are new float32 arrays
      allocated here and filled in place by the engine.
    * The engine releases the GIL while it runs, so calls from several Python threads run in parallel
      (each call also uses the engine's own worker threads, see ``deformux.set_num_threads``). Each
      thread keeps its scratch memory between calls (``deformux.release_memory()`` frees it).
    * Ctrl-C interrupts a running call (KeyboardInterrupt) within about 0.1 s.
    * Engine errors: bad arguments -> ValueError, out of memory -> MemoryError, anything else ->
      ``deformux.DeformUXError`` (a RuntimeError).
"""
import threading

import numpy as np

from . import _C

OFFSET_CHANNELS = 81
OFFSET_MODES = {"aligned": _C.OFFSET_ALIGNED, "official": _C.OFFSET_OFFICIAL}

__all__ = ["deform_conv3d", "deform_conv3d_backward", "ddc_layer", "ddc_layer_backward", "OFFSET_MODES"]


# ---- validation (all of it here, before anything reaches C; the extension checks again) ----

_local = threading.local()


def _workspace():
    """The calling thread's engine workspace (scratch kept between calls, reused by the next call of a
    similar size; freed by :func:`deformux.release_memory` or when the thread ends)."""
    ws = getattr(_local, "workspace", None)
    if ws is None:
        ws = _local.workspace = _C.workspace_create()
    return ws


def release_workspace():
    """Frees the scratch the calling thread's workspace keeps."""
    ws = getattr(_local, "workspace", None)
    if ws is not None:
        _C.workspace_release(ws)


def _check(op, name, a, shape=None, rank=None, what=None):
    """Returns `a` itself if it is a C-contiguous float32 array of the expected rank/shape."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{op}: {name} must be a numpy.ndarray of float32, got {type(a).__name__}")
    if a.dtype != np.float32 or not a.dtype.isnative:
        hint = f"; use {name}.astype(np.float32)" if a.dtype.kind in "fiub" else ""
        raise TypeError(f"{op}: {name} must have dtype float32 (native byte order), got {a.dtype}{hint}")
    if shape is not None:
        if a.shape != tuple(shape):
            raise ValueError(f"{op}: {name} must have shape {tuple(shape)}{what}, got {a.shape}")
    elif a.ndim != rank:
        raise ValueError(f"{op}: {name} must have rank {rank} ({what}), got rank {a.ndim} with shape {a.shape}")
    if 0 in a.shape:
        raise ValueError(f"{op}: {name} must not have a zero-size dimension, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous; use np.ascontiguousarray({name})")
    return a


def _check_x(op, x):
    return _check(op, "x", x, rank=5, what="N, C, D, H, W")


def _shapes(x):
    n, c, d, h, w = x.shape
    for_x = f" for x of shape {x.shape}"
    return {
        "offsets": ((n, OFFSET_CHANNELS, d, h, w), for_x),
        "weight": ((c, 1, 3, 3, 3), for_x),
        "bias": ((c,), for_x),
        "grad_output": (x.shape, " (the shape of x)"),
        "offset_weight": ((OFFSET_CHANNELS, c, 1, 1, 1), for_x),
        "offset_bias": ((OFFSET_CHANNELS,), ""),
    }


def _check_all(op, x, **arrays):
    """Checks x, then every other array against the shape x implies."""
    _check_x(op, x)
    shapes = _shapes(x)
    for name, a in arrays.items():
        if a is None and name == "bias":
            continue
        shape, what = shapes[name]
        _check(op, name, a, shape=shape, what=what)


def _mode(op, offset_mode):
    if not isinstance(offset_mode, str):
        raise TypeError(f"{op}: offset_mode must be 'aligned' or 'official', got {type(offset_mode).__name__}")
    try:
        return OFFSET_MODES[offset_mode]
    except KeyError:
        raise ValueError(f"{op}: offset_mode must be 'aligned' or 'official', got {offset_mode!r}") from None


# ---- the operator ----

def deform_conv3d(x, offsets, weight, bias=None):
    """Depthwise deformable 3x3x3 convolution (DeformUX-Net's DDC kernel), forward.

    Args:
        x: (N, C, D, H, W) float32.
        offsets: (N, 81, D, H, W) float32, in voxels; channel 3*t + a (see the module docstring).
        weight: (C, 1, 3, 3, 3) float32.
        bias: (C,) float32, or None for no bias.

    Returns:
        y: (N, C, D, H, W) float32, a new array.

    Raises TypeError for non-arrays and dtypes other than float32 (float64 is rejected, not
    converted: pass ``x.astype(np.float32)``), ValueError for wrong ranks or shapes, non-C-contiguous
    arrays and zero-size dimensions.
    """
    op = "deform_conv3d"
    _check_all(op, x, offsets=offsets, weight=weight, bias=bias)
    y = np.empty(x.shape, dtype=np.float32)
    _C.deform_conv3d_forward(_workspace(), x, offsets, weight, bias, y)
    return y


def deform_conv3d_backward(x, offsets, weight, grad_output):
    """Gradients of :func:`deform_conv3d` (bias does not enter them).

    Args:
        x, offsets, weight: as for :func:`deform_conv3d`.
        grad_output: (N, C, D, H, W) float32, the gradient of the loss with respect to y.

    Returns:
        (grad_x, grad_offsets, grad_weight, grad_bias) with the shapes of x, offsets, weight and
        (C,): new float32 arrays. Same dtype/shape policy and errors as :func:`deform_conv3d`.
    """
    op = "deform_conv3d_backward"
    _check_all(op, x, offsets=offsets, weight=weight, grad_output=grad_output)
    grad_x = np.empty(x.shape, dtype=np.float32)
    grad_offsets = np.empty(offsets.shape, dtype=np.float32)
    grad_weight = np.empty(weight.shape, dtype=np.float32)
    grad_bias = np.empty((x.shape[1],), dtype=np.float32)
    _C.deform_conv3d_backward(_workspace(), x, offsets, weight, grad_output, grad_x, grad_offsets, grad_weight, grad_bias)
    return grad_x, grad_offsets, grad_weight, grad_bias


# ---- the DDC layer: offsets from a 1x1x1 conv of x, then the operator ----

def ddc_layer(x, weight, bias, offset_weight, offset_bias, offset_mode="aligned", return_offsets=False):
    """The DDC layer of a DeformUX block: offsets = conv_offset(x), y = deform_conv3d(x, offsets, ...).

    conv_offset is a 1x1x1 Conv3d C -> 81 with bias (PyTorch names ``ddc.conv_offset.weight/.bias``).

    Args:
        x: (N, C, D, H, W) float32.
        weight: (C, 1, 3, 3, 3) float32; bias: (C,) float32 or None.
        offset_weight: (81, C, 1, 1, 1) float32; offset_bias: (81,) float32.
        offset_mode: "aligned" (default: voxel o uses the offsets computed at o) or "official" (the
            released DeformUX-Net code, whose offset conv kept padding 1: the kernel reads the first
            N*81*D*H*W values of the padded N x 81 x (D+2) x (H+2) x (W+2) output; checkpoints
            trained with that code need it).
        return_offsets: also return the (N, 81, D, H, W) offsets the kernel used.

    Returns:
        y, or (y, offsets) when return_offsets. Same dtype/shape policy and errors as
        :func:`deform_conv3d`.
    """
    op = "ddc_layer"
    mode = _mode(op, offset_mode)
    _check_all(op, x, weight=weight, bias=bias, offset_weight=offset_weight, offset_bias=offset_bias)
    y = np.empty(x.shape, dtype=np.float32)
    offsets = np.empty((x.shape[0], OFFSET_CHANNELS) + x.shape[2:], dtype=np.float32) if return_offsets else None
    _C.ddc_layer_forward(_workspace(), x, weight, bias, offset_weight, offset_bias, mode, y, offsets)
    return (y, offsets) if return_offsets else y


def ddc_layer_backward(x, weight, offset_weight, offset_bias, grad_output, offset_mode="aligned"):
    """Gradients of :func:`ddc_layer` with respect to x and all four parameters (offset path included).

    Returns:
        (grad_x, grad_weight, grad_bias, grad_offset_weight, grad_offset_bias) with the shapes of
        x, weight, (C,), offset_weight and offset_bias: new float32 arrays. Same policy and errors as
        :func:`ddc_layer`.
    """
    op = "ddc_layer_backward"
    mode = _mode(op, offset_mode)
    _check_all(op, x, weight=weight, offset_weight=offset_weight, offset_bias=offset_bias,
               grad_output=grad_output)
    grad_x = np.empty(x.shape, dtype=np.float32)
    grad_weight = np.empty(weight.shape, dtype=np.float32)
    grad_bias = np.empty((x.shape[1],), dtype=np.float32)
    grad_offset_weight = np.empty(offset_weight.shape, dtype=np.float32)
    grad_offset_bias = np.empty(offset_bias.shape, dtype=np.float32)
    _C.ddc_layer_backward(_workspace(), x, weight, offset_weight, offset_bias, mode, grad_output,
                          grad_x, grad_weight, grad_bias, grad_offset_weight, grad_offset_bias)
    return grad_x, grad_weight, grad_bias, grad_offset_weight, grad_offset_bias
