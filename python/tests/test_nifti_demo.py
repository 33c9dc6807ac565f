"""The minimal NIfTI-1 reader/writer and the demo job (python3 -m deformux demo)."""
import gzip
import struct
import subprocess
import sys

import numpy as np
import pytest

import deformux
from deformux import demo, nifti
from helpers import f32, rng

T1 = demo.T1_NAME
MNI_AFFINE = np.array([[1, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]], dtype=np.float64)


def test_bundled_t1_is_found_and_read():
    path = demo.bundled_t1_path()
    assert path.name == T1
    vol = nifti.read_nifti(path)
    assert vol.data.shape == (197, 233, 189) and vol.data.dtype == np.uint8
    assert vol.data.flags.c_contiguous
    np.testing.assert_allclose(vol.affine, MNI_AFFINE)
    assert vol.data.max() == 255 and vol.data.min() == 0


def test_bundled_data_ships_its_licence():
    folder = demo.bundled_t1_path().parent
    for name in ("LICENSE.md", "nilearn-LICENSE-BSD3.txt"):
        assert (folder / name).is_file(), f"{name} must ship with the MNI152 data"


def test_reader_uses_fortran_order():
    """[x][y][z] indexing: the voxel at x=1, y=0, z=0 is the file's second value."""
    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    raw = data.ravel(order="F").tobytes()
    assert np.frombuffer(raw, np.float32)[1] == data[1, 0, 0]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_write_read_round_trip(tmp_path, suffix):
    r = rng(1)
    data = f32(r.standard_normal((5, 4, 3)))
    affine = np.array([[0.9, 0.1, 0, 10], [0, -1.1, 0.2, 20], [0.05, 0, 2.0, -30], [0, 0, 0, 1]])
    path = tmp_path / f"v{suffix}"
    nifti.write_nifti(path, data, affine)
    vol = nifti.read_nifti(path)
    assert np.array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "temporary files left behind"


def test_write_keeps_the_template_spatial_header(tmp_path):
    src = nifti.read_nifti(demo.bundled_t1_path())
    small = f32(np.zeros((3, 3, 3)))
    nifti.write_nifti(tmp_path / "o.nii.gz", small, src.affine, template_header=src.header)
    out = nifti.read_nifti(tmp_path / "o.nii.gz")
    np.testing.assert_array_equal(out.affine, src.affine)
    assert out.header[252:344] == src.header[252:344]


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "v.nii.gz"
    nifti.write_nifti(path, f32(np.ones((2, 2, 2))), np.eye(4))
    before = path.read_bytes()

    def boom(self, data):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(gzip.GzipFile, "write", boom)
    with pytest.raises(OSError, match="simulated"):
        nifti.write_nifti(path, f32(np.zeros((2, 2, 2))), np.eye(4))
    assert path.read_bytes() == before, "the old file must survive a failed write"
    assert [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"]


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="3D"):
        nifti.write_nifti(tmp_path / "a.nii", np.zeros((2, 2)), np.eye(4))
    with pytest.raises(ValueError, match="4 x 4"):
        nifti.write_nifti(tmp_path / "a.nii", np.zeros((2, 2, 2)), np.eye(3))
    assert not list(tmp_path.iterdir())


def header(**fields):
    """A valid little-endian header for a 2x3x4 uint8 volume, with fields overridden."""
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


def test_reader_accepts_the_minimal_header(tmp_path):
    vol = nifti.read_nifti(write_raw(tmp_path, header()))
    assert vol.data.shape == (2, 3, 4) and vol.data[1, 0, 0] == 1 and vol.data[0, 1, 0] == 2
    np.testing.assert_array_equal(vol.affine, np.eye(4))


def test_reader_reads_big_endian(tmp_path):
    h = bytearray(header(datatype=4, bitpix=16))
    struct.pack_into(">i", h, 0, 348)
    struct.pack_into(">8h", h, 40, 3, 2, 3, 4, 1, 1, 1, 1)
    struct.pack_into(">2h", h, 70, 4, 16)
    struct.pack_into(">8f", h, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into(">f", h, 108, 352.0)
    data = np.arange(24, dtype=">i2")
    path = tmp_path / "be.nii"
    path.write_bytes(bytes(h) + b"\0" * 4 + data.tobytes())
    vol = nifti.read_nifti(path)
    assert vol.data.dtype == np.int16 and vol.data.dtype.isnative
    assert np.array_equal(vol.data, np.arange(24).reshape((2, 3, 4), order="F"))


@pytest.mark.parametrize("fields,nbytes,message", [
    ({"sizeof_hdr": 540}, 24, "sizeof_hdr is not 348"),
    ({"magic": b"ni1\x00"}, 24, "two-file NIfTI"),
    ({"magic": b"xyz\x00"}, 24, "magic"),
    ({"dim": (0, 2, 3, 4, 1, 1, 1, 1)}, 24, r"dim\[0\]"),
    ({"dim": (3, 2, 0, 4, 1, 1, 1, 1)}, 24, "dimensions must be >= 1"),
    ({"datatype": 32, "bitpix": 64}, 24, "datatype 32 is not supported"),
    ({"bitpix": 16}, 24, "bitpix 16 does not match"),
    ({"vox_offset": 100.0}, 24, "vox_offset"),
    ({"vox_offset": 352.5}, 24, "vox_offset"),
    ({}, 23, "truncated"),
], ids=["sizeof_hdr", "two_file", "magic", "rank0", "zero_dim", "complex", "bitpix", "vox_offset_small",
        "vox_offset_fraction", "truncated"])
def test_reader_rejects_bad_files(tmp_path, fields, nbytes, message):
    path = write_raw(tmp_path, header(**fields), nbytes)
    with pytest.raises(nifti.NiftiError, match=message) as e:
        nifti.read_nifti(path)
    assert str(path) in str(e.value)


def test_reader_rejects_short_and_corrupt_files(tmp_path):
    short = tmp_path / "short.nii"
    short.write_bytes(b"\0" * 100)
    with pytest.raises(nifti.NiftiError, match="shorter than a NIfTI-1 header"):
        nifti.read_nifti(short)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(header() + b"\0" * 28)[:-12])
    with pytest.raises(nifti.NiftiError, match="cannot read"):
        nifti.read_nifti(corrupt)
    with pytest.raises(FileNotFoundError):
        nifti.read_nifti(tmp_path / "missing.nii")


