"""rlhfv_train: a compact DDPO trainer for Hugging Face vision-language models on top of rlhfv_kernels.

    python -m rlhfv_train                 # the embedded tiny LLaVA on synthetic shapes data, on CPU, in under a minute
    python -m rlhfv_train --data d.jsonl --model ./my-vlm --preset paper --lr 5e-7

Packages: data (records and formats, correction -> token weights, chat-template prompts, pairs -> [2B, T] model
inputs with every processor tensor, the visiting order), models (loading, the fused-linear adapter, forward helpers,
the tiny LLaVA and the tiny model families). Modules: refcache (frozen-model scores, cached), train (the DDPO loop),
grpo and rollouts (online GRPO), sft (the warm-up), evaluate (the hallucination metric on generated answers), ablation
(DPO vs DDPO vs MM-DPO), rewards (judges, grouped comparison and advantages), synthetic (the embedded default data).
"""
