"""The GRPO trainer: online GRPO with grouped comparison (Generative RLHF-V) on rlhfv_kernels' fused grpo_loss, over
run/loop.py's training loop.

Every step: sample k answers to each of a batch of prompts from the policy (rollouts.py), score each group with a
pointwise reward or, by grouped comparison, a pairwise judge (rewards.py), turn the scores into group-normalised
advantages, then take updates_per_rollout optimizer steps on the clipped GRPO loss with a k3 KL penalty to the frozen
starting model. The policy's old log-probs (for the ratio of the second and later updates) and the reference's come
from the fused kernels (rk.token_logprobs); with one update per batch of rollouts the ratio is 1 and none are computed.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from ..data import IGNORE_INDEX, BatchStream, PairCollator
from ..eval import METRICS, GenerationSettings, generate_answers, hallucination_rates
from ..models import load_processor_and_model, model_loss
from ..models.lora import add_lora, lora_settings, reference_mode
from ..run.cli import load_callable
from ..run.loop import one_run_per_folder, optimizer_and_schedule, optimizer_step, run_steps, start
from ..run.plots import plot_grpo_metrics
from . import rollouts as rollout_ops
from .config import SCENE_JUDGES, GRPOConfig
from .rewards import GenerativeJudge, GroupScorer, SceneJudge, group_advantages, scene_reward


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


@torch.no_grad()
def held_out_metrics(cfg, model, processor, scorer, held_out, device, autocast_dtype) -> dict:
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


def micro_batch_loss(cfg: GRPOConfig, trained, model, rollouts, rows: slice, advantages, old, ref,
                     tokens_per_process: float, local_tokens: int, autocast_dtype):
    """(GRPOOutput, labels) of the rollouts' rows `rows` under `trained` (the wrapped policy; `model` the plain one),
    packed when cfg.packing; old / ref: per-token log-probs of all rows, or None. The loss is the rows' exact share
    of the loss over this process's rollouts (local_tokens loss tokens; the kernels' batch_rows / batch_tokens), for
    every loss type, so the micro-batches' gradients simply add up."""
    inputs, labels, (old_rows, ref_rows), (advantage_rows,), packed, _ = rollout_ops.micro_batch_inputs(
        rollouts, rows, [old, ref], [advantages], model, packing=cfg.packing,
        max_tokens_per_row=cfg.max_tokens_per_row)
    out = model_loss("grpo_loss", trained, inputs, labels, advantage_rows, fused_linear=cfg.fused_linear,
                     autocast_dtype=autocast_dtype, inplace_backward=True, old_logps=old_rows, ref_logps=ref_rows,
                     epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta_kl=cfg.beta_kl,
                     loss_type=cfg.loss_type, temperature=cfg.temperature, backend=cfg.backend,
                     num_items_in_batch=tokens_per_process if cfg.loss_type == "dapo" else None,
                     # dr_grpo's constant: the generation budget (TRL's), whatever the rows' layout
                     max_completion_length=cfg.max_new_tokens,
                     batch_rows=rollouts.labels.shape[0], batch_tokens=local_tokens,
                     world_size=1, **packed)  # tokens_per_process is already the global count / processes
    return out, labels


def rollout_metrics(records, rollouts, rewards, scene_truth: bool) -> dict:
    """What a step records of its rollouts: the reward and its spread within groups, the groups without spread (no
    gradient), answer length, empty answers and, with ground-truth objects, the rollouts' absolute scene reward (the
    grouped-comparison mean is always 1/2)."""
    k, group_std = rollouts.k, rewards.std(dim=1)
    metrics = dict(reward=rewards.mean().item(), reward_std=group_std.mean().item(),
                   zero_std_groups=(group_std == 0).float().mean().item(),
                   answer_tokens=rollouts.answer_tokens.float().mean().item(),
                   empty_answers=sum(not a for a in rollouts.answers) / len(rollouts.answers))
    if scene_truth:
        metrics["scene_reward"] = sum(scene_reward(records[i], a) for g, i in enumerate(rollouts.record_indices)
                                      for a in rollouts.answers[g * k:(g + 1) * k]) / len(rollouts.answers)
    return metrics


def _check_scene_truth(cfg: GRPOConfig):
    """check_records for run.loop.start: the scene judge / reward needs every record's ground-truth objects."""
    def check(records, train_idx):
        if not cfg.uses_scene_truth():
            return
        missing = [records[i].source for i in train_idx if records[i].objects is None]
        if missing:
            raise ValueError(f"the scene judge / reward needs ground-truth 'objects' on every record; {len(missing)} "
                             f"have none, e.g. {missing[0]}")
    return check


