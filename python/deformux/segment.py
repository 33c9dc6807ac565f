"""Whole volumes in, label maps out: ``deformux.segment`` and ``deformux.Segmenter``.

    labels = deformux.segment("t1.nii.gz", model="brain-tissue.json", output="labels.nii.gz")
    labels = deformux.segment(array, model=net, spacing=(1, 1, 1))          # uint8 array, same grid
    img = deformux.segment(nib.load("t1.nii.gz"), model="weights.safetensors")  # a nibabel image
    seg = deformux.Segmenter("brain-tissue.json", overlap=0.25)            # one model, many volumes
    for path in paths:
        seg(path, output=path.replace(".nii.gz", "_labels.nii.gz"))

The engine does the work (Sources/DeformUX/Pipeline): reorientation to RAS, resampling to the model's
spacing, the intensity preset, padding, sliding windows with gaussian blending in bounded memory, and
back onto the input grid, so the labels have the input's shape, affine and header. The model card
(deformux.card) supplies the settings; the keyword arguments override it.
"""
import json
import numbers
import os
import threading
from pathlib import Path

import numpy as np

from . import _C, nifti
from .card import ModelCard, load_model
from .model import DeformUXNet
from .progress import progress_callback

__all__ = ["segment", "Segmenter", "DEFAULT_MODEL", "default_model_path"]

#: The bundled default model: deformux/models/<DEFAULT_MODEL>.json and its weights (brain tissue in T1 MRI,
#: trained by tools/train_mni152.py).
DEFAULT_MODEL = "brain-tissue"


def default_model_path():
    """Where the bundled default model's card is looked for (inside the installed package)."""
    return Path(__file__).resolve().parent / "models" / f"{DEFAULT_MODEL}.json"


def _resolve_model(model, what):
    """(DeformUXNet, ModelCard) for the `model` argument."""
    if model is None:
        path = default_model_path()
        if not path.is_file():
            raise FileNotFoundError(
                2, f"{what}: the bundled default model is missing (looked for {path}); reinstall deformux, or pass "
                   f"model= a model card (.json), weights (.safetensors) or a deformux.DeformUXNet",
                str(path))
        return load_model(path)
    if isinstance(model, DeformUXNet):
        return model, ModelCard({"config": model.config, "window": None})
    if isinstance(model, (str, bytes, os.PathLike)):
        return load_model(model)
    raise TypeError(f"{what}: model must be None (the bundled default), a path to a model card (.json) or weights "
                    f"(.safetensors), or a deformux.DeformUXNet; got {type(model).__name__}")


