"""Fused rlhfv kernels vs the eager reference, side by side in one run: time and peak extra memory.

    python benchmarks/run.py                       # the headline cases for the device (CUDA if present, else CPU)
    python benchmarks/run.py --full                # the whole sweep: every op on every case of the device
    python benchmarks/run.py --quick               # tiny sizes, a smoke test of the script itself
    python benchmarks/run.py --json out.json       # also write every record (medians, raw times, peak bytes, versions)
    python benchmarks/run.py --case 4096x32000:float32 --ops ddpo_loss
    python benchmarks/run.py --softcap 30          # also what Gemma's soft cap costs: reference and fused with it

For every case (N tokens x V vocab, dtype) and op it times the forward and forward+backward (median of --repeats
runs after --warmup) of: the eager reference (fp32 log_softmax + gather), the fused default backend, and the fused
backend with inplace_backward=True; then measures the peak extra memory of one forward+backward of each (CUDA: the
caching allocator's peak; CPU: torch's allocation events from the profiler). It also times one in-place pass over
the logits' bytes to give the bandwidth floor of the logits path: 3 passes (read, read, write) over them.
With --softcap C two more contestants run beside the others: the eager reference and the fused default, both with
the soft cap C (z = C tanh(x / C)) applied to the logits, so the table shows what the cap costs each.

By default only the headline cases run (HEADLINE: the per-token log-probs every trainer asks for and the DDPO loss,
on a Llama-2-size and a Llama-3-size vocabulary), a few minutes on a 2-core CPU; the run ends with one summary table
(ours against the eager reference and the best peer, per case and op) and a plot (runs/benchmark/benchmark.png
unless --plot says where; --no-plot skips it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the CPU memory profiler from printing on every use
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import (PeakMemory, add_check_arguments, compare_ratios, device_name, fmt_mb,  # noqa: E402
                                fmt_ms, machine_load, max_abs_diff, mem_ratio, pick_device, plot_bars, print_load,
                                read_recorded, row_suspicions, spread, time_call, versions, warn_if_busy, write_json)
import rlhfv_kernels as rk  # noqa: E402
from rlhfv_kernels import _backend  # noqa: E402
from rlhfv_kernels import losses  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety, not a requirement
    tqdm = None

# logprobs_entropy: token_logprobs(return_entropy=True) with a gradient through both (-sum logp + 0.01 sum H), beside
# token_logprobs it shows what the entropy costs.
OPS = ("token_logprobs", "logprobs_entropy", "sequence_logps", "ddpo_loss", "grpo_loss")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FULL_CASES = {
    "cpu": ["4096x32000:float32", "4096x32000:bfloat16", "1024x128256:bfloat16"],
    "cuda": ["16384x128256:bfloat16", "4096x262144:bfloat16", "4096x32000:float32"],
}
HEADLINE = {  # what `python benchmarks/run.py` runs without --full / --case / --ops
    "cpu": {"cases": ["4096x32000:float32", "1024x128256:bfloat16"], "ops": ["token_logprobs", "ddpo_loss"]},
    "cuda": {"cases": ["16384x128256:bfloat16", "4096x262144:bfloat16"], "ops": ["token_logprobs", "ddpo_loss",
                                                                                  "grpo_loss"]},
}
DEFAULT_PLOT = os.path.join("runs", "benchmark", "benchmark.png")
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
    grad_max_abs_err: float | None = None  # max |dlogits - reference dlogits| of the first run
    fwd_bwd_spread: float | None = None  # (max - min) / median of the forward+backward repeats
    suspect: list = field(default_factory=list)  # why this row contradicts itself or is too noisy to read


def make_inputs(case: Case, device: torch.device) -> dict:
    """Logits, labels and loss inputs of realistic scale: reference scores and old/reference per-token log-probs
    lie close to the policy's own, so the losses are not saturated and every token gets a nonzero gradient
    (rows whose gradient is zero are skipped by the fused backward, which would flatter it)."""
    rows = max(2, case.tokens // SEQ_LEN) // 2 * 2
    seq = case.tokens // rows
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(rows, seq, case.vocab, generator=gen) * 2).to(DTYPES[case.dtype_name]).to(device)
    labels = torch.randint(0, case.vocab, (rows, seq), generator=gen)
    labels[:, : seq // 10] = -100  # prompt tokens
    labels = labels.to(device)
    weights = torch.where(torch.rand(rows, seq, generator=gen) < 0.2, 5.0, 1.0).to(device)
    with torch.no_grad():
        policy = rk.token_logprobs(logits, labels)
        scores = rk.sequence_logps(logits, labels, weights, mode="mean")
    noise = lambda *shape: (0.05 * torch.randn(*shape, generator=gen)).to(device)  # noqa: E731
    return {
        "logits": logits,
        "labels": labels,
        "token_weights": weights,
        "ref_logps": scores + noise(rows),
        "advantages": torch.randn(rows, generator=gen).to(device),
        "old_logps": policy + noise(rows, seq),
        "ref_token_logps": policy + noise(rows, seq),
    }


@dataclass(frozen=True)
class Impl:
    """One contestant. `backend` selects an rlhfv backend; `peer` names another library's per-token kernel."""

    name: str
    backend: str | None = None
    inplace: bool = False
    compiled: bool = False
    peer: str | None = None
    consumes_input: bool = False  # writes into the logits (in-place backward; Liger computes dlogits in forward)
    ops: tuple = OPS
    softcap: bool = False  # applies --softcap's cap to the logits (only rlhfv impls take one)


