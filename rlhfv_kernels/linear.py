"""The fused-linear family: log-probs, sequence scores, DDPO/DPO and GRPO from the last hidden states and the lm_head
weight, never materializing the N x V logits.

hidden [..., H], weight [V, H] (the lm_head's), optional bias [V]. Differentiable w.r.t. hidden, weight and bias
(dweight and dbias accumulated in fp32). Same options, backends and results as the logits functions in api.py.

Thin wrappers: each wraps its inputs in a LinearSource (_sources.py), which picks one of two schemes per call:
- The losses (linear_ddpo_loss, linear_dpo_loss, linear_grpo_loss) with a gradient wanted: chunks of whole pairs
  (rows) and their gradients in the forward, 3 GEMMs (_linear_engine.py); the backward only scales them. Ignored tokens
  (prompt, image) are skipped. chunk_size=None packs whole pairs up to DEFAULT_LOSS_CHUNK_BYTES (128 MiB) of fp32
  logits, a larger pair alone in one pass; an int is a hard bound in non-ignored tokens (a pair larger than it takes
  two passes over pieces: 4 GEMMs for that pair). Also used: the backend's logits-path row kernels.
  Without a gradient wanted (reference scoring, evaluation) the same chunks only score the tokens (one GEMM).
- Log-probs and sequence scores (their backward's coefficient is only known then), or the losses with a gradient
  also wanted for another input (ref_logps, token_weights, ...): per-token log-probs of the non-ignored tokens,
  `chunk_size` at a time, the logits recomputed in backward (4 GEMMs). chunk_size=None keeps a chunk of fp32 logits
  under DEFAULT_CHUNK_BYTES (256 MiB). Peak extra memory: one chunk of logits plus the weight-sized gradient.

Backends: "cpp" (CPU, the compiled extension: ATen/BLAS matmuls + the row kernels), "triton" (CUDA tensors, or CPU
tensors under the interpreter; log-probs: tiles of hidden @ W.T built with tensor-core dots, online LSE per token,
atomics for dhidden/dweight in fp32, chunk_size does not apply; losses: cuBLAS GEMMs + the Triton row kernels),
"eager" (hidden @ W.T, then the eager reference). On CUDA tensors None picks "triton".

low_rank=(u, B), u [..., r] and B [V, r]: the logits are hidden @ W.T + u @ B.T (+ bias) — a LoRA adapter on the
head, u = scaling * lora_A(dropout(hidden)). The losses' engine adds the rank-r products to its GEMMs (no [V, H + r]
copy; with W frozen no [V, H] gradient either); the log-probs and the eager backend widen hidden and weight instead.

Packed sequences (cu_seqlens / position_ids / max_seqlen / pairs) as in api.py, with hidden [1, total, H]: the losses'
chunks still hold whole sequences (pairs), wherever they sit in the stream.

Tensor parallel: weight (and bias) may be DTensors sharded over the vocabulary (Shard(0): ColwiseParallel's and
transformers' tp_plan "colwise" layout), with hidden the same on every rank (a plain tensor, checked by one small
all-reduce, or a Replicate DTensor). Each rank scores its rows; one all-gather of three floats per token combines
them, and the backward all-reduces d hidden once. The losses then take the log-probs scheme (4 GEMMs); low_rank and
backend="eager" are refused with a sharded weight. docs/distributed.md, "Tensor parallel".
"""
from __future__ import annotations

import torch

from ._packing import packing_of
from ._param_docs import stamp
from ._sources import LinearSource
from .losses import ddpo, grpo, sequence
from .losses.ddpo import DDPOOutput
from .losses.grpo import GRPOOutput


@stamp
def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, low_rank=None, ignore_index: int = -100,
                          temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                          chunk_size: int | None = None, backend: str | None = None, return_entropy: bool = False):
    """log softmax(z / temperature)[labels] per token, 0.0 where ignored; z = hidden @ weight.T + bias after the
    logit transform (softcap, logit_scale: see api.py). return_entropy=True: (log-probs, entropies), as
    api.token_logprobs."""
    source = LinearSource(hidden, weight, bias, chunk_size, backend, softcap=softcap, logit_scale=logit_scale,
                          low_rank=low_rank)
    if return_entropy:
        return source.logps_and_entropy(labels, ignore_index, temperature)
    return source.logps(labels, ignore_index, temperature)


