"""Triton kernels of the fused-linear path: per-token log-probs from hidden [N, H] and the lm_head weight [V, H]
without ever storing the N x V logits.

Forward: each program takes BLOCK_N tokens and one vocabulary split, builds each [BLOCK_N, BLOCK_V] logits tile with
tensor-core dots over H (fp32 accumulation), and keeps an online max / sum of exp per token plus the target logit;
the splits' partials are merged in float64 (kernels.merge_partials). Backward: each program recomputes one
(token block, vocabulary block) tile, turns it into c_t * (onehot - softmax) / t, and adds its products into fp32
dhidden [N, H] and dweight [V, H] (and dbias) with atomics; tiles without gradient return early.

Tiles (BLOCK_N x BLOCK_V x BLOCK_H, warps, stages) are autotuned among LINEAR_CONFIGS for the operand type and the
GPU family (less SPILL_WITH_SOFTCAP under a soft cap); every tile offered compiles without register spills and within
the family's shared memory under triton 3.7.1 (what a CUDA torch 2.13 pins) and the newest release, which
tests/gpu_verify/triton_aot.py checks in CI. fp32
operands follow torch.get_float32_matmul_precision(): "highest" (PyTorch's default) multiplies in full fp32 like
eager matmul; "high"/"medium" allow TF32 tensor cores (10-bit mantissa operands).

Under TRITON_INTERPRET=1 the dots are computed on fp32 operands (the interpreter mishandles bf16) with one config.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .kernels import (INTERPRETING, _bucket, _moment_terms, _moved_moment, _target_programs, _transformed,
                      _transformed_and_slope, merge_partials)


def _tile(block_n, block_v, block_h, warps, stages):
    return triton.Config(dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h), num_warps=warps, num_stages=stages)


# Candidate tiles per (kernel, operand type, GPU family). Family 80: sm_8x and sm_12x (at most 99 KiB of shared memory
# per block); family 90: sm_90/sm_100 (227 KiB). Operand "16bit" is bf16/fp16, "tf32" and "ieee" are fp32 operands
# multiplied with TF32 tensor cores or in full fp32. Eight warps keep the backward's two accumulators out of local
# memory (at four warps most of its tiles spill).
LINEAR_CONFIGS = {
    ("fwd", "16bit", 80): [_tile(64, 128, 64, 4, 3), _tile(64, 128, 32, 4, 3), _tile(128, 128, 32, 8, 3),
                           _tile(64, 256, 32, 8, 3)],
    ("fwd", "16bit", 90): [_tile(64, 128, 64, 4, 3), _tile(128, 128, 64, 8, 3), _tile(128, 128, 32, 8, 4),
                           _tile(64, 256, 64, 8, 3)],
    ("fwd", "tf32", 80): [_tile(64, 128, 64, 4, 2), _tile(128, 64, 32, 4, 3), _tile(128, 128, 32, 8, 2)],
    ("fwd", "tf32", 90): [_tile(64, 128, 64, 4, 3), _tile(128, 128, 32, 8, 3), _tile(128, 128, 64, 8, 3)],
    ("fwd", "ieee", 80): [_tile(32, 64, 32, 4, 2), _tile(64, 64, 32, 8, 2)],
    ("fwd", "ieee", 90): [_tile(64, 64, 32, 4, 2), _tile(32, 128, 32, 4, 2), _tile(64, 64, 32, 8, 2)],
    ("bwd", "16bit", 80): [_tile(64, 128, 32, 8, 3), _tile(128, 64, 32, 8, 3), _tile(64, 64, 32, 8, 3),
                           _tile(32, 128, 32, 8, 3), _tile(128, 128, 32, 8, 2)],
    ("bwd", "16bit", 90): [_tile(64, 128, 32, 8, 3), _tile(128, 64, 32, 8, 3), _tile(128, 128, 32, 8, 3),
                           _tile(64, 128, 64, 8, 3), _tile(64, 256, 32, 8, 2)],
    ("bwd", "tf32", 80): [_tile(32, 128, 32, 8, 2), _tile(64, 64, 32, 8, 1), _tile(64, 64, 32, 8, 2)],
    ("bwd", "tf32", 90): [_tile(64, 128, 32, 8, 3), _tile(128, 64, 32, 8, 3), _tile(128, 128, 32, 8, 2),
                          _tile(64, 64, 32, 8, 3)],
    ("bwd", "ieee", 80): [_tile(32, 128, 32, 8, 2), _tile(64, 32, 32, 4, 2)],
    ("bwd", "ieee", 90): [_tile(32, 128, 32, 8, 2), _tile(64, 32, 32, 4, 2), _tile(32, 32, 32, 4, 2)],
}
# A soft cap keeps one more [BLOCK_N, BLOCK_V] fp32 tile alive per thread (the slope sech^2 beside the
# probabilities): these tiles spill with it (tests/gpu_verify/triton_aot.py) and are not offered to CAPPED launches.
# (BLOCK_N, BLOCK_V, BLOCK_H, warps, stages) per kind; the union over triton 3.6.0 (the GPU machine's), 3.7.1 and the
# newest release.
SPILL_WITH_SOFTCAP = {
    ("fwd", "16bit", 80): [(64, 128, 64, 4, 3)],
    ("fwd", "tf32", 80): [(128, 64, 32, 4, 3)],
    ("fwd", "tf32", 90): [(128, 128, 64, 8, 3)],
    ("bwd", "16bit", 80): [(128, 128, 32, 8, 2)],
    ("bwd", "16bit", 90): [(128, 128, 32, 8, 3), (64, 256, 32, 8, 2)],
    ("bwd", "tf32", 80): [(64, 64, 32, 8, 2)],
    ("bwd", "tf32", 90): [(128, 128, 32, 8, 2)],
}
# The entropy keeps one more fp32 tile alive (log p beside p in the backward, the moment's product in the forward):
# tiles that spill with it, per (kind, operand, family, capped), are not offered to ENTROPY launches, and
# ENTROPY_CONFIGS adds smaller tiles where too few would be left (fp32 TF32 forward on sm_90: none).
SPILL_WITH_ENTROPY = {
    ("fwd", "16bit", 80, False): [(64, 128, 64, 4, 3)],
    ("fwd", "16bit", 90, False): [(128, 128, 32, 8, 4)],
    ("fwd", "tf32", 90, False): [(64, 128, 64, 4, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3)],
    ("fwd", "tf32", 90, True): [(64, 128, 64, 4, 3)],
    ("fwd", "ieee", 80, False): [(32, 64, 32, 4, 2)],
    ("fwd", "ieee", 80, True): [(32, 64, 32, 4, 2)],
    ("fwd", "ieee", 90, False): [(64, 64, 32, 4, 2)],
    ("bwd", "16bit", 80, False): [(128, 128, 32, 8, 2)],
    ("bwd", "tf32", 90, False): [(128, 128, 32, 8, 2)],
}
ENTROPY_CONFIGS = {
    ("fwd", "tf32", 90): [_tile(64, 128, 32, 8, 3), _tile(128, 64, 64, 8, 3)],
    ("fwd", "ieee", 80): [_tile(32, 32, 32, 4, 2)],
}
INPUT_PRECISIONS = ("tf32", "ieee")  # what fp32 operands may be multiplied with
# Vocabulary splits of the forward are multiples of every candidate BLOCK_V, so no tile straddles two splits.
SPLIT_MULTIPLE = max(c.kwargs["BLOCK_V"] for configs in LINEAR_CONFIGS.values() for c in configs)
# The interpreter pays per program and loop iteration: few, big tiles.
_INTERPRETER_CONFIG = _tile(32, 256, 128, 1, 1)


def operand_class(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "16bit"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dot_precision(operand: str) -> str:
    """tl.dot's input_precision for an operand class (it only matters for fp32 operands)."""
    return "ieee" if operand == "16bit" else operand


