"""The model side of packed training (data/packed_rows.py lays out the batches): a model's own 3-D position ids for
mRoPE families, and the check that a model keeps packed sequences apart, run once before training."""
from __future__ import annotations

import inspect

import torch

from ..data.inputs import select_rows
from ..data.packed_rows import pack_batch, padded_lengths
from .adapter import UnsupportedModelError, unwrap
from .forward import forward_logits

# Families (config.model_type) whose packed forward is wrong in a way one batch may not show, from the transformers
# release named (seen on 5.23.0 and 5.24.0; on 5.17.0-5.22.2 gemma3's packed training equals the padded one, and the
# comparison below still guards those releases).
KNOWN_UNSUPPORTED = {
    "gemma3": ("5.23", "its bidirectional image-token mask reads token_type_ids at each sequence's own positions "
               "instead of the row's, so a sequence placed after another in a row can attend to some of its own "
               "future tokens"),
}


def known_unsupported(model_type: str | None) -> str | None:
    """Why the installed transformers packs this family wrongly (KNOWN_UNSUPPORTED), or None."""
    from packaging.version import Version

    since, problem = KNOWN_UNSUPPORTED.get(model_type, (None, None))
    if since is None or Version(_transformers_version()) < Version(since):
        return None
    return problem


def mrope_index(model):
    """inputs -> [3, S, T] each sequence's 3-D position ids from the model's get_rope_index (Qwen2-VL and the other
    mRoPE families), or None for a model without one."""
    base = unwrap(model)
    get = getattr(getattr(base, "model", base), "get_rope_index", None)
    if get is None:
        return None
    accepted = set(inspect.signature(get).parameters)
    return lambda inputs: get(**{k: v for k, v in inputs.items() if k in accepted})[0]


@torch.no_grad()
def check_packing(model, inputs: dict, autocast_dtype=None) -> float:
    """Packs the sequences of `inputs` (a padded batch of 3 or more) into two rows — the shortest, then the
    longest (so a long sequence sits at an offset: masks that confuse row and sequence positions show) and the others
    but one in the first, the last alone with a tail — and compares the model's logits with those of the padded
    forward at every real token; returns the largest difference, or raises UnsupportedModelError naming the family
    when packed sequences (or tails) change what a sequence sees, the packed forward fails, or the family is known to
    pack wrongly (KNOWN_UNSUPPORTED)."""
    family = type(unwrap(model)).__name__
    known = known_unsupported(getattr(unwrap(model).config, "model_type", None))
    if known is not None:
        raise UnsupportedModelError(f"{family}: {known} (transformers {_transformers_version()}). Train without "
                                    "packing (--packing, padding_free)")
    lengths = padded_lengths(inputs)
    by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
    order = by_length[:1] + by_length[-1:] + by_length[1:-1] if len(lengths) > 1 else by_length
    inputs, lengths = select_rows(inputs, order), [lengths[i] for i in order]
    was_training = unwrap(model).training
    model.eval()  # dropout off: both forwards must see the same network
    try:
        padded = forward_logits(model, inputs, autocast_dtype)
        low_precision = padded.dtype != torch.float32
        padded = padded.float()
        packed_batch = pack_batch(inputs, max(sum(lengths[:-1]), 1), mrope_index(model), in_order=True)
        try:
            packed = forward_logits(model, packed_batch.inputs, autocast_dtype).float()
        except Exception as error:  # noqa: BLE001 - any failure means: this family cannot be packed this way
            raise UnsupportedModelError(f"{family}: the packed forward fails ({type(error).__name__}: {error}); "
                                        "Train without packing (--packing, padding_free)") from error
    finally:
        model.train(was_training)
    source = packed_batch.rows.source.to(padded.device)
    real = source >= 0
    own = padded.reshape(-1, padded.shape[-1]).index_select(0, source[real])
    ours = packed.reshape(-1, packed.shape[-1])[real]
    diff = float((own - ours).abs().max()) if own.numel() else 0.0
    magnitude = float(own.abs().max()) if own.numel() else 0.0
    autocast = autocast_dtype is not None or torch.is_autocast_enabled(padded.device.type)
    rounding = 2.0 ** -7 if autocast or low_precision else 1e-5
    if not diff <= 1e-4 + rounding * max(magnitude, 1.0):
        raise UnsupportedModelError(
            f"{family}: packed into rows, its sequences' logits differ by {diff:.3g} (largest |logit| "
            f"{magnitude:.3g}) from the padded batch's: the model lets packed sequences see each other (its mask is "
            "not built from position_ids alone). Train without packing (--packing, padding_free)")
    return diff


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
