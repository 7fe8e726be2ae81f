"""The fused-linear family (hidden states + lm_head weight) vs the float64 reference, on the compiled CPU path and
on the Triton kernels (interpreter on CPU)."""
import pytest
import torch
import torch.nn.functional as F

import rlhfv_kernels as rk
from conftest import gpu_sizes_only, skip_unless_backend_runs
from rlhfv_kernels import reference
from numerics import assert_meets_criterion, linear_accumulation_extra, rounded_logits_extra, tf32_linear_extra


@pytest.fixture
def backend(linear_backend):
    return linear_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run(fn, hidden, weight, bias, dtype, seed_grad, *, truth=False, **kwargs):
    """fn(hidden, weight, bias) on fresh leaves of `dtype` (truth=True: the same rounded values, held in float64);
    returns (value, dhidden, dweight, dbias)."""
    leaves = [t.detach().to(dtype).to(torch.float64 if truth else dtype).clone().requires_grad_(True)
              if t is not None else None for t in (hidden, weight, bias)]
    value = fn(*leaves, **kwargs)
    value = value if isinstance(value, torch.Tensor) else value.loss
    (value * seed_grad.to(value.dtype)).sum().backward()
    return [value.detach()] + [t.grad if t is not None else None for t in leaves]


def ours_tokens(h, w, b, labels, chunk_size, backend):
    return rk.linear_token_logprobs(h, w, labels, bias=b, chunk_size=chunk_size, backend=backend, temperature=0.9)


def eager_tokens(h, w, b, labels):
    return reference.token_logprobs(F.linear(h, w, b), labels, temperature=0.9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,hdim,vocab,chunk", [((37,), 19, 1003, 5), ((3, 11), 64, 257, 1),
                                                     ((2, 5), 33, 4001, None), ((4,), 8, 3, 100)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_token_logprobs_values_and_all_gradients(dtype, shape, hdim, vocab, chunk, with_bias, backend):
    hidden = torch.randn(*shape, hdim)
    weight = torch.randn(vocab, hdim) / hdim ** 0.5 * 3
    bias = torch.randn(vocab) if with_bias else None
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < 0.2] = -100
    seed = torch.randn(shape, dtype=torch.float64)
    ours = run(lambda h, w, b: ours_tokens(h, w, b, labels, chunk, backend), hidden, weight, bias, dtype, seed)
    same = run(lambda h, w, b: eager_tokens(h, w, b, labels), hidden, weight, bias, dtype, seed)
    truth = run(lambda h, w, b: eager_tokens(h, w, b, labels), hidden, weight, bias, dtype, seed, truth=True)
    extras = [0.0] * 4
    if dtype != torch.float32:
        rounded = [t.to(dtype) if t is not None else None for t in (hidden, weight, bias)]
        extras = rounded_logits_extra(*rounded, labels, seed, 0.9, dtype)
    for k, what in enumerate(("logp", "dhidden", "dweight", "dbias")):
        if ours[k] is None:
            continue
        assert ours[k].dtype == (torch.float32 if k == 0 else dtype)
        assert_meets_criterion(ours[k], same[k], truth[k], dtype, f"linear {what}", relative=k > 0, extra=extras[k])


