"""Triton kernels of the logits path (DESIGN.md §2): per-row online LSE + target logit, and dlogits.

Rows are addressed through an int64 offset per row, so any leading layout (logits[:, :-1], transposes) is read in
place; the vocabulary dimension must be contiguous. The vocabulary of a row can be split across several programs
(grid axis 1) so that few long rows (N = 512, V = 256k) still fill the GPU; the forward then writes one partial
(max, sum) per split and launch_forward() merges them in float64.

Loads and stores are 16 bytes wide where the launcher can prove alignment (VEC > 1: the base pointer, every leading
stride, V and the split size are multiples of 16 bytes); otherwise they are element-wise. Division by the temperature
is correctly rounded (div_rn, as eager PyTorch) and skipped when it is 1: the GPU's default float division is a
2-ulp approximation, which at |logits| ~ 1e4 is larger than the eager reference's own error.

Under TRITON_INTERPRET=1 (CPU tests) these run in Triton's interpreter, which gets bf16 arithmetic wrong: every load
is upcast to fp32 before any arithmetic, and only one configuration is ever used (autotuning fails there).
tests/gpu_verify/triton_aot.py compiles every configuration listed here for sm_80 and sm_90 in CI.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

INTERPRETING = bool(triton.knobs.runtime.interpret)


@triton.jit
def _computed_bound_probe(out_ptr, n):
    count = tl.zeros((), tl.int32)
    for _ in range(0, tl.cdiv(n, 1)):
        count += 1
    tl.store(out_ptr, count)


def _interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run these kernels, else None. Every kernel loops to a bound it computes;
    triton 3.6's interpreter turns that bound into a Python int with int() of a shape-(1,) array, which NumPy >= 2.4
    refuses (triton 3.7 squeezes it first)."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _computed_bound_probe[(1,)](out, 3)
    except triton.runtime.errors.InterpreterError as exc:
        import numpy
        return (f"triton {triton.__version__}'s interpreter cannot run a loop to a bound the kernel computes beside "
                f"NumPy {numpy.__version__} ({exc}); use triton >= 3.7 (or NumPy < 2.4) for the CPU interpreter")
    if int(out.item()) != 3:
        return f"triton {triton.__version__}'s interpreter ran a 3-step loop {int(out.item())} times"
    return None


# None, or why the CPU interpreter cannot run these kernels (CUDA launches are not concerned)
INTERPRETER_PROBLEM = _interpreter_problem() if INTERPRETING else None

# The interpreter costs ~10 ms per program x loop iteration whatever the block size, so it gets one big block.
_INTERPRETER_BLOCK = 32768


def _forward_configs():
    if INTERPRETING:
        return [triton.Config({"BLOCK_V": _INTERPRETER_BLOCK}, num_warps=1)]
    return [triton.Config({"BLOCK_V": block}, num_warps=warps)
            for block, warps in ((2048, 8), (4096, 8), (4096, 16), (8192, 16))]


# (BLOCK_V, num_warps) of forward configs that spill under a soft cap (tests/gpu_verify/triton_aot.py: triton 3.9), and
# under a soft cap with the entropy (triton 3.6, sm_80): not offered to those launches.
FORWARD_SPILL_WITH_SOFTCAP = ((8192, 16),)
FORWARD_SPILL_WITH_SOFTCAP_AND_ENTROPY = FORWARD_SPILL_WITH_SOFTCAP + ((4096, 16),)


def forward_configs(capped: bool = False, entropy: bool = False) -> list:
    """The forward configs a launch may be tuned among."""
    spilling = (FORWARD_SPILL_WITH_SOFTCAP_AND_ENTROPY if entropy else FORWARD_SPILL_WITH_SOFTCAP) if capped else ()
    return [c for c in _forward_configs() if (c.kwargs["BLOCK_V"], c.num_warps) not in spilling]


def _prune_forward(configs, named_args, **kwargs):
    """early_config_prune of the forward: forward_configs of the launch's soft cap and entropy."""
    return forward_configs(kwargs.get("CAPPED", False), kwargs.get("ENTROPY", False))


