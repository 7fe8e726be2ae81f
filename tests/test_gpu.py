"""GPU-only checks of both GPU backends (Triton and the CUDA C++ kernels), timing-free; they skip without CUDA.

Same float64 criterion as the CPU suite, at real sizes: V up to 262144, the warp-per-row and split-vocabulary shapes,
strided and ignored rows, in-place backward, every dtype, and the fused-linear kernels in every operand mode. The
bounds add what the CPU suite's interpreter cannot show (tests/numerics.py lists it): TF32 dots and the summation
order of tensor-core dots and atomics; approximate exp needs no term, and division is correctly rounded.
"""
import pytest
import torch

import rlhfv_kernels as rk
from rlhfv_kernels import _backend, reference
from numerics import (assert_meets_criterion, linear_accumulation_extra, tf32_linear_extra,
                      truth_token_logprobs)
from test_linear import eager_tokens, ours_tokens, run as run_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def available(backend):
    reason = _backend._why_unavailable(backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("rows,vocab,dtype", [
    (512, 262144, torch.bfloat16),   # few long rows: vocabulary splits
    (2048, 128256, torch.bfloat16),
    (257, 32003, torch.float32),     # odd V: unaligned rows, scalar paths
    (64, 262144, torch.float16),
    (3001, 1000, torch.bfloat16),    # short rows: one warp per row
    (5, 7, torch.float32),
])
def test_matches_truth(backend, rows, vocab, dtype):
    available(backend)
    base = (torch.randn(rows + 1, vocab, device="cuda") * 3).to(dtype)
    logits = base[1:]
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    labels[::7] = -100
    seed = torch.randn(rows, device="cuda", dtype=torch.float64)

    def run(fn, x, **kw):
        leaf = x.detach().clone().requires_grad_(True)
        value = fn(leaf * 1, labels, **kw)
        (value * seed.to(value.dtype)).sum().backward()
        return value.detach(), leaf.grad

    same = run(reference.token_logprobs, logits)
    truth = run(reference.token_logprobs, logits.double())
    for inplace in (False, True):
        got = run(rk.token_logprobs, logits, backend=backend, inplace_backward=inplace, temperature=1.0)
        assert_meets_criterion(got[0], same[0], truth[0], dtype, f"{backend} logp")
        assert_meets_criterion(got[1], same[1], truth[1], dtype, f"{backend} dlogits")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_strided_3d_temperature_and_masked(backend):
    available(backend)
    base = torch.randn(4, 65, 50257, device="cuda").to(torch.bfloat16)
    base[:, :, :20000] = float("-inf")
    logits = base[:, :-1]
    labels = torch.randint(20000, 50257, (4, 64), device="cuda")
    labels[0] = -100
    same = reference.token_logprobs(logits, labels, temperature=0.7)
    truth = truth_token_logprobs(logits.double(), labels, temperature=0.7)
    got = rk.token_logprobs(logits, labels, backend=backend, temperature=0.7)
    assert_meets_criterion(got, same, truth, torch.bfloat16, f"{backend} strided logp")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_extreme_logits_and_temperature(backend, temperature):
    """|logits| ~ 1e4: one ulp is ~1e-3, so x / t must be one correctly rounded division (the GPU's default '/' in
    Triton is a 2-ulp approximation, which the interpreter never shows)."""
    available(backend)
    rows, vocab = 257, 32000
    logits = torch.where(torch.rand(rows, vocab, device="cuda") < 0.5, -1e4, 1e4) + torch.randn(rows, vocab,
                                                                                                    device="cuda")
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    labels[::3] = logits[::3].argmax(-1)
    seed = torch.randn(rows, device="cuda", dtype=torch.float64)

    def run(fn, x, **kw):
        leaf = x.detach().clone().requires_grad_(True)
        value = fn(leaf * 1, labels, temperature=temperature, **kw)
        (value * seed.to(value.dtype)).sum().backward()
        return value.detach(), leaf.grad

    same, truth = run(reference.token_logprobs, logits), run(truth_token_logprobs, logits.double())
    for inplace in (False, True):
        got = run(rk.token_logprobs, logits, backend=backend, inplace_backward=inplace)
        assert_meets_criterion(got[0], same[0], truth[0], torch.float32, f"{backend} extreme logp")
        assert_meets_criterion(got[1], same[1], truth[1], torch.float32, f"{backend} extreme dlogits")


@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "highest"), (torch.float16, "highest"),
                                             (torch.float32, "highest"), (torch.float32, "high")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_kernels_on_gpu(dtype, precision, with_bias):
    """Every operand mode of the fused-linear Triton kernels (16-bit, fp32 in full precision, fp32 as TF32) at a size
    with many tiles per row and per vocabulary block, so that atomics from many programs meet."""
    available("triton")
    rows, hdim, vocab = 1000, 256, 32003
    hidden = torch.randn(rows, hdim, device="cuda")
    weight = torch.randn(vocab, hdim, device="cuda") / hdim ** 0.5 * 3
    bias = torch.randn(vocab, device="cuda") if with_bias else None
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    labels[::9] = -100
    seed = torch.randn(rows, device="cuda", dtype=torch.float64)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        ours = run_linear(lambda h, w, b: ours_tokens(h, w, b, labels, None, "triton"), hidden, weight, bias, dtype,
                          seed)
        same = run_linear(lambda h, w, b: eager_tokens(h, w, b, labels), hidden, weight, bias, dtype, seed)
    finally:
        torch.set_float32_matmul_precision(before)
    truth = run_linear(lambda h, w, b: eager_tokens(h, w, b, labels), hidden, weight, bias, dtype, seed, truth=True)
    rounded = [t.to(dtype) if t is not None else None for t in (hidden, weight, bias)]
    extras = linear_accumulation_extra(*rounded, labels, seed, 0.9)
    if dtype == torch.float32 and precision != "highest":
        extras = [a + b for a, b in zip(extras, tf32_linear_extra(*rounded, labels, seed, 0.9))]
    for k, what in enumerate(("logp", "dhidden", "dweight", "dbias")):
        if ours[k] is not None:
            assert_meets_criterion(ours[k], same[k], truth[k], dtype, f"linear {what} ({precision})",
                                   relative=k > 0, extra=extras[k])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["ddpo", "grpo"])
