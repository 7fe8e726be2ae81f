"""The one place a trainer scores a model: an rlhfv_kernels function on the model's logits (the logits path) or its
fused-linear twin on the last hidden states and the lm_head weight (never materializing the logits; the head's bias
and final logit transform passed along). The DDPO and GRPO losses, GRPO's old / reference log-probs and the benchmarks
all go through model_loss, so the two paths cannot drift apart."""
from __future__ import annotations

import rlhfv_kernels as rk

from .adapter import fused_linear_forward
from .forward import forward_logits


def model_loss(function: str, model, inputs: dict, labels, *args, fused_linear: bool = False, autocast_dtype=None,
               inplace_backward: bool | None = None, **options):
    """rk.<function>(model(**inputs).logits, labels, *args, **options), or with fused_linear
    rk.linear_<function>(hidden, lm_head.weight, labels, *args, **options) — e.g. function="ddpo_loss", "grpo_loss",
    "token_logprobs". `model` is what the trainer trains (a DDP wrapper, an FSDP2 module, a PeftModel, ...): both
    paths run its forward. inplace_backward (logits path only: the fused-linear route has no logits to overwrite) is
    passed when given."""
    if fused_linear:  # inside the model's forward, through its wrappers (DDP, FSDP2, PEFT): adapter.py
        return fused_linear_forward(model, inputs, getattr(rk, "linear_" + function), labels, *args,
                                    autocast_dtype=autocast_dtype, **options)
    if inplace_backward is not None:
        options["inplace_backward"] = inplace_backward
    logits = forward_logits(model, inputs, autocast_dtype)
    return getattr(rk, function)(logits, labels, *args, **options)
