"""Convert a PyTorch DeformUX-Net / 3D UX-Net checkpoint to the engine's safetensors file.

    python3 -m deformux.convert model.pth out.safetensors [--offset-mode official|aligned]
                                [--prefix-map OLD=NEW ...] [--no-strict] [--unsafe-pickle]

* Finds the state dict: the loaded object itself, or its 'state_dict' / 'model' / 'net' /
  'model_state_dict' entry (or a pickled nn.Module's state_dict()).
* Normalises names like the engine's loader (ParameterStore.normalizedParameterName): a leading
  ``module.`` is dropped, the prototype names ``convxnet.`` -> ``deformuxnet_3d.`` and ``.dcn.`` -> ``.ddc.``;
  then any ``--prefix-map OLD=NEW`` (a key starting with OLD gets NEW instead).
* Infers the configuration from the shapes (in/out channels, feature sizes, depths, hidden size, block
  deformux/uxnet, UX-Net's kernel size, MLP dense/grouped/none, and the offset-kernel-3 /
  standard-deformable ablations; the single-plane ablations cannot be seen in the weights), checks every key and shape against ARCHITECTURE.md section 5 for that configuration, and
  writes float32 safetensors (atomically) with the configuration as JSON under the metadata key
  ``deformux.config``, using the engine's JSON keys (Sources/DeformUX/Model/ConfigJSON.swift:
  in_channels, out_channels, feature_size, depths, hidden_size, block, mlp, offset_mode, and
  kernel_size for uxnet only).
* The offset mode cannot be seen in the weights: checkpoints trained with the released code need
  ``official`` (the default here); pass ``--offset-mode aligned`` for models trained with aligned offsets.

torch is needed only to read the .pth (imported inside `load_checkpoint`); everything else is numpy.
Apart from `_atomic.py` (the atomic file write) this module imports nothing from the package, so it
also loads as a top-level module with python/deformux/ on sys.path (as the fixture generators in tools/
use it) and runs as a plain script.
"""
import argparse
import json
import os
import re
import struct
import sys

import numpy as np

if __package__:
    from ._atomic import atomic_write
else:  # a top-level module (tools/ put python/deformux/ on sys.path) or a plain script: _atomic is beside it
    from _atomic import atomic_write

CONFIG_KEY = "deformux.config"

_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "F16": np.dtype("<f2")}


# ----------------------------------------------------------------------------------------------------
# safetensors with numpy only

MAX_HEADER_BYTES = 100 << 20  # as the engine: a larger header is certainly not a weight file


