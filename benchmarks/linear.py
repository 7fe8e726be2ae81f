"""The fused-linear path vs the eager reference (hidden @ W.T, then fp32 log_softmax) and peers, in one run.

    python benchmarks/linear.py                                   # N=4096, H=1024, V=32000 fp32 on CPU
    python benchmarks/linear.py --case 16384x4096x128256:bfloat16 --json out.json      # a GPU session

Times forward and forward+backward (gradients for hidden and weight) of linear_token_logprobs and linear_ddpo_loss,
and the peak extra memory of one forward+backward, for the reference, the fused path and, on CUDA where installed,
Liger-Kernel (LigerFusedLinearCrossEntropyLoss for log-probs, LigerFusedLinearDPOLoss for the DPO loss: plain DPO on
average log-probs, not token-weighted) and Apple's cut-cross-entropy (linear_cross_entropy, reduction none, turned into
the same DDPO loss). The floor is the bare GEMMs of the step: forward logits, their recompute, dHidden and dWeight.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "6")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlhfv_kernels as rk  # noqa: E402
from benchmarks.run import PeakMemory, device_name, max_abs_diff, pick_device, time_call, versions  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_case(text):
    try:
        size, dtype = text.split(":")
        tokens, hdim, vocab = (int(v) for v in size.lower().split("x"))
        return tokens, hdim, vocab, DTYPES[dtype]
    except (ValueError, KeyError):
        raise SystemExit(f"--case must look like 4096x1024x32000:float32, got {text!r}") from None


def peer_fn(op, impl, labels, ref, weights):
    """A peer's (hidden, weight) -> loss, or raise ImportError when it is not installed."""
    from rlhfv_kernels import losses
    flat = labels.reshape(-1)
    mask = labels != -100
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        ce = LigerFusedLinearCrossEntropyLoss(reduction="none")
        dpo = LigerFusedLinearDPOLoss(beta=0.5, compute_nll_loss=False, use_ref_model=False)

        def liger(h, w):
            if op == "linear_token_logprobs":
                out = ce(w, h.reshape(-1, h.shape[-1]), flat)
                return -(out[0] if isinstance(out, tuple) else out).sum()
            out = dpo(w, h, labels)
            return out[0] if isinstance(out, tuple) else out
        return liger
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w):
            logps = -linear_cross_entropy(h, w, labels, reduction="none").float()
            if op == "linear_token_logprobs":
                return logps.sum()
            return losses.ddpo_from_token_logps(logps, mask, weights * mask, ref, beta=0.5, mode="mean",
                                                reward_margin=None, drs_weight=0.0, drs_k=1.0, sft_weight=0.0).loss
        return cce
    raise ValueError(impl)


def gemm_floor(hidden, weight, device, args) -> float:
    """ms of the bare GEMMs a fused-linear step cannot avoid: logits (twice: forward and recompute), dH, dW."""
    h = hidden.reshape(-1, hidden.shape[-1])
    dlogits = torch.randn(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device)
    t_logits = statistics.median(time_call(lambda: h @ weight.t(), device, args.warmup, args.repeats))
    t_dh = statistics.median(time_call(lambda: dlogits @ weight, device, args.warmup, args.repeats))
    t_dw = statistics.median(time_call(lambda: dlogits.t() @ h, device, args.warmup, args.repeats))
    del dlogits
    return 2 * t_logits + t_dh + t_dw


