"""The DDPO trainer: RLHF-V's dense DPO (token weights gamma on the corrected segments) with MM-DPO's dynamic reward
scaling, on rlhfv_kernels' fused loss, over run/loop.py's training loop.

The reference model's sequence scores come once from the starting weights (after the SFT stage) and are cached
(reference_scores.py); every step runs grad_accum micro-batches of pairs, chosen rows then rejected rows, through the
policy (logits or fused-linear, padded or packed) and ddpo_loss.
"""
from __future__ import annotations

import contextlib

import torch

from ..data import BatchStream, PairCollator
from ..data.packed_rows import pack_for_loss
from ..eval import METRICS, GenerationSettings, evaluate_hallucination
from ..models import model_loss
from ..models.lora import add_lora, lora_settings
from ..models.packed_model import mrope_index
from ..run.loop import one_run_per_folder, optimizer_and_schedule, optimizer_step, run_steps, start
from ..run.plots import plot_metrics
from . import reference_scores
from .config import TrainConfig


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


def batch_loss(cfg, model, batch, refs, *, autocast_dtype):
    """The DDPO loss of a PairBatch under `model` (DDPOOutput) and the tokens the forward ran."""
    pairs = batch.indices.tolist()
    ref = torch.tensor([refs[i][0] for i in pairs] + [refs[i][1] for i in pairs], device=batch.input_ids.device)
    inputs, labels, weights, ref, packing, tokens = scored_inputs(cfg, batch, model, ref)
    options = dict(token_weights=weights, beta=cfg.beta, mode=cfg.mode, reward_margin=batch.reward_margin,
                   drs_weight=cfg.drs_weight, drs_k=cfg.drs_k, sft_weight=cfg.sft_weight,
                   temperature=cfg.temperature, backend=cfg.backend, **packing)
    out = model_loss("ddpo_loss", model, inputs, labels, ref, fused_linear=cfg.fused_linear,
                     autocast_dtype=autocast_dtype, inplace_backward=cfg.inplace_backward, **options)
    return out, tokens


@torch.no_grad()
def held_out_metrics(cfg, model, processor, collate, records, indices, refs, device, autocast_dtype,
                     gathered=contextlib.nullcontext) -> dict:
    """Held-out preference accuracy (the fraction of pairs whose implicit reward prefers the chosen answer) and,
    when the records carry ground-truth objects, the CHAIR rates of greedy answers (eval/hallucination.py),
    generated inside `gathered()` (Distributed.unsharded under FSDP2)."""
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
        for first in range(0, len(indices), cfg.batch_size):
            chunk = indices[first:first + cfg.batch_size]
            batch = collate([(i, records[i]) for i in chunk]).to(device)
            out, _ = batch_loss(cfg, model, batch, refs, autocast_dtype=autocast_dtype)
            wins.extend((out.margins > 0).tolist())
            margins.extend(out.margins.tolist())
    finally:
        model.train(was_training)
    return {"eval_accuracy": sum(wins) / len(wins), "eval_margin": sum(margins) / len(margins), **metrics}


@one_run_per_folder
def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) training; returns a summary with the last metrics and the paths written."""
    collate_of = lambda processor: PairCollator(processor, gamma=cfg.gamma, min_match=cfg.min_match,  # noqa: E731
                                                chat_template=cfg.chat_template)
    run = start(cfg, sft_collate=collate_of, sft_batch_size=cfg.batch_size)
    records, collate, device, dist = run.records, run.collate, run.device, run.dist
    # LoRA after the SFT stage: the adapters start at a zero update, so the references below are the base model's.
    model = add_lora(run.model, lora_settings(cfg), fused_linear=cfg.fused_linear)
    refs, key = reference_scores.for_run(run, model)
    gathered = lambda: dist.unsharded(model, run.fsdp)  # noqa: E731  (generate() needs every parameter whole)
    model.train()
    # DDP wraps the model (`model` stays the plain module for eval and checkpoints); FSDP2 shards `model` itself,
    # before the optimizer is built over its sharded parameters.
    trained = dist.wrap(model, device, run.fsdp)
    optimizer, scheduler = optimizer_and_schedule(cfg, model, cfg.max_steps)
    stream = BatchStream(run.train_idx, cfg.batch_size, cfg.seed, dist.data_rank, dist.data_world)

    def train_step(step: int) -> dict:
        totals = {"loss": 0.0, "margin": 0.0, "accuracy": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0,
                  "tokens": 0}
        for micro in range(cfg.grad_accum):
            indices = stream.batch(step * cfg.grad_accum + micro)
            batch = collate([(i, records[i]) for i in indices]).to(device)
            # Gradients are averaged across processes once per optimizer step, on the last micro-batch.
            sync = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else dist.skip_grad_sync(trained):
                out, tokens = batch_loss(cfg, trained, batch, refs, autocast_dtype=run.autocast_dtype)
                (out.loss / cfg.grad_accum).backward()
            totals["tokens"] += tokens  # the tokens the model ran (padding included, when not packed)
            totals["loss"] += out.loss.item() / cfg.grad_accum
            totals["margin"] += out.margins.mean().item() / cfg.grad_accum
            totals["accuracy"] += out.accuracy.item() / cfg.grad_accum
            totals["chosen_reward"] += out.chosen_rewards.mean().item() / cfg.grad_accum
            totals["rejected_reward"] += out.rejected_rewards.mean().item() / cfg.grad_accum
        totals = dist.mean(totals)  # before the update: every process's guard sees the same loss
        grad_norm = optimizer_step(model, optimizer, scheduler, cfg.max_grad_norm, guard=run.guard,
                                   loss=totals["loss"], where=f"step {step + 1}")
        return {**totals, "grad_norm": grad_norm}

    def evaluate() -> dict:
        return held_out_metrics(cfg, model, run.processor, collate, records, run.eval_idx, refs, device,
                                run.autocast_dtype, gathered)

    def postfix(m: dict) -> dict:
        return {"loss": f"{m['loss']:.3f}", "acc": f"{m['accuracy']:.2f}", "margin": f"{m['margin']:.2f}"}

    return run_steps(run, model, optimizer, scheduler, train_step=train_step, evaluate=evaluate,
                     progress_postfix=postfix, plot=plot_metrics, desc="train", ref_cache_key=key)
