"""The plain eager PyTorch implementation: the oracle for tests and the baseline for benchmarks.

Self-contained on purpose: it shares no code with what it checks (only the output types), so a mistake in the
loss modules (rlhfv_kernels/losses/) or the kernels cannot hide in both. token_logprobs is what trainers write today
(the model's final logit transform, full fp32 log_softmax, then gather), so it costs 4*N*V bytes forward and more in
backward; the losses are written
straight from DESIGN.md §2 on top of it. It does not validate arguments (the public functions do). Feed float64
logits to get the float64 "truth" used by the numerics criterion (DESIGN.md §4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._param_docs import stamp  # documentation only: no computation is shared
from .losses.ddpo import DDPOOutput
from .losses.grpo import GRPOOutput


@stamp
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                   inplace_backward: bool = False, backend: str | None = None, return_entropy: bool = False):
    """log_softmax(z / temperature) gathered at labels, z = softcap * tanh(logit_scale * logits / softcap) (z =
    logit_scale * logits without a cap), as Gemma / Cohere / Granite models finish their logits; 0 where ignored.
    fp32 math (fp64 for fp64 input). return_entropy: (log-probs, -sum_v p_v log p_v per token, 0 where ignored).
    """
    _only_reference(backend)
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scaled = logits.to(compute_dtype)
    if logit_scale != 1.0:
        scaled = scaled * logit_scale
    if softcap is not None:
        scaled = softcap * torch.tanh(scaled / softcap)
    if temperature != 1.0:
        scaled = scaled / temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels)).long()
    logp = logp_all.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    # p log p = 0 where p = 0 (masked -inf logits), in value and gradient.
    entropy = -(logp_all.exp() * logp_all.masked_fill(torch.isneginf(logp_all), 0.0)).sum(-1)
    return logp, torch.where(mask, entropy, torch.zeros_like(entropy))


def _only_reference(backend) -> None:
    if backend not in (None, "eager", "reference"):
        raise ValueError(f"rlhfv_kernels.reference functions always run eagerly, got backend={backend!r}")


@stamp
def sequence_logps(logits, labels, token_weights=None, *, mode: str = "sum", ignore_index: int = -100,
                   temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                   inplace_backward: bool = False, backend: str | None = None):
    """Per-sequence score [B]: sum_t w_t logp_t, or that over sum_t w_t ('mean'); 0 for a row with sum_t w_t = 0."""
    _only_reference(backend)
    logp = token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                          logit_scale=logit_scale)
    mask = labels != ignore_index
    weights = mask.to(logp.dtype) if token_weights is None else torch.where(mask, token_weights.to(logp.dtype), 0.0)
    rows, seq_len = labels.shape[:-1].numel(), labels.shape[-1]
    logp, weights = logp.reshape(rows, seq_len), weights.reshape(rows, seq_len)
    total = (weights * logp).sum(-1)
    if mode == "sum":
        return total
    norm = weights.sum(-1)
    has_weight = norm > 0
    return torch.where(has_weight, total / torch.where(has_weight, norm, 1.0), 0.0)


@stamp
def ddpo_loss(logits, labels, ref_logps, *, token_weights=None, beta: float = 0.1, mode: str = "mean",
              reward_margin=None, drs_weight: float = 0.0, drs_k: float = 1.0, sft_weight: float = 0.0,
              ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
              logit_scale: float = 1.0, inplace_backward: bool = False, backend: str | None = None) -> DDPOOutput:
    """Dense DPO: -log sigmoid(beta_i z_i), mean over the B pairs (rows: B chosen, then B rejected)."""
    _only_reference(backend)
    transform = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    scores = sequence_logps(logits, labels, token_weights, mode=mode, ignore_index=ignore_index, **transform)
    pairs = scores.shape[0] // 2
    ref = ref_logps.to(scores.dtype)
    chosen_delta = scores[:pairs] - ref[:pairs]
    rejected_delta = scores[pairs:] - ref[pairs:]
    z = chosen_delta - rejected_delta
    if reward_margin is None or drs_weight == 0.0:
        beta_i = torch.full_like(z, beta)
    else:  # MM-DPO dynamic reward scaling, clamped at 1e-3
        scale = 1.0 + drs_weight * (1.0 - torch.exp(-drs_k * reward_margin.to(z.dtype)))
        beta_i = (beta * scale).clamp_min(1e-3)
    loss = -F.logsigmoid(beta_i * z).mean()
    sft = torch.zeros((), dtype=scores.dtype, device=scores.device)
    if sft_weight != 0.0:
        chosen_logp = token_logprobs(logits[:pairs], labels[:pairs], ignore_index=ignore_index, **transform)
        answer_tokens = (labels[:pairs] != ignore_index).sum().clamp_min(1)
        sft = -chosen_logp.sum() / answer_tokens
        loss = loss + sft_weight * sft
    chosen_rewards, rejected_rewards = (beta_i * chosen_delta).detach(), (beta_i * rejected_delta).detach()
    return DDPOOutput(loss=loss, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                      margins=chosen_rewards - rejected_rewards, accuracy=(z.detach() > 0).to(z.dtype).mean(),
                      chosen_logps=scores[:pairs].detach(), rejected_logps=scores[pairs:].detach(), beta=beta_i,
                      sft_loss=sft.detach())


@stamp
def dpo_loss(logits, labels, ref_logps, *, beta: float = 0.1, reward_margin=None, drs_weight: float = 0.0,
             drs_k: float = 1.0, sft_weight: float = 0.0, ignore_index: int = -100, temperature: float = 1.0,
             softcap: float | None = None, logit_scale: float = 1.0, inplace_backward: bool = False,
             backend: str | None = None) -> DDPOOutput:
    """Vanilla DPO: ddpo_loss with every token weight 1 and summed sequence scores."""
    return ddpo_loss(logits, labels, ref_logps, token_weights=None, beta=beta, mode="sum", reward_margin=reward_margin,
                     drs_weight=drs_weight, drs_k=drs_k, sft_weight=sft_weight, ignore_index=ignore_index,
                     temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                     inplace_backward=inplace_backward, backend=backend)


@stamp
def grpo_loss(logits, labels, advantages, *, old_logps=None, ref_logps=None, epsilon: float = 0.2,
              epsilon_high: float | None = None, beta_kl: float = 0.0, loss_type: str = "dapo",
              num_items_in_batch=None, ignore_index: int = -100, temperature: float = 1.0,
              softcap: float | None = None, logit_scale: float = 1.0, inplace_backward: bool = False,
              backend: str | None = None, max_completion_length: int | None = None,
              use_bias_correction_kl: bool = False, world_size: int | None = None, batch_rows: int | None = None,
              batch_tokens: float | None = None) -> GRPOOutput:
    """Clipped-ratio policy loss with the k3 KL penalty, aggregated as loss_type says (DESIGN.md §2); batch_rows /
    batch_tokens (the whole batch's, when this call is a part of it) replace this call's rows / loss tokens."""
    _only_reference(backend)
    logp = token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                          logit_scale=logit_scale)
    active = labels != ignore_index
    mask = active.to(logp.dtype)
    # values at ignored tokens are never read (an old log-prob of -100 there would overflow exp(0 - old))
    old = logp.detach() if old_logps is None else torch.where(active, old_logps.to(logp.dtype), 0.0)
    ratio = torch.exp(logp - old)
    adv = torch.where(active, advantages.to(logp.dtype)[:, None], 0.0)
    high = epsilon if epsilon_high is None else epsilon_high
    unclipped, clipped = ratio * adv, ratio.clamp(1.0 - epsilon, 1.0 + high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    tokens = mask.sum().clamp_min(1.0)
    mean_kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if beta_kl != 0.0:
        log_ratio = torch.where(active, ref_logps.to(logp.dtype) - logp, 0.0)
        kl = log_ratio.exp() - log_ratio - 1.0
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta_kl * kl
        mean_kl = (kl.detach() * mask).sum() / tokens
    per_token = per_token * mask
    rows = per_token.shape[0] if batch_rows is None else batch_rows
    batch = tokens if batch_tokens is None else torch.tensor(float(batch_tokens), dtype=logp.dtype,
                                                            device=logp.device).clamp_min(1.0)
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / mask.sum(-1).clamp_min(1.0)).sum() / rows
    elif loss_type == "bnpo":
        loss = per_token.sum() / batch
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (rows * (max_completion_length or per_token.shape[1]))
    elif loss_type == "dapo":
        if world_size is None:
            dist = torch.distributed
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        loss = per_token.sum() / (batch if num_items_in_batch is None else num_items_in_batch / world_size)
    else:
        raise ValueError(f"loss_type must be one of grpo, bnpo, dr_grpo, dapo, got {loss_type!r}")
    clip_ratio = ((clipped.detach() < unclipped.detach()).to(mask.dtype) * mask).sum() / tokens
    return GRPOOutput(loss=loss, token_logps=logp.detach(), mean_kl=mean_kl, clip_ratio=clip_ratio)