@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_match_the_logits_path_reference(dtype, backend):
    pairs, seq, hdim, vocab = 3, 7, 24, 501
    hidden = torch.randn(2 * pairs, seq, hdim)
    weight = torch.randn(vocab, hdim) / hdim ** 0.5 * 2
    bias = torch.randn(vocab)
    labels = torch.randint(0, vocab, (2 * pairs, seq))
    labels[:, :2] = -100
    weights = torch.where(torch.rand(2 * pairs, seq) < 0.3, 5.0, 1.0)
    ref = torch.randn(2 * pairs) - 40
    kw = dict(token_weights=weights, beta=0.5, mode="mean", sft_weight=0.1)
    one = torch.ones((), dtype=torch.float64)
    ours = run(lambda h, w, b: rk.linear_ddpo_loss(h, w, labels, ref, bias=b, chunk_size=4, backend=backend, **kw),
               hidden, weight, bias, dtype, one)
    same = run(lambda h, w, b: reference.ddpo_loss(F.linear(h, w, b), labels, ref, **kw), hidden, weight, bias,
               dtype, one)
    truth = run(lambda h, w, b: reference.ddpo_loss(F.linear(h, w, b), labels, ref, **kw), hidden, weight, bias,
                dtype, one, truth=True)
    for k, what in enumerate(("loss", "dhidden", "dweight", "dbias")):
        assert_meets_criterion(ours[k], same[k], truth[k], dtype, f"linear ddpo {what}", relative=True)
    adv = torch.randn(2 * pairs)
    for fn, ref_fn in ((lambda h, w, b: rk.linear_grpo_loss(h, w, labels, adv, bias=b, loss_type="grpo",
                                                             backend=backend),
                        lambda h, w, b: reference.grpo_loss(F.linear(h, w, b), labels, adv, loss_type="grpo")),
                       (lambda h, w, b: rk.linear_sequence_logps(h, w, labels, weights, bias=b, backend=backend),
                        lambda h, w, b: reference.sequence_logps(F.linear(h, w, b), labels, weights)),
                       (lambda h, w, b: rk.linear_dpo_loss(h, w, labels, ref, bias=b, backend=backend),
                        lambda h, w, b: reference.dpo_loss(F.linear(h, w, b), labels, ref))):
        got = run(fn, hidden, weight, bias, dtype, one)  # a scalar seed broadcasts over per-sequence scores
        exp_same = run(ref_fn, hidden, weight, bias, dtype, one)
        exp_truth = run(ref_fn, hidden, weight, bias, dtype, one, truth=True)
        for k in range(4):
            assert_meets_criterion(got[k], exp_same[k], exp_truth[k], dtype, f"linear loss {k}", relative=True)


def test_triton_opcheck():
    skip_unless_backend_runs("triton")
    import rlhfv_kernels.triton  # noqa: F401
    hidden = torch.randn(2, 3, 16)
    weight = torch.randn(40, 16)
    labels = torch.tensor([[1, -100, 3], [39, 0, 5]])
    for b in (torch.randn(40), None):
        for softcap in (0.0, 3.0):
            torch.library.opcheck(torch.ops.rlhfv_triton.linear_logprob_fwd.default,
                                  (hidden, weight, b, labels, -100, 1.0, softcap, 2))


def test_float64_gradcheck_and_opcheck():
    hidden = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100, 3], [10, 0, 5]])
    assert torch.autograd.gradcheck(
        lambda h, w, b: rk.linear_token_logprobs(h, w, labels, bias=b, chunk_size=2, backend="cpp"),
        (hidden, weight, bias))
    for b in (bias, None):
        for softcap in (0.0, 3.0):
            torch.library.opcheck(torch.ops.rlhfv.linear_logprob_fwd.default,
                                  (hidden, weight, b, labels, -100, 1.0, softcap, 2))