def fspath(path):
    """`path` (str, bytes or os.PathLike) as a str, the way the engine and error messages want it."""
    return os.fsdecode(path)


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: array} as F32 safetensors: tensors sorted by name, packed back to back, header
    space-padded to a multiple of 8 bytes. Atomic: a temporary file in the same directory is renamed
    over `path` when complete. `path` may be str, bytes or os.PathLike."""
    path = fspath(path)
    header = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("write_safetensors: metadata must map str to str")
        header["__metadata__"] = dict(sorted(metadata.items()))
    arrays = []
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise ValueError("write_safetensors: '__metadata__' cannot name a tensor")
        a = np.array(tensors[name], dtype="<f4", order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for a in arrays:
            f.write(a.tobytes())


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs):
    """json object_pairs_hook: a key given twice in one object is an error (json keeps the last one
    silently, the engine's reader would see the first: a file must not mean two things)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _RepeatedKey(f"key {json.dumps(k)} is given twice in one object of the header")
        out[k] = v
    return out


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors(path):
    """Reads F32/F64/F16/BF16 safetensors into ({name: float32 array}, metadata), checking the header
    as the engine does (IO/Safetensors.swift): the 8-byte length is checked before the header is read,
    and the header before the data section is read; no key may be given twice; every entry needs a
    known dtype, a shape of non-negative ints and data_offsets [begin, end] matching it; and the
    tensors must tile the data section (no gap, overlap or trailing bytes). Raises ValueError naming the
    file (and the tensor), OSError if it cannot be read. `path` may be str, bytes or os.PathLike."""
    path = fspath(path)

    def bad(message):
        return ValueError(f"{path}: {message}")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{len(head)} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise bad(f"header length {n} is larger than the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)")
        if n > size - 8:
            raise bad(f"header length {n} runs past the end of the file ({size} bytes; truncated?)")
        raw_header = f.read(n)
        try:
            header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_unique_keys)
        except _RepeatedKey as e:
            raise bad(str(e)) from None
        except (UnicodeDecodeError, ValueError) as e:
            raise bad(f"header is not valid UTF-8 JSON: {e}") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise bad("__metadata__ must be an object mapping strings to strings")
        data_length = size - 8 - n
        entries = []
        for name, e in sorted(header.items()):
            t = f"tensor {name}"
            if not (isinstance(e, dict) and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list)
                    and isinstance(e.get("data_offsets"), list)):
                raise bad(f"{t}: entry must be an object with dtype, shape and data_offsets")
            shape, offsets, dtype = e["shape"], e["data_offsets"], e["dtype"]
            if not all(_is_int(d) and d >= 0 for d in shape):
                raise bad(f"{t}: shape must be non-negative integers, got {shape}")
            if len(offsets) != 2 or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
                raise bad(f"{t}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets}")
            begin, end = offsets
            if end > data_length:
                raise bad(f"{t}: data_offsets {offsets} run past the data section ({data_length} bytes; truncated?)")
            if dtype == "BF16":
                itemsize = 2
            elif dtype in _DTYPES:
                itemsize = _DTYPES[dtype].itemsize
            else:
                raise bad(f"{t}: unsupported dtype {dtype}")
            count = 1
            for d in shape:
                count *= d
            if end - begin != itemsize * count:
                raise bad(f"{t}: {end - begin} data bytes for shape {shape} of {dtype}, expected {count} x {itemsize}")
            entries.append((begin, end, name, dtype, shape))
        position = 0
        for begin, end, name, _, _ in sorted(entries):
            if begin < position:
                raise bad(f"tensor {name} (bytes {begin}..{end}) overlaps the tensor before it")
            if begin > position:
                raise bad(f"bytes {position}..{begin} of the data section belong to no tensor (a gap before tensor "
                          f"{name}); tensors must tile the data section")
            position = end
        if position != data_length:
            raise bad(f"the data section has {data_length - position} bytes after the last tensor; tensors must "
                      "tile the data section")
        body = f.read(data_length)  # only now, and only what the checked header describes
        if len(body) != data_length:
            raise bad(f"the file changed while reading ({8 + n + len(body)} of {size} bytes)")
    body = memoryview(body)
    out = {}
    for begin, end, name, dtype, shape in entries:
        raw = body[begin:end]
        if dtype == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(raw, dtype=_DTYPES[dtype]).astype(np.float32)
        out[name] = a.reshape(shape)
    return out, meta


# ----------------------------------------------------------------------------------------------------
# names and shapes (ARCHITECTURE.md section 5)

def normalize_name(name, prefix_map=()):
    """The engine's name for a checkpoint key (see the module docstring)."""
    while name.startswith("module."):
        name = name[len("module."):]
    if name.startswith("convxnet."):
        name = "deformuxnet_3d." + name[len("convxnet."):]
    name = name.replace(".dcn.", ".ddc.")
    for old, new in prefix_map:
        if name.startswith(old):
            name = new + name[len(old):]
    return name


