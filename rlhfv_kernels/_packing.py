"""Packed (padding-free) sequences: how the losses see a token stream that holds several sequences back to back.

A pack is one stream of tokens (labels of any shape, flattened in order; typically [1, total]) cut into sequences by
`cu_seqlens` (flash-attention varlen's [S + 1] offsets: sequence s is tokens cu[s]:cu[s+1]) or by `position_ids`
(labels' shape, restarting at 0 at each sequence, as transformers' packing collators produce them; for mRoPE models
the text positions). The kernels never notice: they score the stream's tokens as rows of logits or hidden states.
The losses see the per-token log-probs as padded rows [rows, width] (one row per sequence, the longest sequence's
width), so every loss's math is the padded one, unchanged, and gives the same numbers: a RowsLayout is the map
between the two, built once per call (a few O(total) index ops; the only host sync is the one that reads the
boundaries, none when cu_seqlens is a list or a CPU tensor).

Rows follow the pack's sequence order, except for DPO-style losses given `pairs` ([B, 2] sequence indices of each
pair's chosen and rejected answers): then the rows are the B chosen sequences, then the B rejected, in pair order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks

INDEX_DTYPES = (torch.int64, torch.int32)


@dataclass(frozen=True)
class Packing:
    """The boundaries a caller gave (validated when a layout is built from them)."""

    cu_seqlens: object = None     # [S + 1] offsets: a list of ints or an int tensor (any device)
    position_ids: object = None   # labels-shaped int tensor, 0 at the first token of each sequence
    max_seqlen: int | None = None  # the padded width the losses see (>= the longest sequence); None: the longest


def packing_of(cu_seqlens, position_ids, max_seqlen) -> Packing | None:
    """The public functions' packing options as one value (None: the padded layout)."""
    if cu_seqlens is None and position_ids is None:
        if max_seqlen is not None:
            raise ValueError("max_seqlen is given without cu_seqlens or position_ids; it only applies to packed "
                             "sequences")
        return None
    if cu_seqlens is not None and position_ids is not None:
        raise ValueError("give the sequence boundaries once: cu_seqlens or position_ids, not both")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 1):
        raise ValueError(f"max_seqlen must be a positive int or None, got {max_seqlen!r}")
    return Packing(cu_seqlens, position_ids, max_seqlen)


