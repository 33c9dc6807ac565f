"""Tiny random-weight models saved with a model card, and test volumes, for the segmentation tests."""
import json

import numpy as np

import deformux

TINY = {"in_channels": 1, "out_channels": 3, "feature_size": [4, 8, 8, 8], "hidden_size": 8}


def tiny_net(seed=5, in_channels=1):
    """A tiny network whose head is scaled up, so that the classes vary from voxel to voxel (PyTorch's
    initialisation, with layer scale 1e-6, gives nearly constant logits)."""
    net = deformux.DeformUXNet(**dict(TINY, in_channels=in_channels), seed=seed)
    sd = net.state_dict()
    for name in sd:
        if name.startswith("out."):
            sd[name] = sd[name] * 50
    net.load_state_dict(sd)
    return net


def save_tiny_model(directory, name="tiny", seed=5, **card):
    """Writes <name>.safetensors and the card <name>.json (16^3 windows unless `card` says otherwise);
    returns the card's path."""
    net = tiny_net(seed)
    net.save(directory / f"{name}.safetensors")
    data = {"name": name, "version": "1", "config": net.config, "weights": f"{name}.safetensors",
            "classes": ["background", "blob", "rim"], "window": [16, 16, 16], "overlap": 0.5,
            "training": {"command": "tests", "seed": seed}, "license": "test only"}
    data.update(card)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def blob(shape, seed=0, centre=None):
    """A float32 volume: a bright ellipsoidal blob with noise on a dark background."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    centre = centre if centre is not None else [n / 2 for n in shape]
    r2 = sum(((g - c) / (n / 3)) ** 2 for g, c, n in zip(grids, centre, shape))
    return (100 * np.exp(-r2) + rng.uniform(0, 20, shape)).astype(np.float32)
