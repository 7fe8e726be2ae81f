"""Public API, logits path: per-token log-probs, sequence scores and the DDPO / DPO / GRPO losses, straight from logits.

Thin wrappers: each wraps the logits in a LogitsSource (_sources.py: validation, the backend choice, the operators)
and hands it to its loss module (losses/). Logits may be bfloat16, float16 or float32 of any leading shape, strided
views included (e.g. logits[:, :-1]); results are float32 (float64 for float64 logits).

inplace_backward=True makes the backward write d(loss)/d(logits) into the logits' own storage: the logits are
consumed (their values are garbage after backward), and the peak extra memory of the step drops to O(N).

softcap and logit_scale apply a model's final logit transform inside the kernels (DESIGN.md §2): the log-probs are
those of softmax(z / temperature) with z = softcap * tanh(logit_scale * logits / softcap), or z = logit_scale * logits
when softcap is None. Pass them when `logits` are the raw head output; a Hugging Face model's own `.logits` already
include its transform (then leave both at their defaults).

Packed (padding-free) sequences: sequence_logps and the losses also take one stream of tokens holding several
sequences back to back — logits [1, total, V] (any leading shape; flattened in order), labels [1, total] — with the
boundaries as `cu_seqlens` ([S + 1] offsets, flash-attention varlen's; a list or CPU tensor costs no host sync) or
`position_ids` (labels-shaped, restarting at 0 per sequence: transformers' packing collators; mRoPE models: the text
positions). Results are those of the same sequences padded into rows: per-sequence inputs and outputs in pack order,
per-token ones in the stream's shape. DPO losses pair the sequences by `pairs` [B, 2] (chosen, rejected sequence
indices; default: the first S/2 sequences are the chosen ones). `max_seqlen` (>= the longest sequence) is the width
of those rows (dr_grpo's default constant); None: the longest sequence. Details: rlhfv_kernels/_packing.py.

Tensor parallel: logits may be a DTensor sharded over the vocabulary (Shard on the last dimension, as
ColwiseParallel(use_local_output=False) returns them; Replicate on other mesh dimensions), labels and every other
input plain tensors, the same on each rank. Each rank computes on its slice and one all-gather of three floats per
token combines them; results are plain tensors (the same on each rank), the logits' gradient is sharded as they are
(written into them with inplace_backward). docs/distributed.md, "Tensor parallel".
"""
from __future__ import annotations

import torch

from ._packing import packing_of
from ._param_docs import stamp
from ._sources import LogitsSource
from .losses import ddpo, grpo, sequence
from .losses.ddpo import DDPOOutput
from .losses.grpo import GRPOOutput

MODES = sequence.MODES
GRPO_LOSS_TYPES = grpo.LOSS_TYPES


@stamp
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                   inplace_backward: bool = False, backend: str | None = None, return_entropy: bool = False):
    """log softmax(logits / temperature)[labels] per token, 0.0 where labels == ignore_index.

    logits [..., V]; labels [...] int64/int32. Returns float32 of labels' shape, differentiable w.r.t. logits.
    return_entropy=True returns (log-probs, entropies): also the entropy -sum_v p_v log p_v of softmax(z /
    temperature) per token (0 where ignored), from the same single pass over the vocabulary; both are
    differentiable, so a loss f(logp) + c * entropy trains through one backward pass.
    """
    source = LogitsSource(logits, inplace_backward, backend, softcap=softcap, logit_scale=logit_scale)
    if return_entropy:
        return source.logps_and_entropy(labels, ignore_index, temperature)
    return source.logps(labels, ignore_index, temperature)


@stamp
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor | None = None, *,
                   mode: str = "sum", ignore_index: int = -100, temperature: float = 1.0,
                   softcap: float | None = None, logit_scale: float = 1.0, inplace_backward: bool = False,
                   backend: str | None = None,
                   cu_seqlens=None, position_ids=None, max_seqlen: int | None = None) -> torch.Tensor:
    """Per-sequence score [B]: sum_t w_t logp_t ('sum') or that divided by sum_t w_t ('mean').

    logits [..., T, V]: the leading dimensions are flattened into B rows of T tokens. Weights default to 1 and are
    0 at ignored tokens whatever their value; a row whose weights sum to 0 scores 0.
    """
    source = LogitsSource(logits, inplace_backward, backend, softcap=softcap, logit_scale=logit_scale)
    return sequence.compute(source, labels, token_weights, mode=mode, ignore_index=ignore_index,
                            temperature=temperature, packing=packing_of(cu_seqlens, position_ids, max_seqlen))


