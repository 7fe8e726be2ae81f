"""Per-token entropy from the same pass as the log-probs (token_logprobs / linear_token_logprobs with
return_entropy=True) on every fused backend vs the float64 truth: values and the gradient of
sum(g * logp) + sum(g_H * entropy), layouts, the logit transform, masked and extreme logits, opcheck, torch.compile.

Every fused backend has them (C++ CPU, CUDA C++ and Triton on the logits path; C++ CPU and Triton on the fused-linear
path); the CUDA C++ kernels' entropy also runs under the emulation harness (tests/build/test_cuda_emu.py).
"""
import math

import pytest
import torch

import rlhfv_kernels as rk
from rlhfv_kernels import _backend, reference
from conftest import gpu_sizes_only
from numerics import assert_meets_criterion, truth_token_logprobs
from test_token_logprobs import DTYPES, EXTREME_LOGITS, VALUE_CASES, random_labels, run_contestants


def check_entropy_against_truth(backend, make_logits, labels, dtype, *, temperature=1.0, inplace_backward=False,
                                transform=None, grad_logp=True, grad_entropy=True):
    """Values of (logp, entropy) and d(sum(g * logp) + sum(g_H * H))/d leaf, random g and g_H (either may be off)."""
    g = torch.randn(labels.shape, dtype=torch.float64)
    g_h = torch.randn(labels.shape, dtype=torch.float64)

    def run(fn, logits, kwargs):
        logp, entropy = fn(logits, labels, temperature=temperature, return_entropy=True, **(transform or {}),
                           **kwargs)
        terms = [(out * seed.to(out.dtype)).sum() for out, seed, wanted in ((logp, g, grad_logp),
                                                                          (entropy, g_h, grad_entropy)) if wanted]
        return (logp, entropy), sum(terms)  # an output left out gets no incoming gradient (None) in autograd

    results = run_contestants(backend, make_logits, dtype, inplace_backward, run)
    ours, ref, truth = results["ours"], results["reference"], results["truth"]
    assert ours[1].dtype == torch.float32
    assert_meets_criterion(ours[0], ref[0], truth[0], dtype, "logp")
    assert_meets_criterion(ours[1], ref[1], truth[1], dtype, "entropy")
    assert_meets_criterion(ours[2], ref[2], truth[2], dtype, "dlogits")
    return results


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab", VALUE_CASES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients(dtype, shape, vocab, temperature, backend):
    base = torch.randn(*shape, vocab) * 3
    labels = random_labels(shape, vocab)
    check_entropy_against_truth(backend, lambda x: base if x is None else x, labels, dtype, temperature=temperature)


