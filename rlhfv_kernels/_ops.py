"""Glue shared by every operator family (torch.ops.rlhfv.* compiled, torch.ops.rlhfv_triton.* Triton): fake (meta)
kernels for torch.compile and the autograd formula of the two-pass scheme.

Schemas: csrc/ops.cpp declares the compiled family; SCHEMAS below is the same text for families defined in Python
(tests/kernels/test_triton.py checks that the two agree).
"""
from __future__ import annotations

import torch

from . import _backend

SCHEMAS = {
    "logprob_fwd": "(Tensor logits, Tensor labels, int ignore_index, float temperature, float softcap,"
                   " bool inplace_backward) -> (Tensor, Tensor)",
    "logprob_bwd": "(Tensor grad_logp, Tensor logits, Tensor labels, Tensor lse, int ignore_index,"
                   " float temperature, float softcap) -> Tensor",
    "logprob_bwd_": "(Tensor(a!) logits, Tensor grad_logp, Tensor labels, Tensor lse, int ignore_index,"
                    " float temperature, float softcap) -> ()",
    "logprob_entropy_fwd": "(Tensor logits, Tensor labels, int ignore_index, float temperature, float softcap,"
                           " bool inplace_backward) -> (Tensor, Tensor, Tensor)",
    "logprob_entropy_bwd": "(Tensor grad_logp, Tensor grad_entropy, Tensor logits, Tensor labels, Tensor lse,"
                           " Tensor entropy, int ignore_index, float temperature, float softcap) -> Tensor",
    "logprob_entropy_bwd_": "(Tensor(a!) logits, Tensor grad_logp, Tensor grad_entropy, Tensor labels, Tensor lse,"
                            " Tensor entropy, int ignore_index, float temperature, float softcap) -> ()",
    "linear_logprob_fwd": "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index,"
                          " float temperature, float softcap, int chunk_rows) -> (Tensor, Tensor)",
    "linear_logprob_bwd": "(Tensor grad_logp, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse,"
                          " int ignore_index, float temperature, float softcap, int chunk_rows)"
                          " -> (Tensor, Tensor, Tensor)",
    "linear_logprob_entropy_fwd": "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index,"
                                  " float temperature, float softcap, int chunk_rows) -> (Tensor, Tensor, Tensor)",
    "linear_logprob_entropy_bwd": "(Tensor grad_logp, Tensor grad_entropy, Tensor hidden, Tensor weight,"
                                  " Tensor? bias, Tensor labels, Tensor lse, Tensor entropy, int ignore_index,"
                                  " float temperature, float softcap, int chunk_rows) -> (Tensor, Tensor, Tensor)",
}


def refuse_double_backward(what: str) -> None:
    """The fused backward kernels are not differentiable: under create_graph=True their gradients would be taken as
    constants and a second derivative would silently be wrong (zero), so stop with a clear error instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"rlhfv: {what} has first-order gradients only; a backward with create_graph=True "
                           "(double backward, e.g. a gradient penalty) is not supported. Use backend='eager' "
                           "for higher-order gradients.")


def _overwrite(logits: torch.Tensor, inplace_op, *args) -> torch.Tensor:
    """Runs an in-place backward operator that writes d(loss)/d(logits) over `logits`, then bumps their version
    counter (the kernel writes through a pointer autograd cannot see): any other node that saved these logits (a
    z-loss on the same logits, a second backward with retain_graph=True) then raises autograd's "modified by an
    inplace operation" error instead of reading the gradient as if it were the logits."""
    inplace_op(logits, *args)
    torch.autograd.graph.increment_version(logits)
    return logits


