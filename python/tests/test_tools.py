"""The fixture generators in tools/ stay runnable: each script imports, and the generators rewrite the
committed fixtures (Tests/Fixtures/ddc, Tests/Fixtures/network) byte for byte. They need torch (the
engine and the other tests never do), so these tests skip without it.

The scripts run in subprocesses, as a user runs them: they put tools/ and python/deformux/ on sys.path
themselves, which must not leak into this process."""
import os
import subprocess
import sys

import pytest

from helpers import REPO

TOOLS = REPO / "tools"
SCRIPTS = sorted(p.name for p in TOOLS.glob("*.py"))


def _torch():
    return pytest.importorskip("torch", reason="the fixture generators in tools/ need torch (not importable here)")


def _run(args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_tools_folder_holds_the_generators():
    # Not skipped: a renamed generator must show up here even on a machine without torch.
    for name in ("make_ddc_fixtures.py", "make_network_fixtures.py", "reference_model.py", "ddc_torch_impl.py"):
        assert name in SCRIPTS, f"tools/{name} is gone; update this test and Tests/Fixtures/*/README.md"


def test_every_script_in_tools_imports():
    _torch()
    # One interpreter for all (torch takes seconds to import); each script in a fresh module.
    code = ("import importlib.util, sys, traceback\n"
            f"sys.path.insert(0, {str(TOOLS)!r})\n"
            "failed = []\n"
            f"for name in {SCRIPTS!r}:\n"
            f"    spec = importlib.util.spec_from_file_location('tool_' + name[:-3], {str(TOOLS)!r} + '/' + name)\n"
            "    try:\n"
            "        spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "    except BaseException:\n"
            "        failed.append(name)\n"
            "        traceback.print_exc()\n"
            "print('FAILED', failed)\n"
            "sys.exit(1 if failed else 0)\n")
    r = _run(["-c", code])
    assert r.returncode == 0, f"scripts in tools/ do not import:\n{r.stdout}"


def _regenerated_files_match(script, fixtures, tmp_path, optional=()):
    """Runs tools/`script` --out tmp_path and compares every file it wrote with Tests/Fixtures/`fixtures`."""
    r = _run([str(TOOLS / script), "--out", str(tmp_path)])
    assert r.returncode == 0, f"tools/{script} failed:\n{r.stdout}"
    committed = REPO / "Tests" / "Fixtures" / fixtures
    written = sorted(os.listdir(tmp_path))
    expected = sorted(p.name for p in committed.iterdir() if p.name != "README.md")
    missing = [n for n in expected if n not in written and n not in optional]
    assert not missing, f"tools/{script} no longer writes {missing}"
    extra = [n for n in written if n not in expected]
    assert not extra, f"tools/{script} writes {extra}, which are not committed in Tests/Fixtures/{fixtures}"
    differ = [n for n in written if (tmp_path / n).read_bytes() != (committed / n).read_bytes()]
    assert not differ, (f"tools/{script} writes other bytes than the committed Tests/Fixtures/{fixtures}: {differ} "
                        "(regenerate them, or find what changed the reference)")
    return written


def test_ddc_fixture_generator_reproduces_the_committed_files(tmp_path):
    _torch()
    _regenerated_files_match("make_ddc_fixtures.py", "ddc", tmp_path)


def test_network_fixture_generator_reproduces_the_committed_files(tmp_path):
    _torch()
    # interop_tiny.safetensors is written by the `safetensors` package, only where it is importable.
    written = _regenerated_files_match("make_network_fixtures.py", "network", tmp_path,
                                       optional=("interop_tiny.safetensors",))
    assert "manifest.json" in written and "ablation_standard.io.safetensors" in written


def test_train_step_fixture_generator_reproduces_the_committed_file(tmp_path):
    _torch()
    pytest.importorskip("monai", reason="tools/make_train_step_fixture.py needs monai")
    r = _run([str(TOOLS / "make_train_step_fixture.py"), "--out", str(tmp_path)], timeout=600)
    assert r.returncode == 0, f"tools/make_train_step_fixture.py failed:\n{r.stdout}"
    name = "train_step.safetensors"
    committed = REPO / "Tests" / "Fixtures" / "training" / name
    assert (tmp_path / name).read_bytes() == committed.read_bytes(), (
        f"tools/make_train_step_fixture.py writes other bytes than the committed Tests/Fixtures/training/{name}")


def test_synthetic_heads_of_the_bundled_recipe_read_only_training_slices():
    """tools/train_mni152.py heads() (stages 4 to 13 of the bundled model): the training slices stay where
    they are, and nothing of the slices in between (the validation slices and guard bands) reaches a head.
    Those slices hold a sentinel here; every head is checked for it. Blobs land in the middle of the fill
    only, labelled by the rule intensity_rule() learns outside it. No torch needed."""
    code = f"""
import sys
import numpy as np
sys.path.insert(0, {str(TOOLS)!r})
import train_mni152 as T
rng = np.random.default_rng(0)
X, Y, Z, f0, f1 = 40, 44, 70, 25, 45
labels = rng.integers(0, 4, (X, Y, Z)).astype(np.int32)
labels[10:30, 12:32, :] = rng.integers(2, 4, (20, 20, Z))          # a brain where the footprint is read
image = rng.random((1, X, Y, Z)).astype(np.float32)
image[..., f0:f1], labels[..., f0:f1] = -999.0, 7
for kwargs in ({{}}, dict(white=0.5, pools=(0.85, 0.15), scale=(1.4, 1.3)), dict(blobs=4)):
    heads = T.heads(image, labels, 3, seed=1, block=(8, 8, 8), fill=(f0, f1), **kwargs)
    assert len(heads) == 3
    for im, lb in heads:
        assert im.shape == image.shape and lb.shape == labels.shape
        assert not (im == -999.0).any() and not (lb == 7).any(), "a head holds voxels of the fill"
        for part in (slice(0, f0), slice(f1, Z)):
            assert np.array_equal(im[..., part], image[..., part]) and np.array_equal(lb[..., part], labels[..., part])
        assert not np.array_equal(heads[0][1], heads[1][1])
# blobs (stages 7 to 13): pasted into the middle of the fill only, labelled by the training slices' intensity rule
(plain, _), (blobbed, blabels) = (T.heads(image, labels, 1, seed=1, block=(8, 8, 8), fill=(f0, f1), blobs=b)[0] for b in (0, 6))
changed = np.nonzero((blobbed != plain)[0])
assert len(changed[0]) > 50 and changed[2].min() >= f0 and changed[2].max() < f1, "blobs outside the fill"
edges, by_bin = T.intensity_rule(image, labels, (f0, f1))
assert set(np.unique(by_bin)) <= {{1, 2, 3}}
assert np.array_equal(blabels[changed], T.apply_rule((edges, by_bin), blobbed[0][changed])), "blob voxels not labelled by the intensity rule"
assert np.array_equal(T.apply_rule((edges, by_bin), np.array([edges[0] - 1, edges[-1] + 1])), by_bin[[0, -1]])
print("ok")
"""
    out = _run(["-c", code], timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout


def test_ceiling_rules_of_the_bundled_recipe():
    """tools/train_mni152.py ceiling: gaussian_smooth() keeps constants and mass and spreads a point as a
    Gaussian of its sigma; local_rule() fitted on one part of a volume labels the rest by the majority label
    of each bin (here: a threshold it must find). No torch needed."""
    code = f"""
import sys
import numpy as np
sys.path.insert(0, {str(TOOLS)!r})
import train_mni152 as T
v = np.zeros((21, 23, 25), np.float32); v[10, 11, 12] = 1
g = T.gaussian_smooth(v, 1.5)
assert abs(g.sum() - 1) < 1e-5 and g.argmax() == v.argmax()
line = g[10, 11, :] / g[10, 11, 12]
assert np.allclose(line[12 + 2], np.exp(-0.5 * (2 / 1.5) ** 2), rtol=1e-3), line
assert np.allclose(T.gaussian_smooth(np.full((9, 9, 9), 3.0), 2.0), 3.0, atol=1e-5)
rng = np.random.default_rng(0)
x = (rng.integers(0, 10, (20, 20, 30)) / 10).astype(np.float32)  # ten levels, each an edge of the 40 bins
labels = np.where(x < 0.4, 2, 3).astype(np.int32); labels[:2] = 0
fit = np.zeros(x.shape, bool); fit[..., :15] = True
pred = T.local_rule([x], labels, fit, 40)
assert np.array_equal(pred[..., 15:], labels[..., 15:]), "the rule did not learn the threshold"
assert (pred[:2] == 0).all()
print("ok")
"""
    out = _run(["-c", code], timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout
