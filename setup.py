"""Builds rlhfv_kernels._C: the C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Package metadata and dependencies live in pyproject.toml; sources, flags and CUDA targets in csrc/build.json (which
CMakeLists.txt reads too). Environment: RLHFV_CUDA_ARCHS (e.g. "80;90a") overrides the CUDA targets;
RLHFV_FORCE_CPU=1 skips CUDA.
"""
import glob
import json
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - message for people who skipped the documented install
    sys.exit("rlhfv: the build needs torch. pip's isolated build installs the torch that pyproject.toml names; "
             "with --no-build-isolation, install torch first (see README: scripts/setup.sh picks the CPU or CUDA build)")

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "csrc", "build.json")) as f:
    BUILD = json.load(f)

CXX_FLAGS = BUILD["cxx_flags"] + ["-fopenmp"]
LINK_FLAGS = ["-fopenmp"]  # resolves to the libgomp that torch already loaded (same soname)
CPU_SOURCES = sorted(p for pattern in BUILD["cpu_sources"] for p in glob.glob(pattern, root_dir=HERE))
CUDA_SOURCES = sorted(p for pattern in BUILD["cuda_sources"] for p in glob.glob(pattern, root_dir=HERE))
CUDA_ARCHS = os.environ.get("RLHFV_CUDA_ARCHS", BUILD["cuda_archs"])


def cuda_build_reason():
    """None if the CUDA kernels should be built, else why not (printed, not an error)."""
    if os.environ.get("RLHFV_FORCE_CPU") == "1":
        return "RLHFV_FORCE_CPU=1"
    if torch.version.cuda is None:
        return "this torch has no CUDA"
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        return "nvcc not found (set CUDA_HOME)"
    if not _has_headers(cpp_extension.CUDA_HOME):
        # torch guesses CUDA_HOME from nvcc's folder: a wrapper in /usr/local/bin gives /usr/local, without headers
        # (the GPU machine's and this one's). Unless the user named that folder, a toolkit folder beside it will do.
        guess = cpp_extension.CUDA_HOME
        found = None if "CUDA_HOME" in os.environ else next(filter(_has_headers, _toolkit_folders()), None)
        if found is None:
            return f"CUDA_HOME={guess} has no include/cuda_runtime.h (set CUDA_HOME to the CUDA toolkit's folder)"
        print(f"rlhfv: CUDA toolkit at {found} (torch's guess {guess} has no include/cuda_runtime.h)")
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = found  # what CUDAExtension and BuildExtension read
    return None


def _toolkit_folders():
    """The usual homes of a CUDA toolkit, the one of torch's CUDA version first."""
    return [f"/usr/local/cuda-{torch.version.cuda}", "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"))


def _has_headers(folder):
    return os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h"))


def cuda_arch_flags():
    archs = CUDA_ARCHS.replace(",", ";").split(";")
    flags = []
    for arch in filter(None, (a.strip() for a in archs)):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def extension():
    reason = cuda_build_reason()
    if reason is not None:
        print(f"rlhfv: building the CPU kernels only ({reason})")
        return CppExtension(name="rlhfv_kernels._C", sources=CPU_SOURCES, extra_compile_args={"cxx": CXX_FLAGS},
                            extra_link_args=LINK_FLAGS, py_limited_api=False)
    from torch.utils.cpp_extension import CUDAExtension
    print(f"rlhfv: building the CPU and CUDA kernels for {CUDA_ARCHS}")
    return CUDAExtension(name="rlhfv_kernels._C", sources=CPU_SOURCES + CUDA_SOURCES,
                         extra_compile_args={"cxx": CXX_FLAGS, "nvcc": [*BUILD["nvcc_flags"], *cuda_arch_flags()]},
                         extra_link_args=LINK_FLAGS, py_limited_api=False)


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import it
    setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