def expected_shapes(config):
    """{state-dict key: shape} of the network described by `config` (section 5)."""
    cin, cout = config["in_channels"], config["out_channels"]
    f, depths, hidden = config["feature_size"], config["depths"], config["hidden_size"]
    deform = config["block"] == "deformux"
    e = "deformuxnet_3d." if deform else "uxnet_3d."
    s = {}
    s[e + "downsample_layers.0.0.weight"] = (f[0], cin, 7, 7, 7)
    s[e + "downsample_layers.0.0.bias"] = (f[0],)
    s[e + "downsample_layers.0.1.weight"] = (f[0],)
    s[e + "downsample_layers.0.1.bias"] = (f[0],)
    for i in range(1, 4):
        s[e + f"downsample_layers.{i}.0.weight"] = (f[i - 1],)
        s[e + f"downsample_layers.{i}.0.bias"] = (f[i - 1],)
        s[e + f"downsample_layers.{i}.1.weight"] = (f[i], f[i - 1], 2, 2, 2)
        s[e + f"downsample_layers.{i}.1.bias"] = (f[i],)
    for i in range(4):
        c = f[i]
        for j in range(depths[i]):
            b = e + f"stages.{i}.{j}."
            if deform:
                ok = config.get("offset_kernel", 1)
                s[b + "ddc.weight"] = (c, c if config.get("deformable") == "standard" else 1, 3, 3, 3)
                s[b + "ddc.bias"] = (c,)
                s[b + "ddc.conv_offset.weight"] = (81, c, ok, ok, ok)
                s[b + "ddc.conv_offset.bias"] = (81,)
            else:
                k = config["kernel_size"]
                s[b + "dwconv.weight"] = (c, 1, k, k, k)
                s[b + "dwconv.bias"] = (c,)
            s[b + "norm.weight"] = (c,)
            s[b + "norm.bias"] = (c,)
            if config["mlp"] != "none":  # the Table 3 ablation "no MLP" has no pwconv1/pwconv2
                grouped = config["mlp"] == "grouped"
                s[b + "pwconv1.weight"] = (4 * c, 1 if grouped else c, 1, 1, 1)
                s[b + "pwconv1.bias"] = (4 * c,)
                s[b + "pwconv2.weight"] = (c, 4 if grouped else 4 * c, 1, 1, 1)
                s[b + "pwconv2.bias"] = (c,)
            s[b + "gamma"] = (c,)
        s[e + f"norm{i}.weight"] = (c,)
        s[e + f"norm{i}.bias"] = (c,)

    def res(prefix, a, b):
        s[prefix + "conv1.conv.weight"] = (b, a, 3, 3, 3)
        s[prefix + "conv2.conv.weight"] = (b, b, 3, 3, 3)
        if a != b:
            s[prefix + "conv3.conv.weight"] = (b, a, 1, 1, 1)

    widths = [cin] + list(f) + [hidden]
    for k in range(1, 6):
        res(f"encoder{k}.layer.", widths[k - 1], widths[k])
    for k in range(5, 1, -1):
        a, b = widths[k], widths[k - 1]
        s[f"decoder{k}.transp_conv.conv.weight"] = (a, b, 2, 2, 2)
        res(f"decoder{k}.conv_block.", 2 * b, b)
    res("decoder1.layer.", f[0], f[0])
    s["out.conv.conv.weight"] = (cout, f[0], 1, 1, 1)
    s["out.conv.conv.bias"] = (cout,)
    return s


def infer_config(shapes, offset_mode="official"):
    """The configuration of a state dict {normalised key: shape}. Raises ValueError naming what is
    missing when a shape needed for the inference is absent."""
    def need(key):
        if key not in shapes:
            raise ValueError(f"cannot infer the configuration: no tensor {key}")
        return tuple(shapes[key])

    if any(k.startswith("deformuxnet_3d.") for k in shapes):
        e, block = "deformuxnet_3d.", "deformux"
    elif any(k.startswith("uxnet_3d.") for k in shapes):
        e, block = "uxnet_3d.", "uxnet"
    else:
        raise ValueError("cannot infer the configuration: no key starts with deformuxnet_3d., uxnet_3d. "
                         "or convxnet. (use --prefix-map to rename the encoder)")
    stem = need(e + "downsample_layers.0.0.weight")
    feature_size = [stem[0]] + [need(e + f"downsample_layers.{i}.1.weight")[0] for i in range(1, 4)]
    depths = []
    pattern = re.compile(re.escape(e) + r"stages\.(\d+)\.(\d+)\.")
    blocks = {}
    for k in shapes:
        m = pattern.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    for i in range(4):
        js = blocks.get(i, set())
        depths.append(max(js) + 1 if js else 0)
    first = next(i for i in range(4) if depths[i] > 0) if any(depths) else None
    if first is None:
        raise ValueError("cannot infer the configuration: the encoder has no blocks")
    b0 = e + f"stages.{first}.0."
    mlp = "dense"
    if b0 + "pwconv1.weight" not in shapes and b0 + "pwconv2.weight" not in shapes:
        mlp = "none"
    elif need(b0 + "pwconv1.weight")[1] == 1 and feature_size[first] > 1:
        mlp = "grouped"
    config = {
        "in_channels": stem[1],
        "out_channels": need("out.conv.conv.weight")[0],
        "feature_size": feature_size,
        "depths": depths,
        "hidden_size": need("encoder5.layer.conv1.conv.weight")[0],
        "block": block,
        "mlp": mlp,
        "offset_mode": offset_mode,
    }
    if block == "uxnet":
        config["kernel_size"] = need(b0 + "dwconv.weight")[-1]
    else:
        # Table 3 ablations visible in the shapes; written only when not the default.
        k = need(b0 + "ddc.conv_offset.weight")[-1]
        if k != 1:
            config["offset_kernel"] = k
        if need(b0 + "ddc.weight")[1] != 1 and feature_size[first] > 1:
            config["deformable"] = "standard"
        if k != 1 or config.get("deformable") == "standard":
            config["offset_mode"] = "aligned"  # official exists only for the released 1x1x1 depthwise form
    return config


