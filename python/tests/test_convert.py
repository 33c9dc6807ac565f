"""deformux.convert: checkpoint -> safetensors, names normalised, configuration inferred from shapes.

Tests the installed package, like every test here. Tests needing torch skip without it."""
import json
import os
import sys

import numpy as np
import pytest

from helpers import REPO

from deformux import convert


def _round_trip_tensors():
    rng = np.random.default_rng(0)
    return {"b": rng.standard_normal((2, 3, 1)).astype(np.float32), "a": np.float32(2.5) * np.ones(()),
            "empty": np.zeros((0, 4), np.float32)}


def test_numpy_safetensors_round_trip_is_exact_and_atomic(tmp_path):
    tensors = _round_trip_tensors()
    path = tmp_path / "x.safetensors"
    convert.write_safetensors(str(path), tensors, {"k": "v \"quoted\""})
    back, meta = convert.read_safetensors(str(path))
    assert meta == {"k": "v \"quoted\""}
    assert sorted(back) == sorted(tensors)
    for k in tensors:
        assert back[k].dtype == np.float32 and back[k].shape == np.shape(tensors[k])
        np.testing.assert_array_equal(back[k], tensors[k])
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_numpy_safetensors_file_reads_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="needs the safetensors package to cross-check the file "
                                                         "(not importable here)")
    tensors = _round_trip_tensors()
    path = tmp_path / "x.safetensors"
    convert.write_safetensors(str(path), tensors, {"k": "v"})
    official = st.load_file(str(path))
    for k in tensors:
        np.testing.assert_array_equal(official[k], tensors[k])


def test_normalize_name():
    assert convert.normalize_name("module.convxnet.stages.0.1.dcn.weight") == "deformuxnet_3d.stages.0.1.ddc.weight"
    assert convert.normalize_name("module.out.conv.conv.bias") == "out.conv.conv.bias"
    assert convert.normalize_name("enc.x", [("enc.", "uxnet_3d.")]) == "uxnet_3d.x"


def test_infer_config_round_trips_through_expected_shapes():
    for extra in [{}, {"offset_kernel": 3, "offset_mode": "aligned"}, {"deformable": "standard", "offset_mode": "aligned"},
                  {"mlp": "none"}, {"mlp": "none", "block": "uxnet", "kernel_size": 3},
                  {"block": "uxnet", "mlp": "grouped", "kernel_size": 5, "offset_mode": "official"}]:
        cfg = {"in_channels": 3, "out_channels": 2, "feature_size": [4, 6, 10, 12], "depths": [0, 1, 3, 2],
               "hidden_size": 16, "block": "deformux", "mlp": "dense", "offset_mode": "official", **extra}
        assert convert.infer_config(convert.expected_shapes(cfg), cfg["offset_mode"]) == cfg, extra


def _torch():
    """torch, or a skip saying why (the converter reads .pth checkpoints with it; the engine never needs it)."""
    return pytest.importorskip("torch", reason="needs torch to write and read .pth checkpoints (not importable here)")


def _reference():
    """tools/reference_model.py, the PyTorch transcription of the network (needs torch)."""
    _torch()
    sys.path.insert(0, str(REPO / "tools"))
    import reference_model
    return reference_model


@pytest.mark.parametrize("block,mlp,kernel,depths,wrap,released", [
    ("deformux", "dense", 3, [2, 2, 2, 2], None, False),
    ("deformux", "grouped", 3, [1, 2, 3, 1], "state_dict", True),
    ("uxnet", "grouped", 5, [2, 1, 1, 2], "model", False),
])
def test_convert_reference_checkpoint(tmp_path, block, mlp, kernel, depths, wrap, released):
    torch = _torch()
    rm = _reference()
    torch.manual_seed(0)
    m = rm.DeformUXNet(2, 5, [8, 12, 16, 24], depths=depths, hidden_size=20, block=block, mlp=mlp,
                       kernel_size=kernel)
    sd = m.state_dict()
    want = {k: v.numpy() for k, v in sd.items()}
    if released:
        sd = {"module." + k.replace("deformuxnet_3d.", "convxnet.").replace(".ddc.", ".dcn."): v for k, v in sd.items()}
    obj = {wrap: sd, "epoch": 7} if wrap else sd
    src, dst = tmp_path / "m.pth", tmp_path / "m.safetensors"
    torch.save(obj, src)
    config = convert.convert(str(src), str(dst), offset_mode="official", log=lambda *a: None)
    want_config = {"in_channels": 2, "out_channels": 5, "feature_size": [8, 12, 16, 24], "depths": depths,
                   "hidden_size": 20, "block": block, "mlp": mlp, "offset_mode": "official"}
    if block == "uxnet":
        want_config["kernel_size"] = kernel
    assert config == want_config
    assert set(convert.expected_shapes(config)) == set(want)
    back, meta = convert.read_safetensors(str(dst))
    assert json.loads(meta[convert.CONFIG_KEY]) == config
    assert sorted(back) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)


def test_counts_match_architecture_section6():
    rm = _reference()
    for (block, mlp, cout), n in rm.SECTION6.items():
        cfg = {"in_channels": 1, "out_channels": cout, "feature_size": [48, 96, 192, 384], "depths": [2, 2, 2, 2],
               "hidden_size": 768, "block": block, "mlp": mlp, "kernel_size": 7}
        total = sum(int(np.prod(s)) for s in convert.expected_shapes(cfg).values())
        assert total == n, (block, mlp, cout)


def test_convert_strict_lists_missing_and_unexpected(tmp_path):
    torch = _torch()
    rm = _reference()
    m = rm.DeformUXNet(1, 3, [8, 12, 16, 24], hidden_size=16)
    sd = dict(m.state_dict())
    del sd["decoder1.layer.conv2.conv.weight"]
    sd["decoder1.layer.conv3.conv.weight"] = torch.zeros(8, 8, 1, 1, 1)
    sd["encoder1.layer.conv1.conv.weight"] = torch.zeros(8, 1, 1, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(SystemExit) as e:
        convert.convert(str(tmp_path / "bad.pth"), str(tmp_path / "bad.safetensors"))
    text = str(e.value)
    assert "missing (1): decoder1.layer.conv2.conv.weight" in text
    assert "unexpected (1): decoder1.layer.conv3.conv.weight" in text
    assert "encoder1.layer.conv1.conv.weight expected [8, 1, 3, 3, 3] got [8, 1, 1, 1, 1]" in text
    assert not (tmp_path / "bad.safetensors").exists()
    convert.convert(str(tmp_path / "bad.pth"), str(tmp_path / "bad.safetensors"), strict=False,
                    log=lambda *a: None)
    assert (tmp_path / "bad.safetensors").exists()
