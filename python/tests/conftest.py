"""Shared set-up. The tests import the *installed* deformux (pytest runs with --import-mode=importlib,
see pyproject.toml); this folder is put on sys.path only for the helper modules next to the tests.

DEFORMUX_HIDE_MODULES=torch,nibabel,... hides those packages from every test (hide_modules.py), so the
suite can be run as on a fresh machine where they are absent."""
import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hide_modules  # noqa: E402

hide_modules.hide_from_environment()  # before any test module (or deformux) is imported

import deformux  # noqa: E402

# The Ctrl-C tests send SIGINT to this process and to subprocesses. A shell that starts the suite in the
# background (`cmd &`, nohup) without job control hands it SIGINT ignored; Python then installs no handler,
# the signal is dropped and those tests fail for the launcher's sake. Take SIGINT back: here it raises
# KeyboardInterrupt as usual, and subprocesses (which inherit an ignored signal, not a handler) start with
# the default again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _restore_threads():
    """Every test leaves the engine's thread count as it found it."""
    n = deformux.get_num_threads()
    yield
    deformux.set_num_threads(n)
