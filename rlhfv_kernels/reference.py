"""The plain eager PyTorch implementation: the oracle for tests and the baseline for benchmarks.

token_logprobs is what trainers write today (full fp32 log_softmax, then gather), so it costs 4*N*V bytes forward and
more in backward. The loss-level functions are the public ones with backend="reference": the loss math on per-token
log-probs is shared (losses.py) and checked on its own in tests/test_losses.py.
Feed float64 logits to get the float64 "truth" used by the numerics criterion (DESIGN.md §4).
"""
from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   temperature: float = 1.0, inplace_backward: bool = False) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at labels; 0 where ignored. fp32 math (fp64 for fp64 input).

    inplace_backward is accepted for signature compatibility and has no effect here.
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scaled = logits.to(compute_dtype)
    if temperature != 1.0:
        scaled = scaled / temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels)).long()
    logp = logp_all.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, logp, torch.zeros_like(logp))


def _api():
    from . import api  # imported lazily: api imports this module

    return api


def _reject_backend(kwargs: dict) -> dict:
    if kwargs.pop("backend", "reference") not in (None, "reference"):
        raise ValueError("rlhfv_kernels.reference functions always use the reference backend")
    return kwargs


def sequence_logps(logits, labels, token_weights=None, **kwargs):
    """rlhfv_kernels.sequence_logps on the eager reference."""
    return _api().sequence_logps(logits, labels, token_weights, backend="reference", **_reject_backend(kwargs))


def ddpo_loss(logits, labels, ref_logps, **kwargs):
    """rlhfv_kernels.ddpo_loss on the eager reference."""
    return _api().ddpo_loss(logits, labels, ref_logps, backend="reference", **_reject_backend(kwargs))


def dpo_loss(logits, labels, ref_logps, **kwargs):
    """rlhfv_kernels.dpo_loss on the eager reference."""
    return _api().dpo_loss(logits, labels, ref_logps, backend="reference", **_reject_backend(kwargs))


def grpo_loss(logits, labels, advantages, **kwargs):
    """rlhfv_kernels.grpo_loss on the eager reference."""
    return _api().grpo_loss(logits, labels, advantages, backend="reference", **_reject_backend(kwargs))
