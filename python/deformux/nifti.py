"""NIfTI volumes (NIfTI-1 and NIfTI-2, single file .nii or gzip-compressed .nii.gz), read and written by
the engine (Sources/DeformUX/IO; the C calls dfx_nifti_*). nibabel is not needed.

    img = deformux.nifti.load("t1.nii.gz")
    img.array        float32, indexed [x][y][z] like nibabel's img.get_fdata(dtype=np.float32)
    img.affine       4 x 4 float64, voxel (i, j, k) -> world mm, nibabel's img.affine
    img.header       dict of the header fields (nibabel's names), e.g. img.header["sform_code"]
    img.zooms        nibabel's header.get_zooms() (pixdim);  img.spacing: voxel sizes from the affine
    deformux.nifti.save("labels.nii.gz", labels.astype(np.uint8), img.affine, header=img)

Layout (ARCHITECTURE.md section 8): a 3-D volume is a C-contiguous (x, y, z) array. Files with more axes
are channel-first, the extra axes outermost first: 4-D files give (t, x, y, z), 5-D files (u, t, x, y,
z), so each 3-D volume is one contiguous block and ``img.array[None]`` is the network's N x C x D x H x W
input with the volumes as channels. ``img.nibabel_order()`` gives the (x, y, z, t, u) view nibabel
returns. 1-D and 2-D files are padded to (x, 1, 1) and (x, y, 1).

Values: scl_slope and scl_inter are applied exactly as nibabel does (in float64, then rounded to
float32; a slope of 0 or NaN means none). ``load(path, dtype="int32")`` returns exact integers (label
maps; an error if a voxel is not an integer) and ``dtype="raw"`` the stored values in the file's own
dtype, unscaled.

Errors: a missing file raises FileNotFoundError (other system errors their OSError subclass), a damaged
or foreign file deformux.FileFormatError (an OSError whose message names the file and what was wrong),
bad arguments TypeError or ValueError.
"""
import json
import numbers
import os

import numpy as np

from . import _C
from ._C import FileFormatError

__all__ = ["load", "save", "NiftiImage", "NiftiHeader", "NiftiError", "DATATYPES"]

#: The error for a file that is not a NIfTI volume this reader supports (deformux.FileFormatError).
NiftiError = FileFormatError

# dfx_nifti_read kinds (deformux.h: DFX_NIFTI_FLOAT32, DFX_NIFTI_INT32, DFX_NIFTI_RAW)
_FLOAT32, _INT32, _RAW = 0, 1, 2

#: numpy dtype -> NIfTI datatype code, for every type the engine reads and writes.
DATATYPES = {
    np.dtype(np.uint8): 2, np.dtype(np.int16): 4, np.dtype(np.int32): 8, np.dtype(np.float32): 16,
    np.dtype(np.float64): 64, np.dtype(np.int8): 256, np.dtype(np.uint16): 512, np.dtype(np.uint32): 768,
    np.dtype(np.int64): 1024, np.dtype(np.uint64): 1280,
}
_DTYPE_OF_CODE = {code: dtype for dtype, code in DATATYPES.items()}


class NiftiHeader(dict):
    """The header fields as a dict (names as nibabel's: "dim", "pixdim", "sform_code", "descrip", ...,
    plus "affine", "qform", "sform" as 4 x 4 arrays, "shape", "array_shape", "dtype", "extensions" as
    [(code, bytes)]). ``raw`` is the header as stored in the file. It also serves as the template
    for :func:`save` (``header=img.header`` or ``header=img``)."""

    def __init__(self, fields, handle=None, raw=b""):
        super().__init__(fields)
        self._handle = handle  # the engine's handle, voxels released: a template for writing
        self.raw = raw


class NiftiImage:
    """A volume read by :func:`load`: ``array``, ``affine`` (4 x 4 float64) and ``header``."""

    def __init__(self, array, affine, header, path=None):
        self.array = array
        self.affine = affine
        self.header = header
        self.path = path

    @property
    def shape(self):
        """The data shape as nibabel reports it: (x, y, z[, t[, u]])."""
        return tuple(self.header["shape"])

    @property
    def zooms(self):
        """nibabel's header.get_zooms(): pixdim[1 .. ndim] (voxel sizes, then the time step)."""
        return tuple(self.header["zooms"])

    @property
    def spacing(self):
        """The voxel sizes along x, y, z in mm: the lengths of the affine's first three columns."""
        return tuple(self.header["spacing"])

    @property
    def extensions(self):
        """The header extensions as [(code, bytes)], as stored (NUL padding included)."""
        return list(self.header["extensions"])

    def nibabel_order(self):
        """``array`` viewed in nibabel's axis order (x, y, z[, t[, u]]) and shape (no copy)."""
        a = self.array
        if a.ndim == 4:
            a = np.moveaxis(a, 0, -1)
        elif a.ndim == 5:
            a = a.transpose(2, 3, 4, 1, 0)
        return a.reshape(self.shape)

    def __repr__(self):
        return (f"NiftiImage(path={self.path!r}, shape={self.shape}, array {self.array.dtype} {self.array.shape}, "
                f"affine from the {self.header['affine_source']})")


def _header(handle):
    fields = json.loads(_C.nifti_header_json(handle))
    for key in ("affine", "sform", "qform"):
        if fields[key] is not None:
            fields[key] = np.array(fields[key], dtype=np.float64).reshape(4, 4)
    fields["extensions"] = [(e["code"], bytes.fromhex(e["content"])) for e in fields["extensions"]]
    return NiftiHeader(fields, handle, _C.nifti_raw_header(handle))


