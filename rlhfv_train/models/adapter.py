"""What the fused-linear route needs to know about a Hugging Face model, in one place: the model under its wrappers
(PEFT, DDP, torch.compile), its body, its lm_head (weight, bias) and the final logit transform it applies after the
head (DESIGN.md §2), read from its config:

    final_logit_softcapping  z = c * tanh(z / c)             Gemma 2/3, PaliGemma (text config), VaultGemma, ...
    logit_scale              z = s * z                        Cohere, Cohere2
    logits_scaling           z = z / s                        Granite, GraniteMoE, Granite vision (text config)
    output_multiplier        z = m * z, before the soft cap   Muse

A family whose logits the fused route cannot reproduce is refused with a clear error (UnsupportedModelError), never
trained as a silently different model: check_fused_linear compares the route with the model's own `.logits` once,
before training, and catches transforms no config field announces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import rlhfv_kernels as rk

from ..data.inputs import model_kwargs
from .forward import autocast_to, forward_logits


class UnsupportedModelError(ValueError):
    """The fused-linear route cannot reproduce this model's logits."""


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap * tanh(logit_scale * x / softcap) (z = logit_scale * x without a cap), x = hidden @ W.T + b."""

    softcap: float | None = None
    logit_scale: float = 1.0

    def options(self) -> dict:
        """The keyword arguments of rlhfv_kernels' functions that apply this transform in the kernels."""
        return {"softcap": self.softcap, "logit_scale": self.logit_scale}

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The transform in eager PyTorch (for checks; the kernels never materialize it)."""
        z = logits * self.logit_scale if self.logit_scale != 1.0 else logits
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap is not None else z


@dataclass(frozen=True)
class LmHead:
    """The lm_head's parameters and the transform after it: the inputs of rk.linear_*(hidden, weight, ...)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: LogitTransform

    def options(self) -> dict:
        """bias, softcap and logit_scale for rk.linear_*."""
        return {"bias": self.bias, **self.transform.options()}


def unwrap(model):
    """The transformers model inside DDP and DeepSpeed's engine (.module), torch.compile (._orig_mod) and PEFT
    (.get_base_model()) wrappers. PEFT's adapters live inside the base model's layers, so calling the unwrapped model
    still applies them. (FSDP2 shards the model in place: no wrapper.)"""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
            if inner is model:
                return model
            model = inner
        else:
            return model


def _config_value(config, name):
    """config.<name>, else the text config's (a VLM keeps its language model's settings there), else None."""
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        text = config.get_text_config()
        if text is not config:
            value = getattr(text, name, None)
    return value


def logit_transform(model) -> LogitTransform:
    """The final logit transform of `model` (wrappers allowed), from its config."""
    base = unwrap(model)
    config = base.config
    family = type(base).__name__
    scale = 1.0
    for name, invert in (("logit_scale", False), ("logits_scaling", True), ("output_multiplier", False)):
        value = _config_value(config, name)
        if value is None or value == 1.0:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise UnsupportedModelError(f"{family}: config.{name} = {value!r} is not a positive number; the "
                                        "fused-linear route cannot reproduce this model's logits")
        scale *= 1.0 / value if invert else float(value)
    softcap = _config_value(config, "final_logit_softcapping")
    if softcap is not None:
        if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not softcap > 0:
            raise UnsupportedModelError(f"{family}: config.final_logit_softcapping = {softcap!r} is not a positive "
                                        "number; the fused-linear route cannot reproduce this model's logits")
        softcap = float(softcap)
    return LogitTransform(softcap=softcap, logit_scale=scale)


def body_and_head(model):
    """(body, lm_head module) of a Hugging Face model: the body returns the last hidden states, the head is a plain
    nn.Linear or a PEFT LoRA layer over one (lora_adapters). Anything else is refused."""
    base = unwrap(model)
    family = type(base).__name__
    body = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if body is None or head is None:
        raise UnsupportedModelError(f"--fused-linear needs a model with .model (the body) and an output embedding "
                                    f"(lm_head); {family} has no such split")
    lora_adapters(head, family)  # refuses the PEFT layers the route cannot reproduce
    if not isinstance(getattr(head, "base_layer", head), torch.nn.Linear):
        raise UnsupportedModelError(f"{family}: the lm_head is a {type(head).__name__}, not an nn.Linear; the "
                                    "fused-linear route needs its weight [V, H] and bias")
    return body, head


def lora_adapters(head, family: str = "the model") -> list | None:
    """None for a head without adapters; for a PEFT LoRA layer on the head, its active adapters as (lora_A, lora_B
    weight, dropout, scaling), empty when the adapters are disabled (the reference) or merged into the base weight.
    The fused-linear route computes base(x) + scaling * B(A(dropout(x))) in the same fused pass, as the kernels'
    low-rank term (head_call): x @ W.T + u @ B.T, u = scaling * A(dropout(x)). A LoRA variant (DoRA, ...), a bias
    on B and any other PEFT layer are refused: that term would not give the model's logits."""
    if not hasattr(head, "base_layer") and not hasattr(head, "lora_A"):
        return None
    if not (hasattr(head, "lora_A") and hasattr(head, "lora_B") and isinstance(head.base_layer, torch.nn.Linear)):
        raise UnsupportedModelError(
            f"{family}: the lm_head carries a PEFT adapter ({type(head).__name__}) other than LoRA on an nn.Linear; "
            "the fused-linear route cannot apply it. Leave lm_head out of the adapter's target modules, or train "
            "without --fused-linear")
    if head.disable_adapters or head.merged:
        return []
    adapters = []
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if name in getattr(head, "lora_variant", {}) or head.lora_B[name].bias is not None:
            raise UnsupportedModelError(
                f"{family}: the lm_head's LoRA adapter {name!r} is a variant (DoRA, ...) or has a bias on lora_B; the "
                "fused-linear route computes plain LoRA only. Train without --fused-linear")
        adapters.append((head.lora_A[name], head.lora_B[name].weight, head.lora_dropout[name], head.scaling[name]))
    return adapters


def body_hidden(model, inputs: dict, autocast_dtype=None) -> torch.Tensor:
    """The last hidden states of the model's body on `inputs` (under autocast to `autocast_dtype` when given)."""
    body, _ = body_and_head(model)
    with autocast_to(inputs, autocast_dtype):
        outputs = body(**model_kwargs(inputs))
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]


def tensor_parallel_head(head) -> bool:
    """Whether `head` is sharded over the vocabulary by tensor parallelism: its weight a DTensor that no FSDP2 unit of
    its own gathers (inside the model's forward, FSDP2's root unit has gathered the weight of a head it holds)."""
    if not is_dtensor(head.weight):
        return False
    from torch.distributed.fsdp import FSDPModule
    return not isinstance(head, FSDPModule)


def is_dtensor(value) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(value, DTensor)


def head_call(model, function, hidden: torch.Tensor, *args, **options):
    """function(hidden, lm_head.weight, *args, bias=, softcap=, logit_scale=, **options) — an rk.linear_* function,
    or any function of those arguments — computed as the lm_head's forward (rk.head_forward: the weight a wrapper
    gathers there, never a shard). Under autocast the head comes in the hidden states' dtype. A LoRA adapter on the
    head enters the same fused pass as function(..., low_rank=(u, B)), u = scaling * lora_A(dropout(hidden)) (the
    active adapters' side by side): rk.linear_*'s low-rank term. Call it where the head's parent has gathered its
    parameters: inside the model's forward (fused_linear_forward)."""
    _, head = body_and_head(model)
    options = {**logit_transform(model).options(), **options}

    def in_hidden_dtype(h, weight, *rest, bias=None, **kwargs):
        if h.dtype != weight.dtype:  # autocast: the body ran in bf16, the head weight is fp32
            weight, bias = weight.to(h.dtype), None if bias is None else bias.to(h.dtype)
        return function(h, weight, *rest, bias=bias, **kwargs)

    adapters = lora_adapters(head)
    if adapters is None and tensor_parallel_head(head):
        # the weight stays sharded over the vocabulary (no hook gathers it) and the kernels take it as it is; the
        # head's own forward would all-gather the logits (transformers' colwise_gather_output), so it is not called
        return in_hidden_dtype(hidden, head.weight, *args, bias=head.bias, **options)
    if adapters is None:
        return rk.head_forward(head, in_hidden_dtype, hidden, *args, **options)
    base = head.base_layer

    def with_adapters(h):
        rk.check_not_sharded(base.weight, "the lm_head's base weight")
        if not adapters:  # disabled (the reference) or merged
            return in_hidden_dtype(h, base.weight, *args, bias=base.bias, **options)
        low = torch.cat([(lora_a(dropout(h.to(lora_a.weight.dtype))) * scaling).to(h.dtype)
                         for lora_a, _, dropout, scaling in adapters], -1)
        low_weight = torch.cat([lora_b.to(h.dtype) for _, lora_b, _, _ in adapters], 1)
        return in_hidden_dtype(h, base.weight, *args, bias=base.bias, low_rank=(low, low_weight), **options)

    return rk.run_as_forward(head, with_adapters, hidden)


def fused_linear_forward(model, inputs: dict, function, *args, autocast_dtype=None, **options):
    """head_call(model, function, body_hidden(model, inputs), *args, **options) computed inside the model's own
    forward, called through `model` — whatever wraps it (DDP, FSDP2, PEFT) sees an ordinary forward, gathers the
    parameters, hooks the backward and reduces the gradients as it would for model(**inputs). This is how the
    trainers run the fused-linear route (DESIGN.md §3, "Sharded heads")."""
    def forward(**received):
        # the inputs as the wrappers handed them on (FSDP2's MixedPrecisionPolicy casts them), without the defaults
        # a wrapper adds for its own forward's signature (PEFT's labels=None, ...)
        hidden = body_hidden(model, {name: received[name] for name in inputs if name in received}, autocast_dtype)
        return head_call(model, function, hidden, *args, **options)

    return rk.run_as_forward(unwrap(model), forward, caller=model, **model_kwargs(inputs))


