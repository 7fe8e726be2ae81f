"""Backend choice and torch.compile through the custom ops."""
import torch
import pytest

import rlhfv_kernels as rk
from rlhfv_kernels import _backend


def test_default_backend_on_cpu_is_the_compiled_extension():
    assert rk.extension_available()
    assert _backend.resolve_backend(None, torch.device("cpu")) == "cpp"


def test_default_uses_the_fused_op(monkeypatch):
    calls = []
    real = torch.ops.rlhfv.logprob_fwd

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(torch.ops.rlhfv, "logprob_fwd", Spy(), raising=False)
    rk.token_logprobs(torch.randn(3, 10), torch.randint(0, 10, (3,)))
    assert len(calls) == 1


def test_torch_compile_ddpo_matches_eager():
    torch._dynamo.reset()
    logits = torch.randn(4, 6, 97)
    labels = torch.randint(0, 97, (4, 6))
    labels[:, :2] = -100
    ref = torch.randn(4)
    weights = torch.where(torch.rand(4, 6) < 0.3, 5.0, 1.0)

    def step(x, inplace):
        out = rk.ddpo_loss(x, labels, ref, token_weights=weights, beta=0.5, inplace_backward=inplace)
        return out.loss

    results = []
    for fn, inplace in [(step, False), (torch.compile(step), False), (torch.compile(step), True)]:
        leaf = logits.clone().requires_grad_(True)
        loss = fn(leaf * 1.0, inplace)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-7)


def test_torch_compile_fullgraph_token_logprobs():
    torch._dynamo.reset()
    logits = torch.randn(2, 5, 33)
    labels = torch.randint(0, 33, (2, 5))
    compiled = torch.compile(lambda x: rk.token_logprobs(x, labels, backend="cpp"), fullgraph=True)
    torch.testing.assert_close(compiled(logits), rk.token_logprobs(logits, labels, backend="cpp"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_default_backend():
    assert _backend.resolve_backend(None, torch.device("cuda")) in _backend.CUDA_DEFAULT
