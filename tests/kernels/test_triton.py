"""Triton-specific checks: vocabulary splits, the op schemas, guards (GPU runs: the suites' *-cuda targets).

The shared correctness suite (tests/kernels/test_token_logprobs.py, tests/kernels/test_losses.py) already runs every
case on the Triton kernels under the interpreter.
"""
import pytest
import torch

from conftest import skip_unless_backend_runs

# These use CPU tensors, i.e. the interpreter (GPU runs: the kernel suites' *-cuda targets).
skip_unless_backend_runs("triton", module=True)

import rlhfv_kernels as rk  # noqa: E402
import rlhfv_kernels.triton  # noqa: E402,F401  (registers torch.ops.rlhfv_triton)
from rlhfv_kernels import _ops, reference  # noqa: E402
from rlhfv_kernels.triton import kernels  # noqa: E402
from numerics import assert_meets_criterion  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_schemas_match_the_compiled_operators():
    for name in _ops.SCHEMAS:
        compiled = str(getattr(torch.ops.rlhfv, name).default._schema).replace("rlhfv::", "")
        triton_op = str(getattr(torch.ops.rlhfv_triton, name).default._schema).replace("rlhfv_triton::", "")
        assert compiled == triton_op


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits,vocab", [(3, 1000), (5, 32003), (7, 7), (2, 50001)])
def test_split_vocabulary_matches_truth(dtype, num_splits, vocab):
    """Few long rows: the vocabulary of each row is spread over several programs and the partial LSEs merged."""
    base = torch.randn(3, 4, vocab) * 3
    base[0, 1, : vocab // 2] = float("-inf")  # a whole split of masked entries must not poison the merge
    labels = torch.randint(vocab // 2, vocab, (3, 4))
    labels[2, 0] = -100
    logits = base.to(dtype)[:, :-1]  # strided
    labels = labels[:, :-1]
    grad_logp = torch.randn(labels.shape)
    logp, lse = kernels.launch_forward(logits, labels, -100, 0.9, num_splits=num_splits)
    out = torch.empty(logits.shape, dtype=dtype)
    kernels.launch_backward(grad_logp, logits, labels, lse, -100, 0.9, out, num_splits=num_splits)

    def eager(x):
        leaf = x.detach().clone().requires_grad_(True)
        value = reference.token_logprobs(leaf, labels, temperature=0.9)
        (value * grad_logp.to(value.dtype)).sum().backward()
        return value.detach(), leaf.grad

    same, truth = eager(logits), eager(logits.double())
    assert_meets_criterion(logp, same[0], truth[0], dtype, "split logp")
    assert_meets_criterion(out, same[1], truth[1], dtype, "split dlogits")


def test_plan_splits_only_splits_when_rows_are_few():
    cpu = torch.device("cpu")
    assert kernels.plan_splits(4096, 262144, cpu) == (1, 262144)
    splits, size = kernels.plan_splits(4, 262144, cpu, num_splits=8)
    assert splits == 8 and splits * size >= 262144
    assert kernels.plan_splits(2, 5, cpu, num_splits=99)[0] == 5  # never more splits than vocabulary entries


def test_row_offsets_follow_any_layout():
    base = torch.randn(3, 5, 7, 11)
    for view in (base, base[:, :-1], base.transpose(0, 2), base[1:, ::2, 3:]):
        offsets = kernels.row_offsets(view)
        flat = base.reshape(-1)
        rows = view.reshape(-1, 11) if view.is_contiguous() else view.contiguous().reshape(-1, 11)
        for r in range(rows.shape[0]):
            start = view.storage_offset() - base.storage_offset() + int(offsets[r])
            assert torch.equal(flat[start:start + 11], rows[r])


def test_triton_ops_guard_their_inputs():
    logits = torch.randn(3, 7)
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.rlhfv_triton.logprob_fwd(logits, torch.tensor([0, 7, 1]), -100, 1.0, 0.0, False)
    with pytest.raises(TypeError, match="float64"):
        rk.token_logprobs(logits.double(), torch.tensor([0, 1, 2]), backend="triton")


def test_backend_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from rlhfv_kernels import _backend
    monkeypatch.setattr(kernels, "INTERPRETING", False)
    with pytest.raises(rk.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        rk.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), backend="triton")
    assert _backend.resolve_backend(None, torch.device("cpu")) == "cpp"


def test_an_interpreter_that_cannot_run_the_kernels_is_named(monkeypatch):
    """triton 3.6's interpreter beside NumPy >= 2.4 (the GPU machine's versions) cannot run a loop to a computed
    bound: the backend is then unavailable on CPU with that reason, never a TypeError from inside a kernel."""
    from rlhfv_kernels import _backend
    assert kernels._interpreter_problem() is None  # the probe itself, on this interpreter (this module runs here)
    monkeypatch.setattr(kernels, "INTERPRETER_PROBLEM", "triton 3.6.0's interpreter cannot run a loop")
    with pytest.raises(rk.BackendUnavailableError, match="triton 3.6.0's interpreter cannot run a loop"):
        rk.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), backend="triton")
    with pytest.raises(RuntimeError, match="triton 3.6.0's interpreter cannot run a loop"):
        torch.ops.rlhfv_triton.logprob_fwd(torch.randn(2, 5), torch.tensor([0, 1]), -100, 1.0, 0.0, False)
    assert _backend.resolve_backend(None, torch.device("cpu")) == "cpp"


def test_torch_compile_through_the_triton_ops():
    torch._dynamo.reset()
    logits = torch.randn(4, 6, 97)
    labels = torch.randint(0, 97, (4, 6))

    def loss(x):
        return rk.ddpo_loss(x, labels, torch.zeros(4), beta=0.5, backend="triton").loss

    eager_leaf = logits.clone().requires_grad_(True)
    loss(eager_leaf * 1).backward()
    compiled_leaf = logits.clone().requires_grad_(True)
    torch.compile(loss)(compiled_leaf * 1).backward()
    torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad, rtol=1e-6, atol=1e-7)


def test_vector_width_promises_alignment_only_when_it_holds():
    """VEC > 1 tells the compiler every row starts 16-byte aligned: a wrong promise is a misaligned-address fault on
    a GPU, which the interpreter would never show."""
    bf16 = torch.randn(2, 5, 32000).to(torch.bfloat16)
    assert kernels.vector_width(bf16) == 8
    assert kernels.vector_width(bf16[:, :-1]) == 8                      # strided rows, V a multiple of 8
    assert kernels.vector_width(torch.randn(4, 32000)) == 4             # fp32: 4 per 16 bytes
    assert kernels.vector_width(torch.randn(4, 32003).to(torch.bfloat16)) == 1      # odd V: rows misaligned
    assert kernels.vector_width(bf16.view(-1)[1:32001].view(1, 32000)) == 1        # base 2 bytes past alignment
    assert kernels.vector_width(torch.randn(3, 40, 32).to(torch.bfloat16)[:, ::3, :]) == 8   # row stride 96
    assert kernels.vector_width(torch.randn(3, 7, 32).to(torch.bfloat16)[:, :, :24]) == 8    # padded rows (32)
    assert kernels.vector_width(torch.randn(3, 36).to(torch.bfloat16)[:, :32]) == 1  # row stride 36: not 16 bytes
    assert kernels.vector_width(bf16, torch.empty(3, 32000, dtype=torch.bfloat16)[1:]) == 8
    splits, size = kernels.plan_splits(4, 40000, torch.device("cpu"), num_splits=3, multiple=8)
    assert size % 8 == 0 and splits * size >= 40000 and (splits - 1) * size < 40000
