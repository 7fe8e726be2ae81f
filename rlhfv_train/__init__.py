"""rlhfv_train: a compact DDPO trainer for Hugging Face vision-language models on top of rlhfv_kernels.

    python -m rlhfv_train                 # the embedded tiny LLaVA on synthetic shapes data, on CPU, in under a minute
    python -m rlhfv_train --data d.jsonl --model ./my-vlm --preset paper --lr 5e-7

Modules: data (records, located errors), segments (correction -> token weights), batch (pairs -> [2B, T] inputs),
refcache (frozen-model scores, cached), train (the loop, checkpoints, resume), sft (the warm-up), evaluate (the
hallucination metric on generated answers), ablation (DPO vs DDPO vs MM-DPO), rewards (judges, grouped comparison and
advantages for online GRPO), tiny and synthetic (the embedded default).
"""
