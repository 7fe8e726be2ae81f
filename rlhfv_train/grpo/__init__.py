"""The GRPO trainer (`python -m rlhfv_train.grpo`): its options (config.py), the loop body and held-out metrics
(trainer.py), rollouts (rollouts.py), rewards, judges and advantages (rewards.py) and the command line (cli.py)."""
from .cli import build_parser, config_from_args, main
from .config import LOSS_TYPES, SCENE_JUDGES, TINY_SFT_STEPS, GRPOConfig
from .trainer import build_scorer, held_out_metrics, train_grpo

__all__ = ["GRPOConfig", "LOSS_TYPES", "SCENE_JUDGES", "TINY_SFT_STEPS", "build_parser", "build_scorer",
           "config_from_args", "held_out_metrics", "main", "train_grpo"]
