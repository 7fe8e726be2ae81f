"""Where per-token log-probs come from: logits [..., V] (LogitsSource) or hidden states [..., H] and the lm_head
weight [V, H] (LinearSource). This is the one dispatch point: a source validates its inputs once, resolves the
backend (_backend.py) and runs the backend's operators (_ops.py) or the eager reference.

Every loss (rlhfv_kernels/losses/) is written once against this small interface:
    source.tensor, source.name, source.last_dim   the input and how to name it in errors
    source.logps(labels, ignore_index, temperature, min_dim)  -> per-token log-probs (differentiable)
    source.logps_and_entropy(labels, ignore_index, temperature)  -> (log-probs, entropies), both differentiable
    source.loss(labels, ignore_index, temperature, build, constants, layout)  -> the loss output
where build(dtype) -> LossSpec (_loss_spec.py: the whole batch's loss and a sub-batch's share of it) describes the
loss. Labels are always the caller's; under a packed `layout` (_packing.py) the spec takes the log-probs as its padded
rows.

A source also carries the model's final logit transform (softcap, logit_scale; DESIGN.md §2): the log-probs are those
of softmax(z / temperature), z = softcap * tanh(logit_scale * x / softcap) (or z = logit_scale * x without a cap).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import _backend, _checks, _ops, _vocab_parallel, reference
from ._packing import as_rows
from ._linear_engine import fused_linear_loss


def resolved(backend: str | None, device: torch.device, path: str = "logits") -> str:
    """_backend.resolve_backend, with the chosen family's operators registered (the Triton family on first use)."""
    which = _backend.resolve_backend(backend, device, path)
    if which == "triton":
        from .triton import ops  # noqa: F401  (an import statement: torch.compile runs it; see _backend.operators)
    return which


def kernel_transform(temperature: float, softcap: float | None, logit_scale: float) -> tuple[float, float]:
    """(temperature, softcap) of the operators (csrc/ops.cpp), whose z is x / t or c * tanh(x / c) / t, for the
    public z = softcap * tanh(s * x / softcap) / temperature: the scale s folds into both, since
    softcap * tanh(s x / softcap) / t = (softcap / s) * tanh(x / (softcap / s)) / (t / s). No extra kernel work."""
    if logit_scale == 1.0:
        return float(temperature), float(softcap or 0.0)
    return float(temperature) / logit_scale, (float(softcap) / logit_scale if softcap else 0.0)

DEFAULT_CHUNK_BYTES = 256 << 20  # log-probs / sequence scores: one chunk of fp32 logits, recomputed in backward
# The losses' chunks hold whole pairs (rows) and live beside the fp32 dW: half the size keeps the step's peak at or
# below Liger's one-pair chunks at V=32000 (benchmarks/linear.py) at the same speed.
DEFAULT_LOSS_CHUNK_BYTES = 128 << 20


_EAGER_SHARDED = ("backend='eager' computes on whole tensors, and {} sharded over the vocabulary would be gathered "
                  "whole (N x V on every rank); use a fused backend (None picks one)")


def default_chunk_rows(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * max(vocab, 1)))


class LogitsSource:
    """Per-token log-probs from logits [..., V] (the logits path)."""

    name, last_dim = "logits", "V"

    def __init__(self, logits, inplace_backward: bool = False, backend: str | None = None, *,
                 softcap: float | None = None, logit_scale: float = 1.0):
        _checks.check_logit_transform(softcap, logit_scale)
        # A DTensor sharded over the vocabulary: its local slice, and the slice's place (_vocab_parallel.py)
        self.tensor, self.shard = _vocab_parallel.split_logits(logits)
        self.inplace_backward, self.backend = inplace_backward, backend
        self.softcap, self.logit_scale = softcap, logit_scale

    def logps(self, labels, ignore_index, temperature, min_dim=1):
        return self._token_logps(labels, ignore_index, temperature, min_dim, with_entropy=False)

    def logps_and_entropy(self, labels, ignore_index, temperature):
        return self._token_logps(labels, ignore_index, temperature, 1, with_entropy=True)

    def _token_logps(self, labels, ignore_index, temperature, min_dim, with_entropy):
        logits, shard = self.tensor, self.shard
        labels = _checks.check_logits_labels(logits, labels, ignore_index, temperature, min_dim=min_dim,
                                             vocab=shard.vocab if shard else None)
        which = resolved(self.backend, logits.device)
        if shard is not None and which == "eager":
            raise ValueError(_EAGER_SHARDED.format("logits"))
        if which == "eager":
            return reference.token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature,
                                            softcap=self.softcap, logit_scale=self.logit_scale,
                                            return_entropy=with_entropy)
        _checks.check_vocab_stride(logits, which)
        if self.inplace_backward and logits.requires_grad:
            _checks.check_rows_disjoint(logits)
        if self.inplace_backward and logits.requires_grad and logits.is_leaf:
            warnings.warn("inplace_backward=True on a leaf tensor: backward overwrites its values with the gradient "
                          "and autograd then copies that into .grad (an N x V copy); pass the model's output logits, "
                          "or use torch.autograd.grad", RuntimeWarning, stacklevel=3)
        kernel_temperature, kernel_softcap = kernel_transform(temperature, self.softcap, self.logit_scale)
        if shard is not None:
            logp, entropy = _vocab_parallel.ShardedLogps.apply(logits, labels, shard, ignore_index,
                                                               kernel_temperature, kernel_softcap,
                                                               bool(self.inplace_backward), which, with_entropy)
            return (logp, entropy) if with_entropy else logp
        return _ops.fused_token_logprobs(logits, labels, ignore_index, kernel_temperature, kernel_softcap,
                                         bool(self.inplace_backward), which, with_entropy)

    def loss(self, labels, ignore_index, temperature, build, constants=(), layout=None):
        logps = self.logps(labels, ignore_index, temperature)
        return build(logps.dtype).whole(as_rows(layout, logps, 0))


