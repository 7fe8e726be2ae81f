"""Padding-free batches: the sequences of a right-padded batch packed back to back into rows of at most
`max_tokens_per_row` tokens, so the model's forward and backward spend nothing on padding.

The sequences keep their order (chosen half, then rejected half; a GRPO group's rows together), so every per-image
tensor of the processor (pixel_values, image_grid_thw, image_sizes, ...) stays as it was: images stay with their
sequence. Token-aligned tensors (input_ids, token_type_ids, mm_token_type_ids, ...) are packed like the tokens; the
attention mask is dropped and position_ids restart at 0 at each sequence, which is how transformers keeps attention
within each sequence of a packed row (masking_utils.find_packed_sequence_indices: a new sequence wherever the
position does not grow by 1; sdpa and eager get a block-diagonal causal mask, flash attention its varlen path). A
row's tail padding continues its last sequence (positions counting on, every other token-aligned input repeating its
last token), so it joins that sequence as ignored tokens.
mRoPE models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, ...) get [4, P, L] position ids: the text positions, then each
sequence's own 3-D positions from the model's get_rope_index on the padded batch, packed the same way.

Whether a model keeps its sequences apart this way is not assumed: models/packing.check_packing compares the packed
forward with the padded one on a real batch before training, and refuses a family where they differ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .collate import IGNORE_INDEX
from .inputs import token_aligned

DEFAULT_MAX_TOKENS_PER_ROW = 4096


@dataclass
class PackedRows:
    """Where each token of a right-padded batch [S, T] sits in the packed rows [P, L]."""

    source: torch.Tensor     # [P * L] int64: flat index s * T + t of the padded token at each packed slot, -1 at tails
    anchor: torch.Tensor     # [P * L] int64: the slot itself, or for a tail slot its row's last real slot
    offset: torch.Tensor     # [P * L] int64: 0, or for a tail slot its distance from that anchor
    cu_seqlens: list         # sequence boundaries over the flattened [P * L] stream (tails join the last sequence)
    shape: tuple             # (P, L)
    padded_tokens: int       # S * T, the tokens the padded batch would have run

    @property
    def tokens(self) -> int:
        return self.shape[0] * self.shape[1]

    def pack(self, per_token: torch.Tensor, fill=None) -> torch.Tensor:
        """A [S, T, ...] tensor of the padded batch as [P, L, ...]; at the rows' tails `fill`, or (None) the value of
        the row's last real token, so a tail continues its sequence in every model input (a prefix-LM's
        token_type_ids included: a tail never becomes bidirectional prefix)."""
        flat = per_token.reshape(-1, *per_token.shape[2:])
        source = self.source.to(flat.device)
        out = flat.index_select(0, source.clamp_min(0))
        if fill is None:
            out = out.index_select(0, self.anchor.to(flat.device))
        else:
            tail = (source < 0).view(-1, *([1] * (out.dim() - 1)))
            out = torch.where(tail, torch.as_tensor(fill, dtype=out.dtype, device=out.device), out)
        return out.view(*self.shape, *per_token.shape[2:])

    def unpack(self, packed: torch.Tensor, padded_shape, fill=0) -> torch.Tensor:
        """[P, L] back to the padded batch's [S, T], `fill` at its padding."""
        source = self.source.to(packed.device)
        keep = source >= 0
        out = torch.full((self.padded_tokens,), fill, dtype=packed.dtype, device=packed.device)
        return out.index_copy(0, source[keep], packed.reshape(-1)[keep]).view(padded_shape)

    def positions(self, padded_positions: torch.Tensor) -> torch.Tensor:
        """[S, T] position ids of the padded batch as [P, L], the tails continuing their row's last sequence (so a
        model's packed-sequence detection counts them in it)."""
        return self.pack(padded_positions) + self.offset.to(padded_positions.device).view(self.shape)


