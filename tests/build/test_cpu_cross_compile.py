"""The CPU kernels compile for targets this machine is not: aarch64 (NEON) and clang on x86-64; their sweeps run on
aarch64 under qemu.

The hot loops are written once with vector extensions and built per x86-64 level by GCC (RLHFV_LEVELS); elsewhere one
generic body is built. A construct only GCC on x86 accepts (an asm register constraint a two-register NEON vector
cannot meet, a target attribute) would first fail on a user's ARM server, and a lane-width assumption would give it
wrong numbers: so every source is compiled for aarch64 and with clang, and the sweeps (tests/build/sweeps_check.cpp,
no torch) are built for aarch64 and run under qemu against float64. The cross compiler is zig's clang (the `ziglang`
wheel), with the installed torch's headers, at the build's own flags.
"""
import glob
import json
import os
import shutil
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
FLAGS = [f for f in BUILD["cxx_flags"] if f != "-Wno-psabi"]  # the build's own, less a GCC-only warning name


@needs_zig
@pytest.mark.parametrize("target", ["aarch64-linux-gnu", "x86_64-linux-gnu"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: os.path.relpath(p, ROOT))
def test_cpu_source_compiles_for(source, target, tmp_path):
    # This Python's own headers (ops.cpp includes Python.h): pyconfig.h's sizes are those of any LP64 Linux.
    includes = [f"-I{p}" for p in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]]
    command = [sys.executable, "-m", "ziglang", "c++", "-target", target, "-std=c++17", *FLAGS, "-w", "-c", source,
               "-o", str(tmp_path / "k.o"), *includes]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
SWEEPS_CHECK = os.path.join(ROOT, "tests", "build", "sweeps_check.cpp")


def _sweeps_check_command(compiler: list, output) -> list:
    """sweeps_check.cpp (csrc/cpu/sweeps.h, the chunk sweeps without torch) at the build's own flags; c10's
    header-only bf16/half types come from the installed torch's headers. -UNDEBUG: zig's clang defines NDEBUG at -O3,
    and c10's declaration of glibc's __assert_fail under NDEBUG clashes with musl's."""
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    return [*compiler, "-std=c++17", *FLAGS, "-UNDEBUG", "-w", SWEEPS_CHECK, "-o", str(output), *includes]


def _passes(run) -> None:
    assert run.returncode == 0 and " 0 failed" in run.stdout, run.stdout[-6000:] + run.stderr[-2000:]


@needs_zig
@pytest.mark.skipif(QEMU is None, reason="no qemu-aarch64 here (Debian: apt-get install qemu-user-static; .ci/run does)")
def test_cpu_sweeps_run_correctly_on_aarch64(tmp_path):
    """The sweeps' NEON build (the generic 8-wide body), static for aarch64 with musl, run under qemu against float64:
    log-sum-exp, softmax (full and coarse exp), the soft cap and its gradients, the entropy sums and gradients, bf16
    and half conversions (round to nearest even at exact ties), on odd lengths and two temperatures."""
    binary = tmp_path / "sweeps_check"
    compiler = [sys.executable, "-m", "ziglang", "c++", "-target", "aarch64-linux-musl", "-static"]
    built = subprocess.run(_sweeps_check_command(compiler, binary), capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-4000:]
    run = subprocess.run([QEMU, str(binary)], capture_output=True, text=True, timeout=300)
    _passes(run)
    assert "aarch64 (NEON): 0 failed" in run.stdout


@pytest.fixture(scope="module")
def native_sweeps_check(tmp_path_factory):
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    binary = tmp_path_factory.mktemp("native") / "sweeps_check"
    built = subprocess.run(_sweeps_check_command(["c++"], binary), capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    return binary


@pytest.mark.parametrize("level", ["", "v4", "v3", "baseline"])
def test_cpu_sweeps_check_passes_natively(level, native_sweeps_check):
    """The same check built for this machine and run at each x86-64 level it has (RLHFV_CPU_LEVEL): the check's own
    tolerances hold where the kernel suites already prove the sweeps right."""
    _passes(subprocess.run([str(native_sweeps_check)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "RLHFV_CPU_LEVEL": level}))
