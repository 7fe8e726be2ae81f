"""Padding-free batches: the sequences of a padded batch packed back to back into rows of at most
`max_tokens_per_row` tokens, so the model's forward and backward spend nothing on padding.

Rows are filled first-fit, longest sequences first, so the stream's sequence order (PackedRows.order) is not the
batch's: every per-sequence tensor of the processor (pixel_values, image_grid_thw, image_sizes, ...) is reordered
alike (inputs.select_rows), so images stay with their sequence, and the losses get the order through
PackedRows.per_sequence (per-sequence inputs) and PackedRows.pairs (DPO's pairs). Token-aligned tensors
(input_ids, token_type_ids, mm_token_type_ids, ...) are packed like the tokens; the attention mask is dropped and
position_ids restart at 0 at each sequence, which is how transformers keeps attention within each sequence of a
packed row (masking_utils.find_packed_sequence_indices: a new sequence wherever the
position does not grow by 1; sdpa and eager get a block-diagonal causal mask, flash attention its varlen path). A
row's tail padding continues its last sequence (positions counting on, every other token-aligned input repeating its
last token), so it joins that sequence as ignored tokens.
mRoPE models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, ...) get [4, P, L] position ids: the text positions, then each
sequence's own 3-D positions from the model's get_rope_index on the padded batch, packed the same way.

Whether a model keeps its sequences apart this way is not assumed: models/packed_model.check_packing compares the packed
forward with the padded one on a real batch before training, and refuses a family where they differ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .collate import IGNORE_INDEX
from .inputs import select_rows, token_aligned

@dataclass
class PackedRows:
    """Where each token of a padded batch [S, T] sits in the packed rows [P, L]."""

    source: torch.Tensor     # [P * L] int64: flat index s * T + t of the padded token at each packed slot, -1 at tails
    anchor: torch.Tensor     # [P * L] int64: the slot itself, or for a tail slot its row's last real slot
    offset: torch.Tensor     # [P * L] int64: 0, or for a tail slot its distance from that anchor
    cu_seqlens: list         # sequence boundaries over the flattened [P * L] stream (tails join the last sequence)
    shape: tuple             # (P, L)
    padded_tokens: int       # S * T, the tokens the padded batch would have run
    order: list              # the padded row of each sequence of the stream, in stream order

    def per_sequence(self, padded: torch.Tensor) -> torch.Tensor:
        """A per-sequence tensor [S, ...] of the padded batch in stream order (the losses' pack order)."""
        return padded.index_select(0, torch.tensor(self.order, dtype=torch.long, device=padded.device))

    def pairs(self) -> torch.Tensor:
        """[B, 2] stream indices of each pair's chosen and rejected sequence (padded rows i and i + B), the losses'
        `pairs`."""
        where = {row: index for index, row in enumerate(self.order)}
        half = len(self.order) // 2
        return torch.tensor([[where[i], where[i + half]] for i in range(half)], dtype=torch.long)

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


def check_max_tokens_per_row(value, packing: bool = True) -> None:
    """A positive int or None; given without packing it would do nothing, so it is refused."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"max_tokens_per_row must be a positive int or None (the batch's longest sequence), got "
                         f"{value!r}")
    if value is not None and not packing:
        raise ValueError(f"max_tokens_per_row={value} applies to packed batches only: turn packing on (--packing, "
                         "DPOConfig(padding_free=True)) or leave it unset")


def plan_rows(lengths: list[int], width: int, max_tokens_per_row: int | None = None,
              starts: list[int] | None = None, *, in_order: bool = False) -> PackedRows:
    """Sequences (sequence s is tokens starts[s]:starts[s] + lengths[s] of padded row s; starts 0 when right-padded)
    packed into rows of at most max(max_tokens_per_row, longest) tokens (None: the longest sequence): first fit,
    longest sequences first, so few tokens are left in tails; the rows are as long as the fullest one, the others
    padded at their tails. The stream's sequence order (PackedRows.order) is the rows' in turn. in_order: the
    batch's order kept, a new row whenever the next sequence does not fit (check_packing's controlled layout).

    The row length trades tails against attention: with sdpa or eager attention a row of L tokens costs L^2 under its
    block-diagonal mask, so rows about as long as the longest sequence (the default) never cost more attention than
    the padded batch; flash attention's varlen path costs only each sequence's own, so longer rows only save tails."""
    starts = [0] * len(lengths) if starts is None else starts
    check_max_tokens_per_row(max_tokens_per_row)
    capacity = max([max_tokens_per_row or 0, *lengths, 1])
    rows, used = [], []
    for s in range(len(lengths)) if in_order else sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        open_rows = range(max(len(used) - 1, 0) if in_order else 0, len(used))  # in order: only the last row
        fit = next((r for r in open_rows if used[r] + lengths[s] <= capacity), None)
        if fit is None:
            rows.append([])
            used.append(0)
            fit = len(rows) - 1
        rows[fit].append(s)
        used[fit] += lengths[s]
    rows = [sorted(row) for row in rows] or [[]]  # within a row, the batch's order
    row_len = max(max(used, default=0), 1)
    source, anchor, offset, cu = [], [], [], [0]
    for row in rows:
        for s in row:
            anchor.extend(range(len(source), len(source) + lengths[s]))
            source.extend(range(s * width + starts[s], s * width + starts[s] + lengths[s]))
            cu.append(cu[-1] + lengths[s])
        tail = row_len - sum(lengths[s] for s in row)
        anchor.extend([len(source) - 1] * tail)
        offset.extend([0] * (len(source) - len(offset)) + list(range(1, tail + 1)))
        source.extend([-1] * tail)
        cu[-1] += tail
    as_index = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
    return PackedRows(as_index(source), as_index(anchor), as_index(offset), cu, (len(rows), row_len),
                      len(lengths) * width, [s for row in rows for s in row])


def pack_inputs(inputs: dict, rows: PackedRows, starts: torch.Tensor, rope_index=None) -> dict:
    """The model inputs of the packed rows: token-aligned tensors packed, attention_mask dropped, position_ids set
    (with the mRoPE planes of `rope_index(inputs)` when given), every per-sequence tensor in the stream's order.
    starts: [S] where each padded row's sequence begins."""
    aligned = set(token_aligned(inputs))
    device = inputs["input_ids"].device
    out = {name: rows.pack(value) for name, value in inputs.items() if name in aligned and name != "attention_mask"}
    # per-sequence tensors (pixel_values, image_grid_thw, ...) in the stream's order: images stay with their sequence
    out.update(select_rows({name: value for name, value in inputs.items() if name not in aligned}, rows.order,
                           total=inputs["input_ids"].shape[0]))
    out["use_cache"] = False  # transformers looks for packed sequences only without a cache
    text = rows.positions(torch.arange(inputs["input_ids"].shape[1], device=device)[None] - starts[:, None])
    if rope_index is None:
        out["position_ids"] = text
    else:  # [4, P, L]: the text positions (for the packed mask), then each sequence's own 3-D positions
        out["position_ids"] = torch.stack([text, *(rows.positions(plane) for plane in rope_index(inputs))])
    return out


