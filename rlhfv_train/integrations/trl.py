"""Drop-ins for TRL's DPOTrainer and GRPOTrainer that compute the per-token log-probs and entropies with rlhfv's fused
kernels, while TRL's own loss code runs unchanged on them.

    from rlhfv_train.integrations.trl import DPOTrainer, GRPOTrainer, DDPOTrainer
    trainer = DPOTrainer(model=model, ref_model=ref, args=DPOConfig(loss_type=["sigmoid", "sft"], ...), ...)
    trainer = DDPOTrainer(..., gamma=5.0, ddpo_mode="mean")   # RLHF-V's Dense DPO on TRL's DPOTrainer
    trainer = GRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(loss_type="dapo", ...), ...)

How. TRL 1.16 computes every per-token quantity its losses need through one protocol: it patches the model with
`add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)` and calls `model(..., labels=labels,
fused_lm_head=True)`, which returns a `FusedCausalLMOutput` (log_probs, entropy, log_sum_sq_probs, mean_logits,
is_top1, label_mask, aux_loss, loss). The drop-ins install `add_fused_lm_head` below in its place while TRL's
constructor runs, so TRL asks for the outputs it needs and every loss option (DPO: each loss_type and loss_weights,
label_smoothing, f-divergences, ld_alpha, WPO weighting, the MoE aux loss, precomputed reference log-probs, PEFT
without ref_model; GRPO: each loss_type, importance sampling level, clipping, KL with bias correction, the entropy
mask and bonus) and every metric stays TRL's code, untouched. What changes is where the numbers come from:

- the logits route (default): the model's own forward gives the logits (its logit transform included, whatever the
  family), rk.token_logprobs(..., return_entropy=True) scores them in one pass and, in training, writes the gradient
  into the logits' own storage (inplace_backward): no fp32 log_softmax, no N x V gradient buffer;
- the fused-linear route (use_fused_linear=True): the body's hidden states and the lm_head weight go to
  rk.linear_token_logprobs (the model's softcap / logit scale read from its config, checked against its own logits
  on the first call), so the logits are never materialized. The metric-only fields (mean_logits, is_top1,
  log_sum_sq_probs) cost one extra no-grad GEMM pass in chunks on this route.

DDPO (DDPOTrainer, or DPOTrainer(gamma=..., ddpo_mode=...)): the fused head multiplies each completion token's
log-prob by its weight w (gamma on the tokens the annotator replaced, from the token diff of each pair's chosen and
rejected completions, rlhfv_train.data.token_weights.correction_weights; 1 elsewhere), and in "mean" mode divides by the
row's sum of w, so TRL's sum over the completion is the DDPO score S (DESIGN.md §2) for the policy, the reference
and precomputed reference log-probs alike. Every TRL use of the per-token log-probs then sees the weighted ones.

Padding-free (DPOConfig(padding_free=True), which TRL 1.16 itself turns off): the fused head packs each batch's
sequences back to back (rlhfv_train/data/packed_rows.py, max_tokens_per_row per row), runs the model on the packed rows
and hands TRL the padded layout's per-token fields, so TRL's loss code is unchanged; the packed forward is checked
against the padded one on the first batch and a model where they differ is refused (models/packed_model.py).

Options no route can honour raise at construction, naming the option. Tested against TRL's own trainers on the same
batches (tests/train/test_trl_dropin.py). Written against TRL's internals; SUPPORTED_TRL is the tested range, and
another version fails at import of this module.
"""
from __future__ import annotations

import contextlib
import functools
import math
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import rlhfv_kernels as rk

from ..data.packed_rows import check_max_tokens_per_row
from ..data.token_weights import correction_weights

SUPPORTED_TRL = ("1.16.0", "1.17.0")  # [lowest tested, first untested)


