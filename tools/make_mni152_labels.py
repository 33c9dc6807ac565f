"""Builds the brain-tissue label map of the bundled MNI152 template (data/mni152/), exactly as
/work/shared/data/README.md (the project's data notes) defines it:

    brain mask: t1 / 255 > 0.2
    gm = gm / 255, wm = wm / 255, csf = clip(1 - gm - wm, 0, 1)
    label: 0 outside the mask; inside, 1 + argmax(csf, gm, wm) (the first maximum on ties):
           1 CSF, 2 grey matter, 3 white matter

in float64, and writes data/mni152/mni152_tissue_labels.nii.gz (uint8, the T1's grid, affine and header).
The split (validation z in [68, 124), training z < 60 or z >= 132) is in deformux.data.

    python3 tools/make_mni152_labels.py [--output PATH]

Needs numpy and the installed deformux package (its NIfTI reader and writer); deterministic.
python/tests/test_data.py checks the committed file against the same definition.
"""
import argparse
import os
from pathlib import Path

import numpy as np

from deformux import nifti

REPO = Path(__file__).resolve().parents[1]
DIR = REPO / "data" / "mni152"
T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
LABELS = "mni152_tissue_labels.nii.gz"


def tissue_labels(t1, gm, wm):
    """uint8 labels from the T1 and the GM/WM maps (arrays of the stored 0..255 values)."""
    t1, gm, wm = (np.asarray(a, dtype=np.float64) for a in (t1, gm, wm))
    mask = t1 / 255 > 0.2
    gm, wm = gm / 255, wm / 255
    csf = np.clip(1 - gm - wm, 0, 1)
    tissue = 1 + np.argmax(np.stack([csf, gm, wm]), axis=0)
    return np.where(mask, tissue, 0).astype(np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=str(DIR / LABELS))
    args = parser.parse_args(argv)
    t1, gm, wm = (nifti.load(DIR / name) for name in (T1, GM, WM))
    for img in (gm, wm):
        if img.array.shape != t1.array.shape or not np.array_equal(img.affine, t1.affine):
            raise SystemExit(f"make_mni152_labels: {img.path} is not on the T1's grid")
    labels = tissue_labels(t1.array, gm.array, wm.array)
    nifti.save(args.output, labels, t1.affine, header=t1, dtype=np.uint8,
               description="MNI152 tissue: 0 bg, 1 CSF, 2 GM, 3 WM")
    counts = np.bincount(labels.ravel(), minlength=4)
    print(f"wrote {os.path.relpath(args.output)}: {labels.shape}, voxels per label {counts.tolist()}")


if __name__ == "__main__":
    main()
