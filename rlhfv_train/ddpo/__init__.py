"""The DDPO trainer (`python -m rlhfv_train`): its options (config.py), the loop body and held-out metrics
(trainer.py), the cached reference scores (reference_scores.py) and the command line (cli.py)."""
from .cli import build_parser, config_from_args, main
from .config import MODES, PRESETS, TINY_SFT_STEPS, TrainConfig
from .trainer import batch_loss, held_out_metrics, scored_inputs, train

__all__ = ["MODES", "PRESETS", "TINY_SFT_STEPS", "TrainConfig", "batch_loss", "build_parser", "config_from_args",
           "held_out_metrics", "main", "scored_inputs", "train"]