def gpu_family(capability: tuple[int, int] | int) -> int:
    """90 for GPUs with 227 KiB of shared memory per block (sm_90, sm_100), else 80 (sm_8x, sm_12x: 99 KiB)."""
    major = capability[0] if isinstance(capability, tuple) else capability // 10
    return 90 if major in (9, 10) else 80


def _shape(config) -> tuple:
    k = config.kwargs
    return k["BLOCK_N"], k["BLOCK_V"], k["BLOCK_H"], config.num_warps, config.num_stages


def configs_for(which: str, operand: str, family: int, capped: bool = False, entropy: bool = False) -> list:
    """The tiles a launch may use: LINEAR_CONFIGS of its kind, less those that spill under a soft cap or with the
    entropy (SPILL_WITH_ENTROPY)."""
    key = (which, operand, family)
    configs = LINEAR_CONFIGS[key]
    if capped:
        configs = [c for c in configs if _shape(c) not in SPILL_WITH_SOFTCAP.get(key, ())]
    if entropy:
        configs = [c for c in configs + ENTROPY_CONFIGS.get(key, [])
                   if _shape(c) not in SPILL_WITH_ENTROPY.get(key + (capped,), ())]
    return configs


def _prune(which):
    """early_config_prune: the candidates for the launch's operand type, soft cap, entropy and GPU."""
    def prune(configs, named_args, **kwargs):
        hidden = named_args["h_ptr"]
        return configs_for(which, kwargs["INPUT_PRECISION"] if hidden.dtype == torch.float32 else "16bit",
                           gpu_family(torch.cuda.get_device_capability(hidden.device)), kwargs.get("CAPPED", False),
                           kwargs.get("ENTROPY", False))
    return prune


