"""Dense DPO (RLHF-V), vanilla DPO and MM-DPO dynamic reward scaling (DESIGN.md §2): output type, argument checks
and the math on per-token log-probs. Never sees an N x V tensor: the log-probs come from a source (_sources.py).

Autograd through ddpo_from_token_logps yields exactly the per-token coefficient c_t of the two-pass scheme.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks, _packing
from .._loss_spec import LossSpec
from .sequence import MODES, masked_weights, sequence_scores

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
    sub-batch of pairs is its exact share of the whole batch's loss (rlhfv_kernels/_linear_engine.py relies on this).
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


def compute(source, labels, ref_logps, *, token_weights, beta, mode, reward_margin, drs_weight, drs_k, sft_weight,
            ignore_index, temperature, packing=None, pairs=None) -> DDPOOutput:
    """ddpo_loss on any source (rlhfv_kernels/_sources.py): checks the arguments, then describes the loss to it.
    Packed (packing): the sequences anywhere in the stream, paired by `pairs` (default: the first half chosen);
    ref_logps per sequence in pack order, reward_margin per pair."""
    x, name = source.tensor, source.name
    _checks.check_choice(mode, "mode", MODES)
    _checks.require_tensor(x, name)
    layout = _packing.layout(packing, labels, pairs)
    if layout is None:
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape [2B, T, {source.last_dim}], got {tuple(x.shape)}")
        if x.shape[0] % 2 != 0:
            raise ValueError(f"{name}.shape[0] must be even (B chosen rows then B rejected rows), got {x.shape[0]}")
        rows = x.shape[0]
    elif layout.rows % 2 != 0:
        raise ValueError(f"the pack holds {layout.rows} sequences; DPO needs pairs (an even number)")
    else:
        rows = layout.rows
    _checks.check_positive_finite(beta, "beta")
    _checks.check_nonnegative_finite(sft_weight, "sft_weight")
    _checks.check_nonnegative_finite(drs_weight, "drs_weight")
    _checks.check_nonnegative_finite(drs_k, "drs_k")
    _checks.check_vector(ref_logps, "ref_logps", rows, x)
    if reward_margin is not None:
        reward_margin = _checks.check_vector(reward_margin, "reward_margin", rows // 2, x, nonnegative=True)
    pairs = rows // 2
    ref_rows = ref_logps if layout is None else layout.sequences_to_rows(ref_logps)
    options = dict(beta=beta, mode=mode, drs_weight=drs_weight, drs_k=drs_k, sft_weight=sft_weight)

    def build(dtype):
        mask, weights = masked_weights(labels, token_weights, ignore_index, dtype, x, layout)
        batch = dict(num_pairs=pairs, sft_tokens=mask[:pairs].to(dtype).sum())

        def whole(logps):
            return ddpo_from_token_logps(logps, mask, weights, ref_rows, reward_margin=reward_margin, **options)

        def share(sub, logps):  # sub: rows, the pairs' chosen rows first
            margin = None if reward_margin is None else reward_margin[sub[:sub.numel() // 2]]
            return ddpo_from_token_logps(logps, mask[sub], weights[sub], ref_rows[sub], reward_margin=margin,
                                         **options, **batch).loss

        return LossSpec(whole, share, groups=[(i, i + pairs) for i in range(pairs)], splittable=False)

    return source.loss(labels, ignore_index, temperature, build, (ref_logps, token_weights, reward_margin), layout)
