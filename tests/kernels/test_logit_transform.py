"""The model's final logit transform inside the kernels (softcap=, logit_scale=; DESIGN.md §2) on every path and
backend, against the float64 reference with the numerics criterion: values and gradients, ignored tokens, strided
views, in-place backward, extreme and masked logits, every loss, and the fused-linear path (log-probs and the
gradients-in-forward losses). The transform is z = softcap * tanh(logit_scale * x / softcap) (or logit_scale * x),
then / temperature: Gemma 2/3 (final_logit_softcapping 30), Cohere (logit_scale 0.0625), Granite (1 / logits_scaling).
"""
import pytest
import torch
import torch.nn.functional as F

import rlhfv_kernels as rk
from numerics import assert_meets_criterion, reordered_dots_logp_extra, softcap_gpu_extra
from rlhfv_kernels import _sources, reference
from test_linear import run
from test_losses import compare_fused, make_shifted_batch
from test_token_logprobs import DTYPES, EXTREME_LOGITS, check_against_truth, check_extreme_logits, random_labels

# (softcap, logit_scale) of the families that transform their logits, and mixed cases. Logits here are ~N(0, 3^2)
# up to |x| ~ 1e4: the soft cap bounds z, so the roundings of the transform stay far below the tolerance.
TRANSFORMS = [
    pytest.param(dict(softcap=30.0), id="gemma-softcap30"),
    pytest.param(dict(softcap=2.5), id="tight-softcap"),
    pytest.param(dict(logit_scale=0.0625), id="cohere-scale"),
    pytest.param(dict(logit_scale=1 / 8), id="granite-scale"),
    pytest.param(dict(softcap=4.0, logit_scale=3.0), id="softcap-and-scale"),
]


def extra_for(transform, temperature=1.0):
    return softcap_gpu_extra(torch.get_default_device(), transform.get("softcap"), temperature)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("shape,vocab,temperature", [((37,), 32003, 1.0), ((3, 13), 101, 0.7), ((4,), 2049, 1.3)])
def test_values_and_gradients(dtype, transform, shape, vocab, temperature, backend):
    base = torch.randn(*shape, vocab) * 3
    labels = random_labels(shape, vocab)
    check_against_truth(backend, lambda x: base if x is None else x, labels, dtype, temperature=temperature,
                        transform=transform, logp_extra=extra_for(transform, temperature))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_strided_views_and_inplace_backward(dtype, inplace_backward, backend):
    base = torch.randn(3, 10, 1001) * 4
    labels = random_labels((3, 9), 1001)
    transform = dict(softcap=5.0, logit_scale=0.5)
    check_against_truth(backend, lambda x: base if x is None else x[:, :-1], labels, dtype,
                        inplace_backward=inplace_backward, transform=transform, logp_extra=extra_for(transform))


# Saturated (every z near +-softcap), all near +softcap (an almost uniform softmax), and both signs.
@pytest.mark.parametrize("make", [EXTREME_LOGITS[k] for k in ("spread", "offset", "two-sided")],
                         ids=["spread", "offset", "two-sided"])
@pytest.mark.parametrize("transform", [dict(softcap=30.0), dict(softcap=7.0, logit_scale=0.2)])
def test_extreme_logits_under_a_soft_cap(make, transform, backend):
    check_extreme_logits(backend, make, transform=transform, logp_extra=extra_for(transform))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_entries_become_minus_softcap_as_in_eager(dtype, backend):
    """A soft cap maps -inf to -softcap (what the model's own logits hold too): masked entries then carry
    probability, exactly as the eager transform says; NaN still poisons only its own row."""
    base = torch.randn(6, 5000) * 2
    base[:, :4500] = float("-inf")
    base[1, 7] = float("nan")
    labels = torch.randint(4500, 5000, (6,))
    out = rk.token_logprobs(base.to(dtype), labels, softcap=3.0, backend=backend)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3, 4, 5]]).all()
    rows = [0, 2, 3, 4, 5]
    check_against_truth(backend, lambda x: base[rows] if x is None else x, labels[rows], dtype,
                        transform=dict(softcap=3.0), logp_extra=extra_for(dict(softcap=3.0)))


