"""LoRA adapters on the policy (peft), for both trainers.

The adapters go on after the SFT warm-up (which, when it runs, trains the whole model) and before reference scoring:
at that point their update is zero, so the policy is exactly its starting model. The reference is then the same
network with the adapters disabled (peft's disable_adapter), so no second copy of the weights is kept: the DDPO
trainer scores its references before training anyway, and GRPO's KL reference is computed under reference_mode().
Only the adapters train; checkpoints hold the wrapped model's whole state dict, which a run or
`python -m rlhfv_train.eval --checkpoint` re-wraps the same way before loading.

target "all-linear" is peft's: every linear layer but the output head. A LoRA on lm_head (--lora-target
"q_proj,lm_head") trains on both routes: the fused-linear route adds it to its fused pass as the kernels' low-rank
term (models/adapter.py lora_adapters).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class LoraSettings:
    r: int = 0                 # the adapters' rank; 0: no LoRA (full fine-tuning)
    alpha: float = 16.0
    dropout: float = 0.0
    target: str = "all-linear"  # peft's target_modules: "all-linear" or comma-separated module names

    def check(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 0:
            raise ValueError(f"--lora-r must be an int >= 0 (0: no LoRA), got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target.strip():
            raise ValueError("--lora-target must name modules (or be 'all-linear')")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def target_modules(self):
        return "all-linear" if self.target.strip() == "all-linear" else [t.strip() for t in self.target.split(",")
                                                                         if t.strip()]


def lora_settings(cfg) -> LoraSettings:
    """The LoRA settings of a trainer config (TrainConfig, GRPOConfig, or a checkpoint's config dict)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda name, default: getattr(cfg, name, default))
    d = LoraSettings()
    return LoraSettings(r=get("lora_r", d.r), alpha=get("lora_alpha", d.alpha), dropout=get("lora_dropout", d.dropout),
                        target=get("lora_target", d.target))


def check_trainer_config(cfg) -> None:
    """A trainer config's LoRA options, at construction."""
    lora_settings(cfg).check()


def add_lora(model, settings: LoraSettings, *, fused_linear: bool = False):
    """`model` wrapped with LoRA adapters (a peft PeftModel whose base weights are frozen); `model` itself when
    settings.r == 0. fused_linear: refuse, now, adapters the fused-linear route cannot apply (a variant on lm_head)."""
    settings.check()
    if not settings.enabled:
        return model
    try:
        import peft
    except ImportError as exc:
        raise ValueError("--lora-r needs the peft package (pip install peft)") from exc
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=settings.target_modules())
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. no module matches --lora-target
        raise ValueError(f"--lora-target {settings.target!r}: {exc}") from exc
    if fused_linear:
        from .adapter import body_and_head
        body_and_head(wrapped)  # raises UnsupportedModelError for an adapter on the head it cannot apply
    return wrapped


def reference_mode(model):
    """A context in which `model` computes its reference: the adapters disabled (a nullcontext without LoRA)."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()
