"""Writes the NIfTI fixtures in Tests/Fixtures/nifti/: small files and what nibabel reads from them.

    /work/venv-torch/bin/python tools/make_nifti_fixtures.py      (needs nibabel and numpy)

Each case is a file built with nibabel's header classes (so odd headers can be made on purpose), read back
with nib.load, and described in manifest.json with what nibabel reports:

    file, version, big_endian, gzip, datatype, shape (nibabel's), array_shape (the engine's layout),
    affine (img.affine), sform, qform (or null if nibabel refuses it), sform_code, qform_code, pixdim
    (after nibabel's fixes), zooms, scl_slope, scl_inter (as stored), applied_slope, applied_inter
    (what nibabel's array proxy applies), vox_offset, descrip, extensions [[code, hex content]]

Floats are written as repr strings ("nan" for NaN), so that any correctly rounded parser gets the
same doubles back.

and two binary files per case, in the engine's layout (ARCHITECTURE.md section 8: [x][y][z], extra axes
first in reverse order, C order), little-endian:

    <name>.f32   img.get_fdata(dtype=np.float32)
    <name>.raw   img.dataobj.get_unscaled() in the file's datatype

plus "mni": facts about the bundled MNI152 T1 as nibabel reads it (shape, affine, sum, some voxels).
The Swift tests (NIfTITests.swift) read these; nothing at test time needs nibabel.
"""
import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "Tests" / "Fixtures" / "nifti"
MNI = ROOT / "data" / "mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"

DTYPES = {  # numpy name -> NIfTI code
    "uint8": 2, "int16": 4, "int32": 8, "float32": 16, "float64": 64, "int8": 256, "uint16": 512,
    "uint32": 768, "int64": 1024, "uint64": 1280,
}

OBLIQUE = np.array([  # a rotation of about 20 degrees with anisotropic voxels and a translation
    [0.9396926, -0.3420201, 0.0, -90.5],
    [0.3420201, 0.9396926, 0.0, 102.25],
    [0.0, 0.0, 2.5, -33.0],
    [0.0, 0.0, 0.0, 1.0],
]) @ np.diag([1.25, 0.8, 1.0, 1.0])


def values(dtype, shape, rng):
    """Values that exercise the type: its extremes, zero, and random values in range."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    if dt.kind == "f":
        v = rng.standard_normal(n) * 1000
        special = [0.0, -0.0, 1e-30, -3.5e10]
        v[:min(n, 4)] = special[:min(n, 4)]
        return v.astype(dt).reshape(shape)
    info = np.iinfo(dt)
    v = rng.integers(info.min, info.max, size=n, dtype=dt, endpoint=True)
    v[:min(n, 3)] = [info.min, info.max, 0][:min(n, 3)]
    if dt.itemsize == 8 and n >= 5:  # values that float64 and float32 round differently
        v[3] = dt.type(2**53 + 1) if dt.kind == "u" else dt.type(-(2**53 + 3))
        v[4] = dt.type(2**62 + 2**38 + 1)
    return v.reshape(shape)


def engine_layout(a):
    """nibabel's (x, y, z, t, u) -> the engine's (u, t, x, y, z), rank 1 and 2 padded to 3."""
    if a.ndim < 3:
        a = a.reshape(a.shape + (1,) * (3 - a.ndim))
    if a.ndim == 4:
        a = np.moveaxis(a, 3, 0)
    elif a.ndim == 5:
        a = a.transpose(4, 3, 0, 1, 2)
    return np.ascontiguousarray(a)


def make_header(version, endian, data, dtype):
    cls = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    hdr = cls(endianness=endian)
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(data.shape)
    return hdr


def file_bytes(hdr, data):
    """The header (with extensions) at its vox_offset, then the data in F order in the header's dtype."""
    buf = io.BytesIO()
    hdr.write_to(buf)
    offset = hdr.get_data_offset()
    assert buf.tell() <= offset, (buf.tell(), offset)
    buf.write(b"\0" * (offset - buf.tell()))
    buf.write(np.asarray(data).astype(hdr.get_data_dtype()).tobytes(order="F"))
    return buf.getvalue()


CASES = []


