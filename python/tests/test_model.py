"""deformux.DeformUXNet from Python: parameter counts (ARCHITECTURE.md section 6), agreement with the
PyTorch reference fixtures (Tests/Fixtures/network), weights in and out, input validation, progress and
cancellation, the GIL."""
import ctypes
import errno
import json
import os
import threading
import time

import numpy as np
import pytest

import deformux
from deformux import DeformUXNet, convert
from helpers import main_thread_rate_during, read_safetensors

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "Tests", "Fixtures", "network")
SMALL = dict(out_channels=3, feature_size=(8, 12, 16, 24), hidden_size=32)


@pytest.mark.parametrize("block, mlp, cout, count", [
    ("deformux", "dense", 14, 55_790_678), ("deformux", "dense", 16, 55_790_776),
    ("deformux", "grouped", 16, 52_668_856), ("uxnet", "grouped", 14, 53_006_510),
    ("uxnet", None, 16, 53_006_608),
])
def test_parameter_counts(block, mlp, cout, count):
    assert DeformUXNet(out_channels=cout, block=block, mlp=mlp).num_parameters() == count


def _fixture_variants():
    """Every variant of Tests/Fixtures/network/manifest.json with its own io file (the main ones and the
    Table 3 ablations; released_layout reuses grouped_official's)."""
    with open(os.path.join(FIXTURES, "manifest.json")) as f:
        names = json.load(f)["variants"]
    return [n for n in names if os.path.exists(os.path.join(FIXTURES, f"{n}.io.safetensors"))]


def test_fixture_manifest_lists_the_ablations():
    names = _fixture_variants()
    for name in ("dense_aligned", "uxnet", "ablation_offset_kernel3", "ablation_planes_xz", "ablation_mlp_none",
                 "ablation_standard"):
        assert name in names


@pytest.mark.parametrize("variant", _fixture_variants())
def test_matches_pytorch(variant):
    m = DeformUXNet.from_file(os.path.join(FIXTURES, f"{variant}.safetensors"))
    io, _ = read_safetensors(os.path.join(FIXTURES, f"{variant}.io.safetensors"))
    y = m.forward(np.ascontiguousarray(io["input"]))
    want = io["output"]
    err = np.abs(y - want)
    assert y.shape == want.shape
    assert np.all(err <= 1e-4 + 1e-4 * np.abs(want)), f"{variant}: max abs err {err.max()}"


def test_released_names_and_state_dict_round_trip():
    weights, _ = read_safetensors(os.path.join(FIXTURES, "released_layout.safetensors"))
    assert any(k.startswith("module.convxnet.") for k in weights)
    m = DeformUXNet(**SMALL, mlp="grouped", offset_mode="official")
    report = m.load_state_dict(weights)
    assert "0 missing, 0 unexpected" in report
    io, _ = read_safetensors(os.path.join(FIXTURES, "grouped_official.io.safetensors"))
    y = m.forward(np.ascontiguousarray(io["input"]))
    assert np.allclose(y, io["output"], atol=1e-4, rtol=1e-4)
    sd = m.state_dict()
    assert sd["deformuxnet_3d.stages.0.0.ddc.conv_offset.weight"].shape == (81, 8, 1, 1, 1)
    assert np.array_equal(sd["deformuxnet_3d.stages.0.0.ddc.weight"], weights["module.convxnet.stages.0.0.dcn.weight"])
    m2 = DeformUXNet(**SMALL, mlp="grouped", offset_mode="official", seed=5)
    m2.load_state_dict(sd)
    assert np.array_equal(m2.forward(np.ascontiguousarray(io["input"])), y)


def test_strict_loading_names_every_problem_and_loads_nothing():
    m = DeformUXNet(**SMALL)
    sd = m.state_dict()
    before = sd["encoder2.layer.conv1.conv.weight"].copy()
    bad = {k: np.full_like(v, 0.25) for k, v in sd.items()}
    del bad["out.conv.conv.bias"]
    bad["decoder9.extra"] = np.zeros(3, np.float32)
    bad["deformuxnet_3d.norm1.weight"] = np.zeros(13, np.float32)
    with pytest.raises(ValueError) as e:
        m.load_state_dict(bad)
    for word in ["out.conv.conv.bias", "decoder9.extra", "deformuxnet_3d.norm1.weight expected [12] got [13]"]:
        assert word in str(e.value)
    assert np.array_equal(m.state_dict()["encoder2.layer.conv1.conv.weight"], before)
    report = m.load_state_dict(bad, strict=False)
    assert "1 missing" in report and "1 unexpected" in report
    assert np.all(m.state_dict()["encoder2.layer.conv1.conv.weight"] == 0.25)


