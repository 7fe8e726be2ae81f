"""The edges of the kernel API where a wrong number could pass silently: the in-place backward beside other readers of
the logits, the argument checks under torch.compile, NaN inputs, and the small values that used to slip through."""
import subprocess
import sys
import textwrap

import pytest
import torch

import rlhfv_kernels as rk
from rlhfv_kernels import _backend

from conftest import skip_unless_backend_runs

STALE = "modified by an inplace operation"


def pairs_batch(vocab=13, pairs=2, seq=5):
    logits = torch.randn(2 * pairs, seq, vocab)
    labels = torch.randint(0, vocab, (2 * pairs, seq))
    labels[0, :2] = -100
    return logits, labels, torch.randn(2 * pairs)


def model_logits(base):
    return base * 1.0  # what a model hands over: a non-leaf output


@pytest.mark.parametrize("with_entropy", [False, True])
def test_inplace_backward_beside_a_z_loss_on_the_same_logits_raises(backend, with_entropy):
    """A z-loss saved the logits for its own backward; ours runs first and overwrites them with the gradient. Autograd
    must see that (version counter), not hand the z-loss the gradient as if it were the logits."""
    base, labels, _ = pairs_batch()
    base.requires_grad_(True)
    logits = model_logits(base)
    z_loss = torch.logsumexp(logits, -1).pow(2).mean()
    logp = rk.token_logprobs(logits, labels, inplace_backward=True, backend=backend, return_entropy=with_entropy)
    loss = sum(t.sum() for t in logp) if with_entropy else logp.sum()
    with pytest.raises(RuntimeError, match=STALE):
        (loss + 1e-2 * z_loss).backward()


def test_inplace_backward_twice_with_retain_graph_raises(backend):
    base, labels, ref = pairs_batch()
    base.requires_grad_(True)
    loss = rk.ddpo_loss(model_logits(base), labels, ref, inplace_backward=True, backend=backend).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=STALE):
        loss.backward()


def test_inplace_backward_alone_equals_the_out_of_place_gradient(backend):
    """The version bump must not break the normal case: the same gradient as inplace_backward=False."""
    base, labels, ref = pairs_batch()
    grads = []
    for inplace in (False, True):
        leaf = base.clone().requires_grad_(True)
        rk.ddpo_loss(model_logits(leaf), labels, ref, inplace_backward=inplace, backend=backend).loss.backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_inplace_backward_refuses_logits_whose_rows_share_memory(backend):
    base, labels, ref = pairs_batch()
    row = base[:1].clone().requires_grad_(True)
    expanded = model_logits(row).expand_as(base)
    with pytest.raises(ValueError, match=r"inplace_backward=True .*strides \(0, 13, 1\)\) share memory"):
        rk.ddpo_loss(expanded, labels, ref, inplace_backward=True, backend=backend)
    # out of place the same view is fine (nothing is written into it), and strided views that do not overlap are too
    rk.ddpo_loss(expanded, labels, ref, backend=backend).loss.backward()
    wide = torch.randn(4, 6, 13, requires_grad=True)
    rk.token_logprobs(model_logits(wide)[:, :-1], labels, inplace_backward=True, backend=backend).sum().backward()


@pytest.mark.parametrize("backend_name", ["cpp", "eager", "triton"])
def test_value_checks_hold_under_torch_compile(backend_name):
    """Under torch.compile the data checks run inside the graph (rlhfv_checks::checked): the same errors as eager."""
    skip_unless_backend_runs(backend_name)
    logits, labels, ref = pairs_batch()
    logits.requires_grad_(True)

    def loss(logits, labels, weights, margin):
        return rk.ddpo_loss(logits, labels, ref, token_weights=weights, reward_margin=margin, drs_weight=1.0,
                            backend=backend_name).loss

    compiled = torch.compile(loss, fullgraph=True)
    weights, margin = torch.ones(labels.shape), torch.ones(2)
    torch.testing.assert_close(compiled(logits, labels, weights, margin), loss(logits, labels, weights, margin))
    weights[0, 0] = float("nan")  # an ignored token: not read, so accepted
    torch.testing.assert_close(compiled(logits, labels, weights, margin), loss(logits, labels, weights, margin))
    bad_weights = torch.ones(labels.shape)
    bad_weights[1, 3] = -0.5
    with pytest.raises(ValueError, match=r"token_weights\[1, 3\] = -0.5; weights must be finite and >= 0"):
        compiled(logits, labels, bad_weights, margin)
    bad_weights[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"token_weights\[1, 3\] = nan"):
        compiled(logits, labels, bad_weights, margin)
    with pytest.raises(ValueError, match=r"reward_margin\[1\] = nan; values must be >= 0"):
        compiled(logits, labels, weights, torch.tensor([1.0, float("nan")]))
    bad_labels = labels.clone()
    bad_labels[2, 1] = 13
    with pytest.raises(ValueError, match=r"labels\[2, 1\] = 13 is out of range \[0, 13\)"):
        compiled(logits, bad_labels, weights, margin)