def _overridden(card, what, overlap=None, window=None, tta=None, batch=None, largest_component=None):
    """The card with the keyword arguments applied (None: the card's own setting; the switches tta and
    largest_component override it with True or False either way)."""
    changes = {}
    if overlap is not None:
        if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real) or not 0 <= overlap < 1:
            raise ValueError(f"{what}: overlap must be a number with 0 <= overlap < 1, got {overlap!r}")
        changes["overlap"] = float(overlap)
    if window is not None:
        if isinstance(window, str):
            if window != "auto":
                raise ValueError(f"{what}: window must be an int, three ints or 'auto', got {window!r}")
            changes["window"] = None
        else:
            sizes = (window,) * 3 if isinstance(window, numbers.Integral) else tuple(window)
            if len(sizes) != 3 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sizes):
                raise ValueError(f"{what}: window must be an int, three ints or 'auto', got {window!r}")
            if any(s < 16 or s % 16 for s in sizes):
                raise ValueError(f"{what}: window sizes must be multiples of 16 (the network halves the grid four "
                                 f"times), got {tuple(int(s) for s in sizes)}")
            changes["window"] = [int(s) for s in sizes]
    for name, value in (("tta", tta), ("largest_component", largest_component)):
        if value is not None:
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{what}: {name} must be True, False or None (the card's), got {value!r}")
            changes[name] = bool(value)
    if batch is not None:
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
            raise ValueError(f"{what}: batch must be an int >= 1, got {batch!r}")
        changes["batch"] = int(batch)
    return card.replace(**changes) if changes else card


class _Input:
    """An image argument read into the engine's layout: data (C, X, Y, Z) float32 C-contiguous and its
    affine (4 x 4 float64), plus what is needed to give the result back in the same form."""

    def __init__(self, kind, data, affine, source=None, path=None):
        self.kind, self.data, self.affine, self.source, self.path = kind, data, affine, source, path

    @staticmethod
    def read(image, affine, spacing, output, what):
        if output is not None and not isinstance(image, (str, bytes, os.PathLike, nifti.NiftiImage)):
            raise TypeError(f"{what}: output= is for path or NiftiImage inputs; save the returned result yourself")
        if isinstance(image, (str, bytes, os.PathLike, nifti.NiftiImage)):
            if affine is not None or spacing is not None:
                raise TypeError(f"{what}: affine= and spacing= are for NumPy arrays; a NIfTI image has its own affine")
            if isinstance(image, nifti.NiftiImage):
                img, path = image, None
            else:
                path = os.fsdecode(image)
                if not os.path.exists(path):
                    raise FileNotFoundError(2, f"{what}: no such image file: {path}", path)
                img = nifti.load(path)
            data = _channels_first(img.array, what, "the NIfTI image")
            return _Input("nifti" if path is None else "path", data, np.asarray(img.affine, np.float64), img, path)
        if _is_nibabel(image):
            if affine is not None or spacing is not None:
                raise TypeError(f"{what}: affine= and spacing= are for NumPy arrays; a nibabel image has its own affine")
            array = np.asarray(image.get_fdata(dtype=np.float32))
            if array.ndim == 4:
                array = np.moveaxis(array, -1, 0)  # nibabel's (x, y, z, c) -> (c, x, y, z)
            data = _channels_first(array, what, "the nibabel image")
            return _Input("nibabel", data, np.asarray(image.affine, np.float64), image)
        if isinstance(image, np.ndarray):
            return _Input("array", _channels_first(image, what, "image"), _array_affine(affine, spacing, what))
        raise TypeError(f"{what}: image must be a path to a NIfTI file (.nii/.nii.gz), a deformux.nifti.NiftiImage, a "
                        f"nibabel image or a NumPy array (x, y, z) or (c, x, y, z); got {type(image).__name__}")


def _is_nibabel(image):
    module = type(image).__module__ or ""
    return module.startswith("nibabel") and hasattr(image, "get_fdata") and hasattr(image, "affine")


def _channels_first(array, what, name):
    """(C, X, Y, Z) float32, C-contiguous, from (X, Y, Z) or (C, X, Y, Z) real values."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{what}: {name} must be a NumPy array, got {type(array).__name__}")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{what}: {name} must hold real numbers (int, uint, float or bool), got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[None]
    elif array.ndim != 4:
        raise ValueError(f"{what}: {name} must be (x, y, z) or (c, x, y, z), got shape {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"{what}: {name} must not be empty, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _array_affine(affine, spacing, what):
    if affine is not None and spacing is not None:
        raise TypeError(f"{what}: give affine= or spacing=, not both")
    if affine is None and spacing is None:
        raise TypeError(f"{what}: a NumPy array needs affine= (4 x 4 voxel -> world mm) or spacing= (mm per axis, "
                        f"e.g. spacing=(1, 1, 1)) so that the model sees the right voxel size and orientation")
    if spacing is not None:
        s = np.asarray(spacing, dtype=np.float64)
        if s.shape == ():
            s = np.full(3, float(s))
        if s.shape != (3,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise ValueError(f"{what}: spacing must be three finite sizes > 0 (mm), got {spacing!r}")
        return np.diag([s[0], s[1], s[2], 1.0])
    a = np.asarray(affine, dtype=np.float64)
    if a.shape == (3, 4):
        a = np.vstack([a, [0, 0, 0, 1]])
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: affine must be a finite 4 x 4 matrix, got shape {a.shape}")
    return np.ascontiguousarray(a)


class Segmenter:
    """A model, its inference session and the engine's segmenter, kept for many volumes (the working
    memory is reused from one volume to the next).

    model: None (the bundled default), a model card (.json), weights (.safetensors) or a DeformUXNet.
    card: a ModelCard, a dict or a card file to use instead of the model's (for a DeformUXNet: default
    is a card-less model's settings: the input's grid, MR percentile preset, automatic windows).
    overlap, window (an int, three ints or "auto"), tta, batch, largest_component override the card
    (None: the card's; the switches tta and largest_component True or False either way).
    """

    def __init__(self, model=None, *, card=None, overlap=None, window=None, tta=None, batch=None,
                 largest_component=None):
        what = "Segmenter"
        self.model, base = _resolve_model(model, what)
        if card is not None:
            if isinstance(card, ModelCard):
                base = card
            elif isinstance(card, dict):
                base = ModelCard(card)
            elif isinstance(card, (str, bytes, os.PathLike)):
                base = ModelCard.from_file(card)
            else:
                raise TypeError(f"{what}: card must be a ModelCard, a dict or a path, got {type(card).__name__}")
        self.card = _overridden(base, what, overlap, window, tta, batch, largest_component)
        self._session = self.model.session()
        self._handle = _C.segmenter_create(self._session._handle, self.card.to_json())
        self._lock = threading.Lock()
        #: The statistics of the last segmentation (windows, seconds per stage, ...), or None.
        self.statistics = None

    @property
    def classes(self):
        """The class names (index 0 background)."""
        return self.card.class_names(self.model.config["out_channels"])

    def __repr__(self):
        return f"Segmenter({self.card.name!r}, classes={self.classes}, window={self.card.window}, overlap={self.card.overlap})"

    def segment(self, image, *, affine=None, spacing=None, output=None, return_probabilities=False, progress=True):
        """Segments one image; see :func:`deformux.segment` for the arguments and results."""
        what = "segment"
        if output is not None:
            output = os.fsdecode(output)
            if not (output.endswith(".nii") or output.endswith(".nii.gz")):
                raise ValueError(f"{what}: output must end in .nii or .nii.gz, got {output!r}")
        source = _Input.read(image, affine, spacing, output, what)
        labels, probabilities = self._run(source.data, source.affine, return_probabilities, progress)
        return _result(source, labels, probabilities, output, self.card)

    __call__ = segment

    def _run(self, data, affine, return_probabilities, progress):
        cin, cout = self.model.config["in_channels"], self.model.config["out_channels"]
        if data.shape[0] != cin:
            raise ValueError(f"segment: the model takes {cin} channel(s), the image has {data.shape[0]} "
                             f"(shape {data.shape[1:]} with {data.shape[0]} channel(s))")
        labels = np.empty(data.shape[1:], np.uint8)
        probabilities = np.empty((cout,) + data.shape[1:], np.float32) if return_probabilities else None
        callback, bar = progress_callback(progress, "segment")
        with self._lock:
            try:
                _C.segment(self._handle, data, np.ascontiguousarray(affine, dtype=np.float64), labels, probabilities,
                           callback)
            finally:
                if bar is not None:
                    bar.close()
            self.statistics = _statistics(self._handle)
        return labels, probabilities

    def release_memory(self):
        """Frees the working memory kept between volumes (the segmenter's and its session's)."""
        _C.segmenter_release_memory(self._handle)
        self._session.release_memory()

    @property
    def retained_bytes(self):
        """Bytes kept between volumes: the segmenter's working memory and its session's."""
        return _C.segmenter_retained_bytes(self._handle) + self._session.retained_bytes


def _statistics(handle):
    return json.loads(_C.segmenter_statistics_json(handle))


def _label_header(header, shape, dtype, code):
    """A copy of a NiftiHeader describing a derived array (labels or probabilities) of `shape`."""
    fields = dict(header)
    dims = list(shape[1:]) + [shape[0]] if len(shape) == 4 else list(shape)
    fields.update(shape=dims, array_shape=list(shape), dtype=np.dtype(dtype).name, datatype=code,
                  bitpix=np.dtype(dtype).itemsize * 8, dim=[len(dims)] + dims + [1] * (7 - len(dims)),
                  voxel_count=int(np.prod(shape)), scl_slope=1.0, scl_inter=0.0)
    return nifti.NiftiHeader(fields, header._handle, b"")


def _result(source, labels, probabilities, output, card):
    """The result in the form of the input."""
    if source.kind == "array":
        return (labels, probabilities) if probabilities is not None else labels
    if source.kind == "nibabel":
        import nibabel  # noqa: F401  (the input is a nibabel image, so nibabel is installed)
        img = source.source
        header = img.header.copy()
        header.set_data_dtype(np.uint8)
        if hasattr(header, "set_slope_inter"):
            header.set_slope_inter(1.0, 0.0)
        out = type(img)(labels, img.affine, header)
        if probabilities is None:
            return out
        pheader = img.header.copy()
        pheader.set_data_dtype(np.float32)
        if hasattr(pheader, "set_slope_inter"):
            pheader.set_slope_inter(1.0, 0.0)
        return out, type(img)(np.moveaxis(probabilities, 0, -1), img.affine, pheader)
    img = source.source
    if output is not None:
        nifti.save(output, labels, img.affine, header=img, dtype=np.uint8, description=f"deformux: {card.name}"[:79])
    result = nifti.NiftiImage(labels, img.affine.copy(), _label_header(img.header, labels.shape, np.uint8, 2), output)
    if probabilities is None:
        return result
    return result, nifti.NiftiImage(probabilities, img.affine.copy(),
                                    _label_header(img.header, probabilities.shape, np.float32, 16))


def segment(image, model=None, *, overlap=None, window=None, tta=None, return_probabilities=False, progress=True,
            output=None, affine=None, spacing=None, batch=None, largest_component=None):
    """Segments a volume and returns the labels on its grid, in the form it came in.

    image: a NIfTI path (.nii/.nii.gz; with ``output=`` the labels are also written there, uint8, the
    input's header and affine, atomically) -> a :class:`deformux.nifti.NiftiImage` (``.array`` uint8
    (x, y, z), ``.affine``, ``.header``); a NiftiImage (from deformux.nifti.load) -> a NiftiImage; a nibabel
    image -> a nibabel image of the same class (nibabel is needed only for this); a NumPy array (x, y, z)
    or (c, x, y, z) of real numbers (converted to float32) with ``affine=`` (4 x 4) or ``spacing=`` (mm)
    -> a uint8 array (x, y, z). With ``return_probabilities=True``: (labels, probabilities), the
    probabilities float32 (classes, x, y, z) (nibabel: (x, y, z, classes)).

    model: None (the bundled default model), a model card (.json), weights (.safetensors, with a sidecar
    card <stem>.json if there is one) or a :class:`deformux.DeformUXNet`. For a single volume this builds
    the model and its session each call; use :class:`Segmenter` for many.
    overlap (0 <= overlap < 1), window (an int, three ints, multiples of 16, or "auto"), tta (flip test-time
    augmentation, 8x the work), batch (windows per forward), largest_component (keep the largest connected
    component of each label): override the model card (None keeps the card's; tta and largest_component
    True or False override it either way).
    progress: True (a bar on stderr when it is a terminal), False, or a callable(done, total) returning
    False to cancel (done and total count the network's steps: 12 per window). Ctrl-C cancels cleanly
    (KeyboardInterrupt; nothing is written).

    Errors: a missing image or model file raises FileNotFoundError, a damaged file deformux.FileFormatError,
    bad arrays or arguments TypeError / ValueError naming the argument, a cancelled run DeformUXError.
    """
    what = "segment"
    if output is not None:
        output = os.fsdecode(output)
        if not (output.endswith(".nii") or output.endswith(".nii.gz")):
            raise ValueError(f"{what}: output must end in .nii or .nii.gz, got {output!r}")
    source = _Input.read(image, affine, spacing, output, what)  # before the model: bad inputs fail fast
    s = Segmenter(model, overlap=overlap, window=window, tta=tta, batch=batch, largest_component=largest_component)
    labels, probabilities = s._run(source.data, source.affine, return_probabilities, progress)
    return _result(source, labels, probabilities, output, s.card)
