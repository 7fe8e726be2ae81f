"""Fused rlhfv kernels vs the eager reference, side by side in one run: time and peak extra memory.

    python benchmarks/run.py                       # default cases for the device at hand (CUDA if present, else CPU)
    python benchmarks/run.py --quick               # tiny sizes, a smoke test of the script itself
    python benchmarks/run.py --json out.json       # also write every record (medians, raw times, peak bytes, versions)
    python benchmarks/run.py --case 4096x32000:float32 --ops ddpo_loss

For every case (N tokens x V vocab, dtype) and op it times the forward and forward+backward (median of --repeats
runs after --warmup) of: the eager reference (fp32 log_softmax + gather), the fused default backend, and the fused
backend with inplace_backward=True; then measures the peak extra memory of one forward+backward of each (CUDA: the
caching allocator's peak; CPU: torch's allocation events from the profiler). It also times a
device copy of the logits to give the bandwidth floor of the logits path: 3 passes (read, read, write) over them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the CPU memory profiler from printing on every use
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlhfv_kernels as rk  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety, not a requirement
    tqdm = None

OPS = ("token_logprobs", "sequence_logps", "ddpo_loss", "grpo_loss")
IMPLS = ("reference", "fused", "fused_inplace")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CASES = {
    "cpu": ["4096x32000:float32", "4096x32000:bfloat16", "1024x128256:bfloat16"],
    "cuda": ["16384x128256:bfloat16", "4096x262144:bfloat16", "4096x32000:float32"],
}
QUICK_CASES = ["256x1000:float32", "128x3001:bfloat16"]
SEQ_LEN = 512  # tokens per sequence: N tokens are laid out as N / SEQ_LEN rows (pairs for the DPO losses)


@dataclass
class Case:
    tokens: int
    vocab: int
    dtype_name: str

    @classmethod
    def parse(cls, text: str) -> "Case":
        try:
            size, dtype_name = text.split(":")
            tokens, vocab = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--case must look like 4096x32000:float32, got {text!r}") from None
        if dtype_name not in DTYPES:
            raise SystemExit(f"--case dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
        return cls(tokens, vocab, dtype_name)

    @property
    def label(self) -> str:
        return f"N={self.tokens} V={self.vocab} {self.dtype_name}"


@dataclass
class Record:
    op: str
    impl: str
    backend: str
    tokens: int
    vocab: int
    shape: list
    dtype: str
    device: str
    device_name: str
    fwd_median_ms: float | None = None
    fwd_bwd_median_ms: float | None = None
    fwd_times_ms: list = field(default_factory=list)
    fwd_bwd_times_ms: list = field(default_factory=list)
    peak_extra_bytes: int | None = None
    logits_bytes: int = 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "rlhfv": rk.__version__,
            "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak bytes allocated through torch above the level at entry, counting allocations inside the kernels.

    CUDA: the caching allocator's peak statistics. CPU: the profiler's allocation events, replayed in time order
    (exact, and unaffected by malloc reusing freed pages, unlike the resident set size).
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self.peak = None
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True)
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
            return False
        self.profiler.__exit__(*exc)
        events = sorted((e for e in self.profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        live = peak = 0
        for event in events:
            live += event.nbytes()
            peak = max(peak, live)
        self.peak = peak
        return False


def make_inputs(case: Case, device: torch.device) -> dict:
    rows = max(2, case.tokens // SEQ_LEN) // 2 * 2
    seq = case.tokens // rows
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(rows, seq, case.vocab, generator=gen) * 2).to(DTYPES[case.dtype_name]).to(device)
    labels = torch.randint(0, case.vocab, (rows, seq), generator=gen)
    labels[:, : seq // 10] = -100  # prompt tokens
    weights = torch.where(torch.rand(rows, seq, generator=gen) < 0.2, 5.0, 1.0)
    old = -torch.rand(rows, seq, generator=gen) * 10
    return {
        "logits": logits,
        "labels": labels.to(device),
        "token_weights": weights.to(device),
        "ref_logps": (-torch.rand(rows, generator=gen) * seq * 10).to(device),
        "advantages": torch.randn(rows, generator=gen).to(device),
        "old_logps": old.to(device),
        "ref_token_logps": (old + 0.1).to(device),
    }


def loss_fn(op: str, inputs: dict, backend: str | None, inplace: bool):
    """A closure logits -> scalar loss for `op`, so every impl is timed on the same call."""
    kw = {"backend": backend, "inplace_backward": inplace}
    labels = inputs["labels"]
    if op == "token_logprobs":
        return lambda x: rk.token_logprobs(x, labels, **kw).sum()
    if op == "sequence_logps":
        return lambda x: rk.sequence_logps(x, labels, inputs["token_weights"], mode="mean", **kw).sum()
    if op == "ddpo_loss":
        return lambda x: rk.ddpo_loss(x, labels, inputs["ref_logps"], token_weights=inputs["token_weights"],
                                      beta=0.5, mode="mean", **kw).loss
    if op == "grpo_loss":
        return lambda x: rk.grpo_loss(x, labels, inputs["advantages"], old_logps=inputs["old_logps"],
                                      ref_logps=inputs["ref_token_logps"], beta_kl=0.04, **kw).loss
    raise ValueError(op)


def time_call(fn, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def bench_one(op, impl, case, inputs, device, args) -> Record:
    backend = "reference" if impl == "reference" else None
    inplace = impl == "fused_inplace"
    resolved = rk._backend.resolve_backend(backend, device)
    logits = inputs["logits"]
    if inplace:
        logits = logits.clone()  # the in-place backward consumes its input
    leaf = logits.requires_grad_(True)
    x = leaf.view_as(leaf)  # a non-leaf input, as a model's logits are (in-place backward must not hit a leaf)
    fn = loss_fn(op, inputs, backend, inplace)
    rec = Record(op=op, impl=impl, backend=resolved, tokens=case.tokens, vocab=case.vocab,
                 shape=list(logits.shape), dtype=case.dtype_name, device=device.type,
                 device_name=device_name(device), logits_bytes=logits.numel() * logits.element_size())

    def forward():
        with torch.no_grad():
            fn(x)

    def forward_backward():
        (grad,) = torch.autograd.grad(fn(x), x)
        return grad

    if not inplace:  # inplace_backward does not change the forward
        rec.fwd_times_ms = time_call(forward, device, args.warmup, args.repeats)
        rec.fwd_median_ms = statistics.median(rec.fwd_times_ms)
    rec.fwd_bwd_times_ms = time_call(forward_backward, device, args.warmup, args.repeats)
    rec.fwd_bwd_median_ms = statistics.median(rec.fwd_bwd_times_ms)
    with PeakMemory(device) as mem:
        grad = forward_backward()
        del grad
    rec.peak_extra_bytes = mem.peak
    leaf.requires_grad_(False)
    return rec


def copy_floor(inputs: dict, device, args) -> dict:
    """Device copy bandwidth on the logits, and the 3-pass floor of a forward+backward over them."""
    src = inputs["logits"]
    dst = torch.empty_like(src)
    times = time_call(lambda: dst.copy_(src), device, args.warmup, args.repeats)
    nbytes = src.numel() * src.element_size()
    seconds = statistics.median(times) / 1e3
    bandwidth = 2 * nbytes / seconds  # one read and one write
    return {"copy_median_ms": statistics.median(times), "bandwidth_bytes_per_s": bandwidth,
            "floor_fwd_bwd_ms": 3 * nbytes / bandwidth * 1e3, "logits_bytes": nbytes}


def fmt_ms(v):
    return "-" if v is None else f"{v:9.2f}"


def fmt_mb(v):
    return "n/a" if v is None else f"{v / 2**20:9.1f}"


def print_table(case: Case, records: list[Record], floor: dict) -> None:
    ref = {r.op: r for r in records if r.impl == "reference"}
    print(f"\n{case.label}  logits {floor['logits_bytes'] / 2**20:.0f} MiB, copy bandwidth "
          f"{floor['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, 3-pass floor {floor['floor_fwd_bwd_ms']:.2f} ms")
    header = (f"{'op':<16}{'impl':<15}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>10}"
              f"{'speedup f+b':>13}{'mem ratio':>11}{'x floor':>9}")
    print(header)
    print("-" * len(header))
    for r in records:
        base = ref.get(r.op)
        speed = base.fwd_bwd_median_ms / r.fwd_bwd_median_ms if base else None
        mem = (base.peak_extra_bytes / max(r.peak_extra_bytes, 1)
               if base and base.peak_extra_bytes is not None and r.peak_extra_bytes is not None else None)
        print(f"{r.op:<16}{r.impl:<15}{fmt_ms(r.fwd_median_ms):>10}{fmt_ms(r.fwd_bwd_median_ms):>12}"
              f"{fmt_mb(r.peak_extra_bytes):>10}{'' if speed is None else f'{speed:.2f}x':>13}"
              f"{'' if mem is None else f'{mem:.1f}x':>11}{r.fwd_bwd_median_ms / floor['floor_fwd_bwd_ms']:>8.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--case", action="append", help="NxV:dtype, repeatable (default: per-device list)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats: checks the script runs")
    parser.add_argument("--json", metavar="PATH", help="write all records and versions here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch sees no CUDA device")
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
    cases = [Case.parse(c) for c in (args.case or (QUICK_CASES if args.quick else DEFAULT_CASES[device.type]))]
    ops = [o for o in args.ops.split(",") if o]
    impls = [i for i in args.impls.split(",") if i]
    for name, chosen, allowed in (("--ops", ops, OPS), ("--impls", impls, IMPLS)):
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {allowed}")
    if "reference" in impls:  # the reference runs first so ratios can be printed
        impls = ["reference"] + [i for i in impls if i != "reference"]

    info = versions()
    print(f"rlhfv benchmark on {device_name(device)}; torch {info['torch']}, triton {info['triton']}, "
          f"{args.repeats} repeats after {args.warmup} warm-up")
    if device.type == "cpu" and not rk.extension_available():
        print("warning: the compiled extension is not built; 'fused' runs the reference", file=sys.stderr)
    results = {"versions": info, "device": device.type, "device_name": device_name(device), "cases": []}
    total = len(cases) * len(ops) * len(impls)
    bar = tqdm(total=total, desc="benchmark", disable=args.no_progress or tqdm is None, file=sys.stderr) \
        if tqdm is not None else None
    for case in cases:
        inputs = make_inputs(case, device)
        floor = copy_floor(inputs, device, args)
        records = []
        for op in ops:
            for impl in impls:
                if bar is not None:
                    bar.set_postfix_str(f"{case.label} {op} {impl}")
                records.append(bench_one(op, impl, case, inputs, device, args))
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.clear()
        print_table(case, records, floor)
        results["cases"].append({"case": asdict(case), "floor": floor, "records": [asdict(r) for r in records]})
        del inputs
    if bar is not None:
        bar.close()
    print("\nspeedup f+b: reference forward+backward time / this one; mem ratio: reference peak extra memory / this "
          "one; x floor: forward+backward time / (3 passes over the logits at the measured copy bandwidth)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