# (BLOCK_V, num_warps) of the backward, by split size (a heuristic, not autotuned: autotuning an in-place kernel
# would need a restore copy of the logits). Short rows take the small block.
BACKWARD_CONFIGS = ((1024, 4), (4096, 8))


@triton.jit
def _scaled(x, temperature, SCALED: tl.constexpr):
    """x / temperature, correctly rounded; the identity when the launcher saw temperature == 1."""
    if SCALED:
        x = tl.div_rn(x, temperature)
    return x


@triton.jit
def _softcapped(x, softcap):
    """(softcap * tanh(x / softcap), sech^2(x / softcap)) from one exp: e = exp(-2|u|), u = x / softcap, gives
    tanh|u| = (1 - e) / (1 + e) and sech^2 u = 4e / (1 + e)^2 (no cancellation where tanh is near +-1). The
    reciprocal and the division are the GPU's fast ones (register-light in the big fused-linear tiles; their error
    is in numerics.softcap_gpu_extra). +-inf give +-softcap, as in eager PyTorch; NaN stays NaN."""
    u = x * (1.0 / softcap)
    e = tl.exp(-2.0 * tl.abs(u))
    inv = 1.0 / (1.0 + e)
    th = (1.0 - e) * inv
    return tl.where(u < 0, -th, th) * softcap, 4.0 * e * inv * inv


@triton.jit
def _transformed(x, temperature, softcap, SCALED: tl.constexpr, CAPPED: tl.constexpr):
    """z of the logit transform (csrc/ops.cpp): x / t, or softcap * tanh(x / softcap) / t when CAPPED. Callers
    re-mask padding lanes after it (the cap maps their -inf to -softcap)."""
    if CAPPED:
        x, _ = _softcapped(x, softcap)
    return _scaled(x, temperature, SCALED)


@triton.jit
def _transformed_and_slope(x, temperature, softcap, SCALED: tl.constexpr, CAPPED: tl.constexpr):
    """(z, t * dz/dx): the slope is sech^2(x / softcap) when CAPPED, else 1."""
    if CAPPED:
        x, slope = _softcapped(x, softcap)
        return _scaled(x, temperature, SCALED), slope
    else:
        return _scaled(x, temperature, SCALED), 1.0


@triton.jit
def _moved_moment(moment, total, old_max, shift, rescale):
    """The entropy's moment sum e^(z - m) (z - m) moved from the running max old_max to the new one (shift): e^d
    (moment + d * total), d = old_max - shift; nothing to carry while the sum `total` is 0 (d may be -inf then)."""
    return rescale * (moment + tl.where(total > 0, old_max - shift, 0.0) * total)


@triton.jit
def _moment_terms(e, t):
    """e^t * t per entry, t clamped at -87 so a masked (-inf) entry adds ~0, not 0 * -inf (NaN stays NaN via e)."""
    return e * tl.maximum(t, -87.0)


@triton.jit
def _vocab_range(split, split_size, vocab, VEC: tl.constexpr):
    """[start, stop) of this split, both multiples of VEC (the launcher guarantees it when VEC > 1)."""
    start = tl.multiple_of(split * split_size, VEC)
    stop = tl.multiple_of(tl.minimum(start + split_size, vocab), VEC)
    return start, stop


@triton.autotune(configs=_forward_configs(),
                 key=["vocab_bucket", "split_size_bucket", "SCALED", "CAPPED", "ENTROPY"],
                 prune_configs_by={"early_config_prune": _prune_forward})