PEER_OPS = ("token_logprobs", "ddpo_loss")  # peers give per-token CE; the DPO math on top is ours, same for all
IMPL_TABLE = {
    "reference": Impl("reference", backend="eager"),  # the eager reference: the baseline every ratio divides
    "reference_compiled": Impl("reference_compiled", backend="eager", compiled=True),
    "fused": Impl("fused"),
    "fused_inplace": Impl("fused_inplace", inplace=True, consumes_input=True),
    # One pair per GPU backend of the table (on CPU, "fused" above is the library's choice, the C++ kernels).
    **{name: Impl(name, backend=b, inplace=inplace, consumes_input=inplace)
       for b, device in _backend.targets() if device == "cuda"
       for name, inplace in ((b, False), (f"{b}_inplace", True))},
    "liger": Impl("liger", peer="liger", consumes_input=True, ops=PEER_OPS),
    "flash_attn": Impl("flash_attn", peer="flash_attn", ops=PEER_OPS),
    "trl": Impl("trl", peer="trl", ops=PEER_OPS + ("logprobs_entropy",)),
    "reference_softcap": Impl("reference_softcap", backend="eager", softcap=True),
    "fused_softcap": Impl("fused_softcap", softcap=True),
}
SOFTCAP_IMPLS = tuple(name for name, impl in IMPL_TABLE.items() if impl.softcap)  # added by --softcap
PEER_DEVICES = {"liger": ("cuda",), "flash_attn": ("cuda",), "trl": ("cpu", "cuda")}
IMPLS = tuple(IMPL_TABLE)
DEFAULT_IMPLS = {"cpu": ("reference", "reference_compiled", "trl", "fused", "fused_inplace"),
                 "cuda": ("reference", "reference_compiled", "trl", "triton", "triton_inplace", "cuda", "cuda_inplace",
                          "liger", "flash_attn")}


