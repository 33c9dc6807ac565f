"""deformux.DeformUXNet from Python: parameter counts (ARCHITECTURE.md section 6), agreement with the
PyTorch reference fixtures (Tests/Fixtures/network), weights in and out, input validation, progress and
cancellation, the GIL."""
import errno
import json
import os
import threading
import time

import numpy as np
import pytest

import deformux
from deformux import DeformUXNet

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "Tests", "Fixtures", "network")
SMALL = dict(out_channels=3, feature_size=(8, 12, 16, 24), hidden_size=32)


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


def test_forward_releases_the_gil():
    m = DeformUXNet(**SMALL)
    x = np.random.default_rng(1).standard_normal((1, 1, 32, 32, 32)).astype(np.float32)
    m.forward(x)
    t0 = time.perf_counter()
    m.forward(x)
    alone = time.perf_counter() - t0
    count = 0
    done = threading.Event()

    def run():
        m.forward(x)
        done.set()
    t = threading.Thread(target=run)
    t0 = time.perf_counter()
    t.start()
    while not done.is_set():
        count += 1
    t.join()
    # With the GIL held the loop could not run at all while the engine works.
    assert count > 1000, f"the main thread counted only {count} in {time.perf_counter() - t0:.2f} s ({alone:.2f} s alone)"


def test_summary():
    s = DeformUXNet().summary(96)
    assert "55790776" in s and "582.088" in s


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
    with pytest.raises(ValueError) as e:
        deformux._C.model_forward(m._handle, x, np.empty((1, 2, 16, 16, 16), np.float32), None)
    assert "(N, 3, D, H, W)" in str(e.value)
    with pytest.raises(ValueError):
        deformux._C.model_forward(m._handle, np.zeros((1, 2, 16, 16, 16), np.float32),
                                  np.empty((1, 3, 16, 16, 16), np.float32), None)


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
