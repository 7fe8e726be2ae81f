"""Packed (padding-free) sequences (rlhfv_kernels/_packing.py): on every backend, sequence scores and every loss of both
paths from one token stream equal those of the same sequences padded into rows, in value and gradient — boundaries
given as cu_seqlens (tensor or list) or position_ids, odd lengths, length-1 and empty sequences, a pack holding one
sequence (one pair), pairs anywhere in the pack, several packed rows with tail padding; and every bad packing
argument is a clear error."""
import pytest
import torch

import rlhfv_kernels as rk

VOCAB, HDIM = 257, 24
LENGTHS = {"odd": [7, 1, 12, 3, 9, 4], "one-pair": [5, 8], "one": [6]}
PROMPT = 2  # leading tokens of sequences longer than this are prompt (ignored), as in a VLM batch


def padded_batch(lengths, *, dtype=torch.float32, last=VOCAB):
    """Right-padded rows [S, T, last] and labels [S, T] (-100 on prompt and padding), and the mask of real tokens."""
    rows, width = len(lengths), max(max(lengths), 1)
    real = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    labels = torch.randint(0, VOCAB, (rows, width))
    labels[:, :PROMPT] = torch.where(torch.tensor(lengths)[:, None] > PROMPT, -100, labels[:, :PROMPT])
    labels[~real] = -100
    values = torch.randn(rows, width, last, dtype=dtype) * 3
    return values, labels, real


def pack(padded, real):
    """The real tokens of padded rows as one stream [1, total, ...]."""
    return padded[real].unsqueeze(0)


def boundaries(lengths, how, labels_shape=None):
    offsets = [0] + torch.tensor(lengths).cumsum(0).tolist()
    if how == "cu_seqlens":
        return dict(cu_seqlens=torch.tensor(offsets, dtype=torch.int32))
    if how == "cu_list":
        return dict(cu_seqlens=offsets)
    return dict(position_ids=torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0))


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def close(packed, padded, *, atol=2e-5):
    torch.testing.assert_close(packed, padded, rtol=2e-5, atol=atol)