class LinearSource:
    """Per-token log-probs from hidden states [..., H] and the lm_head weight [V, H] (the fused-linear path).

    Log-probs: the non-ignored tokens `chunk_size` at a time, logits recomputed in backward (4 GEMMs). Losses: chunks
    of whole pairs/rows with their gradients computed in the forward (3 GEMMs, _linear_engine.py), unless another input
    of the loss (`constants`: ref_logps, token weights, ...) needs a gradient too.
    """

    name, last_dim = "hidden", "H"

    def __init__(self, hidden, weight, bias=None, chunk_size: int | None = None, backend: str | None = None, *,
                 softcap: float | None = None, logit_scale: float = 1.0, low_rank=None):
        _checks.check_logit_transform(softcap, logit_scale)
        low, low_weight = _check_low_rank(low_rank)
        hidden, weight, bias, low, low_weight = _under_autocast(hidden, weight, bias, low, low_weight)
        # A weight sharded over the vocabulary: the local tensors and the slice's place (_vocab_parallel.py)
        hidden, weight, bias, self.shard, self.plain_hidden = _vocab_parallel.split_linear(hidden, weight, bias)
        if self.shard is not None and low is not None:
            raise ValueError("low_rank (a LoRA adapter on the head) is not supported with the weight sharded over "
                             "the vocabulary; merge the adapter, or keep the head whole on every rank")
        self.tensor, self.weight, self.bias, self.chunk_size, self.backend = hidden, weight, bias, chunk_size, backend
        self.low_rank = (low, low_weight)
        self.softcap, self.logit_scale = softcap, logit_scale

    def _checked_backend(self, labels, ignore_index, temperature, min_dim):
        """(the backend, the labels to use: _checks.checked_values)"""
        labels = _check_linear(self.tensor, self.weight, self.bias, labels, ignore_index, temperature,
                               self.chunk_size, min_dim, self.low_rank, vocab=self.shard.vocab if self.shard else None)
        which = resolved(self.backend, self.tensor.device, path="linear")
        if self.shard is not None:
            if which == "eager":
                raise ValueError(_EAGER_SHARDED.format("the lm_head weight"))
            if self.plain_hidden:
                _vocab_parallel.check_same_tokens(labels, self.shard)
        return which, labels

    def _widened(self):
        """(hidden, weight) with the low-rank term folded in, [hidden, u] and [W, B] (a [V, H + r] copy): for the
        paths whose operators take one weight (the log-probs, the eager reference)."""
        low, low_weight = self.low_rank
        if low is None:
            return self.tensor, self.weight
        return torch.cat([self.tensor, low], -1), torch.cat([self.weight, low_weight], 1)

    def logps(self, labels, ignore_index, temperature, min_dim=1):
        which, labels = self._checked_backend(labels, ignore_index, temperature, min_dim)
        return self._token_logps(labels, ignore_index, temperature, which)

    def logps_and_entropy(self, labels, ignore_index, temperature):
        which, labels = self._checked_backend(labels, ignore_index, temperature, 1)
        return self._token_logps(labels, ignore_index, temperature, which, with_entropy=True)

    def _token_logps(self, labels, ignore_index, temperature, which, with_entropy=False):
        (hidden, weight), bias = self._widened(), self.bias
        if which == "eager":
            return reference.token_logprobs(F.linear(hidden, weight, bias), labels, ignore_index=ignore_index,
                                            temperature=temperature, softcap=self.softcap,
                                            logit_scale=self.logit_scale, return_entropy=with_entropy)
        chunk = self.chunk_size or default_chunk_rows(weight.shape[0])
        kernel_temperature, kernel_softcap = kernel_transform(temperature, self.softcap, self.logit_scale)
        run = _ops.fused_linear_token_logprobs_entropy if with_entropy else _ops.fused_linear_token_logprobs
        if self.shard is not None:
            def run(hidden, weight, bias, labels, *args):
                logp, entropy = _vocab_parallel.ShardedLinearLogps.apply(
                    hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), self.shard, *args,
                    with_entropy)
                return (logp.view(labels.shape), entropy.view(labels.shape)) if with_entropy else logp.view(
                    labels.shape)
        active = labels != ignore_index
        if bool(active.all()):
            return run(hidden, weight, bias, labels, ignore_index, kernel_temperature, kernel_softcap, chunk, which)
        # Only the non-ignored tokens (answers, not prompt or image) go through the GEMMs: an N_active x H gather,
        # and autograd scatters their dhidden back.
        index = active.reshape(-1).nonzero().squeeze(1)
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        outputs = run(flat_hidden.index_select(0, index), weight, bias, labels.reshape(-1).index_select(0, index),
                      ignore_index, kernel_temperature, kernel_softcap, chunk, which)
        scattered = tuple(out.new_zeros(labels.numel()).index_copy(0, index, out).view(labels.shape)
                          for out in (outputs if with_entropy else (outputs,)))
        return scattered if with_entropy else scattered[0]

    def loss(self, labels, ignore_index, temperature, build, constants=(), layout=None):
        which, labels = self._checked_backend(labels, ignore_index, temperature, 1)
        hidden, weight = self.tensor, self.weight
        spec = build(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        # The engine's gradients-in-forward scheme is single-process; a sharded weight takes the log-probs scheme
        # (4 GEMMs, one collective in the forward: _vocab_parallel.py).
        if which == "eager" or self.shard is not None or (
                torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in constants)):
            return spec.whole(as_rows(layout, self._token_logps(labels, ignore_index, temperature, which), 0))
        budget = self.chunk_size or default_chunk_rows(weight.shape[0], DEFAULT_LOSS_CHUNK_BYTES)
        kernel_temperature, kernel_softcap = kernel_transform(temperature, self.softcap, self.logit_scale)
        return fused_linear_loss(hidden, weight, self.bias, labels, ignore_index, kernel_temperature, kernel_softcap,
                                 budget, self.chunk_size is not None, which, spec, layout, self.low_rank)


