"""Triton kernels of the fused-linear path: per-token log-probs from hidden [N, H] and the lm_head weight [V, H]
without ever storing the N x V logits.

Forward: each program takes BLOCK_N tokens and one vocabulary split, builds each [BLOCK_N, BLOCK_V] logits tile with
tensor-core dots over H (fp32 accumulation), and keeps an online max / sum of exp per token plus the target logit;
the splits' partials are merged in float64 (kernels.merge_partials). Backward: each program recomputes one
(token block, vocabulary block) tile, turns it into c_t * (onehot - softmax) / t, and adds its products into fp32
dhidden [N, H] and dweight [V, H] (and dbias) with atomics; tiles without gradient return early.

Under TRITON_INTERPRET=1 the dots are computed on fp32 operands (the interpreter mishandles bf16) with one config.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .kernels import INTERPRETING, _target_programs, merge_partials


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, hdim, temperature,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 UPCAST: tl.constexpr):
    """(hidden[rows] @ weight[cols].T + bias[cols]) / temperature as an fp32 [BLOCK_N, BLOCK_V] tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    rows = rows.to(tl.int64)  # N*H and V*H can exceed 2**31
    cols = cols.to(tl.int64)
    for k0 in range(0, hdim, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < hdim
        h = tl.load(h_ptr + rows[:, None] * hdim + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * hdim + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(h, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc / temperature


@triton.jit
def _linear_fwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, part_max_ptr, part_sum_ptr, target_ptr,
                       n_rows, vocab, hdim, split_size, num_splits, ignore_index, temperature,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                       UPCAST: tl.constexpr):
    block = tl.program_id(0)
    split = tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    start = split * split_size
    stop = tl.minimum(start + split_size, vocab)
    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    target = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(start, stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < stop
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, hdim, temperature,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST)
        x = tl.where(col_ok[None, :], x, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(x, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[:, None]), 1)
        run_max = new_max
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], x, 0.0), 1)
    out = rows * num_splits + split
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
    holds = row_ok & (labels >= start) & (labels < stop)
    tl.store(target_ptr + rows, target, mask=holds)


@triton.jit
def _linear_bwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, grad_ptr, lse_ptr, dh_ptr, dw_ptr, db_ptr,
                       n_rows, vocab, hdim, ignore_index, temperature,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                       UPCAST: tl.constexpr):
    block = tl.program_id(0)
    vblock = tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    coef = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.where(labels == ignore_index, 0.0, coef)
    if tl.max(tl.abs(coef), 0) > 0.0:  # else no token of this block has a gradient: nothing to recompute
        _linear_bwd_tile(h_ptr, w_ptr, b_ptr, labels, coef, rows, row_ok, lse_ptr, dh_ptr, dw_ptr, db_ptr, vocab,
                         hdim, temperature, vblock, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST)