def plan_rows(lengths: list[int], width: int, max_tokens_per_row: int) -> PackedRows:
    """Sequences (their lengths, in order) filled into rows of at most max(max_tokens_per_row, longest) tokens, a new
    row whenever the next sequence does not fit (the order is kept, so per-image tensors need no reordering); the
    rows are as long as the fullest one, the others padded at their tails."""
    if max_tokens_per_row < 1:
        raise ValueError(f"max_tokens_per_row must be >= 1, got {max_tokens_per_row}")
    capacity = max([max_tokens_per_row, *lengths])
    rows, current, used = [], [], 0
    for s, n in enumerate(lengths):
        if current and used + n > capacity:
            rows.append(current)
            current, used = [], 0
        current.append(s)
        used += n
    rows.append(current)
    row_len = max(sum(lengths[s] for s in row) for row in rows)
    source, anchor, offset, cu = [], [], [], [0]
    for row in rows:
        for s in row:
            anchor.extend(range(len(source), len(source) + lengths[s]))
            source.extend(range(s * width, s * width + lengths[s]))
            cu.append(cu[-1] + lengths[s])
        tail = row_len - sum(lengths[s] for s in row)
        anchor.extend([len(source) - 1] * tail)
        offset.extend([0] * (len(source) - len(offset)) + list(range(1, tail + 1)))
        source.extend([-1] * tail)
        cu[-1] += tail
    as_index = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
    return PackedRows(as_index(source), as_index(anchor), as_index(offset), cu, (len(rows), row_len),
                      len(lengths) * width)


def pack_inputs(inputs: dict, rows: PackedRows, rope_index=None) -> dict:
    """The model inputs of the packed rows: token-aligned tensors packed, attention_mask dropped, position_ids set
    (with the mRoPE planes of `rope_index(inputs)` when given), every other tensor as it was."""
    aligned = set(token_aligned(inputs))
    device = inputs["input_ids"].device
    out = {name: rows.pack(value) for name, value in inputs.items() if name in aligned and name != "attention_mask"}
    out.update({name: value for name, value in inputs.items() if name not in aligned})
    padded = inputs["input_ids"]
    out["use_cache"] = False  # transformers looks for packed sequences only without a cache
    text = rows.positions(torch.arange(padded.shape[1], device=device).expand(padded.shape))
    if rope_index is None:
        out["position_ids"] = text
    else:  # [4, P, L]: the text positions (for the packed mask), then each sequence's own 3-D positions
        out["position_ids"] = torch.stack([text, *(rows.positions(plane) for plane in rope_index(inputs))])
    return out


def padded_lengths(inputs: dict) -> list[int]:
    """Each sequence's length in a right-padded batch."""
    mask = inputs["attention_mask"]
    if bool((mask[:, :1] == 0).any()):
        raise ValueError("packing needs right-padded batches; a row starts with padding")
    return mask.sum(-1).tolist()


@dataclass
class PackedBatch:
    """A batch's model inputs packed into rows, its per-token targets in the same layout, and the boundaries the
    losses take (rlhfv_kernels' cu_seqlens)."""

    inputs: dict
    rows: PackedRows

    @property
    def cu_seqlens(self) -> list:
        return self.rows.cu_seqlens


def pack_batch(inputs: dict, max_tokens_per_row: int, rope_index=None) -> PackedBatch:
    """The right-padded processor output `inputs` as packed rows (see the module's docstring)."""
    width = inputs["input_ids"].shape[1]
    rows = plan_rows(padded_lengths(inputs), width, max_tokens_per_row)
    return PackedBatch(pack_inputs(inputs, rows, rope_index), rows)


def pack_for_loss(inputs: dict, per_token: list, max_tokens_per_row: int, rope_index=None):
    """(packed model inputs, the per-token tensors of the batch packed alike (labels' tails IGNORE_INDEX, float
    tensors' 0; None stays None), the losses' packing options, the PackedRows)."""
    batch = pack_batch(inputs, max_tokens_per_row, rope_index)
    fill = lambda t: 0.0 if t.is_floating_point() else IGNORE_INDEX  # noqa: E731
    packed = [None if t is None else batch.rows.pack(t, fill(t)) for t in per_token]
    return batch.inputs, packed, {"cu_seqlens": batch.cu_seqlens}, batch.rows
