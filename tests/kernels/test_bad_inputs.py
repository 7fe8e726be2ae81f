"""Every bad argument raises a Python exception that names it; nothing crashes or returns a silent wrong number."""
import pytest
import torch

import rlhfv_kernels as rk


def batch(pairs=2, seq=5, vocab=11):
    return torch.randn(2 * pairs, seq, vocab), torch.randint(0, vocab, (2 * pairs, seq))


@pytest.mark.parametrize("backend", ["cpp", "triton", "eager"])
@pytest.mark.parametrize("bad_label", [11, 12, -1, -99, 10**9])
def test_label_out_of_range_names_position_and_value(backend, bad_label):
    logits, labels = batch()
    labels[2, 3] = bad_label
    with pytest.raises(ValueError, match=rf"labels\[2, 3\] = {bad_label} is out of range \[0, 11\)"):
        rk.token_logprobs(logits, labels, backend=backend)
    with pytest.raises(ValueError, match=r"labels\[2, 3\]"):
        rk.ddpo_loss(logits, labels, torch.zeros(4), backend=backend)


def test_kernel_itself_refuses_out_of_range_labels():
    """The compiled op guards memory on its own (e.g. under torch.compile, where Python skips data checks)."""
    logits = torch.randn(3, 7)
    for op_args in [(logits, torch.tensor([0, 7, 1]), -100, 1.0, 0.0, False),
                    (logits, torch.tensor([0, -5, 1]), -100, 1.0, 0.0, False)]:
        with pytest.raises(IndexError, match="out of range"):
            torch.ops.rlhfv.logprob_fwd(*op_args)
    _, lse = torch.ops.rlhfv.logprob_fwd(logits, torch.tensor([0, 1, 2]), -100, 1.0, 0.0, False)
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.rlhfv.logprob_bwd(torch.ones(3), logits, torch.tensor([0, 9, 2]), lse, -100, 1.0, 0.0)


