"""Public API: per-token log-probs, sequence scores and the DDPO / DPO / GRPO losses, straight from logits.

Every function validates its arguments, picks a backend (see _backend.py) and computes per-token log-probs once;
the losses are then tiny [B, T] math in losses.py. Logits may be bfloat16, float16 or float32 of any leading shape,
strided views included (e.g. logits[:, :-1]); results are float32 (float64 for float64 logits).

inplace_backward=True makes the backward write d(loss)/d(logits) into the logits' own storage: the logits are
consumed (their values are garbage after backward), and the peak extra memory of the step drops to O(N).
"""
from __future__ import annotations

import warnings

import torch

from . import _backend, _checks, _ops, losses, reference
from .linear_loss import GroupedLoss
from .losses import DDPOOutput, GRPOOutput

MODES = ("sum", "mean")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _token_logps(logits, labels, ignore_index, temperature, inplace_backward, backend, *, min_dim=1):
    """Validates (logits, labels) and computes per-token log-probs on the chosen backend: the one dispatch point."""
    _checks.check_logits_labels(logits, labels, ignore_index, temperature, min_dim=min_dim)
    which = _backend.resolve_backend(backend, logits.device)
    if which == "reference":
        return reference.token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature)
    _checks.check_vocab_stride(logits, which)
    if inplace_backward and logits.requires_grad and logits.is_leaf:
        warnings.warn("inplace_backward=True on a leaf tensor: backward overwrites its values with the gradient and "
                      "autograd then copies that into .grad (an N x V copy); pass the model's output logits, or use "
                      "torch.autograd.grad", RuntimeWarning, stacklevel=3)
    return _ops.fused_token_logprobs(logits, labels, ignore_index, temperature, bool(inplace_backward), which)


class _LogitsSource:
    """Per-token log-probs from logits [..., V] (the logits path)."""

    name, last_dim = "logits", "V"

    def __init__(self, logits, inplace_backward, backend):
        self.tensor, self.inplace_backward, self.backend = logits, inplace_backward, backend

    def logps(self, labels, ignore_index, temperature, min_dim=1):
        return _token_logps(self.tensor, labels, ignore_index, temperature, self.inplace_backward, self.backend,
                            min_dim=min_dim)

    def loss(self, labels, ignore_index, temperature, build, constants=()):
        """build(logp dtype) -> (full_loss, GroupedLoss); the loss's output on this source's log-probs."""
        logps = self.logps(labels, ignore_index, temperature)
        return build(logps.dtype)[0](logps)


class _LinearSource:
    """Per-token log-probs from hidden states [..., H] and the lm_head weight [V, H] (the fused-linear path)."""

    name, last_dim = "hidden", "H"

    def __init__(self, hidden, weight, bias, chunk_size, backend):
        self.tensor, self.weight, self.bias, self.chunk_size, self.backend = hidden, weight, bias, chunk_size, backend

    def logps(self, labels, ignore_index, temperature, min_dim=1):
        from .linear import linear_token_logps  # linear.py imports this module
        return linear_token_logps(self.tensor, self.weight, labels, self.bias, ignore_index, temperature,
                                  self.chunk_size, self.backend, min_dim=min_dim)

    def loss(self, labels, ignore_index, temperature, build, constants=()):
        """Like _LogitsSource.loss; the gradients come from the forward when they can (linear_loss.py)."""
        from .linear import linear_loss
        return linear_loss(self, labels, ignore_index, temperature, build, constants)


def _masked_weights(labels, token_weights, ignore_index, dtype, logits):
    mask = labels != ignore_index
    if token_weights is None:
        return mask, mask.to(dtype)
    _checks.check_token_weights(token_weights, labels, logits)
    return mask, torch.where(mask, token_weights.to(dtype), torch.zeros((), dtype=dtype, device=labels.device))


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   temperature: float = 1.0, inplace_backward: bool = False,
                   backend: str | None = None) -> torch.Tensor:
    """log softmax(logits / temperature)[labels] per token, 0.0 where labels == ignore_index.

    logits [..., V]; labels [...] int64/int32. Returns float32 of labels' shape, differentiable w.r.t. logits.
    """
    return _token_logps(logits, labels, ignore_index, temperature, inplace_backward, backend)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor | None = None, *,
                   mode: str = "sum", ignore_index: int = -100, temperature: float = 1.0,
                   inplace_backward: bool = False, backend: str | None = None) -> torch.Tensor:
    """Per-sequence score [B]: sum_t w_t logp_t ('sum') or that divided by sum_t w_t ('mean').

    logits [..., T, V]: the leading dimensions are flattened into B rows of T tokens. Weights default to 1 and are
    0 at ignored tokens whatever their value; a row whose weights sum to 0 scores 0.
    """
    return _sequence_logps(_LogitsSource(logits, inplace_backward, backend), labels, token_weights, mode,
                           ignore_index, temperature)