def test_a_soft_cap_changes_the_result():
    """The option is applied, not accepted and ignored (a test that would pass on the untransformed kernel)."""
    logits = torch.randn(4, 50) * 20
    labels = torch.randint(0, 50, (4,))
    plain = rk.token_logprobs(logits, labels)
    for transform in (dict(softcap=10.0), dict(logit_scale=0.5)):
        assert (rk.token_logprobs(logits, labels, **transform) - plain).abs().max() > 0.1


def test_float64_gradcheck():
    logits = torch.randn(3, 4, 9, dtype=torch.float64, requires_grad=True) * 4
    labels = random_labels((3, 4), 9)
    for transform in (dict(softcap=2.0), dict(softcap=3.0, logit_scale=0.7), dict(logit_scale=1.5)):
        assert torch.autograd.gradcheck(
            lambda x: rk.token_logprobs(x, labels, backend="cpp", temperature=0.8, **transform), (logits,))
        hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
        y = random_labels((2, 5), 9)
        assert torch.autograd.gradcheck(
            lambda h, w: rk.linear_token_logprobs(h, w, y, chunk_size=3, backend="cpp", **transform),
            (hidden, weight))


def test_kernel_transform_folds_the_scale_exactly():
    """softcap * tanh(s x / softcap) / t == (softcap / s) * tanh(x / (softcap / s)) / (t / s)."""
    x = torch.randn(1000, dtype=torch.float64) * 50
    for softcap, scale, temperature in ((30.0, 1.0, 1.0), (4.0, 0.0625, 0.7), (None, 0.125, 1.3), (None, 1.0, 2.0)):
        t, c = _sources.kernel_transform(temperature, softcap, scale)
        expected = (softcap * torch.tanh(scale * x / softcap) if softcap else scale * x) / temperature
        got = (c * torch.tanh(x / c) if c else x) / t
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-12)


# ---- every loss of the logits path ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform", [dict(softcap=3.0), dict(softcap=30.0, logit_scale=4.0),
                                       dict(logit_scale=0.3)])
def test_losses(dtype, transform, backend):
    compare_fused("sequence_logps", dtype, backend, mode="mean", token_weights=torch.rand(6, 10) * 3,
                  temperature=0.9, **transform)
    compare_fused("ddpo_loss", dtype, backend, mode="mean", ref_logps=torch.randn(6) * 5, beta=0.5,
                  token_weights=torch.where(torch.rand(6, 10) < 0.3, 5.0, 1.0), sft_weight=0.1, **transform)
    logits, labels = make_shifted_batch()
    current = reference.token_logprobs(logits[:, :-1].double(), labels, **transform).float()
    compare_fused("grpo_loss", dtype, backend, (logits, labels), advantages=torch.randn(6),
                  old_logps=current + 0.3 * torch.randn(6, 10), ref_logps=current + 0.3 * torch.randn(6, 10),
                  beta_kl=0.05, loss_type="grpo", **transform)


# ---- the fused-linear path ----

def linear_inputs(rows=6, seq=9, hdim=24, vocab=301):
    labels = torch.randint(0, vocab, (rows, seq))
    labels[:, :3] = -100  # prompt tokens
    return torch.randn(rows, seq, hdim), torch.randn(vocab, hdim) / hdim ** 0.5 * 6, torch.randn(vocab), labels


def check_linear(ours, eager, hidden, weight, bias, dtype, what):
    one = torch.ones((), dtype=torch.float64)
    got = run(ours, hidden, weight, bias, dtype, one)
    same = run(eager, hidden, weight, bias, dtype, one)
    truth = run(eager, hidden, weight, bias, dtype, one, truth=True)
    for k, name in enumerate(("value", "dhidden", "dweight", "dbias")):
        assert_meets_criterion(got[k], same[k], truth[k], dtype, f"{what} {name}", relative=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", [dict(softcap=5.0), dict(logit_scale=0.25),
                                       dict(softcap=30.0, logit_scale=8.0)])
