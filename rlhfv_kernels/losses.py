"""Loss math on per-token log-probs and per-sequence scores (DESIGN.md §2). Never sees an N x V tensor.

These functions are shared by every backend: what differs between backends is only how per-token log-probs are
computed from logits. Autograd through them yields exactly the per-token coefficient c_t of the two-pass scheme.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DRS_MIN_BETA = 1e-3  # MM-DPO: per-pair beta is clamped from below so a pair never stops contributing


@dataclass
class DDPOOutput:
    """Result of ddpo_loss / dpo_loss. Metrics are detached; `loss` carries the gradient."""

    loss: torch.Tensor              # scalar
    chosen_rewards: torch.Tensor    # [B] beta_i * (S_chosen - S_ref_chosen)
    rejected_rewards: torch.Tensor  # [B]
    margins: torch.Tensor           # [B] chosen_rewards - rejected_rewards
    accuracy: torch.Tensor          # scalar, fraction of pairs with z_i > 0
    chosen_logps: torch.Tensor      # [B] policy sequence scores
    rejected_logps: torch.Tensor    # [B]
    beta: torch.Tensor              # [B] the per-pair beta actually used
    sft_loss: torch.Tensor          # scalar, token-mean NLL of the chosen answers (0 if sft_weight == 0)


@dataclass
class GRPOOutput:
    """Result of grpo_loss. Metrics are detached; `loss` carries the gradient."""

    loss: torch.Tensor          # scalar
    token_logps: torch.Tensor   # [B, T] policy log-probs (detached), 0 at ignored tokens
    mean_kl: torch.Tensor       # scalar, token mean of the k3 KL estimate (0 if beta_kl == 0)
    clip_ratio: torch.Tensor    # scalar, fraction of tokens where the clipped term was the one taken


def sequence_scores(token_logps: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-row score of [B, T] token log-probs: sum_t w_t logp_t, or that over sum_t w_t ('mean').

    `weights` must already be 0 at ignored tokens. A row whose weights sum to 0 scores 0 in both modes.
    """
    total = (token_logps * weights).sum(-1)
    if mode == "sum":
        return total
    norm = weights.sum(-1)
    # where() keeps the gradient finite: the division is only taken where norm > 0.
    return torch.where(norm > 0, total / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(total))


def drs_beta(beta: float, reward_margin: torch.Tensor | None, drs_weight: float, drs_k: float,
             like: torch.Tensor) -> torch.Tensor:
    """MM-DPO dynamic reward scaling: beta_i = beta * (1 + w * (1 - exp(-k * delta_i))), at least DRS_MIN_BETA."""
    if reward_margin is None or drs_weight == 0.0:
        return torch.full_like(like, beta)
    delta = reward_margin.to(like.dtype)
    return (beta * (1.0 + drs_weight * (1.0 - torch.exp(-drs_k * delta)))).clamp_min(DRS_MIN_BETA)


def ddpo_from_token_logps(token_logps: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
                          ref_logps: torch.Tensor, *, beta: float, mode: str, reward_margin: torch.Tensor | None,
                          drs_weight: float, drs_k: float, sft_weight: float, num_pairs: int | None = None,
                          sft_tokens: torch.Tensor | None = None) -> DDPOOutput:
    """DDPO on [2B, T] token log-probs (first B rows chosen, last B rejected); `weights` already masked.

    num_pairs / sft_tokens override the batch-wide normalisers (pair count, chosen-token count), so that the loss of a
    sub-batch of pairs is its exact share of the whole batch's loss (rlhfv_kernels/linear_loss.py relies on this).
    """
    scores = sequence_scores(token_logps, weights, mode)
    pairs = scores.shape[0] // 2
    chosen, rejected = scores[:pairs], scores[pairs:]
    ref = ref_logps.to(scores.dtype)
    chosen_delta = chosen - ref[:pairs]
    rejected_delta = rejected - ref[pairs:]
    z = chosen_delta - rejected_delta
    beta_i = drs_beta(beta, reward_margin, drs_weight, drs_k, z.detach())
    per_pair = -torch.nn.functional.logsigmoid(beta_i * z)
    if num_pairs is not None:
        loss = per_pair.sum() / max(num_pairs, 1)
    else:
        loss = per_pair.mean() if pairs > 0 else per_pair.sum()
    if sft_weight != 0.0:
        chosen_mask = mask[:pairs].to(token_logps.dtype)
        count = chosen_mask.sum() if sft_tokens is None else sft_tokens
        sft = -(token_logps[:pairs] * chosen_mask).sum() / count.clamp_min(1.0)
        loss = loss + sft_weight * sft
    else:
        sft = torch.zeros((), dtype=scores.dtype, device=scores.device)
    chosen_rewards = (beta_i * chosen_delta).detach()
    rejected_rewards = (beta_i * rejected_delta).detach()
    accuracy = (z.detach() > 0).to(scores.dtype).mean() if pairs > 0 else torch.zeros((), dtype=scores.dtype,
                                                                                       device=scores.device)
    return DDPOOutput(loss=loss, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                      margins=chosen_rewards - rejected_rewards, accuracy=accuracy, chosen_logps=chosen.detach(),
                      rejected_logps=rejected.detach(), beta=beta_i, sft_loss=sft.detach())


def grpo_from_token_logps(token_logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                          old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None, *, epsilon: float,
                          epsilon_high: float, beta_kl: float, loss_type: str,
                          num_items_in_batch: float | None, num_rows: int | None = None,
                          loss_tokens: torch.Tensor | None = None) -> GRPOOutput:
    """Clipped-ratio policy loss with optional k3 KL penalty on [B, T] token log-probs (DESIGN.md §2).

    num_rows / loss_tokens override the batch-wide normalisers (row count, unmasked-token count), so that the loss of
    a sub-batch of rows is its exact share of the whole batch's loss (rlhfv_kernels/linear_loss.py relies on this).
    """
    maskf = mask.to(token_logps.dtype)
    old = token_logps.detach() if old_logps is None else old_logps.to(token_logps.dtype)
    ratio = torch.exp(token_logps - old)
    adv = advantages.to(token_logps.dtype).unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if beta_kl != 0.0:
        diff = ref_logps.to(token_logps.dtype) - token_logps
        kl = torch.exp(diff) - diff - 1.0
        per_token = per_token + beta_kl * kl
        mean_kl = (kl.detach() * maskf).sum() / maskf.sum().clamp_min(1.0)
    else:
        mean_kl = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    per_token = per_token * maskf
    rows = per_token.shape[0] if num_rows is None else num_rows
    tokens = (maskf.sum() if loss_tokens is None else loss_tokens).clamp_min(1.0)
    if loss_type == "grpo":
        per_seq = per_token.sum(-1) / maskf.sum(-1).clamp_min(1.0)
        if num_rows is not None:
            loss = per_seq.sum() / max(num_rows, 1)
        else:
            loss = per_seq.mean() if per_seq.numel() else per_seq.sum()
    elif loss_type == "bnpo":
        loss = per_token.sum() / tokens
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / max(rows * per_token.shape[-1], 1)
    else:  # dapo: normalised by the global number of loss tokens (across accumulation steps / ranks if given)
        denom = tokens if num_items_in_batch is None else num_items_in_batch
        loss = per_token.sum() / denom
    clip_ratio = ((clipped.detach() < unclipped.detach()).to(maskf.dtype) * maskf).sum() / maskf.sum().clamp_min(1.0)
    return GRPOOutput(loss=loss, token_logps=token_logps.detach(), mean_kl=mean_kl, clip_ratio=clip_ratio)
