"""python -m rlhfv_train [options]: DDPO training with rlhfv's fused loss.

With no arguments it trains the embedded tiny LLaVA on the synthetic shapes dataset (generated on first use) on
the CPU in under a minute (2 cores): an SFT warm-up on the chosen answers, then DDPO, with held-out preference accuracy
and hallucination rates of generated answers at the start and every --eval-every steps; it writes metrics.jsonl,
metrics.png, sft.pt and checkpoint.pt under runs/rlhfv. Point --data at your .jsonl/.parquet and --model at a local
Hugging Face model folder for real runs.
Bad data, flags or paths end with one line on stderr and exit status 2 (RLHFV_TRACEBACK=1 shows the traceback).
"""
from __future__ import annotations

import argparse

from ..run import flags
from ..run.cli import USER_ERRORS, fail, print_skipped, print_start_to_end
from .config import PRESETS, TINY_SFT_STEPS, TrainConfig
from .trainer import train


def build_parser() -> argparse.ArgumentParser:
    p = flags.build_parser(TrainConfig, "python -m rlhfv_train", __doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), help="published settings: paper = gamma 5, beta 0.5, mean; "
                   "authors = gamma 1.1, beta 0.1, sum (explicit --gamma / --beta / --mode override it)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags' config; the embedded tiny model (no --model) gets an SFT stage and the SFT term by default."""
    values = {**PRESETS.get(args.preset, {}), **flags.given_values(TrainConfig, args)}
    tiny = args.model is None
    values.setdefault("sft_weight", 1.0 if tiny else 0.0)
    values.setdefault("sft_steps", TINY_SFT_STEPS if tiny else 0)
    return TrainConfig(**values)


def main(argv=None) -> int:
    cfg = config_from_args(build_parser().parse_args(argv))
    try:
        summary = train(cfg)
    except USER_ERRORS as exc:
        return fail("python -m rlhfv_train", exc)
    m, start = summary["metrics"], summary.get("start_metrics") or {}
    print(f"done: step {summary['step']}, loss {m.get('loss', float('nan')):.4f}, train accuracy "
          f"{m.get('accuracy', float('nan')):.2f}, held-out accuracy {m.get('eval_accuracy', float('nan')):.2f}; "
          f"metrics {summary.get('metrics_path')}, plot {summary.get('plot')}")
    print_skipped(m)
    print_start_to_end("held-out hallucination", start, m, ("chair_s", "chair_i", "recall"))
    return 0