def compare(shapes, expected):
    """(missing, unexpected, [(key, expected, got)]) between two {key: shape} maps, sorted."""
    missing = sorted(k for k in expected if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in expected)
    wrong = sorted((k, tuple(expected[k]), tuple(shapes[k])) for k in shapes
                   if k in expected and tuple(shapes[k]) != tuple(expected[k]))
    return missing, unexpected, wrong


# ----------------------------------------------------------------------------------------------------
# PyTorch checkpoints

def load_checkpoint(path, unsafe_pickle=False):
    """{key: float32 numpy array} from a .pth (str, bytes or os.PathLike path). Needs torch."""
    path = fspath(path)
    try:
        import torch
    except ImportError as e:
        raise SystemExit("deformux.convert: reading a PyTorch checkpoint needs torch "
                         "(pip install torch); the engine itself does not") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except Exception as e:
        hint = "" if unsafe_pickle else (" (it holds objects other than tensors and plain containers; "
                                         "--unsafe-pickle loads it with full pickle if you trust the file)")
        raise SystemExit(f"deformux.convert: cannot load {path}: {e}{hint}") from e
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "net", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise SystemExit(f"deformux.convert: {path} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v.detach().to(torch.float32).contiguous().numpy()
    if not out:
        raise SystemExit(f"deformux.convert: no floating-point tensors found in {path}")
    return out


def convert(src, dst, offset_mode="official", prefix_map=(), strict=True, unsafe_pickle=False, log=print):
    """Converts checkpoint `src` to safetensors `dst` (paths: str, bytes or os.PathLike); returns the
    inferred configuration."""
    src, dst = fspath(src), fspath(dst)
    raw = load_checkpoint(src, unsafe_pickle=unsafe_pickle)
    tensors = {}
    for k, v in raw.items():
        name = normalize_name(k, prefix_map)
        if name in tensors:
            raise SystemExit(f"deformux.convert: two keys map to {name} (one of them is {k})")
        tensors[name] = v
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    try:
        config = infer_config(shapes, offset_mode)
    except ValueError as e:
        raise SystemExit(f"deformux.convert: {src}: {e}") from e
    missing, unexpected, wrong = compare(shapes, expected_shapes(config))
    problems = []
    if missing:
        problems.append(f"missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    if wrong:
        problems.append(f"wrong shape ({len(wrong)}): "
                        + ", ".join(f"{k} expected {list(a)} got {list(b)}" for k, a, b in wrong))
    if problems:
        text = f"{src} does not match the inferred configuration:\n  " + "\n  ".join(problems)
        if strict:
            raise SystemExit("deformux.convert: " + text + "\n(--no-strict writes it anyway)")
        log("warning: " + text)
    metadata = {CONFIG_KEY: json.dumps(config, sort_keys=True), "format": "pt",
                "deformux.source": os.path.basename(src)}
    write_safetensors(dst, tensors, metadata)
    return config


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m deformux.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="PyTorch checkpoint (.pth / .pt)")
    ap.add_argument("output", help="safetensors file to write")
    ap.add_argument("--offset-mode", choices=["official", "aligned"], default="official",
                    help="recorded in the metadata; cannot be inferred from the weights (default: official, "
                         "as every checkpoint of the released code needs)")
    ap.add_argument("--prefix-map", action="append", default=[], metavar="OLD=NEW",
                    help="rename keys starting with OLD (after the built-in normalisation); repeatable")
    ap.add_argument("--no-strict", action="store_true", help="write even if keys or shapes do not match")
    ap.add_argument("--unsafe-pickle", action="store_true",
                    help="load with full pickle (torch.load weights_only=False): only for trusted files")
    args = ap.parse_args(argv)
    prefix_map = []
    for item in args.prefix_map:
        if "=" not in item:
            ap.error(f"--prefix-map wants OLD=NEW, got {item!r}")
        prefix_map.append(tuple(item.split("=", 1)))
    config = convert(args.checkpoint, args.output, offset_mode=args.offset_mode, prefix_map=prefix_map,
                     strict=not args.no_strict, unsafe_pickle=args.unsafe_pickle)
    print(f"wrote {args.output}")
    print(json.dumps(config, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