def test_linear_token_logprobs_and_losses(dtype, transform, linear_backend):
    """Per-token log-probs (4 GEMMs, logits recomputed in backward) and the losses whose gradients are computed in
    the forward (_linear_engine.py), both with the transform, against the eager transform of h @ W.T + b."""
    hidden, weight, bias, labels = linear_inputs()
    backend = linear_backend
    seed = torch.randn(labels.shape, dtype=torch.float64)
    opts = dict(temperature=0.9, **transform)
    ours = run(lambda h, w, b: rk.linear_token_logprobs(h, w, labels, bias=b, chunk_size=7, backend=backend, **opts),
               hidden, weight, bias, dtype, seed)
    same = run(lambda h, w, b: reference.token_logprobs(F.linear(h, w, b), labels, **opts), hidden, weight, bias,
               dtype, seed)
    truth = run(lambda h, w, b: reference.token_logprobs(F.linear(h, w, b), labels, **opts), hidden, weight, bias,
                dtype, seed, truth=True)
    if dtype == torch.float32:  # 16-bit GEMMs of other shapes round differently (rounded_logits_extra); losses below
        reordered = reordered_dots_logp_extra(hidden, weight, bias, labels, 0.9, slope=transform.get("logit_scale", 1))
        for k, name in enumerate(("logp", "dhidden", "dweight", "dbias")):
            assert_meets_criterion(ours[k], same[k], truth[k], dtype, f"linear {name}", relative=k > 0,
                                   extra=extra_for(transform, 0.9) + reordered if k == 0 else 0.0)
    ref = torch.randn(labels.shape[0]) - 20
    weights = torch.where(torch.rand(labels.shape) < 0.3, 5.0, 1.0)
    ddpo = dict(token_weights=weights, beta=0.5, mode="mean", sft_weight=0.1, **transform)
    check_linear(lambda h, w, b: rk.linear_ddpo_loss(h, w, labels, ref, bias=b, chunk_size=14, backend=backend, **ddpo),
                 lambda h, w, b: reference.ddpo_loss(F.linear(h, w, b), labels, ref, **ddpo),
                 hidden, weight, bias, dtype, "linear ddpo")
    adv = torch.randn(labels.shape[0])
    check_linear(lambda h, w, b: rk.linear_grpo_loss(h, w, labels, adv, bias=b, loss_type="dapo", backend=backend,
                                                     **transform),
                 lambda h, w, b: reference.grpo_loss(F.linear(h, w, b), labels, adv, loss_type="dapo", **transform),
                 hidden, weight, bias, dtype, "linear grpo")


def test_scoring_without_gradient_applies_the_transform():
    """Reference scoring (no gradient wanted) takes the engine's one-GEMM scoring route: same transform there."""
    hidden, weight, bias, labels = linear_inputs()
    ref = torch.zeros(labels.shape[0])
    with torch.no_grad():
        out = rk.linear_ddpo_loss(hidden, weight, labels, ref, bias=bias, softcap=3.0, mode="sum")
    expected = reference.sequence_logps(F.linear(hidden, weight, bias).double(), labels, softcap=3.0)
    torch.testing.assert_close(torch.cat([out.chosen_logps, out.rejected_logps]).double(), expected, rtol=1e-5,
                               atol=1e-4)


def test_torch_compile_with_a_soft_cap():
    torch._dynamo.reset()
    logits = torch.randn(4, 6, 97)
    labels = random_labels((4, 6), 97)
    compiled = torch.compile(lambda x: rk.token_logprobs(x, labels, softcap=3.0, logit_scale=0.5), fullgraph=True)
    torch.testing.assert_close(compiled(logits), rk.token_logprobs(logits, labels, softcap=3.0, logit_scale=0.5))
