"""The numerics criterion of DESIGN.md §4, shared by every kernel test.

ours passes where |ours - truth| <= |reference - truth| + tol elementwise, truth being the float64 reference on the
same (already rounded) inputs and `reference` the eager implementation in the same dtype. NaN never passes unless
the truth is NaN at that position too (rows the caller poisoned on purpose).

What the CPU suite cannot see. It runs the Triton kernels in Triton's interpreter (numpy), which differs from the GPU:
- TF32 dots. On a GPU, fp32 tl.dot operands may be multiplied as TF32 (10 of 23 mantissa bits); the interpreter
  multiplies in full fp32. The fused-linear kernels use TF32 only when torch.get_float32_matmul_precision() allows it
  (not at PyTorch's default "highest"); GPU tests of that mode add tf32_linear_extra() to the bound.
- bf16/fp16 dots. The interpreter computes them on fp32-upcast operands (it mishandles bf16 arithmetic); the GPU's
  tensor cores form the same exact products and accumulate in fp32 in another order: accumulation_extra().
- Approximate exp and division. On a GPU tl.exp is ex2.approx.f32 of x*log2(e): relative error <= 2**-22 plus
  |x| * 2**-24 from the scaling; on the probabilities (exp(x - lse) <= 1, nonzero only for x - lse > -104 in fp32)
  that is < 1e-7 absolute, and on the LSE < 3e-7: inside the fp32 tol (1e-5), so no extra term. Plain '/' lowers to
  div.full.f32 (2 ulp, larger than eager's 0.5 ulp at |logits| ~ 1e4), so the kernels divide with tl.div_rn
  (correctly rounded, as eager) and skip the division at temperature 1: no extra term.
- Order of atomics. The fused-linear backward adds fp32 tile partials into dhidden / dweight / dbias with atomics in
  whatever order the programs finish (the interpreter runs them in order), so results vary run to run by up to
  accumulation_extra() of the number of partials per element.
- Also not seen on CPU: speed, occupancy and resource limits (tests/build/test_triton_aot.py compiles every config for
  sm_80/sm_90 instead), and memory faults (the CUDA C++ kernels run under sanitizers in tests/build/test_cuda_emu.py).
The GPU targets of the kernel suites (ids *-cuda) carry these terms in their bounds.
"""
import torch

from rlhfv_kernels import reference

FP32_EPS = 2.0 ** -24  # unit roundoff of fp32 (round to nearest)
TF32_REL = 2.0 ** -10  # a TF32 operand is within 2**-10 relative of its fp32 value (rounded or truncated)

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def assert_meets_criterion(ours, reference, truth, dtype, what, *, relative=False, extra=0.0):
    """relative=True scales tol by max(1, |truth|): for sums over many tokens, whose fp32 rounding grows with size.
    extra: an error bound the GPU adds and the eager reference does not have (tensor broadcastable to truth)."""
    ours, reference, truth = (t.detach().double() for t in (ours, reference, truth))
    assert ours.shape == truth.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    tol = TOL[dtype]
    bound = (reference - truth).abs() + (tol * truth.abs().clamp_min(1.0) if relative else tol)
    bound = bound + (extra.detach().double().to(bound.device) if isinstance(extra, torch.Tensor) else extra)
    err = (ours - truth).abs()
    nan_expected = torch.isnan(truth)
    exact = ours == truth  # covers matching infinities (a label on a masked, -inf logit has logp = -inf)
    bad = (~(err <= bound) & ~exact & ~nan_expected) | (torch.isnan(ours) != nan_expected)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        where = tuple(idx)
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())} of {bad.numel()} values fail the criterion; first at {where}: "
            f"ours={ours[where].item()!r} reference={reference[where].item()!r} truth={truth[where].item()!r} "
            f"(allowed error {bound[where].item():.3g}, got {err[where].item():.3g})")


