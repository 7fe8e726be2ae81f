"""The trainers' model side: loading a model, its processor and weights (loading.py; processors.py: a processor
without its video part), what the fused-linear route needs of a model (adapter.py: body, lm_head, final logit
transform, the check against the model's own logits), forward helpers (forward.py), the one scoring helper of both
paths (scoring.py), what packing needs of a model (packed_model.py), LoRA (lora.py); the embedded tiny LLaVA (tiny.py)
and the tiny model families, test fixtures (tiny_families.py), with docs/models.md's generated tables
(support_table.py)."""
from .adapter import (LmHead, LogitTransform, UnsupportedModelError, check_fused_linear, fused_linear_forward,
                      hidden_and_head, is_dtensor, logit_transform)
from .forward import forward_logits
from .loading import load_processor_and_model, load_weights, read_weights
from .scoring import model_loss

__all__ = ["LmHead", "LogitTransform", "UnsupportedModelError", "check_fused_linear", "forward_logits",
           "fused_linear_forward", "hidden_and_head", "is_dtensor", "load_processor_and_model", "load_weights",
           "logit_transform", "model_loss", "read_weights"]