def _check_trl_version():
    import trl
    from packaging.version import Version

    low, high = (Version(v) for v in SUPPORTED_TRL)
    if not low <= Version(trl.__version__) < high:
        raise ImportError(f"rlhfv_train.integrations.trl is written against TRL's internals and tested with trl >= "
                          f"{SUPPORTED_TRL[0]}, < {SUPPORTED_TRL[1]}; found trl {trl.__version__}. Install a tested "
                          f"version (pip install 'trl>={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]}').")
    return trl


trl = _check_trl_version()
from trl.trainer import dpo_trainer as _trl_dpo, grpo_trainer as _trl_grpo  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

FUSED_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
DDPO_MODES = ("sum", "mean")
_STATS_CHUNK_BYTES = 64 << 20  # fp32 logits per chunk of the metric-only fields


def completion_token_weights(input_ids: torch.Tensor, completion_mask: torch.Tensor, gamma: float,
                             min_match: int = 3) -> torch.Tensor:
    """[2B, T] weights aligned with input_ids (the B chosen rows, then the B rejected rows): correction weights on
    completion tokens, 0 elsewhere."""
    weights = torch.zeros(input_ids.shape, dtype=torch.float32)
    pairs = input_ids.shape[0] // 2
    mask = completion_mask.bool().cpu()
    ids = input_ids.cpu()
    for i in range(pairs):
        rows = (i, pairs + i)
        positions = [mask[r].nonzero().squeeze(-1) for r in rows]
        completions = [ids[r, p].tolist() for r, p in zip(rows, positions)]
        for r, p, w in zip(rows, positions, correction_weights(completions[0], completions[1], gamma, min_match)):
            weights[r, p] = torch.tensor(w, dtype=torch.float32)
    return weights.to(input_ids.device)


@dataclass(frozen=True)
class DDPOWeights:
    """Per-token multipliers of the log-probs for TRL's preference batches [chosen; rejected] (see the docstring)."""

    gamma: float = 1.0
    mode: str = "sum"
    min_match: int = 3

    def __call__(self, targets: torch.Tensor) -> torch.Tensor:
        """targets: the shifted labels [2B, T], -100 outside the completions."""
        if targets.shape[0] % 2:
            raise ValueError(f"DDPO weights need a preference batch of 2B rows (chosen, then rejected), got "
                             f"{targets.shape[0]} rows")
        mask = targets != -100
        weights = completion_token_weights(targets.clamp(min=0), mask, self.gamma, self.min_match)
        if self.mode == "mean":
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        return weights


@dataclass(frozen=True)
class FusedHeadOptions:
    """How rlhfv's fused head computes TRL's per-token fields (see the module docstring)."""

    use_fused_linear: bool = False
    inplace_backward: bool = True  # logits route, in training: the gradient overwrites the model's logits
    backend: str | None = None     # rlhfv_kernels backend; None: the best for the device
    chunk_size: int | None = None  # fused-linear route: tokens per chunk (None: rlhfv's default budget)
    token_weights: Callable[[torch.Tensor], torch.Tensor] | None = None  # shifted labels -> multipliers of logp
    padding_free: bool = False     # the batch's sequences packed into rows (data/packed_rows.py) for the forward
    max_tokens_per_row: int | None = None  # their capacity; None: the batch's longest sequence


