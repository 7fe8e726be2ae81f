"""One DDPO training step per process under torchrun: FSDP2 (or DDP) with the logits route (the model's own logits,
the fused loss in place) vs the fused-linear route (the logits never built): per-process peak extra memory and step
time, side by side in one launch.

    python benchmarks/scale_out.py                          # 2 CPU processes (gloo), FSDP2, qwen2-vl at V = 151936
    python benchmarks/scale_out.py --parallel ddp --nproc 2 --pairs 8 --json out.json
    python benchmarks/scale_out.py --device cuda --nproc 8  # on a GPU node: NCCL, bf16 autocast

The script launches itself under torch.distributed.run; each process scores its share of --pairs pairs (the global
batch), with a tiny body of --family and its vocabulary padded to --vocab, so the head and the logits weigh what they
weigh in a real model while the rest stays small. Memory: torch's allocations above the level before the step
(benchmarks/harness.PeakMemory: the profiler's events on CPU, the allocator's peak on CUDA), the largest over the
processes; time: the median step over --repeats, the slowest process's.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "6")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import (add_torchrun_arguments, device_name, launch_under_torchrun,  # noqa: E402
                                print_load, rows_per_route, scene_records, time_and_peak, versions, write_from_rank0,
                                write_json)

ROUTES = {"logits (in place)": {"inplace_backward": True}, "fused-linear": {"fused_linear": True}}


def worker(args) -> None:
    """One process of the launch: every route's step on this process's pairs; rank 0 writes what all measured."""
    from rlhfv_train.data import PairCollator
    from rlhfv_train.ddpo import TrainConfig, batch_loss
    from rlhfv_train.models.tiny_families import build_family
    from rlhfv_train.run.distributed import Distributed, process_device

    device = process_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = Distributed(device)
    rank, world = group.rank, group.world
    autocast = torch.bfloat16 if device.type == "cuda" else None
    records = scene_records(os.path.join(args.work, f"data-{rank}"), args.pairs, args.family)
    mine = list(range(rank * args.pairs // world, (rank + 1) * args.pairs // world))
    processor, _ = build_family(args.family, vocab_size=args.vocab)
    batch = PairCollator(processor, gamma=5.0)([(i, records[i]) for i in mine]).to(device)
    refs = {i: (-20.0, -20.0) for i in range(len(records))}
    results = []
    for name, options in ROUTES.items():
        cfg = TrainConfig(beta=0.5, mode="mean", sft_weight=0.0, **options)
        model = build_family(args.family, vocab_size=args.vocab, seed=0)[1].train().to(device)
        trained = group.wrap(model, device, fsdp=args.parallel == "fsdp")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            out, _ = batch_loss(cfg, trained, batch, refs, autocast_dtype=autocast)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        times, peak = time_and_peak(step, device, args.repeats)
        results.append({"route": name, "times_ms": times, "peak_extra_bytes": peak})
        del model, trained, optimizer
    write_from_rank0(args.work, {"rank": rank, "shape": list(batch.input_ids.shape), "results": results})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", choices=("fsdp", "ddp"), default="fsdp")
    parser.add_argument("--family", default="qwen2-vl", help="the tiny body's family (models/tiny_families.py)")
    parser.add_argument("--vocab", type=int, default=151936, help="lm_head size (default 151936, Qwen2-VL's)")
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per step, over all processes")
    add_torchrun_arguments(parser, "processes (default 2)", "cpu (gloo) or cuda (NCCL, one GPU per process)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.pairs % args.nproc:
        parser.error(f"--pairs ({args.pairs}) must divide evenly over --nproc ({args.nproc}) processes")
    launched = launch_under_torchrun(__file__, argv if argv is not None else sys.argv[1:], args.nproc, args.port)
    if isinstance(launched, int):
        return launched
    ranks, load = launched
    rows = rows_per_route(ranks, ROUTES)
    device = torch.device(args.device if args.device != "cuda" else "cuda")
    print(f"one DDPO step per process, {args.nproc} processes ({args.parallel}, {device_name(device)}), "
          f"{args.family} body, V={args.vocab}, {args.pairs} pairs in all, per process {ranks[0]['shape']} tokens")
    base = rows[0]
    print(f"{'route':<20}{'step ms':>10}{'spread':>8}{'peak MiB/process':>18}{'memory':>9}")
    for r in rows:
        print(f"{r['route']:<20}{r['step_median_ms']:>10.1f}{r['spread']:>7.0%} {r['peak_extra_bytes'] / 2**20:>17.1f}"
              f"{r['peak_extra_bytes'] / max(base['peak_extra_bytes'], 1):>8.2f}x")
    print_load(load["before"], load["after"], 0)
    if args.json:
        write_json(args.json, {"versions": versions(), "device_name": device_name(device), "parallel": args.parallel,
                               "nproc": args.nproc, "family": args.family, "vocab": args.vocab, "pairs": args.pairs,
                               "load": load, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