def _sequence_logps(source, labels, token_weights, mode, ignore_index, temperature):
    _checks.check_choice(mode, "mode", MODES)
    logps = source.logps(labels, ignore_index, temperature, min_dim=2)
    _, weights = _masked_weights(labels, token_weights, ignore_index, logps.dtype, source.tensor)
    seq_len = labels.shape[-1]
    return losses.sequence_scores(logps.reshape(-1, seq_len), weights.reshape(-1, seq_len), mode)


def ddpo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor, *,
              token_weights: torch.Tensor | None = None, beta: float = 0.1, mode: str = "mean",
              reward_margin: torch.Tensor | None = None, drs_weight: float = 0.0, drs_k: float = 1.0,
              sft_weight: float = 0.0, ignore_index: int = -100, temperature: float = 1.0,
              inplace_backward: bool = False, backend: str | None = None) -> DDPOOutput:
    """Dense DPO (RLHF-V): -log sigmoid(beta_i * ((S_c - S_c^ref) - (S_r - S_r^ref))), mean over pairs.

    logits [2B, T, V] with the B chosen rows first, then the B rejected rows; labels [2B, T]; ref_logps [2B] the
    reference model's scores computed with the same weights and mode. token_weights [2B, T] (gamma on corrected
    tokens, 1 elsewhere). reward_margin [B] >= 0 with drs_weight > 0 enables MM-DPO dynamic reward scaling.
    sft_weight adds sft_weight * (token-mean NLL of the chosen answers).
    """
    return _ddpo_loss(_LogitsSource(logits, inplace_backward, backend), labels, ref_logps, token_weights, beta, mode,
                      reward_margin, drs_weight, drs_k, sft_weight, ignore_index, temperature)


