"""Builds rlhfv_kernels._C: the C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Build with `pip install --no-build-isolation -e .` (build isolation would hide the installed torch).
Environment: RLHFV_CUDA_ARCHS (e.g. "80;90a") overrides the CUDA targets; RLHFV_FORCE_CPU=1 skips CUDA.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - message for people who skipped the documented install
    sys.exit("rlhfv: torch must be installed first, and the build run with --no-build-isolation "
             "(pip install torch==2.13.0 && pip install --no-build-isolation -e .)")

HERE = os.path.dirname(os.path.abspath(__file__))


CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fvisibility=hidden", "-Wno-psabi"]
LINK_FLAGS = ["-fopenmp"]  # resolves to the libgomp that torch already loaded (same soname)
CPU_SOURCES = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
CUDA_SOURCES = sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))


def cuda_build_reason():
    """None if the CUDA kernels should be built, else why not (printed, not an error)."""
    if os.environ.get("RLHFV_FORCE_CPU") == "1":
        return "RLHFV_FORCE_CPU=1"
    if torch.version.cuda is None:
        return "this torch has no CUDA"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def cuda_arch_flags():
    archs = os.environ.get("RLHFV_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
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
    print(f"rlhfv: building the CPU and CUDA kernels for {os.environ.get('RLHFV_CUDA_ARCHS', '80;90a')}")
    return CUDAExtension(name="rlhfv_kernels._C", sources=CPU_SOURCES + CUDA_SOURCES,
                         extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++17", *cuda_arch_flags()]},
                         extra_link_args=LINK_FLAGS, py_limited_api=False)


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import it
    setup(
        name="rlhfv",
        version="0.1.0",
        description="Fused kernels and a compact trainer for fine-grained preference alignment (DDPO, DPO, GRPO)",
        packages=find_packages(include=["rlhfv_kernels", "rlhfv_kernels.*", "rlhfv_train", "rlhfv_train.*"]),
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        python_requires=">=3.10",
        install_requires=["torch", "numpy"],
    )
