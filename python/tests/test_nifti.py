"""deformux.nifti: the engine's NIfTI reader and writer through the C ABI.

Agreement with nibabel is checked twice: against the committed fixtures (Tests/Fixtures/nifti, what
nibabel read from each file; no nibabel needed) and, when nibabel is installed, directly on random files
written by either side."""
import gzip
import json
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

import deformux
from deformux import demo, nifti
from helpers import REPO, f32, rng

FIXTURES = REPO / "Tests" / "Fixtures" / "nifti"
MNI_AFFINE = np.array([[1, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]], dtype=np.float64)
ALL_DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.float32, np.float64]


def manifest():
    return json.loads((FIXTURES / "manifest.json").read_text())


def floats(values):
    """The manifest's repr strings (and "nan") as float64."""
    return np.array([float(v) for v in values], dtype=np.float64)


# ---- the bundled volume ----

def test_bundled_t1():
    img = nifti.load(demo.bundled_t1_path())
    assert img.array.shape == (197, 233, 189) and img.array.dtype == np.float32 and img.array.flags.c_contiguous
    np.testing.assert_array_equal(img.affine, MNI_AFFINE)
    assert img.affine.dtype == np.float64
    assert img.array.max() == 255 and img.array.min() == 0
    assert img.header["dtype"] == "uint8" and img.header["compressed"] and img.header["sform_code"] == 2
    assert img.zooms == (1.0, 1.0, 1.0) and img.spacing == (1.0, 1.0, 1.0) and img.shape == (197, 233, 189)
    mni = manifest()["mni"]
    assert float(img.array.astype(np.float64).sum()) == float(mni["sum"])
    for x, y, z, v in mni["points"]:
        assert img.array[x, y, z] == float(v)
    raw = nifti.load(demo.bundled_t1_path(), dtype="raw")
    assert raw.array.dtype == np.uint8 and np.array_equal(raw.array, img.array)
    labels = nifti.load(demo.bundled_t1_path(), dtype=np.int32)
    assert labels.array.dtype == np.int32 and np.array_equal(labels.array, img.array)
    assert len(img.header.raw) == 348


# ---- agreement with nibabel through the committed fixtures ----

@pytest.mark.parametrize("case", manifest()["cases"], ids=lambda c: c["name"])
def test_fixture_agrees_with_nibabel(case):
    img = nifti.load(FIXTURES / case["file"])
    expected = np.fromfile(FIXTURES / f"{case['name']}.f32", dtype="<f4").reshape(case["array_shape"])
    assert img.array.shape == tuple(case["array_shape"])
    assert np.array_equal(img.array.view(np.uint32), expected.view(np.uint32)), "float32 voxels differ from nibabel's"
    np.testing.assert_array_equal(img.affine, floats(case["affine"]).reshape(4, 4))
    np.testing.assert_array_equal(img.header["sform"], floats(case["sform"]).reshape(4, 4))
    if case["qform"] is None:
        assert img.header["qform"] is None
    else:
        np.testing.assert_array_equal(img.header["qform"], floats(case["qform"]).reshape(4, 4))
    assert img.shape == tuple(case["shape"])
    assert img.header["pixdim"] == floats(case["pixdim"]).tolist()
    assert img.zooms == tuple(floats(case["zooms"]))
    assert (img.header["sform_code"], img.header["qform_code"]) == (case["sform_code"], case["qform_code"])
    assert img.header["datatype"] == case["datatype"] and img.header["version"] == case["version"]
    assert img.header["big_endian"] == case["big_endian"] and img.header["compressed"] == case["gzip"]
    assert img.header["descrip"] == case["descrip"]
    assert [(c, b.rstrip(b"\0").hex()) for c, b in img.extensions] == [tuple(e) for e in case["extensions"]]
    raw = nifti.load(FIXTURES / case["file"], dtype="raw")
    dtype = nifti._DTYPE_OF_CODE[case["datatype"]]
    assert raw.array.dtype == dtype
    expected_raw = np.fromfile(FIXTURES / f"{case['name']}.raw", dtype=dtype.newbyteorder("<"))
    assert np.array_equal(raw.array.ravel(), expected_raw)
    view = img.nibabel_order()
    assert view.shape == img.shape


