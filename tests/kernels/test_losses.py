"""The loss family: math checked against explicit per-pair formulas, then fused vs reference end to end."""
import math

import pytest
import torch

import rlhfv_kernels as rk
from rlhfv_kernels import reference
from numerics import assert_meets_criterion

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x > -30 else x


def explicit_scores(logps, labels, weights, mode):
    """Sequence scores by plain Python loops over [B, T] float64 token log-probs."""
    scores = []
    for b in range(labels.shape[0]):
        num = den = 0.0
        for t in range(labels.shape[1]):
            if labels[b, t] == -100:
                continue
            w = 1.0 if weights is None else float(weights[b, t])
            num += w * float(logps[b, t])
            den += w
        scores.append(num if mode == "sum" else (num / den if den > 0 else 0.0))
    return scores


def make_batch(pairs, seq, vocab, dtype=torch.float32):
    logits = (torch.randn(2 * pairs, seq, vocab) * 2).to(dtype)
    labels = torch.randint(0, vocab, (2 * pairs, seq))
    labels[:, :3] = -100  # prompt tokens
    labels[0, -2:] = -100  # padding
    return logits, labels


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sequence_logps_matches_explicit_sum(mode):
    logits, labels = make_batch(3, 11, 29)
    weights = torch.rand(labels.shape) * 5
    weights[2] = 0.0  # a row whose weights sum to 0 scores 0 in both modes
    logps = reference.token_logprobs(logits.double(), labels)
    expected = explicit_scores(logps, labels, weights, mode)
    got = rk.sequence_logps(logits, labels, weights, mode=mode, backend="cpp")
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-5)
    assert got[2] == 0


def test_sequence_logps_zero_weight_row_has_finite_zero_gradient():
    logits = torch.randn(2, 5, 13, requires_grad=True)
    labels = torch.randint(0, 13, (2, 5))
    weights = torch.ones(2, 5)
    weights[1] = 0
    rk.sequence_logps(logits, labels, weights, mode="mean", backend="cpp").sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[1] == 0)


