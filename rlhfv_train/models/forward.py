"""Forward helpers shared by the trainers, reference scoring, the warm-up, rollouts and the generative judge: the
model's own logits (the logits path) and, from adapter.py, the hidden states and head of the fused-linear route."""
from __future__ import annotations

import torch


def forward_logits(model, inputs: dict, autocast_dtype=None) -> torch.Tensor:
    """model(**inputs).logits, under autocast to `autocast_dtype` when one is given (bf16 on GPU)."""
    with torch.autocast(inputs["input_ids"].device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return model(**inputs).logits
