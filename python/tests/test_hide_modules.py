"""The DEFORMUX_HIDE_MODULES hook (hide_modules.py) that lets scripts/test run the suite as on a machine
without torch, nibabel, safetensors and monai."""
import importlib
import os
import sys

import pytest

import hide_modules


def test_hidden_package_and_its_submodules_cannot_be_imported(tmp_path, monkeypatch):
    pkg = tmp_path / "dfx_hidden_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("VALUE = 1\n")
    (pkg / "sub.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    finder = hide_modules.hide(["dfx_hidden_probe"])
    try:
        for name in ("dfx_hidden_probe", "dfx_hidden_probe.sub"):
            with pytest.raises(ModuleNotFoundError, match="hidden by DEFORMUX_HIDE_MODULES"):
                importlib.import_module(name)
        with pytest.raises(pytest.skip.Exception, match="hidden by DEFORMUX_HIDE_MODULES"):
            pytest.importorskip("dfx_hidden_probe")
        assert "dfx_hidden_probe" in hide_modules.hidden()
    finally:
        hide_modules.unhide(finder)
    assert importlib.import_module("dfx_hidden_probe.sub").VALUE == 2  # other names are untouched
    for name in ("dfx_hidden_probe.sub", "dfx_hidden_probe"):
        sys.modules.pop(name, None)
    with pytest.raises(RuntimeError, match="already imported: json"):
        hide_modules.hide(["json"])


def test_parse():
    assert hide_modules.parse(" torch, nibabel ,,safetensors") == ["torch", "nibabel", "safetensors"]
    assert hide_modules.parse("") == [] and hide_modules.parse(None) == []


def test_this_run_hides_what_the_environment_lists():
    """When scripts/test runs the suite with DEFORMUX_HIDE_MODULES, each listed package really is
    unimportable in this process (otherwise that run would prove nothing)."""
    wanted = hide_modules.parse(os.environ.get(hide_modules.ENV))
    assert hide_modules.hidden() == sorted(set(wanted))
    for name in wanted:
        with pytest.raises(ImportError):
            importlib.import_module(name)
