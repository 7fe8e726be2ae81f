#!/usr/bin/env python
"""Compiles every Triton kernel of rlhfv, in every configuration its launchers can pick, for CUDA GPUs, on a machine
without one, and checks the resources each would use.

For each (kernel, config, dtype, target) it runs Triton's whole pipeline (TTIR -> TTGIR -> LLIR -> PTX -> cubin, with
Triton's bundled ptxas) under the argument specialization the JIT derives at launch time, then reads registers,
stack and local memory (cuobjdump on the cubin), spills (the log of Triton's own ptxas -v run) and shared memory
(Triton's metadata). A case fails on: a compile error, any spill or local memory, shared memory over the target's
per-block limit, registers x threads over the 64K register file, or, for the logits kernels' aligned variants
(VEC > 1), PTX without 16-byte global loads (and stores, for the backward).

The configurations come from the kernel modules themselves (kernels.forward_configs / BACKWARD_CONFIGS,
linear_kernels.configs_for), so a config added there is checked here without editing this file.

    python tests/gpu_verify/triton_aot.py [--targets 80,90] [--dtypes bf16,fp16,fp32] [--json FILE] [--out DIR]
        [--only REGEX] [--add-linear-config fwd|bwd:BNxBVxBH:wW:sS] [--jobs N]
TRITON_INTERPRET is cleared before Triton is imported. Exit status 1 when any case fails.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns unless it is set; same as its default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import MockTensor, create_function_from_signature  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from rlhfv_kernels.triton import kernels, linear_kernels  # noqa: E402

NV_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Shared memory per block (opt-in maximum) and the register file, per target. sm_80 is checked against the smallest
# sm_8x limit (sm_86/sm_89: 99 KiB), because the same configurations run on A100, A10, L4 and RTX 30/40 parts.
SMEM_LIMIT = {80: 101376, 90: 232448}
REGS_PER_SM = 65536
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# A 16-byte global access in PTX: ld.global[.modifiers].v4.b32 / .v2.b64 (likewise st.global).
VECTOR_ACCESS = {op: re.compile(rf"\b{op}\.global(?:\.[\w:]+)*\.(?:v4\.[bfu]32|v2\.[bfu]64)\b") for op in ("ld", "st")}


class UnalignedMockTensor(MockTensor):
    """A tensor argument whose address is not a multiple of 16 (a view at an odd storage offset)."""

    @staticmethod
    def data_ptr():
        return 2


class Case:
    def __init__(self, kernel, label, fn, args, meta, dtype, vector_ops=()):
        self.kernel, self.label, self.fn, self.args, self.meta, self.dtype = kernel, label, fn, args, meta, dtype
        self.vector_ops = vector_ops  # "ld"/"st" that must appear 16 bytes wide in the PTX


def _jit(fn):
    return fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn


def logits_cases(dtypes):
    """Both logits-path kernels: every forward autotune config and backward config, aligned (VEC > 1) and unaligned
    (VEC = 1, odd V, unaligned base), with and without temperature, with and without a soft cap, one and several
    vocabulary splits."""
    i64, f32, f64 = torch.int64, torch.float32, torch.float64
    rows, cpu = 4096, torch.device("cpu")
    for dn in dtypes:
        dt = DTYPES[dn]
        aligned_vec = 16 // dt.itemsize
        for vec, vocab, T in ((aligned_vec, 151936, MockTensor), (1, 32003, UnalignedMockTensor)):
            # (the entropy variants with a temperature, and with a soft cap: the heaviest bodies; fp16 compiles to
            # the registers of bf16, so its entropy variants are left to bf16's)
            for scaled, capped, entropy in ((False, False, False), (True, False, False), (False, True, False),
                                            (True, False, True), (False, True, True)):
                if entropy and dn == "fp16":
                    continue
                tag = (f"VEC={vec} {'t!=1' if scaled else 't=1'}" + (" cap" if capped else "")
                       + (" entropy" if entropy else ""))
                for cfg in kernels.forward_configs(capped, entropy):
                    for want_splits in (1, 4):
                        splits, split_size = kernels.plan_splits(rows, vocab, cpu, want_splits, multiple=vec)
                        args = (T(dt), T(i64), T(i64), T(f32), T(f32), T(f32), T(f32), vocab, split_size, splits,
                                -100, 0.7, 30.0, kernels._bucket(vocab), kernels._bucket(split_size))
                        meta = dict(cfg.kwargs, VEC=vec, SCALED=scaled, CAPPED=capped, ENTROPY=entropy,
                                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                        yield Case("logprob_fwd", f"BLOCK_V={cfg.kwargs['BLOCK_V']} w{cfg.num_warps} splits={splits} "
                                   f"{tag}", _jit(kernels._logprob_fwd_kernel), args, meta, dn,
                                   ("ld",) if vec > 1 else ())
                for block, warps in kernels.BACKWARD_CONFIGS:
                    _, split_size = kernels.plan_splits(rows, vocab, cpu, 1, multiple=vec)
                    args = (T(dt), T(i64), T(dt), T(i64), T(i64), T(f32), T(f64), T(f32), T(f32), vocab,
                            split_size, -100, 0.7, 30.0)
                    meta = dict(BLOCK_V=block, ROUND_BF16=False, VEC=vec, SCALED=scaled, CAPPED=capped,
                                ENTROPY=entropy, num_warps=warps)
                    yield Case("logprob_bwd", f"BLOCK_V={block} w{warps} {tag}", kernels._logprob_bwd_kernel, args,
                               meta, dn, ("ld", "st") if vec > 1 else ())


def linear_cases(dtypes, cap, extra=()):
    """Every fused-linear tile the autotuner may pick on GPU family `cap` (linear_kernels.configs_for: per operand
    type, fp32 both with TF32 and full-precision dots), with and without bias, with a soft cap (Gemma's logits; its
    own, smaller set of tiles), plus any --add-linear-config."""
    for dn in dtypes:
        dt = DTYPES[dn]
        operands = linear_kernels.INPUT_PRECISIONS if dt == torch.float32 else ("16bit",)
        for operand, which in ((o, w) for o in operands for w in ("fwd", "bwd")):
            # (the entropy variants without and with the cap; not for fp16, as above)
            for bias, capped, entropy in ((False, False, False), (True, False, False), (False, True, False),
                                          (False, False, True), (False, True, True)):
                if entropy and dn == "fp16":
                    continue
                configs = (linear_kernels.configs_for(which, operand, cap, capped, entropy)
                           + [c for w, c in extra if w == which])
                for cfg in configs:
                    yield _linear_case(which, dn, operand, cfg, bias, capped, entropy)


def _linear_case(which, dn, operand, cfg, bias, capped, entropy=False):
    """One fused-linear launch at a real size (N = 4096 tokens, V = 151936, H = 4096)."""
    i64, f32, f64 = torch.int64, torch.float32, torch.float64
    N, V, H = 4096, 151936, 4096
    T, dt = MockTensor, DTYPES[dn]
    if which == "fwd":  # four vocabulary splits, sized by the launcher's own planner
        splits, split_size = linear_kernels._plan(N, V, torch.device("cpu"), 4)
        args = (T(dt), T(dt), T(dt), T(i64), T(f32), T(f32), T(f32), T(f32), N, V, H, split_size, splits, -100,
                0.7, 30.0, kernels._bucket(N))
    else:
        args = (T(dt), T(dt), T(dt), T(i64), T(f32), T(f64), T(f32), T(f32), T(f32), T(f32), T(f32), N, V, H, -100,
                0.7, 30.0, kernels._bucket(N))
    fn = linear_kernels._linear_fwd_kernel if which == "fwd" else linear_kernels._linear_bwd_kernel
    meta = dict(cfg.kwargs, HAS_BIAS=bias, CAPPED=capped, UPCAST=False,
                INPUT_PRECISION=linear_kernels.dot_precision(operand), ENTROPY=entropy, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    k = cfg.kwargs
    label = (f"{k['BLOCK_N']}x{k['BLOCK_V']}x{k['BLOCK_H']} w{cfg.num_warps} s{cfg.num_stages} bias={int(bias)}"
             + (" cap" if capped else "") + (" entropy" if entropy else "")
             + (f" {operand}" if dt == torch.float32 else ""))
    return Case(f"linear_{which}", label, _jit(fn), args, meta, dn)


def compile_like_jit(fn, args, kwargs, target):
    """What JITFunction.run does before a launch, minus the driver: bind, specialize, pack, compile. Returns the
    compiled kernel and the log of Triton's own ptxas run (-v: registers, stack frame, spills)."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints its ptxas -v log (it always passes -v) ...
        triton.knobs.compilation.always_compile = True  # ... which a kernel from Triton's cache would not have
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue()


