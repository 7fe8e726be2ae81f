"""The fused-linear path vs the eager reference (hidden @ W.T, then fp32 log_softmax) and peers, in one run.

    python benchmarks/linear.py                                   # N=4096, H=1024, V=32000 fp32 on CPU
    python benchmarks/linear.py --ignored 0.5                     # half the tokens are prompt / image (label -100)
    python benchmarks/linear.py --case 16384x4096x128256:bfloat16 --json out.json      # a GPU session

Times forward and forward+backward (gradients for hidden and weight) and the peak extra memory of one
forward+backward, for: linear_token_logprobs (summed; its backward recomputes the logits), linear_dpo_loss,
linear_ddpo_loss (token-weighted, mean mode) and linear_grpo_loss (their gradients are computed in the forward).
Contestants: the eager reference, rlhfv's fused path, and where installed Liger-Kernel (LigerFusedLinearDPOLoss
for linear_dpo_loss, the same sigmoid loss on summed log-probs, CPU and CUDA; LigerFusedLinearCrossEntropyLoss for
the log-probs, CUDA) and Apple's cut-cross-entropy (CUDA; its per-token log-probs fed to our DDPO math).

The floor is the bare GEMMs of the step, timed on the full N in the same run: logits, dHidden and dWeight (3 GEMMs)
for the losses; one more logits GEMM for linear_token_logprobs, whose coefficient is only known in backward.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "6")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlhfv_kernels as rk  # noqa: E402
from benchmarks.harness import (PeakMemory, add_check_arguments, compare_ratios, device_name,  # noqa: E402
                                machine_load, max_abs_diff, pick_device, plot_bars, print_load, read_recorded,
                                row_suspicions, spread, time_call, versions, warn_if_busy, write_json)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPS = ("linear_token_logprobs", "linear_dpo_loss", "linear_ddpo_loss", "linear_grpo_loss")
BETA = 0.5
# linear_dpo_loss is compared with Liger's DPO, which takes no precomputed reference scores (use_ref_model=False:
# they are 0), so ours gets 0 too; beta is small enough that sigmoid(beta z) is not saturated on these random rows.
DPO_BETA = 0.01
# Which peer runs which op, and where: Liger's chunked DPO is plain torch (runs on CPU); the rest need a GPU.
PEERS = {("liger", "linear_dpo_loss"): ("cpu", "cuda"), ("liger", "linear_token_logprobs"): ("cuda",),
         ("cce", "linear_token_logprobs"): ("cuda",), ("cce", "linear_ddpo_loss"): ("cuda",)}


def parse_case(text):
    try:
        size, dtype = text.split(":")
        tokens, hdim, vocab = (int(v) for v in size.lower().split("x"))
        return tokens, hdim, vocab, DTYPES[dtype]
    except (ValueError, KeyError):
        raise SystemExit(f"--case must look like 4096x1024x32000:float32, got {text!r}") from None


def peer_fn(op, impl, inputs):
    """A peer's (hidden, weight) -> loss, or raise ImportError when it is not installed."""
    from rlhfv_kernels import losses
    labels = inputs["labels"]
    mask = labels != -100
    if impl == "liger" and op == "linear_dpo_loss":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        dpo = LigerFusedLinearDPOLoss(beta=DPO_BETA, compute_nll_loss=False, use_ref_model=False)

        def liger_dpo(h, w):
            out = dpo(w, h, labels)
            return out[0] if isinstance(out, tuple) else out
        return liger_dpo
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        ce = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def liger_ce(h, w):
            out = ce(w, h.reshape(-1, h.shape[-1]), labels.reshape(-1))
            return -(out[0] if isinstance(out, tuple) else out).sum()
        return liger_ce
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w):
            logps = -linear_cross_entropy(h, w, labels, reduction="none").float()
            if op == "linear_token_logprobs":
                return logps.sum()
            return losses.ddpo_from_token_logps(logps, mask, inputs["weights"] * mask, inputs["ref"], beta=BETA,
                                                mode="mean", reward_margin=None, drs_weight=0.0, drs_k=1.0,
                                                sft_weight=0.0).loss
        return cce
    raise ValueError(impl)