def _check_low_rank(low_rank):
    """(u, B) of a low_rank argument, or (None, None)."""
    if low_rank is None:
        return None, None
    if not isinstance(low_rank, (tuple, list)) or len(low_rank) != 2:
        raise TypeError(f"low_rank must be a pair (u, B) of tensors or None, got {type(low_rank).__name__}")
    return tuple(low_rank)


def _under_autocast(hidden, weight, bias, *others):
    """Under torch.autocast the head's matmul runs in the autocast dtype, as F.linear(hidden, weight, bias) would:
    the inputs are cast to it here (differentiably), so every backend computes the same thing (a compiled kernel's
    internal GEMMs would otherwise be autocast unannounced)."""
    inputs = (hidden, weight, bias, *others)
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return inputs
    device = hidden.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return inputs
    dtype = torch.get_autocast_dtype(device)
    if not (hidden.is_floating_point() and weight.is_floating_point()) or torch.float64 in (hidden.dtype,
                                                                                             weight.dtype):
        return inputs
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t
                 for t in inputs)


def _check_linear(hidden, weight, bias, labels, ignore_index, temperature, chunk_size, min_dim,
                  low_rank=(None, None), vocab=None):
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
    low, low_weight = low_rank
    if low is not None:
        _checks.require_tensor(low, "low_rank[0] (u)")
        _checks.require_tensor(low_weight, "low_rank[1] (B)")
        for t, name in ((low, "low_rank[0] (u)"), (low_weight, "low_rank[1] (B)")):
            if t.dtype != hidden.dtype:
                raise TypeError(f"{name} dtype {t.dtype} must equal hidden dtype {hidden.dtype}")
            _checks.check_same_device(t, name, hidden, "hidden")
        if low.dim() != hidden.dim() or low.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"low_rank[0] (u) must have shape [..., r] with the leading dimensions of hidden "
                             f"{tuple(hidden.shape[:-1])}, got {tuple(low.shape)}")
        if low_weight.dim() != 2 or tuple(low_weight.shape) != (weight.shape[0], low.shape[-1]):
            raise ValueError(f"low_rank[1] (B) must have shape [V, r] = [{weight.shape[0]}, {low.shape[-1]}], got "
                             f"{tuple(low_weight.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    _checks.check_ignore_and_temperature(ignore_index, temperature)
    return _checks.check_labels(labels, hidden, vocab=weight.shape[0] if vocab is None else vocab,
                                ignore_index=ignore_index, inputs_name="hidden")