def case(name, data, dtype, *, version=1, endian="<", gz=False, members=1, edit=None):
    hdr = make_header(version, endian, data, dtype)
    hdr.set_sform(OBLIQUE, code=2)
    hdr.set_qform(OBLIQUE, code=1)
    hdr["descrip"] = f"deformux fixture {name}".encode()
    hdr["xyzt_units"] = 10
    if edit:
        edit(hdr)
    raw = file_bytes(hdr, data)
    suffix = ".nii.gz" if gz else ".nii"
    if gz:
        if members == 1:
            raw = gzip.compress(raw, mtime=0)
        else:  # several gzip members back to back, with NUL padding after the last (Python's gzip reads both)
            cut = len(raw) // members
            parts = [raw[i * cut:(i + 1) * cut if i < members - 1 else len(raw)] for i in range(members)]
            raw = b"".join(gzip.compress(p, mtime=0) for p in parts) + b"\0" * 8
    path = OUT / (name + suffix)
    path.write_bytes(raw)
    CASES.append((name, path))


def describe(name, path):
    img = nib.load(str(path))
    # img.header has scl_slope/scl_inter/vox_offset reset (the proxy applies them); the file's own
    # header, read with nibabel's checks and fixes, has them as stored.
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fileobj:
        hdr = type(img.header).from_fileobj(fileobj)
    f32 = engine_layout(img.get_fdata(dtype=np.float32))
    raw = engine_layout(np.asanyarray(img.dataobj.get_unscaled()))
    f32.astype("<f4").tofile(OUT / f"{name}.f32")
    raw.astype(raw.dtype.newbyteorder("<")).tofile(OUT / f"{name}.raw")
    try:
        qform = hdr.get_qform().ravel().tolist()
    except Exception:  # nibabel refuses the quaternion
        qform = None
    is2 = isinstance(hdr, nib.Nifti2Header)
    return {
        "name": name, "file": path.name, "version": 2 if is2 else 1,
        "big_endian": hdr.endianness == ">", "gzip": path.suffix == ".gz",
        "datatype": int(hdr["datatype"]), "shape": list(img.shape), "array_shape": list(f32.shape),
        "affine": img.affine.ravel().tolist(), "sform": hdr.get_sform().ravel().tolist(), "qform": qform,
        "sform_code": int(hdr["sform_code"]), "qform_code": int(hdr["qform_code"]),
        "pixdim": [float(p) for p in hdr["pixdim"]], "zooms": [float(z) for z in hdr.get_zooms()],
        "scl_slope": float(hdr["scl_slope"]), "scl_inter": float(hdr["scl_inter"]),
        "descrip": hdr["descrip"].item().decode(),
        "extensions": [[int(e.get_code()), e.content.hex()] for e in hdr.extensions],
        "vox_offset": int(img.dataobj.offset),
        "applied_slope": float(img.dataobj.slope), "applied_inter": float(img.dataobj.inter),
    }