def _row_chunks(rows: int, vocab: int):
    step = max(1, _STATS_CHUNK_BYTES // (4 * max(vocab, 1)))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


@torch.no_grad()
def _metric_fields(logits_of, rows: int, vocab: int, targets: torch.Tensor, temperature: float, wanted) -> dict:
    """mean_logits, is_top1, log_sum_sq_probs (those in `wanted`) of flat rows, a chunk of fp32 logits at a time
    (logits_of(slice) -> [n, V], the transformed logits before the temperature). No gradient: TRL logs them."""
    fields = {name: [] for name in ("mean_logits", "is_top1", "log_sum_sq_probs") if name in wanted}
    for rows_slice in _row_chunks(rows, vocab):
        z = logits_of(rows_slice).float()
        if temperature != 1.0:
            z = z / temperature
        if "mean_logits" in fields:
            fields["mean_logits"].append(z.mean(-1))
        if "is_top1" in fields:  # argmax takes the first of tied maxima, as TRL's kernel does
            fields["is_top1"].append(z.argmax(-1) == targets[rows_slice])
        if "log_sum_sq_probs" in fields:
            log_p = torch.log_softmax(z, -1)
            fields["log_sum_sq_probs"].append(torch.logsumexp(2 * log_p, -1))
    empty = {"is_top1": torch.bool}  # (no labelled row at all: empty fields, scattered to zeros by the caller)
    return {name: torch.cat(parts) if parts else torch.empty(0, dtype=empty.get(name, torch.float32),
                                                            device=targets.device)
            for name, parts in fields.items()}


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), *,
                      options: FusedHeadOptions = FusedHeadOptions()) -> None:
    """TRL's `add_fused_lm_head` protocol (trl.trainer.utils) on rlhfv's kernels: afterwards
    `model(..., labels=labels, fused_lm_head=True)` returns a FusedCausalLMOutput with the fields in `outputs`;
    without fused_lm_head=True the model's own forward runs. Add it before wrapping the model with PEFT, as TRL's."""
    unknown = set(outputs) - set(FUSED_OUTPUTS)
    if unknown:
        raise ValueError(f"outputs: unknown fields {sorted(unknown)}; known: {FUSED_OUTPUTS}")
    if cast_lm_head_to_fp32:
        raise ValueError("cast_lm_head_to_fp32=True is not supported by rlhfv's fused head: the kernels accumulate "
                         "in fp32 from the head's own dtype; set cast_lm_head_to_fp32=False")
    original_forward = model.forward
    text_config = model.config.get_text_config()
    wants_entropy = "entropy" in outputs

    @functools.wraps(type(model).forward)
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                       **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels): the per-token fields are those of "
                             "the labels' tokens")
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        targets = labels[:, 1:] if shift_labels is None else shift_labels
        # aligned[:, t] is the target of position t's logits (the last position has none when shifted here)
        aligned = F.pad(targets, (0, 1), value=-100) if shift_labels is None else targets
        packed, padded_shape = None, aligned.shape
        if options.padding_free:  # padding-free: the sequences back to back, no padding run
            kwargs, aligned, packed = _packed(self, args, kwargs, aligned, options.max_tokens_per_row)
        route = (functools.partial(_score_hidden, self, original_forward) if options.use_fused_linear
                 else functools.partial(_score_logits, original_forward))
        fields, aux_loss = route(args, kwargs, aligned, temperature, wants_entropy, outputs, options)
        if packed is not None:
            fields = {name: packed.unpack(value, padded_shape, fill=0) for name, value in fields.items()}
        if shift_labels is None:
            fields = {name: value[:, :-1] for name, value in fields.items()}
        mask = targets != -100
        log_probs = fields["log_probs"]
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if aux_loss is not None:
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        if options.token_weights is not None:
            log_probs = log_probs * options.token_weights(targets).to(log_probs.dtype)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=fields.get("entropy"),
                                   log_sum_sq_probs=fields.get("log_sum_sq_probs"),
                                   mean_logits=fields.get("mean_logits"), is_top1=fields.get("is_top1"),
                                   label_mask=mask, aux_loss=aux_loss)

    model.forward = types.MethodType(_fused_forward, model)


def _scattered(values: dict, mask: torch.Tensor) -> dict:
    """Fields computed at the positions where `mask` holds (in row-major order) placed into zeros (False) of mask's
    shape, as TRL's protocol has them; masked_scatter keeps an all-ignored batch connected to the graph."""
    return {name: value.new_zeros(mask.shape).masked_scatter(mask, value) for name, value in values.items()}