@stamp
def linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          token_weights: torch.Tensor | None = None, *, bias: torch.Tensor | None = None, low_rank=None,
                          mode: str = "sum", ignore_index: int = -100, temperature: float = 1.0,
                          softcap: float | None = None, logit_scale: float = 1.0, chunk_size: int | None = None,
                          backend: str | None = None,
                          cu_seqlens=None, position_ids=None, max_seqlen: int | None = None) -> torch.Tensor:
    """sequence_logps from hidden states [..., T, H] and the lm_head weight."""
    source = LinearSource(hidden, weight, bias, chunk_size, backend, softcap=softcap, logit_scale=logit_scale,
                          low_rank=low_rank)
    return sequence.compute(source, labels, token_weights, mode=mode, ignore_index=ignore_index,
                            temperature=temperature, packing=packing_of(cu_seqlens, position_ids, max_seqlen))


@stamp
def linear_ddpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor, *,
                     bias: torch.Tensor | None = None, low_rank=None, token_weights: torch.Tensor | None = None,
                     beta: float = 0.1, mode: str = "mean", reward_margin: torch.Tensor | None = None,
                     drs_weight: float = 0.0, drs_k: float = 1.0, sft_weight: float = 0.0, ignore_index: int = -100,
                     temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                     chunk_size: int | None = None, backend: str | None = None,
                     cu_seqlens=None, position_ids=None, max_seqlen: int | None = None, pairs=None) -> DDPOOutput:
    """ddpo_loss from hidden states [2B, T, H] (chosen rows first) and the lm_head weight."""
    source = LinearSource(hidden, weight, bias, chunk_size, backend, softcap=softcap, logit_scale=logit_scale,
                          low_rank=low_rank)
    return ddpo.compute(source, labels, ref_logps,
                        token_weights=token_weights, beta=beta, mode=mode, reward_margin=reward_margin,
                        drs_weight=drs_weight, drs_k=drs_k, sft_weight=sft_weight, ignore_index=ignore_index,
                        temperature=temperature, packing=packing_of(cu_seqlens, position_ids, max_seqlen),
                        pairs=pairs)


@stamp
def linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor, *,
                    bias: torch.Tensor | None = None, low_rank=None, beta: float = 0.1,
                    reward_margin: torch.Tensor | None = None, drs_weight: float = 0.0, drs_k: float = 1.0,
                    sft_weight: float = 0.0, ignore_index: int = -100,
                    temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                    chunk_size: int | None = None, backend: str | None = None,
                    cu_seqlens=None, position_ids=None, max_seqlen: int | None = None, pairs=None) -> DDPOOutput:
    """linear_ddpo_loss with every token weight 1 and sequence scores summed (vanilla DPO)."""
    return linear_ddpo_loss(hidden, weight, labels, ref_logps, bias=bias, low_rank=low_rank, token_weights=None,
                            beta=beta, mode="sum",
                            reward_margin=reward_margin, drs_weight=drs_weight, drs_k=drs_k, sft_weight=sft_weight,
                            ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                            logit_scale=logit_scale, chunk_size=chunk_size, backend=backend,
                            cu_seqlens=cu_seqlens, position_ids=position_ids, max_seqlen=max_seqlen, pairs=pairs)


@stamp
def linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor, *,
                     bias: torch.Tensor | None = None, low_rank=None, old_logps: torch.Tensor | None = None,
                     ref_logps: torch.Tensor | None = None, epsilon: float = 0.2, epsilon_high: float | None = None,
                     beta_kl: float = 0.0, loss_type: str = "dapo", num_items_in_batch: float | None = None,
                     ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
                     logit_scale: float = 1.0, chunk_size: int | None = None,
                     backend: str | None = None,
                     max_completion_length: int | None = None, use_bias_correction_kl: bool = False,
                     world_size: int | None = None, batch_rows: int | None = None,
                     batch_tokens: float | None = None,
                     cu_seqlens=None, position_ids=None, max_seqlen: int | None = None) -> GRPOOutput:
    """grpo_loss from hidden states [B, T, H] and the lm_head weight (options as api.grpo_loss)."""
    source = LinearSource(hidden, weight, bias, chunk_size, backend, softcap=softcap, logit_scale=logit_scale,
                          low_rank=low_rank)
    return grpo.compute(source, labels, advantages,
                        old_logps=old_logps, ref_logps=ref_logps, epsilon=epsilon, epsilon_high=epsilon_high,
                        beta_kl=beta_kl, loss_type=loss_type, num_items_in_batch=num_items_in_batch,
                        ignore_index=ignore_index, temperature=temperature,
                        max_completion_length=max_completion_length, use_bias_correction_kl=use_bias_correction_kl,
                        world_size=world_size, batch_rows=batch_rows, batch_tokens=batch_tokens,
                        packing=packing_of(cu_seqlens, position_ids, max_seqlen))
