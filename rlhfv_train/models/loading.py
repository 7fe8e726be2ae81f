"""Which model and processor a run uses and the weights it starts from: shared by the trainers (ddpo/, grpo/) and the
evaluation (eval/), so all rebuild the same model (the records and held-out split: data/run_records.py)."""
from __future__ import annotations

import json
import os

import torch

from ..files import load_verified


def load_processor_and_model(model: str | None, seed: int):
    """(processor, model): the embedded tiny LLaVA with seeded random weights when `model` is None, else a local
    Hugging Face folder: an image-text-to-text model with its processor when the folder has a processor config, else
    a causal LM with its tokenizer (text-only data). A folder that fails to load says why; it is never taken for the
    other kind."""
    if model is None:
        from . import tiny
        processor = tiny.build_processor()
        return processor, tiny.build_model(processor, seed=seed)
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    if _processor_config(model) is not None:
        return load_processor(model), AutoModelForImageTextToText.from_pretrained(model, local_files_only=True)
    return (AutoTokenizer.from_pretrained(model, local_files_only=True),
            AutoModelForCausalLM.from_pretrained(model, local_files_only=True))


def _processor_config(folder: str) -> dict | None:
    """The saved processor's config (transformers 5 writes processor_config.json; older releases
    preprocessor_config.json for the image processor), or None for a text-only folder."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return None


def load_processor(folder: str):
    """AutoProcessor.from_pretrained(folder); where that fails on the video processor (transformers' video processors
    need torchvision, which a CPU-only torch may lack), the same processor class without it (processors.without_video),
    which serves images and text alike. Other failures are raised as they are."""
    import transformers
    try:
        return transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ImportError, AttributeError) as exc:
        if "video" not in str(exc).lower():
            raise
        name = (_processor_config(folder) or {}).get("processor_class")
        cls = getattr(transformers, name, None) if name else None
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
        from .processors import without_video
        print(f"note: {folder}: {name} loaded without its video processor ({type(exc).__name__}: torchvision is "
              "missing); images and text work as usual")
        return without_video(cls).from_pretrained(folder, local_files_only=True)


USER_FILE = "replace it with a good copy"


def read_weights(path: str, damaged_advice: str = USER_FILE):
    """The contents of a weights file (a trainer checkpoint or a bare state dict), on the CPU, verified
    (rlhfv_train/files.py: DamagedFile says what is wrong and `damaged_advice`). A file of a run (damaged_advice
    given) must be a torch.save archive; a user's file may be in torch's legacy format."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such weights file: {path}")
    return load_verified(path, advice=damaged_advice, legacy_ok=damaged_advice == USER_FILE)


def load_weights(model, path: str, saved=None, damaged_advice: str = USER_FILE):
    """Loads a trainer checkpoint (checkpoint.pt, sft.pt: a dict with "model") or a bare state dict into `model`, and
    returns what the file holds (pass `saved` when it was already read with read_weights: one read per file)."""
    saved = read_weights(path, damaged_advice) if saved is None else saved
    state = saved
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict or a checkpoint with a 'model' entry, got "
                         f"{type(state).__name__}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: {len(missing)} missing weights (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    return saved
