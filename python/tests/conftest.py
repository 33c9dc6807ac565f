"""Shared set-up. The tests import the *installed* deformux (pytest runs with --import-mode=importlib,
see pyproject.toml); this folder is put on sys.path only for the helper modules next to the tests.

DEFORMUX_HIDE_MODULES=torch,nibabel,... hides those packages from every test (hide_modules.py), so the
suite can be run as on a fresh machine where they are absent."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hide_modules  # noqa: E402

hide_modules.hide_from_environment()  # before any test module (or deformux) is imported

import deformux  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    """Every test leaves the engine's thread count as it found it."""
    n = deformux.get_num_threads()
    yield
    deformux.set_num_threads(n)
