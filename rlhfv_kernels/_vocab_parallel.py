"""Vocab-parallel log-probs and entropies: logits sharded over the vocabulary (a DTensor Shard(-1), what
ColwiseParallel(use_local_output=False) returns) or the lm_head weight sharded over its rows (a DTensor Shard(0), with
its bias), the tokens the same on every rank of that mesh dimension. DESIGN.md §3, "Vocab-parallel inputs".

Forward: each rank runs its backend's own forward kernels on its slice of the vocabulary, then one all-gather of two
float64 per token (the slice's LSE, the label's logit where the slice holds the label; a third, the slice's entropy,
when asked for) lets every rank combine them: lse = logsumexp_r lse_r, logp = z_y - lse (rounded once) and
H = sum_r w_r (H_r + lse - lse_r) with w_r = exp(lse_r - lse) (two non-negative terms, as the single-process entropy).
Nothing N x V crosses a rank.
Backward: the backend's own backward kernels, given the *global* LSE and entropy, write the slice's gradient
(d logits Shard(-1), d weight / d bias Shard(0)); no collective on the logits path, and on the fused-linear path one
all-reduce of d hidden (each rank holds the part of the sum over its rows of the vocabulary).

The kernels take a label that is a column of their slice. A token whose label lives on another rank is handed the
column FAKE_COLUMN instead: its log-prob there is discarded, and its gradient at that column, which the kernel wrote
with a one-hot term the token does not have, is rewritten on N values (never N x V).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _backend
from ._checks import _DTENSOR
from ._ops import refuse_double_backward

# The kernels' ignore_index here: never a column, so no local label collides with it.
KERNEL_IGNORE = -1
# The column a token labelled on another rank is handed (its log-prob discarded, its gradient there rewritten).
FAKE_COLUMN = 0


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice [offset, offset + size) of a vocabulary of `vocab` entries, split over `group`."""
    group: object
    world: int
    offset: int
    size: int
    vocab: int
    mesh: object


def is_dtensor(value) -> bool:
    return _DTENSOR is not None and isinstance(value, _DTENSOR)


def _placements(value) -> str:
    return f"placements {tuple(value.placements)} on a mesh of shape {tuple(value.device_mesh.shape)}"