def grad_of(fn, logits, *, seed_grad=None):
    """Runs fn(leaf) and returns (output, d sum(output * seed_grad) / d logits) for a fresh leaf copy of logits."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf)
    if seed_grad is None:
        seed_grad = torch.ones_like(out)
    (out * seed_grad.to(out.dtype)).sum().backward()
    return out.detach(), leaf.grad


def truth_token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, softcap=None, logit_scale=1.0,
                         return_entropy=False):
    """The float64 truth of token_logprobs (with return_entropy: and of the entropies) for `logits` holding
    already-rounded values in float64.

    At temperature t != 1 the truth's input is x / t rounded to fp32, the working precision in which both the kernels
    and eager PyTorch form it (DESIGN.md §4: accumulate in fp32), with the exact gradient 1/t. That rounding belongs to
    the definition, not to a kernel's error: against an exact x / t, a correctly rounded kernel and eager both sit
    within an ulp (2e-3 at |logits / t| ~ 3e4) and pass or fail by the luck of later roundings. A kernel that forms
    x / t any other way (x * (1 / t), an approximate division) differs from this truth by an ulp and still fails.

    With a logit transform (softcap, logit_scale) the truth is the float64 reference of the whole transform: its
    roundings are far below the tolerance where the transform bounds the logits (|z| <= softcap) or at moderate
    magnitudes, where the tests use logit_scale alone."""
    if softcap is not None or logit_scale != 1.0:
        return reference.token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature,
                                        softcap=softcap, logit_scale=logit_scale, return_entropy=return_entropy)
    scaled = logits
    if temperature != 1.0:
        exact = logits / temperature
        rounded = (logits.detach().float() / temperature).double()
        # value: the fp32 quotient; gradient: that of x / t. Non-finite entries (masked -inf, poisoned rows) stay.
        scaled = exact + torch.where(torch.isfinite(exact), rounded - exact, torch.zeros_like(exact)).detach()
    return reference.token_logprobs(scaled, labels, ignore_index=ignore_index, return_entropy=return_entropy)


def softcap_gpu_extra(device, softcap, temperature=1.0):
    """Extra error of a log-prob under a soft cap on a GPU. The Triton kernels form u = x * (1 / softcap),
    e = exp(-2|u|) and tanh = (1 - e) / (1 + e) with the GPU's approximate exp, reciprocal and division (each about
    2**-22 relative; the CUDA C++ kernels use tanhf, which is closer): tanh moves by less than 2 * 2**-22, so
    z = softcap * tanh / t by softcap / t * 2**-21, and logp = z_label - lse by twice that. 0 on the CPU (the
    interpreter computes in numpy; the C++ kernels' polynomial exp is within 1e-8)."""
    if softcap is None or torch.device(device).type != "cuda":
        return 0.0
    return 2 * softcap / temperature * 2.0 ** -21


def accumulation_extra(abs_sum, terms):
    """Bound on the change of an fp32 sum of `terms` partials when they are added in another order: each addition
    rounds by at most FP32_EPS of the running |sum| <= abs_sum (the sum of the partials' magnitudes)."""
    return terms * FP32_EPS * abs_sum


def _linear_truth(hidden, weight, bias, labels, coef, temperature, ignore_index):
    """float64, on the CPU: (|H|, |W|, p = softmax(x), g = dL/dx, active rows) of the fused-linear op."""
    hdim = hidden.shape[-1]
    h, w = hidden.detach().double().reshape(-1, hdim).cpu(), weight.detach().double().cpu()
    flat_labels = labels.reshape(-1).cpu()
    active = flat_labels != ignore_index
    c = torch.where(active, coef.detach().double().reshape(-1).cpu(), 0.0)
    x = h @ w.T + (bias.detach().double().cpu() if bias is not None else 0.0)
    p = torch.softmax(x / temperature, dim=1)
    onehot = torch.zeros_like(p)
    onehot[active.nonzero().squeeze(1), flat_labels[active]] = 1.0
    return h.abs(), w.abs(), p, c[:, None] / temperature * (onehot - p), c, active


def linear_accumulation_extra(hidden, weight, bias, labels, coef, temperature, ignore_index=-100):
    """Extra error of (logp, dhidden, dweight, dbias) of the fused-linear GPU kernels from their summation order
    (tensor-core dots, then fp32 atomics across tiles): dhidden sums V products, dweight and dbias N."""
    ah, aw, _, g, _, _ = _linear_truth(hidden, weight, bias, labels, coef, temperature, ignore_index)
    rows, vocab = g.shape
    return (0.0, accumulation_extra(g.abs() @ aw, vocab).reshape(hidden.shape),
            accumulation_extra(g.abs().T @ ah, rows), accumulation_extra(g.abs().sum(dim=0), rows))


def _perturbed_logits_extra(rel, hidden, weight, bias, labels, coef, temperature, ignore_index):
    """Extra error of (logp, dhidden, dweight, dbias) when every logit may move by rel * (sum_k |h_k w_k| + |b|) / t
    and every dlogit, as a GEMM operand, by rel of itself.

    logp = x_label - lse moves by at most 2 * max_v |dx_v| =: 2 d. dlogits g = c/t (onehot - p) moves by
    |c|/t * p * 2 d, and dhidden = g @ W, dweight = g.T @ H take that plus rel * |g| @ |W| (likewise for H)."""
    ah, aw, p, g, c, active = _linear_truth(hidden, weight, bias, labels, coef, temperature, ignore_index)
    magnitude = ah @ aw.T + (bias.detach().double().abs().cpu() if bias is not None else 0.0)
    d = (rel * magnitude / temperature).amax(dim=1)
    dg = c.abs()[:, None] / temperature * p * 2 * d[:, None]
    dh = rel * (g.abs() @ aw) + dg @ aw
    dw = rel * (g.abs().T @ ah) + dg.T @ ah
    return (torch.where(active, 2 * d, torch.zeros_like(d)).reshape(labels.shape),
            dh.reshape(hidden.shape), dw, dg.sum(dim=0))


def tf32_linear_extra(hidden, weight, bias, labels, coef, temperature, ignore_index=-100):
    """Extra error of (logp, dhidden, dweight, dbias) when the fused-linear dots run in TF32, from the float64 truth:
    both operands rounded to TF32, so a logit moves by at most 2 * TF32_REL * sum_k |h_k w_k| / t."""
    return _perturbed_logits_extra(2 * TF32_REL, hidden, weight, bias, labels, coef, temperature, ignore_index)


def reordered_dots_logp_extra(hidden, weight, bias, labels, temperature, slope=1.0, ignore_index=-100):
    """Extra error of an fp32 fused-linear log-prob whose logit dots are summed in another order than eager's
    F.linear (GEMMs of other shapes: chunks of rows). Each logit x = h . w + b may then move by
    accumulation_extra(sum_k |h_k w_k| + |b|, hdim + 1); the transform multiplies that by at most its slope
    (logit_scale / t, the soft cap only flattens it), and logp = z_label - lse moves by twice the largest move.
    The plain tolerance absorbs this at slope ~1; a logit_scale of 8 makes it visible (one seed in ~10^3)."""
    rel = (hidden.shape[-1] + 1) * FP32_EPS
    coef = torch.ones(labels.shape, dtype=torch.float64)
    return _perturbed_logits_extra(rel, hidden, weight, bias, labels, coef, temperature / slope, ignore_index)[0]


# One ulp relative to the value (2 * unit roundoff) of the 16-bit formats.
ULP_REL = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def rounded_logits_extra(hidden, weight, bias, labels, coef, temperature, dtype, ignore_index=-100):
    """Extra error of a fused-linear path whose 16-bit logits and dlogits come out of GEMMs shaped differently from
    eager's (chunks, gathered rows: BLAS sums in another order). Both round to `dtype`, but near a rounding boundary
    the two can land one ulp apart, which eager's own error does not cover; seen about once in 400 seeds."""
    return _perturbed_logits_extra(ULP_REL[dtype], hidden, weight, bias, labels, coef, temperature, ignore_index)