def hidden_and_head(model, inputs: dict, autocast_dtype=None):
    """(last hidden states, LmHead) of a Hugging Face model in one process, without computing the logits: the inputs
    of rk.linear_*(hidden, head.weight, labels, ..., **head.options()). Under FSDP2 or ZeRO-3 the weight read here
    is a shard (which the kernels refuse): use fused_linear_forward there. Under autocast the head comes in the body's
    dtype."""
    _, head = body_and_head(model)
    if lora_adapters(head) is not None:
        raise UnsupportedModelError("the lm_head carries a PEFT adapter (LoRA), which no single weight holds; use "
                                    "fused_linear_forward, which adds it to the fused product as a low-rank term")
    hidden = body_hidden(model, inputs, autocast_dtype)
    weight, bias = head.weight, head.bias
    if hidden.dtype != weight.dtype:  # autocast: the body ran in bf16, the head weight is fp32
        weight, bias = weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)
    return hidden, LmHead(weight, bias, logit_transform(model))


def head_logits(hidden, weight, bias=None, *, softcap=None, logit_scale=1.0, low_rank=None):
    """The logits the fused-linear route stands for, in eager PyTorch, in the inputs' dtype: the final transform of
    hidden @ W.T + b (+ u @ B.T, a LoRA adapter on the head) — for checks and metrics; a head_call function."""
    logits = F.linear(hidden, weight, bias)
    if low_rank is not None:
        logits = logits + low_rank[0] @ low_rank[1].t()
    return LogitTransform(softcap, logit_scale).apply(logits)


def _route_logits(hidden, weight, bias=None, low_rank=None, **transform):
    """(head_logits in fp32, whether the head computes in a 16-bit dtype): check_fused_linear's side of the
    comparison, as a head_call function."""
    up = [None if t is None else t.float() for t in (bias, *(low_rank or ()))]
    logits = head_logits(hidden.float(), weight.float(), up[0], low_rank=tuple(up[1:]) or None, **transform)
    return logits, torch.tensor(hidden.dtype != torch.float32)


@torch.no_grad()
def check_fused_linear(model, inputs: dict, autocast_dtype=None, *, inside_forward=None) -> float:
    """Compares the fused-linear route's logits (the transform of hidden @ W.T + b) with the model's own `.logits`
    on one batch, where attention_mask is 1; returns the largest difference, or raises UnsupportedModelError when it
    exceeds what the dtype's rounding explains (the model applies something after its head that we do not know).
    Both sides go through the model's wrappers as the training steps will. inside_forward: for a caller already
    inside the model's forward (the TRL drop-in's fused head), the model's own forward without the wrappers' hooks;
    both sides are then computed there."""
    was_training = unwrap(model).training
    model.eval()  # dropout off: both forwards must see the same network
    try:
        if inside_forward is None:
            own = forward_logits(model, inputs, autocast_dtype).float()
            ours, low_precision = fused_linear_forward(model, inputs, _route_logits, autocast_dtype=autocast_dtype)
        else:
            own = forward_logits(inside_forward, inputs, autocast_dtype).float()
            ours, low_precision = head_call(model, _route_logits, body_hidden(model, inputs, autocast_dtype))
    finally:
        model.train(was_training)
    mask = inputs.get("attention_mask")
    keep = (mask.bool() if mask is not None and mask.shape == own.shape[:-1]
            else torch.ones(own.shape[:-1], dtype=torch.bool, device=own.device))
    if own.shape != ours.shape:
        raise UnsupportedModelError(f"{type(unwrap(model)).__name__}: the body's hidden states give logits of shape "
                                    f"{tuple(ours.shape)}, the model's own are {tuple(own.shape)}")
    own, ours = own[keep], ours[keep]
    diff = float((own - ours).abs().max()) if own.numel() else 0.0
    magnitude = float(own.abs().max()) if own.numel() else 0.0
    # fp32: summation order only; 16-bit: the model's own logits are rounded to the head's dtype (2**-8 in bf16).
    autocast = autocast_dtype is not None or torch.is_autocast_enabled(own.device.type)
    rounding = 2.0 ** -7 if autocast or bool(low_precision) else 1e-5
    if not diff <= 1e-4 + rounding * max(magnitude, 1.0):
        transform = logit_transform(model)
        raise UnsupportedModelError(
            f"{type(unwrap(model)).__name__}: its logits differ by {diff:.3g} (largest |logit| {magnitude:.3g}) from "
            f"its lm_head's output under the transform read from its config (softcap={transform.softcap}, "
            f"logit_scale={transform.logit_scale}): it applies something after the head that the fused-linear route "
            "cannot reproduce. Train without --fused-linear")
    return diff
