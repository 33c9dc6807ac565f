"""The bundled real data: the MNI ICBM152 2009a template and its brain-tissue labels.

    mni = deformux.data.mni152()
    mni.t1          float32 (197, 233, 189), the stored 0..255 values, [x][y][z] (RAS, 1 mm)
    mni.labels      uint8, same grid: 0 background, 1 CSF, 2 grey matter, 3 white matter
    mni.affine      4 x 4 (origin -98, -134, -72)
    mni.classes     ("background", "CSF", "grey matter", "white matter")
    mni.split()     (training, validation) boolean masks along z (guard bands in neither)
    mni.gm, mni.wm  the probability maps x 255 (float32), read when first used
    mni.noisy_t1(seed=0)   the harder variant: the T1 with a smooth +-20% bias field and 5% Gaussian noise

The labels (data/mni152/mni152_tissue_labels.nii.gz) are made by tools/make_mni152_labels.py from the
T1 and the GM/WM maps: brain mask t1 / 255 > 0.2; inside it 1 + argmax(csf, gm, wm) with gm, wm the maps
/ 255 and csf = clip(1 - gm - wm, 0, 1). Split along z: validation z in [68, 124), training z < 60 or
z >= 132. Licence: the MNI/McGill notice (data/mni152/LICENSE.md) travels with the voxels and anything
derived from them; cite Fonov et al., NeuroImage 54(1):313-327, 2011.
"""
from importlib import resources
from pathlib import Path

import numpy as np

from . import nifti

__all__ = ["mni152", "MNI152", "mni152_path", "noisy_t1", "MNI152_FILES", "VALIDATION_Z", "TRAINING_Z"]

#: The bundled files, by role.
MNI152_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    "labels": "mni152_tissue_labels.nii.gz",
}
#: Validation slices [start, stop) along z; training: z < 60 or z >= 132 (the bands between: neither).
VALIDATION_Z = (68, 124)
TRAINING_Z = ((0, 60), (132, None))
CLASSES = ("background", "CSF", "grey matter", "white matter")


def mni152_path(role="t1"):
    """The bundled file for `role` ("t1", "gm", "wm", "labels"): package data of an installed package,
    else the repository's data/mni152 (editable installs)."""
    name = MNI152_FILES[role]
    packaged = resources.files("deformux") / "data" / "mni152" / name
    if packaged.is_file():
        return Path(str(packaged))
    repo = Path(__file__).resolve().parents[2] / "data" / "mni152" / name
    if repo.is_file():
        return repo
    raise FileNotFoundError(2, f"the bundled MNI152 file {name} is missing from {packaged} and {repo}; reinstall "
                               f"deformux", str(packaged))


class MNI152:
    """The template, its labels and the split (see the module text)."""

    classes = CLASSES

    def __init__(self):
        t1 = nifti.load(mni152_path("t1"))
        labels = nifti.load(mni152_path("labels"), dtype="int32")
        if labels.array.shape != t1.array.shape or not np.allclose(labels.affine, t1.affine):
            raise ValueError("deformux.data: the bundled labels are not on the T1's grid")
        self.image = t1  # the NiftiImage (header, path)
        self.t1 = t1.array
        self.labels = labels.array.astype(np.uint8)
        self.affine = t1.affine
        self._maps = {}

    def _map(self, role):
        if role not in self._maps:
            self._maps[role] = nifti.load(mni152_path(role)).array
        return self._maps[role]

    @property
    def gm(self):
        """Grey-matter probability x 255 (float32, the T1's grid)."""
        return self._map("gm")

    @property
    def wm(self):
        """White-matter probability x 255 (float32, the T1's grid)."""
        return self._map("wm")

    def split(self):
        """(training, validation): boolean masks of the grid, by z slice."""
        z = np.arange(self.t1.shape[2])
        validation = (z >= VALIDATION_Z[0]) & (z < VALIDATION_Z[1])
        training = (z < TRAINING_Z[0][1]) | (z >= TRAINING_Z[1][0])
        shape = self.t1.shape
        return (np.broadcast_to(training[None, None, :], shape), np.broadcast_to(validation[None, None, :], shape))

    def noisy_t1(self, seed=0):
        """The harder variant of the task (the data notes: 5% Gaussian noise, a smooth +-20% multiplicative
        bias field), reproducible from ``seed``: ``t1 * (1 + 0.2 f) + 0.05 * 255 * N(0, 1)`` (float32), where
        f is a sum of six plane waves cos(2 pi k . u + phi) over the grid's normalised coordinates u in
        [0, 1]^3, with k uniform in [-1, 1]^3 (at most one period across the head) and phi uniform, scaled
        so that max |f| = 1 on the grid; the noise is 5% of the stored range 0..255. Two intensity
        thresholds fitted on the training slices give Dice CSF / GM / WM 0.74 / 0.80 / 0.79 on it with
        seed 0 (0.90 / 0.97 / 0.98 on the clean T1). The labels stay those of the clean template."""
        return noisy_t1(self.t1, seed)

    def __repr__(self):
        counts = np.bincount(self.labels.ravel(), minlength=4)
        return f"MNI152(t1 {self.t1.shape}, labels per class {dict(zip(self.classes, counts.tolist()))})"


def noisy_t1(t1, seed=0, noise=0.05, bias=0.2):
    """``t1`` (stored 0..255 values) with a bias field and noise as :meth:`MNI152.noisy_t1` describes."""
    r = np.random.default_rng(seed)
    t1 = np.asarray(t1, dtype=np.float64)
    u = [np.linspace(0, 1, n) for n in t1.shape]
    f = np.zeros(t1.shape)
    for _ in range(6):
        k = r.uniform(-1, 1, 3)
        phase = r.uniform(0, 2 * np.pi)
        f += np.cos(2 * np.pi * (k[0] * u[0][:, None, None] + k[1] * u[1][None, :, None] + k[2] * u[2][None, None, :])
                    + phase)
    f /= np.abs(f).max()
    return (t1 * (1 + bias * f) + r.standard_normal(t1.shape) * noise * 255).astype(np.float32)


def mni152():
    """The bundled MNI152 template with its brain-tissue labels (an :class:`MNI152`)."""
    return MNI152()
