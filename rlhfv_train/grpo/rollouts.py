"""Rollouts for online GRPO: k sampled answers per prompt, packed as prompt + answer sequences, and their per-token
log-probs from the fused kernels.

generate() works on left-padded prompts; the sequences it returns are re-packed here with right padding, so that
every row starts at position 0 exactly as in the training forward (a left-padded row scored without position ids
would be shifted). The answer is the new tokens up to and including the first end-of-sequence token (the model is
trained to stop), or all of them when it ran into max_new_tokens. Sequences are token ids straight from generate(),
never decoded and re-encoded, so the log-probs are those of the tokens that were sampled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import (IGNORE_INDEX, PreferenceRecord, concat_rows, repeat_rows, select_rows, takes_suffix,
                   token_aligned)
from ..data.packed_rows import pack_for_loss
from ..eval import GenerationSettings, generate_tokens
from ..models import model_loss
from ..models.packed_model import mrope_index


@dataclass
class Rollouts:
    """k consecutive rows per prompt (a group). labels are next-token targets: position t holds the answer token at
    t + 1, IGNORE_INDEX elsewhere, so the full logits are scored without slicing."""
    inputs: dict                     # model inputs, right-padded: input_ids [B, T], attention_mask, and every other
    #                                  tensor the processor gave the prompts (pixel_values, image_grid_thw, ...)
    labels: torch.Tensor             # [B, T]
    record_indices: list[int]        # one per group
    answers: list[str]               # [B] decoded answers (special tokens dropped)
    answer_tokens: torch.Tensor      # [B] answer lengths in tokens (end-of-sequence included)
    k: int

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    def model_inputs(self, rows: slice) -> dict:
        return select_rows(self.inputs, rows)


def sample(model, processor, records: list[PreferenceRecord], record_indices: list[int], *, k: int,
           settings: GenerationSettings, device, autocast_dtype=None) -> Rollouts:
    """k answers per record of `record_indices` (settings: sampling options, num_samples = k), packed."""
    if k < 2:
        raise ValueError(f"GRPO needs k >= 2 answers per prompt (the advantage compares them), got {k}")
    tokenizer = getattr(processor, "tokenizer", processor)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    prompts = [records[i] for i in record_indices]
    batches = generate_tokens(model, processor, prompts, settings, device=device, autocast_dtype=autocast_dtype)
    rows, per_prompt = [], []
    for batch in batches:
        aligned = token_aligned(batch.inputs)  # input_ids, attention_mask, token_type_ids, ...: re-packed below
        mask = batch.inputs["attention_mask"].bool()
        # Image tensors (pixel_values, image_grid_thw, ...): each prompt's, k times.
        per_prompt.append(repeat_rows({n: v for n, v in batch.inputs.items() if n not in aligned}, k,
                                      total=len(batch.records)))
        for i in range(len(batch.records)):
            prompt = {name: batch.inputs[name][i][mask[i]] for name in aligned}
            for j in range(k):
                new = batch.new_tokens[i * k + j]
                ends = (new == eos).nonzero()
                length = int(ends[0]) + 1 if len(ends) else new.numel()
                rows.append((prompt, new[:length]))
    width = max(len(p["input_ids"]) + len(a) for p, a in rows)
    # Token-aligned tensors start as zeros (an answer token is text: type 0, no image), input_ids as padding. A
    # prefix-LM (PaliGemma) marks its answer tokens with token_type_ids 1, as in training.
    answer_type = {"token_type_ids": 1} if takes_suffix(processor) else {}
    packed = {name: value.new_zeros((len(rows), width, *value.shape[1:])) for name, value in rows[0][0].items()}
    packed["input_ids"].fill_(pad)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long, device=device)
    for row, (prompt, answer) in enumerate(rows):
        p, n = len(prompt["input_ids"]), len(answer)
        for name, value in prompt.items():
            packed[name][row, :p] = value
        packed["input_ids"][row, p:p + n] = answer
        packed["attention_mask"][row, :p + n] = 1
        for name, value in answer_type.items():
            packed[name][row, p:p + n] = value
        labels[row, p - 1:p + n - 1] = answer  # the logits at t predict token t + 1
    answers = [text.strip() for text in tokenizer.batch_decode([a for _, a in rows], skip_special_tokens=True)]
    return Rollouts(inputs={**packed, **concat_rows(per_prompt)}, labels=labels,
                    record_indices=list(record_indices), answers=answers,
                    answer_tokens=torch.tensor([len(a) for _, a in rows]), k=k)


def micro_batch_inputs(rollouts: Rollouts, rows: slice, per_token: list, per_sequence: list, model, *,
                       packing: bool = False, max_tokens_per_row: int | None = None):
    """(model inputs, labels, the per-token tensors' rows, the per-sequence tensors' rows, the loss's packing
    options, the PackedRows or None) of the rollouts' rows `rows`; packing: their sequences packed into rows of
    max_tokens_per_row tokens (None: the longest), the per-sequence tensors then in the pack's order."""
    inputs, labels = rollouts.model_inputs(rows), rollouts.labels[rows]
    per_token = [None if t is None else t[rows] for t in per_token]
    per_sequence = [t[rows] for t in per_sequence]
    if not packing:
        return inputs, labels, per_token, per_sequence, {}, None
    inputs, (labels, *per_token), packing, packed = pack_for_loss(inputs, [labels, *per_token], max_tokens_per_row,
                                                                  mrope_index(model))
    return inputs, labels, per_token, [packed.per_sequence(t) for t in per_sequence], packing, packed


@torch.no_grad()
def token_logps(model, rollouts: Rollouts, *, micro_batch: int, temperature: float = 1.0, autocast_dtype=None,
                backend=None, fused_linear: bool = False, packing: bool = False,
                max_tokens_per_row: int | None = None) -> torch.Tensor:
    """[B, T] log-probs of the rollouts' answer tokens under `model` (0 elsewhere): the sampling policy's (old) or
    the frozen reference's, in micro-batches of rows; fused_linear: from the hidden states and the lm_head weight,
    without the logits; packing: each micro-batch's sequences packed into rows (no padding run)."""
    out = []
    for start in range(0, rollouts.input_ids.shape[0], micro_batch):
        rows = slice(start, start + micro_batch)
        inputs, labels, _, _, _, packed = micro_batch_inputs(rollouts, rows, [], [], model, packing=packing,
                                                             max_tokens_per_row=max_tokens_per_row)
        logps = model_loss("token_logprobs", model, inputs, labels, fused_linear=fused_linear,
                           autocast_dtype=autocast_dtype, temperature=temperature, backend=backend)
        out.append(logps if packed is None else packed.unpack(logps, rollouts.labels[rows].shape))
    return torch.cat(out)
