"""The fused-linear functions as a module's forward, so that every wrapper around the lm_head sees an ordinary forward.

    out = rk.head_forward(model.lm_head, rk.linear_ddpo_loss, hidden, labels, ref_logps, beta=0.1)

Under FSDP2, DeepSpeed ZeRO-3 or DDP, the lm_head's weight outside its forward is a shard (a DTensor, or an empty
ZeRO-3 partition), and a gradient written into a gathered copy of it (`DTensor.full_tensor()`) is silently wrong: it
bypasses the wrapper's reduce-scatter (DESIGN.md §3, "Sharded heads"). The wrappers gather the weight, cast it to
the mixed-precision dtype and reduce its gradient through hooks on the module's call; so the fused-linear function
runs *as* the head's forward, through `head(...)`: FSDP2's unshard (when the head is its own unit) and its
pre-backward unshard, ZeRO-3's gathers for the forward and the backward, gradient-accumulation deferral and
MixedPrecisionPolicy all apply as they would to `head(hidden)`. Where the head belongs to its parent's unit (FSDP2's
root, DDP), call this inside the model's forward so that the parent's hooks have gathered it
(rlhfv_train.models.adapter.fused_linear_forward does both for a Hugging Face model).

The linear_* functions themselves refuse a ZeRO-3 partition by name (_checks.check_not_sharded), and take a DTensor
weight only as a tensor-parallel head, the same tokens on every rank (checked: _vocab_parallel.check_same_tokens):
never a gradient that FSDP or DeepSpeed would not reduce. A tensor-parallel head needs no head_forward: its weight is
sharded for good, and the kernels compute on it vocab-parallel.
"""
from __future__ import annotations

import dataclasses

import torch

from . import _checks


def run_as_forward(module: torch.nn.Module, function, *args, caller=None, **kwargs):
    """function(*args, **kwargs) computed as `module`'s forward, through `caller(*args, **kwargs)` (the module
    itself by default, or a wrapper whose forward calls it, such as DDP or a PeftModel): the hooks of every wrapper on
    the way fire as for an ordinary forward. A dataclass result crosses the hooks as the tuple of its fields (the
    container every wrapper walks for the tensors it hooks for the backward) and is rebuilt here."""
    built = []

    def forward(*call_args, **call_kwargs):
        result = function(*call_args, **call_kwargs)
        if dataclasses.is_dataclass(result) and not isinstance(result, type):
            built.append(type(result))
            return tuple(getattr(result, field.name) for field in dataclasses.fields(result))
        return result

    had_own = "forward" in module.__dict__
    own = module.__dict__.get("forward")
    module.forward = forward
    try:
        out = (caller or module)(*args, **kwargs)
    finally:
        if had_own:
            module.forward = own
        else:
            del module.forward
    return built[0](*out) if built else out


def head_forward(head: torch.nn.Module, function, hidden: torch.Tensor, *args, **kwargs):
    """function(hidden, head.weight, *args, bias=head.bias, **kwargs) — any rk.linear_* function — computed as the
    forward of `head`, an nn.Linear (see the module docstring). Returns the function's result."""
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"head must be an nn.Linear (the lm_head), got {type(head).__name__}; a PEFT adapter on the "
                        "head or another wrapper module has no single weight the fused-linear functions can use")
    if "bias" in kwargs:
        raise TypeError("head_forward passes the head's own bias; do not give bias=")

    def computed(h):
        kind = _checks.sharded_kind(head.weight)
        if kind is not None:  # no hook of the head's own gathers it: it belongs to a parent's unit
            raise ValueError(f"the lm_head's weight is still {kind} inside the head's forward: its wrapper gathers "
                             "it in a parent module's forward (FSDP2's root unit, ...); call head_forward inside "
                             "the model's forward (rlhfv_train.models.fused_linear_forward does)")
        return function(h, head.weight, *args, bias=head.bias, **kwargs)

    return run_as_forward(head, computed, hidden)