@triton.jit
def _linear_bwd_tile(h_ptr, w_ptr, b_ptr, labels, coef, rows, row_ok, lse_ptr, dh_ptr, dw_ptr, db_ptr, vocab, hdim,
                     temperature, vblock, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_H: tl.constexpr, UPCAST: tl.constexpr):
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    lse_hi = lse.to(tl.float32)
    lse_lo = (lse - lse_hi.to(tl.float64)).to(tl.float32)
    cols = vblock * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab
    x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, hdim, temperature,
                     HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST)
    prob = tl.exp((x - lse_hi[:, None]) - lse_lo[:, None])
    rows = rows.to(tl.int64)
    cols = cols.to(tl.int64)
    onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    dlogits = (coef / temperature)[:, None] * (onehot - prob)
    dlogits = tl.where(row_ok[:, None] & col_ok[None, :], dlogits, 0.0)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(dlogits, 0), mask=col_ok)
    for k0 in range(0, hdim, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < hdim
        w = tl.load(w_ptr + cols[:, None] * hdim + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        h = tl.load(h_ptr + rows[:, None] * hdim + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            g = dlogits
            w = w.to(tl.float32)
            h = h.to(tl.float32)
        else:
            g = dlogits.to(w.dtype)
        dh = tl.dot(g, w)                   # [BLOCK_N, BLOCK_H]
        dw = tl.dot(tl.trans(g), h)         # [BLOCK_V, BLOCK_H]
        tl.atomic_add(dh_ptr + rows[:, None] * hdim + ks[None, :], dh, mask=row_ok[:, None] & k_ok[None, :])
        tl.atomic_add(dw_ptr + cols[:, None] * hdim + ks[None, :], dw, mask=col_ok[:, None] & k_ok[None, :])


def _blocks(hdim: int) -> tuple[int, int, int]:
    if INTERPRETING:  # few, big programs: the interpreter pays per program and loop iteration
        return 32, 256, max(16, min(128, triton.next_power_of_2(hdim)))
    return 64, 128, 64


def _plan(rows: int, vocab: int, device: torch.device, block_n: int, block_v: int, num_splits: int | None):
    token_blocks = math.ceil(rows / block_n)
    if num_splits is None:
        wanted = math.ceil(_target_programs(device) / token_blocks)
        num_splits = max(1, min(wanted, math.ceil(vocab / (8 * block_v))))
    split_size = math.ceil(math.ceil(vocab / num_splits) / block_v) * block_v
    return token_blocks, math.ceil(vocab / split_size), split_size


def launch_forward(hidden, weight, bias, labels, ignore_index, temperature, num_splits=None):
    """(logp float32, lse float64) of labels' shape; hidden [..., H] is flattened to [N, H]."""
    hdim, vocab = hidden.shape[-1], weight.shape[0]
    h = hidden.reshape(-1, hdim).contiguous()
    w = weight.contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    rows = flat_labels.numel()
    if rows == 0:
        zeros = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        return zeros, zeros.double()
    block_n, block_v, block_h = _blocks(hdim)
    token_blocks, splits, split_size = _plan(rows, vocab, hidden.device, block_n, block_v, num_splits)
    part_max = torch.empty(rows, splits, dtype=torch.float32, device=hidden.device)
    part_sum = torch.empty(rows, splits, dtype=torch.float32, device=hidden.device)
    target = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    _linear_fwd_kernel[(token_blocks, splits)](
        h, w, bias if bias is not None else w, flat_labels, part_max, part_sum, target, rows, vocab, hdim,
        split_size, splits, ignore_index, float(temperature), HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_V=block_v, BLOCK_H=block_h, UPCAST=INTERPRETING)
    return merge_partials(part_max, part_sum, target, flat_labels, ignore_index, torch.float32, labels.shape)


def launch_backward(grad_logp, hidden, weight, bias, labels, lse, ignore_index, temperature):
    """(dhidden, dweight, dbias) in the inputs' dtypes, accumulated in fp32; dbias is empty without a bias."""
    hdim, vocab = hidden.shape[-1], weight.shape[0]
    h = hidden.reshape(-1, hdim).contiguous()
    w = weight.contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    rows = flat_labels.numel()
    dh = torch.zeros(rows, hdim, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(vocab, hdim, dtype=torch.float32, device=hidden.device)
    db = torch.zeros(vocab if bias is not None else 0, dtype=torch.float32, device=hidden.device)
    if rows:
        block_n, block_v, block_h = _blocks(hdim)
        grid = (math.ceil(rows / block_n), math.ceil(vocab / block_v))
        _linear_bwd_kernel[grid](
            h, w, bias if bias is not None else w, flat_labels,
            grad_logp.reshape(-1).to(torch.float32).contiguous(), lse.reshape(-1).contiguous(), dh, dw, db,
            rows, vocab, hdim, ignore_index, float(temperature), HAS_BIAS=bias is not None, BLOCK_N=block_n,
            BLOCK_V=block_v, BLOCK_H=block_h, UPCAST=INTERPRETING)
    dbias = db.to(bias.dtype) if bias is not None else torch.empty(0, dtype=weight.dtype, device=weight.device)
    return dh.to(hidden.dtype).reshape(hidden.shape), dw.to(weight.dtype), dbias
