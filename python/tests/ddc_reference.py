"""NumPy reference of the DDC operator and layer (ARCHITECTURE.md section 3), in float64.

Written straight from the spec, vectorised over voxels and channels, loops only over the 27 taps and
8 trilinear corners. It is the oracle for the engine; its analytic backward is itself checked against
finite differences (test_reference.py).

    p = o - 1 + (i, j, k) + delta          per axis; tap t = i*9 + j*3 + k; offset channel 3*t + a
    sample = 0 if any p_a <= -1 or p_a >= size_a (NaN: outside), else trilinear over the 8 integer
             neighbours, a neighbour outside the volume counting 0
    y[c] = bias[c] + sum_t weight[c, t] * sample_t(x[c])
"""
import itertools

import numpy as np

TAPS = [(i, j, k) for i in range(3) for j in range(3) for k in range(3)]
CORNERS = list(itertools.product((0, 1), repeat=3))


def _tap_corners(offsets, t, dhw):
    """For tap t: a list of 8 (flat index (N, V), weight (N, V), [d weight / d p_a for a in 0..2])."""
    n = offsets.shape[0]
    sizes = dhw
    grid = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in sizes], indexing="ij")
    p = [grid[a][None] - 1 + TAPS[t][a] + offsets[:, 3 * t + a].astype(np.float64) for a in range(3)]
    with np.errstate(invalid="ignore"):
        valid = np.ones((n,) + tuple(sizes), dtype=bool)
        for a in range(3):
            valid &= (p[a] > -1) & (p[a] < sizes[a])
    p = [np.where(valid, p[a], 0.0) for a in range(3)]
    base = [np.floor(p[a]) for a in range(3)]
    frac = [p[a] - base[a] for a in range(3)]
    out = []
    for bits in CORNERS:
        idx = [base[a].astype(np.int64) + bits[a] for a in range(3)]
        inside = valid.copy()
        for a in range(3):
            inside &= (idx[a] >= 0) & (idx[a] < sizes[a])
        factors = [frac[a] if bits[a] else 1.0 - frac[a] for a in range(3)]
        signs = [1.0 if bits[a] else -1.0 for a in range(3)]
        weight = factors[0] * factors[1] * factors[2] * inside
        dweight = [signs[0] * factors[1] * factors[2] * inside,
                   factors[0] * signs[1] * factors[2] * inside,
                   factors[0] * factors[1] * signs[2] * inside]
        clipped = [np.clip(idx[a], 0, sizes[a] - 1) for a in range(3)]
        flat = (clipped[0] * sizes[1] + clipped[1]) * sizes[2] + clipped[2]
        out.append((flat.reshape(n, -1), weight.reshape(n, -1), [d.reshape(n, -1) for d in dweight]))
    return out


def _gather(xf, flat):
    """xf (N, C, V), flat (N, V) -> (N, C, V)."""
    return np.take_along_axis(xf, flat[:, None, :], axis=2)


