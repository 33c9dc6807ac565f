"""Pictures of volumes and label maps: three orthogonal slices with the labels overlaid, as a PNG.

    deformux.figures.overlay_png("out/overlay.png", t1, labels, affine)        # arrays [x][y][z]
    rgb = deformux.figures.orthogonal_slices(t1, labels, affine)               # (H, W, 3) uint8

Slices go through `center` (default: the centre of the labels' foreground, else of the volume), after
reorienting to the closest RAS axes (no resampling). Panels, left to right: sagittal (anterior to the
right), coronal and axial in radiological convention (the subject's right on the left of the picture),
superior up (anterior up in the axial panel); pixels are stretched to the voxel spacing (nearest
neighbour). Intensities are windowed to the 1st..99th percentile of the volume's non-zero voxels.

The PNG is written by a small writer here (zlib from the standard library; 8-bit RGB, no filtering),
atomically, so neither Pillow nor matplotlib is needed.
"""
import struct
import zlib

import numpy as np

from ._atomic import atomic_write

__all__ = ["overlay_png", "orthogonal_slices", "write_png", "PALETTE"]

#: Overlay colours for labels 1, 2, 3, ... (label 0 is not drawn); repeats after the last.
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                    [0, 128, 128], [220, 190, 255], [170, 110, 40], [128, 0, 0], [170, 255, 195]], np.float64)


def write_png(path, rgb):
    """Writes an (H, W, 3) uint8 array as an 8-bit RGB PNG, atomically."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"write_png: expected an (H, W, 3) array, got shape {rgb.shape}")
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()  # filter 0

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    with atomic_write(path) as f:
        f.write(png)
    return path


def _canonical(volume, affine):
    """The volume with its axes permuted and flipped to the closest RAS order, the spacing per canonical
    axis, and the map (order, flips): canonical axis w is input axis order[w], reversed if flips[w]."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    lengths = np.sqrt((a ** 2).sum(axis=0))
    order, flips, used = [0, 0, 0], [False] * 3, set()
    for i in np.argsort(-np.abs(a / np.where(lengths > 0, lengths, 1)).max(axis=0), kind="stable"):
        column = a[:, i]
        world = max((w for w in range(3) if w not in used), key=lambda w: abs(column[w]))
        used.add(world)
        order[world], flips[world] = int(i), column[world] < 0
    v = np.transpose(volume, order)
    for axis in range(3):
        if flips[axis]:
            v = np.flip(v, axis)
    return v, lengths[order], (order, flips)


def _stretch(panel, sy, sx):
    """Nearest-neighbour resize so that rows are sy and columns sx units apart (unit: the smallest)."""
    h, w = panel.shape[:2]
    rows = np.minimum((np.arange(max(1, round(h * sy))) / sy).astype(int), h - 1)
    cols = np.minimum((np.arange(max(1, round(w * sx))) / sx).astype(int), w - 1)
    return panel[rows][:, cols]


def orthogonal_slices(image, labels=None, affine=None, center=None, alpha=0.45, gap=4):
    """The three panels side by side as an (H, W, 3) uint8 array (see the module text). image and labels
    are [x][y][z] arrays on one grid; affine 4 x 4 (default: identity)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3 or 0 in image.shape:
        raise ValueError(f"orthogonal_slices: image must be a non-empty (x, y, z) array, got shape {image.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != image.shape:
            raise ValueError(f"orthogonal_slices: labels {labels.shape} and image {image.shape} differ in shape")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    vol, spacing, (order, flips) = _canonical(image, affine)
    lab = _canonical(labels, affine)[0] if labels is not None else None
    finite = vol[np.isfinite(vol)]
    nonzero = finite[finite != 0]
    lo, hi = np.percentile(nonzero if nonzero.size else finite if finite.size else [0.0, 1.0], [1, 99])
    gray = np.clip((np.nan_to_num(vol) - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * 255
    if center is None:
        fg = np.argwhere(lab > 0) if lab is not None else np.empty((0, 3))
        center = ((fg.min(0) + fg.max(0)) // 2) if len(fg) else np.array(vol.shape) // 2
    else:  # voxel indices of the input -> the canonical grid
        given = [int(v) for v in center]
        center = [image.shape[order[w]] - 1 - given[order[w]] if flips[w] else given[order[w]] for w in range(3)]
    c = [int(min(max(center[i], 0), vol.shape[i] - 1)) for i in range(3)]

    def panel(index):
        # (rows, columns) of each panel, as described in the module text
        if index == 0:      # sagittal: columns y (anterior right), rows z (superior up)
            g, l, sy, sx = gray[c[0]].T[::-1], (lab[c[0]].T[::-1] if lab is not None else None), spacing[2], spacing[1]
        elif index == 1:    # coronal: columns x descending (radiological), rows z
            g = gray[:, c[1]].T[::-1, ::-1]
            l = lab[:, c[1]].T[::-1, ::-1] if lab is not None else None
            sy, sx = spacing[2], spacing[0]
        else:               # axial: columns x descending, rows y (anterior up)
            g = gray[:, :, c[2]].T[::-1, ::-1]
            l = lab[:, :, c[2]].T[::-1, ::-1] if lab is not None else None
            sy, sx = spacing[1], spacing[0]
        rgb = np.repeat(g[..., None], 3, axis=2)
        if l is not None:
            shown = l > 0
            colors = PALETTE[(l[shown].astype(np.int64) - 1) % len(PALETTE)]
            rgb[shown] = (1 - alpha) * rgb[shown] + alpha * colors
        unit = spacing.min()
        return _stretch(rgb, sy / unit, sx / unit)

    panels = [panel(i) for i in range(3)]
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * 2
    out = np.zeros((height, width, 3), np.float64)
    x = 0
    for p in panels:
        top = (height - p.shape[0]) // 2
        out[top:top + p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + gap
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_png(path, image, labels=None, affine=None, center=None, alpha=0.45):
    """Writes orthogonal_slices(...) as a PNG at `path` (atomically); returns the path."""
    return write_png(path, orthogonal_slices(image, labels, affine, center=center, alpha=alpha))
