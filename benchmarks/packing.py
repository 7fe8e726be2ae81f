"""Padded vs packed (--packing) training steps of both trainers on a batch whose answers spread from 20 to 400 tokens
after a prompt with an image: tokens the model runs, step time and peak extra memory, side by side in one run.

    python benchmarks/packing.py                        # tiny LLaVA, 16 pairs, V=32000, on CPU
    python benchmarks/packing.py --family qwen2-vl --max-tokens-per-row 2048 --json out.json

DDPO: one optimizer step of the DDPO trainer's loss (logits path in place, and --fused-linear) on the pairs. GRPO: one
update of the GRPO trainer over the same sequences taken as rollouts (k answers per prompt, micro-batches of
--micro-batch rows, old and reference log-probs given). Same model, same batch, same code path as the trainers
(rlhfv_train.ddpo.scored_inputs, rlhfv_train.grpo.rollouts.micro_batch_inputs); the packed and padded losses agree
within rounding (tests/train/test_train_packing.py), which this run checks again.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "6")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlhfv_kernels as rk  # noqa: E402
from benchmarks.harness import (PeakMemory, device_name, time_call, training_step_setup, versions,  # noqa: E402
                                write_json)
from rlhfv_train.data import synthetic  # noqa: E402
from rlhfv_train.data import PairCollator, PreferenceRecord  # noqa: E402
from rlhfv_train.models.tiny_families import FAMILIES, build_family  # noqa: E402
from rlhfv_train.models import tiny  # noqa: E402
from rlhfv_train.models.forward import forward_logits  # noqa: E402
from rlhfv_train.grpo.rollouts import Rollouts, micro_batch_inputs  # noqa: E402
from rlhfv_train.ddpo import TrainConfig, batch_loss  # noqa: E402

WORDS = [w for w in synthetic.VOCABULARY if w.isalpha()]


def spread_records(pairs: int, low: int, high: int, seed: int) -> list[PreferenceRecord]:
    """Scenes whose chosen answers are `low`..`high` words (uniform), the rejected one with a few words replaced."""
    rng = random.Random(seed)
    records = []
    for _ in range(pairs):
        example = synthetic.make_example(rng)
        buffer = io.BytesIO()
        synthetic.draw(example["objects"], rng=rng).save(buffer, format="PNG")
        chosen = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
        rejected = list(chosen)
        for k in rng.sample(range(len(chosen)), min(3, len(chosen))):
            rejected[k] = rng.choice(WORDS)
        records.append(PreferenceRecord(question=example["question"], chosen=" ".join(chosen),
                                        rejected=" ".join(rejected), images=(buffer.getvalue(),)))
    return records


def ddpo_step(cfg, model, batch, refs, optimizer, autocast):
    def step():
        out, tokens = batch_loss(cfg, model, batch, refs, autocast_dtype=autocast)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step.result = (out.loss.item(), tokens)
    return step


def grpo_step(packing, max_tokens_per_row, model, rollouts, advantages, old, ref, micro_batch, optimizer, autocast):
    """One update of the GRPO trainer's inner loop (rlhfv_train/grpo.py), dapo, over every micro-batch."""
    local_tokens = int((rollouts.labels != -100).sum())

    def step():
        total, tokens = 0.0, 0
        for start in range(0, rollouts.labels.shape[0], micro_batch):
            rows = slice(start, start + micro_batch)
            inputs, labels, (old_rows, ref_rows), (advantage_rows,), options, _ = micro_batch_inputs(
                rollouts, rows, [old, ref], [advantages], model, packing=packing,
                max_tokens_per_row=max_tokens_per_row)
            logits = forward_logits(model, inputs, autocast)
            out = rk.grpo_loss(logits, labels, advantage_rows, old_logps=old_rows, ref_logps=ref_rows, beta_kl=0.04,
                               loss_type="dapo", num_items_in_batch=local_tokens, world_size=1,
                               inplace_backward=True, **options)
            out.loss.backward()
            total += out.loss.item()
            tokens += labels.numel()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step.result = (total, tokens)
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", choices=[n for n, f in FAMILIES.items() if f.kind != "text"])
    parser.add_argument("--vocab", type=int, default=None, help="lm_head size (default: 32000 on CPU, 128256 GPU)")
    parser.add_argument("--pairs", type=int, default=16, help="preference pairs (DDPO) = rollouts / 2 (GRPO)")
    parser.add_argument("--answers", type=int, nargs=2, default=(20, 400), metavar=("LOW", "HIGH"),
                        help="answer length range in words (tokens)")
    parser.add_argument("--max-tokens-per-row", type=int, default=None,
                        help="packed row capacity (default: the trainers' own, the batch's longest sequence)")
    parser.add_argument("--micro-batch", type=int, default=8, help="GRPO rows per forward")
    parser.add_argument("--hidden", type=int, default=None, help="llava: the language model's width (default: the "
                        "tiny model's 96); a wider body weighs more against the lm_head, as in a real model")
    parser.add_argument("--layers", type=int, default=None, help="llava: the language model's layers (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    device, vocab, autocast = training_step_setup(args)
    processor, _ = build_family(args.family, vocab_size=vocab)
    if (args.hidden or args.layers) and args.family != "llava":
        parser.error("--hidden / --layers apply to --family llava")
    text = dict(tiny.TINY_CONFIG["text"])
    if args.hidden:
        text.update(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_attention_heads=args.hidden // 32,
                    num_key_value_heads=args.hidden // 32)
    if args.layers:
        text.update(num_hidden_layers=args.layers)

    def make_model():
        if args.family == "llava":
            return tiny.build_model(processor, {**tiny.TINY_CONFIG, "text": text}, seed=0, vocab_size=vocab)
        return build_family(args.family, vocab_size=vocab, seed=0)[1]

    records = spread_records(args.pairs, *args.answers, args.seed)
    batch = PairCollator(processor, gamma=5.0)(list(enumerate(records))).to(device)
    refs = {i: (-20.0, -20.0) for i in range(len(records))}
    real = int(batch.attention_mask.sum())
    print(f"padded vs packed on {device_name(device)}, {args.family}: {args.pairs} pairs, padded "
          f"{tuple(batch.input_ids.shape)} = {batch.input_ids.numel()} tokens ({real} real), V={vocab}, "
          f"max_tokens_per_row={args.max_tokens_per_row}, language model {text['num_hidden_layers']} x "
          f"{text['hidden_size']}")

    labels, _ = batch.next_token_targets()
    sequences = labels.shape[0]
    rollouts = Rollouts(inputs=batch.inputs, labels=labels, record_indices=list(range(sequences // 2)),
                        answers=[""] * sequences, answer_tokens=(labels != -100).sum(-1), k=2)
    generator = torch.Generator().manual_seed(args.seed)
    advantages = torch.randn(sequences, generator=generator).to(device)
    old = torch.where(labels != -100, -5.0 + 0.1 * torch.randn(labels.shape, generator=generator).to(device), 0.0)
    ref = old + 0.05 * torch.randn(labels.shape, generator=generator).to(device)

    results = []
    for trainer in ("ddpo", "ddpo_fused_linear", "grpo"):
        for packing in (False, True):
            model = make_model().train().to(device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            if trainer == "grpo":
                step = grpo_step(packing, args.max_tokens_per_row, model, rollouts, advantages, old, ref,
                                 args.micro_batch, optimizer, autocast)
            else:
                cfg = TrainConfig(beta=0.5, mode="mean", sft_weight=0.0, inplace_backward=True,
                                  fused_linear=trainer == "ddpo_fused_linear", packing=packing,
                                  max_tokens_per_row=args.max_tokens_per_row)
                step = ddpo_step(cfg, model, batch, refs, optimizer, autocast)
            step()  # the first step's loss: the same weights for both layouts (compared below)
            first_loss = step.result[0]
            times = time_call(step, device, 0, args.repeats)
            with PeakMemory(device) as mem:
                step()
            results.append({"trainer": trainer, "packing": packing, "tokens": step.result[1],
                            "first_loss": first_loss, "step_median_ms": statistics.median(times),
                            "step_times_ms": times, "peak_extra_bytes": mem.peak})
            del model, optimizer
    print(f"{'trainer':<19}{'layout':<8}{'tokens':>8}{'step ms':>10}{'peak MiB':>10}{'tokens':>9}{'speedup':>9}"
          f"{'memory':>8}  first loss")
    for padded, packed in zip(results[::2], results[1::2]):
        for r in (padded, packed):
            ratio = (f"{padded['tokens'] / r['tokens']:>8.2f}x{padded['step_median_ms'] / r['step_median_ms']:>8.2f}x"
                     f"{padded['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):>7.2f}x")
            print(f"{r['trainer']:<19}{'packed' if r['packing'] else 'padded':<8}{r['tokens']:>8}"
                  f"{r['step_median_ms']:>10.1f}{r['peak_extra_bytes'] / 2**20:>10.1f}{ratio}  {r['first_loss']:.6f}")
        if abs(packed["first_loss"] - padded["first_loss"]) > 1e-4 * max(1.0, abs(padded["first_loss"])):
            print(f"error: {padded['trainer']}: packed loss {packed['first_loss']} != padded {padded['first_loss']}")
            return 1
    if args.json:
        write_json(args.json, {"versions": versions(), "device_name": device_name(device), "family": args.family,
                               "vocab": vocab, "pairs": args.pairs, "answers": list(args.answers),
                               "max_tokens_per_row": args.max_tokens_per_row, "language_model": text,
                               "padded_shape": list(batch.input_ids.shape), "real_tokens": real,
                               "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