def _autotune(which, **options):
    configs = ([_INTERPRETER_CONFIG] if INTERPRETING else
               [c for table in (LINEAR_CONFIGS, ENTROPY_CONFIGS) for (w, _, _), cs in table.items() if w == which
                for c in cs])
    return triton.autotune(configs=configs, key=["hdim", "vocab", "rows_bucket", "HAS_BIAS", "CAPPED",
                                                 "INPUT_PRECISION", "ENTROPY"],
                           prune_configs_by={"early_config_prune": _prune(which)}, **options)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, hdim,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """hidden[rows] @ weight[cols].T + bias[cols] as an fp32 [BLOCK_N, BLOCK_V] tile (before the logit transform)."""
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
        acc += tl.dot(h, tl.trans(w), input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@_autotune("fwd")
@triton.jit
def _linear_fwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, part_max_ptr, part_sum_ptr, part_moment_ptr, target_ptr,
                       n_rows, vocab, hdim, split_size, num_splits, ignore_index, temperature, softcap, rows_bucket,
                       HAS_BIAS: tl.constexpr, CAPPED: tl.constexpr, UPCAST: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Per token and split: running max, sum exp(z - max) and, with ENTROPY, sum exp(z - max) * (z - max)."""
    block = tl.program_id(0)
    split = tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    start = split * split_size
    stop = tl.minimum(start + split_size, vocab)
    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    run_moment = tl.zeros((BLOCK_N,), tl.float32)
    target = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(start, stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < stop
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, hdim,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, INPUT_PRECISION)
        x = tl.where(col_ok[None, :], _transformed(x, temperature, softcap, True, CAPPED), float("-inf"))
        new_max = tl.maximum(run_max, tl.max(x, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - shift)
        t = x - shift[:, None]
        e = tl.exp(t)
        if ENTROPY:
            run_moment = _moved_moment(run_moment, run_sum, run_max, shift, rescale) + tl.sum(_moment_terms(e, t), 1)
        run_sum = run_sum * rescale + tl.sum(e, 1)
        run_max = new_max
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], x, 0.0), 1)
    out = rows * num_splits + split
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
    if ENTROPY:
        tl.store(part_moment_ptr + out, run_moment, mask=row_ok)
    holds = row_ok & (labels >= start) & (labels < stop)
    tl.store(target_ptr + rows, target, mask=holds)


@_autotune("bwd", reset_to_zero=["dh_ptr", "dw_ptr", "db_ptr"])  # it accumulates with atomics
@triton.jit
def _linear_bwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, grad_ptr, lse_ptr, grad_entropy_ptr, entropy_ptr, dh_ptr,
                       dw_ptr, db_ptr, n_rows, vocab, hdim, ignore_index, temperature, softcap, rows_bucket,
                       HAS_BIAS: tl.constexpr, CAPPED: tl.constexpr, UPCAST: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    block = tl.program_id(0)
    vblock = tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    coef = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.where(labels == ignore_index, 0.0, coef)
    largest = tl.max(tl.abs(coef), 0)
    if ENTROPY:
        coef_h = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)
        coef_h = tl.where(labels == ignore_index, 0.0, coef_h)
        row_entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        largest = tl.maximum(largest, tl.max(tl.abs(coef_h), 0))
    else:
        coef_h = coef
        row_entropy = coef
    if largest > 0.0:  # else no token of this block has a gradient: nothing to recompute
        _linear_bwd_tile(h_ptr, w_ptr, b_ptr, labels, coef, coef_h, row_entropy, rows, row_ok, lse_ptr, dh_ptr,
                         dw_ptr, db_ptr, vocab, hdim, temperature, softcap, vblock, HAS_BIAS, CAPPED, ENTROPY,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, INPUT_PRECISION)


@triton.jit
def _linear_bwd_tile(h_ptr, w_ptr, b_ptr, labels, coef, coef_h, row_entropy, rows, row_ok, lse_ptr, dh_ptr, dw_ptr,
                     db_ptr, vocab, hdim, temperature, softcap, vblock, HAS_BIAS: tl.constexpr, CAPPED: tl.constexpr,
                     ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dlogits of coef * logp (+ coef_h * H with ENTROPY: dH/dz_j = -p_j (log p_j + H)) for one tile, into the
    fp32 dhidden / dweight / dbias with atomics."""
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    lse_hi = lse.to(tl.float32)
    lse_lo = (lse - lse_hi.to(tl.float64)).to(tl.float32)
    cols = vblock * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab
    x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, hdim,
                     HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, INPUT_PRECISION)
    x, slope = _transformed_and_slope(x, temperature, softcap, True, CAPPED)
    log_prob = (x - lse_hi[:, None]) - lse_lo[:, None]
    prob = tl.exp(log_prob)
    rows = rows.to(tl.int64)
    cols = cols.to(tl.int64)
    onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    if ENTROPY:
        log_prob = tl.where(log_prob < -87.0, -87.0, log_prob)  # masked logits: p ~ 0 times a finite factor
        dlogits = (tl.div_rn(coef, temperature)[:, None] * (onehot - prob)
                   - tl.div_rn(coef_h, temperature)[:, None] * prob * (log_prob + row_entropy[:, None])) * slope
    else:
        dlogits = tl.div_rn(coef, temperature)[:, None] * (onehot - prob) * slope
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
        dh = tl.dot(g, w, input_precision=INPUT_PRECISION)               # [BLOCK_N, BLOCK_H]
        dw = tl.dot(tl.trans(g), h, input_precision=INPUT_PRECISION)     # [BLOCK_V, BLOCK_H]
        tl.atomic_add(dh_ptr + rows[:, None] * hdim + ks[None, :], dh, mask=row_ok[:, None] & k_ok[None, :])
        tl.atomic_add(dw_ptr + cols[:, None] * hdim + ks[None, :], dw, mask=col_ok[:, None] & k_ok[None, :])


