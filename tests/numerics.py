"""The numerics criterion of DESIGN.md §4, shared by every kernel test.

ours passes where |ours - truth| <= |reference - truth| + tol elementwise, truth being the float64 reference on the
same (already rounded) inputs and `reference` the eager implementation in the same dtype. NaN never passes unless
the truth is NaN at that position too (rows the caller poisoned on purpose).
"""
import torch

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def assert_meets_criterion(ours, reference, truth, dtype, what, *, relative=False):
    """relative=True scales tol by max(1, |truth|): for sums over many tokens, whose fp32 rounding grows with size."""
    ours, reference, truth = (t.detach().double() for t in (ours, reference, truth))
    assert ours.shape == truth.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    tol = TOL[dtype]
    bound = (reference - truth).abs() + (tol * truth.abs().clamp_min(1.0) if relative else tol)
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