def sequence_spans(inputs: dict) -> tuple[list[int], list[int]]:
    """(starts, lengths) of each row's tokens in a padded batch: the attention mask's ones, which must be one
    contiguous run per row (right, left, or prompt-left / completion-right padding)."""
    mask = inputs["attention_mask"].bool()
    lengths = mask.sum(-1)
    starts = torch.where(lengths > 0, mask.int().argmax(-1), 0)
    positions = torch.arange(mask.shape[1], device=mask.device)
    span = (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])
    if not torch.equal(span, mask):
        row = int((span != mask).any(-1).nonzero()[0, 0])
        raise ValueError(f"packing needs each sequence's tokens in one contiguous run; row {row}'s attention mask "
                         "has holes")
    return starts.tolist(), lengths.tolist()


def padded_lengths(inputs: dict) -> list[int]:
    """Each sequence's length in a padded batch."""
    return sequence_spans(inputs)[1]


@dataclass
class PackedBatch:
    """A batch's model inputs packed into rows, and where its tokens went (rows: pack per-token tensors alike, and
    the boundaries the losses take, rlhfv_kernels' cu_seqlens)."""

    inputs: dict
    rows: PackedRows

    @property
    def cu_seqlens(self) -> list:
        return self.rows.cu_seqlens


def pack_batch(inputs: dict, max_tokens_per_row: int | None = None, rope_index=None, *,
               in_order: bool = False) -> PackedBatch:
    """The padded processor output `inputs` as packed rows (see the module's docstring)."""
    width = inputs["input_ids"].shape[1]
    starts, lengths = sequence_spans(inputs)
    rows = plan_rows(lengths, width, max_tokens_per_row, starts, in_order=in_order)
    starts = torch.tensor(starts, dtype=torch.long, device=inputs["input_ids"].device)
    return PackedBatch(pack_inputs(inputs, rows, starts, rope_index), rows)


def pack_for_loss(inputs: dict, per_token: list, max_tokens_per_row: int | None = None, rope_index=None):
    """(packed model inputs, the per-token tensors of the batch packed alike (labels' tails IGNORE_INDEX, float
    tensors' 0; None stays None), the losses' packing options, the PackedRows)."""
    batch = pack_batch(inputs, max_tokens_per_row, rope_index)
    fill = lambda t: 0.0 if t.is_floating_point() else IGNORE_INDEX  # noqa: E731
    packed = [None if t is None else batch.rows.pack(t, fill(t)) for t in per_token]
    return batch.inputs, packed, {"cu_seqlens": batch.cu_seqlens}, batch.rows
