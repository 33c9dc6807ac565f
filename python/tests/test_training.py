"""Training from Python (issue 9): deformux.losses.dice_ce against MONAI's DiceCELoss (the committed
float64 cases of Tests/Fixtures/training/dice_ce.json), deformux.Trainer against one PyTorch step
(Tests/Fixtures/training/train_step.safetensors: MONAI's loss and torch.optim.AdamW in float64, the
bounds of Tests/DeformUXTests/TrainerTests.swift), accumulation, resuming, PatchSampler, and bad inputs.
No torch needed: the fixtures are committed."""
import json
import os

import numpy as np
import pytest

import deformux
from deformux import DeformUXNet, PatchSampler, Trainer
from deformux.losses import dice_ce
from helpers import REPO, assert_close, read_safetensors

TRAINING = REPO / "Tests" / "Fixtures" / "training"


@pytest.fixture(scope="module")
def step_fixture():
    tensors, meta = read_safetensors(TRAINING / "train_step.safetensors")
    config = json.loads(meta["deformux.config"])
    optimizer = json.loads(meta["optimizer"])
    return tensors, config, float(meta["loss"]), optimizer


def _model(fixture):
    tensors, config, _, _ = fixture
    m = DeformUXNet(**config)
    names = [n for n, _ in m._tensors]
    m.load_state_dict({n: tensors[n] for n in names})
    return m


def _trainer(model, fixture, **kw):
    _, _, _, opt = fixture
    kw.setdefault("lr", opt["lr"])
    kw.setdefault("weight_decay", opt["weight_decay"])
    return Trainer(model, betas=tuple(opt["betas"]), eps=opt["eps"], scheduler=False, **kw)


def _inputs(fixture):
    tensors = fixture[0]
    return np.ascontiguousarray(tensors["input"]), tensors["labels"].astype(np.int64)


# ---- the loss ----

def _dice_cases():
    with open(TRAINING / "dice_ce.json") as f:
        return json.load(f)["cases"]


@pytest.mark.parametrize("case", _dice_cases(), ids=lambda c: c["name"])
def test_dice_ce_matches_monai(case):
    if case.get("lambda_dice", 1) != 1 or case.get("lambda_ce", 1) != 1:
        pytest.skip("dice_ce exposes MONAI's default lambdas (1 and 1); other lambdas are tested in Swift")
    shape = (case["n"], case["classes"], *case["spatial"])
    logits = np.asarray(case["logits"], np.float32).reshape(shape)
    labels = np.asarray(case["labels"], np.int64).reshape((shape[0],) + shape[2:])
    loss, grad = dice_ce(logits, labels, class_weights=case.get("weight"))
    # float32 against MONAI in float64: the loss to 1e-5 relative, the gradient to 1e-4 of its largest value.
    assert abs(loss - case["loss"]) <= 1e-5 * max(1.0, abs(case["loss"])), (loss, case["loss"])
    assert_close(grad, np.asarray(case["grad"]).reshape(shape), f"{case['name']}: grad", rtol=1e-4, atol=1e-7)


def test_dice_ce_rejects_bad_input():
    logits = np.zeros((1, 3, 4, 4, 4), np.float32)
    with pytest.raises(TypeError, match="float32"):
        dice_ce(logits.astype(np.float64), np.zeros((1, 4, 4, 4), np.int32))
    with pytest.raises(TypeError, match="integers"):
        dice_ce(logits, np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        dice_ce(logits, np.zeros((1, 4, 4, 5), np.int32))
    labels = np.zeros((1, 4, 4, 4), np.int32)
    labels[0, 1, 2, 3] = 3
    with pytest.raises(ValueError, match="3"):
        dice_ce(logits, labels)


# ---- one step against PyTorch ----

def test_one_step_matches_pytorch(step_fixture):
    tensors, _, want_loss, opt = step_fixture
    m = _model(step_fixture)
    t = _trainer(m, step_fixture)
    x, labels = _inputs(step_fixture)
    loss = t.train_step(x, labels)
    assert abs(loss - want_loss) <= 2e-5 * abs(want_loss), (loss, want_loss)
    assert set(t.last_loss) == {"loss", "dice", "cross_entropy"}
    assert t.step == 1 and t.accumulation_done()
    got = m.state_dict()
    for name, value in got.items():
        want, grad = tensors["after." + name], tensors["grad." + name]
        # AdamW's first step moves each weight by about lr * sign(grad): elements whose gradient is tiny
        # next to the tensor's largest may go either way in float32, so they get 2 lr of slack.
        slack = np.where(np.abs(grad) < 1e-3 * np.abs(grad).max(), 2 * opt["lr"], 0.0)
        err = np.abs(value.astype(np.float64) - want)
        bound = 2e-6 + 1e-5 * np.abs(want) + slack
        bad = np.argwhere(err > bound)
        assert bad.size == 0, (f"{name}{tuple(bad[0])}: {value[tuple(bad[0])]} after the step, PyTorch "
                               f"{want[tuple(bad[0])]} (grad {grad[tuple(bad[0])]})")


def test_accumulation_of_the_same_batch_is_one_step(step_fixture):
    x, labels = _inputs(step_fixture)
    once = _model(step_fixture)
    _trainer(once, step_fixture).train_step(x, labels)
    twice = _model(step_fixture)
    t = _trainer(twice, step_fixture, accumulation=2)
    t.train_step(x, labels)
    assert t.step == 0 and not t.accumulation_done()
    t.train_step(x, labels)
    assert t.step == 1 and t.accumulation_done()
    a, b = once.state_dict(), twice.state_dict()
    for name in a:
        assert_close(b[name], a[name], name, rtol=1e-5, atol=1e-6)


def test_resume_gives_the_same_weights(step_fixture, tmp_path):
    x, labels = _inputs(step_fixture)
    straight = _model(step_fixture)
    t = _trainer(straight, step_fixture, drop_path=0.3, seed=5)
    for _ in range(3):
        t.train_step(x, labels)

    first = _model(step_fixture)
    t1 = _trainer(first, step_fixture, drop_path=0.3, seed=5)
    t1.train_step(x, labels)
    first.save(tmp_path / "w.safetensors")
    t1.save_state(tmp_path / "s.safetensors")
    second = DeformUXNet.from_file(tmp_path / "w.safetensors")
    t2 = _trainer(second, step_fixture)          # options come back with the state
    t2.load_state(tmp_path / "s.safetensors")
    assert t2.step == 1
    t2.train_step(x, labels)
    t2.train_step(x, labels)
    a, b = straight.state_dict(), second.state_dict()
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name}: resumed differs from uninterrupted"


