"""The NaN guard: an optimizer update whose loss or gradient norm is not finite is never applied.

A diverged update would turn every weight into NaN, and the next checkpoint would overwrite the last good one with
them. So before each optimizer step the guard looks at the loss and the gradient norm (both already agreed by every
process: the loss is averaged over processes, the norm is that of the synchronized gradients) and either stops the run
(the default: NonFiniteStep, one line naming the step, exit status 2, nothing saved after the last checkpoint) or, with
`--skip-nonfinite N`, drops that update (the gradients are cleared, the weights and the optimizer's moments stay as
they were; the learning-rate schedule still advances with the step count) and counts it, up to N times in a run.
"""
from __future__ import annotations

import math


class NonFiniteStep(RuntimeError):
    """An update's loss or gradient norm was NaN or infinite: the run stopped before applying it."""


class StepGuard:
    """Decides, update by update, whether the weights may be changed. `skipped` is restored on resume from the last
    metrics row (it is written into every row as `nonfinite_skipped` when max_skips > 0)."""

    def __init__(self, max_skips: int = 0):
        self.max_skips, self.skipped = max_skips, 0
        self.last_saved: tuple[int, str] | None = None  # (step, path) of the last checkpoint this run wrote or read

    def allows(self, where: str, loss: float, grad_norm: float) -> bool:
        """True: apply the update. False: drop it (counted). Raises NonFiniteStep when it may not be dropped."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return True
        what = f"{where}: the loss is {loss:.6g} and the gradient norm {grad_norm:.6g}"
        if self.skipped < self.max_skips:
            self.skipped += 1
            print(f"{what}; update skipped ({self.skipped} of at most {self.max_skips}, --skip-nonfinite)")
            return False
        kept = (f"the last checkpoint (step {self.last_saved[0]}, {self.last_saved[1]}) is kept"
                if self.last_saved else "no checkpoint was written")
        limit = (f"{self.max_skips} such updates were already skipped (--skip-nonfinite {self.max_skips})"
                 if self.max_skips else "--skip-nonfinite N skips up to N such updates")
        raise NonFiniteStep(f"{what}: the run diverged and stopped before applying it; {kept}. Lower --lr (or "
                            f"--sft-lr), clip harder (--max-grad-norm), or check the data; {limit}")

    def row(self) -> dict:
        """What a metrics row records of the guard (nothing unless skipping is allowed)."""
        return {"nonfinite_skipped": self.skipped} if self.max_skips else {}