def test_peak_memory_is_bounded_by_the_chunk():
    from benchmarks.harness import PeakMemory
    tokens, hdim, vocab, chunk = 2048, 64, 8000, 32
    hidden = torch.randn(tokens, hdim, requires_grad=True)
    weight = torch.randn(vocab, hdim, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    with PeakMemory(torch.device("cpu")) as mem:
        loss = rk.linear_token_logprobs(hidden, weight, labels, chunk_size=chunk, backend="cpp").sum()
        loss.backward()
    logits_bytes = tokens * vocab * 4
    chunk_bytes = chunk * vocab * 4
    weight_bytes = vocab * hdim * 4
    # One chunk of logits (+ its fp32 copy), the weight gradient and its accumulator, hidden-sized buffers.
    bound = 3 * chunk_bytes + 3 * weight_bytes + 4 * tokens * hdim * 4 + (1 << 20)
    assert mem.peak < bound < logits_bytes / 2, (mem.peak, bound, logits_bytes)


def test_bad_arguments():
    h, w, y = torch.randn(2, 3, 8), torch.randn(20, 8), torch.randint(0, 20, (2, 3))
    with pytest.raises(ValueError, match=r"weight must have shape \[V, H\] with H = hidden.shape\[-1\] = 8"):
        rk.linear_token_logprobs(h, torch.randn(20, 7), y)
    with pytest.raises(TypeError, match="weight dtype torch.float64 must equal hidden dtype torch.float32"):
        rk.linear_token_logprobs(h, w.double(), y)
    with pytest.raises(ValueError, match=r"bias must have shape \[20\]"):
        rk.linear_token_logprobs(h, w, y, bias=torch.randn(19))
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 20 is out of range \[0, 20\)"):
        rk.linear_token_logprobs(h, w, torch.tensor([[0, 1, 2], [3, 4, 20]]))
    with pytest.raises(ValueError, match=r"labels shape \(2, 2\) must equal hidden.shape\[:-1\]"):
        rk.linear_token_logprobs(h, w, y[:, :2])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        rk.linear_token_logprobs(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match=r"hidden must have shape \[2B, T, H\]"):
        rk.linear_ddpo_loss(h[0], w, y[0], torch.zeros(3))
    with pytest.raises(ValueError, match="hidden.shape\\[0\\] must be even"):
        rk.linear_ddpo_loss(torch.randn(3, 3, 8), w, torch.zeros(3, 3, dtype=torch.long), torch.zeros(3))
    with pytest.raises(rk.BackendUnavailableError, match="linear path has no .cuda. kernels"):
        rk._backend.resolve_backend("cuda", torch.device("cuda"), path="linear")
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        rk.linear_token_logprobs(h, w.to("meta"), y)


def test_empty_and_all_ignored(backend):
    w = torch.randn(9, 4, requires_grad=True)
    h = torch.randn(0, 4, requires_grad=True)
    out = rk.linear_token_logprobs(h, w, torch.zeros(0, dtype=torch.long), backend=backend)
    assert out.shape == (0,)
    h2 = torch.randn(3, 4, requires_grad=True)
    out = rk.linear_token_logprobs(h2, w, torch.full((3,), -100), backend=backend)
    out.sum().backward()
    assert torch.all(out == 0) and torch.all(h2.grad == 0) and torch.all(w.grad == 0)


def test_linear_benchmark_runs(tmp_path):
    import json
    from benchmarks import linear
    path = tmp_path / "l.json"
    assert linear.main(["--case", "64x16x300:float32", "--repeats", "1", "--device", "cpu", "--ignored", "0.25",
                        "--json", str(path)]) == 0
    records = json.loads(path.read_text())["records"]
    ours = {(r["op"], r["impl"]) for r in records if r["impl"] in ("reference", "fused")}
    assert ours == {(op, impl) for op in linear.OPS for impl in ("reference", "fused")}
    assert all(r["dweight_max_abs_err"] < 1e-4 for r in records if r["impl"] == "fused")
    assert all(r["gemm_floor_ms"] > 0 for r in records if "skipped" not in r)
    # Liger's fused-linear DPO is plain torch: the CPU peer of linear_dpo_loss, computing the same loss.
    liger = [r for r in records if r["impl"] == "liger"]
    assert [r["op"] for r in liger] == ["linear_dpo_loss"]
    assert "skipped" in liger[0] or liger[0]["dweight_max_abs_err"] < 1e-4, liger[0]
    # --check: the same run against itself is never worse; a recorded run whose fused rows were twice as fast is.
    assert linear.main(["--case", "64x16x300:float32", "--repeats", "1", "--device", "cpu", "--ignored", "0.25",
                        "--impls", "reference,fused", "--no-floor", "--check", str(path)]) in (0, 1)
    run = json.loads(path.read_text())
    assert linear.check_against(run, run, 0.3) == 0
    faster = json.loads(path.read_text())
    for r in faster["records"]:
        if r["impl"] == "fused":
            r["fwd_bwd_median_ms"] /= 2
    for r in run["records"]:
        r["suspect"] = []
    assert linear.check_against(run, faster, 0.3) == len(linear.OPS)


def test_ignored_tokens_are_not_multiplied(backend):
    """The recompute path gathers the non-ignored tokens before its GEMMs; values and gradients are unchanged."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):  # the fused forward op's hidden rows
        rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "linear_logprob_fwd":
                self.rows.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    hidden = torch.randn(3, 10, 16)[:, 1:]  # strided
    weight = torch.randn(50, 16)
    labels = torch.randint(0, 50, (3, 9))
    labels[:, :4] = -100
    h = hidden.clone().requires_grad_(True)
    with OpLog() as log:
        out = rk.linear_token_logprobs(h, weight, labels, backend=backend, temperature=0.9)
    assert log.rows == [int((labels != -100).sum())]
    seed = torch.randn(3, 9)
    (out * seed).sum().backward()
    leaf = hidden.clone().requires_grad_(True)
    expected = eager_tokens(leaf, weight, None, labels)
    (expected * seed).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, leaf.grad, rtol=1e-5, atol=1e-5)
    assert torch.all(out[:, :4] == 0) and torch.all(h.grad[:, :4] == 0)


@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "highest"), (torch.float16, "highest"),
                                             (torch.float32, "highest"), (torch.float32, "high")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gpu_sizes_fused_linear_kernels(backend, dtype, precision, with_bias):
    """Every operand mode of the fused-linear kernels (16-bit, fp32 in full precision, fp32 as TF32) at a size with
    many tiles per row and per vocabulary block, so that atomics from many programs meet. The bounds add the TF32
    rounding of the dots and the accumulation order (tests/numerics.py)."""
    gpu_sizes_only()
    rows, hdim, vocab = 1000, 256, 32003
    hidden = torch.randn(rows, hdim)
    weight = torch.randn(vocab, hdim) / hdim ** 0.5 * 3
    bias = torch.randn(vocab) if with_bias else None
    labels = torch.randint(0, vocab, (rows,))
    labels[::9] = -100
    seed = torch.randn(rows, dtype=torch.float64)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        ours = run(lambda h, w, b: ours_tokens(h, w, b, labels, None, backend), hidden, weight, bias, dtype, seed)
        same = run(lambda h, w, b: eager_tokens(h, w, b, labels), hidden, weight, bias, dtype, seed)
    finally:
        torch.set_float32_matmul_precision(before)
    truth = run(lambda h, w, b: eager_tokens(h, w, b, labels), hidden, weight, bias, dtype, seed, truth=True)
    rounded = [t.to(dtype) if t is not None else None for t in (hidden, weight, bias)]
    extras = linear_accumulation_extra(*rounded, labels, seed, 0.9)
    if dtype == torch.float32 and precision != "highest":
        extras = [a + b for a, b in zip(extras, tf32_linear_extra(*rounded, labels, seed, 0.9))]
    for k, what in enumerate(("logp", "dhidden", "dweight", "dbias")):
        if ours[k] is not None:
            assert_meets_criterion(ours[k], same[k], truth[k], dtype, f"linear {what} ({precision})",
                                   relative=k > 0, extra=extras[k])


def test_an_ambient_autocast_casts_the_head_inputs_like_f_linear(linear_backend):
    """Under torch.autocast the head's matmul runs in the autocast dtype, as F.linear would, on every backend (the
    C++ op's internal GEMMs used to be autocast unannounced); gradients reach the fp32 parameters in fp32."""
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(301, 16, requires_grad=True)
    labels = torch.randint(0, 301, (9,))
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        ours = rk.linear_token_logprobs(hidden, weight, labels, backend=linear_backend)
    expected = rk.linear_token_logprobs(hidden.detach().bfloat16(), weight.detach().bfloat16(), labels,
                                        backend=linear_backend)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    ours.sum().backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