def test_save_is_atomic_and_records_the_configuration(tmp_path):
    m = DeformUXNet(**SMALL, block="uxnet", seed=3)
    path = tmp_path / "m.safetensors"
    m.save(path)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary left behind
    _, meta = read_safetensors(path)
    assert json.loads(meta["deformux.config"])["block"] == "uxnet"
    m2 = DeformUXNet.from_file(path)
    assert m2.config == m.config
    x = np.random.default_rng(0).standard_normal((1, 1, 16, 16, 16)).astype(np.float32)
    assert np.array_equal(m2.forward(x), m.forward(x))
    with pytest.raises(FileNotFoundError) as e:
        m.load(tmp_path / "missing.safetensors")
    assert e.value.filename == str(tmp_path / "missing.safetensors") and e.value.errno == errno.ENOENT
    with pytest.raises(ValueError):
        DeformUXNet(**SMALL).load(path)  # a uxnet file into a deformux model: strict mismatch


@pytest.mark.parametrize("x, error, word", [
    (np.zeros((1, 1, 16, 16, 24), np.float32), ValueError, "multiples of 16"),
    (np.zeros((1, 2, 16, 16, 16), np.float32), ValueError, "(N, 1, D, H, W)"),
    (np.zeros((1, 1, 16, 16, 16)), TypeError, "float32"),
    (np.zeros((1, 16, 16, 16), np.float32), ValueError, "(N, 1, D, H, W)"),
    (np.zeros((1, 1, 16, 16, 32), np.float32)[..., ::2], ValueError, "C-contiguous"),
    ([[0.0]], TypeError, "numpy.ndarray"),
])
def test_forward_rejects_bad_input(x, error, word):
    with pytest.raises(error) as e:
        DeformUXNet(**SMALL).forward(x)
    assert word in str(e.value)


@pytest.mark.parametrize("kwargs, word", [
    (dict(block="convnext"), "block"), (dict(mlp="wide"), "mlp"), (dict(feature_size=(8, 16)), "feature_size"),
    (dict(offset_mode="shifted"), "offset_mode"), (dict(kernel_size=4, block="uxnet"), "kernel_size"),
    (dict(in_channels=0), "in_channels"),
])
def test_bad_configuration(kwargs, word):
    with pytest.raises((ValueError, TypeError)) as e:
        DeformUXNet(**{**SMALL, **kwargs})
    assert word in str(e.value)


def test_progress_and_cancellation():
    m = DeformUXNet(**SMALL)
    x = np.zeros((1, 1, 16, 16, 16), np.float32)
    seen = []
    m.forward(x, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 12) for i in range(1, 13)]
    with pytest.raises(deformux.DeformUXError) as e:
        m.forward(x, progress=lambda done, total: done < 4)
    assert "cancel" in str(e.value)

    def boom(done, total):
        raise KeyError("from the callback")
    with pytest.raises(KeyError):
        m.forward(x, progress=boom)
    assert m.forward(x).shape == (1, 3, 16, 16, 16)  # still usable


def _forward_of_at_least(m, seconds):
    """An input for which one forward of `m` takes >= `seconds` (or the largest tried), and that time."""
    for shape in [(1, 1, 16, 16, 16), (1, 1, 16, 32, 32), (1, 1, 32, 32, 32), (1, 1, 32, 32, 64), (1, 1, 64, 64, 64)]:
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        m.forward(x)  # the first forward of a size allocates the model's activation memory
        t0 = time.perf_counter()
        m.forward(x)
        one_call = time.perf_counter() - t0
        if one_call >= seconds:
            break
    return x, one_call


def test_forward_releases_the_gil():
    """While a worker thread runs forwards (each >= ~80 ms), the main thread keeps counting in a Python
    loop at a good fraction of its solo rate; with the GIL held it would get only the switch intervals
    between calls (test_gil_check_detects_a_held_gil shows the same check failing then)."""
    deformux.set_num_threads(1)  # leave a core for the counting thread on a 2-core machine
    m = DeformUXNet(**SMALL)
    x, one_call = _forward_of_at_least(m, 0.08)
    calls = max(3, int(np.ceil(0.8 / one_call)))
    rate, solo = main_thread_rate_during(lambda: m.forward(x), calls)
    assert rate >= 0.3 * solo, (f"main thread counted at {rate:.3g}/s during {calls} forwards of "
                                f"{one_call * 1e3:.0f} ms, solo {solo:.3g}/s: the GIL seems to be held")


