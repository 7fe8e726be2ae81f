"""python -m rlhfv_train.grpo [options]: online GRPO with grouped comparison (Generative RLHF-V) on rlhfv_kernels'
fused grpo_loss.

With no arguments it fine-tunes the embedded tiny LLaVA on the synthetic scenes (SFT on the chosen answers), then
trains it with GRPO against the exact scene judge (of two answers, the one with more correct minus hallucinated
objects wins, then the one with fewer hallucinated) on the CPU in about a minute; it writes metrics.jsonl,
metrics.png, sft.pt and checkpoint.pt under runs/grpo. For real runs: --data (records with images and questions),
--model (a local Hugging Face folder) and a reward: --judge-model DIR (a generative judge), --judge module:function
or --reward module:function.
Bad data, flags or paths end with one line on stderr and exit status 2 (RLHFV_TRACEBACK=1 shows the traceback).
"""
from __future__ import annotations

import argparse

from ..run import flags
from ..run.cli import USER_ERRORS, fail, print_skipped, print_start_to_end
from .config import TINY_SFT_STEPS, GRPOConfig
from .trainer import train_grpo


def build_parser() -> argparse.ArgumentParser:
    return flags.build_parser(GRPOConfig, "python -m rlhfv_train.grpo", __doc__)


def config_from_args(args: argparse.Namespace) -> GRPOConfig:
    """The flags' config; the embedded tiny model (no --model, no --init-weights) gets an SFT stage by default."""
    values = flags.given_values(GRPOConfig, args)
    values.setdefault("sft_steps", TINY_SFT_STEPS if args.model is None and args.init_weights is None else 0)
    return GRPOConfig(**values)


def main(argv=None) -> int:
    cfg = config_from_args(build_parser().parse_args(argv))
    try:
        summary = train_grpo(cfg)
    except USER_ERRORS as exc:
        return fail("python -m rlhfv_train.grpo", exc)
    m, start = summary["metrics"], summary.get("start_metrics") or {}
    print(f"done: step {summary['step']}; metrics {summary.get('metrics_path')}, plot {summary.get('plot')}")
    print_skipped(m)
    print_start_to_end("held-out", start, m, ("eval_scene_reward", "eval_win_rate", "eval_reward", "chair_s",
                                              "chair_i", "recall"))
    return 0
