"""deformux.segment and deformux.Segmenter through the real C path: arrays, NIfTI paths and images,
nibabel images, reoriented inputs, progress, cancellation, Ctrl-C and errors. Tiny random-weight models
(tests/segment_helpers.py), small volumes."""
import _thread
import json
import sys
import threading
import time

import numpy as np
import pytest

import deformux
from deformux import nifti
from segment_helpers import blob, save_tiny_model, tiny_net


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    save_tiny_model(d)
    return d


@pytest.fixture(scope="module")
def card(model_dir):
    return model_dir / "tiny.json"


AFFINE = np.array([[0, 0, -2.0, 40], [-1.5, 0, 0, 30], [0, 1.25, 0, -20], [0, 0, 0, 1]])


def test_array_in_labels_out(card):
    image = blob((20, 17, 13), seed=1)
    labels = deformux.segment(image, card, spacing=(1, 1, 1), progress=False)
    assert labels.dtype == np.uint8 and labels.shape == image.shape
    assert set(np.unique(labels)) <= {0, 1, 2} and len(np.unique(labels)) > 1
    # The same through a Segmenter, with probabilities that sum to one and give the labels.
    seg = deformux.Segmenter(card)
    again, probabilities = seg.segment(image, spacing=(1, 1, 1), return_probabilities=True, progress=False)
    np.testing.assert_array_equal(again, labels)
    assert probabilities.shape == (3,) + image.shape and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=0), 1, atol=1e-5)
    top = np.sort(probabilities, axis=0)
    clear = top[-1] - top[-2] > 1e-4
    np.testing.assert_array_equal(np.argmax(probabilities, axis=0)[clear], labels[clear])
    s = seg.statistics
    assert s["windows"] == s["windows_run"] >= 1 and s["window"] == [16, 16, 16] and s["units_per_window"] == 12
    assert s["input_size"] == [20, 17, 13] and s["total_seconds"] > 0
    # Other dtypes are converted (int16 CT-like data); a channel axis of 1 is the same image.
    np.testing.assert_array_equal(seg.segment(image.astype(np.float64), spacing=1, progress=False), labels)
    np.testing.assert_array_equal(seg.segment(image[None], spacing=1, progress=False), labels)
    ints = seg.segment(np.round(image).astype(np.int16), spacing=1, progress=False)
    assert ints.shape == image.shape
    assert seg.retained_bytes > 0
    seg.release_memory()


def test_nifti_path_in_nifti_out(card, tmp_path):
    image = blob((21, 17, 13), seed=2)
    path = tmp_path / "image.nii.gz"
    nifti.save(path, image, AFFINE, description="test input")
    out = tmp_path / "labels.nii.gz"
    result = deformux.segment(path, card, output=out, progress=False)
    assert isinstance(result, nifti.NiftiImage) and result.path == str(out)
    written = nifti.load(out, dtype="raw")
    assert written.header["dtype"] == "uint8" and written.array.shape == image.shape
    np.testing.assert_array_equal(written.array, result.array)
    np.testing.assert_allclose(written.affine, nifti.load(path).affine, atol=1e-6)
    assert written.header["sform_code"] == nifti.load(path).header["sform_code"]
    # Labels on the input grid: the same as segmenting the array with the file's affine.
    direct = deformux.segment(nifti.load(path).array, card, affine=nifti.load(path).affine, progress=False)
    np.testing.assert_array_equal(result.array, direct)
    # Without output: nothing written, a NiftiImage back; a NiftiImage in gives one out.
    in_memory = deformux.segment(str(path), card, progress=False)
    assert in_memory.path is None and in_memory.header["dtype"] == "uint8"
    np.testing.assert_array_equal(in_memory.array, result.array)
    img = nifti.load(path)
    labels_img, probs_img = deformux.segment(img, card, return_probabilities=True, progress=False)
    np.testing.assert_array_equal(labels_img.array, result.array)
    assert probs_img.array.shape == (3,) + image.shape
    # The returned images save with the input's header as template.
    nifti.save(tmp_path / "copy.nii", labels_img.array, labels_img.affine, header=labels_img.header)
    np.testing.assert_array_equal(nifti.load(tmp_path / "copy.nii", dtype="int32").array, result.array)


