"""The demo job (python3 -m deformux demo) and the bundled volume it reads (the NIfTI reader and writer
themselves: test_nifti.py)."""
import subprocess
import sys

import numpy as np

import deformux
from deformux import demo, nifti
from helpers import f32, rng

T1 = demo.T1_NAME
MNI_AFFINE = np.array([[1, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]], dtype=np.float64)


def test_bundled_t1_is_found_and_read():
    path = demo.bundled_t1_path()
    assert path.name == T1
    img = nifti.load(path)
    assert img.array.shape == (197, 233, 189) and img.header["dtype"] == "uint8"
    np.testing.assert_allclose(img.affine, MNI_AFFINE)


def test_bundled_data_ships_its_licence():
    folder = demo.bundled_t1_path().parent
    for name in ("LICENSE.md", "nilearn-LICENSE-BSD3.txt"):
        assert (folder / name).is_file(), f"{name} must ship with the MNI152 data"


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
    """The DDC operator demo on the bundled T1, with the default output path under the current directory."""
    result = run_cli("demo", "--ddc", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out_path = tmp_path / "out" / "demo_ddc.nii.gz"
    assert out_path.is_file()
    for word in ("197 x 233 x 189", "threads", "ms", "correlation", str(out_path)):
        assert word in result.stdout, f"{word!r} missing from the summary:\n{result.stdout}"
    src = nifti.load(demo.bundled_t1_path())
    out = nifti.load(out_path)
    assert out.array.shape == src.array.shape and out.header["dtype"] == "float32"
    np.testing.assert_array_equal(out.affine, src.affine)
    assert out.header["sform_code"] == src.header["sform_code"] and out.header["srow"] == src.header["srow"]
    assert np.all(np.isfinite(out.array)) and out.array.min() >= 0.0 and out.array.max() <= 1.0 + 1e-6
    scaled = src.array.astype(np.float64) / 255.0
    corr = np.corrcoef(scaled.ravel(), out.array.ravel())[0, 1]
    assert 0.7 < corr < 0.999, f"correlation {corr}: a 10-degree rotation should move the image, not destroy it"
    # the centre of rotation stays put: compare a central block
    c = tuple(s // 2 for s in src.array.shape)
    block = (slice(c[0] - 3, c[0] + 3), slice(c[1] - 3, c[1] + 3), slice(c[2] - 3, c[2] + 3))
    assert abs(out.array[block].mean() - scaled[block].mean()) < 0.05
    assert [p.name for p in out_path.parent.iterdir()] == ["demo_ddc.nii.gz"]


def test_demo_cli_options_and_errors(tmp_path):
    small = tmp_path / "small.nii.gz"
    nifti.save(small, f32(rng(4).random((6, 7, 8))), np.eye(4))
    result = run_cli("demo", "--ddc", "--input", str(small), "--output", "o/x.nii", "--angle", "5", "--threads", "1",
                     "--slab", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "6 x 7 x 8" in result.stdout and nifti.load(tmp_path / "o" / "x.nii").array.shape == (6, 7, 8)

    missing = run_cli("demo", "--ddc", "--input", str(tmp_path / "nope.nii.gz"), cwd=tmp_path)
    assert missing.returncode == 1 and "error" in missing.stderr and "nope.nii.gz" in missing.stderr
    not_nifti = tmp_path / "text.nii"
    not_nifti.write_text("hello" * 100)
    bad = run_cli("demo", "--ddc", "--input", str(not_nifti), cwd=tmp_path)
    assert bad.returncode == 1 and "sizeof_hdr" in bad.stderr
    threads = run_cli("demo", "--ddc", "--input", str(small), "--threads", "0", cwd=tmp_path)
    assert threads.returncode == 1 and "set_num_threads" in threads.stderr


def test_version_cli(tmp_path):
    result = run_cli("version", cwd=tmp_path)
    assert result.returncode == 0 and deformux.__version__ in result.stdout
