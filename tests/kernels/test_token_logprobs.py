"""token_logprobs on every fused backend vs the float64 reference: values, gradients, layouts, edge values.

Each test runs once per (backend, device) pair of the backend table (conftest.py's `backend` fixture): the compiled
C++ kernels on CPU, the Triton kernels in the interpreter on CPU (TRITON_INTERPRET=1), and on a GPU machine the Triton
and CUDA C++ kernels on the GPU. The GPU-size cases at the end run on GPU targets only; their bounds add what the
interpreter cannot show (tests/numerics.py): the summation order of tensor-core dots and atomics.
"""
import pytest
import torch

import rlhfv_kernels as rk
from conftest import gpu_sizes_only
from rlhfv_kernels import _backend, reference
from numerics import assert_meets_criterion, truth_token_logprobs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_labels(shape, vocab, ignore_fraction=0.2, ignore_index=-100):
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignore_fraction] = ignore_index
    return labels


def run_contestants(backend, make_logits, dtype, inplace_backward, run):
    """Ours (`backend`), the eager reference (in `dtype`) and the float64 truth on the same logits: make_logits(leaf)
    -> logits view; run(token_logprobs_fn, logits, kwargs) -> (outputs, scalar loss). Returns {name: outputs
    (detached) + (d loss / d leaf,)}."""
    base = make_logits(None)
    results = {}
    for name, leaf_dtype, fn, kwargs in [
        ("ours", dtype, rk.token_logprobs, {"backend": backend, "inplace_backward": inplace_backward}),
        ("reference", dtype, reference.token_logprobs, {}),
        ("truth", torch.float64, truth_token_logprobs, {}),
    ]:
        # the truth starts from the inputs rounded to dtype, as ours and the reference do (DESIGN.md §4): its
        # distance to them is then the computation's error alone, never the inputs' rounding
        leaf = base.detach().to(dtype).to(leaf_dtype).clone().requires_grad_(True)
        # A non-leaf copy, so inplace_backward may consume it without touching the leaf's own storage.
        outputs, loss = run(fn, make_logits(leaf * 1), kwargs)
        loss.backward()
        results[name] = tuple(out.detach() for out in outputs) + (leaf.grad,)
    return results


def check_against_truth(backend, make_logits, labels, dtype, *, temperature=1.0, ignore_index=-100,
                        inplace_backward=False, transform=None, logp_extra=0.0):
    """make_logits(leaf) -> logits view. Compares values and d(sum(g * logp))/d leaf with a random g.
    transform: the logit transform options (softcap, logit_scale) given to all three."""
    seed_grad = torch.randn(labels.shape, dtype=torch.float64)

    def run(fn, logits, kwargs):
        out = fn(logits, labels, ignore_index=ignore_index, temperature=temperature, **(transform or {}), **kwargs)
        return (out,), (out * seed_grad.to(out.dtype)).sum()

    results = run_contestants(backend, make_logits, dtype, inplace_backward, run)
    expected_dtype = torch.float32
    assert results["ours"][0].dtype == expected_dtype
    assert_meets_criterion(results["ours"][0], results["reference"][0], results["truth"][0], dtype, "logp",
                           extra=logp_extra)
    assert_meets_criterion(results["ours"][1], results["reference"][1], results["truth"][1], dtype, "dlogits")
    return results


