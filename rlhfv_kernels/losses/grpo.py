"""GRPO-style grouped policy loss (Generative RLHF-V; DESIGN.md §2): output type, argument checks and the clipped-
ratio math with an optional k3 KL penalty on per-token log-probs. Never sees an N x V tensor."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks, _packing
from .._loss_spec import LossSpec

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class GRPOOutput:
    """Result of grpo_loss. Metrics are detached; `loss` carries the gradient."""

    loss: torch.Tensor          # scalar
    token_logps: torch.Tensor   # [B, T] policy log-probs (detached), 0 at ignored tokens
    mean_kl: torch.Tensor       # scalar, token mean of the k3 KL estimate (0 if beta_kl == 0)
    clip_ratio: torch.Tensor    # scalar, fraction of tokens where the clipped term was the one taken


def grpo_from_token_logps(token_logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                          old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None, *, epsilon: float,
                          epsilon_high: float, beta_kl: float, loss_type: str,
                          num_items_in_batch: float | None, max_completion_length: int | None = None,
                          use_bias_correction_kl: bool = False, world_size: int = 1, batch_rows: int | None = None,
                          batch_tokens: torch.Tensor | float | None = None) -> GRPOOutput:
    """Clipped-ratio policy loss with optional k3 KL penalty on [B, T] token log-probs (DESIGN.md §2).

    Conventions (TRL's and Liger's): dapo divides by num_items_in_batch / world_size, num_items_in_batch being the
    loss tokens of the whole batch over every process (DDP then averages the gradients); dr_grpo divides by
    B * max_completion_length (None: the width T); use_bias_correction_kl multiplies the k3 term by the ratio.
    batch_rows / batch_tokens replace this call's row count and loss-token count as normalisers (grpo and dr_grpo
    divide by rows, bnpo and dapo without num_items_in_batch by tokens), so that the loss of a sub-batch of rows is
    its exact share of the whole batch's loss (gradient accumulation; rlhfv_kernels/_linear_engine.py's row chunks).
    """
    maskf = mask.to(token_logps.dtype)
    # Nothing at an ignored token is read: old / ref log-probs and the advantage of a row are replaced by 0 there
    # (real padding's old log-probs are often below -88.7, where exp(0 - old) overflows to inf, and inf * 0 is NaN).
    mask = mask.bool()
    zero = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    old = token_logps.detach() if old_logps is None else torch.where(mask, old_logps.to(token_logps.dtype), zero)
    ratio = torch.exp(token_logps - old)
    adv = torch.where(mask, advantages.to(token_logps.dtype).unsqueeze(-1), zero)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if beta_kl != 0.0:
        diff = torch.where(mask, ref_logps.to(token_logps.dtype) - token_logps, zero)
        kl = torch.exp(diff) - diff - 1.0
        if use_bias_correction_kl:  # importance-sampling-corrected KL (DeepSeek-V3.2), with the ratio's gradient
            kl = kl * ratio
        per_token = per_token + beta_kl * kl
        mean_kl = (kl.detach() * maskf).sum() / maskf.sum().clamp_min(1.0)
    else:
        mean_kl = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    per_token = per_token * maskf
    rows = per_token.shape[0] if batch_rows is None else batch_rows
    tokens = (maskf.sum() if batch_tokens is None
              else torch.as_tensor(batch_tokens, dtype=maskf.dtype, device=maskf.device)).clamp_min(1.0)
    if loss_type == "grpo":
        per_seq = per_token.sum(-1) / maskf.sum(-1).clamp_min(1.0)
        if batch_rows is not None:
            loss = per_seq.sum() / max(batch_rows, 1)
        else:
            loss = per_seq.mean() if per_seq.numel() else per_seq.sum()
    elif loss_type == "bnpo":
        loss = per_token.sum() / tokens
    elif loss_type == "dr_grpo":
        width = per_token.shape[-1] if max_completion_length is None else max_completion_length
        loss = per_token.sum() / max(rows * width, 1)
    else:  # dapo: this process's share of the global token mean (num_items_in_batch: tokens over all processes)
        denom = tokens if num_items_in_batch is None else max(float(num_items_in_batch) / world_size, 1.0)
        loss = per_token.sum() / denom
    clip_ratio = ((clipped.detach() < unclipped.detach()).to(maskf.dtype) * maskf).sum() / maskf.sum().clamp_min(1.0)
    return GRPOOutput(loss=loss, token_logps=token_logps.detach(), mean_kl=mean_kl, clip_ratio=clip_ratio)


def resolve_world_size(world_size: int | None) -> int:
    """world_size, or (None) the torch.distributed group's size when one is initialized, else 1."""
    if world_size is None:
        distributed = torch.distributed
        return distributed.get_world_size() if distributed.is_available() and distributed.is_initialized() else 1
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int or None, got {world_size!r}")
    return world_size


