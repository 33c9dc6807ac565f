"""Runs a test scenario in a fresh interpreter, so that a deadlock or a trap fails the test instead of
hanging or killing the test run.

A deadlock between the engine and the GIL stops every Python thread of the process, the test's own
watchdog included, so a timeout can only be enforced from outside; a trap (SIGILL, SIGTRAP) or a
segfault kills the process it happens in. `run` reports each plainly: "did not finish within N s
(deadlock?)", "killed by SIGILL (a trap)".
"""
import os
import signal
import subprocess
import sys
import textwrap

# Imported by every scenario: the tests' shapes and the small network they use.
PRELUDE = """
import os, sys, time, threading, json, signal
import numpy as np
import deformux
from deformux import DeformUXNet, ops, _C
SMALL = dict(out_channels=3, feature_size=(8, 12, 16, 24), hidden_size=32)
"""


def run(code, timeout=60, env=None):
    """Runs PRELUDE + `code` (dedented) with this interpreter; returns its stdout when it exits with
    status 0, else fails the calling test with what happened and the process's output."""
    import pytest  # only where a test calls this

    source = PRELUDE + textwrap.dedent(code)
    full_env = dict(os.environ, PYTHONFAULTHANDLER="1", **(env or {}))
    try:
        r = subprocess.run([sys.executable, "-c", source], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"the scenario did not finish within {timeout} s (deadlock?)\n--- stdout\n{out[-3000:]}"
                    f"\n--- stderr\n{err[-3000:]}")
    if r.returncode != 0:
        if r.returncode < 0:
            name = signal.Signals(-r.returncode).name
            trap = " (a trap)" if name in ("SIGILL", "SIGTRAP") else ""
            what = f"was killed by {name}{trap}"
        else:
            what = f"exited with status {r.returncode}"
        pytest.fail(f"the scenario {what}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")
    return r.stdout


def last_json(stdout):
    """The JSON value printed on the last line of a scenario's output."""
    import json

    return json.loads(stdout.strip().splitlines()[-1])