def register_glue(namespace: str) -> None:
    """Fake kernels and autograd for namespace::logprob_fwd / logprob_bwd / logprob_bwd_."""
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(f"{namespace}::logprob_fwd")
    def _fwd_fake(logits, labels, ignore_index, temperature, softcap, inplace_backward):
        logp_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return labels.new_empty(labels.shape, dtype=logp_dtype), labels.new_empty(labels.shape, dtype=torch.float64)

    @torch.library.register_fake(f"{namespace}::logprob_bwd")
    def _bwd_fake(grad_logp, logits, labels, lse, ignore_index, temperature, softcap):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{namespace}::logprob_bwd_")
    def _bwd_inplace_fake(logits, grad_logp, labels, lse, ignore_index, temperature, softcap):
        return None

    def setup_context(ctx, inputs, output):
        logits, labels, ignore_index, temperature, softcap, inplace_backward = inputs
        _, lse = output
        ctx.save_for_backward(logits, labels, lse)
        ctx.args = (ignore_index, temperature, softcap)
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_logp, _grad_lse):
        # The LSE is marked non-differentiable, so only grad_logp carries gradient.
        refuse_double_backward(f"{namespace}::logprob_fwd")
        logits, labels, lse = ctx.saved_tensors
        if ctx.inplace_backward:
            return _overwrite(logits, ops.logprob_bwd_, grad_logp, labels, lse, *ctx.args), None, None, None, None, None
        return ops.logprob_bwd(grad_logp, logits, labels, lse, *ctx.args), None, None, None, None, None

    torch.library.register_autograd(f"{namespace}::logprob_fwd", backward, setup_context=setup_context)
    _register_entropy_glue(namespace, ops)


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _fake_logp_entropy_lse(labels, input_dtype):
    """Fake (logp, entropy, lse) of the entropy forwards: labels' shape; fp32 (fp64 for fp64 input), lse fp64."""
    logp_dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    return (labels.new_empty(labels.shape, dtype=logp_dtype), labels.new_empty(labels.shape, dtype=logp_dtype),
            labels.new_empty(labels.shape, dtype=torch.float64))


def _register_entropy_glue(namespace: str, ops) -> None:
    """logprob_entropy_fwd: the backward takes both incoming gradients; without one for the entropy it is exactly
    logprob_fwd's backward (no extra work)."""

    @torch.library.register_fake(f"{namespace}::logprob_entropy_fwd")
    def _fwd_fake(logits, labels, ignore_index, temperature, softcap, inplace_backward):
        return _fake_logp_entropy_lse(labels, logits.dtype)

    @torch.library.register_fake(f"{namespace}::logprob_entropy_bwd")
    def _bwd_fake(grad_logp, grad_entropy, logits, labels, lse, entropy, ignore_index, temperature, softcap):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{namespace}::logprob_entropy_bwd_")
    def _bwd_inplace_fake(logits, grad_logp, grad_entropy, labels, lse, entropy, ignore_index, temperature, softcap):
        return None

    def setup_context(ctx, inputs, output):
        logits, labels, ignore_index, temperature, softcap, inplace_backward = inputs
        _, entropy, lse = output
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.args = (ignore_index, temperature, softcap)
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        refuse_double_backward(f"{namespace}::logprob_entropy_fwd")
        logits, labels, lse, entropy = ctx.saved_tensors
        grad_logp = _zeros_if_none(grad_logp, entropy)
        none = (None,) * 5
        if grad_entropy is None:
            if ctx.inplace_backward:
                return (_overwrite(logits, ops.logprob_bwd_, grad_logp, labels, lse, *ctx.args),) + none
            return (ops.logprob_bwd(grad_logp, logits, labels, lse, *ctx.args),) + none
        if ctx.inplace_backward:
            return (_overwrite(logits, ops.logprob_entropy_bwd_, grad_logp, grad_entropy, labels, lse, entropy,
                               *ctx.args),) + none
        return (ops.logprob_entropy_bwd(grad_logp, grad_entropy, logits, labels, lse, entropy, *ctx.args),) + none

    torch.library.register_autograd(f"{namespace}::logprob_entropy_fwd", backward, setup_context=setup_context)


