"""Per-sequence scores S = sum_t w_t logp_t ('sum') or that over sum_t w_t ('mean') (DESIGN.md §2)."""
from __future__ import annotations

import torch

from .. import _checks, _packing

MODES = ("sum", "mean")


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


def masked_weights(labels, token_weights, ignore_index, dtype, inputs, layout=None):
    """(mask of non-ignored tokens, token weights in `dtype` that are 0 at ignored tokens; 1 elsewhere if None), as
    the loss's rows (under a packed `layout`, labels and weights are the stream's, checked there)."""
    if token_weights is not None:
        token_weights = _checks.check_token_weights(token_weights, labels, inputs, ignore_index)
    labels = _packing.as_rows(layout, labels, ignore_index)
    token_weights = None if token_weights is None else _packing.as_rows(layout, token_weights, 0)
    mask = labels != ignore_index
    if token_weights is None:
        return mask, mask.to(dtype)
    return mask, torch.where(mask, token_weights.to(dtype), torch.zeros((), dtype=dtype, device=labels.device))


def compute(source, labels, token_weights, *, mode, ignore_index, temperature, packing=None) -> torch.Tensor:
    """sequence_logps on any source (rlhfv_kernels/_sources.py): [..., T] tokens flattened into B rows, or (packing)
    one score per packed sequence, in pack order."""
    _checks.check_choice(mode, "mode", MODES)
    layout = _packing.layout(packing, labels)
    if layout is not None:
        logps = layout.to_rows(source.logps(labels, ignore_index, temperature), 0)
        _, weights = masked_weights(labels, token_weights, ignore_index, logps.dtype, source.tensor, layout)
        return sequence_scores(logps, weights, mode)
    logps = source.logps(labels, ignore_index, temperature, min_dim=2)
    _, weights = masked_weights(labels, token_weights, ignore_index, logps.dtype, source.tensor)
    rows = labels.shape[:-1].numel()  # not reshape(-1, T): T may be 0
    return sequence_scores(logps.reshape(rows, labels.shape[-1]), weights.reshape(rows, labels.shape[-1]), mode)
