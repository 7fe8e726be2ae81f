"""grpo_loss's conventions against Liger's fused-linear GRPO loss (runs where liger-kernel is installed): the dapo
normaliser num_items_in_batch / world_size, dr_grpo's max_completion_length, the bias-corrected KL; loss and
gradients equal on the same inputs, for one and for two (simulated) processes. The comparison with TRL's own
GRPOTrainer is in tests/train/test_trl_dropin.py (test_grpo_loss_conventions_equal_trls)."""
import pytest
import torch

import rlhfv_kernels as rk

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")


def inputs(batch=4, seq=7, hidden=16, vocab=97):
    h = torch.randn(batch, seq, hidden, dtype=torch.float32)
    w = torch.randn(vocab, hidden) * 0.3
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    with torch.no_grad():
        logp = torch.log_softmax(h @ w.T, -1).gather(-1, ids[..., None])[..., 0]
    old = logp + 0.3 * torch.randn(batch, seq)
    ref = logp + 0.2 * torch.randn(batch, seq)
    return h, w, ids, mask, torch.randn(batch), old, ref


def simulate_world(monkeypatch, size):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: size > 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: size)


@pytest.mark.parametrize("loss_type", rk.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("beta,bias_correction", [(0.0, False), (0.1, False), (0.1, True)])
@pytest.mark.parametrize("world", [1, 2])
def test_equals_liger(loss_type, beta, bias_correction, world, monkeypatch):
    h, w, ids, mask, adv, old, ref = inputs()
    num_items = float(mask.sum()) * world * 1.5  # the global count: more tokens than this process holds
    max_len = ids.shape[1] + 3
    simulate_world(monkeypatch, world)
    liger = liger_grpo.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=beta != 0.0,
                                                epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                                max_completion_length=max_len,
                                                use_bias_correction_kl=bias_correction)
    results = []
    for run in ("liger", "rlhfv"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if run == "liger":
            loss = liger(hh, ww, ids, mask, adv, ref_per_token_logps=ref if beta else None,
                         old_per_token_logps=old, num_items_in_batch=num_items)[0]
        else:
            labels = ids.masked_fill(mask == 0, -100)
            loss = rk.linear_grpo_loss(hh, ww, labels, adv, old_logps=old, ref_logps=ref if beta else None,
                                       epsilon=0.2, epsilon_high=0.28, beta_kl=beta, loss_type=loss_type,
                                       num_items_in_batch=num_items, max_completion_length=max_len,
                                       use_bias_correction_kl=bias_correction).loss
        loss.backward()
        results.append((loss.detach(), hh.grad, ww.grad))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_world_size_and_constants_are_explicit():
    h, w, ids, mask, adv, old, ref = inputs()
    labels = ids.masked_fill(mask == 0, -100)
    logits = h @ w.T
    common = dict(old_logps=old, ref_logps=ref, beta_kl=0.1)
    one = rk.grpo_loss(logits, labels, adv, loss_type="dapo", num_items_in_batch=40.0, world_size=1, **common).loss
    two = rk.grpo_loss(logits, labels, adv, loss_type="dapo", num_items_in_batch=40.0, world_size=2, **common).loss
    torch.testing.assert_close(two, 2 * one)
    width = rk.grpo_loss(logits, labels, adv, loss_type="dr_grpo", **common).loss
    longer = rk.grpo_loss(logits, labels, adv, loss_type="dr_grpo", max_completion_length=14, **common).loss
    torch.testing.assert_close(longer, width * ids.shape[1] / 14)
    # ratios all well above 1 (old policy 0.5 nats below), so the correction's effect is far above rounding
    shifted = dict(common, old_logps=old - 0.5)
    plain = rk.grpo_loss(logits, labels, adv, **shifted)
    corrected = rk.grpo_loss(logits, labels, adv, use_bias_correction_kl=True, **shifted)
    expected = rk.reference.grpo_loss(logits, labels, adv, use_bias_correction_kl=True, **shifted)
    torch.testing.assert_close(corrected.loss, expected.loss)
    # corrected - plain = beta * (token mean of kl * (ratio - 1)): >= 0.098 beta * mean_kl over 2000 seeds
    assert float(corrected.loss - plain.loss) > 0.02 * 0.1 * float(plain.mean_kl)
    for bad, match in (({"world_size": 0}, "world_size"), ({"max_completion_length": 0}, "max_completion_length"),
                       ({"use_bias_correction_kl": 1}, "use_bias_correction_kl")):
        with pytest.raises((ValueError, TypeError), match=match):
            rk.grpo_loss(logits, labels, adv, **bad)
