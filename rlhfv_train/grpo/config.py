"""The GRPO trainer's options: RunConfig's (run/config.py) plus sampling (k answers per prompt), the reward (a
pointwise reward, a pairwise judge or a generative judge model), the clipped loss with its KL to the frozen start,
and the micro-batching of the updates."""
from __future__ import annotations

import os
from dataclasses import dataclass

import rlhfv_kernels as rk

from ..run.config import RunConfig
from ..run.flags import option
from .rewards import JUDGE_TEMPLATE

LOSS_TYPES = rk.GRPO_LOSS_TYPES
# GRPO learns from the model's own samples, so the tiny model must describe scenes well before it starts: after 1000
# SFT steps (the DDPO trainer's) some seeds start at chair_i 0.84 and GRPO then learns to name fewer objects.
TINY_SFT_STEPS = 2000
SCENE_JUDGES = {"scene": "net", "scene-strict": "strict"}  # --judge names of the exact judge's rules (rewards.py)


@dataclass
class GRPOConfig(RunConfig):
    data: str | None = option(None, "records (.jsonl with image files, .parquet or a datasets folder; ours, "
                              "RLHF-V's or TRL's layout): their questions are the prompts, their chosen answers the "
                              "SFT targets and the held-out reference; default: the synthetic scenes")
    output_dir: str = option("runs/grpo", "metrics, plot and checkpoints")
    sft_steps: int = option(0, f"supervised fine-tuning steps on the chosen answers first, saved as "
                            f"output-dir/sft.pt (default: {TINY_SFT_STEPS} for the embedded tiny model unless "
                            "--init-weights, else 0)", unset=True)
    sft_batch_size: int = option(8, "pairs per SFT step", interval="[1, inf)")
    num_generations: int = option(4, "k: answers sampled per prompt, compared within their group (>= 2)",
                                  short="-k")
    prompts_per_step: int = option(8, "prompts (groups) per batch of rollouts, over all processes",
                                   interval="[1, inf)")
    temperature: float = option(1.0, "sampling temperature; the log-probs are taken at the same temperature",
                                 interval="(0, inf)")
    top_p: float = option(1.0, "nucleus sampling (1: off)", interval="(0, 1]")
    max_new_tokens: int = option(32, "answer length limit of rollouts", interval="[1, inf)")
    judge: str | None = option(None, "pairwise judge for the grouped comparison: 'scene' (exact, needs the records' "
                               "objects: more correct-minus-hallucinated objects wins, then fewer hallucinated), "
                               "'scene-strict' (fewer hallucinated wins, then more correct: rewards naming nothing) "
                               "or module:function(record, pairs) -> P(first answer better) per pair (default with "
                               "synthetic data: scene)", exclusive="reward")
    judge_model: str | None = option(None, "local Hugging Face model folder as generative judge: it sees the "
                                     "question and both answers, in both orders, and P('A') vs P('B') is read from "
                                     "its logits", exclusive="reward")
    reward: str | None = option(None, "pointwise reward instead of a judge: 'scene' ((correct - hallucinated) / "
                                "objects) or module:function(record, answer) -> float", exclusive="reward")
    judge_template: str = option(JUDGE_TEMPLATE, "the generative judge's prompt, with {question}, {first} and "
                                 "{second}")
    loss_type: str = option("dapo", "how token losses are averaged (DESIGN.md §2)", choices=LOSS_TYPES)
    epsilon: float = option(0.2, "ratio clip range", interval="(0, inf)")
    epsilon_high: float | None = option(None, "upper clip (DAPO's clip-higher; default: --epsilon)",
                                        interval="(0, inf)")
    beta_kl: float = option(0.04, "weight of the k3 KL to the frozen starting model (0: no reference model is kept)",
                            interval="[0, inf)")
    scale_rewards: bool = option(True, "do not divide advantages by the group std (Dr. GRPO)")
    updates_per_rollout: int = option(2, "optimizer steps on each batch of rollouts (mu)",
                                      interval="[1, inf)")
    micro_batch: int = option(16, "sequences per forward/backward", interval="[1, inf)")
    lr: float = option(1e-4, "AdamW peak learning rate", interval="(0, inf)")
    warmup_ratio: float = option(0.05, "share of the optimizer steps with a linear learning-rate warm-up",
                                 interval="[0, 1]")
    max_steps: int = option(60, "batches of rollouts", interval="[1, inf)")
    eval_every: int = option(10, "steps between evaluations", interval="[1, inf)")
    save_every: int = option(10, "steps between checkpoints", interval="[1, inf)")

    def check(self, world: int = 1) -> None:
        if self.num_generations < 2:
            raise ValueError(f"num_generations (k) must be >= 2: GRPO's advantage compares the answers to a prompt, "
                             f"got {self.num_generations}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        super().check(world)
        readers = 1 if self.tensor_parallel else world  # under tensor parallelism every process takes every prompt
        if self.prompts_per_step % readers:
            raise ValueError(f"prompts_per_step ({self.prompts_per_step}) must divide evenly over {world} processes")
        given = [name for name in ("reward", "judge", "judge_model") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"give one of --reward, --judge and --judge-model, got {' and '.join(given)}")
        if not given and self.data is not None:
            raise ValueError("no judge: give --judge (scene or module:function), --judge-model DIR (a generative "
                             "judge) or --reward (scene or module:function); only the synthetic data has a default "
                             "(the exact scene judge)")
        if self.judge_model is not None and not os.path.isdir(self.judge_model):
            raise FileNotFoundError(f"--judge-model {self.judge_model}: no such folder (a local Hugging Face model "
                                    "folder is expected; nothing is downloaded)")

    def uses_scene_truth(self) -> bool:
        """Whether the reward reads the records' ground-truth objects (the exact scene judge or reward)."""
        return self.reward == "scene" or self.judge in SCENE_JUDGES or not (self.reward or self.judge
                                                                            or self.judge_model)