def test_reader_applies_scaling(tmp_path):
    h = bytearray(header())
    struct.pack_into("<2f", h, 112, 2.0, -1.0)
    vol = nifti.read_nifti(write_raw(tmp_path, bytes(h)))
    assert vol.data.dtype == np.float32 and vol.data[1, 0, 0] == 1.0 and vol.data[0, 0, 0] == -1.0


# ---- the demo ----

def test_demo_slabs_equal_the_whole_volume():
    """Slab-by-slab processing (with its halo) gives the whole-volume operator's result."""
    vol = f32(rng(2).random((11, 13, 9)))
    whole, _ = demo.deform_volume(vol, angle_deg=12.0, slab=100)
    for slab in (1, 3, 4):
        sliced, _ = demo.deform_volume(vol, angle_deg=12.0, slab=slab)
        np.testing.assert_allclose(sliced, whole, rtol=0, atol=1e-6, err_msg=f"slab {slab}")


def test_demo_zero_angle_is_smoothing_only():
    vol = f32(rng(3).random((4, 5, 6)))
    out, _ = demo.deform_volume(vol, angle_deg=0.0)
    xp = np.pad(vol.astype(np.float64), 1)
    k = np.array([1.0, 2.0, 1.0]) / 4.0
    expected = sum(k[i] * k[j] * k[l] * xp[i:i + 4, j:j + 5, l:l + 6]
                   for i in range(3) for j in range(3) for l in range(3))
    np.testing.assert_allclose(out, expected, atol=1e-6)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "deformux", *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_demo_cli_end_to_end(tmp_path):
    """The main job on the bundled T1, with the default output path under the current directory."""
    result = run_cli("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out_path = tmp_path / "out" / "demo_ddc.nii.gz"
    assert out_path.is_file()
    for word in ("197 x 233 x 189", "threads", "ms", "correlation", str(out_path)):
        assert word in result.stdout, f"{word!r} missing from the summary:\n{result.stdout}"
    src = nifti.read_nifti(demo.bundled_t1_path())
    out = nifti.read_nifti(out_path)
    assert out.data.shape == src.data.shape and out.data.dtype == np.float32
    np.testing.assert_array_equal(out.affine, src.affine)
    assert np.all(np.isfinite(out.data)) and out.data.min() >= 0.0 and out.data.max() <= 1.0 + 1e-6
    scaled = src.data.astype(np.float64) / 255.0
    corr = np.corrcoef(scaled.ravel(), out.data.ravel())[0, 1]
    assert 0.7 < corr < 0.999, f"correlation {corr}: a 10-degree rotation should move the image, not destroy it"
    # the centre of rotation stays put: compare a central block
    c = tuple(s // 2 for s in src.data.shape)
    block = (slice(c[0] - 3, c[0] + 3), slice(c[1] - 3, c[1] + 3), slice(c[2] - 3, c[2] + 3))
    assert abs(out.data[block].mean() - scaled[block].mean()) < 0.05
    assert [p.name for p in out_path.parent.iterdir()] == ["demo_ddc.nii.gz"]


def test_demo_cli_options_and_errors(tmp_path):
    small = tmp_path / "small.nii.gz"
    nifti.write_nifti(small, f32(rng(4).random((6, 7, 8))), np.eye(4))
    result = run_cli("demo", "--input", str(small), "--output", "o/x.nii", "--angle", "5", "--threads", "1",
                     "--slab", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "6 x 7 x 8" in result.stdout and nifti.read_nifti(tmp_path / "o" / "x.nii").data.shape == (6, 7, 8)

    missing = run_cli("demo", "--input", str(tmp_path / "nope.nii.gz"), cwd=tmp_path)
    assert missing.returncode == 1 and "error" in missing.stderr and "nope.nii.gz" in missing.stderr
    not_nifti = tmp_path / "text.nii"
    not_nifti.write_text("hello" * 100)
    bad = run_cli("demo", "--input", str(not_nifti), cwd=tmp_path)
    assert bad.returncode == 1 and "sizeof_hdr" in bad.stderr
    threads = run_cli("demo", "--input", str(small), "--threads", "0", cwd=tmp_path)
    assert threads.returncode == 1 and "set_num_threads" in threads.stderr


def test_version_cli(tmp_path):
    result = run_cli("version", cwd=tmp_path)
    assert result.returncode == 0 and deformux.__version__ in result.stdout