def test_reoriented_volume_gives_reoriented_labels(card):
    """The same image stored with permuted and flipped axes (its affine keeping every voxel's world
    position) gives the labels moved the same way, exactly: both reorient to one network grid."""
    a = blob((19, 14, 11), seed=3, centre=(8, 6, 4))
    affine = np.array([[1.5, 0, 0, -10], [0, 1, 0, 5], [0, 0, 2, 3], [0, 0, 0, 1]])
    nz = a.shape[2]
    b = np.ascontiguousarray(np.flip(np.transpose(a, (2, 0, 1)), axis=0))  # b[i, j, k] = a[j, k, nz - 1 - i]
    to_a = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [-1, 0, 0, nz - 1], [0, 0, 0, 1]], np.float64)
    seg = deformux.Segmenter(card)
    la = seg.segment(a, affine=affine, progress=False)
    assert seg.statistics["windows"] > 1
    lb = seg.segment(b, affine=affine @ to_a, progress=False)
    np.testing.assert_array_equal(lb, np.flip(np.transpose(la, (2, 0, 1)), axis=0))
    assert len(np.unique(la)) > 1
    # A flip of the voxel axis with the flipped affine: the labels flip.
    flip = np.array([[-1, 0, 0, a.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float64)
    lf = seg.segment(np.ascontiguousarray(a[::-1]), affine=affine @ flip, progress=False)
    np.testing.assert_array_equal(lf, la[::-1])


def test_nibabel_image_in_nibabel_image_out(card, tmp_path):
    nib = pytest.importorskip("nibabel", reason="nibabel images are an optional input")
    image = blob((18, 15, 12), seed=4)
    img = nib.Nifti1Image(image, AFFINE)
    result = deformux.segment(img, card, progress=False)
    assert isinstance(result, nib.Nifti1Image)
    np.testing.assert_allclose(result.affine, AFFINE)
    assert result.get_data_dtype() == np.uint8
    labels = np.asarray(result.dataobj)
    np.testing.assert_array_equal(labels, deformux.segment(image, card, affine=AFFINE, progress=False))
    nib.save(result, tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "labels.nii.gz").dataobj), labels)
    labels_img, probs_img = deformux.segment(img, card, return_probabilities=True, progress=False)
    assert probs_img.shape == image.shape + (3,)


def test_progress_counts_steps_and_cancels(card):
    image = blob((30, 16, 16), seed=5)
    seg = deformux.Segmenter(card)
    seen = []
    labels = seg.segment(image, spacing=1, progress=lambda done, total: seen.append((done, total)))
    windows = seg.statistics["windows"]
    assert windows == 3, "the grid is padded to 32 x 16 x 16: windows start at x 0, 8, 16"
    assert {t for _, t in seen} == {windows * 12}
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and dones[-1] == windows * 12 and len(set(dones)) >= windows * 12

    with pytest.raises(deformux.DeformUXError) as e:
        seg.segment(image, spacing=1, progress=lambda done, total: done < 15)
    assert e.value.status == 5 and "cancel" in str(e.value)

    def interrupt(done, total):
        if done >= 7:
            raise KeyboardInterrupt
        return True

    with pytest.raises(KeyboardInterrupt):
        seg.segment(image, spacing=1, progress=interrupt)
    # Usable afterwards, with the same result.
    np.testing.assert_array_equal(seg.segment(image, spacing=1, progress=False), labels)
    with pytest.raises(TypeError, match="progress"):
        seg.segment(image, spacing=1, progress="yes")


def test_ctrl_c_stops_a_long_segmentation(card):
    """A real SIGINT during the engine call (polled inside the windows) ends it promptly with
    KeyboardInterrupt; the segmenter works afterwards."""
    seg = deformux.Segmenter(card, overlap=0.875)
    image = blob((64, 64, 64), seed=6)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    start = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            seg.segment(image, spacing=1, progress=False)
            time.sleep(30)  # the segmentation was faster than the timer: wait for the interrupt here
    finally:
        timer.cancel()
    assert time.perf_counter() - start < 10
    small = blob((16, 16, 16), seed=7)
    assert seg.segment(small, spacing=1, progress=False).shape == small.shape


def test_overrides_and_model_forms(card, model_dir):
    image = blob((20, 18, 14), seed=8)
    by_card = deformux.segment(image, card, spacing=1, progress=False)
    # Weights with their sidecar card give the same; a DeformUXNet with the same window too.
    np.testing.assert_array_equal(deformux.segment(image, model_dir / "tiny.safetensors", spacing=1, progress=False),
                                  by_card)
    np.testing.assert_array_equal(deformux.segment(image, tiny_net(), window=16, spacing=1, progress=False), by_card)
    seg = deformux.Segmenter(card, overlap=0.25, window=(16, 32, 16), tta=True, batch=2, largest_component=True)
    c = seg.card
    assert (c.overlap, c.window, c.tta, c.batch, c.largest_component) == (0.25, [16, 32, 16], True, 2, True)
    labels = seg.segment(image, spacing=1, progress=False)
    assert labels.shape == image.shape and seg.statistics["units_per_window"] == 96
    assert deformux.Segmenter(card, window="auto").card.window is None
    assert seg.classes == ["background", "blob", "rim"]
    net_seg = deformux.Segmenter(tiny_net(), card={"classes": ["b", "x", "y"], "window": [16, 16, 16]})
    assert net_seg.classes == ["b", "x", "y"]


