"""Fused-linear losses with their gradients computed during the forward: three GEMMs per step instead of four.

The loss's per-token coefficient c_t = dL/dlogp_t depends only on the tokens of its own group: a DDPO/DPO pair (both
sequences), a GRPO token. So once a chunk holds whole groups, c_t is known without waiting for the backward, and the
chunk's logits can be turned into their gradient right away instead of being recomputed later:

    logits = hidden[chunk] @ W.T (+ b)              GEMM 1 (ignored tokens are skipped: they cost nothing)
    logp, lse = row kernels (the backend's logprob_fwd)
    c = autograd of the loss on the chunk's [k, T] log-probs, with the whole batch's normalisers
    logits <- c (onehot - softmax(z)) dz/dx         (the backend's logprob_bwd_, in place; z: the logit transform)
    dhidden[chunk] = dlogits @ W;  dW += dlogits.T @ hidden[chunk]   GEMMs 2 and 3

A low-rank term (u [.., r], B [V, r]: a LoRA adapter on the head) adds u @ B.T to the logits of GEMM 1 and gives
du = dlogits @ B and dB += dlogits.T @ u beside GEMMs 2 and 3: rank-r products, no [V, H + r] copy; with the base
weight frozen (LoRA) GEMM 3 is skipped, so the adapter's gradient costs [V, r], not [V, H].

The backward then only multiplies the stored gradients by grad_output. A group with more non-ignored tokens than the
chunk budget is taken whole in one pass by default (like Liger's one-pair chunks); under an explicit, strict budget
it takes two passes over pieces of at most the budget (logps of every piece, then c, then each piece recomputed):
the recompute scheme for that group only, so memory never exceeds the budget. GRPO's tokens are separable, so its
long rows are simply cut.

Without any gradient wanted (reference scoring, evaluation) the same chunks only score the tokens: one GEMM over the
non-ignored tokens.

The loss math is not restated here: LossSpec.share (_loss_spec.py) is the loss module's own function (losses/) on
a sub-batch of rows.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from . import _backend, _ops, _packing
from ._loss_spec import LossSpec


@dataclass(frozen=True)
class _Chunk:
    rows: list        # sub-batch rows, group member j of every group before member j + 1 (pairs: chosen, rejected)
    piece_tokens: int  # tokens per piece; the chunk is one piece unless a single group exceeds the budget
    two_pass: bool    # an oversized group whose coefficient needs all its pieces' log-probs first


def plan_chunks(groups, active_counts, budget: int, splittable: bool, strict: bool) -> list[_Chunk]:
    """Greedy runs of whole groups with at most `budget` non-ignored tokens. A bigger group is a chunk of its own:
    cut into pieces of `budget` tokens when its tokens are separable or the budget is `strict` (then two passes),
    else taken whole in one pass."""
    chunks, current, current_tokens = [], [], 0

    def flush():
        nonlocal current, current_tokens
        if current:
            chunks.append(_Chunk([g[j] for j in range(len(current[0])) for g in current], budget, False))
        current, current_tokens = [], 0

    for group in groups:
        tokens = sum(active_counts[r] for r in group)
        if tokens == 0:
            continue  # nothing to score or differentiate: its log-probs stay 0
        if tokens > budget:
            flush()
            cut = splittable or strict
            chunks.append(_Chunk(list(group), budget if cut else tokens, cut and not splittable))
            continue
        if current_tokens + tokens > budget:
            flush()
        current.append(group)
        current_tokens += tokens
    flush()
    return chunks


class _Engine:
    """One forward: the loss's token log-probs and, chunk by chunk, d(loss)/d(hidden, weight, bias)."""

    def __init__(self, labels, ignore_index, temperature, softcap, budget, strict, backend, spec: LossSpec,
                 layout=None):
        # The loss's rows [R, T]; under a packed layout, each row slot's token in the hidden stream (else the slot's
        # own index: hidden is [R, T, H]).
        self.labels = _packing.as_rows(layout, labels, ignore_index)
        self.token_of_slot = None if layout is None else layout.token_of_slot()
        self.ignore_index = ignore_index
        self.transform = (float(temperature), float(softcap))  # the operators' own (_sources.kernel_transform)
        self.budget, self.strict, self.spec = budget, strict, spec
        self.family = _backend.operators(backend)
        self.output = None  # spec.whole's result on the final log-probs (metrics), set by run()

    def run(self, hidden, weight, bias, needs, low_rank=(None, None)):
        """needs: which of (hidden, weight, bias, u, B) want a gradient; low_rank: (u, B) or (None, None)."""
        rows, seq = self.labels.shape
        self.flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        self.flat_labels = self.labels.reshape(-1)
        self.weight, self.bias = weight, bias
        u, self.low_weight = low_rank
        self.flat_low = None if u is None else u.reshape(-1, u.shape[-1])
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        self.logps = torch.zeros(rows, seq, dtype=acc, device=hidden.device)
        active = self.labels != self.ignore_index
        # dhidden rows of ignored tokens stay 0; dweight is zero-filled only if no chunk writes it (a V x H pass).
        self.dhidden = torch.zeros_like(self.flat_hidden) if needs[0] else None
        self.dweight, self.dweight_written = (torch.empty(weight.shape, dtype=acc, device=weight.device)
                                              if needs[1] else None), False
        self.dbias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if needs[2] else None
        self.dlow = torch.zeros_like(self.flat_low) if needs[3] else None
        self.dlow_weight = torch.zeros(self.low_weight.shape, dtype=acc, device=weight.device) if needs[4] else None
        positions = torch.arange(seq, device=hidden.device)
        counts = active.sum(-1).tolist()
        self.scoring_only = not any(needs)  # no gradient wanted: log-probs only, every group may be cut
        chunks = plan_chunks(self.spec.groups, counts, self.budget, self.spec.splittable or self.scoring_only,
                             self.strict)
        largest = max((min(sum(counts[r] for r in c.rows), c.piece_tokens) for c in chunks), default=0)
        self.buffer = hidden.new_empty(largest * weight.shape[0])  # the chunk's logits, then their gradient
        for chunk in chunks:
            chunk_rows = torch.tensor(chunk.rows, dtype=torch.int64, device=hidden.device)
            mask = active.index_select(0, chunk_rows)
            slots = (chunk_rows[:, None] * seq + positions)[mask]  # row-major, the order of logps[mask]
            self._chunk(chunk, chunk_rows, mask, slots)
        if self.dweight is not None and not self.dweight_written:
            self.dweight.zero_()
        self.buffer = self.flat_hidden = self.flat_low = None  # the chunk buffer must not outlive the forward
        self.output = self.spec.whole(self.logps)
        return self.output.loss.detach(), (self.dhidden, self.dweight, self.dbias, self.dlow, self.dlow_weight)

    def _chunk(self, chunk, chunk_rows, mask, slots):
        starts = range(0, slots.numel(), chunk.piece_tokens)
        # Each piece's hidden rows and labels are gathered once and used for its logits and again for its gradients.
        pieces = [(start, *self._gather(slots[start:start + chunk.piece_tokens])) for start in starts]
        if self.scoring_only:
            for _, piece, h, labels in pieces:
                self._forward(piece, h, labels)
            return
        if chunk.two_pass:
            lses = [self._forward(piece, h, labels)[1] for _, piece, h, labels in pieces]  # logits recomputed below
            coef = self._coefficients(chunk_rows, mask)
            for (start, piece, h, labels), lse in zip(pieces, lses):
                self._gradients(self._logits(h), piece, h, labels, coef[start:start + piece[0].numel()], lse)
            return
        for start, piece, h, labels in pieces:
            logits, lse = self._forward(piece, h, labels)
            coef = self._coefficients(chunk_rows, mask)  # separable: other pieces' tokens do not matter
            self._gradients(logits, piece, h, labels, coef[start:start + piece[0].numel()], lse)

    def _gather(self, slots):
        """((slots, their tokens in the hidden stream), their hidden rows (with the low-rank term's: a pair),
        their labels)."""
        tokens = slots if self.token_of_slot is None else self.token_of_slot.index_select(0, slots)
        h = self.flat_hidden.index_select(0, tokens)
        low = None if self.flat_low is None else self.flat_low.index_select(0, tokens)
        return (slots, tokens), (h, low), self.flat_labels.index_select(0, slots)

    def _logits(self, hs):
        """h @ W.T (+ b) (+ u @ B.T), written into one buffer reused by every piece: a fresh chunk-sized allocation
        per piece would cost its page faults again each time (CPU) or fragment the cache (CUDA)."""
        h, low = hs
        vocab = self.weight.shape[0]
        out = self.buffer[:h.shape[0] * vocab].view(h.shape[0], vocab)
        if low is None:
            if self.bias is None:
                return torch.mm(h, self.weight.t(), out=out)
            return torch.addmm(self.bias, h, self.weight.t(), out=out)
        # the small terms first: in a 16-bit buffer the large product is then rounded once, with them, as the
        # widened GEMM [h, u] @ [W, B].T would round it
        torch.mm(low, self.low_weight.t(), out=out)
        if self.bias is not None:
            out += self.bias
        return out.addmm_(h, self.weight.t())

    def _forward(self, piece, h, labels):
        """Logits of the piece's tokens and their (logp, lse); logp is written into self.logps at their slots."""
        logits = self._logits(h)
        logp, lse = self.family.logprob_fwd(logits, labels, self.ignore_index, *self.transform, False)
        self.logps.view(-1).index_copy_(0, piece[0], logp)
        return logits, lse

    def _coefficients(self, chunk_rows, mask):
        """dL/dlogp at the chunk's non-ignored tokens (row-major), from the loss on the chunk's rows."""
        with torch.enable_grad():
            x = self.logps.index_select(0, chunk_rows).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.spec.share(chunk_rows, x), x)
        return grad[mask]

    def _gradients(self, logits, piece, hs, labels, coef, lse):
        """Turns `logits` into dlogits in place and adds their products into dhidden, dweight, dbias (and the
        low-rank term's du, dB)."""
        h, low = hs
        self.family.logprob_bwd_(logits, coef.contiguous(), labels, lse, self.ignore_index, *self.transform)
        if self.dhidden is not None:
            self.dhidden.index_copy_(0, piece[1], logits @ self.weight)
        if self.dweight is not None:
            _accumulate_product(self.dweight, logits.t(), h, overwrite=not self.dweight_written)
            self.dweight_written = True
        if self.dbias is not None:
            self.dbias += logits.sum(0, dtype=self.dbias.dtype)
        if self.dlow is not None:
            self.dlow.index_copy_(0, piece[1], logits @ self.low_weight)
        if self.dlow_weight is not None:
            _accumulate_product(self.dlow_weight, logits.t(), low, overwrite=False)


