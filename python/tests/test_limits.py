"""Extreme sizes from Python are errors, never traps (issue 6, item 3), and the API's other edges: NumPy
integers wherever an int is taken, and files that cannot be read or written raise OSError subclasses
that carry the path (the should-fix list).

The size cases run in a separate interpreter (isolated.run_cases): before the fix several of them
aborted the interpreter (SIGILL from Swift's overflow trap), which would have ended the test run; here
such a case fails as "crashed" and the others still report.
"""
import errno
import os
import pathlib

import numpy as np
import pytest

import deformux
import isolated
from deformux import DeformUXNet, convert, demo, nifti

SETUP = """
from deformux import nifti
m = DeformUXNet(**SMALL)
import atexit, shutil, tempfile
tmp = tempfile.mkdtemp()
atexit.register(shutil.rmtree, tmp, True)
f4 = np.zeros(4, np.float32)
"""

# label: (expression, exception it must raise, words its message must contain). "returned": no error.
CASES = {
    # summary: input sizes and batch (the MAC counts overflowed and trapped)
    "summary(96**3)": ("m.summary(96**3)", "ValueError", "too large"),
    "summary(2**62)": ("m.summary(2**62)", "ValueError", "too large"),
    "summary batch 2**62": ("m.summary(96, batch=2**62)", "ValueError", "too large"),
    "summary batch 10**30": ("m.summary(96, batch=10**30)", "ValueError", "batch"),
    "summary 2**63": ("m.summary(2**63)", "ValueError", "input_size"),
    "summary -16": ("m.summary(-16)", "ValueError", "input_size"),
    "summary (16, 16, 0)": ("m.summary((16, 16, 0))", "ValueError", "input_size"),
    "summary 2**40 x 16 x 16 (countable)": ("m.summary((2**40, 16, 16))", "returned", ""),
    # configurations: bounded per field, and the parameter count by the layout's running total
    "kernel_size 2**19 - 1, 9 blocks": ("DeformUXNet(**SMALL, block='uxnet', kernel_size=2**19 - 1, depths=(9, 1, 1, 1))",
                                        "ValueError", "kernel_size"),
    "kernel_size 10**6 + 1": ("DeformUXNet(**SMALL, block='uxnet', kernel_size=10**6 + 1)", "ValueError", "kernel_size"),
    "depths 10**6": ("DeformUXNet(**dict(SMALL, depths=(10**6, 1, 1, 1)))", "ValueError", "depths"),
    "depths 2**62": ("DeformUXNet(**dict(SMALL, depths=(1, 1, 1, 2**62)))", "ValueError", "depths"),
    "feature_size 2**40": ("DeformUXNet(**dict(SMALL, feature_size=(2**40, 8, 8, 8)))", "ValueError", "feature_size"),
    "hidden_size 2**62": ("DeformUXNet(**dict(SMALL, hidden_size=2**62))", "ValueError", "hidden_size"),
    "hidden_size 10**30": ("DeformUXNet(**dict(SMALL, hidden_size=10**30))", "ValueError", "hidden_size"),
    "in_channels 2**63": ("DeformUXNet(**dict(SMALL, in_channels=2**63))", "ValueError", "in_channels"),
    "out_channels -1": ("DeformUXNet(**dict(SMALL, out_channels=-1))", "ValueError", "out_channels"),
    "every width and depth at its bound": ("DeformUXNet(feature_size=(16384,) * 4, depths=(64,) * 4, hidden_size=16384)",
                                           "ValueError", "configuration is too large"),
    "hidden_size at its bound": ("DeformUXNet(feature_size=(8, 8, 8, 16384), depths=(0, 0, 0, 0), hidden_size=16384)",
                                 "ValueError", "configuration is too large"),
    "seed 2**64": ("DeformUXNet(**SMALL, seed=2**64)", "ValueError", "seed"),
    "seed -1": ("DeformUXNet(**SMALL, seed=-1)", "ValueError", "seed"),
    # threads
    "set_num_threads 2**40": ("deformux.set_num_threads(2**40)", "ValueError", "set_num_threads"),
    "set_num_threads uint64 max": ("deformux.set_num_threads(np.uint64(2**64 - 1))", "ValueError", "set_num_threads"),
    # the extension's own entry points, with INT64_MAX-like values it lets through
    "_C summary n INT64_MAX": ("_C.model_summary(m._handle, 2**63 - 1, 16, 16, 16)", "ValueError", "too large"),
    "_C summary d INT64_MAX": ("_C.model_summary(m._handle, 1, 2**63 - 1, 16, 16)", "ValueError", "multiples of 16"),
    "_C summary 2**62 cube": ("_C.model_summary(m._handle, 1, 2**62, 2**62, 2**62)", "ValueError", "too large"),
    "_C summary n -1": ("_C.model_summary(m._handle, -1, 16, 16, 16)", "ValueError", "model_summary"),
    "_C summary d INT64_MIN": ("_C.model_summary(m._handle, 1, -2**63, 16, 16)", "ValueError", "model_summary"),
    "_C summary n 2**63 (not an int64)": ("_C.model_summary(m._handle, 2**63, 16, 16, 16)", "OverflowError", ""),
    "_C get_tensor INT64_MAX": ("_C.model_get_tensor(m._handle, 2**63 - 1, f4)", "ValueError", "index"),
    "_C get_tensor INT64_MIN": ("_C.model_get_tensor(m._handle, -2**63, f4)", "ValueError", "index"),
    "_C get_grad INT64_MAX": ("_C.model_get_grad(m._handle, 2**63 - 1, f4)", "ValueError", "index"),
    "_C set_num_threads INT32_MAX": ("_C.set_num_threads(2**31 - 1)", "ValueError", "set_num_threads"),
    "_C set_num_threads INT32_MIN": ("_C.set_num_threads(-2**31)", "ValueError", "set_num_threads"),
    "_C load_tensors 2**40 x 0": ("_C.model_load_tensors(m._handle, [('out.conv.conv.bias', np.zeros((2**40, 0), np.float32))], True)",
                                  "ValueError", "out.conv.conv.bias"),
    "_C nifti_write dims wrapping to 4 voxels": (
        "_C.nifti_write(os.path.join(tmp, 'a.nii'), f4, 16, (2**62 + 1, 4), np.eye(4), None, None, -1)", "ValueError", "dims"),
    "_C nifti_write dims INT64_MAX": (
        "_C.nifti_write(os.path.join(tmp, 'a.nii'), f4, 16, (2**63 - 1, 2**63 - 1, 4), np.eye(4), None, None, -1)",
        "ValueError", "dims"),
    "_C nifti_write negative dims": (
        "_C.nifti_write(os.path.join(tmp, 'a.nii'), f4, 16, (-1, -4), np.eye(4), None, None, -1)", "ValueError", "dims"),
    "nifti.save compression_level 2**40": (
        "nifti.save(os.path.join(tmp, 'b.nii.gz'), np.zeros((2, 2, 2), np.float32), np.eye(4), compression_level=2**40)",
        "ValueError", "compression_level"),
}


