"""The CUDA sources compile (nvcc, no GPU needed): a syntax or template error fails here, not on a GPU machine."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

import rlhfv_kernels as rk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME")
                                else None)
needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not installed")


def cuda_include():
    """The CUDA toolkit's include folder (nvcc may be a wrapper script elsewhere on PATH)."""
    homes = [os.environ.get("CUDA_HOME"), os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    for home in filter(None, homes):
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    pytest.skip("CUDA headers not found (set CUDA_HOME)")


@needs_nvcc
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))),
                         ids=os.path.basename)
def test_cu_files_compile_for_sm90a(source, tmp_path):
    out = subprocess.run([NVCC, "-c", "-std=c++17", "-O3", "-arch=sm_90a", source, "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))),
                         ids=os.path.basename)
def test_cuda_glue_compiles_against_torch_headers(source):
    """The torch glue of the CUDA kernels, checked against this (CPU) torch's headers plus the CUDA headers."""
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    cxx = os.environ.get("CXX", "g++")
    out = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", f"-I{include}",
                          f"-I{os.path.join(include, 'torch', 'csrc', 'api', 'include')}", f"-I{cuda_include()}",
                          "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", source], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(rk.BackendUnavailableError, match="CUDA kernels run on CUDA tensors"):
        rk.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), backend="cuda")
    with pytest.raises(rk.BackendUnavailableError, match="for cuda tensors use 'cuda' or 'triton'"):
        rk._backend.resolve_backend("cpp", torch.device("cuda"))


def test_setup_chooses_the_build_for_this_torch():
    """setup.py builds CPU-only without complaint on a CPU torch (or with RLHFV_FORCE_CPU=1), CUDA sources otherwise."""
    script = ("import setup; ext = setup.extension(); "
              "print(type(ext).__name__, sorted(__import__('os').path.basename(s) for s in ext.sources))")
    for env in ({}, {"RLHFV_FORCE_CPU": "1"}):
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, **env})
        assert out.returncode == 0, out.stderr[-2000:]
        if torch.version.cuda is None or env:
            assert "building the CPU kernels only" in out.stdout and "logprob_kernels.cu" not in out.stdout
        else:
            assert "logprob_kernels.cu" in out.stdout