def peer_token_logps(peer: str):
    """(logits [..., V], labels [...]) -> per-token log-probs from a peer's cross-entropy kernel.

    Raises ImportError when the peer is not installed."""
    if peer == "liger":
        from liger_kernel.transformers import LigerCrossEntropyLoss

        ce = LigerCrossEntropyLoss(reduction="none", ignore_index=-100)

        def liger(x, labels):
            out = ce(x.reshape(-1, x.shape[-1]), labels.reshape(-1))
            out = out[0] if isinstance(out, tuple) else out
            return -out.float().reshape(labels.shape)

        return liger
    if peer == "trl":
        from trl.trainer.utils import selective_log_softmax  # TRL's log-prob path (its DPO/GRPO trainers use it)

        def trl(x, labels):
            mask = labels != -100
            return selective_log_softmax(x, labels.masked_fill(~mask, 0)).float() * mask

        return trl
    if peer == "flash_attn":
        try:
            from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
        except ImportError:
            # flash-attn's package imports its CUDA build; its Triton cross-entropy file also loads on its own.
            path = os.environ.get("RLHFV_PEER_FLASH_ATTN_CE")
            if not path:
                raise
            import importlib.util
            spec = importlib.util.spec_from_file_location("flash_attn_triton_cross_entropy", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            cross_entropy_loss = module.cross_entropy_loss

        def flash(x, labels):
            losses, _ = cross_entropy_loss(x.reshape(-1, x.shape[-1]), labels.reshape(-1), ignore_index=-100)
            return -losses.float().reshape(labels.shape)

        return flash
    raise ValueError(peer)


def peer_token_logps_entropy(peer: str):
    """(logits, labels) -> (per-token log-probs, entropies) from a peer that has both (TRL: its Triton kernel on
    CUDA, else selective_log_softmax + entropy_from_logits)."""
    if peer != "trl":
        raise ValueError(f"{peer} has no per-token entropy")
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    def trl(x, labels):
        mask = labels != -100
        safe = labels.masked_fill(~mask, 0)
        if x.is_cuda:
            from trl.kernels import selective_log_softmax_and_entropy
            logp, entropy = selective_log_softmax_and_entropy(x, safe)
        else:
            logp, entropy = selective_log_softmax(x, safe), entropy_from_logits(x)
        return logp.float() * mask, entropy.float() * mask

    return trl


def impl_unavailable(impl: Impl, device: torch.device, backend_override: str | None) -> str | None:
    """Why `impl` cannot run here, or None."""
    if impl.peer is not None:
        if device.type not in PEER_DEVICES[impl.peer]:
            return f"runs on {' and '.join(PEER_DEVICES[impl.peer])} only"
        try:
            peer_token_logps(impl.peer)
        except ImportError as exc:
            return f"not installed ({exc})"
        return None
    backend = impl.backend or backend_override
    try:
        _backend.resolve_backend(backend, device)
    except (rk.BackendUnavailableError, ValueError) as exc:
        return str(exc)
    return None


def entropy_objective(logp, entropy):
    """A policy-gradient-like use of both outputs, so both backward paths run."""
    return -logp.sum() + 0.01 * entropy.sum()


def loss_fn(op: str, inputs: dict, impl: Impl, backend_override: str | None, softcap: float | None = None):
    """A closure logits -> scalar loss for `op`, so every impl is timed on the same call."""
    labels = inputs["labels"]
    if impl.peer is not None:
        token_logps = peer_token_logps(impl.peer)
        mask = labels != -100
        weights = inputs["token_weights"] * mask
        if op == "token_logprobs":
            return lambda x: token_logps(x, labels).sum()
        if op == "logprobs_entropy":
            with_entropy = peer_token_logps_entropy(impl.peer)
            return lambda x: entropy_objective(*with_entropy(x, labels))
        return lambda x: losses.ddpo_from_token_logps(
            token_logps(x, labels), mask, weights, inputs["ref_logps"], beta=0.5, mode="mean", reward_margin=None,
            drs_weight=0.0, drs_k=1.0, sft_weight=0.0).loss
    kw = {"backend": impl.backend or backend_override, "inplace_backward": impl.inplace}
    if impl.softcap:
        kw["softcap"] = softcap
    if op == "token_logprobs":
        fn = lambda x: rk.token_logprobs(x, labels, **kw).sum()  # noqa: E731
    elif op == "logprobs_entropy":
        fn = lambda x: entropy_objective(*rk.token_logprobs(x, labels, return_entropy=True, **kw))  # noqa: E731
    elif op == "sequence_logps":
        fn = lambda x: rk.sequence_logps(x, labels, inputs["token_weights"], mode="mean", **kw).sum()  # noqa: E731
    elif op == "ddpo_loss":
        fn = lambda x: rk.ddpo_loss(x, labels, inputs["ref_logps"],  # noqa: E731
                                    token_weights=inputs["token_weights"], beta=0.5, mode="mean", **kw).loss
    elif op == "grpo_loss":
        fn = lambda x: rk.grpo_loss(x, labels, inputs["advantages"], old_logps=inputs["old_logps"],  # noqa: E731
                                    ref_logps=inputs["ref_token_logps"], beta_kl=0.04, **kw).loss
    else:
        raise ValueError(op)
    return torch.compile(fn) if impl.compiled else fn


def bench_one(op, impl: Impl, case, inputs, device, args, reference_grad) -> tuple[Record, torch.Tensor]:
    """Times one (op, impl); returns its record and the gradient of its first run (for the accuracy column)."""
    resolved = impl.peer or _backend.resolve_backend(impl.backend or args.backend, device)
    logits = inputs["logits"]
    if impl.consumes_input:
        logits = logits.clone()  # it overwrites its input; keep the shared one intact
    leaf = logits.requires_grad_(True)
    x = leaf.view_as(leaf)  # a non-leaf input, as a model's logits are (in-place backward must not hit a leaf)
    fn = loss_fn(op, inputs, impl, args.backend, args.softcap)
    rec = Record(op=op, impl=impl.name, backend=resolved, tokens=case.tokens, vocab=case.vocab,
                 shape=list(logits.shape), dtype=case.dtype_name, device=device.type,
                 device_name=device_name(device), logits_bytes=logits.numel() * logits.element_size())

    def forward():
        with torch.no_grad():
            fn(x)

    def forward_backward():
        (grad,) = torch.autograd.grad(fn(x), x)
        return grad

    first_grad = forward_backward()  # also the warm-up of compiled and autotuned code
    if reference_grad is not None:
        rec.grad_max_abs_err = max_abs_diff(first_grad, reference_grad)
    if impl.name not in ("reference", "reference_softcap"):
        first_grad = None  # only the references' gradients are kept, as the yardsticks of the others
    if not impl.inplace:  # inplace_backward does not change the forward
        rec.fwd_times_ms = time_call(forward, device, args.warmup, args.repeats)
        rec.fwd_median_ms = statistics.median(rec.fwd_times_ms)
    rec.fwd_bwd_times_ms = time_call(forward_backward, device, args.warmup, args.repeats)
    rec.fwd_bwd_median_ms = statistics.median(rec.fwd_bwd_times_ms)
    rec.fwd_bwd_spread = spread(rec.fwd_bwd_times_ms)
    rec.suspect = suspicions(rec)
    with PeakMemory(device) as mem:
        grad = forward_backward()
        del grad
    rec.peak_extra_bytes = mem.peak
    leaf.requires_grad_(False)
    return rec, first_grad



def suspicions(rec: Record) -> list[str]:
    """Why a row contradicts itself or is too noisy to read (harness.row_suspicions)."""
    return row_suspicions(rec.fwd_times_ms, rec.fwd_bwd_times_ms, rec.fwd_median_ms, rec.fwd_bwd_median_ms)


# The bandwidth before and after a case's rows may differ by this much before the case is flagged
FLOOR_DRIFT = 0.25
# How the floor's bandwidth is measured; a recorded run measured another way has no comparable x floor (--check).
# One pass over the logits in place (each line read, then written back, as the in-place kernels do), on their bytes
# (an integer op: exact, and memory-bound in every dtype, where torch's own bf16 arithmetic is not), the fastest of at
# least FLOOR_REPEATS: a floor is what the memory system can do, and a busy neighbour only slows a pass. Runs before
# 2026-12-05 timed the median copy into a second buffer, which also reads every destination line before writing it on
# x86 (write-allocate): 3 transfers counted as 2, so their floor was up to 1.5x too slow (the in-place kernels ran at
# 0.64x "the floor" on a Xeon with AVX-512). On that shared Xeon, whose 300 MiB L3 holds much of the logits, the
# floor still moves by up to ~30% within a case (the fastest pass as much as the median): the drift check flags it.
FLOOR_METHOD = "in-place byte pass, fastest of the repeats"
FLOOR_REPEATS = 10


def bandwidth_floor(inputs: dict, device, args) -> dict:
    """Memory bandwidth of an in-place pass over the logits, and the 3-pass floor (read, read, write) of a
    forward+backward over them."""
    logits = inputs["logits"]
    with torch.no_grad():
        data = logits.detach().view(torch.uint8)  # contiguous (make_inputs); x | 0 leaves every byte as it was
        times = time_call(lambda: data.bitwise_or_(0), device, max(args.warmup, 1), max(args.repeats, FLOOR_REPEATS))
    nbytes = logits.numel() * logits.element_size()
    bandwidth = 2 * nbytes / (min(times) / 1e3)  # one read and one write
    return {"method": FLOOR_METHOD, "pass_min_ms": min(times), "pass_times_ms": times,
            "bandwidth_bytes_per_s": bandwidth, "floor_fwd_bwd_ms": 3 * nbytes / bandwidth * 1e3,
            "logits_bytes": nbytes}


def print_table(case: Case, records: list[Record], floor: dict) -> None:
    ref = {(r.op, IMPL_TABLE[r.impl].softcap): r for r in records if IMPL_TABLE[r.impl].backend == "eager"
           and not IMPL_TABLE[r.impl].compiled}
    print(f"\n{case.label}  logits {floor['logits_bytes'] / 2**20:.0f} MiB, in-place bandwidth "
          f"{floor['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, 3-pass floor {floor['floor_fwd_bwd_ms']:.2f} ms")
    header = (f"{'op':<18}{'impl':<19}{'fwd ms':>10}{'fwd+bwd ms':>12}{'spread':>8}{'peak MiB':>10}"
              f"{'speedup f+b':>13}{'mem ratio':>11}{'x floor':>9}{'grad err':>10}  !")
    print(header)
    print("-" * len(header))
    for r in records:
        base = ref.get((r.op, IMPL_TABLE[r.impl].softcap))
        speed = base.fwd_bwd_median_ms / r.fwd_bwd_median_ms if base else None
        mem = (base.peak_extra_bytes / max(r.peak_extra_bytes, 1)
               if base and base.peak_extra_bytes is not None and r.peak_extra_bytes is not None else None)
        err = "" if r.grad_max_abs_err is None else f"{r.grad_max_abs_err:.1e}"
        print(f"{r.op:<18}{r.impl:<19}{fmt_ms(r.fwd_median_ms):>10}{fmt_ms(r.fwd_bwd_median_ms):>12}"
              f"{r.fwd_bwd_spread:>7.0%} {fmt_mb(r.peak_extra_bytes):>10}{'' if speed is None else f'{speed:.2f}x':>13}"
              f"{mem_ratio(mem, r.peak_extra_bytes):>11}{r.fwd_bwd_median_ms / floor['floor_fwd_bwd_ms']:>8.2f}x"
              f"{err:>10}  {'!' if r.suspect else ''}")
    for r in records:
        for why in r.suspect:
            print(f"warning: {r.op} {r.impl}: {why}; rerun on a quieter machine", file=sys.stderr)
    if floor.get("drift") is not None and floor["drift"] > FLOOR_DRIFT:
        print(f"warning: {case.label}: the in-place bandwidth moved {floor['drift']:.0%} between the start and the end "
              "of this case (the machine's speed changed under it); its ratios are unreliable", file=sys.stderr)


def print_summary(results: dict) -> None:
    """One row per (case, op): ours (the fastest and the leanest of the rlhfv impls) against the eager reference and
    against the fastest peer (torch.compile of the reference, TRL, Liger, flash-attention: whichever ran)."""
    print("\nsummary: ours vs the eager reference and the fastest peer (forward+backward; x floor: ours / the 3-pass "
          "bandwidth floor)")
    header = (f"{'case':<26}{'op':<17}{'eager ms':>9}{'ours ms':>9}{'speedup':>9}{'eager MiB':>10}{'ours MiB':>9}"
              f"{'mem ratio':>10}  {'fastest peer':<24}{'ours vs peer':>13}{'x floor':>9}")
    print(header)
    print("-" * len(header))
    for case in results["cases"]:
        label = Case(**case["case"]).label
        for op in dict.fromkeys(r["op"] for r in case["records"]):
            rows = [r for r in case["records"] if r["op"] == op and not IMPL_TABLE[r["impl"]].softcap]
            eager = next((r for r in rows if r["impl"] == "reference"), None)
            ours = [r for r in rows if IMPL_TABLE[r["impl"]].peer is None and IMPL_TABLE[r["impl"]].backend
                    != "eager"]
            peers = [r for r in rows if r not in ours and r is not eager]
            if eager is None or not ours:
                continue
            fast = min(ours, key=lambda r: r["fwd_bwd_median_ms"])
            measured = [r for r in ours if r["peak_extra_bytes"] is not None]
            lean = min(measured, key=lambda r: r["peak_extra_bytes"]) if measured else None
            peer = min(peers, key=lambda r: r["fwd_bwd_median_ms"]) if peers else None
            mem = (eager["peak_extra_bytes"] / max(lean["peak_extra_bytes"], 1)
                   if lean and eager["peak_extra_bytes"] is not None else None)
            peer_text = "" if peer is None else f"{peer['impl']} {fmt_ms(peer['fwd_bwd_median_ms']).strip()} ms"
            versus = "" if peer is None else f"{peer['fwd_bwd_median_ms'] / fast['fwd_bwd_median_ms']:.2f}x"
            lean_bytes = None if lean is None else lean["peak_extra_bytes"]
            print(f"{label:<26}{op:<17}{fmt_ms(eager['fwd_bwd_median_ms']):>9}{fmt_ms(fast['fwd_bwd_median_ms']):>9}"
                  f"{eager['fwd_bwd_median_ms'] / fast['fwd_bwd_median_ms']:>8.2f}x"
                  f"{fmt_mb(eager['peak_extra_bytes']):>10}{fmt_mb(lean_bytes):>9}{mem_ratio(mem, lean_bytes):>10}  "
                  f"{peer_text:<24}{versus:>13}{fast['fwd_bwd_median_ms'] / case['floor']['floor_fwd_bwd_ms']:>8.2f}x")


def run_ratios(results: dict) -> dict:
    """(case label, op, impl) -> the ratios of one row inside its own run: speedup over the eager reference (its
    forward+backward time / this one) and x floor (this time / the 3-pass bandwidth floor; None where the floor was
    measured another way than FLOOR_METHOD). Never absolute times: those belong to one machine, the ratios travel."""
    out = {}
    for case in results["cases"]:
        label = Case(**case["case"]).label
        eager = {r["op"]: r for r in case["records"] if r["impl"] == "reference"}
        for r in case["records"]:
            if r["impl"] != "reference" and r["op"] in eager:
                out[(label, r["op"], r["impl"])] = {
                    "speedup": eager[r["op"]]["fwd_bwd_median_ms"] / r["fwd_bwd_median_ms"],
                    "x_floor": r["fwd_bwd_median_ms"] / case["floor"]["floor_fwd_bwd_ms"]
                    if case["floor"].get("method") == FLOOR_METHOD else None,
                    "noisy": bool(r.get("suspect") or eager[r["op"]].get("suspect"))
                    or case["floor"].get("drift", 0) > FLOOR_DRIFT}
    return out


def check_against(results: dict, recorded: dict, tolerance: float) -> int:
    """--check: this run's ratios against a recorded run's (its --json); returns the number of rows worse by more than
    `tolerance` (harness.compare_ratios). A row whose case's floor drifted counts as noisy, like a flagged one."""
    return compare_ratios(run_ratios(results), run_ratios(recorded), tolerance, recorded, ("case", "op", "impl"),
                          "run the same --case, --ops and --impls")


def plot_results(results: dict, path: str) -> str | None:
    """fwd+bwd ms and peak extra MiB of every (case, op) and impl, from main()'s results (None without matplotlib)."""
    times, peaks = {}, {}
    for case in results["cases"]:
        for r in case["records"]:
            group = f"{r['op']}\n{r['tokens']}x{r['vocab']} {r['dtype']}"
            times.setdefault(group, {})[r["impl"]] = r["fwd_bwd_median_ms"]
            if r["peak_extra_bytes"] is not None:
                peaks.setdefault(group, {})[r["impl"]] = r["peak_extra_bytes"] / 2**20
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return plot_bars([("forward+backward ms", times), ("peak extra MiB", peaks)],
                     f"rlhfv benchmarks/run.py on {results['device_name']} (lower is better)", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--full", action="store_true", help="every op on every case of the device (about 30 minutes "
                        "on 2 CPU cores) instead of the headline ones")
    parser.add_argument("--case", action="append", help="NxV:dtype, repeatable (default: the device's headline cases, "
                        "or all with --full)")
    parser.add_argument("--ops", help=f"comma-separated subset of {OPS} (default: the headline ops, or all with "
                        "--full)")
    parser.add_argument("--impls", help=f"comma-separated subset of {IMPLS} (default: CPU "
                        f"{','.join(DEFAULT_IMPLS['cpu'])}; CUDA: {','.join(DEFAULT_IMPLS['cuda'])}, "
                        "peers where installed)")
    parser.add_argument("--backend", choices=_backend.FUSED_BACKENDS, help="backend of the fused impls (default: the "
                        "library's choice for the device)")
    parser.add_argument("--softcap", type=float, metavar="C", help="also run the reference and the fused default "
                        "with the soft cap C (Gemma 2/3: 30), to see what it costs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats: checks the script runs")
    parser.add_argument("--json", metavar="PATH", help="write all records and versions here")
    parser.add_argument("--plot", metavar="PNG", help=f"where to draw fwd+bwd time and peak extra memory per op and "
                        f"impl (default: {DEFAULT_PLOT})")
    parser.add_argument("--no-plot", action="store_true", help="no plot")
    parser.add_argument("--no-progress", action="store_true")
    add_check_arguments(parser, "speedup over eager, x floor")
    args = parser.parse_args(argv)
    recorded = read_recorded(parser, args)

    device = pick_device(args.device)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
    headline = HEADLINE[device.type]
    default_cases = QUICK_CASES if args.quick else FULL_CASES[device.type] if args.full else headline["cases"]
    cases = [Case.parse(c) for c in (args.case or default_cases)]
    ops = [o for o in args.ops.split(",") if o] if args.ops else list(OPS if args.full or args.quick
                                                                         else headline["ops"])
    impls = [i for i in (args.impls.split(",") if args.impls else DEFAULT_IMPLS[device.type]) if i]
    if args.softcap is not None:
        if not args.softcap > 0:
            parser.error(f"--softcap must be > 0, got {args.softcap}")
        impls += [i for i in SOFTCAP_IMPLS if i not in impls]
    elif any(IMPL_TABLE[i].softcap for i in impls if i in IMPL_TABLE):
        parser.error(f"{', '.join(SOFTCAP_IMPLS)} need --softcap C")
    for name, chosen, allowed in (("--ops", ops, OPS), ("--impls", impls, IMPLS)):
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {allowed}")
    # The references run first so ratios and gradient errors can be printed.
    impls = sorted(impls, key=lambda i: i not in ("reference", "reference_softcap"))
    skipped = {}
    for name in list(impls):
        reason = impl_unavailable(IMPL_TABLE[name], device, args.backend)
        if reason is not None:
            skipped[name] = reason
            impls.remove(name)
            print(f"skipping {name}: {reason}", file=sys.stderr)

    info = versions()
    print(f"rlhfv benchmark on {device_name(device)}; torch {info['torch']}, triton {info['triton']}, "
          f"{args.repeats} repeats after {args.warmup} warm-up")
    if device.type == "cpu" and not rk.extension_available():
        print("warning: the compiled extension is not built; 'fused' runs the reference", file=sys.stderr)
    load_before = machine_load()
    warn_if_busy(load_before)
    results = {"versions": info, "device": device.type, "device_name": device_name(device), "skipped": skipped,
               "softcap": args.softcap, "load": {"before": load_before}, "cases": []}
    runs = [(op, IMPL_TABLE[name]) for op in ops for name in impls if op in IMPL_TABLE[name].ops]
    total = len(cases) * len(runs)
    bar = tqdm(total=total, desc="benchmark", disable=args.no_progress or tqdm is None, file=sys.stderr) \
        if tqdm is not None else None
    for case in cases:
        inputs = make_inputs(case, device)
        floor = bandwidth_floor(inputs, device, args)
        records, reference_grads = [], {}
        for op, impl in runs:
            if bar is not None:
                bar.set_postfix_str(f"{case.label} {op} {impl.name}")
            record, grad = bench_one(op, impl, case, inputs, device, args, reference_grads.get((op, impl.softcap)))
            records.append(record)
            if grad is not None:
                reference_grads[(op, impl.softcap)] = grad
            if bar is not None:
                bar.update()
        del reference_grads
        after = bandwidth_floor(inputs, device, args)
        floor["bandwidth_after_bytes_per_s"] = after["bandwidth_bytes_per_s"]
        floor["drift"] = abs(after["bandwidth_bytes_per_s"] / floor["bandwidth_bytes_per_s"] - 1)
        if bar is not None:
            bar.clear()
        print_table(case, records, floor)
        results["cases"].append({"case": asdict(case), "floor": floor, "records": [asdict(r) for r in records]})
        del inputs
    if bar is not None:
        bar.close()
    print("\nspeedup f+b: reference forward+backward time / this one; mem ratio: reference peak extra memory / this "
          "one; x floor: forward+backward time / (3 passes over the logits at the bandwidth of an in-place pass); grad "
          "err: max |dlogits - reference dlogits| (the reference rounds too: compare orders of magnitude)"
          + ("; *_softcap rows: with the soft cap, against reference_softcap" if args.softcap is not None else ""))
    if args.quick:
        print("--quick: tiny sizes where launch and Python overheads dominate; the ratios above are noise, this run "
              "only checks that the script works")
    for name, reason in skipped.items():
        print(f"not run: {name}: {reason}")
    results["load"]["after"] = load_after = machine_load()
    results["suspect_rows"] = sum(bool(r["suspect"]) for case in results["cases"] for r in case["records"])
    results["drifting_cases"] = sum(case["floor"]["drift"] > FLOOR_DRIFT for case in results["cases"])
    print_load(load_before, load_after, results["suspect_rows"], results["drifting_cases"])
    print_summary(results)
    if not args.no_plot:
        plot = plot_results(results, args.plot or DEFAULT_PLOT)
        print(f"wrote {plot}" if plot else "no plot: matplotlib is not installed")
    if args.json:
        write_json(args.json, results)
    if recorded is not None:
        return 1 if check_against(results, recorded, args.check_tolerance) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