def _accumulate_product(acc, a, b, overwrite):
    """acc += a @ b (acc = a @ b when `overwrite`) with acc in fp32 (fp64) and a, b possibly 16-bit."""
    beta = 0.0 if overwrite else 1.0
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
    elif acc.is_cuda:
        product = torch.mm(a, b, out_dtype=acc.dtype)  # tensor-core GEMM, fp32 result: no fp32 copy of the chunk
        acc.copy_(product) if overwrite else acc.add_(product)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), beta=beta)  # CPU has no 16-bit GEMM with an fp32 result


class _FusedLinearLoss(torch.autograd.Function):
    """loss(hidden, weight, bias, u, B) whose gradients were computed by the forward; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, low, low_weight, engine):
        inputs = (hidden, weight, bias, low, low_weight)
        needs = tuple(t is not None and wanted for t, wanted in zip(inputs, ctx.needs_input_grad))
        with torch.autocast(hidden.device.type, enabled=False):  # the GEMMs run in the inputs' own dtype
            loss, grads = engine.run(hidden, weight, bias, needs, (low, low_weight))
        ctx.grads = grads
        ctx.shapes_dtypes = [(None, None) if t is None else (t.shape, t.dtype) for t in inputs]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _ops.refuse_double_backward("the fused-linear loss")
        # A plain loss.backward() passes 1: skip the scaling pass over the V x H gradient (free to test on CPU only).
        unit = grad_loss.device.type == "cpu" and float(grad_loss) == 1.0

        def scaled(g, shape_dtype):
            if g is None:
                return None
            shape, dtype = shape_dtype
            return (g if unit else g * grad_loss.to(g.dtype)).to(dtype).view(shape)

        return (*(scaled(g, sd) for g, sd in zip(ctx.grads, ctx.shapes_dtypes)), None)


@torch.compiler.disable  # data-dependent chunking: a graph break, not a trace
def fused_linear_loss(hidden, weight, bias, labels, ignore_index, temperature, softcap, budget, strict, backend,
                      spec: LossSpec, layout=None, low_rank=(None, None)):
    """spec.whole's output with its `loss` differentiable w.r.t. hidden, weight, bias through gradients computed in
    the forward. Inputs are validated; labels [R, T], hidden [R, T, H] (or, under a packed `layout`, both the token
    stream's: the loss's rows come from the layout); temperature and softcap are the operators' own; `budget`
    non-ignored tokens per chunk, a hard bound when `strict` (else a group bigger than it goes whole, in one pass);
    low_rank: (u, B), a term u @ B.T added to the logits, or (None, None)."""
    engine = _Engine(labels, ignore_index, temperature, softcap, budget, strict, backend, spec, layout)
    inputs = (hidden, weight, bias, *low_rank)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        engine.run(hidden, weight, bias, (False,) * 5, low_rank)  # scoring: one GEMM per chunk of answer tokens
        return engine.output
    loss = _FusedLinearLoss.apply(*inputs, engine)
    output = engine.output
    output.loss = loss
    return output
