"""What every trainer's config has: data, model, the SFT stage, optimizer and schedule, evaluation and checkpoint
cadence, the scoring path (logits or fused-linear, packing), LoRA and the processes. A trainer's config
(ddpo.TrainConfig, grpo.GRPOConfig) adds its own fields and may restate one of these with its own default and help;
each option() field is also a command-line flag (flags.py)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import rlhfv_kernels as rk

from ..data.packed_rows import check_max_tokens_per_row
from ..models.lora import check_trainer_config as check_lora_config
from .flags import check_values, option


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
                            unset=True, interval="[0, inf)")
    sft_lr: float = option(5e-4, "constant learning rate of the SFT stage", interval="(0, inf)")
    lr: float = option(2e-3, "AdamW peak learning rate", interval="(0, inf)")
    weight_decay: float = option(0.0, "AdamW weight decay", interval="[0, inf)")
    warmup_ratio: float = option(0.1, "share of the optimizer steps with a linear learning-rate warm-up before the "
                                 "cosine decay", interval="[0, 1]")
    max_steps: int = option(300, "training steps", interval="[1, inf)")
    max_grad_norm: float = option(1.0, "gradient clipping norm (inf: no clipping)",
                                  interval="(0, inf]")
    grad_checkpointing: bool = option(False, "recompute activations in backward (less memory)")
    eval_fraction: float = option(0.1, "share of the records held out for evaluation",
                                  interval="[0, 1)")
    eval_data: str | None = option(None, "held-out records in a file of their own (then --eval-fraction is unused)")
    eval_every: int = option(25, "steps between evaluations", interval="[1, inf)")
    hallucination_eval: bool = option(True, "skip the CHAIR rates of generated held-out answers (computed when the "
                                      "records carry ground-truth 'objects'; rlhfv_train.eval)")
    eval_max_new_tokens: int = option(48, "answer length limit of the held-out generation",
                                     interval="[1, inf)")
    save_every: int = option(50, "steps between checkpoints", interval="[1, inf)")
    seed: int = option(0, "model init, data order, split (and sampling)")
    skip_bad: bool = option(False, "skip (and count) malformed records instead of failing")
    video_frames: int = option(8, "frames sampled uniformly from each video record's clip (the family's video "
                               "processor takes them)", interval="[1, inf)")
    resume: bool = option(False, "continue from output-dir/checkpoint.pt (with the flags of the run it holds: one "
                          "that changes what the run computes is refused; --max-steps, --save-every, --eval-every "
                          "and the like may change)")
    overwrite: bool = option(False, "start a new run in an output-dir that holds one (its checkpoint, SFT weights and "
                             "metrics are deleted first; without it such a folder is refused unless --resume)")
    skip_nonfinite: int = option(0, "skip up to this many optimizer updates whose loss or gradient norm is NaN or "
                                 "infinite (each is dropped and counted in metrics.jsonl as nonfinite_skipped); "
                                 "default 0: the first one stops the run, before it changes any weight or "
                                 "checkpoint (the SFT stage always stops)", interval="[0, inf)")
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
    tensor_parallel: bool = option(False, "under torchrun, shard the model over the processes with transformers' own "
                                   "tensor-parallel plan (every process sees the whole batch; the lm_head stays "
                                   "sharded over the vocabulary: --fused-linear scores it vocab-parallel, the logits "
                                   "route gets transformers' gathered logits)")
    synthetic_examples: int = option(1024, "size of the generated dataset when --data is not given",
                                     interval="[1, inf)")
    device: str = option("auto", "cpu, cuda, cuda:1, ...")
    progress: bool = option(True, "no progress bars")
    stop_after: int | None = None      # test hook: stop (as if killed) after this many steps, without the final save

    def check(self, world: int = 1) -> None:
        """Refuses what cannot run, before any work (`world`: the number of processes)."""
        check_values(self)
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --output-dir and --overwrite deletes it: give one")
        check_max_tokens_per_row(self.max_tokens_per_row, self.packing)
        check_lora_config(self)
        if self.tensor_parallel:
            if world < 2:
                raise ValueError("--tensor-parallel shards the model over torchrun's processes: launch 2 or more "
                                 "(torchrun --nproc_per_node N -m rlhfv_train ...)")
            for flag, used in (("--fsdp", self.fsdp), ("--lora-r", self.lora_r > 0), ("--packing", self.packing)):
                if used:
                    raise ValueError(f"--tensor-parallel with {flag} is not supported yet; drop one of them")
            if self.fused_linear and self.backend in ("eager", "reference"):
                raise ValueError("--tensor-parallel --fused-linear scores the sharded head with the fused kernels; "
                                 f"--backend {self.backend} would gather the whole logits: pick a fused backend")
        if self.init_weights is not None and not os.path.isfile(self.init_weights):
            raise FileNotFoundError(f"--init-weights {self.init_weights}: no such file")
        if self.model is not None and not os.path.isdir(self.model):  # before any data work, and transformers
            raise FileNotFoundError(f"--model {self.model}: no such folder (a local Hugging Face model folder is "
                                    "expected; nothing is downloaded)")