def load(path, *, dtype="float32"):
    """Reads a NIfTI-1 or NIfTI-2 file (.nii or .nii.gz). Returns a :class:`NiftiImage`.

    dtype: "float32" (default; nibabel's get_fdata(dtype=np.float32) values), "int32" (exact integers,
    for label maps; ValueError if a voxel is not an integer in the int32 range after scaling) or "raw"
    (the stored values in the file's dtype, unscaled; scl_slope and scl_inter are in the header).
    path: str, bytes or os.PathLike.
    """
    kinds = {"float32": _FLOAT32, "int32": _INT32, "raw": _RAW}
    if not isinstance(dtype, str):
        try:
            dtype = np.dtype(dtype).name
        except TypeError:
            raise TypeError(f"nifti.load: dtype must be 'float32', 'int32' or 'raw', got {dtype!r}") from None
    if dtype not in kinds:
        raise ValueError(f"nifti.load: dtype must be 'float32', 'int32' or 'raw', got {dtype!r}")
    handle = _C.nifti_open(path)
    header = _header(handle)
    kind = kinds[dtype]
    out_dtype = {_FLOAT32: np.dtype(np.float32), _INT32: np.dtype(np.int32)}.get(kind)
    if out_dtype is None:
        out_dtype = _DTYPE_OF_CODE[header["datatype"]]
    array = np.empty(header["array_shape"], dtype=out_dtype)
    try:
        _C.nifti_read(handle, kind, array)
    finally:
        _C.nifti_release_voxels(handle)  # the header stays, as a template for save()
    affine = header["affine"].copy()
    return NiftiImage(array, affine, header, os.fspath(path) if not isinstance(path, bytes) else os.fsdecode(path))


def _converted(array, dtype, what):
    """array as `dtype` (a DATATYPES key): integer targets only from values that fit exactly."""
    if array.dtype == dtype:
        return array
    if dtype.kind in "iu" and array.dtype.kind not in "iub":
        if array.size and not np.all(np.isfinite(array)):
            raise ValueError(f"{what}: the array has non-finite values, which {dtype} cannot hold")
        if array.size and not np.array_equal(array, np.round(array)):
            raise ValueError(f"{what}: the array has non-integer values; round them before saving as {dtype}")
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        lo, hi = array.min(), array.max()
        if lo < info.min or hi > info.max:
            raise ValueError(f"{what}: values {lo} .. {hi} do not fit in {dtype} ({info.min} .. {info.max})")
    return array.astype(dtype)


def save(path, array, affine=None, *, header=None, dtype=None, description=None, compression_level=None):
    """Writes ``array`` as a single-file NIfTI-1: gzip-compressed if ``path`` ends in ".nii.gz", else it
    must end in ".nii". Atomic (a temporary file in the same directory, then a rename).

    array: (x, y, z), (t, x, y, z) or (u, t, x, y, z) as :func:`load` returns them (any dtype of
    DATATYPES; bool is written as uint8).
    affine: 4 x 4 voxel -> world; default: the template's.
    header: a :class:`NiftiImage` or its ``.header`` to keep (intent, units, description, extensions, and
    its sform/qform fields as they are when ``affine`` is close to its own); None for a fresh header.
    dtype: the voxel type to write (e.g. np.uint8 for labels); integer types only take integer values
    that fit (ValueError otherwise). Default: the array's.
    The file has scl_slope 1 and scl_inter 0 (the values are written as given), datatype and dims from
    the array, and the affine as sform and qform (codes from the template, else 1).
    """
    what = "nifti.save"
    if isinstance(header, NiftiImage):
        header = header.header
    if header is not None and not isinstance(header, NiftiHeader):
        raise TypeError(f"{what}: header must be a NiftiImage or its .header (from deformux.nifti.load), "
                        f"got {type(header).__name__}")
    if affine is None:
        if header is None:
            raise ValueError(f"{what}: give an affine (4 x 4) or a header to take it from")
        affine = header["affine"]
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{what}: affine must be 4 x 4, got shape {affine.shape}")
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{what}: array must be a numpy array, got {type(array).__name__}")
    if array.ndim not in (3, 4, 5):
        raise ValueError(f"{what}: array must be (x, y, z), (t, x, y, z) or (u, t, x, y, z), got shape {array.shape}")
    if dtype is None:
        target = np.dtype(np.uint8) if array.dtype == np.bool_ else array.dtype.newbyteorder("=")
        if target not in DATATYPES:
            raise TypeError(f"{what}: arrays of {array.dtype} cannot be written; pass dtype= one of "
                            f"{', '.join(d.name for d in DATATYPES)}")
    else:
        target = np.dtype(dtype)
        if target not in DATATYPES:
            raise TypeError(f"{what}: dtype must be one of {', '.join(d.name for d in DATATYPES)}, got {target}")
    data = np.ascontiguousarray(_converted(array, target, what))
    dims = tuple(int(n) for n in array.shape[-3:]) + tuple(int(n) for n in reversed(array.shape[:-3]))
    if compression_level is None:
        compression_level = -1
    elif isinstance(compression_level, bool) or not isinstance(compression_level, numbers.Integral):
        raise TypeError(f"{what}: compression_level must be an int 0..9, got {compression_level!r}")
    elif not -1 <= compression_level <= 9:
        raise ValueError(f"{what}: compression_level must be -1 (the default) or 0..9, got {compression_level}")
    if description is not None and not isinstance(description, str):
        raise TypeError(f"{what}: description must be a str, got {type(description).__name__}")
    _C.nifti_write(path, data, DATATYPES[target], dims, np.ascontiguousarray(affine),
                   header._handle if header is not None else None, description, int(compression_level))
