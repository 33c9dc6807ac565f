"""The bundled MNI152 data (deformux.data) and the overlay pictures (deformux.figures)."""
import struct
import zlib

import numpy as np
import pytest

from deformux import data, figures, nifti


def test_bundled_labels_follow_the_definition():
    """The committed label map equals the data notes' definition, computed here independently from the
    bundled T1 and GM/WM maps (float64; ties to the first class)."""
    mni = data.mni152()
    t1 = mni.t1.astype(np.float64)
    gm, wm = mni.gm.astype(np.float64) / 255, mni.wm.astype(np.float64) / 255
    csf = np.clip(1 - gm - wm, 0, 1)
    best = np.where(wm > np.maximum(csf, gm), 3, np.where(gm > csf, 2, 1))
    want = np.where(t1 / 255 > 0.2, best, 0)
    mismatches = int((mni.labels != want).sum())
    assert mismatches == 0, f"{mismatches} voxels differ"
    assert mni.labels.dtype == np.uint8 and mni.labels.shape == (197, 233, 189)
    assert np.array_equal(mni.affine, nifti.load(data.mni152_path("labels")).affine)
    counts = np.bincount(mni.labels.ravel(), minlength=4)
    assert all(counts[1:] > 100_000), counts
    assert mni.classes == ("background", "CSF", "grey matter", "white matter")


def test_split_and_licence():
    mni = data.mni152()
    training, validation = mni.split()
    z = np.arange(189)
    assert np.array_equal(validation[0, 0], (z >= 68) & (z < 124))
    assert np.array_equal(training[0, 0], (z < 60) | (z >= 132))
    assert not np.any(training & validation)
    folder = data.mni152_path("t1").parent
    for role in ("gm", "wm", "labels"):
        assert data.mni152_path(role).parent == folder
    assert (folder / "LICENSE.md").is_file()


def read_png(blob):
    """Decodes the PNGs figures.write_png makes (8-bit RGB, filter 0) into (H, W, 3)."""
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(blob):
        n = struct.unpack(">I", blob[pos:pos + 4])[0]
        kind, body = blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", blob[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2) and b"IEND" in chunks
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 3 * w + 1)
    assert np.all(raw[:, 0] == 0)
    return raw[:, 1:].reshape(h, w, 3)


def test_png_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 11, 3)).astype(np.uint8)
    figures.write_png(tmp_path / "x.png", rgb)
    np.testing.assert_array_equal(read_png((tmp_path / "x.png").read_bytes()), rgb)
    with pytest.raises(ValueError):
        figures.write_png(tmp_path / "y.png", np.zeros((3, 3)))


def test_overlay_shows_labels_in_the_right_places(tmp_path):
    """A cube labelled 1 in a volume: every panel shows its colour, centred on the cube; anisotropic
    spacing stretches the panels; an LPS-stored copy gives the same picture."""
    image = np.zeros((20, 30, 10), np.float32)
    image[5:15, 10:20, 2:8] = 100
    labels = np.zeros(image.shape, np.uint8)
    labels[8:12, 12:18, 3:7] = 1
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    path = figures.overlay_png(tmp_path / "o.png", image, labels, affine)
    rgb = read_png(path.read_bytes() if hasattr(path, "read_bytes") else open(path, "rb").read())
    # panels: sagittal (y 30 wide, z 10 x 2 mm = 20 high), coronal (x 20 x 20), axial (x 20 x y 30)
    assert rgb.shape == (30, 30 + 20 + 20 + 2 * 4, 3)
    red = rgb[..., 0].astype(int) - rgb[..., 1] > 50  # label 1 is drawn in red (230, 25, 75) at 45%
    columns = np.nonzero(red.any(axis=0))[0]
    assert columns.min() < 30 and columns.max() > 54, "the label shows in the first and the last panel"
    # The same volume stored as LPS (x and y flipped) shows the same picture.
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    lps[0, 3], lps[1, 3] = 19, 29
    again = figures.orthogonal_slices(image[::-1, ::-1], labels[::-1, ::-1], lps)
    np.testing.assert_array_equal(again, rgb)
    # A picture without labels, and bad shapes.
    assert figures.orthogonal_slices(image).shape == rgb.shape
    with pytest.raises(ValueError):
        figures.orthogonal_slices(image, labels[:5])


def test_label_tool_rewrites_the_committed_file(tmp_path):
    """tools/make_mni152_labels.py is deterministic: it rewrites the bundled labels byte for byte."""
    import subprocess
    import sys

    from helpers import REPO
    out = tmp_path / "labels.nii.gz"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "make_mni152_labels.py"), "--output", str(out)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 0, r.stdout
    assert out.read_bytes() == (REPO / "data" / "mni152" / "mni152_tissue_labels.nii.gz").read_bytes()