def _plan(rows: int, vocab: int, device: torch.device, num_splits: int | None):
    """(num_splits, split_size) of the forward: split the vocabulary only when token blocks leave the GPU idle."""
    if num_splits is None:
        token_blocks = math.ceil(rows / 64)  # a typical BLOCK_N; the tile is chosen later by the autotuner
        wanted = math.ceil(_target_programs(device) / token_blocks)
        num_splits = max(1, min(wanted, math.ceil(vocab / (8 * SPLIT_MULTIPLE))))
    split_size = math.ceil(math.ceil(vocab / num_splits) / SPLIT_MULTIPLE) * SPLIT_MULTIPLE
    return math.ceil(vocab / split_size), split_size


def _common(hidden, weight, labels):
    """(hdim, vocab, hidden as [N, H], contiguous weight, flat int64 labels, N, the dot precision constexpr)."""
    hdim, vocab = hidden.shape[-1], weight.shape[0]
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    precision = dot_precision(operand_class(hidden.dtype))
    return (hdim, vocab, hidden.reshape(-1, hdim).contiguous(), weight.contiguous(), flat_labels, flat_labels.numel(),
            precision)


def launch_forward(hidden, weight, bias, labels, ignore_index, temperature, softcap=0.0, num_splits=None,
                   with_entropy=False):
    """(logp float32, lse float64) of labels' shape; hidden [..., H] is flattened to [N, H]. with_entropy:
    (logp, entropy float32, lse)."""
    hdim, vocab, h, w, flat_labels, rows, precision = _common(hidden, weight, labels)
    if rows == 0:
        zeros = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        return (zeros, zeros.clone(), zeros.double()) if with_entropy else (zeros, zeros.double())
    splits, split_size = _plan(rows, vocab, hidden.device, num_splits)
    part_max = torch.empty(rows, splits, dtype=torch.float32, device=hidden.device)
    part_sum = torch.empty(rows, splits, dtype=torch.float32, device=hidden.device)
    part_moment = torch.empty(rows if with_entropy else 1, splits, dtype=torch.float32, device=hidden.device)
    target = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    _linear_fwd_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]), splits)](
        h, w, bias if bias is not None else w, flat_labels, part_max, part_sum, part_moment, target, rows, vocab,
        hdim, split_size, splits, ignore_index, float(temperature), float(softcap), _bucket(rows),
        HAS_BIAS=bias is not None, CAPPED=softcap > 0, UPCAST=INTERPRETING, INPUT_PRECISION=precision,
        ENTROPY=with_entropy)
    return merge_partials(part_max, part_sum, target, flat_labels, ignore_index, torch.float32, labels.shape,
                          part_moment if with_entropy else None)


