"""torch.ops.rlhfv_triton.*: the Triton kernels behind the same schemas as the compiled torch.ops.rlhfv.* operators,
so the fake kernels and the autograd formula in rlhfv_kernels/_ops.py serve both."""
from __future__ import annotations

import math

import torch

from .. import _backend, _ops
from . import kernels, linear_kernels

NAMESPACE = _backend.TABLE["triton"].namespace
_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in _ops.SCHEMAS.items():
    _lib.define(_name + _schema)

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(logits: torch.Tensor, labels: torch.Tensor, temperature: float, softcap: float) -> None:
    """Guards the kernels' memory accesses; the public API has already given friendlier messages."""
    if logits.dtype not in _TRITON_DTYPES:
        raise TypeError(f"backend 'triton' takes float32, bfloat16 or float16 logits, got {logits.dtype}; "
                        "use backend='cpp' or 'eager' for float64")
    if logits.device.type == "cpu" and not kernels.INTERPRETING:
        raise RuntimeError("rlhfv_triton: CPU tensors need TRITON_INTERPRET=1 set before rlhfv_kernels.triton "
                           "is imported")
    if logits.device.type == "cpu" and kernels.INTERPRETER_PROBLEM is not None:
        raise RuntimeError(f"rlhfv_triton: {kernels.INTERPRETER_PROBLEM}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"rlhfv_triton: labels shape {tuple(labels.shape)} must equal logits.shape[:-1]")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError("rlhfv_triton: logits must have stride 1 along the vocabulary dimension")
    if not temperature > 0:
        raise ValueError(f"rlhfv_triton: temperature must be > 0, got {temperature}")
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"rlhfv_triton: softcap must be finite and >= 0 (0: none), got {softcap}")


def _check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.numel() and bool(bad.any()):
        raise IndexError(f"rlhfv_triton: a label is out of range [0, {vocab}) and is not ignore_index "
                         f"({ignore_index})")


def _fwd(logits, labels, ignore_index, temperature, softcap, inplace_backward):
    _check(logits, labels, temperature, softcap)
    _check_labels(labels, logits.shape[-1], ignore_index)
    return kernels.launch_forward(logits, labels, ignore_index, temperature, softcap)


# Validation contract (DESIGN.md §3): the public API gave the friendly errors; here the forwards guard the kernels
# (label range: one host sync, also under torch.compile where the API skips data checks). The backwards trust the
# labels their forward checked and read no memory through them (only `column == label`), so they cost no sync.

def _bwd(grad_logp, logits, labels, lse, ignore_index, temperature, softcap):
    _check(logits, labels, temperature, softcap)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    kernels.launch_backward(grad_logp, logits, labels, lse, ignore_index, temperature, out, softcap)
    return out


def _bwd_inplace(logits, grad_logp, labels, lse, ignore_index, temperature, softcap):
    _check(logits, labels, temperature, softcap)
    kernels.launch_backward(grad_logp, logits, labels, lse, ignore_index, temperature, logits, softcap)


def _entropy_fwd(logits, labels, ignore_index, temperature, softcap, inplace_backward):
    _check(logits, labels, temperature, softcap)
    _check_labels(labels, logits.shape[-1], ignore_index)
    return kernels.launch_forward(logits, labels, ignore_index, temperature, softcap, with_entropy=True)


def _entropy_bwd(grad_logp, grad_entropy, logits, labels, lse, entropy, ignore_index, temperature, softcap):
    _check(logits, labels, temperature, softcap)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    kernels.launch_backward(grad_logp, logits, labels, lse, ignore_index, temperature, out, softcap,
                            grad_entropy=grad_entropy, entropy=entropy)
    return out


def _entropy_bwd_inplace(logits, grad_logp, grad_entropy, labels, lse, entropy, ignore_index, temperature, softcap):
    _check(logits, labels, temperature, softcap)
    kernels.launch_backward(grad_logp, logits, labels, lse, ignore_index, temperature, logits, softcap,
                            grad_entropy=grad_entropy, entropy=entropy)


def _check_linear(hidden, weight, labels, temperature, softcap):
    _check(hidden, labels, temperature, softcap)  # dtype, device mode, labels' shape
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.dtype != hidden.dtype:
        raise ValueError("rlhfv_triton: weight must be [V, H] in hidden's dtype")


def _linear_fwd(hidden, weight, bias, labels, ignore_index, temperature, softcap, chunk_rows):
    _check_linear(hidden, weight, labels, temperature, softcap)
    _check_labels(labels, weight.shape[0], ignore_index)
    return linear_kernels.launch_forward(hidden, weight, bias, labels, ignore_index, temperature, softcap)


def _linear_bwd(grad_logp, hidden, weight, bias, labels, lse, ignore_index, temperature, softcap, chunk_rows):
    _check_linear(hidden, weight, labels, temperature, softcap)
    return linear_kernels.launch_backward(grad_logp, hidden, weight, bias, labels, lse, ignore_index, temperature,
                                          softcap)


def _linear_entropy_fwd(hidden, weight, bias, labels, ignore_index, temperature, softcap, chunk_rows):
    _check_linear(hidden, weight, labels, temperature, softcap)
    _check_labels(labels, weight.shape[0], ignore_index)
    return linear_kernels.launch_forward(hidden, weight, bias, labels, ignore_index, temperature, softcap,
                                         with_entropy=True)


def _linear_entropy_bwd(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, ignore_index,
                        temperature, softcap, chunk_rows):
    _check_linear(hidden, weight, labels, temperature, softcap)
    return linear_kernels.launch_backward(grad_logp, hidden, weight, bias, labels, lse, ignore_index, temperature,
                                          softcap, grad_entropy=grad_entropy, entropy=entropy)


for _key in ("CPU", "CUDA"):
    _lib.impl("logprob_fwd", _fwd, _key)
    _lib.impl("logprob_bwd", _bwd, _key)
    _lib.impl("logprob_bwd_", _bwd_inplace, _key)
    _lib.impl("logprob_entropy_fwd", _entropy_fwd, _key)
    _lib.impl("logprob_entropy_bwd", _entropy_bwd, _key)
    _lib.impl("logprob_entropy_bwd_", _entropy_bwd_inplace, _key)
    _lib.impl("linear_logprob_fwd", _linear_fwd, _key)
    _lib.impl("linear_logprob_bwd", _linear_bwd, _key)
    _lib.impl("linear_logprob_entropy_fwd", _linear_entropy_fwd, _key)
    _lib.impl("linear_logprob_entropy_bwd", _linear_entropy_bwd, _key)

_ops.register_glue(NAMESPACE)
_ops.register_linear_glue(NAMESPACE)
