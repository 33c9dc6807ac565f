"""The Python API takes NumPy integers wherever it takes an int, and bytes and os.PathLike paths wherever
it takes a str path (as Python's own IO functions do)."""
import os
import pathlib

import numpy as np
import pytest

import deformux
from deformux import DeformUXNet, convert, demo, nifti
from helpers import f32, rng

TINY = dict(out_channels=2, feature_size=(4, 4, 4, 4), depths=(1, 1, 1, 1), hidden_size=4)


class FsPath:
    """A minimal os.PathLike that is not a pathlib.Path (returns str or bytes)."""

    def __init__(self, path):
        self.path = path

    def __fspath__(self):
        return self.path


def path_kinds(path):
    """The same path as str, bytes, pathlib.Path and two other os.PathLike objects."""
    s = str(path)
    return [("str", s), ("bytes", os.fsencode(s)), ("pathlib", pathlib.Path(s)), ("PathLike str", FsPath(s)),
            ("PathLike bytes", FsPath(os.fsencode(s)))]


# ---- NumPy integers ----

@pytest.mark.parametrize("n", [np.int64(2), np.int32(1), np.uint8(3), np.int16(2)])
def test_set_num_threads_takes_numpy_integers(n):
    deformux.set_num_threads(n)
    assert deformux.get_num_threads() == int(n) and type(deformux.get_num_threads()) is int


@pytest.mark.parametrize("n", [np.float64(2.0), np.bool_(True), np.array([2])])
def test_set_num_threads_still_rejects_non_integers(n):
    with pytest.raises(TypeError, match="set_num_threads"):
        deformux.set_num_threads(n)


def test_model_sizes_and_seed_take_numpy_integers():
    plain = DeformUXNet(in_channels=2, out_channels=3, feature_size=(4, 6, 8, 10), depths=(1, 2, 0, 1),
                        hidden_size=12, kernel_size=5, block="uxnet", seed=7)
    numpy = DeformUXNet(in_channels=np.int64(2), out_channels=np.int32(3), feature_size=np.array([4, 6, 8, 10]),
                        depths=np.array([1, 2, 0, 1], np.uint8), hidden_size=np.int16(12), kernel_size=np.int64(5),
                        block="uxnet", seed=np.uint64(7))
    assert numpy.config == plain.config
    a, b = plain.state_dict(), numpy.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a), "the same seed must give the same weights"
    m = DeformUXNet(**TINY, offset_kernel=np.int64(3))
    assert m.config["offset_kernel"] == 3


def test_summary_sizes_take_numpy_integers():
    m = DeformUXNet(**TINY)
    want = m.summary((32, 48, 64), batch=2)
    assert m.summary(np.array([32, 48, 64]), batch=np.int64(2)) == want
    assert m.summary((np.int32(32), np.int64(48), np.uint16(64)), batch=np.int8(2)) == want
    assert m.summary(np.int64(32)) == m.summary(32)
    with pytest.raises(TypeError, match="input_size"):
        m.summary((32.0, 48, 64))
    with pytest.raises(TypeError, match="batch"):
        m.summary(32, batch=1.0)


def test_demo_slab_takes_numpy_integers(tmp_path):
    src = tmp_path / "in.nii"
    nifti.save(src, f32(rng(1).uniform(0, 1, (6, 7, 5))), np.eye(4))
    out = demo.run(src, tmp_path / "o.nii", slab=np.int64(2), log=lambda *a: None)
    assert out["shape"] == (6, 7, 5)
    with pytest.raises(TypeError, match="slab"):
        demo.run(src, tmp_path / "o.nii", slab=2.0, log=lambda *a: None)


# ---- paths ----

def test_model_save_load_and_from_file_take_any_path(tmp_path):
    m = DeformUXNet(**TINY, seed=3)
    want = m.state_dict()
    for label, p in path_kinds(tmp_path / "m.safetensors"):
        (tmp_path / "m.safetensors").unlink(missing_ok=True)
        m.save(p)
        assert (tmp_path / "m.safetensors").is_file(), label
        other = DeformUXNet(**TINY, seed=4)
        other.load(p)
        got = DeformUXNet.from_file(p).state_dict()
        for k in want:
            assert np.array_equal(other.state_dict()[k], want[k]) and np.array_equal(got[k], want[k]), (label, k)
    for label, p in path_kinds(tmp_path / "missing.safetensors"):
        with pytest.raises(FileNotFoundError) as e:
            m.load(p)
        assert e.value.filename == str(tmp_path / "missing.safetensors"), label


def test_converter_reader_and_writer_take_any_path(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    for label, p in path_kinds(tmp_path / "t.safetensors"):
        convert.write_safetensors(p, tensors, {"k": label})
        back, meta = convert.read_safetensors(p)
        assert meta == {"k": label} and np.array_equal(back["a"], tensors["a"]), label
    assert sorted(os.listdir(tmp_path)) == ["t.safetensors"]


def test_convert_takes_any_path(tmp_path, monkeypatch):
    """convert(src, dst) with bytes and os.PathLike paths (the checkpoint reader is replaced by one that
    needs no torch: it returns the tensors of a small configuration)."""
    config = {"in_channels": 1, "out_channels": 2, "feature_size": [4, 4, 4, 4], "depths": [1, 1, 1, 1],
              "hidden_size": 4, "block": "deformux", "mlp": "dense", "offset_mode": "official"}
    seen = []

    def fake_checkpoint(path, unsafe_pickle=False):
        seen.append(path)
        return {k: np.zeros(s, np.float32) for k, s in convert.expected_shapes(config).items()}

    monkeypatch.setattr(convert, "load_checkpoint", fake_checkpoint)
    for label, dst in path_kinds(tmp_path / "out.safetensors"):
        _, src = path_kinds(tmp_path / "in.pth")[len(seen) % 5]
        assert convert.convert(src, dst, log=lambda *a: None) == config, label
        assert seen[-1] == str(tmp_path / "in.pth"), label
        _, meta = convert.read_safetensors(tmp_path / "out.safetensors")
        assert meta["deformux.source"] == "in.pth", label
    assert DeformUXNet.from_file(tmp_path / "out.safetensors").config["feature_size"] == [4, 4, 4, 4]


def test_nifti_and_demo_take_any_path(tmp_path):
    data = f32(rng(2).uniform(0, 1, (5, 6, 4)))
    for label, p in path_kinds(tmp_path / "v.nii.gz"):
        nifti.save(p, data, np.eye(4))
        assert np.array_equal(nifti.load(p).array, data), label
    for label, p in path_kinds(tmp_path / "v.nii.gz"):
        out = tmp_path / "out.nii"
        _, out_p = path_kinds(out)[len(label) % 5]
        summary = demo.run(p, out_p, angle=5, slab=3, log=lambda *a: None)
        assert summary["output"] == str(out) and nifti.load(out).array.shape == (5, 6, 4), label
