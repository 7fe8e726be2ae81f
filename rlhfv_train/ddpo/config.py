"""The DDPO trainer's options: RunConfig's (run/config.py) plus the loss's (RLHF-V's token weights gamma on corrected
segments, MM-DPO's dynamic reward scaling, an SFT term) and the micro-batching."""
from __future__ import annotations

from dataclasses import dataclass

from ..run.config import RunConfig
from ..run.flags import option

PRESETS = {
    "paper": {"gamma": 5.0, "beta": 0.5, "mode": "mean"},     # RLHF-V paper
    "authors": {"gamma": 1.1, "beta": 0.1, "mode": "sum"},    # the authors' public training script
}
MODES = ("sum", "mean")
TINY_SFT_STEPS = 1000  # the embedded tiny model starts from random weights: it learns to describe scenes first


@dataclass
class TrainConfig(RunConfig):
    output_dir: str = option("runs/rlhfv", "metrics, plot, checkpoints and the reference-score cache")
    sft_steps: int = option(0, f"supervised fine-tuning steps on the chosen answers before preference training, "
                            f"saved as output-dir/sft.pt (default: {TINY_SFT_STEPS} for the embedded tiny model, 0 "
                            "with --model)", unset=True)
    gamma: float = option(5.0, "weight of corrected tokens (default 5.0, or the --preset's)", unset=True,
                          interval="[0, inf)")
    beta: float = option(0.5, "DPO beta (default 0.5, or the --preset's)", unset=True,
                         interval="(0, inf)")
    mode: str = option("mean", "sequence score (default mean, or the --preset's)", choices=MODES, unset=True)
    min_match: int = option(3, "shortest kept match in the diff of the rejected and the corrected answer",
                           interval="[1, inf)")
    drs_weight: float = option(0.0, "MM-DPO dynamic reward scaling w", interval="[0, inf)")
    drs_k: float = option(1.0, "MM-DPO dynamic reward scaling k", interval="[0, inf)")
    sft_weight: float = option(0.0, "weight of the chosen-answer NLL in the loss (default 0; 1 for the embedded "
                               "tiny model, which starts from random weights and must also learn the language)",
                               unset=True, interval="[0, inf)")
    temperature: float = 1.0           # logits / temperature before the log-softmax (no flag: the models' own is 1)
    batch_size: int = option(8, "pairs per micro-batch (and per SFT step)", interval="[1, inf)")
    grad_accum: int = option(1, "micro-batches per optimizer step", interval="[1, inf)")
    inplace_backward: bool = option(True, "keep the logits intact in backward (the fused loss writes its gradient "
                                    "into them by default)")

    def check(self, world: int = 1) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'sum' or 'mean', got {self.mode!r}")
        super().check(world)
