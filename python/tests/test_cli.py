"""The command line (deformux, python3 -m deformux) through subprocesses: predict and evaluate round
trips, the segmentation demo with a tiny model, a small segment benchmark, help, errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deformux
from deformux import nifti
from segment_helpers import blob, save_tiny_model

AFFINE = np.array([[-1.2, 0, 0, 30], [0, 1.0, 0, -20], [0, 0, 1.5, 10], [0, 0, 0, 1]])


def run(*args, timeout=300):
    """python3 -m deformux ARGS, with the progress bar off (stderr is not a terminal anyway)."""
    return subprocess.run([sys.executable, "-m", "deformux", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("cli-model"))


def test_console_script_is_installed():
    script = shutil.which("deformux") or str(Path(sys.executable).parent / "deformux")
    assert os.path.isfile(script), "pip install . puts a 'deformux' console script on PATH"
    out = subprocess.run([script, "--help"], stdout=subprocess.PIPE, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("predict", "evaluate", "demo", "summary", "bench", "version"):
        assert command in out.stdout


def test_help_and_version():
    for args in (["--help"], ["predict", "--help"], ["evaluate", "--help"], ["bench", "segment", "--help"],
                 ["demo", "--help"], ["summary", "--help"]):
        out = run(*args)
        assert out.returncode == 0 and "usage: deformux" in out.stdout, (args, out.stderr)
    out = run("version")
    assert out.returncode == 0 and deformux.__version__ in out.stdout


def test_predict_then_evaluate(card, tmp_path):
    image = blob((22, 17, 13), seed=1)
    nifti.save(tmp_path / "t1.nii.gz", image, AFFINE)
    out = run("predict", "-i", tmp_path / "t1.nii.gz", "-o", tmp_path / "out" / "labels.nii.gz", "--model", card,
              "--probabilities", tmp_path / "out" / "p.nii.gz", "--threads", 1)
    assert out.returncode == 0, out.stderr
    assert "windows" in out.stderr and out.stdout == ""
    labels = nifti.load(tmp_path / "out" / "labels.nii.gz", dtype="raw")
    assert labels.header["dtype"] == "uint8" and labels.array.shape == image.shape
    np.testing.assert_allclose(labels.affine, nifti.load(tmp_path / "t1.nii.gz").affine, atol=1e-6)
    expected = deformux.segment(tmp_path / "t1.nii.gz", card, progress=False).array
    np.testing.assert_array_equal(labels.array, expected)
    p = nifti.load(tmp_path / "out" / "p.nii.gz")
    assert p.shape == image.shape + (3,)
    np.testing.assert_allclose(p.array.sum(axis=0), 1, atol=1e-5)
    # The switches (--tta, --largest-component and their --no- forms) override the card either way.
    for flag, options in (("--tta", dict(tta=True)), ("--no-tta", dict(tta=False)),
                          ("--largest-component", dict(largest_component=True)),
                          ("--no-largest-component", dict(largest_component=False))):
        out = run("predict", "-i", tmp_path / "t1.nii.gz", "-o", tmp_path / "switch.nii.gz", "--model", card, flag)
        assert out.returncode == 0, (flag, out.stderr)
        np.testing.assert_array_equal(nifti.load(tmp_path / "switch.nii.gz", dtype="raw").array,
                                      deformux.segment(tmp_path / "t1.nii.gz", card, progress=False, **options).array)

    # Evaluate the prediction against itself (Dice 1, HD95 0) and against a shifted copy (JSON).
    out = run("evaluate", tmp_path / "out" / "labels.nii.gz", tmp_path / "out" / "labels.nii.gz")
    assert out.returncode == 0, out.stderr
    assert "1.0000" in out.stdout and "Dice" in out.stdout
    shifted = np.roll(labels.array, 2, axis=0)
    nifti.save(tmp_path / "ref.nii", shifted, labels.affine)
    out = run("evaluate", tmp_path / "out" / "labels.nii.gz", tmp_path / "ref.nii", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["spacing"] == pytest.approx([1.2, 1.0, 1.5])
    want = deformux.evaluate.evaluate(labels.array, shifted, spacing=(1.2, 1.0, 1.5))
    assert set(report["labels"]) == {str(k) for k in want}
    for k, r in want.items():
        got = report["labels"][str(k)]
        assert got["dice"] == pytest.approx(r["dice"]) and got["hd95"] == pytest.approx(r["hd95"])
    out = run("evaluate", tmp_path / "out" / "labels.nii.gz", tmp_path / "ref.nii", "--labels", "1", "--no-hd", "--json")
    assert list(json.loads(out.stdout)["labels"]) == ["1"] and "hd95" not in json.loads(out.stdout)["labels"]["1"]


def test_predict_errors(card, tmp_path):
    out = run("predict", "-i", tmp_path / "missing.nii.gz", "-o", tmp_path / "x.nii.gz", "--model", card)
    assert out.returncode == 1 and "deformux predict: error:" in out.stderr and "missing.nii.gz" in out.stderr
    nifti.save(tmp_path / "t1.nii", blob((16, 16, 16)), np.eye(4))
    out = run("predict", "-i", tmp_path / "t1.nii", "-o", tmp_path / "x.png", "--model", card)
    assert out.returncode == 1 and ".nii" in out.stderr
    out = run("predict", "-i", tmp_path / "t1.nii", "-o", tmp_path / "x.nii", "--model", tmp_path / "none.json")
    assert out.returncode == 1 and "none.json" in out.stderr
    out = run("predict", "-i", tmp_path / "t1.nii", "-o", tmp_path / "x.nii", "--model", card, "--overlap", "1.5")
    assert out.returncode == 2 and "overlap" in out.stderr
    out = run("predict", "-i", tmp_path / "t1.nii", "-o", tmp_path / "x.nii", "--model", card, "--window", "40")
    assert out.returncode == 1 and "multiples of 16" in out.stderr
    out = run("predict", "-o", tmp_path / "x.nii")
    assert out.returncode == 2 and "--input" in out.stderr
    nifti.save(tmp_path / "labels.nii", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    out = run("evaluate", tmp_path / "labels.nii", tmp_path / "nothing.nii")
    assert out.returncode == 1 and "nothing.nii" in out.stderr
    out = run("evaluate", tmp_path / "t1.nii", tmp_path / "labels.nii")
    assert out.returncode == 1 and "not an integer" in out.stderr


def test_segmentation_demo_with_a_tiny_model(tmp_path):
    """The segmentation demo on the bundled MNI152 T1: labels, an overlay PNG and Dice per class (a random
    model: the numbers are not the point, the pipeline is). Large windows without overlap: 8 of them."""
    card = save_tiny_model(tmp_path, window=[112, 128, 96], overlap=0)
    out = run("demo", "--segment", "--model", card, "--output", tmp_path / "demo" / "labels.nii.gz", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "Dice" in out.stdout and "grey matter" in out.stdout
    labels = nifti.load(tmp_path / "demo" / "labels.nii.gz", dtype="int32")
    assert labels.array.shape == (197, 233, 189)
    png = (tmp_path / "demo" / "labels.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_summary_and_small_segment_benchmark(card, tmp_path):
    out = run("summary", "--size", 32, "--feature-size", "4,8,8,8", "--hidden-size", 8, "--out-channels", 3)
    assert out.returncode == 0 and "total" in out.stdout, out.stderr
    out = run("summary", "--model", card, "--size", "32,16,16")
    assert out.returncode == 0 and "total" in out.stdout, out.stderr
    out = run("bench", "segment", "--size", "40,36,20", "--window", 16, "--feature-size", "4,8,8,8", "--hidden-size", 8,
              "--out-channels", 3, "--threads", 1, "--json", "--no-progress")
    assert out.returncode == 0, out.stderr
    for words in ("total", "windows", "per window", "outside windows", "peak RSS"):
        assert words in out.stdout
    figures = json.loads(out.stdout[out.stdout.index("{"):])
    assert figures["image_size"] == [40, 36, 20] and figures["windows"] == figures["windows_run"] > 1
    assert 0 <= figures["outside_share"] < 1 and figures["peak_rss_mb"] > 0