def test_fullgraph_compile_works_on_a_process_first_call():
    """A fresh process whose first rlhfv call is inside torch.compile(fullgraph=True) (it used to meet a lazy
    importlib.import_module, which dynamo refuses to trace), then each other backend's first call, the Triton
    family's first use included (one process: a process start costs seconds)."""
    backends = [b for b in ("cpp", "triton", "eager") if _backend.why_unavailable(b, torch.device("cpu")) is None]
    script = textwrap.dedent(f"""
        import torch
        import rlhfv_kernels as rk
        logits = torch.randn(4, 5, 11, requires_grad=True)
        labels, ref = torch.randint(0, 11, (4, 5)), torch.randn(4)
        for backend in {backends!r}:
            step = torch.compile(lambda x: rk.ddpo_loss(x, labels, ref, backend=backend).loss, fullgraph=True)
            logits.grad = None
            step(logits).backward()
            torch.testing.assert_close(step(logits), rk.ddpo_loss(logits, labels, ref, backend=backend).loss)
            assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
            print("ok", backend)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [w for b in backends for w in ("ok", b)], done.stdout


@pytest.mark.parametrize("temperature", [1e-45, 1e-7])
def test_a_temperature_below_the_float32_floor_is_refused(temperature):
    logits, labels, ref = pairs_batch()
    with pytest.raises(ValueError, match="temperature must be >= 1e-06"):
        rk.token_logprobs(logits, labels, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be >= 1e-06"):
        rk.linear_token_logprobs(torch.randn(4, 5, 3), torch.randn(13, 3), labels, temperature=temperature)
    logp = rk.token_logprobs(logits.double(), labels, temperature=1e-6, backend="eager")
    assert bool(torch.isfinite(logp).all())


def test_an_ignore_index_outside_int64_is_refused():
    logits, labels, _ = pairs_batch()
    for ignore_index in (2**63, -2**63 - 1):
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            rk.token_logprobs(logits, labels, ignore_index=ignore_index)


def test_nan_token_weights_at_ignored_tokens_are_not_read(backend):
    logits, labels, ref = pairs_batch()
    weights = torch.rand(labels.shape) + 0.5
    clean = weights.clone()
    clean[labels == -100] = 0.0
    weights[labels == -100] = float("nan")
    results = []
    for w in (weights, clean):
        leaf = logits.clone().requires_grad_(True)
        out = rk.ddpo_loss(leaf, labels, ref, token_weights=w, backend=backend)
        out.loss.backward()
        results.append((out.loss, leaf.grad))
    torch.testing.assert_close(results[0], results[1])
    assert bool(torch.isfinite(results[0][1]).all())


def test_sequence_scores_of_zero_length_rows_are_zero(backend):
    logits, labels = torch.randn(3, 0, 7), torch.zeros(3, 0, dtype=torch.long)
    torch.testing.assert_close(rk.sequence_logps(logits, labels, backend=backend), torch.zeros(3))
    hidden, weight = torch.randn(3, 0, 4), torch.randn(7, 4)
    torch.testing.assert_close(rk.linear_sequence_logps(hidden, weight, labels), torch.zeros(3))


def nan_pattern(values):
    return [t.isnan() for t in (values if isinstance(values, tuple) else (values,))]


def test_a_nan_in_a_row_of_logits_makes_that_token_nan_and_no_other(backend):
    """The documented NaN contract (docs/api.md): a NaN among a token's logits makes its log-prob and entropy NaN
    (0 if the token is ignored); other tokens keep their values; the eager reference agrees."""
    logits, labels, _ = pairs_batch()
    logits[0, 0, 3] = float("nan")        # an ignored token
    logits[1, 2, 5] = float("nan")        # a NaN away from the label
    logits[2, 1, labels[2, 1]] = float("nan")  # the label's own logit
    fused = rk.token_logprobs(logits, labels, backend=backend, return_entropy=True)
    eager = rk.token_logprobs(logits, labels, backend="eager", return_entropy=True)
    expected = torch.zeros(labels.shape, dtype=torch.bool)
    expected[1, 2] = expected[2, 1] = True
    for f, e in zip(fused, eager):
        assert torch.equal(f.isnan().cpu(), expected) and torch.equal(e.isnan().cpu(), expected)
        torch.testing.assert_close(f[~expected], e[~expected], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["bias", "weight"])
def test_a_nan_in_the_head_makes_every_token_nan(linear_backend, where):
    """A NaN in one bias entry or one weight row is in every token's logits: every non-ignored token is NaN, on every
    backend as in the eager reference, and so is a loss over them."""
    hidden, weight, bias = torch.randn(4, 5, 6), torch.randn(13, 6), torch.randn(13)
    _, labels, ref = pairs_batch()
    (bias if where == "bias" else weight)[7, ...] = float("nan")
    fused = rk.linear_token_logprobs(hidden, weight, labels, bias=bias, backend=linear_backend, return_entropy=True)
    eager = rk.linear_token_logprobs(hidden, weight, labels, bias=bias, backend="eager", return_entropy=True)
    for f, e in zip(fused, eager):
        assert torch.equal(f.isnan().cpu(), (labels != -100).cpu()) and torch.equal(f.isnan(), e.isnan())
    assert bool(rk.linear_ddpo_loss(hidden, weight, labels, ref, bias=bias, backend=linear_backend).loss.isnan())


def test_nan_logits_give_nan_gradients_where_eager_does_except_at_ignored_tokens(backend):
    """The gradient side of the NaN contract: NaN exactly where the eager reference has it — the rows of a pair whose
    loss is NaN — except at ignored tokens, whose gradient the fused kernels leave at exactly 0 (eager's
    log_softmax backward spreads a NaN row's NaN there even though nothing reads that token)."""
    logits, labels, ref = pairs_batch()
    logits[0, 0, 3] = float("nan")  # an ignored token of pair 0
    logits[1, 2, 5] = float("nan")  # pair 1's chosen row
    grads = {}
    for which in ("eager", backend):
        for inplace in (False, True):
            leaf = logits.clone().requires_grad_(True)
            rk.ddpo_loss(model_logits(leaf), labels, ref, inplace_backward=inplace, backend=which).loss.backward()
            grads[which, inplace] = leaf.grad.isnan().any(-1).cpu()
    ignored = (labels == -100).cpu()
    for inplace in (False, True):
        assert torch.equal(grads[backend, inplace], grads["eager", False] & ~ignored)
    assert bool(grads["eager", False][0, 0]) and bool(grads[backend, False][1].all())


def test_cu_seqlens_given_as_a_list_are_checked_under_torch_compile():
    logits, labels = torch.randn(1, 8, 11), torch.randint(0, 11, (1, 8))
    compiled = torch.compile(lambda x, cu: rk.sequence_logps(x, labels, cu_seqlens=cu, backend="cpp"), fullgraph=True)
    torch.testing.assert_close(compiled(logits, [0, 3, 8]), rk.sequence_logps(logits, labels, cu_seqlens=[0, 3, 8]))
    with pytest.raises(Exception, match="cu_seqlens must not decrease"):
        compiled(logits, [0, 5, 3, 8])


@pytest.mark.parametrize("bad, message", [([0, 5, 3, 8], r"cu_seqlens must not decrease, got cu_seqlens\[1\] = 5"),
                                          ([0, 3, 7], r"cu_seqlens must start at 0 and end at the number of tokens "
                                                      r"\(8\), got 0 ... 7"),
                                          ([1, 3, 8], "must start at 0")])
def test_cu_seqlens_tensors_are_checked_under_torch_compile(bad, message):
    """A tensor's values are not read while tracing: the opaque check op reads them when the graph runs (issue 42:
    compile returned a loss for these)."""
    logits, labels = torch.randn(1, 8, 11), torch.randint(0, 11, (1, 8))
    compiled = torch.compile(lambda x, cu: rk.sequence_logps(x, labels, cu_seqlens=cu, max_seqlen=8,
                                                             backend="cpp"), fullgraph=True)
    good = torch.tensor([0, 3, 8])
    torch.testing.assert_close(compiled(logits, good), rk.sequence_logps(logits, labels, cu_seqlens=[0, 3, 8]))
    with pytest.raises(ValueError, match=message):
        rk.sequence_logps(logits, labels, cu_seqlens=torch.tensor(bad), max_seqlen=8)  # eager: the same error
    with pytest.raises(Exception, match=message):
        compiled(logits, torch.tensor(bad))


def test_pairs_are_checked_under_torch_compile():
    logits, labels = torch.randn(1, 8, 11), torch.randint(0, 11, (1, 8))
    ref = torch.zeros(4)
    compiled = torch.compile(lambda x, pairs: rk.ddpo_loss(x, labels, ref, cu_seqlens=[0, 2, 4, 6, 8], max_seqlen=2,
                                                           pairs=pairs, backend="cpp").loss, fullgraph=True)
    good = torch.tensor([[0, 1], [2, 3]])
    torch.testing.assert_close(compiled(logits, good), rk.ddpo_loss(logits, labels, ref, cu_seqlens=[0, 2, 4, 6, 8],
                                                                    pairs=good).loss)
    with pytest.raises(Exception, match="pairs names sequence 1 2 times"):
        compiled(logits, torch.tensor([[0, 1], [1, 3]]))