def test_ddpo_eq5_mean_mode_with_gamma():
    """DDPO Eq. 5: (sum_unchanged logp + gamma * sum_changed logp) / (|y_u| + gamma |y_c|)."""
    logits, labels = make_batch(1, 9, 31)
    gamma = 5.0
    changed = torch.zeros(labels.shape, dtype=torch.bool)
    changed[:, 5:7] = True
    weights = torch.where(changed, gamma, 1.0)
    logps = reference.token_logprobs(logits.double(), labels)
    for row in range(2):
        valid = labels[row] != -100
        u = logps[row][valid & ~changed[row]]
        c = logps[row][valid & changed[row]]
        eq5 = (u.sum() + gamma * c.sum()) / (u.numel() + gamma * c.numel())
        got = rk.sequence_logps(logits[row:row + 1], labels[row:row + 1], weights[row:row + 1], mode="mean",
                                backend="cpp")
        assert abs(got.item() - eq5.item()) < 1e-5


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("use_drs", [False, True])
def test_ddpo_matches_explicit_formula(mode, use_drs):
    pairs, beta = 4, 0.5
    logits, labels = make_batch(pairs, 8, 23)
    weights = torch.where(torch.rand(labels.shape) < 0.3, 5.0, 1.0)
    ref = torch.randn(2 * pairs) * 3
    margin = torch.rand(pairs) * 2 if use_drs else None
    out = rk.ddpo_loss(logits, labels, ref, token_weights=weights, beta=beta, mode=mode, reward_margin=margin,
                       drs_weight=0.7 if use_drs else 0.0, drs_k=1.5, backend="cpp")
    logps = reference.token_logprobs(logits.double(), labels)
    scores = explicit_scores(logps, labels, weights, mode)
    losses, chosen_r, rejected_r, wins = [], [], [], 0
    for i in range(pairs):
        b = beta * (1 + 0.7 * (1 - math.exp(-1.5 * float(margin[i])))) if use_drs else beta
        dc = scores[i] - float(ref[i])
        dr = scores[pairs + i] - float(ref[pairs + i])
        losses.append(-logsigmoid(b * (dc - dr)))
        chosen_r.append(b * dc)
        rejected_r.append(b * dr)
        wins += (dc - dr) > 0
    assert abs(out.loss.item() - sum(losses) / pairs) < 1e-5
    torch.testing.assert_close(out.chosen_rewards.double(), torch.tensor(chosen_r, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected_rewards.double(), torch.tensor(rejected_r, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.margins, out.chosen_rewards - out.rejected_rewards)
    assert out.accuracy.item() == pytest.approx(wins / pairs)


def test_dpo_is_ddpo_with_unit_weights_and_sum_mode():
    logits, labels = make_batch(3, 7, 19)
    ref = torch.randn(6)
    a = rk.dpo_loss(logits, labels, ref, beta=0.1, backend="cpp")
    b = rk.ddpo_loss(logits, labels, ref, token_weights=torch.ones(labels.shape), beta=0.1, mode="sum",
                     backend="cpp")
    torch.testing.assert_close(a.loss, b.loss)
    # The textbook DPO sigmoid loss on summed log-probs.
    logps = reference.token_logprobs(logits.double(), labels)
    s = (logps).sum(-1)
    z = (s[:3] - ref[:3].double()) - (s[3:] - ref[3:].double())
    assert abs(a.loss.item() - (-torch.nn.functional.logsigmoid(0.1 * z)).mean().item()) < 1e-5


def test_drs_beta_is_clamped_from_below():
    logits, labels = make_batch(2, 5, 11)
    out = rk.ddpo_loss(logits, labels, torch.zeros(4), beta=1e-5, reward_margin=torch.zeros(2), drs_weight=1.0,
                       backend="cpp")
    assert torch.all(out.beta == 1e-3)


def test_sft_term_is_token_mean_nll_of_chosen():
    logits, labels = make_batch(2, 6, 17)
    ref = torch.randn(4)
    base = rk.ddpo_loss(logits, labels, ref, backend="cpp")
    with_sft = rk.ddpo_loss(logits, labels, ref, sft_weight=0.3, backend="cpp")
    logps = reference.token_logprobs(logits.double(), labels)
    chosen_mask = labels[:2] != -100
    nll = -(logps[:2][chosen_mask]).mean().item()
    assert with_sft.sft_loss.item() == pytest.approx(nll, abs=1e-5)
    assert with_sft.loss.item() == pytest.approx(base.loss.item() + 0.3 * nll, abs=1e-5)


def explicit_grpo(logps, old, ref, labels, adv, eps_lo, eps_hi, beta_kl, loss_type):
    per_seq_sums, per_seq_counts, total = [], [], 0.0
    B, T = labels.shape
    for b in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if labels[b, t] == -100:
                continue
            ratio = math.exp(float(logps[b, t]) - float(old[b, t]))
            a = float(adv[b])
            term = -min(ratio * a, min(max(ratio, 1 - eps_lo), 1 + eps_hi) * a)
            if beta_kl:
                d = float(ref[b, t]) - float(logps[b, t])
                term += beta_kl * (math.exp(d) - d - 1)
            s += term
            n += 1
        per_seq_sums.append(s)
        per_seq_counts.append(n)
        total += s
    tokens = sum(per_seq_counts)
    if loss_type == "grpo":
        return sum(s / max(n, 1) for s, n in zip(per_seq_sums, per_seq_counts)) / B
    if loss_type in ("bnpo", "dapo"):
        return total / max(tokens, 1)
    return total / (B * T)


@pytest.mark.parametrize("loss_type", rk.GRPO_LOSS_TYPES)
def test_grpo_matches_explicit_formula(loss_type):
    B, T, V = 5, 9, 21
    logits = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    labels[:, -3:][torch.rand(B, 3) < 0.5] = -100
    logps = reference.token_logprobs(logits.double(), labels)
    old = (logps + 0.3 * torch.randn(B, T, dtype=torch.float64)).float()
    ref = (logps + 0.2 * torch.randn(B, T, dtype=torch.float64)).float()
    adv = torch.randn(B)
    out = rk.grpo_loss(logits, labels, adv, old_logps=old, ref_logps=ref, epsilon=0.2, epsilon_high=0.28,
                       beta_kl=0.04, loss_type=loss_type, backend="cpp")
    expected = explicit_grpo(logps, old, ref, labels, adv, 0.2, 0.28, 0.04, loss_type)
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)


def test_grpo_without_old_logps_is_advantage_weighted_logp_gradient():
    B, T, V = 3, 4, 11
    logits = torch.randn(B, T, V, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    rk.grpo_loss(logits, labels, adv, loss_type="bnpo", backend="cpp").loss.backward()
    got = logits.grad.clone()
    logits.grad = None
    (-(reference.token_logprobs(logits, labels) * adv[:, None]).sum() / (B * T)).backward()
    torch.testing.assert_close(got, logits.grad, rtol=1e-5, atol=1e-6)


def test_grpo_num_items_in_batch_normalizer():
    logits = torch.randn(2, 3, 7)
    labels = torch.randint(0, 7, (2, 3))
    adv = torch.randn(2)
    a = rk.grpo_loss(logits, labels, adv, loss_type="dapo", backend="cpp")
    b = rk.grpo_loss(logits, labels, adv, loss_type="dapo", num_items_in_batch=12, backend="cpp")
    assert b.loss.item() == pytest.approx(a.loss.item() * 6 / 12, abs=1e-6)


@pytest.mark.parametrize("route", ["logits", "linear"])
@pytest.mark.parametrize("loss_type", rk.GRPO_LOSS_TYPES)
def test_grpo_micro_batches_with_the_batch_normalisers_add_up_to_the_batch(loss_type, route):
    """batch_rows / batch_tokens: each micro-batch's loss is its exact share, so the parts' losses and gradients sum
    to the whole batch's (gradient accumulation without weights), and the reference agrees part by part."""
    B, T, H, V = 5, 7, 6, 19
    hidden, weight = torch.randn(B, T, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    labels[:, :2] = -100
    labels[1, 3:] = -100
    adv, old = torch.randn(B), -torch.rand(B, T) * 3
    options = dict(loss_type=loss_type, old_logps=old, max_completion_length=9, epsilon_high=0.3)
    batch = dict(batch_rows=B, batch_tokens=float((labels != -100).sum()))

    def loss(rows, **extra):
        h = hidden[rows].float().requires_grad_(True)
        w = weight.float().requires_grad_(True)
        kw = dict(options, old_logps=old[rows], **extra)
        if route == "linear":
            out = rk.linear_grpo_loss(h, w, labels[rows], adv[rows], **kw)
        else:
            out = rk.grpo_loss(h @ w.T, labels[rows], adv[rows], backend="cpp", **kw)
        out.loss.backward()
        expected = reference.grpo_loss(hidden[rows] @ weight.T, labels[rows], adv[rows],
                                       **dict(kw, old_logps=old[rows].double()))
        assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5, abs=1e-6)
        return out.loss.item(), h.grad, w.grad

    whole, h_grad, w_grad = loss(slice(0, B))
    parts = [loss(rows, **batch) for rows in (slice(0, 2), slice(2, B))]
    assert sum(p[0] for p in parts) == pytest.approx(whole, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), h_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parts[0][2] + parts[1][2], w_grad, rtol=1e-4, atol=1e-6)


def test_grpo_batch_normalisers_are_checked():
    logits, labels, adv = torch.randn(3, 4, 7), torch.randint(0, 7, (3, 4)), torch.randn(3)
    with pytest.raises(ValueError, match="batch_rows must be an int >= this call's 3 rows"):
        rk.grpo_loss(logits, labels, adv, loss_type="grpo", batch_rows=2)
    with pytest.raises(ValueError, match="batch_tokens"):
        rk.grpo_loss(logits, labels, adv, loss_type="bnpo", batch_tokens=0.0)


# ---- fused vs reference through the whole loss, with the float64 criterion ----

def run_loss(fn, logits, dtype, **kwargs):
    leaf = logits.detach().to(dtype).clone().requires_grad_(True)
    x = leaf[:, :-1]  # shifted, strided view
    out = fn(x, **kwargs)
    loss = out if isinstance(out, torch.Tensor) else out.loss
    seed = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (loss * seed.to(loss.dtype)).sum().backward()
    return loss.detach(), leaf.grad


def make_shifted_batch(pairs=3, seq=10, vocab=517):
    logits = torch.randn(2 * pairs, seq + 1, vocab) * 2
    labels = torch.randint(0, vocab, (2 * pairs, seq))
    labels[:, :2] = -100
    labels[1, :] = -100  # a fully ignored sequence
    return logits, labels


def compare_fused(fn_name, dtype, backend, batch=None, **kwargs):
    logits, labels = batch or make_shifted_batch()
    fused = getattr(rk, fn_name)
    ref = getattr(reference, fn_name)
    ours = run_loss(fused, logits, dtype, labels=labels, backend=backend, **kwargs)
    inplace = run_loss(fused, logits, dtype, labels=labels, backend=backend, inplace_backward=True, **kwargs)
    same = run_loss(ref, logits, dtype, labels=labels, **kwargs)
    truth = run_loss(ref, logits.to(dtype), torch.float64, labels=labels, **kwargs)  # on the rounded inputs
    for name, got in (("fused", ours), ("fused inplace", inplace)):
        assert_meets_criterion(got[0], same[0], truth[0], dtype, f"{fn_name} {name} value", relative=True)
        # Loss-level gradients can exceed 1 (GRPO ratios): there the tolerance is relative.
        assert_meets_criterion(got[1], same[1], truth[1], dtype, f"{fn_name} {name} dlogits", relative=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_fused_sequence_logps(dtype, mode, backend):
    compare_fused("sequence_logps", dtype, backend, mode=mode, token_weights=torch.rand(6, 10) * 3, temperature=0.9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_fused_ddpo(dtype, mode, backend):
    compare_fused("ddpo_loss", dtype, backend, mode=mode, ref_logps=torch.randn(6) * 5, beta=0.5,
                  token_weights=torch.where(torch.rand(6, 10) < 0.3, 5.0, 1.0), reward_margin=torch.rand(3),
                  drs_weight=0.5, sft_weight=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_dpo(dtype, backend):
    compare_fused("dpo_loss", dtype, backend, ref_logps=torch.randn(6) * 5, beta=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type,options", [
    ("grpo", {}), ("dapo", {}),
    ("dapo", {"num_items_in_batch": 100.0, "world_size": 2, "use_bias_correction_kl": True}),
    ("dr_grpo", {"max_completion_length": 16, "use_bias_correction_kl": True}),
], ids=["grpo", "dapo", "dapo-conventions", "dr_grpo-conventions"])
def test_fused_grpo(dtype, loss_type, options, backend):
    logits, labels = make_shifted_batch()
    # Sampling and reference policies close to the current one, as in training (ratios near 1, some clipped).
    current = reference.token_logprobs(logits[:, :-1].double(), labels).float()
    compare_fused("grpo_loss", dtype, backend, (logits, labels), advantages=torch.randn(6),
                  old_logps=current + 0.3 * torch.randn(6, 10), ref_logps=current + 0.3 * torch.randn(6, 10),
                  beta_kl=0.05, loss_type=loss_type, epsilon=0.2, **options)


def test_empty_batch():
    logits = torch.randn(0, 4, 9, requires_grad=True)
    labels = torch.zeros(0, 4, dtype=torch.long)
    assert rk.sequence_logps(logits, labels, backend="cpp").shape == (0,)
    out = rk.ddpo_loss(logits, labels, torch.zeros(0), backend="cpp")
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert rk.grpo_loss(logits, labels, torch.zeros(0), backend="cpp").loss.item() == 0.0
