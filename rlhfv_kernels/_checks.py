"""Argument validation for the public API: every bad input becomes a Python exception that names the argument.

Value checks that need the data (label range, token weights, nonnegative vectors) run at once in eager mode; under
torch.compile the checked tensor goes through the opaque operator rlhfv_checks::checked instead (a copy of that small
tensor, which the graph then uses, so the check cannot be dead-code eliminated), which runs the same check on the real
values and raises the same error, without a graph break. The label range is also checked by the fused kernels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)


# The kernels compute z / temperature in float32: below this, the division overflows for ordinary logits.
MIN_TEMPERATURE = 1e-6
INT64_RANGE = (-2**63, 2**63 - 1)


def data_checks_enabled() -> bool:
    """Whether a check may read tensor values here (eager), or must go through checked_values (torch.compile)."""
    return not torch.compiler.is_compiling()


def _position(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    pos = []
    for size in reversed(shape):
        pos.append(flat_index % size)
        flat_index //= size
    return tuple(reversed(pos))


def _first_true(mask: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first True in `mask`, or None (one host sync; meta tensors have no data to check)."""
    if mask.numel() == 0 or mask.device.type == "meta" or not bool(mask.any()):
        return None
    flat = int(mask.reshape(-1).nonzero()[0, 0])
    return _position(flat, mask.shape)


def require_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    check_not_sharded(value, name)
    return value


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without torch.distributed has no DTensor
        return None
    return DTensor


_DTENSOR = _dtensor_class()


def sharded_kind(value: torch.Tensor) -> str | None:
    """What kind of shard `value` is — a DTensor (FSDP2's shard, a tensor-parallel slice) or a DeepSpeed ZeRO-3
    partition not gathered — or None for a whole local tensor."""
    if _DTENSOR is not None and isinstance(value, _DTENSOR):
        return f"a DTensor (placements {tuple(value.placements)}, sharded by FSDP2 or tensor parallelism)"
    status = getattr(value, "ds_status", None)
    if status is not None and getattr(status, "name", str(status)) != "AVAILABLE":
        return (f"a DeepSpeed ZeRO-3 partition (shape {tuple(value.shape)}, whole "
                f"{tuple(getattr(value, 'ds_shape', ()))}), not gathered here")
    return None


def check_not_sharded(value: torch.Tensor, name: str) -> None:
    """A shard is refused by name: computing from a gathered copy (`full_tensor()`) would write a gradient that FSDP
    or DeepSpeed never reduce, silently wrong. DESIGN.md §3, "Sharded heads"."""
    kind = sharded_kind(value)
    if kind is not None:
        raise ValueError(
            f"{name} is {kind}; rlhfv's kernels take whole local tensors here (sharded over the vocabulary they "
            "take only the logits and the lm_head weight and bias), and computing from a gathered copy (a plain "
            "full_tensor()) would give a wrong gradient. For the lm_head weight of a data-parallel model, call the "
            "function as the head's forward, inside the model's forward: rlhfv_kernels.head_forward(lm_head, "
            "rlhfv_kernels.linear_..., hidden, ...) (docs/distributed.md)")


def check_same_device(tensor: torch.Tensor, name: str, inputs: torch.Tensor, inputs_name: str = "logits") -> None:
    if tensor.device != inputs.device:
        raise ValueError(f"{name} is on {tensor.device} but {inputs_name} is on {inputs.device}; move them to one "
                         "device")


