"""Builds the CUDA emulation harness: csrc/cuda/logprob_kernels.cu with its launches rewritten for cuda_emu.h, compiled
by the host C++ compiler with a sanitizer, linked into logprob_driver.cpp.

    python tests/gpu_verify/cuda_emu/build.py OUT_DIR [asan|tsan]    (prints the binary's path)

`mutate` lets a test plant a bug in a copy of the kernels and check that the emulation catches it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
KERNELS = os.path.join(ROOT, "csrc", "cuda", "logprob_kernels.cu")
SANITIZERS = {
    # AddressSanitizer + UndefinedBehaviorSanitizer (alignment included): out-of-bounds and misaligned 16-byte accesses.
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
    # ThreadSanitizer: races between the threads of a block, e.g. on __shared__ memory without __syncthreads.
    "tsan": ["-fsanitize=thread"],
}
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>", re.S)


def rewrite_launches(source: str) -> str:
    """`k<<<grid, block, smem, stream>>>(args)` -> `::emu::launch(k, grid, block, smem, stream)(args)`."""
    out, count = _LAUNCH.subn(lambda m: f"::emu::launch({m.group(1)}, {m.group(2)})", source)
    if count == 0:
        raise ValueError("no <<<...>>> launch found: is this the CUDA kernels file?")
    return out


def build(out_dir: str, sanitizer: str, mutate=None) -> str:
    """Compiles the harness into out_dir and returns the binary's path. mutate(source) -> source plants a bug."""
    os.makedirs(out_dir, exist_ok=True)
    with open(KERNELS) as f:
        source = f.read()
    if mutate is not None:
        mutated = mutate(source)
        if mutated == source:
            raise ValueError("the mutation changed nothing")
        source = mutated
    with open(os.path.join(out_dir, "logprob_kernels.emu.cpp"), "w") as f:
        f.write(rewrite_launches(source))
    binary = os.path.join(out_dir, f"logprob_driver_{sanitizer}")
    cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-g", "-O1", f"-I{os.path.join(HERE, 'include')}",
           f"-I{os.path.dirname(KERNELS)}", f"-I{out_dir}", "-include", "cuda_emu.h", *SANITIZERS[sanitizer],
           os.path.join(HERE, "logprob_driver.cpp"), "-o", binary, "-lpthread"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed:\n{' '.join(cmd)}\n{result.stderr[-4000:]}")
    return binary


if __name__ == "__main__":
    print(build(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "asan"))
