"""The trainers' model side: loading (loading.py), what the fused-linear route needs of a model (adapter.py: body,
lm_head, final logit transform, the check against the model's own logits), forward helpers (forward.py), the one
scoring helper of both paths (scoring.py), packing's check (packing.py), LoRA (lora.py), the tiny model families
(families.py) and the embedded tiny LLaVA (tiny.py)."""
from .adapter import (LmHead, LogitTransform, UnsupportedModelError, check_fused_linear, fused_linear_forward,
                      hidden_and_head, is_dtensor, logit_transform)
from .forward import forward_logits
from .loading import load_processor_and_model, load_run_records, load_weights, read_weights, split_indices
from .scoring import model_loss

__all__ = ["LmHead", "LogitTransform", "UnsupportedModelError", "check_fused_linear", "forward_logits",
           "fused_linear_forward", "hidden_and_head", "is_dtensor", "load_processor_and_model", "load_run_records",
           "load_weights", "logit_transform", "model_loss", "read_weights", "split_indices"]
