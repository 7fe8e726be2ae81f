"""One training step of the trainer with the fused DDPO loss (logits path, in place; and --fused-linear, from hidden
states) vs the same step with the eager reference loss: same model, same batch, side by side in one run (time and peak
extra memory).

    python benchmarks/trainer.py                      # tiny LLaVA with a 32000-token lm_head, 16 pairs, on CPU
    python benchmarks/trainer.py --family qwen2-vl --vocab 151936       # a tiny Qwen2-VL at its real vocabulary
    python benchmarks/trainer.py --family gemma2 --vocab 256000 --pairs 4   # Gemma 2: soft-capped logits
    python benchmarks/trainer.py --vocab 128256 --pairs 8 --json out.json   # on a GPU session

The model is a tiny member of --family (rlhfv_train/models/tiny_families.py; default the embedded tiny LLaVA) with its
vocabulary padded to --vocab, so the logits (and the loss) weigh what they weigh in a real model while the rest of the
step stays small: the ratios show what the loss path costs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

os.environ.setdefault("KINETO_LOG_LEVEL", "6")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import (add_check_arguments, compare_ratios, device_name, machine_load,  # noqa: E402
                                print_load, read_recorded, row_suspicions, scene_records, spread, time_and_peak,
                                training_step_setup, versions, warn_if_busy, write_json)
from rlhfv_train.models.tiny_families import FAMILIES, build_family  # noqa: E402
from rlhfv_train.data import PairCollator  # noqa: E402
from rlhfv_train.ddpo import TrainConfig, batch_loss  # noqa: E402

IMPLS = {"reference": {"backend": "eager", "inplace_backward": False},
         "fused": {"backend": None, "inplace_backward": False},
         "fused_inplace": {"backend": None, "inplace_backward": True},
         "fused_linear": {"backend": None, "fused_linear": True}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", choices=list(FAMILIES), help="the model family (tiny body)")
    parser.add_argument("--vocab", type=int, default=None, help="lm_head size (default: 32000 on CPU, 128256 GPU)")
    parser.add_argument("--pairs", type=int, default=16, help="preference pairs per step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="PATH")
    add_check_arguments(parser, "step speedup over the reference loss")
    args = parser.parse_args(argv)
    recorded = read_recorded(parser, args)
    device, vocab, autocast = training_step_setup(args)

    processor, _ = build_family(args.family, vocab_size=vocab)
    with tempfile.TemporaryDirectory(prefix="rlhfv-trainer-bench-") as folder:  # the images, read once by the collator
        records = scene_records(folder, args.pairs, args.family)
        batch = PairCollator(processor, gamma=5.0)(list(enumerate(records))).to(device)
    refs = {i: (-20.0, -20.0) for i in range(len(records))}
    tokens = int(batch.attention_mask.sum())
    print(f"trainer step on {device_name(device)}, {args.family}: {args.pairs} pairs, {tuple(batch.input_ids.shape)} "
          f"tokens ({tokens} real), V={vocab}, logits {batch.input_ids.numel() * vocab * 4 / 2**20:.0f} MiB in fp32")
    load_before = machine_load()
    warn_if_busy(load_before)
    results = []
    for name, options in IMPLS.items():
        cfg = TrainConfig(beta=0.5, mode="mean", sft_weight=0.0, **options)
        model = build_family(args.family, vocab_size=vocab, seed=0)[1].train().to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            out, _ = batch_loss(cfg, model, batch, refs, autocast_dtype=autocast)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        times, peak = time_and_peak(step, device, args.repeats)
        results.append({"impl": name, "step_median_ms": statistics.median(times), "step_times_ms": times,
                        "peak_extra_bytes": peak,
                        "suspect": [why.replace("fwd+bwd", "step") for why in row_suspicions([], times)]})
        del model, optimizer
    base = results[0]
    print(f"{'impl':<15}{'step ms':>10}{'spread':>8}{'peak MiB':>11}{'speedup':>9}{'mem ratio':>11}  !")
    for r in results:
        print(f"{r['impl']:<15}{r['step_median_ms']:>10.1f}{spread(r['step_times_ms']):>7.0%} "
              f"{r['peak_extra_bytes'] / 2**20:>11.1f}{base['step_median_ms'] / r['step_median_ms']:>8.2f}x"
              f"{base['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):>10.2f}x  {'!' if r['suspect'] else ''}")
        for why in r["suspect"]:
            print(f"warning: {r['impl']}: {why}; rerun on a quieter machine", file=sys.stderr)
    load_after = machine_load()
    print_load(load_before, load_after, sum(bool(r["suspect"]) for r in results))
    run = {"versions": versions(), "device_name": device_name(device), "family": args.family, "vocab": vocab,
           "pairs": args.pairs, "shape": list(batch.input_ids.shape),
           "load": {"before": load_before, "after": load_after}, "results": results}
    if args.json:
        write_json(args.json, run)
    if recorded is not None:
        return 1 if check_against(run, recorded, args.check_tolerance) else 0
    return 0


def run_ratios(run: dict) -> dict:
    """(family and size, impl) -> the step's speedup over the reference loss's step (no floor: a whole step has
    none we can measure); noisy where this row or the reference's was flagged."""
    case = f"{run['family']} V={run['vocab']} {run['pairs']} pairs"
    base = next(r for r in run["results"] if r["impl"] == "reference")
    return {(case, r["impl"]): {"speedup": base["step_median_ms"] / r["step_median_ms"], "x_floor": None,
                                "noisy": bool(r.get("suspect") or base.get("suspect"))}
            for r in run["results"] if r["impl"] != "reference"}


def check_against(run: dict, recorded: dict, tolerance: float) -> int:
    """--check: this run's step speedups against a recorded run's; the number of rows worse by more than `tolerance`."""
    return compare_ratios(run_ratios(run), run_ratios(recorded), tolerance, recorded, ("case", "impl"),
                          "run the same --family, --vocab and --pairs")


if __name__ == "__main__":
    sys.exit(main())
