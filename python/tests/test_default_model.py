"""The bundled default model (issue 9 item 5): its card says what it is, how it was trained and on what
(the MNI152 licence notice travels with it), it loads as segment()'s default, and segment() with it
reproduces the validation Dice its card records (tools/train_mni152.py evaluate, the clean T1; the noisy
variant's figures are recorded beside it and take three more segmentations, so they are not repeated
here)."""
import numpy as np
import pytest

import deformux
from deformux.card import load_model
from deformux.data import VALIDATION_Z
from deformux.segment import default_model_path
from deformux.train import dice_per_class

TISSUES = ("CSF", "grey matter", "white matter")


@pytest.fixture(scope="module")
def card():
    path = default_model_path()
    assert path.is_file(), f"the package must bundle its default model at {path}"
    return deformux.ModelCard.from_file(path)


def test_card_describes_the_model(card):
    assert card.name == "brain-tissue"
    assert card.classes == ["background", *TISSUES]
    assert card.intensity["kind"] == "mr" and card.orientation == "RAS"
    assert card.config["in_channels"] == 1 and card.config["out_channels"] == 4
    t = card.training
    assert "tools/train_mni152.py" in t["command"] and isinstance(t["seed"], int)
    # The recipe's stages: each a train run, the later ones from the previous one's weights.
    assert t["stages"] and all("train_mni152.py train" in c for c in t["stages"])
    assert all(f"--init runs/brain-tissue/stage{i}/last.safetensors" in c for i, c in enumerate(t["stages"][1:], 1))
    # The output biases were calibrated on the training slices: one offset per class, background fixed.
    offsets = t["calibration"]["offsets"]
    assert len(offsets) == 4 and offsets[0] == 0.0
    evaluation = t["evaluation"]
    assert "train_mni152.py evaluate" in evaluation["command"]
    for name in TISSUES:
        assert 0.0 < evaluation["clean"][name] <= 1.0, name
        for seed, dice in evaluation["noisy"].items():
            assert 0.0 < dice[name] <= 1.0, (seed, name)
    noisy = [float(np.mean([d[n] for n in TISSUES])) for d in evaluation["noisy"].values()]
    assert evaluation["noisy_mean"] == pytest.approx(np.mean(noisy), abs=1e-9)
    assert "McGill" in card.license and "Fonov" in card.license


def test_default_model_loads_strictly(card):
    model, loaded = load_model(default_model_path())
    assert loaded.name == card.name
    assert model.config == card.config
    assert model.num_parameters() == 6_241_580


def test_default_model_reproduces_its_recorded_validation_dice(card):
    """segment() with model=None on the bundled T1: the Dice on the validation slices is what the card
    records (the engine is deterministic for a thread count; other counts change float rounding only)."""
    mni = deformux.data.mni152()
    labels = deformux.segment(mni.t1, affine=mni.affine, progress=False)
    assert labels.shape == mni.t1.shape and labels.dtype == np.uint8
    mask = np.zeros(labels.shape, bool)
    mask[:, :, VALIDATION_Z[0]:VALIDATION_Z[1]] = True
    dice = dict(zip(TISSUES, dice_per_class(labels, mni.labels, 4, mask)))
    recorded = card.training["evaluation"]["clean"]
    for name in TISSUES:
        assert dice[name] == pytest.approx(recorded[name], abs=0.005), f"{name}: {dice[name]:.4f}"