@pytest.fixture(scope="module")
def outcomes():
    return isolated.run_cases(SETUP, [(label, code) for label, (code, _, _) in CASES.items()])


@pytest.mark.parametrize("label", list(CASES))
def test_extreme_sizes_are_errors_not_traps(outcomes, label):
    code, kind, words = CASES[label]
    got_kind, message = outcomes[label]
    assert got_kind == kind, f"{code}: {got_kind}: {message} (expected {kind})"
    assert words in message, f"{code}: {message!r} lacks {words!r}"


# ---- NumPy integers wherever an int is taken ----

def test_compression_level_takes_numpy_integers(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    for level in (np.int64(5), np.int8(0), np.uint16(9), 3):
        path = tmp_path / f"v{int(level)}.nii.gz"
        nifti.save(path, data, np.eye(4), compression_level=level)
        assert np.array_equal(nifti.load(path).array, data)
    for bad in (1.0, True, "5", np.float32(5)):
        with pytest.raises(TypeError, match="compression_level"):
            nifti.save(tmp_path / "x.nii.gz", data, np.eye(4), compression_level=bad)
    for bad in (10, -2, np.int64(2**40)):
        with pytest.raises(ValueError, match="compression_level"):
            nifti.save(tmp_path / "x.nii.gz", data, np.eye(4), compression_level=bad)


def test_model_integers_are_bounded_with_the_argument_named():
    tiny = dict(out_channels=2, feature_size=(4, 4, 4, 4), depths=(1, 1, 1, 1), hidden_size=4)
    same = DeformUXNet(**tiny, seed=np.uint64(2**64 - 1)).state_dict()
    other = DeformUXNet(**tiny, seed=2**64 - 1).state_dict()
    assert all(np.array_equal(same[k], other[k]) for k in same)
    for kwargs, word in [(dict(seed=2**64), "seed"), (dict(hidden_size=2**63), "hidden_size"),
                         (dict(feature_size=(4, 4, 4, np.uint64(2**63))), r"feature_size\[3\]")]:
        with pytest.raises(ValueError, match=word):
            DeformUXNet(**{**tiny, **kwargs})
    with pytest.raises(ValueError, match="batch"):
        DeformUXNet(**tiny).summary(32, batch=np.uint64(2**64 - 1))


# ---- files: OSError subclasses with the path ----

class FsPath:
    def __init__(self, path):
        self.path = path

    def __fspath__(self):
        return self.path


def spellings(path):
    s = str(path)
    return [s, os.fsencode(s), pathlib.Path(s), FsPath(s)]


TINY = dict(out_channels=2, feature_size=(4, 4, 4, 4), depths=(1, 1, 1, 1), hidden_size=4)


def file_cases(tmp):
    """(label, call, exception class, the path it must name) for every function that takes a file."""
    m = DeformUXNet(**TINY)
    (tmp / "dir").mkdir()
    (tmp / "short.safetensors").write_bytes(b"abc")
    (tmp / "short.nii").write_bytes(b"abc")
    vol = np.zeros((2, 2, 2), np.float32)
    nifti.save(tmp / "v.nii", np.ones((4, 4, 4), np.float32), np.eye(4))
    missing, directory, nodir = tmp / "missing", tmp / "dir", tmp / "no" / "such" / "dir"
    blocked = tmp / "file"  # a file where a directory is needed
    blocked.write_bytes(b"")
    return [
        ("DeformUXNet.load missing", lambda p: m.load(p), missing / "w.safetensors", FileNotFoundError),
        ("DeformUXNet.load damaged", lambda p: m.load(p), tmp / "short.safetensors", deformux.FileFormatError),
        ("DeformUXNet.load directory", lambda p: m.load(p), directory, IsADirectoryError),
        ("DeformUXNet.save into a file", lambda p: m.save(p), blocked / "w.safetensors", NotADirectoryError),
        ("DeformUXNet.save over a directory", lambda p: m.save(p), directory, IsADirectoryError),
        ("DeformUXNet.from_file missing", lambda p: DeformUXNet.from_file(p), missing / "w.safetensors", FileNotFoundError),
        ("DeformUXNet.from_file damaged", lambda p: DeformUXNet.from_file(p), tmp / "short.safetensors",
         deformux.FileFormatError),
        ("DeformUXNet.from_file directory", lambda p: DeformUXNet.from_file(p), directory, IsADirectoryError),
        ("nifti.load missing", lambda p: nifti.load(p), missing / "v.nii.gz", FileNotFoundError),
        ("nifti.load damaged", lambda p: nifti.load(p), tmp / "short.nii", deformux.FileFormatError),
        ("nifti.load directory", lambda p: nifti.load(p), directory, IsADirectoryError),
        ("nifti.save no directory", lambda p: nifti.save(p, vol, np.eye(4)), nodir / "v.nii", FileNotFoundError),
        ("nifti.save into a file", lambda p: nifti.save(p, vol, np.eye(4)), blocked / "v.nii", NotADirectoryError),
        ("convert.read_safetensors missing", lambda p: convert.read_safetensors(p), missing / "t.safetensors",
         FileNotFoundError),
        ("convert.write_safetensors into a file", lambda p: convert.write_safetensors(p, {"a": vol}, {}),
         blocked / "t.safetensors", OSError),
        ("demo input missing", lambda p: demo.run(p, tmp / "o.nii", log=lambda *a: None), missing / "t1.nii.gz",
         FileNotFoundError),
        ("demo output into a file", lambda p: demo.run(tmp / "v.nii", p, slab=4, log=lambda *a: None),
         blocked / "o.nii", OSError),
    ]


def test_file_errors_are_oserrors_naming_the_path(tmp_path):
    failures = []
    for label, call, path, kind in file_cases(tmp_path):
        for p in spellings(path):
            try:
                call(p)
                failures.append(f"{label} ({type(p).__name__}): no error")
                continue
            except Exception as e:
                error = e
            where = os.fsdecode(os.fspath(p))
            # The path, or the part of it that is wrong (os.makedirs names the file in the way).
            named = {where} | {str(parent) for parent in pathlib.Path(where).parents if tmp_path in parent.parents}
            if not isinstance(error, kind):
                failures.append(f"{label} ({type(p).__name__}): {type(error).__name__}: {error} (expected {kind.__name__})")
            elif getattr(error, "filename", None) not in named:
                failures.append(f"{label} ({type(p).__name__}): the error does not name {where}: "
                                f"filename={getattr(error, 'filename', None)!r}, {error}")
            elif kind is FileNotFoundError and error.errno != errno.ENOENT:
                failures.append(f"{label}: errno {error.errno}")
    assert not failures, "\n".join(failures)
