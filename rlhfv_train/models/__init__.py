"""The trainers' model side: loading (loading.py), what the fused-linear route needs of a model (adapter.py: body,
lm_head, final logit transform, the check against the model's own logits), forward helpers (forward.py) and the
embedded tiny LLaVA (tiny.py)."""
from .adapter import (LmHead, LogitTransform, UnsupportedModelError, check_fused_linear, hidden_and_head,
                      logit_transform)
from .forward import forward_logits
from .loading import load_processor_and_model, load_run_records, load_weights, read_weights, split_indices

__all__ = ["LmHead", "LogitTransform", "UnsupportedModelError", "check_fused_linear", "forward_logits",
           "hidden_and_head", "load_processor_and_model", "load_run_records", "load_weights", "logit_transform",
           "read_weights", "split_indices"]