def test_switches_false_override_a_card_that_turns_them_on(card):
    """tta and largest_component: None keeps the card's setting, True and False override it (a card may ship with TTA on, as
    the bundled model's does, and a caller must be able to turn it off)."""
    on = deformux.Segmenter(card, tta=True).card
    assert on.tta is True
    assert deformux.Segmenter(card=on, model=card).card.tta is True                  # None: the card's
    assert deformux.Segmenter(card=on, model=card, tta=False).card.tta is False
    image = blob((20, 18, 14), seed=8)
    np.testing.assert_array_equal(deformux.Segmenter(card=on, model=card, tta=False).segment(image, spacing=1, progress=False),
                                  deformux.segment(image, card, spacing=1, progress=False))
    with pytest.raises(TypeError, match="tta must be True, False or None"):
        deformux.Segmenter(card, tta="yes")
    # largest_component is the same kind of switch.
    kept = deformux.Segmenter(card, largest_component=True).card
    assert kept.largest_component is True
    assert deformux.Segmenter(card=kept, model=card).card.largest_component is True
    assert deformux.Segmenter(card=kept, model=card, largest_component=False).card.largest_component is False
    with pytest.raises(TypeError, match="largest_component must be True, False or None"):
        deformux.Segmenter(card, largest_component=1)


def test_errors(card, tmp_path):
    image = blob((16, 16, 16))
    with pytest.raises(TypeError, match="affine= .* or spacing="):
        deformux.segment(image, card)
    with pytest.raises(TypeError, match="not both"):
        deformux.segment(image, card, affine=np.eye(4), spacing=1)
    with pytest.raises(ValueError, match="spacing"):
        deformux.segment(image, card, spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="affine"):
        deformux.segment(image, card, affine=np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        deformux.segment(image[0], card, spacing=1)
    with pytest.raises(ValueError, match="shape"):
        deformux.segment(image[None, None], card, spacing=1)
    with pytest.raises(ValueError, match="empty"):
        deformux.segment(np.zeros((0, 4, 4), np.float32), card, spacing=1)
    with pytest.raises(TypeError, match="real numbers"):
        deformux.segment(image.astype(np.complex64), card, spacing=1)
    with pytest.raises(ValueError, match="1 channel"):
        deformux.segment(np.stack([image, image]), card, spacing=1)
    bad = image.copy()
    bad[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        deformux.segment(bad, card, spacing=1, progress=False)
    with pytest.raises(FileNotFoundError):
        deformux.segment(tmp_path / "missing.nii.gz", card)
    with pytest.raises(FileNotFoundError):
        deformux.segment(image, tmp_path / "missing.json", spacing=1)
    with pytest.raises(TypeError, match="model"):
        deformux.segment(image, 42, spacing=1)
    with pytest.raises(TypeError, match="image"):
        deformux.segment([[1, 2]], card, spacing=1)
    with pytest.raises(TypeError, match="output="):
        deformux.segment(image, card, spacing=1, output=tmp_path / "x.nii")
    with pytest.raises(ValueError, match=".nii"):
        deformux.segment(tmp_path / "a.nii", card, output=tmp_path / "x.png")
    with pytest.raises(ValueError, match="overlap"):
        deformux.segment(image, card, spacing=1, overlap=1.0)
    with pytest.raises(ValueError, match="multiples of 16"):
        deformux.segment(image, card, spacing=1, window=50)
    with pytest.raises(ValueError, match="batch"):
        deformux.segment(image, card, spacing=1, batch=0)
    (tmp_path / "damaged.nii").write_bytes(b"\0" * 400)
    with pytest.raises(deformux.FileFormatError):
        deformux.segment(tmp_path / "damaged.nii", card)


def test_default_model_is_missing_with_a_clear_error(monkeypatch, tmp_path):
    """An install without its bundled model says where it looked and how to pass one."""
    module = sys.modules["deformux.segment"]
    missing = tmp_path / "models" / "brain-tissue.json"
    monkeypatch.setattr(module, "default_model_path", lambda: missing)
    with pytest.raises(FileNotFoundError) as e:
        deformux.segment(blob((16, 16, 16)), spacing=1)
    message = str(e.value)
    assert str(missing) in message and "model=" in message and "default model is missing" in message


def test_statistics_describe_the_run(card):
    seg = deformux.Segmenter(card, card={"window": [16, 16, 16], "orientation": None,
                                         "skip_background": {"threshold": 10.0}})
    image = np.zeros((48, 16, 16), np.float32)
    image[:16] = blob((16, 16, 16), seed=9) + 50  # only the first third holds anything above the threshold
    labels = seg.segment(image, spacing=1, progress=False)
    s = seg.statistics
    assert s["windows_skipped"] > 0 and s["windows_run"] + s["windows_skipped"] == s["windows"]
    assert np.all(labels[24:] == 0), "no run window reaches x >= 24: background"
    assert json.loads(json.dumps(s)) == s