def register_linear_glue(namespace: str) -> None:
    """Fake kernels and autograd for namespace::linear_logprob_fwd / linear_logprob_bwd (the fused-linear path)."""
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(f"{namespace}::linear_logprob_fwd")
    def _fwd_fake(hidden, weight, bias, labels, ignore_index, temperature, softcap, chunk_rows):
        logp_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return labels.new_empty(labels.shape, dtype=logp_dtype), labels.new_empty(labels.shape, dtype=torch.float64)

    @torch.library.register_fake(f"{namespace}::linear_logprob_bwd")
    def _bwd_fake(grad_logp, hidden, weight, bias, labels, lse, ignore_index, temperature, softcap, chunk_rows):
        dbias = torch.empty_like(bias) if bias is not None else weight.new_empty((0,))
        return torch.empty_like(hidden, memory_format=torch.contiguous_format), torch.empty_like(weight), dbias

    def setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, ignore_index, temperature, softcap, chunk_rows = inputs
        _, lse = output
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.args = (ignore_index, temperature, softcap, chunk_rows)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_logp, _grad_lse):
        refuse_double_backward(f"{namespace}::linear_logprob_fwd")
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        dhidden, dweight, dbias = ops.linear_logprob_bwd(grad_logp, hidden, weight, bias, labels, lse, *ctx.args)
        return dhidden, dweight, (dbias if bias is not None else None), None, None, None, None, None

    torch.library.register_autograd(f"{namespace}::linear_logprob_fwd", backward, setup_context=setup_context)

    @torch.library.register_fake(f"{namespace}::linear_logprob_entropy_fwd")
    def _entropy_fwd_fake(hidden, weight, bias, labels, ignore_index, temperature, softcap, chunk_rows):
        return _fake_logp_entropy_lse(labels, hidden.dtype)

    @torch.library.register_fake(f"{namespace}::linear_logprob_entropy_bwd")
    def _entropy_bwd_fake(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, ignore_index,
                          temperature, softcap, chunk_rows):
        return _bwd_fake(grad_logp, hidden, weight, bias, labels, lse, ignore_index, temperature, softcap,
                         chunk_rows)

    def entropy_setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, ignore_index, temperature, softcap, chunk_rows = inputs
        _, entropy, lse = output
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.args = (ignore_index, temperature, softcap, chunk_rows)
        ctx.mark_non_differentiable(lse)

    def entropy_backward(ctx, grad_logp, grad_entropy, _grad_lse):
        refuse_double_backward(f"{namespace}::linear_logprob_entropy_fwd")
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        grad_logp = _zeros_if_none(grad_logp, entropy)
        if grad_entropy is None:
            grads = ops.linear_logprob_bwd(grad_logp, hidden, weight, bias, labels, lse, *ctx.args)
        else:
            grads = ops.linear_logprob_entropy_bwd(grad_logp, grad_entropy, hidden, weight, bias, labels, lse,
                                                   entropy, *ctx.args)
        dhidden, dweight, dbias = grads
        return dhidden, dweight, (dbias if bias is not None else None), None, None, None, None, None

    torch.library.register_autograd(f"{namespace}::linear_logprob_entropy_fwd", entropy_backward,
                                    setup_context=entropy_setup_context)


if _backend.extension_available():  # the Triton family registers its own glue (triton/ops.py)
    register_glue(_backend.TABLE["cpp"].namespace)
    register_linear_glue(_backend.TABLE["cpp"].namespace)


def fused_linear_token_logprobs(hidden, weight, bias, labels, ignore_index: int, temperature: float, softcap: float,
                                chunk_rows: int, backend: str) -> torch.Tensor:
    """Per-token log-probs of the fused-linear path through the operator family of `backend` (validated inputs;
    temperature and softcap are the operators' own, a logit scale already folded in: _sources.KernelTransform)."""
    ops = _backend.operators(backend)
    logp, _ = ops.linear_logprob_fwd(hidden, weight, bias, labels, ignore_index, float(temperature), float(softcap),
                                     chunk_rows)
    return logp


def fused_linear_token_logprobs_entropy(hidden, weight, bias, labels, ignore_index: int, temperature: float,
                                        softcap: float, chunk_rows: int, backend: str):
    """(per-token log-probs, entropies) of the fused-linear path (as fused_linear_token_logprobs)."""
    ops = _backend.operators(backend)
    logp, entropy, _ = ops.linear_logprob_entropy_fwd(hidden, weight, bias, labels, ignore_index, float(temperature),
                                                      float(softcap), chunk_rows)
    return logp, entropy


def fused_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, temperature: float,
                         softcap: float, inplace_backward: bool, backend: str, with_entropy: bool = False):
    """Per-token log-probs through the operator family of `backend` (inputs already validated); with_entropy:
    (log-probs, entropies) from the same pass."""
    ops = _backend.operators(backend)
    if with_entropy:
        logp, entropy, _ = ops.logprob_entropy_fwd(logits, labels, ignore_index, float(temperature), float(softcap),
                                                   inplace_backward)
        return logp, entropy
    logp, _ = ops.logprob_fwd(logits, labels, ignore_index, float(temperature), float(softcap), inplace_backward)
    return logp
