"""Forward helpers shared by the trainers, reference scoring, the warm-up, rollouts and the generative judge: the
model's own logits (the logits path) and, from adapter.py, the hidden states and head of the fused-linear route."""
from __future__ import annotations

import contextlib

import torch

from ..data.inputs import model_kwargs


def autocast_to(inputs: dict, autocast_dtype):
    """Autocast to `autocast_dtype` (bf16 on GPU) on the inputs' device; None leaves the caller's autocast state as
    it is (a trainer such as TRL's may have entered one)."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(inputs["input_ids"].device.type, dtype=autocast_dtype)


def forward_logits(model, inputs: dict, autocast_dtype=None) -> torch.Tensor:
    """model(**inputs).logits, under autocast to `autocast_dtype` when one is given."""
    with autocast_to(inputs, autocast_dtype):
        return model(**model_kwargs(inputs)).logits