def launch_backward(grad_logp, hidden, weight, bias, labels, lse, ignore_index, temperature, softcap=0.0,
                    grad_entropy=None, entropy=None):
    """(dhidden, dweight, dbias) in the inputs' dtypes, accumulated in fp32; dbias is empty without a bias. With
    grad_entropy and the forward's entropy, the gradient of grad_logp * logp + grad_entropy * entropy."""
    hdim, vocab, h, w, flat_labels, rows, precision = _common(hidden, weight, labels)
    dh = torch.zeros(rows, hdim, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(vocab, hdim, dtype=torch.float32, device=hidden.device)
    db = torch.zeros(vocab if bias is not None else 0, dtype=torch.float32, device=hidden.device)
    if rows:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"]))  # noqa: E731
        grad = grad_logp.reshape(-1).to(torch.float32).contiguous()
        with_entropy = grad_entropy is not None
        if with_entropy:
            grad_entropy = grad_entropy.reshape(-1).to(torch.float32).contiguous()
            entropy = entropy.reshape(-1).to(torch.float32).contiguous()
        _linear_bwd_kernel[grid](
            h, w, bias if bias is not None else w, flat_labels, grad, lse.reshape(-1).contiguous(),
            grad_entropy if with_entropy else grad, entropy if with_entropy else grad, dh, dw, db,
            rows, vocab, hdim, ignore_index, float(temperature), float(softcap), _bucket(rows),
            HAS_BIAS=bias is not None, CAPPED=softcap > 0, UPCAST=INTERPRETING, INPUT_PRECISION=precision,
            ENTROPY=with_entropy)
    dbias = db.to(bias.dtype) if bias is not None else torch.empty(0, dtype=weight.dtype, device=weight.device)
    return dh.to(hidden.dtype).reshape(hidden.shape), dw.to(weight.dtype), dbias