def gemm_times(hidden, weight, device, args) -> dict:
    """ms of each bare GEMM a fused-linear step cannot avoid, on all N tokens: logits, dHidden, dWeight."""
    h = hidden.reshape(-1, hidden.shape[-1])
    dlogits = torch.randn(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device)
    times = {"logits": lambda: h @ weight.t(), "dhidden": lambda: dlogits @ weight, "dweight": lambda: dlogits.t() @ h}
    out = {name: statistics.median(time_call(fn, device, args.warmup, args.repeats)) for name, fn in times.items()}
    del dlogits
    return out


def floor_of(op, gemms):
    """The GEMM floor of `op`: 3 GEMMs, plus the logits' recompute for linear_token_logprobs."""
    floor = gemms["logits"] + gemms["dhidden"] + gemms["dweight"]
    return floor + gemms["logits"] if op == "linear_token_logprobs" else floor


def make_fn(op, impl, inputs, chunk_size):
    if impl not in ("reference", "fused"):
        return peer_fn(op, impl, inputs)
    labels, ref, weights, adv = inputs["labels"], inputs["ref"], inputs["weights"], inputs["advantages"]
    if impl == "reference":
        api, extra = rk.reference, lambda h, w: (F.linear(h, w),)
    else:
        api, extra = None, lambda h, w: (h, w)

    def call(name, h, w, *args, **kwargs):
        if api is None:
            return getattr(rk, name)(h, w, *args, chunk_size=chunk_size, **kwargs)
        return getattr(api, name[len("linear_"):])(*extra(h, w), *args, **kwargs)

    def fn(h, w):
        if op == "linear_token_logprobs":
            return call(op, h, w, labels).sum()
        if op == "linear_dpo_loss":
            return call(op, h, w, labels, inputs["zero_ref"], beta=DPO_BETA).loss
        if op == "linear_ddpo_loss":
            return call(op, h, w, labels, ref, token_weights=weights, beta=BETA).loss
        return call(op, h, w, labels, adv, old_logps=inputs["old_logps"]).loss
    return fn