# ---- round trips ----

@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip_every_dtype(tmp_path, dtype, suffix):
    r = rng(int(np.dtype(dtype).num))
    dt = np.dtype(dtype)
    for shape in [(5, 4, 3), (2, 5, 4, 3), (3, 2, 4, 3, 2), (1, 1, 1)]:
        if dt.kind == "f":
            data = (r.standard_normal(shape) * 1e3).astype(dt)
        else:
            info = np.iinfo(dt)
            data = r.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
        affine = np.array([[-0.9, 0.1, 0, 90], [0.05, 1.1, -0.2, -126], [0, 0.3, 2.0, -72], [0, 0, 0, 1]])
        path = tmp_path / f"v{len(shape)}{suffix}"
        nifti.save(path, data, affine)
        back = nifti.load(path, dtype="raw")
        assert back.array.dtype == dt and back.array.shape == shape
        assert np.array_equal(back.array, data)
        assert back.shape == shape[-3:] + shape[:-3][::-1]
        np.testing.assert_array_equal(back.affine, affine.astype(np.float32).astype(np.float64))
        assert back.header["scl_slope"] == 1 and back.header["scl_inter"] == 0
        assert back.header["sform_code"] == 1 and back.header["qform_code"] == 1
        # this affine has shears, which the qform drops: its translation and voxel sizes stay
        np.testing.assert_allclose(back.header["qform"][:3, 3], affine[:3, 3], atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(back.header["qform"][:3, :3], axis=0),
                                   np.linalg.norm(affine[:3, :3], axis=0), rtol=1e-6)
        assert back.header["compressed"] == (suffix == ".nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"v{n}{suffix}" for n in (3, 4, 5))


def test_layout_is_x_y_z_and_nibabel_order(tmp_path):
    """[x][y][z]: the file's second value is x = 1; 4-D arrays are (t, x, y, z)."""
    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    nifti.save(tmp_path / "a.nii", data, np.eye(4))
    stored = np.frombuffer((tmp_path / "a.nii").read_bytes()[352:], dtype="<f4")
    assert stored[1] == data[1, 0, 0] and stored[2] == data[0, 1, 0]
    assert np.array_equal(stored, data.ravel(order="F"))
    t = np.arange(5 * 2 * 3 * 4, dtype=np.int16).reshape(5, 2, 3, 4)
    nifti.save(tmp_path / "t.nii", t, np.eye(4))
    img = nifti.load(tmp_path / "t.nii", dtype="raw")
    assert img.shape == (2, 3, 4, 5) and np.array_equal(img.array, t)
    assert np.array_equal(img.nibabel_order(), np.moveaxis(t, 0, -1))
    stored = np.frombuffer((tmp_path / "t.nii").read_bytes()[352:], dtype="<i2")
    assert np.array_equal(stored, np.moveaxis(t, 0, -1).ravel(order="F"))


@pytest.mark.parametrize("kind", ["str", "bytes", "pathlike"])
def test_paths_may_be_str_bytes_or_pathlike(tmp_path, kind):
    p = tmp_path / "p.nii.gz"
    path = {"str": str(p), "bytes": os.fsencode(p), "pathlike": p}[kind]
    nifti.save(path, np.ones((2, 2, 2), np.float32), np.eye(4))
    assert nifti.load(path).array.sum() == 8


def test_save_converts_dtypes_only_exactly(tmp_path):
    path = tmp_path / "l.nii.gz"
    labels = np.array([0, 1, 2, 3, 255, 7, 0, 1], dtype=np.float32).reshape(2, 2, 2)
    nifti.save(path, labels, np.eye(4), dtype=np.uint8)
    img = nifti.load(path, dtype="raw")
    assert img.array.dtype == np.uint8 and np.array_equal(img.array, labels)
    nifti.save(path, labels > 1, np.eye(4))
    assert nifti.load(path, dtype="raw").array.dtype == np.uint8
    with pytest.raises(ValueError, match="non-integer"):
        nifti.save(path, labels + 0.5, np.eye(4), dtype=np.uint8)
    with pytest.raises(ValueError, match="do not fit in uint8"):
        nifti.save(path, labels + 1, np.eye(4), dtype=np.uint8)
    with pytest.raises(ValueError, match="do not fit in int8"):
        nifti.save(path, np.full((2, 2, 2), 200, np.int16), np.eye(4), dtype=np.int8)
    with pytest.raises(ValueError, match="non-finite"):
        nifti.save(path, np.full((2, 2, 2), np.nan, np.float32), np.eye(4), dtype=np.int16)
    with pytest.raises(TypeError, match="float16"):
        nifti.save(path, np.zeros((2, 2, 2), np.float16), np.eye(4))
    with pytest.raises(TypeError, match="dtype must be one of"):
        nifti.save(path, labels, np.eye(4), dtype=np.complex64)
    nifti.save(path, np.zeros((2, 2, 2), np.float16), np.eye(4), dtype=np.float32)
    big_endian = np.arange(8, dtype=">i4").reshape(2, 2, 2)
    nifti.save(path, big_endian, np.eye(4))
    assert np.array_equal(nifti.load(path, dtype="raw").array, big_endian)


def test_label_map_from_a_float_template(tmp_path):
    """A label map written with a scaled float image's header: uint8, scl 1/0, the template's spatial
    fields and description kept."""
    src = nifti.load(FIXTURES / "scale_float32.nii")
    assert src.header["scl_slope"] == 1.5
    labels = (np.arange(src.array.size) % 4).astype(np.uint8).reshape(src.array.shape)
    out = tmp_path / "labels.nii.gz"
    nifti.save(out, labels, src.affine, header=src)
    img = nifti.load(out, dtype="int32")
    assert img.header["dtype"] == "uint8" and img.header["bitpix"] == 8
    assert img.header["scl_slope"] == 1 and img.header["scl_inter"] == 0
    assert np.array_equal(img.array, labels)
    for key in ("sform_code", "qform_code", "srow", "quatern", "qoffset", "pixdim", "descrip", "xyzt_units"):
        assert img.header[key] == src.header[key], key
    np.testing.assert_array_equal(img.affine, src.affine)
    # header= takes the image's .header too, and the affine defaults to the template's
    nifti.save(out, labels, header=src.header, description="labels")
    again = nifti.load(out)
    np.testing.assert_array_equal(again.affine, src.affine)
    assert again.header["descrip"] == "labels"
    # a moved affine: new sform/qform with the template's codes
    moved = src.affine.copy()
    moved[:3, 3] += 5
    nifti.save(out, labels, moved, header=src)
    img = nifti.load(out)
    np.testing.assert_allclose(img.affine, moved, atol=1e-5)
    assert (img.header["sform_code"], img.header["qform_code"]) == (src.header["sform_code"], src.header["qform_code"])
    # extensions carry over
    ext = nifti.load(FIXTURES / "extensions.nii")
    nifti.save(out, labels, header=ext)
    assert nifti.load(out).extensions == ext.extensions


def test_load_int32_refuses_non_integers(tmp_path):
    path = tmp_path / "f.nii"
    nifti.save(path, np.full((2, 2, 2), 0.5, np.float32), np.eye(4))
    with pytest.raises(ValueError, match="not an integer"):
        nifti.load(path, dtype="int32")
    with pytest.raises(ValueError, match="'float32', 'int32' or 'raw'"):
        nifti.load(path, dtype="float64")
    with pytest.raises(TypeError):
        nifti.load(path, dtype=object())


# ---- errors ----

def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        nifti.load(tmp_path / "missing.nii.gz")
    assert e.value.filename == str(tmp_path / "missing.nii.gz") and "missing.nii.gz" in str(e.value)
    assert e.value.operation == "nifti_open"
    with pytest.raises(IsADirectoryError):
        nifti.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        nifti.save(tmp_path / "no" / "dir.nii", np.zeros((2, 2, 2), np.float32), np.eye(4))
    with pytest.raises(TypeError):
        nifti.load(12)


def header(**fields):
    """A valid little-endian NIfTI-1 header for a 2x3x4 uint8 volume, with fields overridden."""
    h = bytearray(348)
    values = {"sizeof_hdr": 348, "dim": (3, 2, 3, 4, 1, 1, 1, 1), "datatype": 2, "bitpix": 8,
              "vox_offset": 352.0, "magic": b"n+1\x00"}
    values.update(fields)
    struct.pack_into("<i", h, 0, values["sizeof_hdr"])
    struct.pack_into("<8h", h, 40, *values["dim"])
    struct.pack_into("<2h", h, 70, values["datatype"], values["bitpix"])
    struct.pack_into("<8f", h, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", h, 108, values["vox_offset"])
    h[344:348] = values["magic"]
    return bytes(h)


def write_raw(tmp_path, hdr, nbytes=24, name="bad.nii"):
    path = tmp_path / name
    path.write_bytes(hdr + b"\0" * 4 + bytes(range(nbytes)))
    return path


def test_minimal_header_and_fallback_affine(tmp_path):
    """No sform or qform: nibabel's fallback (x flipped, centred on the grid)."""
    img = nifti.load(write_raw(tmp_path, header()))
    assert img.array.shape == (2, 3, 4) and img.array[1, 0, 0] == 1 and img.array[0, 1, 0] == 2
    np.testing.assert_array_equal(img.affine, [[-1, 0, 0, 0.5], [0, 1, 0, -1], [0, 0, 1, -1.5], [0, 0, 0, 1]])
    assert img.header["affine_source"] == "pixdim"


def test_big_endian_file_built_by_hand(tmp_path):
    h = bytearray(header())
    struct.pack_into(">i", h, 0, 348)
    struct.pack_into(">8h", h, 40, 3, 2, 3, 4, 1, 1, 1, 1)
    struct.pack_into(">2h", h, 70, 4, 16)
    struct.pack_into(">8f", h, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into(">f", h, 108, 352.0)
    struct.pack_into(">2f", h, 112, 2.0, -1.0)
    data = np.arange(24, dtype=">i2")
    path = tmp_path / "be.nii"
    path.write_bytes(bytes(h) + b"\0" * 4 + data.tobytes())
    img = nifti.load(path)
    assert img.header["big_endian"]
    assert np.array_equal(img.array, np.arange(24).reshape((2, 3, 4), order="F") * 2.0 - 1.0)
    raw = nifti.load(path, dtype="raw")
    assert raw.array.dtype == np.int16 and raw.array.dtype.isnative


@pytest.mark.parametrize("fields,nbytes,message", [
    ({"sizeof_hdr": 349}, 24, "sizeof_hdr"),
    ({"magic": b"ni1\x00"}, 24, "two-file NIfTI"),
    ({"magic": b"xyz\x00"}, 24, "magic"),
    ({"dim": (0, 2, 3, 4, 1, 1, 1, 1)}, 24, r"dim\[0\]"),
    ({"dim": (6, 2, 3, 4, 1, 1, 1, 1)}, 24, "not supported"),
    ({"dim": (3, 2, 0, 4, 1, 1, 1, 1)}, 24, "at least 1"),
    ({"dim": (3, 2, -3, 4, 1, 1, 1, 1)}, 24, "at least 1"),
    ({"dim": (3, 32767, 32767, 32767, 1, 1, 1, 1)}, 24, "truncated"),
    ({"datatype": 32, "bitpix": 64}, 24, "complex64"),
    ({"datatype": 128, "bitpix": 24}, 24, "RGB24"),
    ({"vox_offset": 100.0}, 24, "vox_offset"),
    ({"vox_offset": 0.0}, 24, "vox_offset"),
    ({"vox_offset": float("nan")}, 24, "vox_offset"),
    ({"vox_offset": 4096.0}, 24, "truncated"),
    ({}, 23, "truncated"),
], ids=["sizeof_hdr", "two_file", "magic", "rank0", "rank6", "zero_dim", "negative_dim", "huge_dims", "complex",
        "rgb", "vox_offset_small", "vox_offset_zero", "vox_offset_nan", "vox_offset_past_end", "truncated"])
def test_damaged_files_raise_file_format_error(tmp_path, fields, nbytes, message):
    path = write_raw(tmp_path, header(**fields), nbytes)
    with pytest.raises(deformux.FileFormatError, match=message) as e:
        nifti.load(path)
    assert isinstance(e.value, OSError) and nifti.NiftiError is deformux.FileFormatError
    assert str(path) in str(e.value) and e.value.filename == str(path)
    assert e.value.status == 4 and e.value.operation == "nifti_open"


def test_short_corrupt_and_bomb_files(tmp_path):
    short = tmp_path / "short.nii"
    short.write_bytes(b"\0" * 100)
    with pytest.raises(deformux.FileFormatError, match="sizeof_hdr"):
        nifti.load(short)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(header() + b"\0" * 28)[:-12])
    with pytest.raises(deformux.FileFormatError, match="gzip"):
        nifti.load(corrupt)
    text = tmp_path / "text.nii"
    text.write_text("hello" * 100)
    with pytest.raises(deformux.FileFormatError, match="not a NIfTI file"):
        nifti.load(text)
    bomb = tmp_path / "bomb.nii.gz"  # 8e9 voxels declared in a few KB
    bomb.write_bytes(gzip.compress(header(dim=(3, 2000, 2000, 2000, 1, 1, 1, 1)) + bytes(1 << 20)))
    with pytest.raises(deformux.FileFormatError, match="gzip bomb"):
        nifti.load(bomb)


def test_bad_save_arguments_leave_the_old_file(tmp_path):
    path = tmp_path / "v.nii.gz"
    nifti.save(path, np.ones((2, 2, 2), np.float32), np.eye(4))
    before = path.read_bytes()
    data = np.zeros((2, 2, 2), np.float32)
    with pytest.raises(ValueError, match="4 x 4"):
        nifti.save(path, data, np.eye(3))
    with pytest.raises(ValueError, match=r"\(x, y, z\)"):
        nifti.save(path, np.zeros((2, 2)), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        nifti.save(path, data, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="singular|column"):
        nifti.save(path, data, np.zeros((4, 4)))
    with pytest.raises(ValueError, match=".nii"):
        nifti.save(tmp_path / "v.img", data, np.eye(4))
    with pytest.raises(ValueError, match="32767"):
        nifti.save(path, np.zeros((40000, 1, 1), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match="affine"):
        nifti.save(path, data)
    with pytest.raises(TypeError, match="header"):
        nifti.save(path, data, np.eye(4), header={"sform_code": 1})
    with pytest.raises(TypeError, match="numpy array"):
        nifti.save(path, [[[1.0]]], np.eye(4))
    with pytest.raises(ValueError, match="compression_level"):
        nifti.save(path, data, np.eye(4), compression_level=12)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"], "temporary files left behind"


def test_concurrent_loads_release_the_gil():
    """Several threads read at once (the engine call runs without the GIL) and agree."""
    path = demo.bundled_t1_path()
    results = [None] * 3

    def work(i):
        results[i] = float(nifti.load(path).array.sum(dtype=np.float64))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == results[2] == float(manifest()["mni"]["sum"])


# ---- agreement with nibabel on the same files (skipped without nibabel) ----

def test_reads_like_nibabel(tmp_path):
    nib = pytest.importorskip("nibabel", reason="nibabel is optional; the fixtures cover the same ground")
    r = rng(7)
    oblique = np.array([[0.94, -0.34, 0.0, -90.5], [0.34, 0.94, 0.1, 102.25], [0.0, -0.1, 2.5, -33.0], [0, 0, 0, 1]])
    for i, dtype in enumerate(ALL_DTYPES * 2):
        dt = np.dtype(dtype)
        shape = [(6, 5, 4), (3, 4, 5, 2), (2, 3, 2, 1, 3)][i % 3]
        data = (r.standard_normal(shape) * 100).astype(dt) if dt.kind == "f" else \
            r.integers(np.iinfo(dt).min, np.iinfo(dt).max, size=shape, dtype=dt, endpoint=True)
        img = (nib.Nifti2Image if i % 4 == 3 else nib.Nifti1Image)(data, oblique, dtype=dt)
        if i >= len(ALL_DTYPES):  # scaled, qform only, gzip
            img.header.set_slope_inter(0.25 + i, -3.5)
            img.header.set_sform(None, code=0)
            img.header.set_qform(oblique, code=1)
        path = tmp_path / f"n{i}.nii{'.gz' if i % 2 else ''}"
        nib.save(img, str(path))
        theirs = nib.load(str(path))
        mine = nifti.load(path)
        assert np.array_equal(mine.nibabel_order(), theirs.get_fdata(dtype=np.float32)), f"case {i} {dt}"
        np.testing.assert_array_equal(mine.affine, theirs.affine, err_msg=f"case {i}")
        assert mine.zooms == tuple(float(z) for z in theirs.header.get_zooms())


def test_nibabel_reads_what_we_write(tmp_path):
    nib = pytest.importorskip("nibabel", reason="nibabel is optional; the fixtures cover the same ground")
    r = rng(9)
    for i in range(12):
        q = r.standard_normal(4)
        q /= np.linalg.norm(q)
        a, b, c, d = q
        rot = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
        affine = np.eye(4)
        affine[:3, :3] = rot @ np.diag(r.uniform(0.3, 3, 3) * [1, 1, -1 if i % 2 else 1])
        affine[:3, 3] = r.uniform(-100, 100, 3)
        dtype = ALL_DTYPES[i % len(ALL_DTYPES)]
        data = (r.standard_normal((4, 3, 5)) * 50).astype(dtype)
        path = tmp_path / f"w{i}.nii{'.gz' if i % 2 else ''}"
        nifti.save(path, data, affine)
        theirs = nib.load(str(path))
        assert np.array_equal(np.asanyarray(theirs.dataobj), data)
        np.testing.assert_allclose(theirs.affine, affine, atol=1e-5, err_msg=f"case {i}")
        # the qform fields as nibabel's set_qform computes them from the same affine (all float32)
        ref = nib.Nifti1Header()
        ref.set_qform(affine, code=1)
        for key in ("quatern_b", "quatern_c", "quatern_d"):
            assert abs(float(theirs.header[key]) - float(ref[key])) <= 2.5e-7, (i, key)
        np.testing.assert_allclose(theirs.header["pixdim"][:4], ref["pixdim"][:4], rtol=2e-7, err_msg=f"case {i}")
        np.testing.assert_allclose([theirs.header[k] for k in ("qoffset_x", "qoffset_y", "qoffset_z")],
                                   [ref[k] for k in ("qoffset_x", "qoffset_y", "qoffset_z")], rtol=0)
        # and the matrix they make: float32 quaternions lose precision as the rotation nears 180 degrees
        # (a = sqrt(1 - b^2 - c^2 - d^2) small), for nibabel's own qforms as much
        np.testing.assert_allclose(theirs.header.get_qform(), affine, atol=2e-4, err_msg=f"case {i}: qform")
        assert int(theirs.header["sform_code"]) == 1 and int(theirs.header["qform_code"]) == 1
        mine = nifti.load(path)
        np.testing.assert_array_equal(mine.header["qform"], theirs.header.get_qform())