def resource_usage(cubin: bytes, ptxas_log: str, workdir: str) -> dict:
    """Registers / stack / local bytes from cuobjdump on Triton's cubin; spills from the log of the ptxas run that
    built it (a second ptxas run would cost as much again and need Triton's exact flags)."""
    path = os.path.join(workdir, "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    dump = subprocess.run([os.path.join(NV_BIN, "cuobjdump"), "--dump-resource-usage", path],
                          capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", dump)
    if not m:
        raise RuntimeError(f"cuobjdump printed no resource usage: {dump[-500:]}")
    out = dict(zip(("regs", "stack", "static_smem", "local"), map(int, m.groups())))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if not m:
        raise RuntimeError(f"Triton's ptxas log has no spill line: {ptxas_log[-500:]!r}")
    out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
    return out


def check_case(case: Case, cap: int, workdir: str, out_dir: str | None = None) -> dict:
    row = dict(kernel=case.kernel, config=case.label, dtype=case.dtype, sm=cap)
    t0 = time.time()
    try:
        ck, ptxas_log = compile_like_jit(case.fn, case.args, case.meta, GPUTarget("cuda", cap, 32))
        row.update(resource_usage(ck.asm["cubin"], ptxas_log, workdir))
    except Exception as e:  # noqa: BLE001
        message = str(e).strip().splitlines()
        row.update(ok=False, problems=[f"COMPILE: {type(e).__name__}: {message[-1] if message else ''}"[:400]])
        return row
    md = ck.metadata
    ptx = ck.asm["ptx"]
    row.update(seconds=round(time.time() - t0, 2), num_warps=md.num_warps, num_stages=md.num_stages, smem=md.shared,
               vector_loads=len(VECTOR_ACCESS["ld"].findall(ptx)), vector_stores=len(VECTOR_ACCESS["st"].findall(ptx)))
    problems = []
    if row["spill_stores"] or row["spill_loads"] or row["local"] or row["stack"]:
        problems.append("SPILLS")
    if md.shared > SMEM_LIMIT[cap]:
        problems.append(f"SMEM>{SMEM_LIMIT[cap]}")
    if row["regs"] * md.num_warps * 32 > REGS_PER_SM:
        problems.append("REGS*THREADS>64K")
    for op in case.vector_ops:
        if not row["vector_loads" if op == "ld" else "vector_stores"]:
            problems.append(f"NO-16B-{op.upper()}")
    row.update(ok=not problems, problems=problems)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{case.kernel}_{case.label}_{case.dtype}_sm{cap}")
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(out_dir, f"{stem}.{ext}"), "w") as f:
                f.write(ck.asm[ext])
    return row


