"""The fused-linear family: log-probs, sequence scores, DDPO/DPO and GRPO from the last hidden states and the lm_head
weight, never materializing the N x V logits.

hidden [..., H], weight [V, H] (the lm_head's), optional bias [V]. Differentiable w.r.t. hidden, weight and bias
(dweight and dbias accumulated in fp32). Same options, backends and results as the logits functions in api.py.

Two schemes, picked per call:
- The losses (linear_ddpo_loss, linear_dpo_loss, linear_grpo_loss) with a gradient wanted: chunks of whole pairs
  (rows) and their gradients in the forward, 3 GEMMs (linear_loss.py); the backward only scales them. Ignored tokens
  (prompt, image) are skipped. chunk_size=None packs whole pairs up to DEFAULT_LOSS_CHUNK_BYTES (128 MiB) of fp32
  logits, a larger pair alone in one pass; an int is a hard bound in non-ignored tokens (a pair larger than it takes
  two passes over pieces: 4 GEMMs for that pair). Also used: the backend's logits-path row kernels.
  Without a gradient wanted (reference scoring, evaluation) the same chunks only score the tokens (one GEMM).
- Log-probs and sequence scores (their backward's coefficient is only known then), or the losses with a gradient
  also wanted for another input (ref_logps, token_weights, ...): per-token log-probs of the non-ignored tokens,
  `chunk_size` at a time, the logits recomputed in backward (4 GEMMs). chunk_size=None keeps a chunk of fp32 logits under
  DEFAULT_CHUNK_BYTES (256 MiB). Peak extra memory: one chunk of logits plus the weight-sized gradient.

Backends: "cpp" (CPU, the compiled extension: ATen/BLAS matmuls + the row kernels), "triton" (CUDA tensors, or CPU
tensors under the interpreter; log-probs: tiles of hidden @ W.T built with tensor-core dots, online LSE per token,
atomics for dhidden/dweight in fp32, chunk_size does not apply; losses: cuBLAS GEMMs + the Triton row kernels),
"reference" (hidden @ W.T, then the eager reference). On CUDA tensors None picks "triton".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend, _checks, _ops, reference
from .api import _ddpo_loss, _grpo_loss, _LinearSource, _sequence_logps
from .linear_loss import fused_linear_loss
from .losses import DDPOOutput, GRPOOutput

DEFAULT_CHUNK_BYTES = 256 << 20  # log-probs / sequence scores: one chunk of fp32 logits, recomputed in backward
# The losses' chunks hold whole pairs (rows) and live beside the fp32 dW: half the size keeps the step's peak at or
# below Liger's one-pair chunks at V=32000 (benchmarks/linear.py) at the same speed.
DEFAULT_LOSS_CHUNK_BYTES = 128 << 20


def default_chunk_rows(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * max(vocab, 1)))


def _check_linear(hidden, weight, bias, labels, ignore_index, temperature, chunk_size, min_dim):
    _checks.require_tensor(hidden, "hidden")
    _checks.require_tensor(weight, "weight")
    _checks.require_tensor(labels, "labels")
    if hidden.dtype not in _checks.LOGIT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if labels.dtype not in _checks.LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if hidden.dim() < min_dim:
        raise ValueError(f"hidden must have at least {min_dim} dimensions, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got "
                         f"{tuple(weight.shape)}")
    _checks.check_same_device(weight, "weight", hidden, "hidden")
    if bias is not None:
        _checks.require_tensor(bias, "bias")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
        _checks.check_same_device(bias, "bias", hidden, "hidden")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    _checks.check_ignore_and_temperature(ignore_index, temperature)
    _checks.check_labels(labels, hidden, vocab=weight.shape[0], ignore_index=ignore_index, inputs_name="hidden")


def linear_token_logps(hidden, weight, labels, bias, ignore_index, temperature, chunk_size, backend, *, min_dim=1):
    """Validates and computes per-token log-probs of the fused-linear path on the chosen backend."""
    _check_linear(hidden, weight, bias, labels, ignore_index, temperature, chunk_size, min_dim)
    which = _backend.resolve_backend(backend, hidden.device, path="linear")
    return _validated_token_logps(hidden, weight, labels, bias, ignore_index, temperature, chunk_size, which)


def _validated_token_logps(hidden, weight, labels, bias, ignore_index, temperature, chunk_size, which):
    if which == "reference":
        return reference.token_logprobs(F.linear(hidden, weight, bias), labels, ignore_index=ignore_index,
                                        temperature=temperature)
    chunk = chunk_size or default_chunk_rows(weight.shape[0])
    active = labels != ignore_index
    if bool(active.all()):
        return _ops.fused_linear_token_logprobs(hidden, weight, bias, labels, ignore_index, temperature, chunk, which)
    # Only the non-ignored tokens (answers, not prompt or image) go through the GEMMs: an N_active x H gather, and
    # autograd scatters their dhidden back.
    index = active.reshape(-1).nonzero().squeeze(1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    logp = _ops.fused_linear_token_logprobs(flat_hidden.index_select(0, index), weight, bias,
                                            labels.reshape(-1).index_select(0, index), ignore_index, temperature,
                                            chunk, which)
    return logp.new_zeros(labels.numel()).index_copy(0, index, logp).view(labels.shape)


def linear_loss(source, labels, ignore_index, temperature, build, constants):
    """A loss (DDPO/DPO/GRPO, given by `build`, see api.py) of the fused-linear path, by chunks of whole pairs/rows
    (linear_loss.py): gradients for hidden/weight/bias computed in the forward (three GEMMs), or none wanted (one).
    When another input of the loss (`constants`: ref_logps, token weights, ...) needs a gradient too, it scores the
    tokens and lets autograd run the recompute backward."""
    hidden, weight, bias, chunk_size = source.tensor, source.weight, source.bias, source.chunk_size
    _check_linear(hidden, weight, bias, labels, ignore_index, temperature, chunk_size, 1)
    which = _backend.resolve_backend(source.backend, hidden.device, path="linear")
    full_loss, grouped = build(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    if which == "reference" or (torch.is_grad_enabled()
                                and any(isinstance(t, torch.Tensor) and t.requires_grad for t in constants)):
        return full_loss(_validated_token_logps(hidden, weight, labels, bias, ignore_index, temperature, chunk_size,
                                                which))
    budget = chunk_size or default_chunk_rows(weight.shape[0], DEFAULT_LOSS_CHUNK_BYTES)
    return fused_linear_loss(hidden, weight, bias, labels, ignore_index, temperature, budget, chunk_size is not None,
                             which, grouped, full_loss)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, ignore_index: int = -100, temperature: float = 1.0,
                          chunk_size: int | None = None, backend: str | None = None) -> torch.Tensor:
    """log softmax((hidden @ weight.T + bias) / temperature)[labels] per token, 0.0 where ignored."""
    return linear_token_logps(hidden, weight, labels, bias, ignore_index, temperature, chunk_size, backend)


def linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          token_weights: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
                          mode: str = "sum", ignore_index: int = -100, temperature: float = 1.0,
                          chunk_size: int | None = None, backend: str | None = None) -> torch.Tensor:
    """sequence_logps from hidden states [..., T, H] and the lm_head weight."""
    return _sequence_logps(_LinearSource(hidden, weight, bias, chunk_size, backend), labels, token_weights, mode,
                           ignore_index, temperature)


def linear_ddpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor, *,
                     bias: torch.Tensor | None = None, token_weights: torch.Tensor | None = None, beta: float = 0.1,
                     mode: str = "mean", reward_margin: torch.Tensor | None = None, drs_weight: float = 0.0,
                     drs_k: float = 1.0, sft_weight: float = 0.0, ignore_index: int = -100,
                     temperature: float = 1.0, chunk_size: int | None = None,
                     backend: str | None = None) -> DDPOOutput:
    """ddpo_loss from hidden states [2B, T, H] (chosen rows first) and the lm_head weight."""
    return _ddpo_loss(_LinearSource(hidden, weight, bias, chunk_size, backend), labels, ref_logps, token_weights,
                      beta, mode, reward_margin, drs_weight, drs_k, sft_weight, ignore_index, temperature)


def linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor, *,
                    bias: torch.Tensor | None = None, beta: float = 0.1, reward_margin: torch.Tensor | None = None,
                    drs_weight: float = 0.0, drs_k: float = 1.0, sft_weight: float = 0.0, ignore_index: int = -100,
                    temperature: float = 1.0, chunk_size: int | None = None,
                    backend: str | None = None) -> DDPOOutput:
    """linear_ddpo_loss with every token weight 1 and sequence scores summed (vanilla DPO)."""
    return linear_ddpo_loss(hidden, weight, labels, ref_logps, bias=bias, token_weights=None, beta=beta, mode="sum",
                            reward_margin=reward_margin, drs_weight=drs_weight, drs_k=drs_k, sft_weight=sft_weight,
                            ignore_index=ignore_index, temperature=temperature, chunk_size=chunk_size,
                            backend=backend)


def linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor, *,
                     bias: torch.Tensor | None = None, old_logps: torch.Tensor | None = None,
                     ref_logps: torch.Tensor | None = None, epsilon: float = 0.2, epsilon_high: float | None = None,
                     beta_kl: float = 0.0, loss_type: str = "dapo", num_items_in_batch: float | None = None,
                     ignore_index: int = -100, temperature: float = 1.0, chunk_size: int | None = None,
                     backend: str | None = None) -> GRPOOutput:
    """grpo_loss from hidden states [B, T, H] and the lm_head weight."""
    return _grpo_loss(_LinearSource(hidden, weight, bias, chunk_size, backend), labels, advantages, old_logps,
                      ref_logps, epsilon, epsilon_high, beta_kl, loss_type, num_items_in_batch, ignore_index,
                      temperature)
