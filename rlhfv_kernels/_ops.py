"""Python glue for the compiled operators torch.ops.rlhfv.*: fake (meta) kernels and the autograd formula.

The schemas and device kernels live in csrc/; this file makes them work under torch.compile and autograd.
"""
from __future__ import annotations

import torch

from . import _backend

if _backend.extension_available():

    @torch.library.register_fake("rlhfv::logprob_fwd")
    def _logprob_fwd_fake(logits, labels, ignore_index, temperature, inplace_backward):
        logp_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return labels.new_empty(labels.shape, dtype=logp_dtype), labels.new_empty(labels.shape, dtype=torch.float64)

    @torch.library.register_fake("rlhfv::logprob_bwd")
    def _logprob_bwd_fake(grad_logp, logits, labels, lse, ignore_index, temperature):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("rlhfv::logprob_bwd_")
    def _logprob_bwd_inplace_fake(logits, grad_logp, labels, lse, ignore_index, temperature):
        return None

    def _setup_context(ctx, inputs, output):
        logits, labels, ignore_index, temperature, inplace_backward = inputs
        _, lse = output
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(lse)

    def _logprob_backward(ctx, grad_logp, _grad_lse):
        # The LSE is marked non-differentiable, so only grad_logp carries gradient.
        logits, labels, lse = ctx.saved_tensors
        if ctx.inplace_backward:
            torch.ops.rlhfv.logprob_bwd_(logits, grad_logp, labels, lse, ctx.ignore_index, ctx.temperature)
            dlogits = logits
        else:
            dlogits = torch.ops.rlhfv.logprob_bwd(grad_logp, logits, labels, lse, ctx.ignore_index, ctx.temperature)
        return dlogits, None, None, None, None

    torch.library.register_autograd("rlhfv::logprob_fwd", _logprob_backward, setup_context=_setup_context)


def fused_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, temperature: float,
                         inplace_backward: bool) -> torch.Tensor:
    """Per-token log-probs through the compiled operator (validated inputs only)."""
    logp, _ = torch.ops.rlhfv.logprob_fwd(logits, labels, ignore_index, float(temperature), inplace_backward)
    return logp