@dataclass(frozen=True)
class RowsLayout:
    """Stream tokens <-> padded rows. Row r holds sequence `order[r]` (the pack order when order is None)."""

    rows: int                   # sequences the loss sees
    width: int                  # padded row length (max_seqlen, or the longest sequence)
    slots: torch.Tensor         # [total] int64: row * width + position of each stream token
    stream_shape: tuple         # the labels' shape
    order: torch.Tensor | None  # [rows] int64 sequence index of each row; None: row r is sequence r

    def to_rows(self, stream: torch.Tensor, fill) -> torch.Tensor:
        """A per-token tensor of the stream as [rows, width], `fill` where a row is past its sequence's end
        (differentiable)."""
        flat = stream.reshape(-1)
        out = torch.full((self.rows * self.width,), fill, dtype=flat.dtype, device=flat.device)
        return out.index_copy(0, self.slots, flat).view(self.rows, self.width)

    def to_stream(self, rows: torch.Tensor) -> torch.Tensor:
        """[rows, width] back to the stream's shape (the inverse of to_rows at the stream's tokens)."""
        return rows.reshape(-1).index_select(0, self.slots).view(self.stream_shape)

    def token_of_slot(self) -> torch.Tensor:
        """[rows * width] int64: the stream token at each slot (0 at slots past a sequence's end, which carry
        ignored labels and are never read)."""
        index = torch.zeros(self.rows * self.width, dtype=torch.int64, device=self.slots.device)
        return index.index_copy_(0, self.slots, torch.arange(self.slots.numel(), device=self.slots.device))

    def sequences_to_rows(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """A per-sequence vector [S] in pack order, in row order."""
        return per_sequence if self.order is None else per_sequence.index_select(0, self.order)


def as_rows(layout: RowsLayout | None, per_token: torch.Tensor, fill) -> torch.Tensor:
    """`per_token` as the loss's rows: itself in the padded layout (None), else layout.to_rows."""
    return per_token if layout is None else layout.to_rows(per_token, fill)


def layout(packing: Packing | None, labels: torch.Tensor, pairs=None) -> RowsLayout | None:
    """The RowsLayout of `labels` under `packing` (None: padded; then `pairs` is refused)."""
    if packing is None:
        if pairs is not None:
            raise ValueError("pairs applies to packed sequences (cu_seqlens or position_ids); padded rows are paired "
                             "by position: the B chosen rows first, then the B rejected rows")
        return None
    _checks.require_tensor(labels, "labels")
    total, device = labels.numel(), labels.device
    check = _checks.data_checks_enabled()
    if packing.cu_seqlens is not None:
        offsets, host = _offsets_from_cu_seqlens(packing.cu_seqlens, total, check)
    else:
        offsets, host = _offsets_from_position_ids(packing.position_ids, labels)
    lengths = offsets[1:] - offsets[:-1]
    sequences = lengths.numel()
    # the longest sequence from the host copy; without one (checks off, under torch.compile) max_seqlen or a sync
    longest = max([b - a for a, b in zip(host, host[1:])] or [0]) if host is not None else None
    if longest is not None and packing.max_seqlen is not None and longest > packing.max_seqlen:
        raise ValueError(f"max_seqlen = {packing.max_seqlen} but the longest sequence has {longest} tokens")
    width = packing.max_seqlen or longest
    width = max(int(lengths.max()) if width is None else width, 1)
    offsets, lengths = offsets.to(device), lengths.to(device)
    order = None if pairs is None else _pair_order(pairs, sequences, device, check)
    sequence_of_token = torch.repeat_interleave(torch.arange(sequences, device=device), lengths, output_size=total)
    position = torch.arange(total, device=device) - offsets.index_select(0, sequence_of_token)
    row_of_sequence = sequence_of_token if order is None else torch.empty_like(order).index_copy_(
        0, order, torch.arange(sequences, device=device)).index_select(0, sequence_of_token)
    return RowsLayout(sequences, width, row_of_sequence * width + position, tuple(labels.shape), order)


def _as_index_tensor(value, name):
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{name} must be a list of ints or an int tensor")
        return torch.tensor(value, dtype=torch.int64)
    _checks.require_tensor(value, name)
    if value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int64 or int32, got {value.dtype}")
    return value.to(torch.int64)


def _offsets_from_cu_seqlens(cu_seqlens, total, check):
    """(offsets [S + 1] int64, their host copy or None when the checks are off: under torch.compile a tensor's
    values are not read while tracing, a list's are, being constants of the trace; the tensor's are checked when the
    graph runs, by the opaque rlhfv_checks::checked op)."""
    offsets = _as_index_tensor(cu_seqlens, "cu_seqlens")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with S + 1 >= 1 offsets, got shape {tuple(offsets.shape)}")
    if isinstance(cu_seqlens, (list, tuple)):
        host = list(cu_seqlens)
    elif not check:
        return _checks.checked_values("offsets", offsets, "cu_seqlens", bound=total), None
    else:
        host = offsets.tolist()  # the one host sync (none for a CPU tensor)
    _checks.check_offsets(host, "cu_seqlens", total)
    return offsets, host


def _offsets_from_position_ids(position_ids, labels):
    positions = _as_index_tensor(position_ids, "position_ids")
    if tuple(positions.shape) != tuple(labels.shape):
        raise ValueError(f"position_ids shape {tuple(positions.shape)} must equal labels shape "
                         f"{tuple(labels.shape)} (for mRoPE models, pass the text positions)")
    flat = positions.reshape(-1).cpu()  # the one host sync: the boundaries decide the layout's shape
    if flat.numel() and int(flat[0]) != 0:
        raise ValueError(f"position_ids must start at 0 (the first token of the first sequence), got {int(flat[0])}")
    starts = (flat == 0).nonzero().squeeze(1)
    offsets = torch.cat([starts, torch.tensor([flat.numel()])])
    return offsets, offsets.tolist()


def _pair_order(pairs, sequences, device, check):
    """[2B] sequence index of each row: the chosen sequences in pair order, then the rejected."""
    pairs = _as_index_tensor(pairs, "pairs")
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape [B, 2] (chosen, rejected sequence indices), got "
                         f"{tuple(pairs.shape)}")
    if 2 * pairs.shape[0] != sequences:
        raise ValueError(f"pairs names {2 * pairs.shape[0]} sequences but the pack holds {sequences}; every "
                         "sequence must be in exactly one pair")
    if check:
        _checks.check_pairs(pairs, "pairs", sequences)
    elif sequences:  # under torch.compile: checked when the graph runs
        pairs = _checks.checked_values("pairs", pairs, "pairs", bound=sequences)
    return pairs.t().reshape(-1).to(device)