def parse_linear_config(text: str):
    """'bwd:64x128x64:w4:s3' -> ('bwd', triton.Config)."""
    m = re.fullmatch(r"(fwd|bwd):(\d+)x(\d+)x(\d+):w(\d+):s(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--add-linear-config takes fwd|bwd:BNxBVxBH:wW:sS, got {text!r}")
    bn, bv, bh, w, s = map(int, m.groups()[1:])
    return m.group(1), triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh), num_warps=w, num_stages=s)


_WORK: list = []  # (case, target) to check, filled by main before the workers fork


def _check_one(index: int, work: str, out_dir: str | None) -> dict:
    case, cap = _WORK[index]
    workdir = os.path.join(work, str(os.getpid()))  # one scratch folder per worker process
    os.makedirs(workdir, exist_ok=True)
    return check_case(case, cap, workdir, out_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="80,90", help="compute capabilities, e.g. 80,90")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--only", default=None, help="regex on 'kernel config dtype' to run a subset")
    ap.add_argument("--add-linear-config", type=parse_linear_config, action="append", default=[],
                    help="also check this fused-linear tile (to try one before adding it to LINEAR_CONFIGS)")
    ap.add_argument("--json", default=None, help="write every row here")
    ap.add_argument("--out", default=None, help="write each case's TTGIR and PTX here")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cases compiled at once (default: one per "
                    "core)")
    a = ap.parse_args(argv)
    dtypes = a.dtypes.split(",")
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    print(f"{'kernel':12s} {'config':44s} {'dt':4s} {'sm':>3s} {'regs':>4s} {'spill':>9s} {'smem':>7s} "
          f"{'ld16':>4s} {'st16':>4s} {'s':>4s}  verdict", flush=True)
    _WORK.clear()
    for cap in map(int, a.targets.split(",")):
        if cap not in SMEM_LIMIT:
            ap.error(f"--targets: no limits recorded for sm_{cap} (known: {sorted(SMEM_LIMIT)})")
        _WORK.extend((case, cap) for case in (*logits_cases(dtypes), *linear_cases(dtypes, cap, a.add_linear_config))
                     if not a.only or re.search(a.only, f"{case.kernel} {case.label} {case.dtype}"))
    rows, work = [], tempfile.mkdtemp(prefix="rlhfv_aot_")
    # Each case compiles in one process (LLVM and ptxas are single-threaded); forked workers inherit _WORK, so only
    # an index and a result row cross between processes.
    with multiprocessing.get_context("fork").Pool(max(1, min(a.jobs, len(_WORK)))) as pool:
        for row in pool.imap(functools.partial(_check_one, work=work, out_dir=a.out), range(len(_WORK))):
            rows.append(row)
            if "regs" in row and "smem" in row:
                print(f"{row['kernel']:12s} {row['config']:44s} {row['dtype']:4s} {row['sm']:3d} {row['regs']:4d} "
                      f"{row['spill_stores']:4d}/{row['spill_loads']:<4d} {row['smem']:7d} {row['vector_loads']:4d} "
                      f"{row['vector_stores']:4d} {row['seconds']:4.1f}  {' '.join(row['problems']) or 'ok'}",
                      flush=True)
            else:
                print(f"{row['kernel']:12s} {row['config']:44s} {row['dtype']:4s} {row['sm']:3d} {row['problems'][0]}",
                      flush=True)
    failed = sum(not r["ok"] for r in rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, rows=rows), f, indent=1)
    print(f"triton {triton.__version__}: {len(rows)} compiled, {failed} failed")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
