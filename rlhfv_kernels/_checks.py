"""Argument validation for the public API: every bad input becomes a Python exception that names the argument.

Value checks that need the data (label range, negative weights) run eagerly only; under torch.compile they are
skipped to avoid graph breaks, and the compiled kernels still refuse out-of-range labels themselves.
"""
from __future__ import annotations

import math

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)


def data_checks_enabled() -> bool:
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
    return value


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


def check_logits_labels(logits, labels, ignore_index: int, temperature: float, *, min_dim: int = 1) -> None:
    """Shapes, dtypes, devices, temperature and label range of a (logits [..., V], labels [...]) pair."""
    require_tensor(logits, "logits")
    require_tensor(labels, "labels")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if logits.dim() < min_dim:
        raise ValueError(f"logits must have at least {min_dim} dimensions, got shape {tuple(logits.shape)}")
    check_ignore_and_temperature(ignore_index, temperature)
    check_labels(labels, logits, vocab=logits.shape[-1], ignore_index=ignore_index, inputs_name="logits")


def check_ignore_and_temperature(ignore_index, temperature) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    check_positive_finite(temperature, "temperature")


def check_labels(labels, inputs: torch.Tensor, *, vocab: int, ignore_index: int, inputs_name: str) -> None:
    """labels: shape inputs.shape[:-1], on inputs' device, every value in [0, vocab) or ignore_index."""
    if tuple(labels.shape) != tuple(inputs.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal {inputs_name}.shape[:-1] = "
                         f"{tuple(inputs.shape[:-1])}")
    check_same_device(labels, "labels", inputs, inputs_name)
    if vocab == 0 and labels.numel() > 0:
        raise ValueError(f"the vocabulary is empty (V = 0) but there are {labels.numel()} labels")
    if data_checks_enabled():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        where = _first_true(bad)
        if where is not None:
            raise ValueError(f"labels[{', '.join(map(str, where))}] = {int(labels[where])} is out of range "
                             f"[0, {vocab}) and is not ignore_index ({ignore_index})")


def check_vocab_stride(logits: torch.Tensor, backend: str) -> None:
    """The fused kernels read each row as one contiguous run of V values; anything else would need an N x V copy."""
    if logits.dim() >= 1 and logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(f"logits must have stride 1 along the vocabulary (last) dimension for backend "
                         f"{backend!r}, got stride {logits.stride(-1)}; pass logits.contiguous() (an N x V copy) "
                         "or use backend='eager'")


def check_token_weights(token_weights, labels: torch.Tensor, logits: torch.Tensor) -> None:
    require_tensor(token_weights, "token_weights")
    if not token_weights.dtype.is_floating_point:
        raise TypeError(f"token_weights must be a floating-point tensor, got {token_weights.dtype}")
    if tuple(token_weights.shape) != tuple(labels.shape):
        raise ValueError(f"token_weights shape {tuple(token_weights.shape)} must equal labels shape "
                         f"{tuple(labels.shape)}")
    check_same_device(token_weights, "token_weights", logits)
    if data_checks_enabled():
        where = _first_true(~(token_weights >= 0) | ~torch.isfinite(token_weights))
        if where is not None:
            raise ValueError(f"token_weights[{', '.join(map(str, where))}] = {float(token_weights[where])}; "
                             "weights must be finite and >= 0")


def check_vector(value, name: str, length: int, logits: torch.Tensor, *, nonnegative: bool = False) -> None:
    """A per-sequence or per-pair float vector of the given length on logits' device."""
    require_tensor(value, name)
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(value.shape)}")
    check_same_device(value, name, logits)
    if nonnegative and data_checks_enabled():
        where = _first_true(~(value >= 0))
        if where is not None:
            raise ValueError(f"{name}[{where[0]}] = {float(value[where])}; values must be >= 0")


def check_per_token(value, name: str, labels: torch.Tensor, logits: torch.Tensor) -> None:
    """A per-token float tensor shaped like labels (old or reference log-probs)."""
    require_tensor(value, name)
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if tuple(value.shape) != tuple(labels.shape):
        raise ValueError(f"{name} shape {tuple(value.shape)} must equal labels shape {tuple(labels.shape)}")
    check_same_device(value, name, logits)
