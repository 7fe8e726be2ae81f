"""Evaluation of generated answers: generation as the trainers prompt (generation.py), the CHAIR-style
hallucination metric (hallucination.py) and its command line, `python -m rlhfv_train.eval` (cli.py)."""
from .cli import build_parser, main
from .generation import GeneratedBatch, GenerationSettings, generate_answers, generate_tokens, image_placeholder_ids
from .hallucination import METRICS, default_parser, evaluate_hallucination, hallucination_rates, load_parser

__all__ = ["GeneratedBatch", "GenerationSettings", "METRICS", "build_parser", "default_parser",
           "evaluate_hallucination", "generate_answers", "generate_tokens", "hallucination_rates",
           "image_placeholder_ids", "load_parser", "main"]