def test_learning_rate_and_plateau(step_fixture):
    m = _model(step_fixture)
    t = Trainer(m, lr=1e-3, plateau_factor=0.5, plateau_patience=1)
    assert t.learning_rate == pytest.approx(1e-3)
    assert t.report_validation(0.5) == pytest.approx(1e-3)
    assert t.report_validation(0.4) == pytest.approx(1e-3)        # one bad report: within patience
    assert t.report_validation(0.4) == pytest.approx(5e-4)        # two: reduced
    t.learning_rate = 2e-4
    assert t.learning_rate == pytest.approx(2e-4)


def test_trainer_rejects_bad_input(step_fixture, tmp_path):
    m = _model(step_fixture)
    with pytest.raises(TypeError, match="DeformUXNet"):
        Trainer("model")
    with pytest.raises(ValueError, match="accumulation"):
        Trainer(m, accumulation=0)
    with pytest.raises(ValueError, match="class_weights"):
        Trainer(m, class_weights=[1.0])
    t = _trainer(m, step_fixture)
    x, labels = _inputs(step_fixture)
    bad = labels.copy()
    bad.flat[5] = 7
    before = m.state_dict()
    with pytest.raises(ValueError, match="7"):
        t.train_step(x, bad)
    with pytest.raises(TypeError, match="integers"):
        t.train_step(x, labels.astype(np.float32))
    with pytest.raises(ValueError, match="labels must have shape"):
        t.train_step(x, labels[..., :-1])
    assert t.step == 0
    after = m.state_dict()
    assert all(np.array_equal(before[n], after[n]) for n in before), "a failed step changes nothing"
    with pytest.raises(FileNotFoundError):
        t.load_state(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises((deformux.FileFormatError, ValueError)):
        t.load_state(tmp_path / "junk.safetensors")


def test_progress_false_cancels_the_step(step_fixture):
    m = _model(step_fixture)
    t = _trainer(m, step_fixture)
    x, labels = _inputs(step_fixture)
    before = m.state_dict()
    with pytest.raises(deformux.DeformUXError, match="cancel"):
        t.train_step(x, labels, progress=lambda done, total: False)
    assert t.step == 0
    after = m.state_dict()
    assert all(np.array_equal(before[n], after[n]) for n in before), "a cancelled step changes nothing"
    t.train_step(x, labels)                      # and the trainer still works
    assert t.step == 1


# ---- patches ----

def _volume(shape=(40, 36, 32), classes=3, seed=0):
    r = np.random.default_rng(seed)
    image = r.standard_normal(shape).astype(np.float32)
    labels = np.zeros(shape, np.int32)
    labels[10:20, 8:18, 6:16] = 1
    labels[22:30, 20:30, 18:26] = classes - 1
    return image, labels


def test_sampler_draws_patches_reproducibly():
    image, labels = _volume()
    s = PatchSampler(patch_size=(16, 16, 16), classes=3, samples_per_volume=2, augmentation="none")
    assert s.add(image, labels) == 0
    assert s.add(image * 2, labels) == 1
    a_img, a_lab, state = s.batch([0, 1], 42)
    b_img, b_lab, state2 = s.batch([0, 1], 42)
    assert a_img.shape == (4, 1, 16, 16, 16) and a_lab.shape == (4, 16, 16, 16)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab) and state == state2
    assert state != 42
    c_img, _, _ = s.batch([0, 1], state)
    assert not np.array_equal(a_img, c_img), "the new state draws other patches"
    # Without augmentation a patch is a crop of the volume: find it.
    crop, lab = a_img[0, 0], a_lab[0]
    hits = [(i, j, k) for i in range(40 - 15) for j in range(36 - 15) for k in range(32 - 15)
            if image[i, j, k] == crop[0, 0, 0]]
    assert hits, "the patch is not a crop of the image"
    i, j, k = hits[0]
    assert np.array_equal(image[i:i + 16, j:j + 16, k:k + 16], crop)
    assert np.array_equal(labels[i:i + 16, j:j + 16, k:k + 16], lab)


def test_sampler_rejects_bad_input():
    image, labels = _volume()
    with pytest.raises(ValueError, match="augmentation"):
        PatchSampler(augmentation="heavy")
    s = PatchSampler(patch_size=16, classes=3)
    with pytest.raises(ValueError, match="no volume"):
        s.batch([0], 1)
    with pytest.raises(TypeError, match="float32"):
        s.add(image.astype(np.float64), labels)
    with pytest.raises(ValueError, match="labels"):
        s.add(image, labels[:-1])
    bad = labels.copy()
    bad[0, 0, 0] = 9
    with pytest.raises(ValueError, match="9"):
        s.add(image, bad)
    s.add(image, labels)
    with pytest.raises((ValueError, IndexError), match="5"):
        s.batch([5], 1)
