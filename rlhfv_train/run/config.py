"""What every trainer's config has: data, model, the SFT stage, optimizer and schedule, evaluation and checkpoint
cadence, the scoring path (logits or fused-linear, packing), LoRA and the processes. A trainer's config
(ddpo.TrainConfig, grpo.GRPOConfig) adds its own fields and may restate one of these with its own default and help;
each option() field is also a command-line flag (flags.py)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import rlhfv_kernels as rk

from ..data.packing import check_max_tokens_per_row
from ..models.lora import check_trainer_config as check_lora_config
from .flags import option


@dataclass
class RunConfig:
    data: str | None = option(None, "preference data: .jsonl with image files, .parquet, or a datasets folder "
                              "(save_to_disk); ours, RLHF-V's or TRL's layout; default: the synthetic scenes, "
                              "generated on first use")
    model: str | None = option(None, "local Hugging Face model folder (image-text-to-text or causal LM); default: "
                               "the embedded tiny LLaVA")
    output_dir: str = option("runs/run", "metrics, plot, checkpoints (and caches)")
    init_weights: str | None = option(None, "start from these weights: a trainer checkpoint (checkpoint.pt, sft.pt) "
                                      "or a state dict for the model")
    sft_steps: int = option(0, "supervised fine-tuning steps on the chosen answers before training, saved as "
                            "output-dir/sft.pt (default: the embedded tiny model needs them, a --model does not)",
                            unset=True)
    sft_lr: float = option(5e-4, "constant learning rate of the SFT stage")
    lr: float = option(2e-3, "AdamW peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.1, "share of the optimizer steps with a linear learning-rate warm-up before the "
                                 "cosine decay")
    max_steps: int = option(300, "training steps")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    grad_checkpointing: bool = option(False, "recompute activations in backward (less memory)")
    eval_fraction: float = option(0.1, "share of the records held out for evaluation")
    eval_data: str | None = option(None, "held-out records in a file of their own (then --eval-fraction is unused)")
    eval_every: int = option(25, "steps between evaluations")
    hallucination_eval: bool = option(True, "skip the CHAIR rates of generated held-out answers (computed when the "
                                      "records carry ground-truth 'objects'; rlhfv_train.eval)")
    eval_max_new_tokens: int = option(48, "answer length limit of the held-out generation")
    save_every: int = option(50, "steps between checkpoints")
    seed: int = option(0, "model init, data order, split (and sampling)")
    skip_bad: bool = option(False, "skip (and count) malformed records instead of failing")
    resume: bool = option(False, "continue from output-dir/checkpoint.pt")
    backend: str | None = option(None, "rlhfv_kernels backend (default: the best for the device). "
                                 + rk.describe_backends(), choices=(*rk.BACKENDS, *rk.RENAMED_BACKENDS))
    fused_linear: bool = option(False, "compute losses and log-probs from the last hidden states and the lm_head "
                                "weight, never materializing the logits (single process)")
    packing: bool = option(False, "pack each micro-batch's sequences back to back into rows (no padding tokens run; "
                           "attention kept within each sequence; checked against the padded forward before "
                           "training, and refused for a model where they differ)")
    max_tokens_per_row: int | None = option(None, "packed row capacity in tokens (--packing; default: the "
                                            "micro-batch's longest sequence, which never costs sdpa/eager attention "
                                            "more than padding; raise it under flash attention)")
    chat_template: bool = option(True, "plain '<image> question' prompts even when the processor has a chat "
                                 "template (default: the template, in training, scoring and evaluation)")
    lora_r: int = option(0, "train LoRA adapters of this rank on the policy instead of all its weights (peft); the "
                         "reference is the model with the adapters disabled (0: full fine-tuning)")
    lora_alpha: float = option(16.0, "LoRA scaling alpha")
    lora_dropout: float = option(0.0, "dropout on the LoRA inputs")
    lora_target: str = option("all-linear", "modules that get adapters: 'all-linear' (every linear layer but "
                              "lm_head) or comma-separated module names, e.g. q_proj,v_proj")
    fsdp: bool = option(False, "under torchrun, shard the model with FSDP2 (default: DDP)")
    synthetic_examples: int = option(1024, "size of the generated dataset when --data is not given")
    device: str = option("auto", "cpu, cuda, cuda:1, ...")
    progress: bool = option(True, "no progress bars")
    stop_after: int | None = None      # test hook: stop (as if killed) after this many steps, without the final save

    def check(self, world: int = 1) -> None:
        """Refuses what cannot run, before any work (`world`: the number of processes)."""
        for name in ("max_steps", "eval_every", "save_every", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sft_steps < 0:
            raise ValueError(f"sft_steps must be >= 0, got {self.sft_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        check_max_tokens_per_row(self.max_tokens_per_row, self.packing)
        check_lora_config(self)
        if self.fused_linear and world > 1:
            raise ValueError("--fused-linear calls the model's body and lm_head separately, which bypasses the "
                             "DDP/FSDP wrappers; use it with a single process for now")
        if self.init_weights is not None and not os.path.isfile(self.init_weights):
            raise FileNotFoundError(f"--init-weights {self.init_weights}: no such file")
        if self.model is not None and not os.path.isdir(self.model):  # before any data work, and transformers
            raise FileNotFoundError(f"--model {self.model}: no such folder (a local Hugging Face model folder is "
                                    "expected; nothing is downloaded)")
