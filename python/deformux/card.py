"""Model cards: the JSON document that says how to run a model (Sources/DeformUX/Model/ModelCard.swift).

    card = deformux.ModelCard.from_file("brain-tissue.json")
    card.classes, card.window, card.intensity["kind"], card.training.get("dice")
    model, card = deformux.card.load_model("brain-tissue.json")       # or "weights.safetensors"
    deformux.ModelCard({"name": "mine", "weights": "mine.safetensors", "config": net.config}).save("mine.json")

The engine parses and checks every card (dfx_model_card_normalize), so Python and Swift read cards the
same way; this module adds the file handling. Keys (missing ones take these defaults; unknown keys are
kept and written back):

    name               default: the card file's stem ("model")
    version            "0" (text; a number is read as its text)
    config             the DeformUXNet configuration (DeformUXNet(**config)); default: the weights' metadata
    weights            the safetensors file, relative to the card's directory
    classes            names, index 0 background; default "background", "class 1", ...
    spacing            [x, y, z] mm on the canonical axes, or None (default): keep the input's grid
    orientation        "RAS" (default: reorient to the closest canonical RAS+ first) or None
    intensity          {"kind": "mr" | "ct" | "none", "clip": [lo, hi] | None, "percentiles": [1, 99] | None,
                       "nonzero": bool}; default MR: (x - P1) / (P99 - P1) over non-zero voxels; "ct" needs
                       a clip and measures over all voxels
    window             [x, y, z], multiples of 16 (default [96, 96, 96]), or None: 96, reduced on each
                       axis to the network grid rounded up to 16 when that is smaller
    overlap            0.5 (0 <= overlap < 1)
    blend              "gaussian" (default, sigma = window / 8) or "constant"
    batch              windows per forward, None (default): 1
    skip_background    None (default) or {"threshold": t}: windows whose every input value is <= t (input
                       units, e.g. HU) are not run and their voxels are background
    tta                False: flip test-time augmentation (8x the work)
    largest_component  False: keep the largest 26-connected component of each label
    training           free-form dict (command, seed, data, validation Dice, ...)
    license            text or None
"""
import json
import os

from . import _C
from ._atomic import atomic_write

__all__ = ["ModelCard", "load_model", "KEYS"]

#: The keys this version reads, in the order cards are written.
KEYS = ("name", "version", "config", "weights", "classes", "spacing", "orientation", "intensity", "window",
        "overlap", "blend", "batch", "skip_background", "tta", "largest_component", "training", "license")

#: The largest card file read (a card is a few KB).
MAX_CARD_BYTES = 16 << 20


def _stem(path):
    name = os.path.basename(os.fsdecode(path))
    for suffix in (".json", ".safetensors"):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
    return name or "model"


