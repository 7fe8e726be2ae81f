"""A LoRA adapter on the lm_head, on the fused-linear route: the kernels' low-rank term (what
rlhfv_train.models.adapter.head_call does: x @ W.T + u @ B.T with u = s*A(dropout(x)), rank-r products inside the
fused pass, the frozen W's gradient never formed) vs the product widened by the rank ([x, u] @ [W, B].T: a [V, H + r]
copy and its fp32 gradient) vs the adapter merged into a fresh weight each step (W + s*B@A, exact only without
dropout), beside the same pass without an adapter (the head frozen) and the logits route (the model's own logits,
base + adapter, scored in place). One DDPO loss forward + backward, side by side in one run (time and peak extra
memory).

    python benchmarks/lora_head.py                          # V = 32000, H = 256, r = 16, 8 pairs of 64 tokens
    python benchmarks/lora_head.py --vocab 151936 --hidden 512 --json out.json
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
from benchmarks.harness import (device_name, machine_load, pick_device, print_load, spread,  # noqa: E402
                                time_and_peak, versions, warn_if_busy, write_json)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence (the last half is the answer)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    rows, T, H, V, r = 2 * args.pairs, args.tokens, args.hidden, args.vocab, args.rank
    scaling = 2.0
    x = (torch.randn(rows, T, H, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    W = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype)  # frozen base
    A = (torch.randn(r, H, generator=g) / H ** 0.5).to(device, dtype).requires_grad_(True)
    B = (torch.randn(V, r, generator=g) * 0.01).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, V, (rows, T), generator=g).to(device)
    labels[:, :T // 2] = -100
    ref = torch.full((rows,), -20.0, device=device)

    def low_rank_term():
        u = F.linear(x, A) * scaling
        return rk.linear_ddpo_loss(x, W, labels, ref, mode="mean", low_rank=(u, B)).loss

    def widened():
        u = F.linear(x, A) * scaling
        return rk.linear_ddpo_loss(torch.cat([x, u], -1), torch.cat([W, B], 1), labels, ref, mode="mean").loss

    def merged():
        return rk.linear_ddpo_loss(x, W + scaling * (B @ A), labels, ref, mode="mean").loss

    def frozen_head():
        return rk.linear_ddpo_loss(x, W, labels, ref, mode="mean").loss

    def logits_route():
        logits = F.linear(x, W) + F.linear(F.linear(x, A), B) * scaling
        return rk.ddpo_loss(logits, labels, ref, mode="mean", inplace_backward=True).loss

    impls = {"low-rank term (ours)": low_rank_term, "widened weight": widened, "merged weight": merged,
             "no adapter (frozen head)": frozen_head, "logits route": logits_route}
    losses = {}
    print(f"LoRA on the lm_head, {device_name(device)}: {rows} x {T} tokens ({rows * T // 2} scored), V={V}, H={H}, "
          f"r={r}, {dtype}")
    load_before = machine_load()
    warn_if_busy(load_before)
    results = []
    for name, fn in impls.items():
        def step():
            loss = fn()
            loss.backward()
            losses[name] = float(loss.detach())
            for t in (x, A, B):
                t.grad = None

        times, peak = time_and_peak(step, device, args.repeats)
        results.append({"impl": name, "median_ms": statistics.median(times), "times_ms": times,
                        "peak_extra_bytes": peak, "loss": losses[name]})
    base = results[0]
    print(f"{'impl':<26}{'fwd+bwd ms':>11}{'spread':>8}{'peak MiB':>10}{'time':>8}{'memory':>8}  loss")
    for row in results:
        print(f"{row['impl']:<26}{row['median_ms']:>11.1f}{spread(row['times_ms']):>7.0%} "
              f"{row['peak_extra_bytes'] / 2**20:>10.1f}{row['median_ms'] / base['median_ms']:>7.2f}x"
              f"{row['peak_extra_bytes'] / max(base['peak_extra_bytes'], 1):>7.2f}x  {row['loss']:.6f}")
    print_load(load_before, machine_load(), 0)
    if args.json:
        write_json(args.json, {"versions": versions(), "device_name": device_name(device), "vocab": V, "hidden": H,
                               "rank": r, "rows": rows, "tokens": T, "dtype": str(dtype), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
