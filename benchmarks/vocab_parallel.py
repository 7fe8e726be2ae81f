"""A tensor-parallel lm_head under torchrun: one DDPO loss forward + backward per process through three routes, with
each process's peak extra memory, step time and collectives (count and bytes, against the theory), side by side in
one launch.

    python benchmarks/vocab_parallel.py                      # 2 CPU processes (gloo), V = 151936, 512 tokens
    python benchmarks/vocab_parallel.py --nproc 4 --tokens 2048 --json out.json
    python benchmarks/vocab_parallel.py --device cuda --nproc 8

Routes (the head is torch's ColwiseParallel over all processes; every process holds the same tokens):
- gathered logits: ColwiseParallel(output_layouts=Replicate()), what transformers' tp_plan "colwise_gather_output"
  does: the logits all-gathered whole on every process, then the fused loss on them (in place).
- vocab-parallel logits: ColwiseParallel(use_local_output=False), the fused loss on the DTensor logits sharded over
  the vocabulary (in place): each process holds N x V / world logits, one all-gather of 2 float64 per token (3 with
  the entropy).
- vocab-parallel fused-linear: rk.linear_ddpo_loss(hidden, head.weight) on the weight sharded over its rows: no
  logits beyond a chunk; the backward all-reduces d hidden (N x H).
Memory: torch's allocations above the level before the step (benchmarks/harness.PeakMemory), the largest over the
processes; time: the median step over --repeats, the slowest process's. Collectives: every c10d operator the step
runs (a TorchDispatchMode), bytes of the tensor each process contributes.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "6")
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import (add_torchrun_arguments, device_name, launch_under_torchrun,  # noqa: E402
                                print_load, rows_per_route, time_and_peak, versions, write_from_rank0, write_json)

ROUTES = ("gathered logits", "vocab-parallel logits", "vocab-parallel fused-linear")


FUNCTIONAL = ("all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor", "all_to_all_single", "broadcast")


class Collectives(TorchDispatchMode):
    """Counts the collectives run inside it, c10d's and the functional ones DTensor's redistributions use, and the
    bytes each process contributes: the input of an all-gather, the tensor(s) of an all-reduce or a broadcast."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, dict] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._opname
        if func.namespace == "c10d" or (func.namespace == "_c10d_functional" and name in FUNCTIONAL):
            contributed = args[1] if name in ("_allgather_base_", "_reduce_scatter_base_") else args[0]
            tensors = contributed if isinstance(contributed, (list, tuple)) else [contributed]
            entry = self.calls.setdefault(name.strip("_"), {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        return func(*args, **(kwargs or {}))


def theory(route: str, tokens: int, scored: int, hidden: int, vocab: int, world: int, itemsize: int) -> dict:
    """The collectives each route needs per step, per process: {operator: bytes contributed}. `scored`: the tokens
    not ignored (the fused-linear path computes only those)."""
    if route == "gathered logits":
        return {"all_gather_into_tensor": tokens * -(-vocab // world) * itemsize}
    if route == "vocab-parallel logits":  # per token: the slice's LSE and the label's logit (or 0), float64
        return {"allgather_base": 2 * 8 * tokens}
    return {"allgather_base": 2 * 8 * scored, "allreduce": scored * hidden * itemsize}  # and d hidden, all-reduced


def worker(args) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import rlhfv_kernels as rk
    from rlhfv_train.run.distributed import Distributed, process_device

    device = process_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = Distributed(device)
    mesh = init_device_mesh(device.type, (group.world,))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)  # the same tokens on every process
    rows, seq = 2 * args.pairs, args.tokens // (2 * args.pairs)
    hidden = torch.randn(rows, seq, args.hidden, device=device, dtype=dtype)
    labels = torch.randint(0, args.vocab, (rows, seq), device=device)
    labels[:, : seq // 4] = -100  # the prompt
    ref = torch.full((rows,), -20.0, device=device)
    results = []
    for route in ROUTES:
        head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=dtype)
        style = {"gathered logits": ColwiseParallel(output_layouts=Replicate()),
                 "vocab-parallel logits": ColwiseParallel(use_local_output=False),
                 "vocab-parallel fused-linear": ColwiseParallel()}[route]
        parallelize_module(head, mesh, style)
        x = distribute_tensor(hidden, mesh, [Replicate()]).requires_grad_(True)

        def step():
            if route == "vocab-parallel fused-linear":
                out = rk.linear_ddpo_loss(x, head.weight, labels, ref, beta=0.1)
            else:
                out = rk.ddpo_loss(head(x), labels, ref, beta=0.1, inplace_backward=True)
            out.loss.backward()
            head.weight.grad = x.grad = None

        times, peak = time_and_peak(step, device, args.repeats)
        with Collectives() as seen:
            step()
        results.append({"route": route, "times_ms": times, "peak_extra_bytes": peak, "collectives": seen.calls,
                        "theory": theory(route, rows * seq, int((labels != -100).sum()), args.hidden, args.vocab,
                                         group.world, torch.finfo(dtype).bits // 8)})
    write_from_rank0(args.work, {"rank": group.rank, "results": results})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936, help="lm_head rows (default 151936, Qwen2's)")
    parser.add_argument("--hidden", type=int, default=896, help="lm_head columns (default 896, Qwen2-0.5B's)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step, the same on every process")
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs the tokens make")
    add_torchrun_arguments(parser, "processes, the tensor-parallel degree (default 2)",
                           "cpu (gloo, fp32) or cuda (NCCL, bf16)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.tokens % (2 * args.pairs):
        parser.error(f"--tokens ({args.tokens}) must be a multiple of 2 * --pairs ({2 * args.pairs})")
    launched = launch_under_torchrun(__file__, argv if argv is not None else sys.argv[1:], args.nproc, args.port)
    if isinstance(launched, int):
        return launched
    ranks, load = launched
    rows = rows_per_route(ranks, ROUTES, collectives="collectives", theory="theory")
    device = torch.device(args.device if args.device != "cuda" else "cuda")
    print(f"one DDPO loss forward + backward per process, {args.nproc} processes ({device_name(device)}), "
          f"head {args.vocab} x {args.hidden} tensor-parallel, {args.tokens} tokens on every process")
    base = rows[0]
    print(f"{'route':<30}{'step ms':>10}{'spread':>8}{'peak MiB/process':>18}{'memory':>9}   collectives per step "
          "(bytes per process; theory)")
    for r in rows:
        seen = ", ".join(f"{name} x{c['count']} {c['bytes']:,} B" for name, c in sorted(r["collectives"].items())
                         if name not in ("broadcast", "scatter"))
        want = ", ".join(f"{name} {b:,} B" for name, b in sorted(r["theory"].items()))
        print(f"{r['route']:<30}{r['step_median_ms']:>10.1f}{r['spread']:>7.0%} "
              f"{r['peak_extra_bytes'] / 2**20:>17.1f}{r['peak_extra_bytes'] / max(base['peak_extra_bytes'], 1):>8.2f}x"
              f"   {seen}; theory {want}")
    print_load(load["before"], load["after"], 0)
    if args.json:
        write_json(args.json, {"versions": versions(), "device_name": device_name(device), "nproc": args.nproc,
                               "vocab": args.vocab, "hidden": args.hidden, "tokens": args.tokens,
                               "pairs": args.pairs, "load": load,
                               "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