def check_positive_finite(value: float, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative_finite(value: float, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_logit_transform(softcap, logit_scale) -> None:
    """The model's final logit transform: softcap None (no cap) or a finite number > 0; logit_scale finite > 0."""
    if softcap is not None and (not isinstance(softcap, (int, float)) or isinstance(softcap, bool)
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None (no cap) or a finite number > 0, got {softcap!r}")
    check_positive_finite(logit_scale, "logit_scale")


def check_choice(value, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_logits_labels(logits, labels, ignore_index: int, temperature: float, *, min_dim: int = 1,
                        vocab: int | None = None) -> torch.Tensor:
    """Shapes, dtypes, devices, temperature and label range of a (logits [..., V], labels [...]) pair; returns the
    labels to use (see checked_values). vocab: the whole vocabulary when logits are one rank's slice of it."""
    require_tensor(logits, "logits")
    require_tensor(labels, "labels")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if logits.dim() < min_dim:
        raise ValueError(f"logits must have at least {min_dim} dimensions, got shape {tuple(logits.shape)}")
    check_ignore_and_temperature(ignore_index, temperature)
    return check_labels(labels, logits, vocab=logits.shape[-1] if vocab is None else vocab,
                        ignore_index=ignore_index, inputs_name="logits")


def check_ignore_and_temperature(ignore_index, temperature) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not INT64_RANGE[0] <= ignore_index <= INT64_RANGE[1]:
        raise ValueError(f"ignore_index must fit in int64 (the labels' widest type), got {ignore_index}")
    check_positive_finite(temperature, "temperature")
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE:g} (the kernels divide by it in float32), got "
                         f"{temperature!r}")


def check_labels(labels, inputs: torch.Tensor, *, vocab: int, ignore_index: int, inputs_name: str) -> torch.Tensor:
    """labels: shape inputs.shape[:-1], on inputs' device, every value in [0, vocab) or ignore_index. Returns the
    labels to use (see checked_values)."""
    if tuple(labels.shape) != tuple(inputs.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal {inputs_name}.shape[:-1] = "
                         f"{tuple(inputs.shape[:-1])}")
    check_same_device(labels, "labels", inputs, inputs_name)
    if vocab == 0 and labels.numel() > 0:
        raise ValueError(f"the vocabulary is empty (V = 0) but there are {labels.numel()} labels")
    return checked_values("labels", labels, "labels", bound=vocab, ignore_index=ignore_index)


def check_vocab_stride(logits: torch.Tensor, backend: str) -> None:
    """The fused kernels read each row as one contiguous run of V values; anything else would need an N x V copy."""
    if logits.dim() >= 1 and logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(f"logits must have stride 1 along the vocabulary (last) dimension for backend "
                         f"{backend!r}, got stride {logits.stride(-1)}; pass logits.contiguous() (an N x V copy) "
                         "or use backend='eager'")


def check_rows_disjoint(logits: torch.Tensor) -> None:
    """inplace_backward writes each row's gradient over its V values: rows that share memory (an expand()ed view)
    would overwrite one another. A sufficient test on sizes and strides only (no data, traceable): ordered by stride,
    each leading dimension must step past everything the faster ones span."""
    span = logits.shape[-1]
    for stride, size in sorted((st, s) for s, st in zip(logits.shape[:-1], logits.stride()[:-1]) if s > 1):
        if stride < span:
            raise ValueError(f"inplace_backward=True writes the gradient into the logits, but rows of logits (shape "
                             f"{tuple(logits.shape)}, strides {tuple(logits.stride())}) share memory (an expand()ed "
                             "view?); pass inplace_backward=False, or logits.contiguous()")
        span = stride * (size - 1) + span


def check_token_weights(token_weights, labels: torch.Tensor, logits: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Shape, dtype, device; finite and >= 0 wherever the label is not ignore_index (ignored tokens' weights are never
    read). Returns the weights to use (see checked_values)."""
    require_tensor(token_weights, "token_weights")
    if not token_weights.dtype.is_floating_point:
        raise TypeError(f"token_weights must be a floating-point tensor, got {token_weights.dtype}")
    if tuple(token_weights.shape) != tuple(labels.shape):
        raise ValueError(f"token_weights shape {tuple(token_weights.shape)} must equal labels shape "
                         f"{tuple(labels.shape)}")
    check_same_device(token_weights, "token_weights", logits)
    return checked_values("weights", token_weights, "token_weights", labels=labels, ignore_index=ignore_index)


def check_vector(value, name: str, length: int, logits: torch.Tensor, *, nonnegative: bool = False) -> torch.Tensor:
    """A per-sequence or per-pair float vector of the given length on logits' device (nonnegative: every value >= 0,
    NaN refused). Returns the vector to use (see checked_values)."""
    require_tensor(value, name)
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(value.shape)}")
    check_same_device(value, name, logits)
    return checked_values("nonnegative", value, name) if nonnegative else value


def check_per_token(value, name: str, labels: torch.Tensor, logits: torch.Tensor) -> None:
    """A per-token float tensor shaped like labels (old or reference log-probs)."""
    require_tensor(value, name)
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if tuple(value.shape) != tuple(labels.shape):
        raise ValueError(f"{name} shape {tuple(value.shape)} must equal labels shape {tuple(labels.shape)}")
    check_same_device(value, name, logits)


def check_offsets(host: list, name: str, total: int) -> None:
    """Sequence offsets (cu_seqlens, read on the host): from 0 to `total`, never decreasing."""
    host = [int(v) for v in host]  # plain ints (under torch.compile a list's values are specialized, not symbolic)
    if host[0] != 0 or host[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at the number of tokens ({total}), got "
                         f"{host[0]} ... {host[-1]}")
    step = next((i for i in range(len(host) - 1) if host[i + 1] < host[i]), None)
    if step is not None:
        raise ValueError(f"{name} must not decrease, got {name}[{step}] = {host[step]} > "
                         f"{name}[{step + 1}] = {host[step + 1]}")


def check_pairs(pairs: torch.Tensor, name: str, sequences: int) -> None:
    """[B, 2] sequence indices: each of the pack's `sequences` exactly once."""
    if not sequences:
        return
    used = pairs.reshape(-1).cpu()
    bad = (used < 0) | (used >= sequences)
    if bool(bad.any()):
        raise ValueError(f"{name} holds {int(used[bad][0])}, outside the pack's sequences [0, {sequences})")
    counts = torch.bincount(used, minlength=sequences)
    if bool((counts != 1).any()):
        raise ValueError(f"{name} names sequence {int((counts != 1).nonzero()[0, 0])} "
                         f"{int(counts[(counts != 1)][0])} times; every sequence must be in exactly one pair")


def _offsets_valid(offsets, name, _labels, total, _ignore_index):
    check_offsets(offsets.tolist(), name, total)


def _pairs_valid(pairs, name, _labels, sequences, _ignore_index):
    check_pairs(pairs, name, sequences)


def _labels_in_range(labels, name, _labels, vocab, ignore_index):
    where = _first_true((labels != ignore_index) & ((labels < 0) | (labels >= vocab)))
    if where is not None:
        raise ValueError(f"{name}[{', '.join(map(str, where))}] = {int(labels[where])} is out of range "
                         f"[0, {vocab}) and is not ignore_index ({ignore_index})")


def _weights_finite_nonnegative(weights, name, labels, _vocab, ignore_index):
    bad = ~(weights >= 0) | ~torch.isfinite(weights)
    where = _first_true(bad & (labels != ignore_index))
    if where is not None:
        raise ValueError(f"{name}[{', '.join(map(str, where))}] = {float(weights[where])}; weights must be finite and "
                         ">= 0 (at ignored tokens they are not read)")


def _nonnegative(values, name, _labels, _vocab, _ignore_index):
    where = _first_true(~(values >= 0))
    if where is not None:
        raise ValueError(f"{name}[{', '.join(map(str, where))}] = {float(values[where])}; values must be >= 0")


# rule(values, name, labels, bound, ignore_index); bound: the vocabulary size (labels), the token count (offsets),
# the sequence count (pairs)
VALUE_RULES = {"labels": _labels_in_range, "weights": _weights_finite_nonnegative, "nonnegative": _nonnegative,
               "offsets": _offsets_valid, "pairs": _pairs_valid}


def checked_values(rule: str, values: torch.Tensor, name: str, *, labels: torch.Tensor | None = None, bound: int = 0,
                   ignore_index: int = 0) -> torch.Tensor:
    """Checks `values` by VALUE_RULES[rule] and returns the tensor to use: `values` itself in eager mode; under
    torch.compile the output of rlhfv_checks::checked, which checks the real values when the graph runs."""
    if data_checks_enabled():
        VALUE_RULES[rule](values, name, labels, bound, ignore_index)
        return values
    return _checked(values, labels, rule, name, bound, ignore_index)


@torch.library.custom_op("rlhfv_checks::checked", mutates_args=())
def _checked(values: torch.Tensor, labels: Optional[torch.Tensor], rule: str, name: str, bound: int,
             ignore_index: int) -> torch.Tensor:
    VALUE_RULES[rule](values, name, labels, bound, ignore_index)
    return values.clone()


@_checked.register_fake
def _checked_fake(values, labels, rule, name, bound, ignore_index):
    return torch.empty_like(values)


_checked.register_autograd(lambda ctx, grad: (grad, None, None, None, None, None),
                           setup_context=lambda ctx, inputs, output: None)
