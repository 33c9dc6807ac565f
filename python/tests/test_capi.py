"""Runs the C drift test (Tests/capi/test_capi.c): compiled with the system C compiler against the
repository's deformux.h and linked to the libDeformUXC.so of the installed package."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import deformux
from helpers import REPO

SOURCE = REPO / "Tests" / "capi" / "test_capi.c"
HEADER_DIR = REPO / "Sources" / "DeformUXC" / "include"


def compiler():
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


@pytest.mark.skipif(compiler() is None, reason="no C compiler")
def test_c_abi_matches_header(tmp_path):
    assert SOURCE.is_file() and (HEADER_DIR / "deformux.h").is_file(), "run the tests from the repository"
    libdir = Path(deformux.__file__).parent
    exe = tmp_path / "test_capi"
    cmd = [compiler(), "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", str(HEADER_DIR), str(SOURCE),
           "-L", str(libdir), "-lDeformUXC", f"-Wl,-rpath,{libdir}", "-lm", "-o", str(exe)]
    build = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert build.returncode == 0, f"{' '.join(cmd)}\n{build.stdout}"
    run = subprocess.run([str(exe)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert run.returncode == 0, run.stdout
    assert "all checks passed" in run.stdout


def test_packaged_header_is_the_repository_header():
    packaged = Path(deformux.__file__).parent / "include" / "deformux.h"
    if not packaged.is_file():
        pytest.skip("editable install: the header is not copied into the package")
    assert packaged.read_bytes() == (HEADER_DIR / "deformux.h").read_bytes()
