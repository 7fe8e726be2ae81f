"""The fused-linear path vs the eager reference (hidden @ W.T, then fp32 log_softmax), side by side in one run.

    python benchmarks/linear.py                                   # N=4096, H=1024, V=32000 fp32 on CPU
    python benchmarks/linear.py --case 8192x4096x128256:bfloat16 --json out.json

Times forward and forward+backward (gradients for hidden and weight) of linear_token_logprobs and linear_ddpo_loss,
and the peak extra memory of one forward+backward, for the reference and the fused path.
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


def make_fn(op, impl, labels, ref, weights, chunk_size):
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
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    records = []
    print(f"fused-linear benchmark on {device_name(device)}, torch {torch.__version__}")
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
        print(f"\nN={tokens} H={hdim} V={vocab} {text.split(':')[1]}: logits would be "
              f"{tokens * vocab * 4 / 2**20:.0f} MiB in fp32")
        print(f"{'op':<24}{'impl':<11}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>10}{'speedup':>9}{'mem ratio':>11}"
              f"{'dW err':>10}")
        for op in ("linear_token_logprobs", "linear_ddpo_loss"):
            base, base_grad = None, None
            for impl in ("reference", "fused"):
                fn = make_fn(op, impl, labels, ref, weights, args.chunk_size)
                h = hidden.clone().requires_grad_(True)
                w = weight.clone().requires_grad_(True)

                def forward():
                    with torch.no_grad():
                        fn(h, w)

                def forward_backward():
                    return torch.autograd.grad(fn(h, w), (h, w))

                grads = forward_backward()
                fwd = time_call(forward, device, args.warmup, args.repeats)
                fwd_bwd = time_call(forward_backward, device, args.warmup, args.repeats)
                with PeakMemory(device) as mem:
                    forward_backward()
                rec = {"op": op, "impl": impl, "tokens": tokens, "hidden": hdim, "vocab": vocab,
                       "dtype": str(dtype), "device": device_name(device), "fwd_median_ms": statistics.median(fwd),
                       "fwd_bwd_median_ms": statistics.median(fwd_bwd), "peak_extra_bytes": mem.peak,
                       "fwd_times_ms": fwd, "fwd_bwd_times_ms": fwd_bwd}
                if base is None:
                    base, base_grad = rec, grads[1]
                else:
                    rec["dweight_max_abs_err"] = max_abs_diff(grads[1], base_grad)
                records.append(rec)
                err = rec.get("dweight_max_abs_err")
                print(f"{op:<24}{impl:<11}{rec['fwd_median_ms']:>10.1f}{rec['fwd_bwd_median_ms']:>12.1f}"
                      f"{mem.peak / 2**20:>10.1f}{base['fwd_bwd_median_ms'] / rec['fwd_bwd_median_ms']:>8.2f}x"
                      f"{base['peak_extra_bytes'] / max(rec['peak_extra_bytes'], 1):>10.2f}x"
                      f"{'' if err is None else f'{err:.1e}':>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions(), "records": records}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
