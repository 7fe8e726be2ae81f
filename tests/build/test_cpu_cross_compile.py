"""The CPU kernels compile for targets this machine is not: aarch64 (NEON) and clang on x86-64.

The hot loops are written once with vector extensions and built per x86-64 level by GCC (RLHFV_LEVELS); elsewhere one
generic body is built. Nothing here runs that body, so a construct only GCC on x86 accepts (an asm register constraint
a two-register NEON vector cannot meet, a target attribute) would first fail on a user's ARM server. The cross
compiler is zig's clang (the `ziglang` wheel), with the installed torch's headers, at the build's own flags.
"""
import glob
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "csrc", "build.json")) as f:
    BUILD = json.load(f)
SOURCES = sorted(p for pattern in BUILD["cpu_sources"] for p in glob.glob(os.path.join(ROOT, pattern)))

try:
    import ziglang  # noqa: F401  (the zig binary ships inside the package)
    HAVE_ZIG = True
except ImportError:
    HAVE_ZIG = False
needs_zig = pytest.mark.skipif(not HAVE_ZIG, reason="ziglang not installed (requirements.txt)")


@needs_zig
@pytest.mark.parametrize("target", ["aarch64-linux-gnu", "x86_64-linux-gnu"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: os.path.relpath(p, ROOT))
def test_cpu_source_compiles_for(source, target, tmp_path):
    # This Python's own headers (ops.cpp includes Python.h): pyconfig.h's sizes are those of any LP64 Linux.
    includes = [f"-I{p}" for p in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]]
    flags = [f for f in BUILD["cxx_flags"] if f != "-Wno-psabi"]  # a GCC-only warning name
    command = [sys.executable, "-m", "ziglang", "c++", "-target", target, "-std=c++17", *flags, "-w", "-c", source,
               "-o", str(tmp_path / "k.o"), *includes]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
