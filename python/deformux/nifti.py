"""A minimal NIfTI-1 reader and writer (single-file .nii / .nii.gz), in Python with gzip + NumPy.

Stop-gap for the demo: it will be replaced by the engine's Swift NIfTI reader (Sources/DeformUX/IO).
Arrays are indexed like nibabel's ``img.get_fdata()``: [x][y][z] in voxel space with the file's
affine (ARCHITECTURE.md section 8). NIfTI stores x fastest, so the file's data is read in Fortran order
and made C-contiguous once, here.

Every length and offset is checked before data is touched; a bad file raises NiftiError (a
ValueError) naming the file and the field.
"""
import gzip
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from ._atomic import atomic_write

HEADER_SIZE = 348
# NIfTI-1 datatype codes this reader accepts -> (numpy type code, bits per voxel)
DATATYPES = {
    2: ("u1", 8), 4: ("i2", 16), 8: ("i4", 32), 16: ("f4", 32), 64: ("f8", 64),
    256: ("i1", 8), 512: ("u2", 16), 768: ("u4", 32), 1024: ("i8", 64), 1280: ("u8", 64),
}


class NiftiError(ValueError):
    """A file that is not a NIfTI-1 volume this reader supports."""


@dataclass
class Volume:
    data: np.ndarray     # [x][y][z] (or more axes), C-contiguous, scl_slope/scl_inter applied if set
    affine: np.ndarray   # 4 x 4 float64, voxel -> world (mm)
    header: bytes        # the raw 348-byte header, kept so a writer can copy the spatial fields