# (leading shape, V): a long odd row, a small 2-D batch, 3-D, a one-entry vocabulary, one past a CPU chunk
VALUE_CASES = [((37,), 32003), ((3, 13), 101), ((2, 3, 5), 7), ((5,), 1), ((4,), 2049)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab", VALUE_CASES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients(dtype, shape, vocab, temperature, backend):
    base = torch.randn(*shape, vocab) * 3
    labels = random_labels(shape, vocab)
    check_against_truth(backend, lambda x: base if x is None else x, labels, dtype, temperature=temperature)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_strided_views_without_copy(dtype, inplace_backward, backend):
    batch, seq, vocab = 3, 9, 1001
    base = torch.randn(batch, seq + 1, vocab)
    labels = random_labels((batch, seq), vocab)
    # The usual shift: logits[:, :-1] has a row stride that skips one row per sequence.
    check_against_truth(backend, lambda x: base if x is None else x[:, :-1], labels, dtype,
                        inplace_backward=inplace_backward)
    # Every other position, and a permuted (non-monotone) leading layout.
    labels_even = random_labels((batch, (seq + 2) // 2), vocab)
    check_against_truth(backend, lambda x: base if x is None else x[:, ::2], labels_even, dtype,
                        inplace_backward=inplace_backward)
    labels_t = random_labels((seq + 1, batch), vocab)
    check_against_truth(backend, lambda x: base if x is None else x.transpose(0, 1), labels_t, dtype,
                        inplace_backward=inplace_backward)


def test_strided_view_reads_the_right_rows(backend):
    base = torch.randn(2, 6, 50)
    view = base[:, 1::2]
    labels = torch.randint(0, 50, view.shape[:-1])
    out = rk.token_logprobs(view, labels, backend=backend)
    torch.testing.assert_close(out, reference.token_logprobs(view.contiguous(), labels), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_ignored_rows_give_zero_value_and_gradient(dtype, backend):
    base = torch.randn(4, 6, 333)
    labels = random_labels((4, 6), 333)
    labels[1] = -100
    labels[3] = -100
    results = check_against_truth(backend, lambda x: base if x is None else x, labels, dtype)
    logp, grad = results["ours"]
    assert torch.all(logp[1] == 0) and torch.all(logp[3] == 0)
    assert torch.all(grad[1] == 0) and torch.all(grad[3] == 0)
    fully_ignored = torch.full((5,), -100)
    out = rk.token_logprobs(torch.randn(5, 17, dtype=dtype), fully_ignored, backend=backend)
    assert torch.equal(out, torch.zeros(5))


def test_custom_ignore_index_and_int32_labels(backend):
    base = torch.randn(7, 40)
    labels = torch.randint(0, 40, (7,), dtype=torch.int32)
    labels[2] = 39  # a valid label that equals nothing special
    labels[4] = 5
    out = rk.token_logprobs(base, labels, ignore_index=5, backend=backend)
    assert out[4] == 0
    expected = reference.token_logprobs(base.double(), labels.long(), ignore_index=5)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


# [n, v] logits at |x| ~ 1e4 (also used under a soft cap, tests/kernels/test_logit_transform.py)
EXTREME_LOGITS = {
    "spread": lambda n, v: torch.randn(n, v) * 1e4,      # huge spread: peaked softmax
    "offset": lambda n, v: 1e4 + 5 * torch.randn(n, v),  # huge offset: an fp32 LSE would lose ~5e-4
    "negative": lambda n, v: -1e4 + torch.randn(n, v),
    "two-sided": lambda n, v: torch.where(torch.rand(n, v) < 0.5, -1e4, 1e4) + torch.randn(n, v),
}


@pytest.mark.parametrize("make", list(EXTREME_LOGITS.values()), ids=list(EXTREME_LOGITS))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_extreme_logits(make, backend, temperature):
    """At |logits| ~ 1e4 one ulp is ~1e-3: x / t must be rounded once, as eager does (not x * (1 / t))."""
    check_extreme_logits(backend, make, temperature=temperature)


def check_extreme_logits(backend, make, **options):
    """check_against_truth in fp32 on make(19, 3001), out of place and in place; options as check_against_truth's."""
    base = make(19, 3001)
    labels = random_labels((19,), 3001, ignore_fraction=0.1)
    # Put some labels on the row maximum, where the gradient is largest and the LSE precision matters.
    labels[::3] = base[::3].argmax(-1)
    for inplace in (False, True):
        check_against_truth(backend, lambda x: base if x is None else x, labels, torch.float32,
                            inplace_backward=inplace, **options)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_rows_stay_local(dtype, backend):
    base = torch.randn(6, 257).to(dtype)
    base[1, 10] = float("nan")
    base[3, 0] = float("inf")
    labels = torch.randint(0, 257, (6,))
    leaf = base.clone().requires_grad_(True)
    out = rk.token_logprobs(leaf, labels, backend=backend)
    out.sum().backward()
    assert torch.isnan(out[1]) and torch.isnan(out[3])
    finite_rows = [0, 2, 4, 5]
    assert torch.isfinite(out[finite_rows]).all()
    assert torch.isfinite(leaf.grad[finite_rows].float()).all()
    expected = reference.token_logprobs(base[finite_rows].double(), labels[finite_rows])
    assert_meets_criterion(out[finite_rows], reference.token_logprobs(base[finite_rows], labels[finite_rows]),
                           expected, dtype, "finite rows beside NaN rows")


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_vocabulary_entries(dtype, backend):
    """-inf logits (masked tokens), also filling whole chunks at the start of a row, add nothing and stay finite."""
    base = torch.randn(6, 5000) * 2
    base[:, :4500] = float("-inf")
    base[1, ::2] = float("-inf")
    labels = torch.randint(4500, 5000, (6,))
    check_against_truth(backend, lambda x: base if x is None else x, labels, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_hidden_among_masked_entries_still_poisons_its_row(dtype, backend):
    base = torch.randn(3, 5000)
    base[:, :4000] = float("-inf")
    base[1, 7] = float("nan")
    out = rk.token_logprobs(base.to(dtype), torch.full((3,), 4999), backend=backend)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    row_all_masked = torch.full((1, 300), float("-inf"))
    assert torch.isnan(rk.token_logprobs(row_all_masked, torch.tensor([3]), backend=backend)).all()
    assert torch.isnan(reference.token_logprobs(row_all_masked, torch.tensor([3]))).all()


def test_vocab_262144(backend):
    base = torch.randn(5, 262144) * 4
    labels = random_labels((5,), 262144, ignore_fraction=0.0)
    check_against_truth(backend, lambda x: base if x is None else x, labels, torch.float32)
    check_against_truth(backend, lambda x: base if x is None else x, labels, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_inputs(dtype, backend):
    out = rk.token_logprobs(torch.randn(0, 11, dtype=dtype, requires_grad=True), torch.zeros(0, dtype=torch.long),
                            backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    out = rk.token_logprobs(torch.randn(2, 0, 11, dtype=dtype), torch.zeros(2, 0, dtype=torch.long), backend=backend)
    assert out.shape == (2, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_consumes_logits_and_matches(dtype, backend):
    leaf = (torch.randn(4, 5, 203) * 2).to(dtype).requires_grad_(True)
    labels = random_labels((4, 5), 203)
    grads = {}
    for inplace in (False, True):
        leaf.grad = None
        logits = leaf * 1.0
        out = rk.token_logprobs(logits, labels, inplace_backward=inplace, backend=backend)
        out.sum().backward()
        grads[inplace] = (leaf.grad.clone(), logits.detach().clone())
    assert torch.equal(grads[True][0], grads[False][0])
    # The consumed logits now hold the gradient; the out-of-place run left its logits untouched.
    assert torch.equal(grads[True][1], grads[True][0])
    assert torch.equal(grads[False][1], (leaf * 1.0).detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_half_precision_gradient_is_the_rounded_truth(dtype, temperature):
    """A bf16/fp16 gradient is rounded to its dtype (and the CPU backward's exp for bf16 is a cheaper degree-4
    polynomial, exp_finish_coarse, 5.4e-6 relative): every entry must be the float64 truth rounded to the dtype or,
    where the truth lies that close to a rounding boundary, its neighbour, and that must stay rare: 0.07% of bf16
    entries with the degree-4 polynomial, 0.002% of fp16 ones (degree 6); a degree-3 polynomial (1.2e-4) makes it
    ~1% of bf16 entries and fails here."""
    torch.manual_seed(11)
    vocab = 32003
    base = (torch.randn(29, vocab) * 3).to(dtype)
    labels = random_labels((29,), vocab)
    seed_grad = torch.randn(29, dtype=torch.float64)
    grads = {}
    for name, fn, leaf_dtype in [("ours", rk.token_logprobs, dtype), ("truth", truth_token_logprobs, torch.float64)]:
        leaf = base.to(leaf_dtype).clone().requires_grad_(True)
        kwargs = {"backend": "cpp", "inplace_backward": True} if name == "ours" else {}
        out = fn(leaf * 1, labels, temperature=temperature, **kwargs)
        (out.double() * seed_grad).sum().backward()
        grads[name] = leaf.grad
    ours, truth = grads["ours"].double(), grads["truth"]
    rounded = truth.to(dtype).double()
    ulp = torch.finfo(dtype).eps * rounded.abs() + torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    off = ours != rounded
    assert ((ours - rounded).abs() <= ulp + 1e-30)[off].all(), "an entry is more than one ulp from the rounded truth"
    assert off.double().mean().item() < 0.0025, f"{off.double().mean().item():.3%} of entries are not the rounded truth"


def test_float64_gradcheck():
    """The compiled CPU kernels compute in float64 for float64 logits, so finite differences can check them."""
    logits = torch.randn(3, 4, 9, dtype=torch.float64, requires_grad=True)
    labels = random_labels((3, 4), 9)
    assert torch.autograd.gradcheck(lambda x: rk.token_logprobs(x, labels, backend="cpp", temperature=0.8),
                                    (logits,))
    strided = torch.randn(3, 5, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: rk.token_logprobs(x[:, :-1], labels, backend="cpp"), (strided,))


def op_family(backend):
    return _backend.operators(backend)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_opcheck(dtype, backend):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp32/bf16/fp16 logits")
    ops = op_family(backend)
    logits = torch.randn(3, 6, 77, dtype=dtype)
    labels = random_labels((3, 6), 77)
    strided = torch.randn(3, 7, 77, dtype=dtype)[:, :-1]
    for x, softcap in ((logits, 0.0), (strided, 0.0), (logits, 2.5)):
        for inplace_flag in (False, True):
            torch.library.opcheck(ops.logprob_fwd.default, (x, labels, -100, 0.9, softcap, inplace_flag))
        _, lse = ops.logprob_fwd(x, labels, -100, 0.9, softcap, False)
        grad = torch.randn(labels.shape)
        torch.library.opcheck(ops.logprob_bwd.default, (grad, x, labels, lse, -100, 0.9, softcap))
        torch.library.opcheck(ops.logprob_bwd_.default, (x.clone(), grad, labels, lse, -100, 0.9, softcap))


def test_opcheck_autograd_registration(backend):
    ops = op_family(backend)
    logits = torch.randn(4, 33, requires_grad=True)
    labels = random_labels((4,), 33)
    for flag in (False, True):
        torch.library.opcheck(ops.logprob_fwd.default, (logits, labels, -100, 1.0, 0.0, flag))


def test_inplace_backward_on_a_leaf_warns(backend):
    leaf = torch.randn(3, 8, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="inplace_backward=True on a leaf tensor"):
        rk.token_logprobs(leaf, torch.randint(0, 8, (3,)), inplace_backward=True, backend=backend)


@pytest.mark.parametrize("rows,vocab,dtype", [
    (512, 262144, torch.bfloat16),   # few long rows: vocabulary splits
    (2048, 128256, torch.bfloat16),
    (257, 32003, torch.float32),     # odd V: unaligned rows, scalar paths
    (64, 262144, torch.float16),
    (3001, 1000, torch.bfloat16),    # short rows: one warp per row
])
def test_gpu_sizes(backend, rows, vocab, dtype):
    gpu_sizes_only()
    base = (torch.randn(rows + 1, vocab) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,))
    labels[::7] = -100
    for inplace in (False, True):
        check_against_truth(backend, lambda x: (base if x is None else x)[1:], labels, dtype, inplace_backward=inplace)


def test_gpu_sizes_strided_3d_temperature_and_masked(backend):
    gpu_sizes_only()
    base = torch.randn(4, 65, 50257).to(torch.bfloat16)
    base[:, :, :20000] = float("-inf")
    labels = torch.randint(20000, 50257, (4, 64))
    labels[0] = -100
    check_against_truth(backend, lambda x: (base if x is None else x)[:, :-1], labels, torch.bfloat16,
                        temperature=0.7)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gpu_sizes_extreme_logits(backend, temperature):
    """|logits| ~ 1e4: one ulp is ~1e-3, so x / t must be one correctly rounded division (the GPU's default '/' in
    Triton is a 2-ulp approximation, which the interpreter never shows)."""
    gpu_sizes_only()
    rows, vocab = 257, 32000
    logits = torch.where(torch.rand(rows, vocab) < 0.5, -1e4, 1e4) + torch.randn(rows, vocab)
    labels = torch.randint(0, vocab, (rows,))
    labels[::3] = logits[::3].argmax(-1)
    for inplace in (False, True):
        check_against_truth(backend, lambda x: logits if x is None else x, labels, torch.float32,
                            temperature=temperature, inplace_backward=inplace)