def test_gil_check_detects_a_held_gil():
    """The check above fails for work that holds the GIL: usleep called through ctypes.PyDLL (which
    keeps the GIL) for as long as the forward takes."""
    libc = ctypes.PyDLL(None)
    one_call = 0.08
    calls = int(np.ceil(0.8 / one_call))
    rate, solo = main_thread_rate_during(lambda: libc.usleep(int(one_call * 1e6)), calls)
    assert rate < 0.3 * solo, f"main thread counted at {rate:.3g}/s while the GIL was held, solo {solo:.3g}/s"


def conv_macs(out_voxels, cin, cout, k, groups=1):
    """Multiply-adds of a convolution: every output value sums (cin / groups) * k^3 products."""
    return out_voxels * cout * (cin // groups) * k ** 3


def expected_summary(config, n, size):
    """[(module, output shape, parameters, multiply-adds)] of DeformUXNet.summary, derived here from the
    architecture (ARCHITECTURE.md sections 1-4): each module's convolutions from their shapes; norms,
    activations and the deformable sampling itself count no multiply-adds. Parameters are summed from
    deformux.convert.expected_shapes (section 5) by the module's name prefix."""
    shapes = convert.expected_shapes(config)
    cin, cout, f, hidden = config["in_channels"], config["out_channels"], config["feature_size"], config["hidden_size"]
    e = "deformuxnet_3d." if config["block"] == "deformux" else "uxnet_3d."

    def grid(level):  # spatial size after `level` halvings
        return tuple(s >> level for s in size)

    def vox(level):
        return n * int(np.prod(grid(level)))

    def params(module):
        return sum(int(np.prod(v)) for k, v in shapes.items() if k.startswith(module + "."))

    def res_block(level, a, b):  # conv1 3x3x3 a->b, conv2 3x3x3 b->b, conv3 1x1x1 a->b when the width changes
        v = vox(level)
        return conv_macs(v, a, b, 3) + conv_macs(v, b, b, 3) + (conv_macs(v, a, b, 1) if a != b else 0)

    rows = []

    def add(module, channels, level, macs):
        rows.append((module, (n, channels) + grid(level), params(module), macs))

    add(e + "downsample_layers.0", f[0], 1, conv_macs(vox(1), cin, f[0], 7))  # k7 stride 2: output at S/2
    for i in range(4):
        level, c = i + 1, f[i]
        if i > 0:
            add(e + f"downsample_layers.{i}", c, level, conv_macs(vox(level), f[i - 1], c, 2))  # k2 stride 2
        for j in range(config["depths"][i]):
            v = vox(level)
            if config["block"] == "deformux":
                standard = config.get("deformable", "depthwise") == "standard"
                macs = conv_macs(v, c, c, 3, groups=1 if standard else c)       # the DDC's 3x3x3 taps
                macs += conv_macs(v, c, 81, config.get("offset_kernel", 1))      # its offset branch, 81 channels
            else:
                macs = conv_macs(v, c, c, config["kernel_size"], groups=c)      # UX-Net's depthwise conv
            groups = {"dense": 1, "grouped": c}.get(config["mlp"])
            if groups is not None:                                              # pwconv1 C->4C, pwconv2 4C->C
                macs += conv_macs(v, c, 4 * c, 1, groups) + conv_macs(v, 4 * c, c, 1, groups)
            add(e + f"stages.{i}.{j}", c, level, macs)
        add(e + f"norm{i}", c, level, 0)
    widths = [cin] + list(f) + [hidden]
    for k in range(1, 6):
        add(f"encoder{k}", widths[k], max(k - 1, 0), res_block(max(k - 1, 0), widths[k - 1], widths[k]))
    for k in range(5, 1, -1):
        a, b = widths[k], widths[k - 1]
        level = k - 2
        up = vox(level + 1) * a * b * 8  # transposed k2 s2: each input voxel meets an a x b x 2x2x2 kernel
        add(f"decoder{k}", b, level, up + res_block(level, 2 * b, b))
    add("decoder1", f[0], 0, res_block(0, f[0], f[0]))
    add("out", cout, 0, conv_macs(vox(0), f[0], cout, 1))
    return rows


def parse_summary(text):
    """[(module, output shape, parameters, GMACs)] and the total (parameters, GMACs) of a summary text."""
    lines = text.strip().splitlines()
    assert lines[0].split() == ["module", "output", "parameters", "GMACs"], lines[0]
    rows = []
    for line in lines[1:-1]:
        module, rest = line.split(None, 1)
        shape, rest = rest.split(")", 1)
        p, g = rest.split()
        rows.append((module, tuple(int(d) for d in shape.strip("( ").split(",")), int(p), float(g)))
    word, p, g = lines[-1].split()
    assert word == "total"
    return rows, (int(p), float(g))


@pytest.mark.parametrize("kwargs, size, batch", [
    ({}, 96, 1),  # the paper's model at 96^3: 55,790,776 parameters, 582.088 GMACs (section 6: "580 G")
    (dict(in_channels=2, out_channels=5, feature_size=(6, 10, 14, 18), depths=(1, 2, 0, 3), hidden_size=20,
          mlp="grouped", offset_kernel=3), (80, 96, 112), 3),
    (dict(block="uxnet", kernel_size=5, out_channels=4, feature_size=(8, 12, 20, 28), depths=(2, 1, 1, 1),
          hidden_size=36), (64, 48, 96), 2),
    (dict(out_channels=3, feature_size=(5, 7, 9, 11), depths=(1, 1, 2, 1), hidden_size=13, mlp="none",
          deformable="standard", offset_planes="xz"), (96, 80, 64), 4),
])
def test_summary_matches_macs_derived_from_the_layer_shapes(kwargs, size, batch):
    m = DeformUXNet(**kwargs)
    config = m.config
    rows, (total_params, total_gmacs) = parse_summary(m.summary(size, batch=batch))
    want = expected_summary(config, batch, (size,) * 3 if isinstance(size, int) else size)
    assert [r[0] for r in rows] == [w[0] for w in want]
    for (module, shape, params, gmacs), (_, want_shape, want_params, want_macs) in zip(rows, want):
        assert shape == want_shape, module
        assert params == want_params, module
        # The text has 3 decimals of GMACs: equal to within its rounding.
        assert abs(gmacs - want_macs / 1e9) <= 0.0005 + 1e-9, f"{module}: {gmacs} GMACs, derived {want_macs / 1e9:.6f}"
    assert total_params == sum(w[2] for w in want) == m.num_parameters()
    assert abs(total_gmacs - sum(w[3] for w in want) / 1e9) <= 0.0005 + 1e-9
    if not kwargs:
        assert total_params == 55_790_776 and sum(w[3] for w in want) == 582_088_384_512


def test_threads_share_a_model_safely_and_release_memory():
    m = DeformUXNet(**SMALL, seed=2)
    xs = [np.random.default_rng(i).standard_normal((1, 1, 16, 16, 32)).astype(np.float32) for i in range(4)]
    want = [m.forward(x) for x in xs]
    got = [None] * 4

    def run(i):
        got[i] = m.forward(xs[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        assert np.array_equal(g, w)
    m.release_memory()
    assert np.array_equal(m.forward(xs[0]), want[0])


def test_extension_checks_the_output_array():
    m = DeformUXNet(**SMALL)
    x = np.zeros((1, 1, 16, 16, 16), np.float32)
    s = m.session()._handle
    with pytest.raises(ValueError) as e:
        deformux._C.session_forward(s, x, np.empty((1, 2, 16, 16, 16), np.float32), None)
    assert "(N, 3, D, H, W)" in str(e.value)
    with pytest.raises(ValueError):
        deformux._C.session_forward(s, np.zeros((1, 2, 16, 16, 16), np.float32),
                                    np.empty((1, 3, 16, 16, 16), np.float32), None)
    with pytest.raises(ValueError):
        deformux._C.session_backward(s, x, np.empty((1, 2, 16, 16, 16), np.float32), None, None)


def test_operator_scratch_is_kept_per_thread_and_can_be_released():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 5, 6, 7)).astype(np.float32)
    off = rng.uniform(-2, 2, (1, 81, 5, 6, 7)).astype(np.float32)
    w = rng.standard_normal((3, 1, 3, 3, 3)).astype(np.float32)
    first = deformux.ops.deform_conv3d(x, off, w)
    deformux.release_memory()
    assert np.array_equal(deformux.ops.deform_conv3d(x, off, w), first)
    out = [None]
    t = threading.Thread(target=lambda: out.__setitem__(0, deformux.ops.deform_conv3d(x, off, w)))
    t.start()
    t.join()
    assert np.array_equal(out[0], first)
