"""Both safetensors readers, the engine's (DeformUXNet.load, IO/Safetensors.swift) and the converter's
(deformux.convert.read_safetensors), reject the same damaged files: a key given twice, tensors that do
not tile the data section; and both read the header before the data, so a wrong huge file fails fast."""
import json
import struct
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import deformux
from deformux import DeformUXNet, convert

TINY = dict(out_channels=2, feature_size=(4, 4, 4, 4), depths=(1, 1, 1, 1), hidden_size=4)
A = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
B = '"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}'


def file_bytes(header, data):
    h = header.encode()
    return struct.pack("<Q", len(h)) + h + data


def both_reject(path, word):
    """Both readers refuse the file at `path` with an error naming it and containing `word`."""
    with pytest.raises(ValueError) as e:
        convert.read_safetensors(path)
    assert word in str(e.value) and str(path) in str(e.value), str(e.value)
    with pytest.raises(deformux.FileFormatError) as e:
        DeformUXNet(**TINY).load(path)
    # (args[0]: str() of an OSError with .filename set shows only errno, strerror and filename)
    message = e.value.args[0]
    assert word in message and str(path) in message and e.value.filename == str(path), message


def test_a_good_file_reads_with_both_readers(tmp_path):
    path = tmp_path / "good.safetensors"
    path.write_bytes(file_bytes("{" + A + "," + B + "}", np.arange(6, dtype="<f4").tobytes()))
    tensors, meta = convert.read_safetensors(path)
    assert meta == {} and tensors["a"].tolist() == [0, 1] and tensors["b"].tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="missing"):  # a file the engine reads, just not this model's
        DeformUXNet(**TINY).load(path)


@pytest.mark.parametrize("label, header, word", [
    ("tensor twice", "{" + A + "," + B + "," + A + "}", '"a" is given twice'),
    ("tensor twice, other offsets", "{" + A + "," + B + ',"a":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}',
     '"a" is given twice'),
    ("escaped spelling", "{" + A + "," + B + r',"\u0061":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
     '"a" is given twice'),
    ("metadata twice", '{"__metadata__":{"k":"1"},' + A + "," + B + ',"__metadata__":{"k":"2"}}',
     '"__metadata__" is given twice'),
    ("metadata key twice", '{"__metadata__":{"deformux.config":"{}","deformux.config":"{}"},' + A + "," + B + "}",
     '"deformux.config" is given twice'),
    ("dtype twice", '{"a":{"dtype":"F16","dtype":"F32","shape":[2],"data_offsets":[0,8]},' + B + "}",
     '"dtype" is given twice'),
])
def test_repeated_keys_are_rejected(tmp_path, label, header, word):
    path = tmp_path / "repeated.safetensors"
    path.write_bytes(file_bytes(header, np.zeros(6, "<f4").tobytes()))
    both_reject(path, word)


def entry(name, begin, end):
    return f'"{name}":{{"dtype":"F32","shape":[{(end - begin) // 4}],"data_offsets":[{begin},{end}]}}'


@pytest.mark.parametrize("label, header, data_bytes, word", [
    ("gap between", "{" + entry("a", 0, 8) + "," + entry("b", 12, 20) + "}", 20, "gap before tensor b"),
    ("gap at the start", "{" + entry("a", 4, 12) + "}", 12, "gap before tensor a"),
    ("trailing bytes", "{" + entry("a", 0, 8) + "}", 12, "4 bytes after the last tensor"),
    ("empty tensor in a gap", "{" + entry("a", 0, 8) + "," + entry("e", 12, 12) + "," + entry("b", 12, 16) + "}", 16,
     "gap before tensor"),
    ("overlap", "{" + entry("a", 0, 12) + "," + entry("b", 8, 16) + "}", 16, "overlap"),
])
def test_tensors_must_tile_the_data_section(tmp_path, label, header, data_bytes, word):
    path = tmp_path / "gap.safetensors"
    path.write_bytes(file_bytes(header, bytes(data_bytes)))
    both_reject(path, word)


def test_from_file_rejects_a_configuration_given_twice(tmp_path):
    """json keeps the last of two equal keys: from_file must not build one model and load another's
    weights. The engine refuses the file."""
    m = DeformUXNet(**TINY)
    path = tmp_path / "m.safetensors"
    m.save(path)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = raw[8:8 + n].decode().rstrip(), raw[8 + n:]
    other = json.dumps(json.dumps(dict(m.config, mlp="grouped")))
    twice = header.replace('"__metadata__":{', '"__metadata__":{"deformux.config":' + other + ",", 1)
    path.write_bytes(file_bytes(twice, data))
    with pytest.raises(deformux.FileFormatError) as e:
        DeformUXNet.from_file(path)
    assert "given twice" in e.value.args[0]
    with pytest.raises(ValueError, match="given twice"):
        convert.read_safetensors(path)


def _huge_wrong_file(tmp_path, size=3 << 30):
    """A valid-looking header and one small tensor, then (sparse) gigabytes nobody described."""
    path = tmp_path / "huge.safetensors"
    path.write_bytes(file_bytes("{" + entry("w", 0, 8) + "}", bytes(8)))
    with open(path, "r+b") as f:
        f.truncate(size)
    return path


def test_converter_reader_checks_the_header_before_reading_the_data(tmp_path):
    path = _huge_wrong_file(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="after the last tensor"):
            convert.read_safetensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"reading a wrong 3 GB file allocated {peak >> 20} MB"


def test_engine_reader_checks_the_header_before_reading_the_data(tmp_path):
    """In a fresh interpreter (its peak resident memory is this call's): loading a wrong 3 GB file
    fails without raising the peak by more than 64 MB (the old reader read the whole file first)."""
    path = _huge_wrong_file(tmp_path)
    code = textwrap.dedent(f"""
        import resource, deformux
        m = deformux.DeformUXNet(out_channels=2, feature_size=(4, 4, 4, 4), depths=(1, 1, 1, 1), hidden_size=4)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            m.load({str(path)!r})
        except deformux.FileFormatError as e:
            print("rejected:", e.args[0])
        print("grew_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    r = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout
    assert "rejected:" in r.stdout and "after the last tensor" in r.stdout, r.stdout
    grew = int(r.stdout.split("grew_kb")[1])
    assert grew < 64 << 10, f"loading a wrong 3 GB file raised the peak resident memory by {grew >> 10} MB"
