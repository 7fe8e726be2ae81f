"""python -m rlhfv_train.grpo [options]: online GRPO with grouped comparison (Generative RLHF-V) on rlhfv_kernels'
fused grpo_loss.

With no arguments it warms up the embedded tiny LLaVA on the synthetic scenes (SFT on the chosen answers), then trains
it with GRPO against the exact scene judge (of two answers, the one with more correct minus hallucinated objects wins,
then the one with fewer hallucinated) on the CPU in about a minute; it writes metrics.jsonl, metrics.png, sft.pt and
checkpoint.pt under runs/grpo. For real runs: --data (records with images and questions), --model (a local Hugging
Face folder) and a reward: --judge-model DIR (a generative judge), --judge module:function or --reward
module:function.
Bad data, flags or paths end with one line on stderr and exit status 2 (RLHFV_TRACEBACK=1 shows the traceback).

Every step: sample k answers to each of a batch of prompts from the policy (rollouts.py), score each group with a
pointwise reward or, by grouped comparison, a pairwise judge (rewards.py), turn the scores into group-normalised
advantages, then take updates_per_rollout optimizer steps on the clipped GRPO loss with a k3 KL penalty to the frozen
starting model. The conventions are the DDPO trainer's (train.py): AdamW with warm-up and cosine decay, an optional
SFT warm-up, metrics.jsonl + metrics.png, atomic checkpoints and exact resume, torchrun DDP / FSDP2.

The policy's old log-probs (for the ratio of the second and later updates) and the reference's come from the fused
kernels (rk.token_logprobs); with one update per batch of rollouts the ratio is 1 and none are computed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import sys
from dataclasses import asdict, dataclass

import torch

import rlhfv_kernels as rk
from rlhfv_kernels.api import GRPO_LOSS_TYPES

from . import rollouts as rollout_ops
from .data import IGNORE_INDEX, BatchStream, PairCollator
from .data.packing import add_packing_arguments, check_max_tokens_per_row
from .checkpoint import save_training_state, start_or_resume
from .cli import USER_ERRORS, HelpFormatter, fail, print_start_to_end
from .distributed import Distributed, process_device
from .evaluate import METRICS, GenerationSettings, generate_answers, hallucination_rates, load_callable
from .models import (check_fused_linear, forward_logits, hidden_and_head, load_processor_and_model, load_run_records,
                     load_weights)
from .models.lora import add_lora, add_lora_arguments, lora_settings, reference_mode
from .models.lora import check_trainer_config as check_lora_config
from .models.packing import check_packing
from .plots import plot_grpo_metrics
from .rewards import JUDGE_TEMPLATE, GenerativeJudge, GroupScorer, SceneJudge, group_advantages, scene_reward
from .sft import warm_up_once
from .train import cosine_with_warmup

LOSS_TYPES = GRPO_LOSS_TYPES
# GRPO learns from the model's own samples, so the tiny model must describe scenes well before it starts: after 1000
# warm-up steps (the DDPO trainer's) some seeds start at chair_i 0.84 and GRPO then learns to name fewer objects.
TINY_SFT_STEPS = 2000
SCENE_JUDGES = {"scene": "net", "scene-strict": "strict"}  # --judge names of the exact judge's rules (rewards.py)


@dataclass
class GRPOConfig:
    data: str | None = None            # records with images, questions (and "objects" for the scene judge)
    output_dir: str = "runs/grpo"
    model: str | None = None           # a local Hugging Face model folder; None: the embedded tiny LLaVA
    init_weights: str | None = None    # start from these weights (a checkpoint or state dict), e.g. an SFT model
    sft_steps: int = 0                 # supervised warm-up steps on the records' chosen answers first
    sft_lr: float = 5e-4
    sft_batch_size: int = 8
    num_generations: int = 4           # k: answers sampled per prompt, compared within their group
    prompts_per_step: int = 8          # prompts (groups) per batch of rollouts, over all processes
    temperature: float = 1.0           # sampling temperature; the log-probs are taken at the same temperature
    top_p: float = 1.0
    max_new_tokens: int = 32
    reward: str | None = None          # pointwise reward: "scene" or module:function (record, answer) -> float
    judge: str | None = None           # pairwise: "scene", "scene-strict" or module:function (record, pairs) -> [P]
    judge_model: str | None = None     # a local Hugging Face model folder as generative judge (P("A") vs P("B"))
    judge_template: str = JUDGE_TEMPLATE
    loss_type: str = "dapo"            # grpo | bnpo | dr_grpo | dapo (DESIGN.md §2)
    epsilon: float = 0.2
    epsilon_high: float | None = None  # upper clip (DAPO's clip-higher); None: epsilon
    beta_kl: float = 0.04              # weight of the k3 KL to the frozen starting model; 0: no reference model
    scale_rewards: bool = True         # divide advantages by the group std (GRPO); False: Dr. GRPO
    updates_per_rollout: int = 2       # optimizer steps on each batch of rollouts (mu)
    micro_batch: int = 16              # sequences per forward / backward
    fused_linear: bool = False         # loss and log-probs from hidden states + lm_head weight (no logits)
    packing: bool = False              # each micro-batch's sequences back to back in rows: no padding tokens run
    max_tokens_per_row: int | None = None  # packed row capacity; None: the micro-batch's longest sequence
    chat_template: bool = True         # prompts from the processor's chat template when it has one
    lora_r: int = 0                    # LoRA rank on the policy (models/lora.py); 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target: str = "all-linear"    # peft target_modules: all-linear or comma-separated module names
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_steps: int = 60                # batches of rollouts
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1
    eval_data: str | None = None
    eval_every: int = 10
    hallucination_eval: bool = True    # CHAIR rates of greedy held-out answers (records with "objects")
    eval_max_new_tokens: int = 48
    save_every: int = 10
    seed: int = 0
    skip_bad: bool = False
    resume: bool = False
    backend: str | None = None
    fsdp: bool = False
    synthetic_examples: int = 1024
    device: str = "auto"
    progress: bool = True
    stop_after: int | None = None      # stop (as if killed) after this many steps, without the final save

    def check(self, world: int = 1) -> None:
        if self.num_generations < 2:
            raise ValueError(f"num_generations (k) must be >= 2: GRPO's advantage compares the answers to a prompt, "
                             f"got {self.num_generations}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        for name in ("prompts_per_step", "updates_per_rollout", "micro_batch", "max_steps", "max_new_tokens",
                     "eval_every", "save_every", "sft_batch_size", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_max_tokens_per_row(self.max_tokens_per_row, self.packing)
        if self.sft_steps < 0:
            raise ValueError(f"sft_steps must be >= 0, got {self.sft_steps}")
        check_lora_config(self)
        if self.fused_linear and world > 1:
            raise ValueError("--fused-linear calls the model's body and lm_head separately, which bypasses the "
                             "DDP/FSDP wrappers; use it with a single process for now")
        if self.prompts_per_step % world:
            raise ValueError(f"prompts_per_step ({self.prompts_per_step}) must divide evenly over {world} processes")
        if not self.epsilon > 0 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise ValueError(f"epsilon and epsilon_high must be > 0, got {self.epsilon}, {self.epsilon_high}")
        if self.beta_kl < 0 or self.lr <= 0:
            raise ValueError(f"beta_kl must be >= 0 and lr > 0, got {self.beta_kl}, {self.lr}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, "
                             f"{self.top_p}")
        given = [name for name in ("reward", "judge", "judge_model") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"give one of --reward, --judge and --judge-model, got {' and '.join(given)}")
        if not given and self.data is not None:
            raise ValueError("no judge: give --judge (scene or module:function), --judge-model DIR (a generative "
                             "judge) or --reward (scene or module:function); only the synthetic data has a default "
                             "(the exact scene judge)")
        for name in ("model", "judge_model"):
            path = getattr(self, name)
            if path is not None and not os.path.isdir(path):
                raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no such folder (a local Hugging Face "
                                        "model folder is expected; nothing is downloaded)")
        if self.init_weights is not None and not os.path.isfile(self.init_weights):
            raise FileNotFoundError(f"--init-weights {self.init_weights}: no such file")


def build_scorer(cfg: GRPOConfig, device, autocast_dtype) -> GroupScorer:
    """The reward of the run: --reward, --judge or --judge-model (the scene judge for the synthetic data)."""
    if cfg.judge_model is not None:
        processor, judge_model = load_processor_and_model(cfg.judge_model, cfg.seed)
        judge_model.to(device).requires_grad_(False)
        return GroupScorer(judge=GenerativeJudge(judge_model, processor, template=cfg.judge_template,
                                                 autocast_dtype=autocast_dtype))
    if cfg.reward is not None:
        return GroupScorer(reward=scene_reward if cfg.reward == "scene" else load_callable(cfg.reward, "--reward"))
    if cfg.judge is None or cfg.judge in SCENE_JUDGES:
        return GroupScorer(judge=SceneJudge(rule=SCENE_JUDGES.get(cfg.judge, "net")))
    return GroupScorer(judge=load_callable(cfg.judge, "--judge"))


def _uses_scene_truth(cfg: GRPOConfig) -> bool:
    return cfg.reward == "scene" or cfg.judge in SCENE_JUDGES or not (cfg.reward or cfg.judge or cfg.judge_model)


@torch.no_grad()
def evaluate(cfg, model, processor, scorer, held_out, device, autocast_dtype) -> dict:
    """Greedy answers on the held-out records: the scorer's score against each record's chosen answer (judge: win
    rate, both orders) or its mean reward; with ground-truth objects, the scene reward and the CHAIR rates."""
    if not held_out:
        return {}
    settings = GenerationSettings(max_new_tokens=cfg.eval_max_new_tokens, batch_size=32,
                                  chat_template=cfg.chat_template)
    answers = [a[0] for a in generate_answers(model, processor, held_out, settings, device=device,
                                              autocast_dtype=autocast_dtype)]
    metrics = {scorer.eval_name: sum(scorer.versus_reference(r, a) for r, a in zip(held_out, answers)) / len(answers)}
    if all(r.objects is not None for r in held_out):
        metrics["eval_scene_reward"] = sum(scene_reward(r, a) for r, a in zip(held_out, answers)) / len(answers)
        if cfg.hallucination_eval:
            rates = hallucination_rates(answers, [r.objects for r in held_out])
            metrics.update({name: rates[name] for name in METRICS})
    return metrics


def _loss_weight(loss_type: str, rows: slice, rollouts, local_tokens: int) -> float:
    """The share of one micro-batch in the loss over this process's rollouts, for each aggregation (DESIGN.md §2):
    grpo averages sequences, bnpo tokens, dr_grpo divides by rows x width; dapo is normalised through
    num_items_in_batch instead."""
    labels = rollouts.labels[rows]
    if loss_type in ("grpo", "dr_grpo"):
        return labels.shape[0] / rollouts.labels.shape[0]
    if loss_type == "bnpo":
        return int((labels != IGNORE_INDEX).sum()) / local_tokens
    return 1.0


def train_grpo(cfg: GRPOConfig) -> dict:
    """Runs (or resumes) GRPO; returns a summary with the last metrics and the paths written."""
    device = process_device(cfg.device)
    dist = Distributed(device)
    cfg.check(dist.world)
    os.makedirs(cfg.output_dir, exist_ok=True)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    records, train_idx, eval_idx, data_path = load_run_records(
        cfg.data, eval_data=cfg.eval_data, eval_fraction=cfg.eval_fraction, seed=cfg.seed, skip_bad=cfg.skip_bad,
        output_dir=cfg.output_dir, synthetic_examples=cfg.synthetic_examples, dist=dist, progress=cfg.progress)
    if _uses_scene_truth(cfg):
        missing = [records[i].source for i in train_idx if records[i].objects is None]
        if missing:
            raise ValueError(f"the scene judge / reward needs ground-truth 'objects' on every record; {len(missing)} "
                             f"have none, e.g. {missing[0]}")
    processor, model = load_processor_and_model(cfg.model, cfg.seed)
    model.to(device)
    chosen_collate = PairCollator(processor, gamma=1.0, chat_template=cfg.chat_template)
    if cfg.fused_linear:  # refuse a model whose logits the route cannot reproduce, before any work
        check_fused_linear(model, chosen_collate([(i, records[i]) for i in train_idx[:2]]).to(device).model_inputs(),
                           autocast_dtype)
    if cfg.packing:  # refuse a model that lets packed sequences see each other, before any work
        check_packing(model, chosen_collate([(i, records[i]) for i in train_idx[:2]]).to(device).model_inputs(),
                      autocast_dtype)
    if cfg.init_weights is not None:
        load_weights(model, cfg.init_weights)
    sft_losses = warm_up_once(model, chosen_collate, records, train_idx, dist=dist,
                              output_dir=cfg.output_dir, steps=cfg.sft_steps, lr=cfg.sft_lr,
                              batch_size=cfg.sft_batch_size, seed=cfg.seed, resume=cfg.resume,
                              max_grad_norm=cfg.max_grad_norm, autocast_dtype=autocast_dtype, backend=cfg.backend,
                              progress=cfg.progress, extra={"config": asdict(cfg), "data_path": data_path})
    scorer = build_scorer(cfg, device, autocast_dtype)
    fsdp = cfg.fsdp and dist.world > 1
    # LoRA after the warm-up: the adapters start at a zero update, and with them disabled the model is its own
    # frozen reference (no second copy of the weights).
    model = add_lora(model, lora_settings(cfg), fused_linear=cfg.fused_linear)
    # The frozen reference: the starting weights (after any warm-up), before a checkpoint is loaded.
    reference = None
    if cfg.beta_kl > 0 and not cfg.lora_r:
        reference = copy.deepcopy(model).requires_grad_(False)
        if fsdp:
            dist.wrap(reference, device, True)
    model.train()
    trained = dist.wrap(model, device, fsdp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_updates = cfg.max_steps * cfg.updates_per_rollout
    warmup = int(cfg.warmup_ratio * total_updates)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total_updates, warmup))
    stream = BatchStream(train_idx, cfg.prompts_per_step // dist.world, cfg.seed, dist.rank, dist.world)
    sampling = dict(do_sample=True, num_samples=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.prompts_per_step, chat_template=cfg.chat_template)
    held_out = [records[i] for i in eval_idx]
    scene_truth = all(records[i].objects is not None for i in train_idx)

    ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pt")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    step, first, last = start_or_resume(ckpt_path, metrics_path, model, optimizer, scheduler, resume=cfg.resume,
                                        max_steps=cfg.max_steps, fsdp=fsdp, dist=dist)

    def checkpoint():
        save_training_state(ckpt_path, model, optimizer, scheduler, step, fsdp=fsdp, dist=dist, config=asdict(cfg),
                            data_path=data_path)

    def held_out_metrics():
        with dist.unsharded(model, fsdp):
            return evaluate(cfg, model, processor, scorer, held_out, device, autocast_dtype)

    from tqdm import tqdm
    bar = tqdm(total=cfg.max_steps, initial=step, desc="grpo", unit="step",
               disable=not cfg.progress or not dist.is_main)
    with open(metrics_path, "a") if dist.is_main else open(os.devnull, "w") as metrics_file:
        if step == 0:
            first = {"step": 0, **held_out_metrics()}
            if sft_losses:
                first["sft_loss"] = sum(sft_losses[-10:]) / len(sft_losses[-10:])
            metrics_file.write(json.dumps(first) + "\n")
        while step < cfg.max_steps:
            # Rollouts: seeded by (seed, step, rank), so a resumed run samples exactly what it would have.
            settings = GenerationSettings(**sampling, seed=cfg.seed * 1_000_003 + step * 101 + dist.rank)
            with dist.unsharded(model, fsdp):
                rollouts = rollout_ops.sample(model, processor, records, stream.batch(step), k=cfg.num_generations,
                                              settings=settings, device=device, autocast_dtype=autocast_dtype)
            if not any(rollouts.answers):
                raise ValueError(f"step {step}: all {len(rollouts.answers)} sampled answers are empty (the model "
                                 "ends every answer at once); check the tokenizer's end-of-sequence token, "
                                 "--max-new-tokens, and the starting weights (--sft-steps, --init-weights)")
            k = rollouts.k
            scores = [scorer(records[i], rollouts.answers[g * k:(g + 1) * k])
                      for g, i in enumerate(rollouts.record_indices)]
            rewards = torch.tensor(scores, dtype=torch.float32)
            advantages = group_advantages(rewards, scale=cfg.scale_rewards).flatten().to(device)
            packing = dict(packing=cfg.packing, max_tokens_per_row=cfg.max_tokens_per_row)
            score = dict(temperature=cfg.temperature, autocast_dtype=autocast_dtype, backend=cfg.backend,
                         micro_batch=cfg.micro_batch, fused_linear=cfg.fused_linear, **packing)
            old = rollout_ops.token_logps(model, rollouts, **score) if cfg.updates_per_rollout > 1 else None
            if cfg.beta_kl > 0 and cfg.lora_r:
                with reference_mode(model):
                    ref = rollout_ops.token_logps(model, rollouts, **score)
            else:
                ref = rollout_ops.token_logps(reference, rollouts, **score) if reference is not None else None
            local_tokens = int((rollouts.labels != IGNORE_INDEX).sum())
            # dapo: the token sum over all processes / their token count; DDP averages gradients over processes.
            tokens_per_process = dist.mean({"tokens": float(local_tokens)})["tokens"]
            rows_total = rollouts.input_ids.shape[0]
            starts = list(range(0, rows_total, cfg.micro_batch))
            totals = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "tokens": 0}
            for update in range(cfg.updates_per_rollout):
                for n, start in enumerate(starts):
                    rows = slice(start, start + cfg.micro_batch)
                    sync = n == len(starts) - 1  # gradients averaged across processes once per optimizer step
                    with dist.skip_grad_sync(trained) if not sync else contextlib.nullcontext():
                        inputs, labels, (old_rows, ref_rows), (advantage_rows,), packed, _ = \
                            rollout_ops.micro_batch_inputs(rollouts, rows, [old, ref], [advantages], model, **packing)
                        options = dict(
                            old_logps=old_rows, ref_logps=ref_rows,
                            epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta_kl=cfg.beta_kl,
                            loss_type=cfg.loss_type, temperature=cfg.temperature, backend=cfg.backend,
                            num_items_in_batch=tokens_per_process if cfg.loss_type == "dapo" else None,
                            # dr_grpo's constant: the generation budget (TRL's), whatever the rows' layout
                            max_completion_length=cfg.max_new_tokens,
                            world_size=1, **packed)  # tokens_per_process is already the global count / processes
                        if cfg.fused_linear:  # the [rows, T, V] logits are never materialized
                            hidden, head = hidden_and_head(trained, inputs, autocast_dtype)
                            out = rk.linear_grpo_loss(hidden, head.weight, labels, advantage_rows,
                                                      **head.options(), **options)
                        else:
                            logits = forward_logits(trained, inputs, autocast_dtype)
                            out = rk.grpo_loss(logits, labels, advantage_rows, inplace_backward=True, **options)
                        loss_weight = _loss_weight(cfg.loss_type, rows, rollouts, local_tokens)
                        (out.loss * loss_weight).backward()
                    totals["tokens"] += labels.numel() / cfg.updates_per_rollout  # run by the model, padding included
                    share = int((rollouts.labels[rows] != IGNORE_INDEX).sum()) / local_tokens
                    totals["loss"] += out.loss.item() * loss_weight / cfg.updates_per_rollout
                    totals["kl"] += out.mean_kl.item() * share / cfg.updates_per_rollout
                    totals["clip_ratio"] += out.clip_ratio.item() * share / cfg.updates_per_rollout
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            group_std = rewards.std(dim=1)
            totals.update(reward=rewards.mean().item(), reward_std=group_std.mean().item(),
                          zero_std_groups=(group_std == 0).float().mean().item(),
                          answer_tokens=rollouts.answer_tokens.float().mean().item(),
                          empty_answers=sum(not a for a in rollouts.answers) / len(rollouts.answers))
            if scene_truth:  # the absolute reward of the rollouts (the grouped-comparison mean is always 1/2)
                totals["scene_reward"] = sum(scene_reward(records[i], a) for g, i in enumerate(rollouts.record_indices)
                                             for a in rollouts.answers[g * k:(g + 1) * k]) / len(rollouts.answers)
            last = {"step": step, **dist.mean(totals), "grad_norm": float(grad_norm),
                    "lr": scheduler.get_last_lr()[0]}
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                last.update(held_out_metrics())
            metrics_file.write(json.dumps(last) + "\n")
            metrics_file.flush()
            bar.update()
            bar.set_postfix(reward=f"{last.get('scene_reward', last['reward']):.3f}", kl=f"{last['kl']:.3f}",
                            tokens=f"{last['answer_tokens']:.1f}")
            if cfg.stop_after is not None and step >= cfg.stop_after:
                if step % cfg.save_every == 0:
                    checkpoint()
                bar.close()
                return {"step": step, "stopped": True, "metrics": last}
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                checkpoint()
    bar.close()
    plot = plot_grpo_metrics(metrics_path, os.path.join(cfg.output_dir, "metrics.png")) if dist.is_main else None
    return {"step": step, "metrics": last, "start_metrics": first, "metrics_path": metrics_path, "plot": plot,
            "checkpoint": ckpt_path, "model": model}


def build_parser() -> argparse.ArgumentParser:
    from rlhfv_kernels._backend import BACKENDS, describe as describe_backends

    d = GRPOConfig()
    p = argparse.ArgumentParser(prog="python -m rlhfv_train.grpo", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", help="records (.jsonl with image files, .parquet or a datasets folder; ours, RLHF-V's "
                   "or TRL's layout): their questions are the prompts, "
                   "their chosen answers the warm-up targets and the held-out reference; default: synthetic scenes")
    p.add_argument("--model", help="local Hugging Face model folder; default: the embedded tiny LLaVA")
    p.add_argument("--output-dir", default=d.output_dir, help="metrics, plot and checkpoints")
    p.add_argument("--init-weights", help="start from these weights (checkpoint.pt, sft.pt or a state dict)")
    p.add_argument("--sft-steps", type=int, help="supervised warm-up steps on the chosen answers first, saved as "
                   f"output-dir/sft.pt (default: {TINY_SFT_STEPS} for the embedded tiny model unless --init-weights, "
                   "else 0)")
    p.add_argument("--sft-lr", type=float, default=d.sft_lr, help="learning rate of the warm-up")
    p.add_argument("--sft-batch-size", type=int, default=d.sft_batch_size, help="pairs per warm-up step")
    p.add_argument("-k", "--num-generations", type=int, default=d.num_generations,
                   help="answers sampled per prompt (the group; >= 2)")
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step,
                   help="prompts per batch of rollouts, over all processes")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling (1: off)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="answer length limit of rollouts")
    reward = p.add_mutually_exclusive_group()
    reward.add_argument("--judge", help="pairwise judge for the grouped comparison: 'scene' (exact, needs the "
                        "records' objects: more correct-minus-hallucinated objects wins, then fewer hallucinated), "
                        "'scene-strict' (fewer hallucinated wins, then more correct: rewards naming nothing) or "
                        "module:function(record, pairs) -> P(first answer better) per pair (default with synthetic "
                        "data: scene)")
    reward.add_argument("--judge-model", help="local Hugging Face model folder as generative judge: it sees the "
                        "question and both answers, in both orders, and P('A') vs P('B') is read from its logits")
    reward.add_argument("--reward", help="pointwise reward instead of a judge: 'scene' ((correct - hallucinated) / "
                        "objects) or module:function(record, answer) -> float")
    p.add_argument("--judge-template", default=d.judge_template, help="the generative judge's prompt, with "
                   "{question}, {first} and {second} (default: %(default)r)")
    p.add_argument("--loss-type", choices=LOSS_TYPES, default=d.loss_type, help="how token losses are averaged")
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="ratio clip range")
    p.add_argument("--epsilon-high", type=float, help="upper clip (DAPO clip-higher; default: --epsilon)")
    p.add_argument("--beta-kl", type=float, default=d.beta_kl, help="weight of the k3 KL to the frozen starting "
                   "model (0: no reference model is kept)")
    p.add_argument("--no-scale-rewards", action="store_true", help="do not divide advantages by the group std "
                   "(Dr. GRPO)")
    p.add_argument("--updates-per-rollout", type=int, default=d.updates_per_rollout,
                   help="optimizer steps on each batch of rollouts")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="sequences per forward/backward")
    p.add_argument("--fused-linear", action="store_true", help="loss and log-probs from the last hidden states and "
                   "the lm_head weight, never materializing the logits (single process)")
    add_packing_arguments(p, "micro-batch")
    p.add_argument("--no-chat-template", action="store_true", help="plain '<image> question' prompts even when the "
                   "processor has a chat template (default: the template, in rollouts, warm-up and evaluation)")
    add_lora_arguments(p)
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="share of updates of linear warm-up")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="batches of rollouts")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping norm")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction, help="share of records held out")
    p.add_argument("--eval-data", help="held-out records in a file of their own")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations")
    p.add_argument("--no-hallucination-eval", action="store_true", help="skip the CHAIR rates of held-out answers")
    p.add_argument("--eval-max-new-tokens", type=int, default=d.eval_max_new_tokens,
                   help="answer length limit of the evaluation")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=d.seed, help="model init, data order, split and sampling")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records")
    p.add_argument("--resume", action="store_true", help="continue from output-dir/checkpoint.pt")
    p.add_argument("--backend", choices=BACKENDS, help="rlhfv_kernels backend (default: the best for the device). "
                   + describe_backends())
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard the model with FSDP2 (default: DDP)")
    p.add_argument("--synthetic-examples", type=int, default=d.synthetic_examples,
                   help="size of the generated dataset when --data is not given")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> GRPOConfig:
    from dataclasses import fields

    names = {f.name for f in fields(GRPOConfig)}
    values = {name: value for name, value in vars(args).items() if name in names}
    if args.sft_steps is None:  # the tiny model starts from random weights: it learns to describe scenes first
        values["sft_steps"] = TINY_SFT_STEPS if args.model is None and args.init_weights is None else 0
    values["scale_rewards"] = not args.no_scale_rewards
    values["hallucination_eval"] = not args.no_hallucination_eval
    values["progress"] = not args.no_progress
    values["chat_template"] = not args.no_chat_template
    return GRPOConfig(**values)


def main(argv=None) -> int:
    cfg = config_from_args(build_parser().parse_args(argv))
    try:
        summary = train_grpo(cfg)
    except USER_ERRORS as exc:
        return fail("python -m rlhfv_train.grpo", exc)
    m, start = summary["metrics"], summary.get("start_metrics") or {}
    print(f"done: step {summary['step']}; metrics {summary.get('metrics_path')}, plot {summary.get('plot')}")
    print_start_to_end("held-out", start, m, ("eval_scene_reward", "eval_win_rate", "eval_reward", "chair_s",
                                              "chair_i", "recall"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