def make_fn(op, impl, labels, ref, weights, chunk_size):
    if impl in ("liger", "cce"):
        return peer_fn(op, impl, labels, ref, weights)
    if impl == "reference":
        def logps_loss(h, w):
            logits = F.linear(h, w)
            if op == "linear_token_logprobs":
                return rk.reference.token_logprobs(logits, labels).sum()
            return rk.reference.ddpo_loss(logits, labels, ref, token_weights=weights, beta=0.5).loss
        return logps_loss

    def fused(h, w):
        if op == "linear_token_logprobs":
            return rk.linear_token_logprobs(h, w, labels, chunk_size=chunk_size).sum()
        return rk.linear_ddpo_loss(h, w, labels, ref, token_weights=weights, beta=0.5, chunk_size=chunk_size).loss
    return fused


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="NxHxV:dtype (default 4096x1024x32000:float32)")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk of the fused path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--no-floor", action="store_true", help="skip timing the bare GEMMs")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    records = []
    print(f"fused-linear benchmark on {device_name(device)}, torch {torch.__version__} (x floor: fwd+bwd time / the "
          "bare GEMMs)")
    for text in args.case or ["4096x1024x32000:float32"]:
        tokens, hdim, vocab, dtype = parse_case(text)
        gen = torch.Generator().manual_seed(0)
        rows = max(2, tokens // 512) // 2 * 2
        seq = tokens // rows
        hidden = torch.randn(rows, seq, hdim, generator=gen).to(dtype).to(device)
        weight = (torch.randn(vocab, hdim, generator=gen) / hdim ** 0.5 * 4).to(dtype).to(device)
        labels = torch.randint(0, vocab, (rows, seq), generator=gen).to(device)
        weights = torch.where(torch.rand(rows, seq, generator=gen) < 0.2, 5.0, 1.0).to(device)
        with torch.no_grad():
            ref = rk.linear_sequence_logps(hidden, weight, labels, weights, mode="mean") + 0.05
        floor = None if args.no_floor else gemm_floor(hidden, weight, device, args)
        print(f"\nN={tokens} H={hdim} V={vocab} {text.split(':')[1]}: logits would be "
              f"{tokens * vocab * 4 / 2**20:.0f} MiB in fp32; bare-GEMM floor "
              f"{'-' if floor is None else f'{floor:.1f} ms'}")
        print(f"{'op':<24}{'impl':<11}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>10}{'speedup':>9}{'mem ratio':>11}"
              f"{'x floor':>9}{'dW err':>10}")
        for op in ("linear_token_logprobs", "linear_ddpo_loss"):
            base, base_grad = None, None
            impls = ("reference", "fused") + (("liger", "cce") if device.type == "cuda" else ())
            for impl in impls:
                try:
                    fn = make_fn(op, impl, labels, ref, weights, args.chunk_size)
                except ImportError as exc:
                    print(f"{op:<24}{impl:<11}not run: {exc}")
                    records.append({"op": op, "impl": impl, "skipped": str(exc)})
                    continue
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
                    print(f"{op:<24}{impl:<11}failed: {type(exc).__name__}: {exc}")
                    records.append({"op": op, "impl": impl, "skipped": f"{type(exc).__name__}: {exc}"})
                    continue
                fwd = time_call(forward, device, args.warmup, args.repeats)
                fwd_bwd = time_call(forward_backward, device, args.warmup, args.repeats)
                with PeakMemory(device) as mem:
                    forward_backward()
                rec = {"op": op, "impl": impl, "tokens": tokens, "hidden": hdim, "vocab": vocab,
                       "dtype": str(dtype), "device": device_name(device), "fwd_median_ms": statistics.median(fwd),
                       "fwd_bwd_median_ms": statistics.median(fwd_bwd), "peak_extra_bytes": mem.peak,
                       "fwd_times_ms": fwd, "fwd_bwd_times_ms": fwd_bwd, "gemm_floor_ms": floor}
                if base is None:
                    base, base_grad = rec, grads[1]
                else:
                    rec["dweight_max_abs_err"] = max_abs_diff(grads[1], base_grad)
                records.append(rec)
                err = rec.get("dweight_max_abs_err")
                x_floor = "" if floor is None else f"{rec['fwd_bwd_median_ms'] / floor:.2f}x"
                print(f"{op:<24}{impl:<11}{rec['fwd_median_ms']:>10.1f}{rec['fwd_bwd_median_ms']:>12.1f}"
                      f"{mem.peak / 2**20:>10.1f}{base['fwd_bwd_median_ms'] / rec['fwd_bwd_median_ms']:>8.2f}x"
                      f"{base['peak_extra_bytes'] / max(rec['peak_extra_bytes'], 1):>10.2f}x"
                      f"{x_floor:>9}"
                      f"{'' if err is None else f'{err:.1e}':>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions(), "records": records}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
