"""The NumPy oracle checks itself: its analytic backward against central finite differences, in
float64, on tiny shapes with offsets drawn away from integers (trilinear sampling has kinks there)."""
import numpy as np
import pytest

import ddc_reference as ref
from helpers import rng

EPS = 1e-6


def away_from_integers(r, shape, lo=-1.5, hi=1.5):
    """Offsets whose fractional parts lie in [0.15, 0.85]: o - 1 + k + delta is then never within 0.15
    of an integer, where sampling (and the inside/outside rule at -1 and size) has its kinks."""
    whole = r.integers(int(np.floor(lo)), int(np.ceil(hi)), size=shape)
    return whole + r.uniform(0.15, 0.85, size=shape)


def directional_fd(loss, value, direction):
    return (loss(value + EPS * direction) - loss(value - EPS * direction)) / (2 * EPS)


def check_fd(name, loss, value, analytic, r, directions=3, elements=6):
    """Random directions plus a few single elements: FD of `loss` at `value` vs <analytic, direction>."""
    for _ in range(directions):
        v = r.standard_normal(value.shape)
        fd = directional_fd(loss, value, v)
        an = float(np.sum(analytic * v))
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), f"{name}: direction: FD {fd!r} vs analytic {an!r}"
    for flat in r.choice(value.size, size=min(elements, value.size), replace=False):
        v = np.zeros(value.size)
        v[flat] = 1.0
        v = v.reshape(value.shape)
        fd = directional_fd(loss, value, v)
        an = float(analytic.ravel()[flat])
        idx = np.unravel_index(flat, value.shape)
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), f"{name}{idx}: FD {fd!r} vs analytic {an!r}"


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (1, 2, 3, 2, 4), (2, 3, 2, 3, 2)],
                         ids=["1x1x1", "C2_3x2x4", "N2_C3_2x3x2"])
def test_reference_operator_backward_matches_finite_differences(shape):
    r = rng(11)
    n, c, d, h, w = shape
    x = r.standard_normal(shape)
    off = away_from_integers(r, (n, 81, d, h, w))
    wt = r.standard_normal((c, 1, 3, 3, 3))
    b = r.standard_normal(c)
    g = r.standard_normal(shape)
    gx, goff, gw, gb = ref.deform_conv3d_backward(x, off, wt, g)
    check_fd("grad_x", lambda v: np.sum(g * ref.deform_conv3d(v, off, wt, b)), x, gx, r)
    check_fd("grad_offsets", lambda v: np.sum(g * ref.deform_conv3d(x, v, wt, b)), off, goff, r)
    check_fd("grad_weight", lambda v: np.sum(g * ref.deform_conv3d(x, off, v, b)), wt, gw, r)
    check_fd("grad_bias", lambda v: np.sum(g * ref.deform_conv3d(x, off, wt, v)), b, gb, r)


def test_reference_outside_samples_have_zero_gradient():
    """Offsets far outside, huge or NaN: those samples are 0, so are their gradients."""
    r = rng(12)
    shape = (1, 2, 2, 3, 2)
    x = r.standard_normal(shape)
    off = np.full((1, 81, 2, 3, 2), 50.0)
    off[0, ::2] = np.nan
    wt = r.standard_normal((2, 1, 3, 3, 3))
    y = ref.deform_conv3d(x, off, wt, np.array([1.0, 2.0]))
    assert np.array_equal(y, np.broadcast_to(np.array([1.0, 2.0])[None, :, None, None, None], shape))
    for grad in ref.deform_conv3d_backward(x, off, wt, np.ones(shape))[:3]:
        assert np.all(grad == 0)


@pytest.mark.parametrize("mode", ["aligned", "official"])
@pytest.mark.parametrize("shape", [(1, 2, 2, 3, 2), (2, 1, 1, 2, 3)], ids=["C2_2x3x2", "N2_C1_1x2x3"])
def test_reference_layer_backward_matches_finite_differences(mode, shape):
    r = rng(13)
    n, c, d, h, w = shape
    x = r.standard_normal(shape)
    wt = r.standard_normal((c, 1, 3, 3, 3))
    b = r.standard_normal(c)
    wo = 0.7 * r.standard_normal((81, c, 1, 1, 1))
    bo = r.uniform(-1.5, 1.5, 81)
    g = r.standard_normal(shape)
    gx, gw, gb, gwo, gbo = ref.ddc_layer_backward(x, wt, wo, bo, g, mode)

    def loss(x=x, wt=wt, b=b, wo=wo, bo=bo):
        return np.sum(g * ref.ddc_layer(x, wt, b, wo, bo, mode)[0])

    check_fd("grad_x", lambda v: loss(x=v), x, gx, r)
    check_fd("grad_weight", lambda v: loss(wt=v), wt, gw, r)
    check_fd("grad_bias", lambda v: loss(b=v), b, gb, r)
    check_fd("grad_offset_weight", lambda v: loss(wo=v), wo, gwo, r)
    check_fd("grad_offset_bias", lambda v: loss(bo=v), bo, gbo, r)


def test_reference_official_offsets_layout():
    """official mode: border of the padded offset conv holds the bias, and the kernel reads the
    padded buffer's first N*81*D*H*W values flat (so the offsets are mostly bias and shifted)."""
    r = rng(14)
    x = r.standard_normal((1, 2, 2, 2, 2))
    wo = r.standard_normal((81, 2, 1, 1, 1))
    bo = r.standard_normal(81)
    off = ref.layer_offsets(x, wo, bo, "official")
    # the first padded slice (d = 0 of the padded volume) is all bias of channel 0: 16 values
    assert np.allclose(off.ravel()[:16], bo[0])
    # padded value at (o=0, d=1, h=1, w=1) = interior (0, 0, 0) lies at flat 16 + 4 + 1 = 21
    aligned = ref.layer_offsets(x, wo, bo, "aligned")
    assert np.isclose(off.ravel()[21], aligned[0, 0, 0, 0, 0])