def exact(x):
    """Floats as their shortest repr strings (a correctly rounded parse gives back the same double;
    JSON numbers go through parsers that are not always correctly rounded), NaN as "nan"."""
    if isinstance(x, dict):
        return {k: exact(v) for k, v in x.items()}
    if isinstance(x, list):
        return [exact(v) for v in x]
    if isinstance(x, float):
        return repr(x)
    return x


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        if old.name != "README.md":
            old.unlink()
    rng = np.random.default_rng(8)
    shape = (5, 4, 3)

    # every datatype, plain and little-endian, sform + qform
    for dtype in DTYPES:
        case(f"dtype_{dtype}", values(dtype, shape, rng), dtype)

    # scaling, as nibabel applies it (float64, then float32)
    def scl(slope, inter):
        def edit(h):
            h["scl_slope"], h["scl_inter"] = slope, inter
        return edit
    case("scale_int16", values("int16", shape, rng), "int16", edit=scl(0.37, -12.5))
    case("scale_uint8_slope_only", values("uint8", shape, rng), "uint8", edit=scl(2.0, 0.0))
    case("scale_float32", values("float32", shape, rng), "float32", edit=scl(1.5, 0.25))
    case("scale_int64", values("int64", shape, rng), "int64", edit=scl(3.0, 1.0))
    case("scale_slope_zero", values("int16", shape, rng), "int16", edit=scl(0.0, 7.0))
    case("scale_slope_nan", values("int16", shape, rng), "int16", edit=scl(np.nan, 7.0))
    case("scale_intercept_only", values("uint8", shape, rng), "uint8", edit=scl(1.0, -100.0))

    # which affine
    def sform_only(h):
        h.set_qform(None, code=0)
        h["qform_code"] = 0
    def qform_only(h):
        h["sform_code"] = 0
    def qform_flipped(h):  # qfac -1, an oblique rotation about two axes
        a = np.array([[0.0, 0.0, -2.0, 10.0], [0.6, 0.8, 0.0, -20.0], [-0.8, 0.6, 0.0, 30.5], [0, 0, 0, 1]])
        a[:3, :3] = a[:3, :3] @ np.diag([1.1, 0.9, 1.0])
        h.set_qform(a, code=1)
        h["sform_code"] = 0
    def neither(h):
        h["sform_code"] = 0
        h["qform_code"] = 0
        h["pixdim"][1:4] = [2.0, 1.5, 3.0]
    def neither_fixed_pixdim(h):  # nibabel's check_fix: 0 -> 1, negative -> abs, qfac 0.5 -> 1
        h["sform_code"] = 0
        h["qform_code"] = 0
        h["pixdim"][:4] = [0.5, -2.0, 0.0, -0.75]
    def both_differ(h):
        h.set_sform(np.diag([3.0, 2.0, 1.0, 1.0]) + np.array([[0, 0, 0, 5.0], [0] * 4, [0] * 4, [0] * 4]), code=4)
    def bad_codes(h):  # sform_code 7 is not a code: nibabel sets it to 0 and uses the qform
        h["sform_code"] = 7
        h["qform_code"] = 3
    def negative_code(h):
        h["sform_code"] = -1
        h["qform_code"] = 0
    def quaternion_w_zero(h):  # a 180-degree rotation: b^2 + c^2 + d^2 = 1, a = 0
        h["sform_code"] = 0
        h["quatern_b"], h["quatern_c"], h["quatern_d"] = 0.0, 0.6, 0.8
    def quaternion_invalid_sform_used(h):  # b^2 + c^2 + d^2 > 1: nibabel's qform fails, the sform is used
        h["quatern_b"], h["quatern_c"], h["quatern_d"] = 0.9, 0.6, 0.8
    f = values("float32", shape, rng)
    case("affine_sform_only", f, "float32", edit=sform_only)
    case("affine_qform_only", f, "float32", edit=qform_only)
    case("affine_qform_flipped", f, "float32", edit=qform_flipped)
    case("affine_pixdim", f, "float32", edit=neither)
    case("affine_pixdim_fixed", f, "float32", edit=neither_fixed_pixdim)
    case("affine_both_differ", f, "float32", edit=both_differ)
    case("affine_bad_codes", f, "float32", edit=bad_codes)
    case("affine_negative_code", f, "float32", edit=negative_code)
    case("affine_quaternion_w_zero", f, "float32", edit=quaternion_w_zero)
    case("affine_quaternion_invalid", f, "float32", edit=quaternion_invalid_sform_used)

    # byte order, compression, NIfTI-2
    case("bigendian_int16", values("int16", shape, rng), "int16", endian=">")
    case("bigendian_float64_scaled", values("float64", shape, rng), "float64", endian=">", edit=scl(0.5, 2.0))
    case("gzip_float32", values("float32", shape, rng), "float32", gz=True)
    case("gzip_members", values("int16", (7, 6, 5), rng), "int16", gz=True, members=3)
    case("nifti2_float32", values("float32", shape, rng), "float32", version=2)
    case("nifti2_bigendian_gzip_int32", values("int32", shape, rng), "int32", version=2, endian=">", gz=True)
    case("nifti2_qform_only", values("float64", shape, rng), "float64", version=2, edit=qform_flipped)

    # shapes
    case("rank4", values("float32", (4, 3, 2, 3), rng), "float32")
    case("rank5", values("int16", (3, 2, 2, 1, 3), rng), "int16")
    case("rank2_pixdim", values("uint8", (6, 5), rng), "uint8", edit=neither)
    case("single_voxel", values("float32", (1, 1, 1), rng), "float32")
    case("odd_7x5x3", values("uint16", (7, 5, 3), rng), "uint16")

    # extensions (an odd-sized one too: nibabel pads to 16)
    def extensions(h):
        h.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment from the fixture generator"))
        h.extensions.append(nib.nifti1.Nifti1Extension(40, bytes(range(1, 20))))
    case("extensions", values("float32", shape, rng), "float32", edit=extensions)

    manifest = {"cases": [describe(name, path) for name, path in CASES]}

    img = nib.load(str(MNI))
    data = img.get_fdata(dtype=np.float32)
    points = [[0, 0, 0], [98, 134, 72], [100, 120, 90], [196, 232, 188], [50, 60, 70], [150, 200, 30]]
    manifest["mni"] = {
        "shape": list(img.shape), "datatype": int(img.header["datatype"]), "affine": img.affine.ravel().tolist(),
        "sform_code": int(img.header["sform_code"]), "qform_code": int(img.header["qform_code"]),
        "sum": float(data.astype(np.float64).sum()), "max": float(data.max()),
        "points": [[*p, float(data[tuple(p)])] for p in points],
    }
    (OUT / "manifest.json").write_text(json.dumps(exact(manifest), indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(CASES)} cases to {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