def compute(source, labels, advantages, *, old_logps, ref_logps, epsilon, epsilon_high, beta_kl, loss_type,
            num_items_in_batch, ignore_index, temperature, max_completion_length=None, use_bias_correction_kl=False,
            world_size=None, batch_rows=None, batch_tokens=None, packing=None) -> GRPOOutput:
    """grpo_loss on any source (rlhfv_kernels/_sources.py): checks the arguments, then describes the loss to it.
    Packed (packing): advantages per sequence in pack order; per-token inputs and token_logps in the stream's shape;
    dr_grpo's default width is the padded one (max_seqlen, else the longest sequence)."""
    x, name = source.tensor, source.name
    _checks.check_choice(loss_type, "loss_type", LOSS_TYPES)
    _checks.require_tensor(x, name)
    layout = _packing.layout(packing, labels)
    if layout is None and x.dim() != 3:
        raise ValueError(f"{name} must have shape [B, T, {source.last_dim}], got {tuple(x.shape)}")
    rows = x.shape[0] if layout is None else layout.rows
    _checks.check_nonnegative_finite(epsilon, "epsilon")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    _checks.check_nonnegative_finite(epsilon_high, "epsilon_high")
    _checks.check_nonnegative_finite(beta_kl, "beta_kl")
    if num_items_in_batch is not None:
        _checks.check_positive_finite(float(num_items_in_batch), "num_items_in_batch")
    _checks.require_tensor(labels, "labels")  # fully checked with the inputs when log-probs are computed
    _checks.check_vector(advantages, "advantages", rows, x)
    if old_logps is not None:
        _checks.check_per_token(old_logps, "old_logps", labels, x)
    if beta_kl > 0:
        if ref_logps is None:
            raise ValueError("ref_logps is required when beta_kl > 0")
        _checks.check_per_token(ref_logps, "ref_logps", labels, x)
    if max_completion_length is not None and (not isinstance(max_completion_length, int)
                                              or isinstance(max_completion_length, bool) or max_completion_length < 1):
        raise ValueError(f"max_completion_length must be a positive int or None, got {max_completion_length!r}")
    if not isinstance(use_bias_correction_kl, bool):
        raise TypeError(f"use_bias_correction_kl must be a bool, got {use_bias_correction_kl!r}")
    if batch_rows is not None and (not isinstance(batch_rows, int) or isinstance(batch_rows, bool)
                                   or batch_rows < rows):
        raise ValueError(f"batch_rows must be an int >= this call's {rows} rows (the whole batch's row count) or "
                         f"None, got {batch_rows!r}")
    if batch_tokens is not None:
        _checks.check_positive_finite(float(batch_tokens), "batch_tokens")
    options = dict(epsilon=epsilon, epsilon_high=epsilon_high, beta_kl=beta_kl, loss_type=loss_type,
                   num_items_in_batch=num_items_in_batch, max_completion_length=max_completion_length,
                   use_bias_correction_kl=use_bias_correction_kl, world_size=resolve_world_size(world_size))

    old_rows = None if old_logps is None else _packing.as_rows(layout, old_logps, 0.0)
    ref_rows = None if ref_logps is None else _packing.as_rows(layout, ref_logps, 0.0)

    def build(dtype):
        mask = _packing.as_rows(layout, labels, ignore_index) != ignore_index
        given = dict(batch_rows=batch_rows, batch_tokens=batch_tokens)  # the caller's batch, or (None) this call
        batch = dict(batch_rows=mask.shape[0] if batch_rows is None else batch_rows,
                     batch_tokens=mask.to(dtype).sum() if batch_tokens is None else batch_tokens)

        def whole(logps):
            return grpo_from_token_logps(logps, mask, advantages, old_rows, ref_rows, **options, **given)

        def share(sub, logps):
            pick = lambda t: None if t is None else t[sub]  # noqa: E731
            return grpo_from_token_logps(logps, mask[sub], advantages[sub], pick(old_rows), pick(ref_rows),
                                         **options, **batch).loss

        return LossSpec(whole, share, groups=[(i,) for i in range(mask.shape[0])], splittable=True)

    output = source.loss(labels, ignore_index, temperature, build, (advantages, old_logps, ref_logps), layout)
    if layout is not None:
        output.token_logps = layout.to_stream(output.token_logps)
    return output