def _ddpo_loss(source, labels, ref_logps, token_weights, beta, mode, reward_margin, drs_weight, drs_k, sft_weight,
               ignore_index, temperature):
    x, name = source.tensor, source.name
    _checks.check_choice(mode, "mode", MODES)
    _checks.require_tensor(x, name)
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [2B, T, {source.last_dim}], got {tuple(x.shape)}")
    if x.shape[0] % 2 != 0:
        raise ValueError(f"{name}.shape[0] must be even (B chosen rows then B rejected rows), got {x.shape[0]}")
    _checks.check_positive_finite(beta, "beta")
    _checks.check_nonnegative_finite(sft_weight, "sft_weight")
    _checks.check_nonnegative_finite(drs_weight, "drs_weight")
    _checks.check_nonnegative_finite(drs_k, "drs_k")
    rows = x.shape[0]
    _checks.check_vector(ref_logps, "ref_logps", rows, x)
    if reward_margin is not None:
        _checks.check_vector(reward_margin, "reward_margin", rows // 2, x, nonnegative=True)
    pairs = rows // 2

    def build(dtype):
        mask, weights = _masked_weights(labels, token_weights, ignore_index, dtype, x)
        batch = dict(num_pairs=pairs, sft_tokens=mask[:pairs].to(dtype).sum())

        def loss_on(logps, sub=None):
            """The batch's loss, or (sub: rows, chosen first) that sub-batch's share of it."""
            if sub is None:
                return losses.ddpo_from_token_logps(logps, mask, weights, ref_logps, beta=beta, mode=mode,
                                                    reward_margin=reward_margin, drs_weight=drs_weight, drs_k=drs_k,
                                                    sft_weight=sft_weight)
            margin = None if reward_margin is None else reward_margin[sub[:sub.numel() // 2]]
            return losses.ddpo_from_token_logps(logps, mask[sub], weights[sub], ref_logps[sub], beta=beta, mode=mode,
                                                reward_margin=margin, drs_weight=drs_weight, drs_k=drs_k,
                                                sft_weight=sft_weight, **batch).loss

        return loss_on, GroupedLoss([(i, i + pairs) for i in range(pairs)], False, lambda sub, x: loss_on(x, sub))

    return source.loss(labels, ignore_index, temperature, build, (ref_logps, token_weights, reward_margin))


def dpo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor, *, beta: float = 0.1,
             reward_margin: torch.Tensor | None = None, drs_weight: float = 0.0, drs_k: float = 1.0,
             sft_weight: float = 0.0, ignore_index: int = -100, temperature: float = 1.0,
             inplace_backward: bool = False, backend: str | None = None) -> DDPOOutput:
    """Vanilla DPO (sigmoid loss): ddpo_loss with every token weight 1 and sequence scores summed."""
    return ddpo_loss(logits, labels, ref_logps, token_weights=None, beta=beta, mode="sum",
                     reward_margin=reward_margin, drs_weight=drs_weight, drs_k=drs_k, sft_weight=sft_weight,
                     ignore_index=ignore_index, temperature=temperature, inplace_backward=inplace_backward,
                     backend=backend)


def grpo_loss(logits: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor, *,
              old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None, epsilon: float = 0.2,
              epsilon_high: float | None = None, beta_kl: float = 0.0, loss_type: str = "dapo",
              num_items_in_batch: float | None = None, ignore_index: int = -100, temperature: float = 1.0,
              inplace_backward: bool = False, backend: str | None = None) -> GRPOOutput:
    """GRPO-style clipped policy loss over a group of rollouts (DESIGN.md §2).

    logits [B, T, V]; labels [B, T]; advantages [B] (group-normalised); old_logps [B, T] per-token log-probs of the
    sampling policy (None: the current policy, detached, i.e. ratio 1); ref_logps [B, T] needed when beta_kl > 0.
    loss_type: 'grpo' (per-sequence mean, then batch mean), 'bnpo' (token mean over the batch), 'dr_grpo'
    (sum / (B * T)), 'dapo' (sum / number of loss tokens, or / num_items_in_batch when given, e.g. the global count
    across gradient-accumulation steps).
    """
    return _grpo_loss(_LogitsSource(logits, inplace_backward, backend), labels, advantages, old_logps, ref_logps,
                      epsilon, epsilon_high, beta_kl, loss_type, num_items_in_batch, ignore_index, temperature)


def _grpo_loss(source, labels, advantages, old_logps, ref_logps, epsilon, epsilon_high, beta_kl, loss_type,
               num_items_in_batch, ignore_index, temperature):
    x, name = source.tensor, source.name
    _checks.check_choice(loss_type, "loss_type", GRPO_LOSS_TYPES)
    _checks.require_tensor(x, name)
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [B, T, {source.last_dim}], got {tuple(x.shape)}")
    _checks.check_nonnegative_finite(epsilon, "epsilon")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    _checks.check_nonnegative_finite(epsilon_high, "epsilon_high")
    _checks.check_nonnegative_finite(beta_kl, "beta_kl")
    if num_items_in_batch is not None:
        _checks.check_positive_finite(float(num_items_in_batch), "num_items_in_batch")
    _checks.require_tensor(labels, "labels")  # fully checked with the inputs when log-probs are computed
    _checks.check_vector(advantages, "advantages", x.shape[0], x)
    if old_logps is not None:
        _checks.check_per_token(old_logps, "old_logps", labels, x)
    if beta_kl > 0:
        if ref_logps is None:
            raise ValueError("ref_logps is required when beta_kl > 0")
        _checks.check_per_token(ref_logps, "ref_logps", labels, x)
    options = dict(epsilon=epsilon, epsilon_high=epsilon_high, beta_kl=beta_kl, loss_type=loss_type,
                   num_items_in_batch=num_items_in_batch)

    def build(dtype):
        mask = labels != ignore_index
        batch = dict(num_rows=mask.shape[0], loss_tokens=mask.to(dtype).sum())

        def loss_on(logps, sub=None):
            """The batch's loss, or that of the rows `sub` as their share of it."""
            if sub is None:
                return losses.grpo_from_token_logps(logps, mask, advantages, old_logps, ref_logps, **options)
            pick = lambda t: None if t is None else t[sub]  # noqa: E731
            return losses.grpo_from_token_logps(logps, mask[sub], advantages[sub], pick(old_logps), pick(ref_logps),
                                                **options, **batch).loss

        return loss_on, GroupedLoss([(i,) for i in range(mask.shape[0])], True, lambda sub, x: loss_on(x, sub))

    return source.loss(labels, ignore_index, temperature, build, (advantages, old_logps, ref_logps))
