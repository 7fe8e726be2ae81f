"""Where the CPU kernels' time goes, without perf counters (VMs rarely expose them): each chunk sweep of
csrc/cpu/sweeps.h timed alone on one thread on a chunk that stays in L1 (pure compute, no memory traffic), at
every x86-64 level this CPU has, then the sweeps of each forward+backward added up per logit.

    python benchmarks/sweeps.py                          # build once (cached under runs/sweeps/), time every level
    python benchmarks/sweeps.py --case 1024x128256 --json out.json

The per-logit sums times N x V / threads are what benchmarks/run.py's in-place forward+backward would take if the
sweeps were all of its work and the memory traffic hid behind them: a run.py time near that is compute-bound (only
fewer or cheaper operations per logit make it faster); far above it, something else (memory, threads, overheads)
bounds it. The program is benchmarks/sweeps_bench.cpp, built with the extension's own flags (csrc/build.json).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.harness import device_name, versions, write_json  # noqa: E402

SOURCE = os.path.join(ROOT, "benchmarks", "sweeps_bench.cpp")
KERNELS = [os.path.join(ROOT, "csrc", "cpu", name) for name in ("simd.h", "sweeps.h")]
CACHE = os.path.join(ROOT, "runs", "sweeps")
LEVELS = ["", "v4", "v3", "baseline"]  # RLHFV_CPU_LEVEL: "" is the widest this CPU has; a level above it falls back
# What each in-place forward+backward runs per logit (csrc/cpu/logprob_cpu.cpp: forward_rows, backward_rows)
PATHS = {
    "fp32": ["chunk_max", "chunk_sum_exp", "chunk_scaled_softmax"],
    "bf16": ["load_chunk_bf16", "chunk_max", "chunk_sum_exp", "chunk_scaled_softmax_bf16"],
    "fp32 + entropy": ["chunk_max", "chunk_sum_exp_and_moment", "chunk_entropy_grad"],
    "fp32 soft cap": ["chunk_softcap", "chunk_max", "chunk_sum_exp", "chunk_softcap_grad"],
    "bf16 soft cap": ["load_chunk_bf16", "chunk_softcap", "chunk_max", "chunk_sum_exp", "load_chunk_bf16",
                      "chunk_softcap_grad", "store_chunk_bf16"],
}


def build(compiler: str = "c++") -> str:
    """The benchmark binary for this source, kernels and compiler, built once into CACHE."""
    if shutil.which(compiler) is None:
        raise SystemExit(f"benchmarks/sweeps.py needs a C++ compiler ({compiler!r} is not on PATH)")
    import torch.utils.cpp_extension as cpp_extension
    with open(os.path.join(ROOT, "csrc", "build.json")) as f:
        flags = json.load(f)["cxx_flags"]
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    command = [compiler, "-std=c++17", *flags, "-w", SOURCE, *includes]
    digest = hashlib.sha256(" ".join(command).encode())
    for path in (SOURCE, *KERNELS):
        with open(path, "rb") as f:
            digest.update(f.read())
    binary = os.path.join(CACHE, f"sweeps_bench-{digest.hexdigest()[:16]}")
    if not os.path.exists(binary):
        os.makedirs(CACHE, exist_ok=True)
        built = subprocess.run([*command, "-o", binary + ".tmp"], capture_output=True, text=True)
        if built.returncode != 0:
            raise SystemExit(f"building {SOURCE} failed:\n{built.stderr[-4000:]}")
        os.replace(binary + ".tmp", binary)
    return binary


def short_name(variant: str) -> str:
    """A column label: "x86-64-v4 (AVX-512) + AVX512-BF16" -> "x86-64-v4+bf16", "aarch64 (NEON)" -> "aarch64"."""
    return variant.split(" (")[0] + ("+bf16" if variant.endswith("AVX512-BF16") else "")


def run_levels(binary: str, reps: int) -> tuple[dict, int]:
    """({variant name: {sweep: ns per logit}} for every distinct level this CPU runs, the chunk's length)."""
    out, chunk = {}, 0
    for level in LEVELS:
        env = {**os.environ, "RLHFV_CPU_LEVEL": level}
        ran = subprocess.run([binary, str(reps)], capture_output=True, text=True, env=env, timeout=600)
        if ran.returncode != 0:
            raise SystemExit(f"{binary} failed at level {level or 'default'}:\n{ran.stderr[-2000:]}")
        lines = dict(line.split(" ", 1) for line in ran.stdout.strip().splitlines())
        variant, chunk = lines.pop("variant"), int(lines.pop("chunk"))
        out.setdefault(variant, {name: float(value) for name, value in lines.items()})
    return out, chunk


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="1024x128256", help="NxV the per-logit sums are scaled to (default "
                        "1024x128256, run.py's bf16 headline case)")
    parser.add_argument("--threads", type=int, default=None, help="threads the scaled time assumes (default: torch's)")
    parser.add_argument("--reps", type=int, default=20000, help="calls per timing round (5 rounds, the fastest kept)")
    parser.add_argument("--json", metavar="PATH", help="write the timings, sums and versions here")
    args = parser.parse_args(argv)
    try:
        rows, vocab = (int(v) for v in args.case.lower().split("x"))
    except ValueError:
        parser.error(f"--case must be NxV (e.g. 1024x128256), got {args.case!r}")
    if rows <= 0 or vocab <= 0 or args.reps <= 0:
        parser.error("--case sizes and --reps must be positive")
    import torch
    threads = args.threads or torch.get_num_threads()
    timings, chunk = run_levels(build(), args.reps)
    variants = list(timings)
    print(f"{device_name(torch.device('cpu'))}\nns per logit of each sweep alone: one thread, a {chunk}-logit chunk "
          f"in L1 (no memory traffic); columns: {'; '.join(variants)}")
    width = max(22, *(len(short_name(v)) + 2 for v in variants))
    print(f"{'sweep':<28}" + "".join(f"{short_name(v):>{width}}" for v in variants))
    for sweep in timings[variants[0]]:
        print(f"{sweep:<28}" + "".join(f"{timings[v][sweep]:>{width}.3f}" for v in variants))
    sums = {v: {path: sum(timings[v][s] for s in sweeps) for path, sweeps in PATHS.items()} for v in variants}
    scale_ms = rows * vocab / threads / 1e6
    print(f"\nforward+backward in place, sum of its sweeps: ns per logit, and ms at N={rows} V={vocab} on {threads} "
          f"threads (compare benchmarks/run.py's in-place rows: near it, compute-bound)")
    for path in PATHS:
        print(f"{path:<28}" + "".join(f"{f'{sums[v][path]:.3f} = {sums[v][path] * scale_ms:.1f} ms':>{width}}"
                                      for v in variants))
    if args.json:
        write_json(args.json, {"versions": versions(), "device_name": device_name(torch.device("cpu")),
                               "case": {"rows": rows, "vocab": vocab, "threads": threads},
                               "ns_per_logit": timings, "paths": PATHS, "fwd_bwd_ns_per_logit": sums})
    return 0


if __name__ == "__main__":
    sys.exit(main())