@stamp
def ddpo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor, *,
              token_weights: torch.Tensor | None = None, beta: float = 0.1, mode: str = "mean",
              reward_margin: torch.Tensor | None = None, drs_weight: float = 0.0, drs_k: float = 1.0,
              sft_weight: float = 0.0, ignore_index: int = -100, temperature: float = 1.0,
              softcap: float | None = None, logit_scale: float = 1.0, inplace_backward: bool = False,
              backend: str | None = None,
              cu_seqlens=None, position_ids=None, max_seqlen: int | None = None, pairs=None) -> DDPOOutput:
    """Dense DPO (RLHF-V): -log sigmoid(beta_i * ((S_c - S_c^ref) - (S_r - S_r^ref))), mean over pairs.

    logits [2B, T, V] with the B chosen rows first, then the B rejected rows; labels [2B, T]; ref_logps [2B] the
    reference model's scores computed with the same weights and mode. token_weights [2B, T] (gamma on corrected
    tokens, 1 elsewhere). reward_margin [B] >= 0 with drs_weight > 0 enables MM-DPO dynamic reward scaling.
    sft_weight adds sft_weight * (token-mean NLL of the chosen answers).
    """
    source = LogitsSource(logits, inplace_backward, backend, softcap=softcap, logit_scale=logit_scale)
    return ddpo.compute(source, labels, ref_logps,
                        token_weights=token_weights, beta=beta, mode=mode, reward_margin=reward_margin,
                        drs_weight=drs_weight, drs_k=drs_k, sft_weight=sft_weight, ignore_index=ignore_index,
                        temperature=temperature, packing=packing_of(cu_seqlens, position_ids, max_seqlen),
                        pairs=pairs)


@stamp
def dpo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor, *, beta: float = 0.1,
             reward_margin: torch.Tensor | None = None, drs_weight: float = 0.0, drs_k: float = 1.0,
             sft_weight: float = 0.0, ignore_index: int = -100, temperature: float = 1.0,
             softcap: float | None = None, logit_scale: float = 1.0, inplace_backward: bool = False,
             backend: str | None = None,
             cu_seqlens=None, position_ids=None, max_seqlen: int | None = None, pairs=None) -> DDPOOutput:
    """Vanilla DPO (sigmoid loss): ddpo_loss with every token weight 1 and sequence scores summed."""
    return ddpo_loss(logits, labels, ref_logps, token_weights=None, beta=beta, mode="sum",
                     reward_margin=reward_margin, drs_weight=drs_weight, drs_k=drs_k, sft_weight=sft_weight,
                     ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                     inplace_backward=inplace_backward, backend=backend, cu_seqlens=cu_seqlens,
                     position_ids=position_ids, max_seqlen=max_seqlen, pairs=pairs)


@stamp
def grpo_loss(logits: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor, *,
              old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None, epsilon: float = 0.2,
              epsilon_high: float | None = None, beta_kl: float = 0.0, loss_type: str = "dapo",
              num_items_in_batch: float | None = None, ignore_index: int = -100, temperature: float = 1.0,
              softcap: float | None = None, logit_scale: float = 1.0, inplace_backward: bool = False,
              backend: str | None = None,
              max_completion_length: int | None = None, use_bias_correction_kl: bool = False,
              world_size: int | None = None, batch_rows: int | None = None, batch_tokens: float | None = None,
              cu_seqlens=None, position_ids=None, max_seqlen: int | None = None) -> GRPOOutput:
    """GRPO-style clipped policy loss over a group of rollouts (DESIGN.md §2).

    logits [B, T, V]; labels [B, T]; advantages [B] (group-normalised); old_logps [B, T] per-token log-probs of the
    sampling policy (None: the current policy, detached, i.e. ratio 1); ref_logps [B, T] needed when beta_kl > 0.
    loss_type: 'grpo' (per-sequence mean, then batch mean), 'bnpo' (token mean over the batch), 'dr_grpo'
    (sum / (B * max_completion_length)), 'dapo' (sum / number of loss tokens, or / (num_items_in_batch / world_size)
    when given).
    max_completion_length: dr_grpo's constant (TRL's and Liger's: the generation length; None: the width T).
    num_items_in_batch: the loss tokens of the whole batch over all processes (and accumulation steps), as TRL and
    Liger pass it; dapo divides by num_items_in_batch / world_size (None: torch.distributed's size, else 1).
    use_bias_correction_kl: multiply the k3 KL term by the ratio (TRL's GRPOConfig default is True).
    batch_rows, batch_tokens: the row count and loss-token count of the whole batch (this process's) that this call
    is a part of, as Liger's chunked loss passes its full batch's: grpo and dr_grpo divide by batch_rows, bnpo (and
    dapo without num_items_in_batch) by batch_tokens, instead of this call's own; the losses of a batch's
    micro-batches then sum to the batch's loss (gradient accumulation without weights). None: this call's.
    """
    source = LogitsSource(logits, inplace_backward, backend, softcap=softcap, logit_scale=logit_scale)
    return grpo.compute(source, labels, advantages, old_logps=old_logps,
                        ref_logps=ref_logps, epsilon=epsilon, epsilon_high=epsilon_high, beta_kl=beta_kl,
                        loss_type=loss_type, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                        temperature=temperature, max_completion_length=max_completion_length,
                        use_bias_correction_kl=use_bias_correction_kl, world_size=world_size,
                        batch_rows=batch_rows, batch_tokens=batch_tokens,
                        packing=packing_of(cu_seqlens, position_ids, max_seqlen))