def _packed(model, args, kwargs, aligned, max_tokens_per_row):
    """(the model inputs with the batch's sequences packed into rows, the targets packed alike, the PackedRows), the
    packed forward checked against the padded one on the first batch (models/packed_model.check_packing)."""
    from ..data.inputs import model_kwargs, with_row_counts
    from ..data.packed_rows import pack_for_loss
    from ..models.packed_model import check_packing, mrope_index

    if args:
        raise ValueError("rlhfv fused head, padding_free=True: pass the model inputs as keyword arguments")
    if "attention_mask" not in kwargs:
        raise ValueError("rlhfv fused head, padding_free=True: the batch has no attention_mask to find its sequences")
    # flat image tensors (InternVL's tiles, Qwen-VL's patches) split by sequence through their placeholder tokens
    tensors = with_row_counts({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}, model.config)
    if not getattr(model, "_rlhfv_packing_checked", False):
        check_packing(model, tensors)
        model._rlhfv_packing_checked = True
    inputs, (aligned,), _, rows = pack_for_loss(tensors, [aligned], max_tokens_per_row, mrope_index(model))
    others = {k: v for k, v in kwargs.items() if k not in tensors}
    return {**others, **model_kwargs(inputs)}, aligned, rows


def _score_logits(forward, args, kwargs, padded, temperature, wants_entropy, outputs, options):
    """The logits route: the model's own logits, scored in place against `padded` (the targets aligned with the
    logits: labels are shifted, not the logits, since a sliced logits view would cost an N x V gradient copy in
    backward)."""
    model_out = forward(*args, **kwargs)
    logits = model_out.logits
    if logits.shape[:-1] != padded.shape:
        raise ValueError(f"rlhfv fused head: the model returned logits for {tuple(logits.shape[:-1])} positions "
                         f"but the labels cover {tuple(padded.shape)} (prompt-learning PEFT adds virtual tokens; "
                         "not supported by the logits route)")
    inplace = options.inplace_backward and torch.is_grad_enabled() and logits.requires_grad
    scored = rk.token_logprobs(logits, padded, temperature=temperature, return_entropy=wants_entropy,
                               inplace_backward=inplace, backend=options.backend)
    log_probs, entropy = scored if wants_entropy else (scored, None)
    fields = {"log_probs": log_probs}
    if entropy is not None:
        fields["entropy"] = entropy
    # The metric-only fields at the labelled positions only (prompt and image tokens cost nothing).
    vocab, active = logits.shape[-1], padded != -100
    index = active.reshape(-1).nonzero().squeeze(1)
    flat = logits.detach().reshape(-1, vocab)
    metrics = _metric_fields(lambda rows: flat.index_select(0, index[rows]), index.numel(), vocab,
                             padded.reshape(-1).index_select(0, index), temperature, outputs)
    fields.update(_scattered(metrics, active))
    return fields, getattr(model_out, "aux_loss", None)


def _score_hidden(model, original_forward, args, kwargs, targets, temperature, wants_entropy, outputs, options):
    """The fused-linear route: the body's hidden states and the lm_head, only the positions with a label (targets
    aligned with the hidden states). This runs inside the model's forward (TRL calls it through accelerate's
    wrappers), and the head's part as the head's forward (adapter.head_call): under FSDP2 or ZeRO-3 the weight it
    sees is the gathered one, and its gradient goes back through the wrapper's reduction."""
    from ..models import adapter

    if kwargs.get("output_router_logits"):
        raise ValueError("rlhfv fused head: the MoE router aux loss is not available on the fused-linear route; "
                         "use the logits route (use_fused_linear=False)")
    if args:
        raise ValueError("rlhfv fused head: pass the model inputs as keyword arguments")
    if not getattr(model, "_rlhfv_route_checked", False):
        adapter.check_fused_linear(model, {k: v for k, v in kwargs.items() if k != "use_cache"},
                                   inside_forward=original_forward)
        model._rlhfv_route_checked = True
    hidden = adapter.body_hidden(model, kwargs)
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"rlhfv fused head: hidden states cover {tuple(hidden.shape[:-1])} positions but the labels "
                         f"{tuple(targets.shape)}")
    mask = targets != -100
    index = mask.reshape(-1).nonzero().squeeze(1)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    picked_targets = targets.reshape(-1).index_select(0, index)

    def fields(picked, weight, bias=None, low_rank=None, **transform):
        scored = rk.linear_token_logprobs(picked, weight, picked_targets, bias=bias, low_rank=low_rank,
                                          temperature=temperature, chunk_size=options.chunk_size,
                                          backend=options.backend, return_entropy=wants_entropy, **transform)
        per_token = dict(zip(("log_probs", "entropy"), scored if wants_entropy else (scored,)))

        def logits_of(rows):  # (no gradient: TRL logs these fields)
            low = None if low_rank is None else (low_rank[0][rows], low_rank[1])
            return adapter.head_logits(picked[rows], weight, bias, low_rank=low, **transform)

        per_token.update(_metric_fields(logits_of, picked.shape[0], weight.shape[0], picked_targets, temperature,
                                        outputs))
        return per_token

    return _scattered(adapter.head_call(model, fields, picked), mask), None


