"""One TRL DPO step and one TRL GRPO step (loss, backward; no optimizer, no generation) with TRL's own per-token
path and with rlhfv's drop-ins (rlhfv_train.integrations.trl: the logits route in place, and the fused-linear route), on
the same model and batch, side by side in one run: time and peak extra memory.

    python benchmarks/trl_step.py                          # tiny Llama body with a 151936-token lm_head, on CPU
    python benchmarks/trl_step.py --vocab 128256 --json out.json         # on a GPU session

TRL 1.16 computes every per-token quantity through its own chunked fused LM head (trl.kernels.ChunkedLogProbFunction),
which is what "trl" measures; its `use_liger_kernel` no longer replaces the loss (only layer kernels), so there is no
Liger contestant for these trainers. The body is tiny, so the ratios show what the lm_head / log-prob path costs.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import warnings

os.environ.setdefault("KINETO_LOG_LEVEL", "6")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import (PeakMemory, device_name, pick_device, time_call, versions,  # noqa: E402
                                write_json)

CONTESTANTS = {"trl": None, "rlhfv_logits": {"use_fused_linear": False},
               "rlhfv_fused_linear": {"use_fused_linear": True}}
WORDS = "a red circle on the left of a blue square near the top with a small green triangle below it".split()


def tiny_llama(vocab: int, tokenizer, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id))


def answer(i: int, words: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))


def time_step(step, device, repeats):
    times = time_call(step, device, 1, repeats)
    with PeakMemory(device) as mem:
        step()
    return {"step_median_ms": statistics.median(times), "step_times_ms": times, "peak_extra_bytes": mem.peak}


def dpo_results(args, device, tokenizer, vocab, folder):
    import datasets
    import trl
    from rlhfv_train.integrations import trl as trl_dropin

    rows = [{"prompt": "what do you see ?", "chosen": answer(i, args.answer_words),
             "rejected": answer(i + 3, args.answer_words)} for i in range(args.pairs)]
    results = {}
    for name, options in CONTESTANTS.items():
        cls = trl.DPOTrainer if options is None else trl_dropin.DPOTrainer
        model = tiny_llama(vocab, tokenizer).to(device)
        config = trl.DPOConfig(output_dir=folder, per_device_train_batch_size=args.pairs, report_to=[],
                               use_cpu=device.type == "cpu", bf16=device.type == "cuda", max_length=None)
        trainer = cls(model=model, ref_model=copy.deepcopy(model), args=config,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer, **(options or {}))
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(args.pairs)]))
        trainer.current_gradient_accumulation_steps = 1  # (set by Trainer.train's loop)
        trainer.model.train()

        def step():
            trainer.training_step(trainer.model, batch)
            trainer.model.zero_grad(set_to_none=True)

        results[name] = time_step(step, device, args.repeats)
        results[name]["tokens"] = int(batch["attention_mask"].sum())
        results[name]["shape"] = list(batch["input_ids"].shape)
    return results


def grpo_results(args, device, tokenizer, vocab, folder):
    import datasets
    import trl
    from rlhfv_train.integrations import trl as trl_dropin

    model_dir = os.path.join(folder, "model")
    tiny_llama(vocab, tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = [{"prompt": f"describe scene {i}"} for i in range(args.pairs)]
    results, inputs = {}, None
    for name, options in CONTESTANTS.items():
        cls = trl.GRPOTrainer if options is None else trl_dropin.GRPOTrainer
        config = trl.GRPOConfig(output_dir=folder, per_device_train_batch_size=args.pairs, num_generations=4,
                                max_completion_length=args.answer_words, beta=0.04, report_to=[],
                                use_cpu=device.type == "cpu", bf16=device.type == "cuda", seed=0)
        trainer = cls(model=model_dir, reward_funcs=[lambda completions, **kw: [len(c) / 10 for c in completions]],
                      args=config, train_dataset=datasets.Dataset.from_list(prompts), processing_class=tokenizer,
                      **(options or {}))
        trainer.current_gradient_accumulation_steps = 1
        if inputs is None:  # one generation (TRL's), scored by every contestant
            torch.manual_seed(0)
            inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()

        def step():
            loss = trainer.compute_loss(trainer.model, dict(inputs))
            trainer.accelerator.backward(loss)
            trainer.model.zero_grad(set_to_none=True)

        results[name] = time_step(step, device, args.repeats)
        results[name]["tokens"] = int(inputs["completion_mask"].sum())
        results[name]["shape"] = list(inputs["completion_ids"].shape)
    return results


def print_table(title, results):
    base = results["trl"]
    print(f"\n{title}: {results['trl']['shape']} ({results['trl']['tokens']} tokens)")
    print(f"{'contestant':<22}{'step ms':>10}{'peak MiB':>11}{'speedup':>9}{'mem ratio':>11}")
    for name, r in results.items():
        print(f"{name:<22}{r['step_median_ms']:>10.1f}{r['peak_extra_bytes'] / 2**20:>11.1f}"
              f"{base['step_median_ms'] / r['step_median_ms']:>8.2f}x"
              f"{base['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):>10.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936, help="lm_head size (Qwen2-VL's by default)")
    parser.add_argument("--pairs", type=int, default=8, help="DPO pairs / GRPO completions per step")
    parser.add_argument("--answer-words", type=int, default=48, help="words per DPO answer; GRPO completion tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trainers", default="dpo,grpo", help="comma-separated subset of dpo,grpo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    device = pick_device(args.device)
    from rlhfv_train.models import tiny
    tokenizer = tiny.build_tokenizer()
    print(f"TRL trainer steps on {device_name(device)}: tiny Llama body, V={args.vocab}")
    out = {"versions": versions(), "device_name": device_name(device), "vocab": args.vocab, "pairs": args.pairs}
    import trl
    out["versions"]["trl"] = trl.__version__
    for which in [t for t in args.trainers.split(",") if t]:
        if which not in ("dpo", "grpo"):
            parser.error(f"--trainers: unknown {which!r}; choose from dpo, grpo")
        with tempfile.TemporaryDirectory(prefix="rlhfv-trl-step-") as folder:  # the trainers' output_dir, the model
            results = (dpo_results if which == "dpo" else grpo_results)(args, device, tokenizer, args.vocab, folder)
        print_table(f"{which.upper()} step (loss + backward)", results)
        out[which] = results
    print("\nspeedup / mem ratio: TRL's own path over this one (time of a step; peak extra memory of one step)")
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
