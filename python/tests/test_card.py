"""Model cards: the shared cases (Tests/Fixtures/model_card/cases.json, also read by the Swift tests),
files, and loading a model from a card, from weights with a sidecar card, and from weights alone."""
import json

import numpy as np
import pytest

import deformux
from deformux.card import ModelCard, load_model
from helpers import REPO
from segment_helpers import TINY, save_tiny_model, tiny_net

CASES = json.loads((REPO / "Tests" / "Fixtures" / "model_card" / "cases.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_shared_cases(case):
    if "normalized" in case:
        card = ModelCard.from_json(json.dumps(case["card"]))
        assert card.to_dict() == case["normalized"]
        assert ModelCard.from_json(card.to_json()) == card
    else:
        with pytest.raises(ValueError) as e:
            ModelCard.from_json(json.dumps(case["card"]))
        assert case["error"] in str(e.value)


def test_attributes_replace_and_files(tmp_path):
    card = ModelCard({"classes": ["background", "a"], "future": [1, {"x": 2}], "training": {"dice": 0.9}})
    assert card.classes == ["background", "a"] and card.window == [96, 96, 96] and card.tta is False
    assert card.intensity == {"kind": "mr", "clip": None, "percentiles": [1, 99], "nonzero": True}
    assert card.extra == {"future": [1, {"x": 2}]} and card.training == {"dice": 0.9}
    assert card.class_names(2) == ["background", "a"] and card.class_names(3) == ["background", "class 1", "class 2"]
    changed = card.replace(overlap=0.25, window=None)
    assert changed.overlap == 0.25 and changed.window is None and card.overlap == 0.5
    with pytest.raises(ValueError, match="overlap"):
        card.replace(overlap=2)
    with pytest.raises(AttributeError):
        card.nonexistent
    path = tmp_path / "sub" / "my-model.json"
    path.parent.mkdir()
    card.save(path)
    back = ModelCard.from_file(path)
    assert back.to_dict() == card.to_dict()
    (tmp_path / "unnamed.json").write_text("{}")
    assert ModelCard.from_file(tmp_path / "unnamed.json").name == "unnamed"
    with pytest.raises(FileNotFoundError):
        ModelCard.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{\"name\": ")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelCard.from_file(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="JSON object"):
        ModelCard.from_file(tmp_path / "list.json")
    with pytest.raises(ValueError, match="not JSON data"):
        ModelCard({"training": {"x": float("nan")}})
    with pytest.raises(TypeError):
        ModelCard([1])


def test_load_model_from_card_sidecar_and_weights(tmp_path):
    card_path = save_tiny_model(tmp_path, overlap=0.25)
    want = tiny_net().state_dict()
    x = np.random.default_rng(0).random((1, 1, 16, 16, 16)).astype(np.float32)
    y = tiny_net().forward(x)

    model, card = load_model(card_path)
    assert card.name == "tiny" and card.overlap == 0.25 and card.classes == ["background", "blob", "rim"]
    assert card.config == model.config
    np.testing.assert_array_equal(model.forward(x), y)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)

    # Weights with the sidecar card beside them (tiny.json): the card's settings.
    model, card = load_model(tmp_path / "tiny.safetensors")
    assert card.overlap == 0.25 and card.classes == ["background", "blob", "rim"]

    # Weights alone: the defaults (automatic windows), the configuration from the metadata.
    alone = tmp_path / "alone"
    alone.mkdir()
    tiny_net().save(alone / "w.safetensors")
    model, card = load_model(alone / "w.safetensors")
    assert card.name == "w" and card.window is None and card.config["out_channels"] == 3
    np.testing.assert_array_equal(model.forward(x), y)


def test_load_model_errors(tmp_path):
    card_path = save_tiny_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "none.json")
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_model(save_tiny_model(tmp_path, name="broken", weights="nowhere.safetensors"))
    (tmp_path / "noweights.json").write_text("{}")
    with pytest.raises(ValueError, match="names no weights"):
        load_model(tmp_path / "noweights.json")
    other = dict(json.loads(card_path.read_text()), config=dict(TINY, offset_mode="official"))
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="differs from the one recorded"):
        load_model(tmp_path / "other.json")
    wrong_classes = dict(json.loads(card_path.read_text()), classes=["background", "a"])
    (tmp_path / "classes.json").write_text(json.dumps(wrong_classes))
    with pytest.raises(ValueError, match="classes"):
        load_model(tmp_path / "classes.json")
    with pytest.raises(ValueError, match=".safetensors"):
        load_model(tmp_path / "model.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x01")
    with pytest.raises(deformux.FileFormatError, match="not a safetensors file"):
        load_model(tmp_path / "junk.safetensors")
    junk_card = dict(json.loads(card_path.read_text()), weights="junk.safetensors")
    (tmp_path / "junk.json").write_text(json.dumps(junk_card))
    with pytest.raises(deformux.FileFormatError):
        load_model(tmp_path / "junk.json")