@triton.jit
def _logprob_fwd_kernel(logits_ptr, row_offsets_ptr, labels_ptr, part_max_ptr, part_sum_ptr, part_moment_ptr,
                        target_ptr, vocab, split_size, num_splits, ignore_index, temperature, softcap,
                        vocab_bucket, split_size_bucket, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
                        SCALED: tl.constexpr, CAPPED: tl.constexpr, ENTROPY: tl.constexpr):
    """Per split: running max, sum exp(z - max) and, with ENTROPY, the moment sum exp(z - max) * (z - max)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    label = tl.load(labels_ptr + row)
    active = label != ignore_index
    base = logits_ptr + tl.multiple_of(tl.load(row_offsets_ptr + row), VEC)
    start, stop = _vocab_range(split, split_size, vocab, VEC)
    n_blocks = tl.where(active, tl.cdiv(stop - start, BLOCK_V), 0)  # ignored rows read nothing
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)
    running_moment = tl.zeros((), tl.float32)
    for block in range(0, n_blocks):
        cols = start + block * BLOCK_V + tl.arange(0, BLOCK_V)
        in_split = cols < stop
        x = tl.load(base + cols, mask=in_split, other=float("-inf")).to(tl.float32)
        x = _transformed(x, temperature, softcap, SCALED, CAPPED)
        if CAPPED:
            x = tl.where(in_split, x, float("-inf"))  # the cap maps the padding's -inf to -softcap
        new_max = tl.maximum(running_max, tl.max(x, 0), propagate_nan=tl.PropagateNan.ALL)
        # All -inf so far (masked vocabulary entries): shift by 0 so exp(-inf) = 0 instead of exp(-inf + inf) = NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(running_max - shift)
        t = x - shift
        e = tl.exp(t)
        if ENTROPY:
            running_moment = (_moved_moment(running_moment, running_sum, running_max, shift, rescale)
                              + tl.sum(_moment_terms(e, t), 0))
        running_sum = running_sum * rescale + tl.sum(e, 0)
        running_max = new_max
    out = row * num_splits + split
    tl.store(part_max_ptr + out, running_max)
    tl.store(part_sum_ptr + out, running_sum)
    if ENTROPY:
        tl.store(part_moment_ptr + out, running_moment)
    # The split that holds the label reads the target logit (one scalar load).
    holds_label = active & (label >= start) & (label < stop)
    target = tl.load(base + tl.where(holds_label, label, 0), mask=holds_label, other=0.0).to(tl.float32)
    tl.store(target_ptr + row, _transformed(target, temperature, softcap, SCALED, CAPPED), mask=holds_label)


@triton.jit
def _round_to_bfloat16(x):
    """x rounded to the nearest bf16 value (ties to even), still as fp32. GPUs convert this way in hardware; the
    interpreter truncates instead, so under it the kernel rounds first and the truncating conversion is exact."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _logprob_bwd_kernel(logits_ptr, row_offsets_ptr, out_ptr, out_row_offsets_ptr, labels_ptr, grad_ptr, lse_ptr,
                        grad_entropy_ptr, entropy_ptr, vocab, split_size, ignore_index, temperature, softcap,
                        BLOCK_V: tl.constexpr, ROUND_BF16: tl.constexpr, VEC: tl.constexpr, SCALED: tl.constexpr,
                        CAPPED: tl.constexpr, ENTROPY: tl.constexpr):
    """dlogits of grad * logp (+ grad_entropy * H with ENTROPY: dH/dz_j = -p_j (log p_j + H))."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    label = tl.load(labels_ptr + row)
    coef = tl.load(grad_ptr + row).to(tl.float32)
    if ENTROPY:
        coef_h = tl.load(grad_entropy_ptr + row).to(tl.float32)
        row_entropy = tl.load(entropy_ptr + row).to(tl.float32)
        active = (label != ignore_index) & ((coef != 0.0) | (coef_h != 0.0))
        # off the label: p * (a + b * log p); a = -(g + g_H * H) / t, b = -g_H / t
        a = -_scaled(coef + coef_h * row_entropy, temperature, SCALED)
        b = -_scaled(coef_h, temperature, SCALED)
    else:
        active = (label != ignore_index) & (coef != 0.0)
    lse = tl.load(lse_ptr + row)  # float64: exp(x - lse) stays accurate when |logits| ~ 1e4
    lse_hi = lse.to(tl.float32)
    lse_lo = (lse - lse_hi.to(tl.float64)).to(tl.float32)
    src = logits_ptr + tl.multiple_of(tl.load(row_offsets_ptr + row), VEC)
    dst = out_ptr + tl.multiple_of(tl.load(out_row_offsets_ptr + row), VEC)
    on_label = _scaled(coef, temperature, SCALED)
    scale = -on_label
    start, stop = _vocab_range(split, split_size, vocab, VEC)
    read_stop = tl.multiple_of(tl.where(active, stop, start), VEC)  # rows without gradient: zeros, never read
    for block in range(0, tl.cdiv(stop - start, BLOCK_V)):
        cols = start + block * BLOCK_V + tl.arange(0, BLOCK_V)
        in_row = cols < stop
        x = tl.load(src + cols, mask=cols < read_stop, other=0.0).to(tl.float32)
        z, slope = _transformed_and_slope(x, temperature, softcap, SCALED, CAPPED)
        log_prob = (z - lse_hi) - lse_lo
        prob = tl.exp(log_prob)
        # At the label, c/t * (1 - p) rather than c/t - c/t * p: the difference of two near-equal terms loses bits.
        if ENTROPY:
            log_prob = tl.where(log_prob < -87.0, -87.0, log_prob)  # masked logits: p ~ 0 times a finite factor
            grad = tl.where(cols == label, on_label * (1.0 - prob) + prob * b * (log_prob + row_entropy),
                            prob * (a + b * log_prob)) * slope
        else:
            grad = tl.where(cols == label, on_label * (1.0 - prob), scale * prob) * slope
        grad = tl.where(active, grad, 0.0)
        if ROUND_BF16:
            grad = _round_to_bfloat16(grad)
        tl.store(dst + cols, grad.to(dst.dtype.element_ty), mask=in_row)


def row_offsets(tensor: torch.Tensor) -> torch.Tensor:
    """int64 element offset of every row of a [..., V] tensor, flattened (N values, built on the tensor's device)."""
    lead = tensor.shape[:-1]
    offsets = torch.zeros(lead, dtype=torch.int64, device=tensor.device)
    for dim, (size, stride) in enumerate(zip(lead, tensor.stride()[:-1])):
        view = [1] * len(lead)
        view[dim] = size
        offsets = offsets + (torch.arange(size, dtype=torch.int64, device=tensor.device) * stride).view(view)
    return offsets.reshape(-1)


def _bucket(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def plan_splits(rows: int, vocab: int, device: torch.device, num_splits: int | None = None,
                min_split: int = 8192, multiple: int = 1) -> tuple[int, int]:
    """(num_splits, split_size): split long rows only when rows alone leave the GPU idle. split_size is rounded up
    to `multiple` (the vector width, so that every split starts 16-byte aligned)."""
    if num_splits is None:
        wanted = math.ceil(_target_programs(device) / max(rows, 1))
        num_splits = max(1, min(wanted, vocab // min_split))
    num_splits = max(1, min(num_splits, vocab))
    split_size = math.ceil(math.ceil(vocab / num_splits) / multiple) * multiple
    return math.ceil(vocab / split_size), split_size


def vector_width(*tensors: torch.Tensor) -> int:
    """Elements per 16-byte access when every row of every tensor [..., V] starts 16-byte aligned and V is a multiple
    of it (then so is each split), else 1. The kernels' multiple_of hints are only true under this check."""
    vec = 16 // tensors[0].element_size()
    for t in tensors:
        lead_strides = [st for size, st in zip(t.shape[:-1], t.stride()[:-1]) if size > 1]
        if t.data_ptr() % 16 or t.shape[-1] % vec or any(st % vec for st in lead_strides):
            return 1
    return vec


def _backward_config(split_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for splits of split_size entries."""
    if INTERPRETING:
        return min(_INTERPRETER_BLOCK, triton.next_power_of_2(split_size)), 1
    return BACKWARD_CONFIGS[0] if split_size <= BACKWARD_CONFIGS[0][0] else BACKWARD_CONFIGS[1]


def launch_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, temperature: float,
                   softcap: float = 0.0, num_splits: int | None = None, with_entropy: bool = False):
    """(logp float32, lse float64) of labels' shape; with_entropy: (logp, entropy float32, lse)."""
    vocab = logits.shape[-1]
    flat_labels = labels.reshape(-1).to(torch.int64)
    rows = flat_labels.numel()
    logp_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if rows == 0:
        zeros = torch.zeros(labels.shape, dtype=logp_dtype, device=logits.device)
        lse = torch.zeros(labels.shape, dtype=torch.float64, device=logits.device)
        return (zeros, zeros.clone(), lse) if with_entropy else (zeros, lse)
    vec = vector_width(logits)
    splits, split_size = plan_splits(rows, vocab, logits.device, num_splits, multiple=vec)
    part_max = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    part_sum = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    part_moment = torch.empty(rows if with_entropy else 1, splits, dtype=torch.float32, device=logits.device)
    target = torch.zeros(rows, dtype=torch.float32, device=logits.device)
    _logprob_fwd_kernel[(rows, splits)](
        logits, row_offsets(logits), flat_labels, part_max, part_sum, part_moment, target, vocab, split_size,
        splits, ignore_index, float(temperature), float(softcap), _bucket(vocab), _bucket(split_size), VEC=vec,
        SCALED=temperature != 1.0, CAPPED=softcap > 0, ENTROPY=with_entropy)
    return merge_partials(part_max, part_sum, target, flat_labels, ignore_index, logp_dtype, labels.shape,
                          part_moment if with_entropy else None)


def merge_partials(part_max, part_sum, target, flat_labels, ignore_index, logp_dtype, shape, part_moment=None):
    """(logp, lse) from per-split (max, sum of exp) pairs [N, splits] and the scaled target logits [N]; with the
    per-split moments sum exp(z - max) * (z - max), (logp, entropy, lse): H = log S1 - S2 / S1 about the row max.

    Merged in float64: [N, splits] values, negligible next to the kernels. 0 at ignored rows."""
    part_max, part_sum = part_max.double(), part_sum.double()
    top = part_max.amax(dim=1)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    offset = part_max - shift[:, None]
    scaled_sum = part_sum * torch.exp(offset)
    row_sum = scaled_sum.sum(dim=1)
    lse = shift + torch.log(row_sum)
    ignored = flat_labels == ignore_index
    lse = torch.where(ignored, torch.zeros_like(lse), lse)
    logp = torch.where(ignored, torch.zeros_like(lse), target.double() - lse)
    if part_moment is None:
        return logp.to(logp_dtype).reshape(shape), lse.reshape(shape)
    # Each split's moment moved to the row max: e^offset * (moment + offset * sum); empty splits (sum 0) add 0.
    moved = torch.where(part_sum > 0, torch.exp(offset) * (part_moment.double() + offset * part_sum), 0.0)
    entropy = torch.log(row_sum) - moved.sum(dim=1) / row_sum
    entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    return logp.to(logp_dtype).reshape(shape), entropy.to(logp_dtype).reshape(shape), lse.reshape(shape)


def launch_backward(grad_logp: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                    ignore_index: int, temperature: float, out: torch.Tensor, softcap: float = 0.0,
                    num_splits: int | None = None, grad_entropy: torch.Tensor | None = None,
                    entropy: torch.Tensor | None = None) -> None:
    """Writes grad_logp * (onehot - softmax(z)) * dz/dx into `out` ([..., V], may be `logits` itself); with
    grad_entropy and the forward's entropy, plus grad_entropy * dH/dx."""
    vocab = logits.shape[-1]
    flat_labels = labels.reshape(-1).to(torch.int64)
    rows = flat_labels.numel()
    if rows == 0 or vocab == 0:
        return
    vec = vector_width(logits, out)
    splits, split_size = plan_splits(rows, vocab, logits.device, num_splits, multiple=vec)
    block, warps = _backward_config(split_size)
    offsets = row_offsets(logits)
    out_offsets = offsets if out is logits else row_offsets(out)
    grad = grad_logp.reshape(-1).to(torch.float32).contiguous()
    with_entropy = grad_entropy is not None
    if with_entropy:
        grad_entropy = grad_entropy.reshape(-1).to(torch.float32).contiguous()
        entropy = entropy.reshape(-1).to(torch.float32).contiguous()
    _logprob_bwd_kernel[(rows, splits)](
        logits, offsets, out, out_offsets, flat_labels, grad, lse.reshape(-1).contiguous(),
        grad_entropy if with_entropy else grad, entropy if with_entropy else grad, vocab, split_size, ignore_index,
        float(temperature), float(softcap), BLOCK_V=block, ROUND_BF16=INTERPRETING and out.dtype == torch.bfloat16,
        VEC=vec, SCALED=temperature != 1.0, CAPPED=softcap > 0, ENTROPY=with_entropy, num_warps=warps)
