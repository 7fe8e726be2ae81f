"""rlhfv_kernels: fused per-token log-probs and preference losses (DDPO, DPO, MM-DPO, GRPO) without N x V temporaries.

    from rlhfv_kernels import ddpo_loss
    out = ddpo_loss(logits, labels, ref_logps, token_weights=w, beta=0.5, mode="mean")
    out.loss.backward()

See README.md for the API table and rlhfv_kernels.reference for the eager implementation of every function.
"""
from . import reference
from ._backend import BACKENDS, BackendUnavailableError, cpu_kernel_variant, extension_available
from ._backend import RENAMED as RENAMED_BACKENDS
from ._backend import describe as describe_backends
from ._backend import resolve_backend
from .api import GRPO_LOSS_TYPES, ddpo_loss, dpo_loss, grpo_loss, sequence_logps, token_logprobs
from .linear import (linear_ddpo_loss, linear_dpo_loss, linear_grpo_loss, linear_sequence_logps,
                     linear_token_logprobs)
from .losses import DDPOOutput, GRPOOutput
from ._checks import check_not_sharded
from .module import head_forward, run_as_forward

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "check_not_sharded",
    "DDPOOutput",
    "GRPO_LOSS_TYPES",
    "GRPOOutput",
    "RENAMED_BACKENDS",
    "cpu_kernel_variant",
    "ddpo_loss",
    "describe_backends",
    "dpo_loss",
    "extension_available",
    "grpo_loss",
    "head_forward",
    "linear_ddpo_loss",
    "linear_dpo_loss",
    "linear_grpo_loss",
    "linear_sequence_logps",
    "linear_token_logprobs",
    "reference",
    "resolve_backend",
    "run_as_forward",
    "sequence_logps",
    "token_logprobs",
]