def _open(path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_nifti(path):
    """Reads a single-file NIfTI-1 volume (`path`: str, bytes or os.PathLike). Returns a Volume;
    raises NiftiError, OSError."""
    path = os.fsdecode(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise NiftiError(f"{path}: cannot read ({e})") from e
    if len(raw) < HEADER_SIZE:
        raise NiftiError(f"{path}: {len(raw)} bytes, shorter than a NIfTI-1 header ({HEADER_SIZE})")
    header = raw[:HEADER_SIZE]
    endian = None
    for e in "<>":
        if struct.unpack_from(e + "i", header, 0)[0] == HEADER_SIZE:
            endian = e
    if endian is None:
        raise NiftiError(f"{path}: sizeof_hdr is not 348: not a NIfTI-1 file (NIfTI-2 is not supported)")
    magic = header[344:348]
    if magic == b"ni1\x00":
        raise NiftiError(f"{path}: a two-file NIfTI (.hdr/.img) is not supported; use a single .nii/.nii.gz")
    if magic != b"n+1\x00":
        raise NiftiError(f"{path}: magic is {magic!r}, expected b'n+1\\x00'")

    def get(fmt, offset):
        return struct.unpack_from(endian + fmt, header, offset)

    dim = get("8h", 40)
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise NiftiError(f"{path}: dim[0] (rank) must be 1..7, got {ndim}")
    shape = tuple(dim[1:ndim + 1])
    if any(s < 1 for s in shape):
        raise NiftiError(f"{path}: dimensions must be >= 1, got {shape}")
    datatype, bitpix = get("2h", 70)
    if datatype not in DATATYPES:
        raise NiftiError(f"{path}: datatype {datatype} is not supported "
                         f"(supported: {sorted(DATATYPES)}; complex and RGB are not)")
    code, bits = DATATYPES[datatype]
    if bitpix != bits:
        raise NiftiError(f"{path}: bitpix {bitpix} does not match datatype {datatype} ({bits} bits)")
    vox_offset = get("f", 108)[0]
    if not (np.isfinite(vox_offset) and vox_offset >= HEADER_SIZE + 4 and vox_offset == int(vox_offset)):
        raise NiftiError(f"{path}: vox_offset must be an integer >= 352, got {vox_offset}")
    vox_offset = int(vox_offset)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * bits // 8
    if vox_offset + nbytes > len(raw):
        raise NiftiError(f"{path}: truncated: {shape} voxels of {bits} bits need {vox_offset + nbytes} bytes, "
                         f"the file has {len(raw)}")
    data = np.frombuffer(raw, dtype=endian + code, count=count, offset=vox_offset)
    data = np.ascontiguousarray(data.reshape(shape, order="F"))
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    slope, inter = get("2f", 112)
    if np.isfinite(slope) and slope != 0 and (slope != 1 or inter != 0):
        data = data.astype(np.float32) * np.float32(slope) + np.float32(inter)
    return Volume(data=data, affine=_affine(get), header=header)


def _affine(get):
    """sform if set, else qform, else the pixdim scaling (the NIfTI-1 'method 1')."""
    pixdim = get("8f", 76)
    qform_code, sform_code = get("2h", 252)
    if sform_code > 0:
        rows = [get("4f", offset) for offset in (280, 296, 312)]
        return np.array(rows + [(0, 0, 0, 1)], dtype=np.float64)
    if qform_code > 0:
        b, c, d, qx, qy, qz = get("6f", 256)
        a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
        rot = np.array([
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ])
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        zooms = np.array([pixdim[1], pixdim[2], pixdim[3] * qfac])
        affine = np.eye(4)
        affine[:3, :3] = rot * zooms
        affine[:3, 3] = (qx, qy, qz)
        return affine
    return np.diag([pixdim[1] or 1.0, pixdim[2] or 1.0, pixdim[3] or 1.0, 1.0])


def write_nifti(path, data, affine, template_header=None, description="deformux"):
    """Writes a 3D float32 volume ([x][y][z]) as single-file NIfTI-1 (.nii, or .nii.gz by suffix).

    The affine goes to the sform (code 2, 'aligned'). With `template_header` (a Volume.header of the
    same grid), its qform and sform fields are copied as they are, so the output's spatial metadata
    is the input's. Written atomically: a temporary file in the same directory, then os.replace.
    `path`: str, bytes or os.PathLike.
    """
    path = os.fsdecode(path)
    data = np.asarray(data, dtype="<f4")
    if data.ndim != 3:
        raise ValueError(f"write_nifti: data must be 3D [x][y][z], got shape {data.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"write_nifti: affine must be 4 x 4, got {affine.shape}")
    hdr = bytearray(HEADER_SIZE)
    struct.pack_into("<i", hdr, 0, HEADER_SIZE)
    struct.pack_into("<8h", hdr, 40, 3, *data.shape, 1, 1, 1, 1)
    struct.pack_into("<2h", hdr, 70, 16, 32)                     # datatype float32, bitpix
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    struct.pack_into("<8f", hdr, 76, 1.0, *zooms, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", hdr, 108, 352.0)                      # vox_offset
    struct.pack_into("<2f", hdr, 112, 1.0, 0.0)                  # scl_slope, scl_inter
    hdr[123] = 10                                                # xyzt_units: mm, s
    hdr[148:148 + 80] = description.encode("ascii", "replace")[:79].ljust(80, b"\0")
    struct.pack_into("<2h", hdr, 252, 0, 2)                      # qform_code 0, sform_code 2
    for row in range(3):
        struct.pack_into("<4f", hdr, 280 + 16 * row, *affine[row])
    hdr[344:348] = b"n+1\x00"
    if template_header is not None:
        t = bytes(template_header)
        if len(t) != HEADER_SIZE or struct.unpack_from("<i", t, 0)[0] != HEADER_SIZE:
            raise ValueError("write_nifti: template_header must be a little-endian 348-byte NIfTI-1 header")
        struct.pack_into("<f", hdr, 76, struct.unpack_from("<f", t, 76)[0])  # pixdim[0] = qfac
        hdr[252:344] = t[252:344]                                # qform/sform codes, quatern, srow, intent_name
        hdr[123] = t[123]
    payload = bytes(hdr) + b"\0\0\0\0" + data.ravel(order="F").tobytes()

    with atomic_write(path) as raw:
        if path.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=4, mtime=0) as gz:
                gz.write(payload)
        else:
            raw.write(payload)
