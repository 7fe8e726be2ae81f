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
import sys
from dataclasses import fields

from rlhfv_kernels._backend import BACKENDS, describe as describe_backends

from .cli import USER_ERRORS, HelpFormatter, fail, print_start_to_end
from .data.packing import add_packing_arguments
from .models.lora import add_lora_arguments
from .train import PRESETS, TrainConfig, train

TINY_SFT_STEPS = 1000  # the embedded tiny model starts from random weights: it learns to describe scenes first


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m rlhfv_train", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", help="preference data: .jsonl with image files, .parquet, or a datasets folder "
                   "(save_to_disk); ours, RLHF-V's or TRL's layout; default: synthetic")
    p.add_argument("--model", help="local Hugging Face model folder (image-text-to-text or causal LM); default: "
                   "the embedded tiny LLaVA")
    p.add_argument("--output-dir", default=defaults.output_dir,
                   help="metrics, plot, checkpoint and reference-score cache")
    p.add_argument("--preset", choices=sorted(PRESETS), help="published settings: paper = gamma 5, beta 0.5, mean; "
                   "authors = gamma 1.1, beta 0.1, sum (explicit options below override it)")
    p.add_argument("--gamma", type=float, help=f"weight of corrected tokens (default {defaults.gamma})")
    p.add_argument("--beta", type=float, help=f"DPO beta (default {defaults.beta})")
    p.add_argument("--mode", choices=("sum", "mean"), help=f"sequence score (default {defaults.mode})")
    p.add_argument("--min-match", type=int, default=defaults.min_match, help="shortest kept match in the diff")
    p.add_argument("--drs-weight", type=float, default=defaults.drs_weight, help="MM-DPO dynamic reward scaling w")
    p.add_argument("--drs-k", type=float, default=defaults.drs_k, help="MM-DPO dynamic reward scaling k")
    p.add_argument("--sft-weight", type=float, help="weight of the chosen-answer NLL (default 0; 1 for the embedded "
                   "tiny model, which starts from random weights and must also learn the language)")
    p.add_argument("--sft-steps", type=int, help="supervised warm-up steps on the chosen answers before preference "
                   "training, saved as output-dir/sft.pt (default: 1000 for the embedded tiny model, 0 with --model)")
    p.add_argument("--sft-lr", type=float, default=defaults.sft_lr, help="learning rate of the warm-up")
    p.add_argument("--init-weights", help="start from these weights: a trainer checkpoint (checkpoint.pt, sft.pt) or "
                   "a state dict for the model")
    p.add_argument("--lr", type=float, default=defaults.lr, help="AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio,
                   help="fraction of steps of linear warm-up before the cosine decay")
    p.add_argument("--max-steps", type=int, default=defaults.max_steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=defaults.grad_accum, help="batches per optimizer step")
    p.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm, help="gradient clipping norm")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction,
                   help="share of the records held out for the preference-accuracy evaluation")
    p.add_argument("--eval-data", help="held-out records in a file of their own (default: --eval-fraction of --data)")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps between evaluations")
    p.add_argument("--no-hallucination-eval", action="store_true", help="skip generating answers on the held-out "
                   "images (done when the records carry ground-truth 'objects'; rlhfv_train.evaluate)")
    p.add_argument("--eval-max-new-tokens", type=int, default=defaults.eval_max_new_tokens,
                   help="answer length limit of the hallucination evaluation")
    p.add_argument("--save-every", type=int, default=defaults.save_every, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=defaults.seed, help="model init, data order and split")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records instead of failing")
    p.add_argument("--resume", action="store_true", help="continue from output-dir/checkpoint.pt")
    p.add_argument("--backend", choices=BACKENDS, help="rlhfv_kernels backend (default: the best for the device). "
                   + describe_backends())
    p.add_argument("--no-inplace-backward", action="store_true", help="keep the logits intact in backward")
    p.add_argument("--fused-linear", action="store_true", help="compute the loss from the last hidden states and "
                   "the lm_head weight, never materializing the logits (single process)")
    add_packing_arguments(p, "batch")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard the model with FSDP2 (default: DDP)")
    p.add_argument("--no-chat-template", action="store_true", help="plain '<image> question' prompts even when the "
                   "processor has a chat template (default: the template, in training, scoring and evaluation)")
    add_lora_arguments(p)
    p.add_argument("--synthetic-examples", type=int, default=defaults.synthetic_examples,
                   help="size of the generated dataset when --data is not given")
    p.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {"gamma": TrainConfig.gamma, "beta": TrainConfig.beta, "mode": TrainConfig.mode,
              "sft_weight": args.sft_weight if args.sft_weight is not None else (1.0 if args.model is None else 0.0),
              "sft_steps": args.sft_steps if args.sft_steps is not None else (TINY_SFT_STEPS if args.model is None
                                                                               else 0)}
    if args.preset:
        values.update(PRESETS[args.preset])
    for name in ("gamma", "beta", "mode"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    names = {f.name for f in fields(TrainConfig)}
    for name, value in vars(args).items():
        if name in names and name not in values:
            values[name] = value
    values["inplace_backward"] = not args.no_inplace_backward
    values["progress"] = not args.no_progress
    values["hallucination_eval"] = not args.no_hallucination_eval
    values["chat_template"] = not args.no_chat_template
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
    print_start_to_end("held-out hallucination", start, m, ("chair_s", "chair_i", "recall"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
