"""LossSpec: how a loss module (losses/) describes its loss to a source (_sources.py), the one protocol between them.

A loss module's `build(dtype) -> LossSpec` is called by the source with the compute dtype once the inputs are
checked; the source then runs
  - on the logits path (and the eager route of the fused-linear path): spec.whole(token_logps) -> the output;
  - on the fused-linear path's engine (_linear_engine.py), chunk by chunk of whole groups: spec.share(rows, logps),
    differentiated to get each token's coefficient dL/dlogp during the forward, then spec.whole once more on the
    final log-probs for the output's metrics.
Under a packed layout (_packing.py) both take the log-probs as the loss's padded rows [R, T].
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossSpec:
    # token_logps [R, T] -> the loss's output (DDPOOutput, GRPOOutput) on the whole batch
    whole: Callable[[torch.Tensor], object]
    # (rows [k] int64, their logps [k, T]) -> that sub-batch's share of the batch's scalar loss (the whole batch's
    # normalisers): summed over sub-batches that cover the batch it is whole(...).loss
    share: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    groups: list          # tuples of rows whose coefficients depend on each other, e.g. (i, i + B) for a DDPO pair
    splittable: bool      # every token is its own group (GRPO): an oversized group may be cut without a second pass