def test_gradients_in_forward_on_gpu(dtype, kind):
    """The losses' gradients-in-forward scheme on CUDA: cuBLAS GEMMs (dW accumulated in fp32 through
    torch.mm(out_dtype=fp32) for 16-bit operands), the Triton row kernels, several chunks of whole pairs."""
    available("triton")
    from test_linear_loss import check_against_reference, losses_of, make_batch
    torch.manual_seed(0)
    batch = {k: v.cuda() for k, v in make_batch(pairs=8, seq=300, hdim=256, vocab=32003).items()}
    ours, eager = losses_of(kind, batch)
    check_against_reference(lambda h, w, b: ours(h, w, b, chunk_size=1000, backend="triton"), eager, batch, dtype,
                            f"{kind} on GPU")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bad_labels_raise_before_launch(backend):
    available(backend)
    logits = torch.randn(4, 100, device="cuda")
    with pytest.raises((IndexError, ValueError), match="out of range"):
        rk.token_logprobs(logits, torch.tensor([0, 100, 1, 2], device="cuda"), backend=backend)
    torch.cuda.synchronize()  # no illegal memory access left behind


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_opcheck_on_gpu(backend):
    available(backend)
    ops = torch.ops.rlhfv_triton if backend == "triton" else torch.ops.rlhfv
    if backend == "triton":
        import rlhfv_kernels.triton  # noqa: F401
    x = torch.randn(3, 7, 300, device="cuda", dtype=torch.bfloat16)[:, :-1]
    labels = torch.randint(0, 300, (3, 6), device="cuda")
    torch.library.opcheck(ops.logprob_fwd.default, (x, labels, -100, 1.0, False))


def test_gpu_default_backend():
    assert _backend.resolve_backend(None, torch.device("cuda")) in ("triton", "cuda")