@pytest.mark.parametrize("how", ["cu_seqlens", "cu_list", "position_ids"])
@pytest.mark.parametrize("case", ["odd", "one"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sequence_logps(backend, how, case, mode):
    lengths = LENGTHS[case]
    logits, labels, real = padded_batch(lengths)
    weights = torch.where(torch.rand(labels.shape) < 0.3, 5.0, 1.0)
    padded_in, packed_in = leaf(logits), leaf(pack(logits, real))
    padded = rk.sequence_logps(padded_in, labels, weights, mode=mode, backend=backend)
    packed = rk.sequence_logps(packed_in, pack(labels, real), pack(weights, real), mode=mode, backend=backend,
                               **boundaries(lengths, how))
    close(packed, padded)
    grad = torch.randn_like(padded)
    padded.backward(grad)
    packed.backward(grad)
    close(packed_in.grad, pack(padded_in.grad, real))


def test_empty_sequences_score_zero(backend):
    lengths = [4, 0, 6, 0]
    logits, labels, real = padded_batch(lengths)
    packed = rk.sequence_logps(pack(logits, real), pack(labels, real), backend=backend,
                               cu_seqlens=[0, 4, 4, 10, 10])
    close(packed, rk.sequence_logps(logits, labels, backend=backend))
    assert packed[1] == 0 and packed[3] == 0


@pytest.mark.parametrize("case", ["odd", "one-pair"])
@pytest.mark.parametrize("paired", ["default", "shuffled"])
@pytest.mark.parametrize("inplace", [False, True])
def test_ddpo_loss(backend, case, paired, inplace):
    lengths = LENGTHS[case]
    logits, labels, real = padded_batch(lengths)
    rows, pairs = len(lengths), len(lengths) // 2
    weights = torch.where(torch.rand(labels.shape) < 0.3, 5.0, 1.0)
    ref = torch.randn(rows) - 20
    margin = torch.rand(pairs)
    pair_index = torch.randperm(rows).view(pairs, 2) if paired == "shuffled" else None
    order = torch.arange(rows) if pair_index is None else pair_index.t().reshape(-1)
    options = dict(beta=0.5, mode="mean", reward_margin=margin, drs_weight=0.5, sft_weight=0.3, backend=backend,
                   inplace_backward=inplace)
    padded_in, packed_in = leaf(logits[order]), leaf(pack(logits, real))
    padded = rk.ddpo_loss(padded_in * 1, labels[order], ref[order], token_weights=weights[order], **options)
    packed = rk.ddpo_loss(packed_in * 1, pack(labels, real), ref, token_weights=pack(weights, real), pairs=pair_index,
                          **options, **boundaries(lengths, "cu_seqlens"))
    for name in ("loss", "chosen_rewards", "rejected_rewards", "margins", "accuracy", "chosen_logps", "beta",
                 "sft_loss"):
        close(getattr(packed, name), getattr(padded, name))
    padded.loss.backward()
    packed.loss.backward()
    grads = torch.zeros_like(logits)
    grads[order] = padded_in.grad
    close(packed_in.grad, pack(grads, real))


@pytest.mark.parametrize("loss_type", rk.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("case", ["odd", "one"])
@pytest.mark.parametrize("width", ["longest", "max_seqlen"])
def test_grpo_loss(backend, loss_type, case, width):
    lengths = LENGTHS[case]
    extra = 0 if width == "longest" else 5  # the padded rows' width, given to the packed call as max_seqlen
    logits, labels, real = padded_batch(lengths)
    logits = torch.cat([logits, torch.randn(len(lengths), extra, VOCAB)], 1)
    labels = torch.cat([labels, torch.full((len(lengths), extra), -100)], 1)
    real = torch.cat([real, torch.zeros(len(lengths), extra, dtype=torch.bool)], 1)
    advantages = torch.randn(len(lengths))
    old = torch.randn(labels.shape) * 0.1 - 6
    ref = torch.randn(labels.shape) * 0.1 - 6
    options = dict(loss_type=loss_type, beta_kl=0.05, epsilon_high=0.28, use_bias_correction_kl=True,
                   backend=backend)
    padded_in, packed_in = leaf(logits), leaf(pack(logits, real))
    padded = rk.grpo_loss(padded_in, labels, advantages, old_logps=old, ref_logps=ref, **options)
    packed = rk.grpo_loss(packed_in, pack(labels, real), advantages, old_logps=pack(old, real),
                          ref_logps=pack(ref, real), max_seqlen=None if extra == 0 else labels.shape[1], **options,
                          **boundaries(lengths, "position_ids"))
    for name in ("loss", "mean_kl", "clip_ratio"):
        close(getattr(packed, name), getattr(padded, name))
    assert packed.token_logps.shape == (1, sum(lengths))
    close(packed.token_logps, pack(padded.token_logps, real))
    padded.loss.backward()
    packed.loss.backward()
    close(packed_in.grad, pack(padded_in.grad, real))


def multi_row_pack(lengths, row_tokens, values, labels, real):
    """Sequences filled into rows of `row_tokens` in order, each row's tail padded (ignored labels) and counted in its
    last sequence, as the trainers pack: (values [P, L, ...], labels [P, L], cu_seqlens)."""
    rows, row, row_labels, used, offsets = [], [], [], 0, [0]
    for i, n in enumerate(lengths):
        if used + n > row_tokens:
            rows.append((row, row_labels, used))
            row, row_labels, used = [], [], 0
            offsets[-1] += row_tokens - rows[-1][2]  # the tail joins the row's last sequence
        row.append(values[i][real[i]])
        row_labels.append(labels[i][real[i]])
        used += n
        offsets.append(offsets[-1] + n)
    rows.append((row, row_labels, used))
    offsets[-1] += row_tokens - used
    pad_value = lambda t: t[0].new_zeros((row_tokens - sum(p.shape[0] for p in t),) + t[0].shape[1:])  # noqa: E731
    packed = torch.stack([torch.cat(r + [pad_value(r)]) for r, _, _ in rows])
    packed_labels = torch.stack([torch.cat(r + [torch.full((row_tokens - u,), -100)]) for _, r, u in rows])
    return packed, packed_labels, offsets


@pytest.mark.parametrize("kind", ["ddpo", "grpo", "sequence"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_linear_losses(linear_backend, kind, chunk_size):
    """The fused-linear path on several packed rows (tail padding included): the engine's chunks hold whole pairs
    (or, at chunk_size=4, pieces of them over two passes) wherever they sit in the stream."""
    lengths = LENGTHS["odd"]
    hidden, labels, real = padded_batch(lengths, last=HDIM)
    weight, bias = torch.randn(VOCAB, HDIM) / HDIM ** 0.5, torch.randn(VOCAB)
    packed_hidden, packed_labels, offsets = multi_row_pack(lengths, 16, hidden, labels, real)
    stream_real = packed_labels != -100
    rows = len(lengths)
    ins = [leaf(t) for t in (hidden, weight, bias, packed_hidden, weight, bias)]
    if kind == "ddpo":
        ref, pair_index = torch.randn(rows) - 20, torch.tensor([[4, 1], [0, 5], [2, 3]])
        order = pair_index.t().reshape(-1)
        padded = rk.linear_ddpo_loss(ins[0][order], ins[1], labels[order], ref[order], bias=ins[2], beta=0.5,
                                     backend=linear_backend, chunk_size=chunk_size)
        packed = rk.linear_ddpo_loss(ins[3], ins[4], packed_labels, ref, bias=ins[5], beta=0.5, pairs=pair_index,
                                     cu_seqlens=offsets, backend=linear_backend, chunk_size=chunk_size)
        padded, packed = padded.loss, packed.loss
    elif kind == "grpo":
        advantages = torch.randn(rows)
        old = torch.randn(labels.shape) * 0.1 - 6
        old_stream = torch.zeros(packed_labels.shape)
        old_stream[stream_real] = old[labels != -100]
        width = offsets and max(b - a for a, b in zip(offsets, offsets[1:]))
        padded_width = torch.cat([labels, torch.full((rows, width - labels.shape[1]), -100)], 1)
        padded_hidden = torch.cat([ins[0], ins[0].new_zeros(rows, width - labels.shape[1], HDIM)], 1)
        padded_old = torch.cat([old, old.new_zeros(rows, width - labels.shape[1])], 1)
        padded = rk.linear_grpo_loss(padded_hidden, ins[1], padded_width, advantages, bias=ins[2],
                                     old_logps=padded_old, loss_type="dr_grpo", backend=linear_backend,
                                     chunk_size=chunk_size).loss
        packed = rk.linear_grpo_loss(ins[3], ins[4], packed_labels, advantages, bias=ins[5], old_logps=old_stream,
                                     loss_type="dr_grpo", cu_seqlens=torch.tensor(offsets), backend=linear_backend,
                                     chunk_size=chunk_size).loss
    else:
        padded = rk.linear_sequence_logps(ins[0], ins[1], labels, bias=ins[2], backend=linear_backend,
                                          chunk_size=chunk_size)
        packed = rk.linear_sequence_logps(ins[3], ins[4], packed_labels, bias=ins[5], cu_seqlens=offsets,
                                          backend=linear_backend, chunk_size=chunk_size)
        grad = torch.randn_like(padded)
        padded, packed = (padded * grad).sum(), (packed * grad).sum()
    close(packed, padded, atol=1e-4)
    padded.backward()
    packed.backward()
    close(ins[4].grad, ins[1].grad, atol=1e-4)
    close(ins[5].grad, ins[2].grad, atol=1e-4)
    hidden_grad = torch.zeros(packed_labels.shape + (HDIM,))
    hidden_grad[stream_real] = ins[0].grad[labels != -100]
    close(ins[3].grad * stream_real[..., None], hidden_grad, atol=1e-4)


def test_multi_row_logits_pack(backend):
    """Logits [P, L, V] of several packed rows: the stream is their concatenation."""
    lengths = LENGTHS["odd"]
    logits, labels, real = padded_batch(lengths)
    packed_logits, packed_labels, offsets = multi_row_pack(lengths, 16, logits, labels, real)
    assert packed_logits.shape[0] > 1
    close(rk.sequence_logps(packed_logits, packed_labels, cu_seqlens=offsets, backend=backend),
          rk.sequence_logps(logits, labels, backend=backend))


def bad_calls():
    lengths = [3, 5]
    logits, labels, real = padded_batch(lengths)
    x, y = pack(logits, real), pack(labels, real)
    ref = torch.zeros(2)
    ok = [0, 3, 8]
    seq = lambda **kw: rk.sequence_logps(x, y, **kw)  # noqa: E731
    ddpo = lambda **kw: rk.ddpo_loss(x, y, ref, **kw)  # noqa: E731
    return [
        (lambda: seq(cu_seqlens=[1, 3, 8]), "cu_seqlens must start at 0 and end at the number of tokens"),
        (lambda: seq(cu_seqlens=[0, 3, 7]), r"end at the number of tokens \(8\)"),
        (lambda: seq(cu_seqlens=[0, 5, 3, 8]), r"must not decrease, got cu_seqlens\[1\] = 5"),
        (lambda: seq(cu_seqlens=torch.tensor([0.0, 3.0, 8.0])), "cu_seqlens must be int64 or int32"),
        (lambda: seq(cu_seqlens=torch.tensor([[0, 3, 8]])), "cu_seqlens must be 1-D"),
        (lambda: seq(cu_seqlens=[0, 3.5, 8]), "cu_seqlens must be a list of ints"),
        (lambda: seq(cu_seqlens=ok, position_ids=torch.zeros(1, 8, dtype=torch.long)), "not both"),
        (lambda: seq(max_seqlen=8), "max_seqlen is given without cu_seqlens or position_ids"),
        (lambda: seq(cu_seqlens=ok, max_seqlen=4), "max_seqlen = 4 but the longest sequence has 5 tokens"),
        (lambda: seq(cu_seqlens=ok, max_seqlen=0), "max_seqlen must be a positive int"),
        (lambda: seq(position_ids=torch.arange(1, 9)[None]), "position_ids must start at 0"),
        (lambda: seq(position_ids=torch.arange(8)), r"position_ids shape \(8,\) must equal labels shape"),
        (lambda: ddpo(cu_seqlens=[0, 8]), "the pack holds 1 sequences; DPO needs pairs"),
        (lambda: ddpo(cu_seqlens=ok, pairs=torch.tensor([0, 1])), r"pairs must have shape \[B, 2\]"),
        (lambda: ddpo(cu_seqlens=ok, pairs=torch.tensor([[0, 0]])), "names sequence 0 2 times"),
        (lambda: ddpo(cu_seqlens=ok, pairs=torch.tensor([[0, 2]])), r"outside the pack's sequences \[0, 2\)"),
        (lambda: ddpo(cu_seqlens=ok, pairs=torch.tensor([[0, 1], [1, 0]])), "pairs names 4 sequences"),
        (lambda: rk.ddpo_loss(logits, labels, ref, pairs=torch.tensor([[0, 1]])), "pairs applies to packed"),
        (lambda: ddpo(cu_seqlens=ok, pairs=torch.tensor([[0.0, 1.0]])), "pairs must be int64 or int32"),
        (lambda: rk.ddpo_loss(x, y, torch.zeros(3), cu_seqlens=ok), r"ref_logps must have shape \[2\]"),
        (lambda: rk.grpo_loss(x, y, torch.zeros(3), cu_seqlens=ok), r"advantages must have shape \[2\]"),
        (lambda: rk.grpo_loss(x, y, torch.zeros(2), old_logps=torch.zeros(2, 5), cu_seqlens=ok),
         "old_logps shape"),
        (lambda: seq(token_weights=-torch.ones(1, 8), cu_seqlens=ok),
         r"token_weights\[0, \d+\] = -1.0; weights must be finite"),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_bad_packing_arguments(index):
    call, message = bad_calls()[index]
    with pytest.raises((ValueError, TypeError), match=message):
        call()
