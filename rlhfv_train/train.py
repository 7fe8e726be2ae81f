"""The training loop: DDPO on preference pairs with rlhfv_kernels' fused loss.

AdamW, linear warm-up then cosine decay, gradient accumulation, clipping, optional gradient checkpointing, held-out
preference accuracy, metrics as JSONL plus a PNG plot, atomic checkpoints, and exact resume (model, optimizer,
scheduler, RNG and data position: a resumed run ends with the same weights as an uninterrupted one).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field

import torch

import rlhfv_kernels as rk

from . import refcache
from .data import BatchStream, PairCollator
from .data.packing import check_max_tokens_per_row, pack_for_loss
from .checkpoint import save_training_state, start_or_resume
from .distributed import Distributed, process_device
from .evaluate import METRICS, GenerationSettings, evaluate_hallucination
from .models import (check_fused_linear, forward_logits, hidden_and_head, load_processor_and_model, load_run_records,
                     load_weights)
from .models.lora import add_lora, lora_settings
from .models.lora import check_trainer_config as check_lora_config
from .models.packing import check_packing, mrope_index
from .plots import plot_metrics
from .sft import warm_up_once

PRESETS = {
    "paper": {"gamma": 5.0, "beta": 0.5, "mode": "mean"},     # RLHF-V paper
    "authors": {"gamma": 1.1, "beta": 0.1, "mode": "sum"},    # the authors' public training script
}


@dataclass
class TrainConfig:
    data: str | None = None            # .jsonl / .parquet; None: the synthetic dataset, generated on first use
    output_dir: str = "runs/rlhfv"
    model: str | None = None           # a local Hugging Face model folder; None: the embedded tiny LLaVA
    gamma: float = 5.0
    beta: float = 0.5
    mode: str = "mean"
    min_match: int = 3
    drs_weight: float = 0.0
    drs_k: float = 1.0
    sft_weight: float = 0.0
    sft_steps: int = 0                 # supervised warm-up steps on the chosen answers before preference training
    sft_lr: float = 5e-4               # constant AdamW learning rate of the warm-up
    init_weights: str | None = None    # start from these weights (a checkpoint or state dict), e.g. an SFT model
    temperature: float = 1.0
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_steps: int = 300               # optimizer steps
    batch_size: int = 8                # pairs per micro-batch
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False
    eval_fraction: float = 0.1
    eval_data: str | None = None       # held-out records in a file of their own (then eval_fraction is unused)
    eval_every: int = 25
    hallucination_eval: bool = True    # also generate on held-out images and report CHAIR rates (needs "objects")
    eval_max_new_tokens: int = 48
    save_every: int = 50
    seed: int = 0
    skip_bad: bool = False
    resume: bool = False
    backend: str | None = None
    inplace_backward: bool = True
    fused_linear: bool = False         # loss from hidden states + lm_head weight (logits never materialized)
    packing: bool = False              # sequences back to back in rows (data/packing.py): no padding tokens run
    max_tokens_per_row: int | None = None  # packed row capacity; None: the batch's longest sequence (data/packing.py)
    chat_template: bool = True         # prompts from the processor's chat template when it has one
    lora_r: int = 0                    # LoRA rank on the policy (models/lora.py); 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target: str = "all-linear"    # peft target_modules: all-linear or comma-separated module names
    fsdp: bool = False                 # under torchrun: shard with FSDP2 instead of replicating with DDP
    synthetic_examples: int = 1024
    device: str = "auto"
    progress: bool = True
    stop_after: int | None = None      # stop (as if killed) after this many steps, without the final save
    extra: dict = field(default_factory=dict)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def scored_inputs(cfg, batch, model, ref):
    """(model inputs, next-token labels, token weights, reference scores, the loss's packing options, tokens the
    forward runs) of a batch: its padded rows, or with cfg.packing its sequences packed into rows (the loss then
    takes cu_seqlens, the reference scores in the pack's order and each pair's place in it)."""
    labels, weights = batch.next_token_targets()
    inputs = batch.model_inputs()
    if not cfg.packing:
        return inputs, labels, weights, ref, {}, labels.numel()
    inputs, (labels, weights), packing, rows = pack_for_loss(inputs, [labels, weights], cfg.max_tokens_per_row,
                                                             mrope_index(model))
    return inputs, labels, weights, rows.per_sequence(ref), {**packing, "pairs": rows.pairs()}, rows.tokens


def _ddpo(cfg, model, batch, refs, *, autocast_dtype):
    pairs = batch.indices.tolist()
    ref = torch.tensor([refs[i][0] for i in pairs] + [refs[i][1] for i in pairs], device=batch.input_ids.device)
    inputs, labels, weights, ref, packing, tokens = scored_inputs(cfg, batch, model, ref)
    options = dict(token_weights=weights, beta=cfg.beta, mode=cfg.mode, reward_margin=batch.reward_margin,
                   drs_weight=cfg.drs_weight, drs_k=cfg.drs_k, sft_weight=cfg.sft_weight,
                   temperature=cfg.temperature, backend=cfg.backend, **packing)
    if cfg.fused_linear:  # hidden states + lm_head weight: the logits are never materialized
        hidden, head = hidden_and_head(model, inputs, autocast_dtype)
        return rk.linear_ddpo_loss(hidden, head.weight, labels, ref, **head.options(), **options), tokens
    logits = forward_logits(model, inputs, autocast_dtype)
    return rk.ddpo_loss(logits, labels, ref, inplace_backward=cfg.inplace_backward, **options), tokens


@torch.no_grad()
def evaluate(cfg, model, processor, collate, records, indices, refs, device, autocast_dtype,
             gathered=contextlib.nullcontext) -> dict:
    """Held-out preference accuracy (the fraction of pairs whose implicit reward prefers the chosen answer) and,
    when the records carry ground-truth objects, the CHAIR rates of greedy answers (evaluate.py), generated inside
    `gathered()` (Distributed.unsharded under FSDP2)."""
    if not indices:
        return {}
    metrics = {}
    if cfg.hallucination_eval and all(records[i].objects is not None for i in indices):
        settings = GenerationSettings(max_new_tokens=cfg.eval_max_new_tokens, batch_size=max(cfg.batch_size, 32),
                                      chat_template=cfg.chat_template)
        with gathered():
            rates, _ = evaluate_hallucination(model, processor, [records[i] for i in indices], settings=settings,
                                              device=device, autocast_dtype=autocast_dtype)
        metrics.update({name: rates[name] for name in METRICS})
    was_training = model.training
    model.eval()
    wins, margins = [], []
    try:
        for start in range(0, len(indices), cfg.batch_size):
            chunk = indices[start:start + cfg.batch_size]
            batch = collate([(i, records[i]) for i in chunk]).to(device)
            out, _ = _ddpo(cfg, model, batch, refs, autocast_dtype=autocast_dtype)
            wins.extend((out.margins > 0).tolist())
            margins.extend(out.margins.tolist())
    finally:
        model.train(was_training)
    return {"eval_accuracy": sum(wins) / len(wins), "eval_margin": sum(margins) / len(margins), **metrics}


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) training; returns a summary with the last metrics and the paths written."""
    if cfg.mode not in ("sum", "mean"):
        raise ValueError(f"mode must be 'sum' or 'mean', got {cfg.mode!r}")
    if cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.max_steps < 1:
        raise ValueError("grad_accum, batch_size and max_steps must be >= 1")
    if cfg.sft_steps < 0:
        raise ValueError(f"sft_steps must be >= 0, got {cfg.sft_steps}")
    check_max_tokens_per_row(cfg.max_tokens_per_row, cfg.packing)
    check_lora_config(cfg)
    if cfg.init_weights is not None and not os.path.isfile(cfg.init_weights):
        raise FileNotFoundError(f"--init-weights {cfg.init_weights}: no such file")
    if cfg.model is not None and not os.path.isdir(cfg.model):  # before any data work, and before transformers
        raise FileNotFoundError(f"--model {cfg.model}: no such folder (a local Hugging Face model folder is expected; "
                                "nothing is downloaded)")
    os.makedirs(cfg.output_dir, exist_ok=True)
    device = process_device(cfg.device)
    dist = Distributed(device)
    if cfg.fused_linear and dist.world > 1:
        raise ValueError("--fused-linear calls the model's body and lm_head separately, which bypasses the DDP/FSDP "
                         "wrappers; use it with a single process for now")
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    records, train_idx, eval_idx, data_path = load_run_records(
        cfg.data, eval_data=cfg.eval_data, eval_fraction=cfg.eval_fraction, seed=cfg.seed, skip_bad=cfg.skip_bad,
        output_dir=cfg.output_dir, synthetic_examples=cfg.synthetic_examples, dist=dist, progress=cfg.progress)

    processor, model = load_processor_and_model(cfg.model, cfg.seed)
    model.to(device)
    if cfg.grad_checkpointing:  # transformers 5 renamed the switch; older releases only have the first name
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    collate = PairCollator(processor, gamma=cfg.gamma, min_match=cfg.min_match, chat_template=cfg.chat_template)
    if cfg.fused_linear:  # refuse a model whose logits the route cannot reproduce, before any work
        check_fused_linear(model, collate([(i, records[i]) for i in train_idx[:2]]).to(device).model_inputs(),
                           autocast_dtype)
    if cfg.packing:  # refuse a model that lets packed sequences see each other, before any work
        check_packing(model, collate([(i, records[i]) for i in train_idx[:2]]).to(device).model_inputs(),
                      autocast_dtype)
    if cfg.init_weights is not None:
        load_weights(model, cfg.init_weights)
    sft_losses = warm_up_once(model, collate, records, train_idx, dist=dist, output_dir=cfg.output_dir,
                              steps=cfg.sft_steps, lr=cfg.sft_lr, batch_size=cfg.batch_size, seed=cfg.seed,
                              resume=cfg.resume, max_grad_norm=cfg.max_grad_norm, autocast_dtype=autocast_dtype,
                              backend=cfg.backend, progress=cfg.progress,
                              extra={"config": asdict(cfg), "data_path": data_path})

    # LoRA after the warm-up: the adapters start at a zero update, so the references below are the base model's.
    model = add_lora(model, lora_settings(cfg), fused_linear=cfg.fused_linear)
    # Reference scores come from the starting weights, before any checkpoint is loaded.
    # Everything that changes the scored tokens or their scores keys the cache (the prompts too).
    settings = {"gamma": cfg.gamma, "min_match": cfg.min_match, "mode": cfg.mode, "temperature": cfg.temperature,
                "chat_template": cfg.chat_template}
    key = refcache.cache_key(records, model, settings)

    def compute_refs():
        from tqdm import tqdm
        bar = tqdm(total=len(records), desc="reference scores", unit="pair", disable=not cfg.progress)
        batches = (collate([(i, records[i]) for i in range(s, min(s + cfg.batch_size, len(records)))])
                   for s in range(0, len(records), cfg.batch_size))
        try:
            return refcache.score_pairs(model, batches, settings, device, autocast_dtype=autocast_dtype,
                                        backend=cfg.backend, progress=bar)
        finally:
            bar.close()

    cache_dir = os.path.join(cfg.output_dir, "ref_cache")
    if dist.is_main:  # one process scores, the others read its cache
        refs = refcache.load_or_compute(cache_dir, key, compute_refs)
    dist.barrier()
    if not dist.is_main:
        refs = refcache.load_or_compute(cache_dir, key, compute_refs)

    fsdp = cfg.fsdp and dist.world > 1
    gathered = lambda: dist.unsharded(model, fsdp)  # noqa: E731  (generate() needs every parameter whole)
    model.train()
    # DDP wraps the model (`model` stays the plain module for eval and checkpoints); FSDP2 shards `model` itself,
    # before the optimizer is built over its sharded parameters.
    trained = dist.wrap(model, device, fsdp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda s: cosine_with_warmup(s, cfg.max_steps, warmup))
    stream = BatchStream(train_idx, cfg.batch_size, cfg.seed, dist.rank, dist.world)
    ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pt")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    step, resumed_first, resumed_metrics = start_or_resume(ckpt_path, metrics_path, model, optimizer, scheduler,
                                                           resume=cfg.resume, max_steps=cfg.max_steps, fsdp=fsdp,
                                                           dist=dist)

    def checkpoint():
        save_training_state(ckpt_path, model, optimizer, scheduler, step, fsdp=fsdp, dist=dist, config=asdict(cfg),
                            ref_cache_key=key, data_path=data_path)

    from tqdm import tqdm
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step",
               disable=not cfg.progress or not dist.is_main)
    last = resumed_metrics
    start_metrics = resumed_first if cfg.resume else {}
    with open(metrics_path, "a") if dist.is_main else open(os.devnull, "w") as metrics_file:
        if step == 0:  # the starting point (after the warm-up): what preference training is measured against
            first = {"step": 0, **evaluate(cfg, model, processor, collate, records, eval_idx, refs, device,
                                            autocast_dtype, gathered)}
            if sft_losses:
                first["sft_loss"] = sum(sft_losses[-10:]) / len(sft_losses[-10:])
            metrics_file.write(json.dumps(first) + "\n")
            start_metrics = first
        while step < cfg.max_steps:
            totals = {"loss": 0.0, "margin": 0.0, "accuracy": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0,
                      "tokens": 0}
            for micro in range(cfg.grad_accum):
                indices = stream.batch(step * cfg.grad_accum + micro)
                batch = collate([(i, records[i]) for i in indices]).to(device)
                # Gradients are averaged across processes once per optimizer step, on the last micro-batch.
                sync = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if sync else dist.skip_grad_sync(trained):
                    out, tokens = _ddpo(cfg, trained, batch, refs, autocast_dtype=autocast_dtype)
                    (out.loss / cfg.grad_accum).backward()
                totals["tokens"] += tokens  # the tokens the model ran (padding included, when not packed)
                totals["loss"] += out.loss.item() / cfg.grad_accum
                totals["margin"] += out.margins.mean().item() / cfg.grad_accum
                totals["accuracy"] += out.accuracy.item() / cfg.grad_accum
                totals["chosen_reward"] += out.chosen_rewards.mean().item() / cfg.grad_accum
                totals["rejected_reward"] += out.rejected_rewards.mean().item() / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            totals = dist.mean(totals)
            last = {"step": step, **totals, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                last.update(evaluate(cfg, model, processor, collate, records, eval_idx, refs, device,
                                     autocast_dtype, gathered))
            metrics_file.write(json.dumps(last) + "\n")
            metrics_file.flush()
            bar.update()
            bar.set_postfix(loss=f"{totals['loss']:.3f}", acc=f"{totals['accuracy']:.2f}",
                            margin=f"{totals['margin']:.2f}")
            if cfg.stop_after is not None and step >= cfg.stop_after:
                if step % cfg.save_every == 0:
                    checkpoint()
                bar.close()
                return {"step": step, "stopped": True, "metrics": last}
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                checkpoint()
    bar.close()
    plot = plot_metrics(metrics_path, os.path.join(cfg.output_dir, "metrics.png")) if dist.is_main else None
    return {"step": step, "metrics": last, "start_metrics": start_metrics, "metrics_path": metrics_path, "plot": plot,
            "checkpoint": ckpt_path, "model": model}
