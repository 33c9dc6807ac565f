"""deformux.train and `deformux train` (issue 9 item 4) on a small Decathlon-layout folder made from the
bundled MNI152 (downsampled crops as cases): one command trains and writes its checkpoints and model
card; a resumed run gives the same weights as an uninterrupted one (also after Ctrl-C in the middle);
the reorientation matches the engine's; the folder readers refuse broken datasets."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import deformux
from deformux import nifti
from deformux.train import load_dataset, to_ras, io_orientation

NET = dict(feature_size=(4, 8, 8, 8), hidden_size=8)


def _cases():
    """Three 4 mm cases from the MNI152 (T1, tissue labels), each cut from another part of the head."""
    mni = deformux.data.mni152()
    t1 = mni.t1[::4, ::4, ::4].astype(np.float32)        # 50 x 59 x 48
    lab = mni.labels[::4, ::4, ::4].astype(np.uint8)
    affine = mni.affine @ np.diag([4.0, 4.0, 4.0, 1.0])
    cuts = [(slice(0, 40), slice(0, 48), slice(0, 40)), (slice(8, 48), slice(6, 54), slice(4, 44)),
            (slice(4, 44), slice(10, 58), slice(8, 48))]
    return [(t1[c], lab[c], affine) for c in cuts]


def make_dataset(root, flip_last=False):
    """MSD layout: dataset.json, imagesTr/, labelsTr/. flip_last stores the last case in LPS voxel order."""
    os.makedirs(root / "imagesTr")
    os.makedirs(root / "labelsTr")
    training = []
    for i, (image, label, affine) in enumerate(_cases()):
        if flip_last and i == 2:
            image, label = image[::-1, ::-1].copy(), label[::-1, ::-1].copy()
            affine = affine @ np.array([[-1, 0, 0, image.shape[0] - 1], [0, -1, 0, image.shape[1] - 1],
                                        [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
        nifti.save(root / "imagesTr" / f"brain_{i:03d}.nii.gz", image, affine)
        nifti.save(root / "labelsTr" / f"brain_{i:03d}.nii.gz", label, affine, dtype="uint8")
        training.append({"image": f"./imagesTr/brain_{i:03d}.nii.gz", "label": f"./labelsTr/brain_{i:03d}.nii.gz"})
    meta = {"name": "MNI152 tissue", "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "CSF", "2": "grey matter", "3": "white matter"},
            "numTraining": len(training), "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("msd"), flip_last=True)


def _model(seed=3):
    return deformux.DeformUXNet(in_channels=1, out_channels=4, seed=seed, **NET)


def _weights(path):
    return deformux.DeformUXNet.from_file(path).state_dict()


def test_train_writes_checkpoints_card_and_metrics(dataset, tmp_path):
    out = tmp_path / "run"
    run = deformux.train(dataset, _model(), out=out, patch_size=16, steps=4, validate_every=2, validation=1,
                         progress=False, log=lambda *a: None, seed=1)
    assert run["steps"] == 4
    names = sorted(os.listdir(out))
    for n in ("best.json", "best.safetensors", "last.json", "last.safetensors", "last.trainer.safetensors",
              "last.loop.json", "metrics.jsonl"):
        assert n in names, f"{n} missing from {names}"
    assert not [n for n in names if ".tmp" in n], f"temporary files left: {names}"
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    vals = [e for e in events if e["event"] == "validation"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(e["loss"]) and e["loss"] > 0 for e in steps)
    assert [e["step"] for e in vals] == [2, 4]
    assert set(vals[0]["dice"]) == {"CSF", "grey matter", "white matter"}
    # The card loads with deformux's own loader and segments with the run's settings.
    card = deformux.ModelCard.from_file(out / "best.json")
    assert card.classes == ["background", "CSF", "grey matter", "white matter"]
    assert card.intensity["kind"] == "mr" and card.orientation == "RAS" and list(card.window) == [16, 16, 16]
    assert card.training["best_step"] == run["best"]["step"]
    image, label, affine = _cases()[0]
    labels = deformux.segment(image, model=out / "best.json", affine=affine, progress=False)
    assert labels.shape == image.shape and labels.dtype == np.uint8 and labels.max() <= 3
    # The validation Dice in the card is what segment() gives with that model on the held-out case.
    assert 0 <= run["best"]["mean_dice"] <= 1


def test_training_improves_on_the_data(dataset, tmp_path):
    """Fifty steps of a small network lower the loss (a check that the loop learns at all)."""
    run = deformux.train(dataset, _model(), out=tmp_path / "run", patch_size=16, steps=50, validate_every=0,
                         lr=3e-3, progress=False, log=lambda *a: None, validation=0)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert run["steps"] == 50 and run["best"] is None
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), losses


def test_resume_gives_the_same_weights(dataset, tmp_path):
    kw = dict(patch_size=16, validate_every=2, validation=1, progress=False, log=lambda *a: None, seed=7,
              drop_path=0.2)
    deformux.train(dataset, _model(), out=tmp_path / "straight", steps=6, **kw)
    deformux.train(dataset, _model(), out=tmp_path / "split", steps=4, **kw)
    run = deformux.train(dataset, _model(seed=99), out=tmp_path / "split", steps=6, resume=True, **kw)
    # stop_after: a run cut at step 3 of a 6-step schedule, resumed, is the uninterrupted run too.
    cut = deformux.train(dataset, _model(), out=tmp_path / "cut", steps=6, stop_after=3, **kw)
    assert cut["steps"] == 3
    deformux.train(dataset, _model(seed=99), out=tmp_path / "cut", steps=6, resume=True, **kw)
    assert run["steps"] == 6
    a = _weights(tmp_path / "straight" / "last.safetensors")
    for run_dir in ("split", "cut"):
        b = _weights(tmp_path / run_dir / "last.safetensors")
        for name in a:
            assert np.array_equal(a[name], b[name]), f"{name}: resumed run ({run_dir}) differs from the uninterrupted one"
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        deformux.train(dataset, _model(), out=tmp_path / "empty", steps=2, resume=True, **kw)


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "deformux", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_cli_train_ctrl_c_then_resume(dataset, tmp_path):
    """`deformux train`: Ctrl-C saves a resumable checkpoint and exits 130; --resume finishes the run with
    the weights of an uninterrupted one."""
    common = ["--data", str(dataset), "--patch-size", "32", "--validation", "1", "--validate-every", "1000",
              "--feature-size", "8,16,16,16", "--hidden-size", "16", "--seed", "2", "--no-progress", "--threads", "1"]
    straight = _cli("train", "--out", str(tmp_path / "straight"), "--steps", "8", *common)
    out, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err
    assert "8 steps" in out

    run = tmp_path / "interrupted"
    p = _cli("train", "--out", str(run), "--steps", "8", *common)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert p.poll() is None, f"the run ended before it could be interrupted: {p.communicate()}"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, err)
    assert "interrupted" in err
    state = json.loads((run / "last.loop.json").read_text())
    assert 3 <= state["step"] < 8
    resumed = _cli("train", "--out", str(run), "--steps", "8", "--resume", *common)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    a, b = _weights(tmp_path / "straight" / "last.safetensors"), _weights(run / "last.safetensors")
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name}: resumed after Ctrl-C differs from the uninterrupted run"


def test_to_ras_matches_the_engines_reorientation():
    """to_ras (what training does to its volumes) turns each grid to RAS+ axes and keeps every voxel at its
    world position; io_orientation is nibabel's (compared where nibabel is installed), which the engine's
    reorientation is tested against (Tests/Fixtures/pipeline)."""
    r = np.random.default_rng(0)
    vol = r.standard_normal((5, 6, 7)).astype(np.float32)
    affines = [np.diag([2.0, 3.0, 4.0, 1.0]),
               np.array([[-2.0, 0, 0, 10], [0, 3.0, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 1]]),
               np.array([[0, 0, 4.0, 0], [-2.0, 0, 0, 10], [0, -3.0, 0, 0], [0, 0, 0, 1]])]
    for a in affines:
        out, b = to_ras(vol, a)
        axes, flips = io_orientation(b)
        assert axes == [0, 1, 2] and flips == [False, False, False], (a, b)
        # The same world point for every voxel: b maps out's index to where a maps vol's.
        idx = np.argwhere(np.ones(vol.shape, bool))
        world = (a @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
        back = np.rint((np.linalg.inv(b) @ np.c_[world, np.ones(len(world))].T).T[:, :3]).astype(int)
        assert np.array_equal(out[tuple(back.T)], vol[tuple(idx.T)])
    try:
        from nibabel.orientations import io_orientation as nib_io
    except ImportError:
        return
    for _ in range(50):
        a = np.eye(4)
        a[:3, :3] = r.standard_normal((3, 3)) + np.diag(r.choice([-3.0, 3.0], 3))[r.permutation(3)]
        axes, flips = io_orientation(a)
        want = nib_io(a)
        assert axes == [int(v) for v in want[:, 0]] and flips == [bool(v < 0) for v in want[:, 1]], a


def test_dataset_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        load_dataset(tmp_path)
    root = make_dataset(tmp_path / "d")
    os.remove(root / "labelsTr" / "brain_001.nii.gz")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="no training cases"):
        load_dataset(root)


def test_nnunet_layout(tmp_path):
    root = tmp_path / "Dataset001_Brain"
    os.makedirs(root / "imagesTr")
    os.makedirs(root / "labelsTr")
    for i, (image, label, affine) in enumerate(_cases()[:2]):
        nifti.save(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz", image, affine)
        nifti.save(root / "labelsTr" / f"case_{i:03d}.nii.gz", label, affine, dtype="uint8")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "CSF": 1, "GM": 2, "WM": 3},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    cases, meta = load_dataset(root)
    assert [c["name"] for c in cases] == ["case_000", "case_001"]
    assert cases[0]["images"][0].endswith("case_000_0000.nii.gz")
    run = deformux.train(root, _model(), out=tmp_path / "run", patch_size=16, steps=2, validate_every=2,
                         progress=False, log=lambda *a: None)
    card = deformux.ModelCard.from_file(tmp_path / "run" / "best.json")
    assert card.classes == ["background", "CSF", "GM", "WM"] and run["steps"] == 2
