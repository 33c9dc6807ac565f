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


CASE_RUNNER = """
import json as _json
for _label, _code in _json.loads(sys.argv[1]):
    print("START " + _json.dumps(_label), flush=True)
    try:
        _value = eval(compile(_code, _label, "eval"))
        _result = ["returned", repr(_value)[:200]]
    except Exception as _e:
        _result = [type(_e).__name__, str(_e)]
    print("RESULT " + _json.dumps([_label, _result]), flush=True)
"""


def run_cases(setup, cases, timeout=60):
    """Evaluates each (label, expression) of `cases` after `setup` in a fresh interpreter, in order:
    {label: [exception class name or "returned", message or repr]}. A case that kills its interpreter
    (a trap) gives ["crashed", "killed by SIGILL ..."], one that hangs ["hung", ...]; the cases after it
    run in a new interpreter."""
    import json

    source = PRELUDE + textwrap.dedent(setup) + CASE_RUNNER
    results, todo = {}, list(cases)
    while todo:
        try:
            r = subprocess.run([sys.executable, "-c", source, json.dumps(todo)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, timeout=timeout)
            out, err, code = r.stdout, r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, code = "", None
        started = None
        for line in out.splitlines():
            if line.startswith("START "):
                started = json.loads(line[6:])
            elif line.startswith("RESULT "):
                label, result = json.loads(line[7:])
                results[label] = result
        todo = [c for c in todo if c[0] not in results]
        if not todo:
            break
        if started is None or started in results:
            raise AssertionError(f"the case runner failed before its first case (status {code}):\n{err[-3000:]}")
        if code is None:
            results[started] = ["hung", f"no result within {timeout} s"]
        else:
            what = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            results[started] = ["crashed", f"{what}: {err[-500:]}"]
        todo = [c for c in todo if c[0] != started]
    return results