@one_run_per_folder
def train_grpo(cfg: GRPOConfig) -> dict:
    """Runs (or resumes) GRPO; returns a summary with the last metrics and the paths written."""
    chosen_collate = lambda processor: PairCollator(processor, gamma=1.0,  # noqa: E731
                                                    chat_template=cfg.chat_template)
    run = start(cfg, sft_collate=chosen_collate, sft_batch_size=cfg.sft_batch_size,
                check_records=_check_scene_truth(cfg))
    records, device, dist, autocast_dtype = run.records, run.device, run.dist, run.autocast_dtype
    scorer = build_scorer(cfg, device, autocast_dtype)
    # LoRA after the SFT stage: the adapters start at a zero update, and with them disabled the model is its own
    # frozen reference (no second copy of the weights).
    model = add_lora(run.model, lora_settings(cfg), fused_linear=cfg.fused_linear)
    # The frozen reference: the starting weights (after any SFT), before a checkpoint is loaded.
    reference = None
    if cfg.beta_kl > 0 and not cfg.lora_r:
        reference = copy.deepcopy(model).requires_grad_(False)
        if run.sharded:  # sharded as the policy (FSDP2 or tensor parallel); DDP's reference stays a plain module
            reference = dist.wrap(reference, device, run.fsdp)
    model.train()
    trained = dist.wrap(model, device, run.fsdp)
    optimizer, scheduler = optimizer_and_schedule(cfg, model, cfg.max_steps * cfg.updates_per_rollout)
    stream = BatchStream(run.train_idx, cfg.prompts_per_step // dist.data_world, cfg.seed, dist.data_rank,
                         dist.data_world)
    sampling = dict(do_sample=True, num_samples=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.prompts_per_step, chat_template=cfg.chat_template)
    held_out = [records[i] for i in run.eval_idx]
    scene_truth = all(records[i].objects is not None for i in run.train_idx)
    score = dict(temperature=cfg.temperature, autocast_dtype=autocast_dtype, backend=cfg.backend,
                 micro_batch=cfg.micro_batch, fused_linear=cfg.fused_linear, packing=cfg.packing,
                 max_tokens_per_row=cfg.max_tokens_per_row)

    def train_step(step: int) -> dict:
        # Rollouts: seeded by (seed, step, rank), so a resumed run samples exactly what it would have.
        settings = GenerationSettings(**sampling, seed=cfg.seed * 1_000_003 + step * 101 + dist.data_rank)
        with dist.unsharded(model, run.fsdp):
            rollouts = rollout_ops.sample(model, run.processor, records, stream.batch(step), k=cfg.num_generations,
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
        old = rollout_ops.token_logps(model, rollouts, **score) if cfg.updates_per_rollout > 1 else None
        if cfg.beta_kl > 0 and cfg.lora_r:
            with reference_mode(model):
                ref = rollout_ops.token_logps(model, rollouts, **score)
        else:
            ref = rollout_ops.token_logps(reference, rollouts, **score) if reference is not None else None
        local_tokens = int((rollouts.labels != IGNORE_INDEX).sum())
        # dapo: the token sum over all processes / their token count; DDP averages gradients over processes.
        tokens_per_process = dist.mean({"tokens": float(local_tokens)})["tokens"]
        starts = list(range(0, rollouts.input_ids.shape[0], cfg.micro_batch))
        totals = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "tokens": 0}
        for update in range(cfg.updates_per_rollout):
            update_loss = 0.0
            for n, first_row in enumerate(starts):
                rows = slice(first_row, first_row + cfg.micro_batch)
                sync = n == len(starts) - 1  # gradients averaged across processes once per optimizer step
                with dist.skip_grad_sync(trained) if not sync else contextlib.nullcontext():
                    out, labels = micro_batch_loss(cfg, trained, model, rollouts, rows, advantages, old, ref,
                                                   tokens_per_process, local_tokens, autocast_dtype)
                    out.loss.backward()
                totals["tokens"] += labels.numel() / cfg.updates_per_rollout  # run by the model, padding included
                share = int((rollouts.labels[rows] != IGNORE_INDEX).sum()) / local_tokens
                update_loss += out.loss.item()
                totals["kl"] += out.mean_kl.item() * share / cfg.updates_per_rollout
                totals["clip_ratio"] += out.clip_ratio.item() * share / cfg.updates_per_rollout
            totals["loss"] += update_loss / cfg.updates_per_rollout
            where = f"step {step + 1}, update {update + 1} of {cfg.updates_per_rollout}"
            grad_norm = optimizer_step(model, optimizer, scheduler, cfg.max_grad_norm, guard=run.guard,
                                       loss=dist.mean({"loss": update_loss})["loss"], where=where)
        totals.update(rollout_metrics(records, rollouts, rewards, scene_truth))
        return {**dist.mean(totals), "grad_norm": grad_norm}

    def evaluate() -> dict:
        with dist.unsharded(model, run.fsdp):
            return held_out_metrics(cfg, model, run.processor, scorer, held_out, device, autocast_dtype)

    def postfix(m: dict) -> dict:
        return {"reward": f"{m.get('scene_reward', m['reward']):.3f}", "kl": f"{m['kl']:.3f}",
                "tokens": f"{m['answer_tokens']:.1f}"}

    return run_steps(run, model, optimizer, scheduler, train_step=train_step, evaluate=evaluate,
                     progress_postfix=postfix, plot=plot_grpo_metrics, desc="grpo")