def test_shape_dtype_device_mismatches():
    logits, labels = batch()
    with pytest.raises(ValueError, match=r"labels shape \(4, 4\) must equal logits.shape\[:-1\] = \(4, 5\)"):
        rk.token_logprobs(logits, labels[:, :4])
    with pytest.raises(TypeError, match="labels must be int64 or int32, got torch.float32"):
        rk.token_logprobs(logits, labels.float())
    with pytest.raises(TypeError, match="logits must be float32, bfloat16, float16 or float64, got torch.int64"):
        rk.token_logprobs(labels, labels)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        rk.token_logprobs(logits.tolist(), labels)
    with pytest.raises(ValueError, match="labels is on meta but logits is on cpu"):
        rk.token_logprobs(logits, labels.to("meta"))
    with pytest.raises(ValueError, match="token_weights is on meta"):
        rk.sequence_logps(logits, labels, torch.ones(labels.shape, device="meta"))
    with pytest.raises(ValueError, match="token_weights shape"):
        rk.sequence_logps(logits, labels, torch.ones(4, 4))
    with pytest.raises(TypeError, match="token_weights must be a floating-point tensor"):
        rk.sequence_logps(logits, labels, torch.ones(labels.shape, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must have at least 2 dimensions"):
        rk.sequence_logps(logits[0, 0], labels[0, 0])


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    logits, labels = batch()
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        rk.token_logprobs(logits, labels, temperature=temperature)


@pytest.mark.parametrize("softcap,logit_scale,message", [
    (0.0, 1.0, "softcap must be None"), (-30.0, 1.0, "softcap must be None"), (float("nan"), 1.0, "softcap must be"),
    (float("inf"), 1.0, "softcap must be"), ("30", 1.0, "softcap must be"), (True, 1.0, "softcap must be"),
    (None, 0.0, "logit_scale must be a finite number > 0"), (None, -0.5, "logit_scale must be"),
    (30.0, float("inf"), "logit_scale must be"), (None, None, "logit_scale must be")])
def test_bad_logit_transform_is_refused_by_every_path(softcap, logit_scale, message):
    logits, labels = batch()
    hidden, weight = torch.randn(*labels.shape, 8), torch.randn(logits.shape[-1], 8)
    transform = dict(softcap=softcap, logit_scale=logit_scale)
    calls = [lambda: rk.token_logprobs(logits, labels, **transform),
             lambda: rk.ddpo_loss(logits, labels, torch.zeros(labels.shape[0]), **transform),
             lambda: rk.grpo_loss(logits, labels, torch.zeros(labels.shape[0]), **transform),
             lambda: rk.linear_token_logprobs(hidden, weight, labels, **transform),
             lambda: rk.linear_dpo_loss(hidden, weight, labels, torch.zeros(labels.shape[0]), **transform)]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()


def test_kernel_itself_refuses_bad_temperature_and_softcap():
    logits, labels = batch()
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        torch.ops.rlhfv.logprob_fwd(logits, labels, -100, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="softcap must be finite and >= 0"):
        torch.ops.rlhfv.logprob_fwd(logits, labels, -100, 1.0, -1.0, False)
    with pytest.raises(RuntimeError, match="softcap must be finite and >= 0"):
        torch.ops.rlhfv.linear_logprob_fwd(logits, torch.randn(5, logits.shape[-1]), None, labels.clamp(max=4), -100,
                                           1.0, float("inf"), 4)


def test_ddpo_argument_errors():
    logits, labels = batch(pairs=2)
    ref = torch.zeros(4)
    with pytest.raises(ValueError, match=r"ref_logps must have shape \[4\], got \(3,\)"):
        rk.ddpo_loss(logits, labels, torch.zeros(3))
    with pytest.raises(ValueError, match="logits.shape\\[0\\] must be even"):
        rk.ddpo_loss(logits[:3], labels[:3], torch.zeros(3))
    with pytest.raises(ValueError, match="logits must have shape \\[2B, T, V\\]"):
        rk.ddpo_loss(logits[0], labels[0], ref)
    weights = torch.ones(labels.shape)
    weights[1, 2] = -0.5
    with pytest.raises(ValueError, match=r"token_weights\[1, 2\] = -0.5; weights must be finite and >= 0"):
        rk.ddpo_loss(logits, labels, ref, token_weights=weights)
    weights[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"token_weights\[1, 2\] = nan"):
        rk.ddpo_loss(logits, labels, ref, token_weights=weights)
    with pytest.raises(ValueError, match=r"reward_margin must have shape \[2\]"):
        rk.ddpo_loss(logits, labels, ref, reward_margin=torch.ones(4), drs_weight=1.0)
    with pytest.raises(ValueError, match=r"reward_margin\[1\] = -1.0; values must be >= 0"):
        rk.ddpo_loss(logits, labels, ref, reward_margin=torch.tensor([0.5, -1.0]), drs_weight=1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        rk.ddpo_loss(logits, labels, ref, mode="avg")
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        rk.ddpo_loss(logits, labels, ref, beta=0.0)
    with pytest.raises(ValueError, match="sft_weight must be a finite number >= 0"):
        rk.ddpo_loss(logits, labels, ref, sft_weight=-1.0)
    with pytest.raises(ValueError, match="ref_logps is on meta"):
        rk.ddpo_loss(logits, labels, torch.zeros(4, device="meta"))


def test_grpo_argument_errors():
    logits, labels = batch()
    adv = torch.zeros(4)
    with pytest.raises(ValueError, match=r"advantages must have shape \[4\]"):
        rk.grpo_loss(logits, labels, torch.zeros(3))
    with pytest.raises(ValueError, match="ref_logps is required when beta_kl > 0"):
        rk.grpo_loss(logits, labels, adv, beta_kl=0.1)
    with pytest.raises(ValueError, match="old_logps shape"):
        rk.grpo_loss(logits, labels, adv, old_logps=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="loss_type must be one of"):
        rk.grpo_loss(logits, labels, adv, loss_type="ppo")
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        rk.grpo_loss(logits, labels, adv, epsilon=-0.1)


def test_vocab_stride_must_be_one_for_fused_kernels():
    logits = torch.randn(11, 6).t()  # [6, 11] with stride (1, 6) along V
    labels = torch.randint(0, 11, (6,))
    with pytest.raises(ValueError, match="stride 1 along the vocabulary .* got stride 6"):
        rk.token_logprobs(logits, labels, backend="cpp")
    # The eager backend handles any layout, so it is the explicit way out.
    assert rk.token_logprobs(logits, labels, backend="eager").shape == (6,)


def test_backend_selection_errors(monkeypatch):
    logits, labels = batch()
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.token_logprobs(logits, labels, backend="cuda-magic")
    with pytest.raises(rk.BackendUnavailableError, match="backend 'cpp' cannot run on meta"):
        rk.token_logprobs(logits.to("meta"), labels.to("meta"), backend="cpp")
    monkeypatch.setenv("RLHFV_BACKEND", "nope")
    with pytest.raises(ValueError, match="RLHFV_BACKEND must be one of"):
        rk.token_logprobs(logits, labels)
    monkeypatch.setenv("RLHFV_BACKEND", "eager")
    assert rk.token_logprobs(logits, labels).shape == labels.shape
    with pytest.raises(ValueError, match="always run eagerly"):
        rk.reference.ddpo_loss(logits, labels, torch.zeros(4), backend="cpp")


def test_the_old_name_of_the_eager_backend_still_works_with_a_warning(monkeypatch):
    logits, labels = batch()
    with pytest.warns(FutureWarning, match="backend='reference' is now 'eager'"):
        old = rk.token_logprobs(logits, labels, backend="reference")
    torch.testing.assert_close(old, rk.token_logprobs(logits, labels, backend="eager"), rtol=0, atol=0)
    monkeypatch.setenv("RLHFV_BACKEND", "reference")
    with pytest.warns(FutureWarning, match="RLHFV_BACKEND='reference' is now 'eager'"):
        rk.ddpo_loss(logits, labels, torch.zeros(4))
    assert "eager" in rk.BACKENDS and "reference" not in rk.BACKENDS


def test_bad_labels_raise_before_any_kernel_runs(backend):
    """On every (backend, device) target: a clear error and no illegal memory access left behind on a GPU."""
    logits = torch.randn(4, 100)
    with pytest.raises((IndexError, ValueError), match="out of range"):
        rk.token_logprobs(logits, torch.tensor([0, 100, 1, 2]), backend=backend)
    if logits.is_cuda:
        torch.cuda.synchronize()


def test_operators_refuse_a_strided_1d_row(backend):
    """The kernels read a row as V contiguous values, a 1-D logits tensor too: the operators themselves refuse a
    strided one (they used to exempt 1-D inputs from the stride check and read the wrong values)."""
    from rlhfv_kernels import _backend
    ops = _backend.operators(backend)
    row = torch.randn(2 * 37)[::2]
    with pytest.raises((RuntimeError, ValueError), match="stride"):
        ops.logprob_fwd(row, torch.tensor(3), -100, 1.0, 0.0, False)


def test_the_triton_label_range_is_checked_once_per_step(monkeypatch):
    """Validation contract: the API checks the labels (friendly message) and the operator's forward guards the kernel;
    the backward trusts its forward (on a GPU each check is a host sync)."""
    from conftest import skip_unless_backend_runs
    skip_unless_backend_runs("triton")
    from rlhfv_kernels.triton import ops as triton_ops
    from rlhfv_kernels import _checks
    calls = []

    def counted(name, real):
        def check(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return check

    for module, name in ((triton_ops, "_check_labels"), (_checks, "check_labels")):
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    logits = torch.randn(6, 50, requires_grad=True)
    labels = torch.randint(0, 50, (6,))
    for inplace in (False, True):
        calls.clear()
        rk.token_logprobs(logits * 1, labels, backend="triton", inplace_backward=inplace).sum().backward()
        assert sorted(calls) == ["_check_labels", "check_labels"], calls