@contextlib.contextmanager
def _fused_heads_from_rlhfv(trainer_module, options: FusedHeadOptions):
    """While TRL's constructor runs, its `add_fused_lm_head` is rlhfv's (with `options`)."""
    original = trainer_module.add_fused_lm_head
    trainer_module.add_fused_lm_head = functools.partial(add_fused_lm_head, options=options)
    try:
        yield
    finally:
        trainer_module.add_fused_lm_head = original


@contextlib.contextmanager
def _attribute(obj, name, value):
    """obj.name = value for the duration (restored after)."""
    if not hasattr(obj, name):
        yield
        return
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def _config_of(args, kwargs):
    config = kwargs.get("args", args[2] if len(args) > 2 else None)
    if config is None:
        raise ValueError("args: pass the trainer's config (DPOConfig / GRPOConfig) explicitly; the drop-ins check "
                         "its options before TRL's constructor runs")
    return config


def _check_options(options: FusedHeadOptions, gamma: float = 1.0, min_match: int = 3) -> None:
    """Every drop-in option's type and range, before TRL's constructor runs (each would otherwise fail, or train to
    NaN, at the first step)."""
    for name in ("use_fused_linear", "inplace_backward"):
        if not isinstance(getattr(options, name), bool):
            raise TypeError(f"{name} must be True or False, got {getattr(options, name)!r}")
    if options.backend is not None and options.backend not in (*rk.BACKENDS, *rk.RENAMED_BACKENDS):
        raise ValueError(f"backend must be one of {rk.BACKENDS} or None, got {options.backend!r}")
    for name, value in (("chunk_size", options.chunk_size), ("min_match", min_match)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int{' or None' if name == 'chunk_size' else ''}, got "
                             f"{value!r}")
    if options.chunk_size is not None and not options.use_fused_linear:
        raise ValueError("chunk_size applies to the fused-linear route only (use_fused_linear=True)")
    if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")


def _check_on_model(trainer) -> None:
    """What needs the model TRL built: the backend runs on the training device, and the fused-linear route finds a
    plain nn.Linear lm_head without an adapter (models/adapter.py)."""
    options = trainer.rlhfv_options
    path = "linear" if options.use_fused_linear else "logits"
    if options.backend is not None:
        rk.resolve_backend(options.backend, trainer.args.device, path)
    if options.use_fused_linear:
        from ..models import adapter
        adapter.body_and_head(trainer.model)


def _refuse_on_fused_linear(options: FusedHeadOptions, model, config) -> None:
    if not options.use_fused_linear:
        return
    text = getattr(getattr(model, "config", None), "get_text_config", lambda: None)()
    if text is not None and getattr(text, "output_router_logits", False) and \
            getattr(config, "router_aux_loss_coef", 0.0) != 0.0:
        raise ValueError("use_fused_linear=True: the MoE router aux loss (router_aux_loss_coef != 0) is not "
                         "available on the fused-linear route; use the logits route or set router_aux_loss_coef=0")


