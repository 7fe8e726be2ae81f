"""The trainers' learning-rate schedule: linear warm-up over the first `warmup` optimizer steps, then cosine decay
to 0 at `total` (a multiplier of the peak rate, for torch's LambdaLR)."""
from __future__ import annotations

import math


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
