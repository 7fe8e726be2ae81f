"""The compiled CPU kernels are built once per x86-64 level (16-float vectors under AVX-512, with AVX512-BF16's
rounding instruction for the bf16 stores where the CPU has it, 8 under AVX2, 4 on the baseline:
csrc/cpu/simd.h, RLHFV_LEVELS) and this CPU runs the widest it has. RLHFV_CPU_LEVEL picks a lower one, so
the kernel suite checks every level's code against the float64 reference here, in a fresh process each (the level is
read once)."""
import os
import subprocess
import sys

import pytest
from conftest import run_at_once

import rlhfv_kernels as rk

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEVELS = {"v3": "x86-64-v3 (AVX2, FMA)", "baseline": "x86-64 baseline (SSE2)"}
if (rk.cpu_kernel_variant() or "").endswith("+ AVX512-BF16"):  # then v4 without it (its bf16 stores) is a level too
    LEVELS["v4"] = "x86-64-v4 (AVX-512)"

pytestmark = pytest.mark.skipif(not (rk.extension_available() and rk.cpu_kernel_variant().startswith("x86-64")),
                                reason="the per-level kernels are x86-64's (and need the compiled extension)")


# (not test_losses.py: the losses run the same logprob ops, whose every variant the files below check per level)
SUITE = ["tests/kernels/test_token_logprobs.py", "tests/kernels/test_edges.py", "tests/kernels/test_entropy.py",
         "tests/kernels/test_linear.py", "tests/kernels/test_logit_transform.py", "-k", "cpp-cpu"]


@pytest.fixture(scope="module")
def suites():
    """{level: (the variant it names, the kernel suite's exit status, output)}; every level's suite at once, one
    process each (a level is read once per process)."""
    envs = {level: {**os.environ, "RLHFV_CPU_LEVEL": level} for level in LEVELS}
    variant = [sys.executable, "-c", "import rlhfv_kernels as rk; print(rk.cpu_kernel_variant())"]
    named = run_at_once({level: (variant, env) for level, env in envs.items()}, timeout=120, cwd=ROOT)
    suites = run_at_once({level: ([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *SUITE], env)
                          for level, env in envs.items()}, timeout=900, cwd=ROOT)
    return {level: (named[level][1].strip(), *suites[level]) for level in LEVELS}


@pytest.mark.slow
@pytest.mark.parametrize("level", list(LEVELS))
def test_every_level_meets_the_criterion(suites, level):
    named, status, output = suites[level]
    assert named == LEVELS[level]
    assert status == 0, output[-5000:]
    assert " passed" in output.splitlines()[-1]


def test_an_unknown_level_is_refused_not_ignored():
    env = {**os.environ, "RLHFV_CPU_LEVEL": "avx2"}
    out = subprocess.run([sys.executable, "-c", "import rlhfv_kernels"], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert out.returncode != 0 and "RLHFV_CPU_LEVEL must be one of v4, v3, baseline (or unset), got 'avx2'" in out.stderr