class DPOTrainer(trl.DPOTrainer):
    """TRL's DPOTrainer with the per-token log-probs from rlhfv's fused kernels (see the module docstring).

    use_fused_linear: score from hidden states + lm_head (logits never materialized) instead of the model's logits.
    inplace_backward: logits route only, write dlogits into the logits (default True). backend / chunk_size: of
    rlhfv_kernels. gamma, ddpo_mode ("sum" | "mean"), min_match: DDPO token weights (gamma=1 and "sum": plain TRL).
    DPOConfig(padding_free=True) is honoured (TRL 1.16 itself falls back to padding): each batch's sequences run
    packed into rows of max_tokens_per_row tokens (None: the longest sequence; rlhfv_train/data/packed_rows.py;
    checked against the padded forward on the first batch, refused for a model where they differ), and TRL's loss
    sees the padded layout's numbers.
    """

    def __init__(self, *args, use_fused_linear: bool = False, inplace_backward: bool = True,
                 backend: str | None = None, chunk_size: int | None = None, gamma: float = 1.0,
                 ddpo_mode: str = "sum", min_match: int = 3, max_tokens_per_row: int | None = None, **kwargs):
        config = _config_of(args, kwargs)
        padding_free = bool(getattr(config, "padding_free", False))
        check_max_tokens_per_row(max_tokens_per_row, padding_free)
        if ddpo_mode not in DDPO_MODES:
            raise ValueError(f"ddpo_mode must be one of {DDPO_MODES}, got {ddpo_mode!r}")
        weights = None if gamma == 1.0 and ddpo_mode == "sum" else DDPOWeights(gamma, ddpo_mode, min_match)
        self.rlhfv_options = FusedHeadOptions(use_fused_linear, inplace_backward, backend, chunk_size, weights,
                                              padding_free, max_tokens_per_row)
        _check_options(self.rlhfv_options, gamma, min_match)
        _refuse_on_fused_linear(self.rlhfv_options, kwargs.get("model", args[0] if args else None), config)
        # padding_free=True is honoured by the fused head (TRL 1.16 would warn and pad): TRL's constructor sees False
        with _fused_heads_from_rlhfv(_trl_dpo, self.rlhfv_options), _attribute(config, "padding_free", False):
            super().__init__(*args, **kwargs)
        _check_on_model(self)


class DDPOTrainer(DPOTrainer):
    """RLHF-V's Dense DPO on TRL's DPOTrainer: DPOTrainer with the paper's defaults gamma=5, ddpo_mode="mean"
    (pair them with DPOConfig(beta=0.5))."""

    def __init__(self, *args, gamma: float = 5.0, ddpo_mode: str = "mean", **kwargs):
        super().__init__(*args, gamma=gamma, ddpo_mode=ddpo_mode, **kwargs)


class GRPOTrainer(trl.GRPOTrainer):
    """TRL's GRPOTrainer with the per-token log-probs and entropies from rlhfv's fused kernels (module docstring).

    Options as DPOTrainer's, without the DDPO weights. TRL's generation, rewards, advantages and loss are unchanged.
    """

    def __init__(self, *args, use_fused_linear: bool = False, inplace_backward: bool = True,
                 backend: str | None = None, chunk_size: int | None = None, **kwargs):
        config = _config_of(args, kwargs)
        if getattr(config, "cast_lm_head_to_fp32", False):
            raise ValueError("cast_lm_head_to_fp32=True is not supported by rlhfv's fused head (the kernels "
                             "accumulate in fp32 from the head's dtype); set it to False")
        self.rlhfv_options = FusedHeadOptions(use_fused_linear, inplace_backward, backend, chunk_size)
        _check_options(self.rlhfv_options)
        _refuse_on_fused_linear(self.rlhfv_options, kwargs.get("model", args[0] if args else None), config)
        with _fused_heads_from_rlhfv(_trl_grpo, self.rlhfv_options):
            super().__init__(*args, **kwargs)
        _check_on_model(self)