def deform_conv3d(x, offsets, weight, bias=None):
    """Forward, float64. x (N,C,D,H,W), offsets (N,81,D,H,W), weight (C,1,3,3,3), bias (C,) or None."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    dhw = x.shape[2:]
    xf = x.reshape(n, c, -1)
    wt = np.asarray(weight, dtype=np.float64).reshape(c, 27)
    y = np.zeros_like(xf)
    for t in range(27):
        sample = np.zeros_like(xf)
        for flat, w, _ in _tap_corners(offsets, t, dhw):
            sample += w[:, None, :] * _gather(xf, flat)
        y += wt[None, :, t, None] * sample
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64)[None, :, None]
    return y.reshape(x.shape)


def deform_conv3d_backward(x, offsets, weight, grad_output):
    """Analytic gradients, float64: (grad_x, grad_offsets, grad_weight, grad_bias)."""
    x = np.asarray(x, dtype=np.float64)
    g = np.asarray(grad_output, dtype=np.float64)
    n, c = x.shape[:2]
    dhw = x.shape[2:]
    v = int(np.prod(dhw))
    xf, gf = x.reshape(n, c, v), g.reshape(n, c, v)
    wt = np.asarray(weight, dtype=np.float64).reshape(c, 27)
    grad_x = np.zeros(n * c * v)
    grad_off = np.zeros((n, 81, v))
    grad_w = np.zeros((c, 27))
    # scatter target of (n, c, flat): n*C*V + c*V + flat
    base = (np.arange(n)[:, None, None] * c + np.arange(c)[None, :, None]) * v
    for t in range(27):
        wg = wt[None, :, t, None] * gf                      # (N, C, V): weight[c,t] * g
        sample = np.zeros_like(xf)
        dsample = [np.zeros_like(xf) for _ in range(3)]
        for flat, w, dw in _tap_corners(offsets, t, dhw):
            corner = _gather(xf, flat)
            sample += w[:, None, :] * corner
            for a in range(3):
                dsample[a] += dw[a][:, None, :] * corner
            target = base + flat[:, None, :]
            grad_x += np.bincount(target.ravel(), weights=(wg * w[:, None, :]).ravel(), minlength=n * c * v)
        grad_w[:, t] = (gf * sample).sum(axis=(0, 2))
        for a in range(3):
            grad_off[:, 3 * t + a] = (wg * dsample[a]).sum(axis=1)
    grad_b = gf.sum(axis=(0, 2))
    return (grad_x.reshape(x.shape), grad_off.reshape((n, 81) + tuple(dhw)),
            grad_w.reshape(c, 1, 3, 3, 3), grad_b)


# ---- the DDC layer: offsets from a 1x1x1 conv of x ----

def layer_offsets(x, offset_weight, offset_bias, mode):
    """The offsets the kernel reads, float64 (N, 81, D, H, W)."""
    x = np.asarray(x, dtype=np.float64)
    n, c, d, h, w = x.shape
    wo = np.asarray(offset_weight, dtype=np.float64).reshape(81, c)
    bo = np.asarray(offset_bias, dtype=np.float64)
    aligned = np.einsum("oc,ncdhw->nodhw", wo, x) + bo[None, :, None, None, None]
    if mode == "aligned":
        return aligned
    assert mode == "official"
    # padding 1: border voxels see only zeros, so they hold the bias; the interior is the aligned conv
    padded = np.broadcast_to(bo[None, :, None, None, None], (n, 81, d + 2, h + 2, w + 2)).copy()
    padded[:, :, 1:-1, 1:-1, 1:-1] = aligned
    return padded.ravel()[: n * 81 * d * h * w].reshape(n, 81, d, h, w)


def ddc_layer(x, weight, bias, offset_weight, offset_bias, mode="aligned"):
    offsets = layer_offsets(x, offset_weight, offset_bias, mode)
    return deform_conv3d(x, offsets, weight, bias), offsets


def ddc_layer_backward(x, weight, offset_weight, offset_bias, grad_output, mode="aligned"):
    """(grad_x, grad_weight, grad_bias, grad_offset_weight, grad_offset_bias), float64."""
    x = np.asarray(x, dtype=np.float64)
    n, c, d, h, w = x.shape
    wo = np.asarray(offset_weight, dtype=np.float64).reshape(81, c)
    offsets = layer_offsets(x, offset_weight, offset_bias, mode)
    gx, goff, gw, gb = deform_conv3d_backward(x, offsets, weight, grad_output)
    if mode == "aligned":
        g_aligned = goff
        g_bo = goff.sum(axis=(0, 2, 3, 4))
    else:
        # the kernel read the first N*81*D*H*W values of the padded buffer: scatter back, then
        # every padded value depends on the bias, the interior also on the conv
        padded = np.zeros(n * 81 * (d + 2) * (h + 2) * (w + 2))
        padded[: goff.size] = goff.ravel()
        padded = padded.reshape(n, 81, d + 2, h + 2, w + 2)
        g_bo = padded.sum(axis=(0, 2, 3, 4))
        g_aligned = padded[:, :, 1:-1, 1:-1, 1:-1]
    g_wo = np.einsum("nodhw,ncdhw->oc", g_aligned, x).reshape(81, c, 1, 1, 1)
    gx = gx + np.einsum("oc,nodhw->ncdhw", wo, g_aligned)
    return gx, gw, gb, g_wo, g_bo