def _shard_of(value, dim: int, name: str, what: str) -> VocabShard | None:
    """The vocabulary slice of DTensor `value` sharded on `dim` over one mesh dimension (Replicate on the others);
    None when it is replicated everywhere (then its local tensor is whole). Any other layout is refused by name."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dim = dim % value.dim()
    sharded = [i for i, p in enumerate(value.placements) if not p.is_replicate()]
    if not sharded:
        return None
    placement = value.placements[sharded[0]]
    if len(sharded) > 1 or not placement.is_shard(dim) or type(placement).__name__ != "Shard":
        raise ValueError(f"{name} is a DTensor with {_placements(value)}; the vocab-parallel functions take {what} "
                         f"sharded over the vocabulary on one mesh dimension, Shard({dim}) (ColwiseParallel's "
                         "layout), Replicate on any other")
    mesh_dim = sharded[0]
    shape, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
    vocab = value.shape[dim]
    if shape[dim] == 0:
        raise ValueError(f"{name}: the vocabulary ({vocab}) split over {value.device_mesh.size(mesh_dim)} ranks "
                         "leaves this rank an empty slice; use fewer ranks than vocabulary entries")
    return VocabShard(value.device_mesh.get_group(mesh_dim), value.device_mesh.size(mesh_dim), int(offsets[dim]),
                      int(shape[dim]), int(vocab), value.device_mesh)


def split_logits(logits):
    """(local logits, VocabShard or None) of the logits argument: a DTensor sharded on its last dimension, a
    replicated DTensor (whole on every rank) or a plain tensor."""
    if not is_dtensor(logits):
        return logits, None
    shard = _shard_of(logits, -1, "logits", "logits")
    return logits.to_local(), shard


def split_linear(hidden, weight, bias):
    """(hidden, weight, bias as local tensors, VocabShard or None, whether hidden was a plain tensor) of the fused-
    linear arguments. A weight sharded on its rows needs its bias sharded alike and hidden replicated over that mesh
    (a plain tensor, taken to be the same on every rank and checked so: `check_same_tokens`, or a Replicate DTensor).
    Without a DTensor weight, a DTensor anywhere is left to the usual checks, which refuse it by name."""
    if not is_dtensor(weight):
        return hidden, weight, bias, None, True
    shard = _shard_of(weight, 0, "weight", "the lm_head weight")
    if bias is not None:
        if not is_dtensor(bias) or bias.device_mesh != weight.device_mesh or (
                tuple(bias.placements) != tuple(weight.placements)):
            raise ValueError(f"bias must be sharded as the weight (a DTensor with the weight's "
                             f"{_placements(weight)}), got "
                             + (f"a DTensor with {_placements(bias)}" if is_dtensor(bias) else "a plain tensor"))
        bias = bias.to_local()
    plain_hidden = not is_dtensor(hidden)
    if not plain_hidden:
        if hidden.device_mesh != weight.device_mesh or any(not p.is_replicate() for p in hidden.placements):
            raise ValueError(f"hidden is a DTensor with {_placements(hidden)}; with the lm_head weight sharded over "
                             "the vocabulary the hidden states must be whole on every rank of the weight's mesh "
                             "(Replicate, or a plain tensor): redistribute sequence-parallel hidden states first, "
                             "hidden.redistribute(placements=[Replicate()])")
        hidden = hidden.to_local()
    return hidden, weight.to_local(), bias, shard, plain_hidden


def check_same_tokens(labels: torch.Tensor, shard: VocabShard) -> None:
    """A plain hidden tensor beside a sharded weight must hold the same tokens on every rank. A weight that is FSDP2's
    shard of a data-parallel head (each rank its own batch) looks the same as a tensor-parallel one; one all-reduce of
    four integers (the token count and a hash of the labels) tells them apart before anything depends on it."""
    flat = labels.reshape(-1).to(torch.int64)
    salt = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % 65521 + 1
    digest = int((flat * salt).sum()) if flat.numel() else 0
    probe = torch.tensor([flat.numel(), -flat.numel(), digest, -digest], dtype=torch.int64, device=labels.device)
    torch.distributed.all_reduce(probe, op=torch.distributed.ReduceOp.MAX, group=shard.group)
    if int(probe[0]) != -int(probe[1]) or int(probe[2]) != -int(probe[3]):
        raise ValueError("weight is sharded over the vocabulary (a DTensor), but hidden and labels differ between "
                         f"the {shard.world} ranks of its mesh, so the call is not vocab-parallel: with a tensor-"
                         "parallel head every rank passes the same tokens; if the weight is FSDP2's shard of a "
                         "data-parallel head, call the function as the head's forward, inside the model's forward: "
                         "rlhfv_kernels.head_forward(lm_head, rlhfv_kernels.linear_..., hidden, ...) "
                         "(docs/distributed.md)")


def kernel_labels(labels: torch.Tensor, shard: VocabShard, ignore_index: int):
    """(labels for the slice's kernels, owned, active): the local column where this slice holds the label, FAKE_COLUMN
    where another rank does, KERNEL_IGNORE where ignored."""
    labels = labels.to(torch.int64)
    active = labels != ignore_index
    local = labels - shard.offset
    owned = active & (local >= 0) & (local < shard.size)
    return torch.where(owned, local, torch.where(active, FAKE_COLUMN, KERNEL_IGNORE)), owned, active



def _all_gather(output, tensor, group):
    """torch.distributed.all_gather_single (torch >= 2.13; all_gather_into_tensor, its older name, warns there)."""
    gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    gather(output, tensor, group=group)


def combine(label_logit, lse_r, entropy_r, owned, active, shard: VocabShard, dtype):
    """(logp in `dtype`, lse float64, entropy or None) of every token from each slice's LSE (and entropy) and the
    label's logit (float64, from label_logit_of_logits / label_logit_of_linear): one all-gather."""
    columns = [torch.where(active, lse_r, 0.0), torch.where(owned, label_logit, 0.0)]
    if entropy_r is not None:
        columns.append(entropy_r.double())
    local = torch.stack([c.reshape(-1) for c in columns], -1)
    gathered = local.new_empty((shard.world * local.shape[0], local.shape[1]))
    _all_gather(gathered, local, group=shard.group)
    per_rank = gathered.view(shard.world, *local.shape)
    lse = torch.where(active.reshape(-1), torch.logsumexp(per_rank[..., 0], 0), 0.0)
    logp = torch.where(active.reshape(-1), per_rank[..., 1].sum(0) - lse, 0.0).to(dtype).view(lse_r.shape)
    entropy = None
    if entropy_r is not None:
        share = torch.exp(per_rank[..., 0] - lse)  # w_r; 0 for a slice whose logits are all -inf
        terms = torch.where(share > 0, share * (per_rank[..., 2] + (lse - per_rank[..., 0])), 0.0)
        entropy = torch.where(active.reshape(-1), terms.sum(0), 0.0).to(entropy_r.dtype).view(entropy_r.shape)
    return logp, lse.view(lse_r.shape), entropy


# Why the label's logit is formed again here rather than taken back from the kernel's log-prob (logp_r + lse_r):
# logp_r is already rounded to fp32, and rounding logp_r + lse_r - lse once more is off by up to an ulp of |logp|
# (2e-3 at |logits| ~ 1e4), where one process rounds once. From the logit itself logp is rounded once, as there.
def label_logit_of_logits(logits, local_labels, temperature: float, softcap: float):
    """z_y in float64 of each token from its own slice's logits (N values), transformed as the kernels do: x / t
    rounded to the working precision (fp32 below float64; csrc and tl.div_rn divide correctly rounded), the cap in
    float64."""
    x = logits.gather(-1, local_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    if softcap > 0:
        return _transformed(x, temperature, softcap)[0]
    if temperature == 1.0:
        return x.double()
    return (x.to(torch.promote_types(x.dtype, torch.float32)) / temperature).double()


def label_logit_of_linear(hidden, weight, bias, local_labels, owned, temperature: float, softcap: float,
                          chunk_rows: int):
    """z_y in float64 of each token this slice labels: hidden . W[y] (+ b[y]) in float64, chunk_rows tokens at a
    time (never more than chunk_rows x H float64 at once), then the transform."""
    x = torch.zeros(local_labels.shape, dtype=torch.float64, device=hidden.device)
    rows = owned.nonzero().squeeze(1)
    for start in range(0, rows.numel(), chunk_rows):
        these = rows[start:start + chunk_rows]
        columns = local_labels[these]
        x[these] = torch.linalg.vecdot(hidden[these].double(), weight[columns].double())
        if bias is not None:
            x[these] += bias[columns].double()
    return _transformed(x, temperature, softcap)[0]


def _transformed(x: torch.Tensor, temperature: float, softcap: float):
    """(z, dz/dx * temperature) of the kernels' transform (csrc/cpu softcapped: z = (c / t) tanh(x / c), slope
    sech^2(x / c); without a cap z = x / t, slope 1), in float64 on N values."""
    x = x.double()
    if softcap > 0:
        u = torch.tanh(x / softcap)
        return softcap / temperature * u, 1.0 - u * u
    return x / temperature, torch.ones_like(x)


def fake_column_gradient(x, lse, grad_logp, grad_entropy, entropy, temperature: float, softcap: float):
    """d(g logp + g_H H)/dx at a column that is not the label (what FAKE_COLUMN should hold for a foreign token):
    -slope * p (g + g_H (log p + H)) / t (DESIGN.md §2)."""
    z, slope = _transformed(x, temperature, softcap)
    logp = z - lse
    coef = grad_logp.double()
    if grad_entropy is not None:
        coef = coef + grad_entropy.double() * (logp + entropy.double())
    return -slope * torch.exp(logp) * coef / temperature


class ShardedLogps(torch.autograd.Function):
    """Log-probs (and entropies) of a vocabulary slice of the logits; see the module docstring."""

    @staticmethod
    def forward(ctx, logits, labels, shard, ignore_index, temperature, softcap, inplace_backward, backend,
                with_entropy):
        ops = _backend.operators(backend)
        local_labels, owned, active = kernel_labels(labels, shard, ignore_index)
        if with_entropy:
            logp_r, entropy_r, lse_r = ops.logprob_entropy_fwd(logits, local_labels, KERNEL_IGNORE, temperature,
                                                               softcap, False)
        else:
            (logp_r, lse_r), entropy_r = ops.logprob_fwd(logits, local_labels, KERNEL_IGNORE, temperature, softcap,
                                                         False), None
        z_y = label_logit_of_logits(logits, local_labels, temperature, softcap)
        logp, lse, entropy = combine(z_y, lse_r, entropy_r, owned, active, shard, logp_r.dtype)
        foreign = active & ~owned
        ctx.save_for_backward(logits, local_labels, lse, lse if entropy is None else entropy, foreign)
        ctx.args = (temperature, softcap)
        ctx.inplace_backward, ctx.ops, ctx.with_entropy = inplace_backward, ops, with_entropy
        return _outputs(logp, entropy)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        refuse_double_backward("rlhfv's vocab-parallel log-probs")
        logits, local_labels, lse, entropy, foreign = ctx.saved_tensors
        grad_logp = _zeros_if_none(grad_logp, lse, logits.dtype)
        out = slice_gradient(ctx.ops, logits, grad_logp, grad_entropy if ctx.with_entropy else None, local_labels,
                             lse, entropy, foreign, *ctx.args, inplace=ctx.inplace_backward)
        return out, None, None, None, None, None, None, None, None


def _outputs(logp, entropy):
    """A Function's two outputs: the log-probs and the entropies, or an empty tensor where none were asked for."""
    return logp, logp.new_zeros(0) if entropy is None else entropy


def _zeros_if_none(grad_logp, like, dtype):
    if grad_logp is not None:
        return grad_logp
    return torch.zeros_like(like, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def slice_gradient(ops, logits, grad_logp, grad_entropy, local_labels, lse, entropy, foreign, temperature, softcap,
                   *, inplace):
    """d(g logp + g_H H)/d logits of this slice, written by the backend's own backward kernels with the global LSE
    and entropy (into the logits' storage when inplace), then the foreign tokens' FAKE_COLUMN rewritten."""
    x = logits[..., FAKE_COLUMN][foreign]  # before an in-place backward overwrites it
    args = (KERNEL_IGNORE, temperature, softcap)
    if grad_entropy is None:
        if inplace:
            ops.logprob_bwd_(logits, grad_logp, local_labels, lse, *args)
        else:
            out = ops.logprob_bwd(grad_logp, logits, local_labels, lse, *args)
    elif inplace:
        ops.logprob_entropy_bwd_(logits, grad_logp, grad_entropy, local_labels, lse, entropy, *args)
    else:
        out = ops.logprob_entropy_bwd(grad_logp, grad_entropy, logits, local_labels, lse, entropy, *args)
    if inplace:
        torch.autograd.graph.increment_version(logits)
        out = logits
    column = out[..., FAKE_COLUMN]
    column[foreign] = fake_column_gradient(
        x, lse[foreign], grad_logp[foreign], None if grad_entropy is None else grad_entropy[foreign],
        None if grad_entropy is None else entropy[foreign], temperature, softcap).to(out.dtype)
    return out


class ShardedLinearLogps(torch.autograd.Function):
    """Log-probs (and entropies) of tokens (hidden [n, H], labels [n], none ignored) against a slice of the lm_head's
    rows; see the module docstring. d hidden is all-reduced over the slices."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, shard, ignore_index, temperature, softcap, chunk_rows, backend,
                with_entropy):
        ops = _backend.operators(backend)
        local_labels, owned, active = kernel_labels(labels, shard, ignore_index)
        args = (KERNEL_IGNORE, temperature, softcap, chunk_rows)
        if with_entropy:
            logp_r, entropy_r, lse_r = ops.linear_logprob_entropy_fwd(hidden, weight, bias, local_labels, *args)
        else:
            (logp_r, lse_r), entropy_r = ops.linear_logprob_fwd(hidden, weight, bias, local_labels, *args), None
        z_y = label_logit_of_linear(hidden, weight, bias, local_labels, owned, temperature, softcap, chunk_rows)
        logp, lse, entropy = combine(z_y, lse_r, entropy_r, owned, active, shard, logp_r.dtype)
        ctx.save_for_backward(hidden, weight, bias, local_labels, lse, lse if entropy is None else entropy,
                              active & ~owned)
        ctx.args, ctx.shard, ctx.ops, ctx.with_entropy = args, shard, ops, with_entropy
        return _outputs(logp, entropy)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        refuse_double_backward("rlhfv's vocab-parallel fused-linear log-probs")
        hidden, weight, bias, local_labels, lse, entropy, foreign = ctx.saved_tensors
        _, temperature, softcap, chunk_rows = ctx.args
        grad_logp = _zeros_if_none(grad_logp, lse, hidden.dtype)
        grad_entropy = grad_entropy if ctx.with_entropy else None
        # The backend's linear backward would round the fake column's one-hot term into its 16-bit dlogits before
        # the GEMMs, where it could not be taken back out exactly; so the chunks' logits are recomputed here and
        # their gradient written by the row kernels (slice_gradient), as that backward does inside.
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        dhidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dweight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        dbias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows]
            dlogits = slice_gradient(ctx.ops, F.linear(h, weight, bias), grad_logp[rows],
                                     None if grad_entropy is None else grad_entropy[rows], local_labels[rows],
                                     lse[rows], entropy[rows], foreign[rows], temperature, softcap, inplace=True)
            if dhidden is not None:
                dhidden[rows] = dlogits @ weight
            dlogits = dlogits.to(acc)
            dweight.addmm_(dlogits.T, h.to(acc))
            if dbias is not None:
                dbias += dlogits.sum(0)
        if dhidden is not None:  # each slice's part of the sum over the vocabulary
            torch.distributed.all_reduce(dhidden, group=ctx.shard.group)
        return (dhidden, dweight.to(weight.dtype), None if dbias is None else dbias.to(weight.dtype),
                None, None, None, None, None, None, None, None)