def make_inputs(tokens, hdim, vocab, dtype, ignored, device):
    """Rows of 512 tokens (pairs for the DPO losses); the first `ignored` fraction of each row is prompt (-100)."""
    gen = torch.Generator().manual_seed(0)
    rows = max(2, tokens // 512) // 2 * 2
    seq = tokens // rows
    hidden = torch.randn(rows, seq, hdim, generator=gen).to(dtype).to(device)
    weight = (torch.randn(vocab, hdim, generator=gen) / hdim ** 0.5 * 4).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels[:, :int(ignored * seq)] = -100
    labels = labels.to(device)
    weights = torch.where(torch.rand(rows, seq, generator=gen) < 0.2, 5.0, 1.0).to(device)
    with torch.no_grad():
        token_logps = rk.linear_token_logprobs(hidden, weight, labels)
    # Reference scores near the policy's own: the losses are not saturated, every token has a gradient.
    return {"hidden": hidden, "weight": weight, "labels": labels, "weights": weights,
            "ref": rk.losses.sequence_scores(token_logps, weights * (labels != -100), "mean") + 0.05,
            "zero_ref": torch.zeros(rows, device=device),
            "advantages": torch.randn(rows, generator=gen).to(device),
            "old_logps": token_logps + 0.01 * torch.randn(rows, seq, generator=gen).to(device)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="NxHxV:dtype (default 4096x1024x32000:float32)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    parser.add_argument("--impls", default="reference,fused,liger,cce",
                        help="comma-separated subset of reference, fused, liger, cce (peers run where installed)")
    parser.add_argument("--ignored", type=float, default=0.0,
                        help="fraction of each row that is prompt/image (label -100), as in a VLM batch")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk of the fused path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", metavar="PNG", help="also draw fwd+bwd time and peak extra memory per op and impl")
    parser.add_argument("--no-floor", action="store_true", help="skip timing the bare GEMMs")
    add_check_arguments(parser, "speedup over the reference, x floor")
    args = parser.parse_args(argv)
    recorded = read_recorded(parser, args)
    if not 0.0 <= args.ignored < 1.0:
        raise SystemExit(f"--ignored must be in [0, 1), got {args.ignored}")
    ops = [o for o in args.ops.split(",") if o]
    impls = [i for i in args.impls.split(",") if i]
    for name, chosen, allowed in (("--ops", ops, OPS), ("--impls", impls, ("reference", "fused", "liger", "cce"))):
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            raise SystemExit(f"{name}: unknown {unknown}; choose from {list(allowed)}")
    device = pick_device(args.device)
    records = []
    print(f"fused-linear benchmark on {device_name(device)}, torch {torch.__version__}; x floor: fwd+bwd time / the "
          "bare GEMMs of the op on all N tokens (3 for the losses, 4 for linear_token_logprobs)")
    load_before = machine_load()
    warn_if_busy(load_before)
    for text in args.case or ["4096x1024x32000:float32"]:
        tokens, hdim, vocab, dtype = parse_case(text)
        inputs = make_inputs(tokens, hdim, vocab, dtype, args.ignored, device)
        gemms = None if args.no_floor else gemm_times(inputs["hidden"], inputs["weight"], device, args)
        print(f"\nN={tokens} H={hdim} V={vocab} {text.split(':')[1]}, {args.ignored:.0%} of tokens ignored: logits "
              f"would be {tokens * vocab * 4 / 2**20:.0f} MiB in fp32; bare GEMMs (ms) "
              f"{'-' if gemms is None else ', '.join(f'{k} {v:.1f}' for k, v in gemms.items())}")
        print(f"{'op':<24}{'impl':<11}{'fwd ms':>10}{'fwd+bwd ms':>12}{'spread':>8}{'peak MiB':>10}{'speedup':>9}"
              f"{'mem ratio':>11}{'x floor':>9}{'dW err':>10}  !")
        for op in ops:
            base, base_grad = None, None
            for impl in impls:
                if impl not in ("reference", "fused") and device.type not in PEERS.get((impl, op), ()):
                    continue
                rec = bench(op, impl, inputs, device, args, gemms)
                records.append(rec)
                if "skipped" in rec:
                    print(f"{op:<24}{impl:<11}{rec['skipped']}")
                    continue
                grads = rec.pop("grads")
                if base is None:
                    base, base_grad = rec, grads[1]
                else:
                    rec["dweight_max_abs_err"] = max_abs_diff(grads[1], base_grad)
                err = rec.get("dweight_max_abs_err")
                x_floor = "" if gemms is None else f"{rec['fwd_bwd_median_ms'] / rec['gemm_floor_ms']:.2f}x"
                print(f"{op:<24}{impl:<11}{rec['fwd_median_ms']:>10.1f}{rec['fwd_bwd_median_ms']:>12.1f}"
                      f"{spread(rec['fwd_bwd_times_ms']):>7.0%} {rec['peak_extra_bytes'] / 2**20:>10.1f}"
                      f"{base['fwd_bwd_median_ms'] / rec['fwd_bwd_median_ms']:>8.2f}x"
                      f"{base['peak_extra_bytes'] / max(rec['peak_extra_bytes'], 1):>10.2f}x"
                      f"{x_floor:>9}{'' if err is None else f'{err:.1e}':>10}  {'!' if rec['suspect'] else ''}")
                for why in rec["suspect"]:
                    print(f"warning: {op} {impl}: {why}; rerun on a quieter machine", file=sys.stderr)
    print("\nx floor below 1: the fused losses skip ignored tokens, while the floor's GEMMs span all N (or, near 1, "
          "timing noise: the floor is measured separately)")
    if args.plot:
        times, peaks = {}, {}
        for rec in records:
            if "skipped" not in rec:
                group = f"{rec['op'].removeprefix('linear_')}\n{rec['tokens']}x{rec['hidden']}x{rec['vocab']}"
                times.setdefault(group, {})[rec["impl"]] = rec["fwd_bwd_median_ms"]
                peaks.setdefault(group, {})[rec["impl"]] = rec["peak_extra_bytes"] / 2**20
        print("wrote", plot_bars([("forward+backward ms", times), ("peak extra MiB", peaks)],
                                 f"rlhfv benchmarks/linear.py on {device_name(device)}, {args.ignored:.0%} ignored "
                                 "(lower is better)", args.plot))
    load_after = machine_load()
    print_load(load_before, load_after, sum(bool(r.get("suspect")) for r in records))
    results = {"versions": versions(), "device_name": device_name(device), "ignored_fraction": args.ignored,
               "load": {"before": load_before, "after": load_after}, "records": records}
    if args.json:
        write_json(args.json, results)
    if recorded is not None:
        return 1 if check_against(results, recorded, args.check_tolerance) else 0
    return 0


def run_ratios(results: dict) -> dict:
    """(case, op, impl) -> speedup over the reference's fwd+bwd and x floor (None without the GEMM floor) of each
    measured row of a run (its --json); noisy where this row or the reference's was flagged."""
    out = {}
    rows = [r for r in results["records"] if "skipped" not in r]
    case = lambda r: f"{r['tokens']}x{r['hidden']}x{r['vocab']}:{r['dtype'].removeprefix('torch.')}"
    eager = {(case(r), r["op"]): r for r in rows if r["impl"] == "reference"}
    for r in rows:
        base = eager.get((case(r), r["op"]))
        if r["impl"] != "reference" and base is not None:
            out[(case(r), r["op"], r["impl"])] = {
                "speedup": base["fwd_bwd_median_ms"] / r["fwd_bwd_median_ms"],
                "x_floor": None if r.get("gemm_floor_ms") is None else r["fwd_bwd_median_ms"] / r["gemm_floor_ms"],
                "noisy": bool(r.get("suspect") or base.get("suspect"))}
    return out


def check_against(results: dict, recorded: dict, tolerance: float) -> int:
    """--check: this run's ratios against a recorded run's; the number of rows worse by more than `tolerance`."""
    return compare_ratios(run_ratios(results), run_ratios(recorded), tolerance, recorded, ("case", "op", "impl"),
                          "run the same --case, --ops, --impls and --ignored")


def bench(op, impl, inputs, device, args, gemms) -> dict:
    """Times one (op, impl): a record with the first run's gradients under "grads", or with "skipped"."""
    hidden, weight = inputs["hidden"], inputs["weight"]
    rec = {"op": op, "impl": impl, "tokens": hidden.shape[0] * hidden.shape[1], "hidden": hidden.shape[-1],
           "vocab": weight.shape[0], "dtype": str(hidden.dtype), "device": device_name(device),
           "ignored_fraction": args.ignored}
    try:
        fn = make_fn(op, impl, inputs, args.chunk_size)
    except ImportError as exc:
        return {**rec, "skipped": f"not run: {exc}"}
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            fn(h, w)

    def forward_backward():
        return torch.autograd.grad(fn(h, w), (h, w))

    try:
        grads = forward_backward()
    except Exception as exc:  # a peer whose API moved: report it, keep measuring the others
        if impl in ("reference", "fused"):
            raise
        return {**rec, "skipped": f"failed: {type(exc).__name__}: {exc}"}
    fwd = time_call(forward, device, args.warmup, args.repeats)
    fwd_bwd = time_call(forward_backward, device, args.warmup, args.repeats)
    with PeakMemory(device) as mem:
        forward_backward()
    suspect = row_suspicions(fwd, fwd_bwd)
    return {**rec, "fwd_median_ms": statistics.median(fwd), "fwd_bwd_median_ms": statistics.median(fwd_bwd),
            "peak_extra_bytes": mem.peak, "fwd_times_ms": fwd, "fwd_bwd_times_ms": fwd_bwd, "suspect": suspect,
            "gemm_ms": gemms, "gemm_floor_ms": None if gemms is None else floor_of(op, gemms), "grads": grads}


if __name__ == "__main__":
    sys.exit(main())