@pytest.mark.parametrize("grads", [(True, False), (False, True)], ids=["logp-only", "entropy-only"])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_one_output_with_gradient(grads, inplace_backward, backend):
    """Either output alone carries the gradient (the other's incoming gradient is None in autograd)."""
    base = torch.randn(4, 6, 513) * 2
    labels = random_labels((4, 6), 513)
    check_entropy_against_truth(backend, lambda x: base if x is None else x[:, :-1], labels[:, :-1], torch.float32,
                                inplace_backward=inplace_backward, grad_logp=grads[0], grad_entropy=grads[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_strided_views(dtype, inplace_backward, backend):
    base = torch.randn(3, 10, 1001)
    check_entropy_against_truth(backend, lambda x: base if x is None else x[:, :-1], random_labels((3, 9), 1001),
                                dtype, inplace_backward=inplace_backward, temperature=0.8)
    check_entropy_against_truth(backend, lambda x: base if x is None else x.transpose(0, 1),
                                random_labels((10, 3), 1001), dtype, inplace_backward=inplace_backward)


@pytest.mark.parametrize("transform", [{"softcap": 5.0}, {"softcap": 30.0, "logit_scale": 0.5},
                                       {"logit_scale": 0.0625}], ids=["cap", "cap-scale", "scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_transform(transform, dtype, backend):
    base = torch.randn(5, 7, 3001) * 8
    labels = random_labels((5, 7), 3001)
    for inplace in (False, True):
        check_entropy_against_truth(backend, lambda x: base if x is None else x, labels, dtype, temperature=0.9,
                                    transform=transform, inplace_backward=inplace)


@pytest.mark.parametrize("make", list(EXTREME_LOGITS.values()), ids=list(EXTREME_LOGITS))
def test_extreme_logits(make, backend):
    """|logits| ~ 1e4: the entropy is formed about the row maximum (log S1 - S2 / S1), never as lse - E[z]."""
    base = make(19, 3001)
    labels = random_labels((19,), 3001, ignore_fraction=0.1)
    for temperature in (1.0, 0.7):
        check_entropy_against_truth(backend, lambda x: base if x is None else x, labels, torch.float32,
                                    temperature=temperature)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_vocabulary_entries(dtype, backend):
    """-inf logits have p = 0 and add nothing to the entropy or its gradient (no 0 * -inf = NaN)."""
    base = torch.randn(6, 700) * 3
    base[:, 100:400] = float("-inf")
    base[2, :] = float("-inf")
    base[2, 5] = 1.0  # one finite entry: entropy 0
    labels = random_labels((6,), 100)
    labels[2] = 5
    results = check_entropy_against_truth(backend, lambda x: base if x is None else x, labels, dtype)
    if labels[2] != -100:
        assert results["ours"][1][2].item() == pytest.approx(0.0, abs=1e-6)


def test_known_entropies(backend):
    vocab = 4099
    logits = torch.stack([torch.zeros(vocab), torch.full((vocab,), -30.0).index_fill(0, torch.tensor([7]), 30.0)])
    _, entropy = rk.token_logprobs(logits, torch.tensor([1, 7]), backend=backend, return_entropy=True)
    assert entropy[0].item() == pytest.approx(math.log(vocab), rel=1e-6)
    assert entropy[1].item() == pytest.approx(0.0, abs=1e-6)


def test_ignored_rows_and_empty_inputs(backend):
    logits = torch.randn(3, 50, requires_grad=True)
    labels = torch.full((3,), -100)
    logp, entropy = rk.token_logprobs(logits * 1, labels, backend=backend, return_entropy=True)
    assert logp.abs().sum() == 0 and entropy.abs().sum() == 0
    (logp.sum() + entropy.sum()).backward()
    assert logits.grad.abs().sum() == 0
    logp, entropy = rk.token_logprobs(torch.randn(0, 50), torch.zeros(0, dtype=torch.long), backend=backend,
                                      return_entropy=True)
    assert logp.shape == entropy.shape == (0,)


def test_float64_gradcheck():
    logits = torch.randn(3, 4, 9, dtype=torch.float64, requires_grad=True)
    labels = random_labels((3, 4), 9)
    for options in ({"temperature": 0.8}, {"softcap": 2.0, "logit_scale": 0.7}):
        assert torch.autograd.gradcheck(
            lambda x: rk.token_logprobs(x[:, :-1], labels[:, :-1], backend="cpp", return_entropy=True, **options),
            (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype, backend):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp32/bf16/fp16 logits")
    ops = _backend.operators(backend)
    labels = random_labels((3, 6), 77)
    for x, softcap in ((torch.randn(3, 6, 77, dtype=dtype), 0.0), (torch.randn(3, 7, 77, dtype=dtype)[:, :-1], 2.5)):
        for flag in (False, True):
            torch.library.opcheck(ops.logprob_entropy_fwd.default, (x, labels, -100, 0.9, softcap, flag))
        _, entropy, lse = ops.logprob_entropy_fwd(x, labels, -100, 0.9, softcap, False)
        grad, grad_h = torch.randn(labels.shape), torch.randn(labels.shape)
        torch.library.opcheck(ops.logprob_entropy_bwd.default,
                              (grad, grad_h, x, labels, lse, entropy, -100, 0.9, softcap))
        torch.library.opcheck(ops.logprob_entropy_bwd_.default,
                              (x.clone(), grad, grad_h, labels, lse, entropy, -100, 0.9, softcap))
    leaf = torch.randn(4, 33, requires_grad=True)
    torch.library.opcheck(ops.logprob_entropy_fwd.default, (leaf, random_labels((4,), 33), -100, 1.0, 0.0, False))


def test_torch_compile(backend):
    torch._dynamo.reset()
    labels = random_labels((4, 9), 300)

    def loss_fn(x):
        logp, entropy = rk.token_logprobs(x, labels, backend=backend, return_entropy=True, inplace_backward=True)
        return -logp.sum() + 0.1 * entropy.sum()

    base = torch.randn(4, 9, 300)
    grads = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        leaf = base.clone().requires_grad_(True)
        fn(leaf * 1).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear(dtype, with_bias, linear_backend):
    """linear_token_logprobs(return_entropy=True): both outputs and dhidden / dweight / dbias vs the float64 truth
    of the logits it never materializes; ignored tokens skip the GEMMs."""
    hidden = (torch.randn(3, 11, 24) * 0.5).to(dtype)
    weight = (torch.randn(997, 24) * 0.5).to(dtype)
    bias = torch.randn(997).to(dtype) if with_bias else None
    labels = random_labels((3, 11), 997)
    g, g_h = torch.randn(labels.shape, dtype=torch.float64), torch.randn(labels.shape, dtype=torch.float64)
    results = {}
    for name, run_dtype, fn in (("ours", dtype, "fused"), ("reference", dtype, "eager"),
                                ("truth", torch.float64, "eager")):
        leaves = [t.detach().to(run_dtype).clone().requires_grad_(True) for t in (hidden, weight)]
        b = bias.detach().to(run_dtype).clone().requires_grad_(True) if with_bias else None
        options = {"softcap": 4.0, "temperature": 0.9}
        if fn == "fused":
            logp, entropy = rk.linear_token_logprobs(*leaves, labels, bias=b, backend=linear_backend, chunk_size=7,
                                                     return_entropy=True, **options)
        else:
            logits = torch.nn.functional.linear(*leaves, b)
            logp, entropy = reference.token_logprobs(logits, labels, return_entropy=True, **options)
        ((logp * g.to(logp.dtype)).sum() + (entropy * g_h.to(entropy.dtype)).sum()).backward()
        results[name] = [logp.detach(), entropy.detach()] + [t.grad for t in leaves] + ([b.grad] if b is not None
                                                                                         else [])
    names = ["logp", "entropy", "dhidden", "dweight", "dbias"]
    for i, what in enumerate(names[:len(results["ours"])]):
        assert_meets_criterion(results["ours"][i], results["reference"][i], results["truth"][i], dtype, what,
                               relative=what in ("dweight", "dbias"))


def test_fused_linear_gradcheck():
    hidden = torch.randn(4, 6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    labels = random_labels((4, 6), 50)
    assert torch.autograd.gradcheck(
        lambda h, w: rk.linear_token_logprobs(h, w, labels, backend="cpp", chunk_size=5, return_entropy=True,
                                              softcap=3.0), (hidden, weight))


def test_long_rows_carry_the_moment_across_blocks(backend):
    """A running maximum that rises block after block (a ramp over V = 70001 > one interpreter block, > one CPU
    chunk): the moment sum is rescaled each time it moves."""
    vocab = 70001
    base = torch.linspace(-20, 20, vocab).repeat(3, 1) + torch.randn(3, vocab)
    base[1] = base[1].flip(0)
    check_entropy_against_truth(backend, lambda x: base if x is None else x, random_labels((3,), vocab, 0.0),
                                torch.float32, temperature=2.0)


def test_triton_split_partials_merge():
    """The Triton forward splits long rows across programs on a GPU; the float64 merge of the splits' moments."""
    from conftest import skip_unless_backend_runs
    skip_unless_backend_runs("triton", "cpu")
    from rlhfv_kernels.triton import kernels
    logits = torch.randn(3, 20000) * 5
    logits[0, :7000] = float("-inf")  # a split of masked entries only
    labels = torch.randint(7000, 20000, (3,))
    logp, entropy, _ = kernels.launch_forward(logits, labels, -100, 1.0, 0.0, num_splits=3, with_entropy=True)
    truth_logp, truth_entropy = reference.token_logprobs(logits.double(), labels, return_entropy=True)
    torch.testing.assert_close(logp.double(), truth_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.double(), truth_entropy, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows,vocab,dtype", [
    (512, 262144, torch.bfloat16),   # few long rows: vocabulary splits, moments merged across them
    (2048, 128256, torch.bfloat16),
    (257, 32003, torch.float32),     # odd V: unaligned rows, scalar paths
    (3001, 1000, torch.bfloat16),    # short rows: one warp per row (CUDA C++), warp merges of the moment
])
def test_gpu_sizes(backend, rows, vocab, dtype):
    gpu_sizes_only()
    base = (torch.randn(rows + 1, vocab) * 3).to(dtype)
    base[::5, : vocab // 3] = float("-inf")  # a masked first split
    labels = torch.randint(vocab // 3, vocab, (rows,))
    labels[::7] = -100
    for inplace in (False, True):
        check_entropy_against_truth(backend, lambda x: (base if x is None else x)[1:], labels, dtype,
                                    inplace_backward=inplace, temperature=0.9)
