"""Values at ignored tokens are never read (issue 42, item 6): every per-token input of every loss (GRPO's old and
reference log-probs, the advantage of a row with no loss token, DDPO's and the sequence scores' token weights) may hold
+-inf, NaN or a real padding's log-prob of -1000 at a token whose label is ignore_index, and the loss and its
gradients are exactly those with zeros there, on every backend target, the fused-linear path, packed sequences and the
eager reference. (exp(0 - old) overflows to inf below old = -88.7, and inf * 0 is NaN: found by a peer's GRPO suite.)
"""
import pytest
import torch
import torch.nn.functional as F

import rlhfv_kernels as rk
from rlhfv_kernels import reference

POISONS = [float("inf"), float("-inf"), float("nan"), -1000.0]
ROWS, WIDTH, VOCAB, HIDDEN = 4, 9, 37, 16


def batch():
    labels = torch.randint(0, VOCAB, (ROWS, WIDTH))
    labels[:, :3] = -100     # prompt tokens
    labels[0] = -100         # a row with no loss token at all
    labels[2, -2:] = -100    # padding
    active = labels != -100
    per_token = lambda: torch.where(active, -torch.rand(ROWS, WIDTH) * 5, 0.0)  # noqa: E731
    return dict(labels=labels, active=active, old=per_token(), ref=per_token(), weights=torch.rand(ROWS, WIDTH) * 3,
                advantages=torch.randn(ROWS), ref_scores=-torch.rand(ROWS) * 10)


def poisoned(b, value):
    """The batch with `value` wherever the label is ignored (and as the advantage of the row with no loss token)."""
    out = dict(b)
    for name in ("old", "ref", "weights"):
        out[name] = torch.where(b["active"], b[name], value)
    out["advantages"] = b["advantages"].clone()
    out["advantages"][0] = value
    return out


def losses(b):
    """(name, f(scores_from, x) -> scalar loss) for every loss with a per-token input; scores_from(fn_name) is the
    path's function (logits, fused-linear, packed, reference)."""
    y = b["labels"]
    cases = []
    for loss_type in rk.GRPO_LOSS_TYPES:
        bias_correction = loss_type == "dapo"  # TRL's default option beside its default type
        cases.append((f"grpo-{loss_type}", lambda fn, x, lt=loss_type, bc=bias_correction: fn("grpo_loss")(
            x, y, b["advantages"], old_logps=b["old"], ref_logps=b["ref"], beta_kl=0.04, loss_type=lt,
            use_bias_correction_kl=bc).loss))
    cases.append(("ddpo", lambda fn, x: fn("ddpo_loss")(x, y, b["ref_scores"], token_weights=b["weights"], beta=0.5,
                                                        mode="mean", sft_weight=0.1).loss))
    cases.append(("sequence", lambda fn, x: fn("sequence_logps")(x, y, b["weights"], mode="mean").sum()))
    return cases


def same_with_poison(path_fn, make_input):
    """For every loss: the clean batch's loss and gradient, then each poison's, which must be exactly equal."""
    clean = batch()
    cases = [(value, losses(poisoned(clean, value))) for value in POISONS]
    for k, (name, clean_loss) in enumerate(losses(clean)):
        def run(case):
            x = make_input()
            loss = case(path_fn, x)
            loss.backward()
            return loss.detach(), x.grad
        loss_a, grad_a = run(clean_loss)
        for value, dirty in cases:
            loss_b, grad_b = run(dirty[k][1])
            assert torch.isfinite(loss_b) and torch.isfinite(grad_b).all(), (name, value, loss_b)
            assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b), (name, value)


def logits_input():
    torch.manual_seed(1234)
    return torch.randn(ROWS, WIDTH, VOCAB, requires_grad=True)


def test_logits_path(backend):
    same_with_poison(lambda name: lambda *a, **k: getattr(rk, name)(*a, backend=backend, **k), logits_input)


def test_reference():
    same_with_poison(lambda name: getattr(reference, name), logits_input)


def test_fused_linear_path(linear_backend):
    torch.manual_seed(99)
    weight = torch.randn(VOCAB, HIDDEN)

    def hidden():
        torch.manual_seed(4321)
        return torch.randn(ROWS, WIDTH, HIDDEN, requires_grad=True)

    same_with_poison(lambda name: lambda h, *a, **k: getattr(rk, f"linear_{name}")(h, weight, *a,
                                                                                  backend=linear_backend, **k),
                     hidden)


def test_packed_sequences():
    """The same rows as one packed stream of 4 sequences (cu_seqlens): the per-token inputs in the stream's shape.
    (The stream-to-rows layout is the loss modules' Python, the same for every backend: the compiled CPU kernels
    stand for all.)"""
    cu_seqlens = [0, WIDTH, 2 * WIDTH, 3 * WIDTH, 4 * WIDTH]

    def flat(value):
        return value.reshape(1, -1) if isinstance(value, torch.Tensor) and value.shape == (ROWS, WIDTH) else value

    def packed(name):
        def call(x, y, *args, **kwargs):
            return getattr(rk, name)(x.reshape(1, -1, VOCAB), y.reshape(1, -1), *map(flat, args),
                                     cu_seqlens=cu_seqlens, backend="cpp", **{k: flat(v) for k, v in kwargs.items()})
        return call

    same_with_poison(packed, logits_input)


def test_peer_case_old_logps_of_padding_below_the_exp_overflow():
    """The case that found it: real old log-probs of padding are often below -88.7 (exp(88.8) = inf in fp32)."""
    logits = torch.randn(2, 6, VOCAB, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 6))
    labels[:, 4:] = -100
    old = reference.token_logprobs(logits.detach(), labels)
    old[:, 4:] = -95.0
    for fn in (rk.grpo_loss, reference.grpo_loss):
        out = fn(logits, labels, torch.tensor([1.0, -1.0]), old_logps=old, loss_type="bnpo")
        assert torch.isfinite(out.loss)
    hidden, weight = torch.randn(2, 6, HIDDEN), torch.randn(VOCAB, HIDDEN)
    out = rk.linear_grpo_loss(hidden, weight, labels, torch.tensor([1.0, -1.0]), old_logps=old)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(reference.grpo_loss(F.linear(hidden, weight), labels, torch.tensor([1.0, -1.0]),
                                              old_logps=old).loss)