class ModelCard:
    """A model card with every default filled in. Attributes are the keys (``card.window``,
    ``card.intensity``, ...); ``card.extra`` holds the keys this version does not know. Build one from a
    dict (``ModelCard({...})``), JSON text (:meth:`from_json`) or a file (:meth:`from_file`); change it
    with :meth:`replace`. Invalid cards raise ValueError naming the key."""

    def __init__(self, data=None, *, path=None):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise TypeError(f"ModelCard: expected a dict, got {type(data).__name__}")
        data = dict(data)
        if path is not None and data.get("name") is None:
            data["name"] = _stem(path)
        try:
            text = json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"ModelCard: the card is not JSON data: {e}") from None
        try:
            normalized = json.loads(_C.model_card_normalize(text))
        except ValueError as e:
            where = f" ({os.fsdecode(path)})" if path is not None else ""
            raise ValueError(f"{e}{where}") from None
        self._data = normalized
        self.path = os.fsdecode(path) if path is not None else None

    @classmethod
    def from_json(cls, text, *, path=None):
        """A card from JSON text (a str or bytes)."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"model card{' ' + os.fsdecode(path) if path else ''}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"model card{' ' + os.fsdecode(path) if path else ''}: a model card is a JSON object, "
                             f"got {type(data).__name__}")
        return cls(data, path=path)

    @classmethod
    def from_file(cls, path):
        """The card in a .json file (str, bytes or os.PathLike; FileNotFoundError if it is missing)."""
        path = os.fsdecode(path)
        size = os.path.getsize(path)
        if size > MAX_CARD_BYTES:
            raise ValueError(f"model card {path}: {size} bytes, more than the {MAX_CARD_BYTES} a card may have")
        with open(path, "rb") as f:
            return cls.from_json(f.read(), path=path)

    def to_dict(self):
        """The card as a dict (a copy), every key written out, unknown keys last."""
        return json.loads(json.dumps(self._data))

    def to_json(self, indent=2):
        return json.dumps(self._data, indent=indent)

    def save(self, path):
        """Writes the card as JSON, atomically."""
        with atomic_write(os.fsdecode(path)) as f:
            f.write((self.to_json() + "\n").encode("utf-8"))

    def replace(self, **changes):
        """A new card with some keys changed (``card.replace(overlap=0.25, window=None)``)."""
        data = self.to_dict()
        data.update(changes)
        return ModelCard(data)

    @property
    def extra(self):
        """The keys this version does not know (kept as they are)."""
        return {k: v for k, v in self._data.items() if k not in KEYS}

    def class_names(self, count):
        """The class names for a network with `count` outputs: the card's, or background, class 1, ..."""
        classes = self._data["classes"]
        if classes is not None and len(classes) == count:
            return list(classes)
        return ["background"] + [f"class {i}" for i in range(1, count)]

    def __getattr__(self, key):
        if key.startswith("_") or key not in KEYS:
            raise AttributeError(key)
        value = self._data[key]
        return json.loads(json.dumps(value)) if isinstance(value, (dict, list)) else value

    def __eq__(self, other):
        return isinstance(other, ModelCard) and self._data == other._data

    def __repr__(self):
        return f"ModelCard(name={self.name!r}, version={self.version!r}, weights={self.weights!r})"


def load_model(path):
    """``(DeformUXNet, ModelCard)`` from `path`: a model card (.json; its "weights" resolved against the
    card's directory) or weights (.safetensors; the card from a sidecar ``<stem>.json`` if there is one,
    else the defaults). The network's configuration is the card's, else the one recorded in the weights'
    metadata; when both exist they must agree. Weights load strictly. FileNotFoundError names a missing
    card or weights file."""
    from .model import DeformUXNet, _read_config

    path = os.fsdecode(path)
    if path.endswith(".json"):
        card = ModelCard.from_file(path)
        if card.weights is None:
            raise ValueError(f"model card {path}: the card names no weights; add \"weights\": the safetensors file, "
                             f"relative to the card")
        weights = card.weights if os.path.isabs(card.weights) else os.path.join(os.path.dirname(path), card.weights)
    elif path.endswith(".safetensors"):
        sidecar = path[:-len(".safetensors")] + ".json"
        card = ModelCard.from_file(sidecar) if os.path.exists(sidecar) else ModelCard({"name": _stem(path), "window": None})
        weights = path
    else:
        raise ValueError(f"load_model: {path}: expected a model card (.json) or weights (.safetensors)")
    if not os.path.exists(weights):
        raise FileNotFoundError(2, f"model weights not found: {weights}" + (f" (named by {path})" if weights != path else ""),
                                weights)
    config = card.config
    try:
        recorded = _read_config(weights)
    except ValueError as e:
        if config is None:  # nothing else says what the network is
            raise ValueError(f"load_model: no network configuration: {path} has no \"config\" and {e}") from None
        recorded = None     # the card says; loading the weights reports a damaged file
    if recorded is not None:
        recorded = ModelCard({"config": recorded}).config  # every key, as the engine reads it
        if config is not None and recorded != config:
            raise ValueError(f"load_model: the card's configuration differs from the one recorded in {weights}: "
                             f"{json.dumps(config)} vs {json.dumps(recorded)}")
    config = config if config is not None else recorded
    model = DeformUXNet(**config)
    model.load(weights)
    card = card.replace(config=model.config)
    if card.classes is not None and len(card.classes) != model.config["out_channels"]:
        raise ValueError(f"load_model: {path} names {len(card.classes)} classes for a network with "
                         f"{model.config['out_channels']} outputs")
    return model, card

