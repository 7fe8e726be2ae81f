"""The CUDA sources compile (nvcc, no GPU needed): a syntax or template error fails here, not on a GPU machine."""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import rlhfv_kernels as rk

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


# ptxas -v, per kernel entry: "Compiling entry function 'NAME' for 'sm_XX'" ... "N bytes stack frame, N bytes spill
# stores, N bytes spill loads" ... "Used N registers".
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill "
                    r"stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)
BLOCK_THREADS = 256  # __launch_bounds__ of every kernel in csrc/cuda


def ptxas_report(log: str):
    """[(kernel, arch, stack, spill stores, spill loads, registers)] from nvcc -Xptxas -v output."""
    return [(m.group(1), m.group(2), *map(int, m.group(3, 4, 5, 6))) for m in _ENTRY.finditer(log)]


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))),
                         ids=os.path.basename)
def test_cu_files_compile_without_spills_or_stack(source, arch, tmp_path):
    out = subprocess.run([NVCC, "-c", "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", source,
                          "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    entries = ptxas_report(out.stderr)
    assert len(entries) == out.stderr.count("Compiling entry function") > 0, out.stderr[-4000:]
    for kernel, target, stack, spill_stores, spill_loads, registers in entries:
        assert target == arch
        assert (stack, spill_stores, spill_loads) == (0, 0, 0), \
            f"{kernel} on {arch}: {stack} B stack, {spill_stores}/{spill_loads} B spilled"
        assert registers * BLOCK_THREADS <= 65536, f"{kernel} on {arch}: {registers} registers x {BLOCK_THREADS}"


def test_ptxas_report_parser_reads_spills():
    """The parser behind the check above sees a spill (so that check can fail)."""
    log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_80'\n"
           "ptxas info    : Function properties for _Z1kv\n"
           "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert ptxas_report(log) == [("_Z1kv", "sm_80", 8, 4, 4, 255)]


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


def test_a_cuda_home_without_headers_is_replaced_or_named_not_compiled_against(tmp_path, monkeypatch):
    """torch guesses CUDA_HOME from nvcc's folder; an nvcc wrapper in /usr/local/bin (the GPU machine's and this
    one's) gives a folder without include/cuda_runtime.h, which used to fail deep in the compile ("cuda_runtime.h: No
    such file"). A toolkit folder with the headers is used instead, unless CUDA_HOME was set: then it is named."""
    import torch.utils.cpp_extension as cpp_extension
    monkeypatch.syspath_prepend(ROOT)
    import setup
    guess, toolkit = tmp_path / "usr-local", tmp_path / "cuda-13.0"
    guess.mkdir()
    monkeypatch.delenv("RLHFV_FORCE_CPU", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(guess))
    monkeypatch.setattr(setup, "_toolkit_folders", lambda: [str(toolkit)])
    no_headers = f"CUDA_HOME={guess} has no include/cuda_runtime.h (set CUDA_HOME to the CUDA toolkit's folder)"
    assert setup.cuda_build_reason() == no_headers  # no toolkit anywhere
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(guess))
    assert setup.cuda_build_reason() == no_headers  # the user's choice is not overridden
    monkeypatch.delenv("CUDA_HOME")
    assert setup.cuda_build_reason() is None
    assert cpp_extension.CUDA_HOME == os.environ["CUDA_HOME"] == str(toolkit)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(toolkit))
    assert setup.cuda_build_reason() is None
