"""Answers generated from records' images and questions, as the trainers prompt them: greedy or sampled, in
left-padded batches, with the model's mode and the global random state restored (a run that generates mid-way stays
reproducible). Used by the hallucination metric, GRPO's rollouts and the held-out evaluations."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data import PreferenceRecord, PromptFormat, encode, open_media
from ..data.inputs import model_kwargs
from ..models.forward import autocast_to


@dataclass
class GenerationSettings:
    max_new_tokens: int = 48
    do_sample: bool = False       # greedy by default
    temperature: float = 1.0      # with do_sample
    top_p: float = 1.0            # with do_sample
    num_samples: int = 1          # answers per image (with do_sample)
    batch_size: int = 32          # images per generate() call
    chat_template: bool = True    # the processor's chat template when it has one (as in training), else plain
    seed: int = 0                 # for sampling; the caller's random state is left untouched

    def check(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.num_samples < 1:
            raise ValueError("max_new_tokens, batch_size and num_samples must be >= 1")
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError("num_samples > 1 needs sampling (do_sample / --sample): greedy answers are all the same")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, "
                             f"{self.top_p}")


def image_placeholder_ids(model, processor) -> list[int]:
    """Token ids that stand for image or video features: the processor's placeholders (what prompts carry, e.g.
    Gemma 3's <start_of_image>) and the model's (what its forward replaces with features, e.g. <image_soft_token>)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = set()
    for owner in (processor, tokenizer):
        for name in ("image_token", "video_token"):
            token = getattr(owner, name, None)
            if isinstance(token, str):
                ids.add(tokenizer.convert_tokens_to_ids(token))
    config = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            ids.add(value)
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else None
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id and (vocab is None or i < vocab))


@dataclass
class GeneratedBatch:
    """One generate() call: its records, the prompt inputs (left-padded, on the device) and the new tokens, rows
    [record 0 sample 0, record 0 sample 1, ..., record 1 sample 0, ...]: num_samples rows per record."""
    records: Sequence[PreferenceRecord]
    inputs: dict
    new_tokens: torch.Tensor


@torch.no_grad()
def generate_tokens(model, processor, records: Sequence[PreferenceRecord], settings: GenerationSettings | None = None,
                    *, device=None, autocast_dtype=None, progress=None) -> list[GeneratedBatch]:
    """settings.num_samples answers per record, generated from its images, video and question in left-padded batches.
    The model's train/eval mode and the global random state are restored afterwards, so a training run that
    generates mid-way stays exactly reproducible."""
    settings = settings or GenerationSettings()
    settings.check()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tokenizer = getattr(processor, "tokenizer", processor)
    has_images = hasattr(processor, "image_processor")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
               "num_return_sequences": settings.num_samples, "pad_token_id": pad_id,
               "eos_token_id": tokenizer.eos_token_id}
    placeholders = image_placeholder_ids(model, processor)
    if placeholders:  # an answer with an image placeholder in it would not even run through the model
        options["suppress_tokens"] = placeholders
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:  # a model's generation_config may ask for sampling; greedy means greedy here
        options.update(temperature=None, top_p=None, top_k=None)
    prompts = PromptFormat(processor, settings.chat_template)
    was_training = model.training
    model.eval()
    batches = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(settings.seed)
            for start in range(0, len(records), settings.batch_size):
                chunk = records[start:start + settings.batch_size]
                images, videos = open_media(chunk, has_images)
                with_image = any(images)  # text-only records beside image records show none
                texts = [prompts.prompt(r.question, len(i), v is not None) for r, i, v in zip(chunk, images, videos)]
                # Left padding: generation continues every row from its last real token.
                inputs = encode(processor, texts, images if with_image else None, padding_side="left",
                                videos=videos if any(v is not None for v in videos) else None)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                with autocast_to(inputs, autocast_dtype):
                    out = model.generate(**model_kwargs(inputs), **options)
                batches.append(GeneratedBatch(chunk, inputs, out[:, inputs["input_ids"].shape[1]:]))
                if progress is not None:
                    progress.update(len(chunk))
    finally:
        model.train(was_training)
    return batches


def generate_answers(model, processor, records: Sequence[PreferenceRecord], settings: GenerationSettings | None = None,
                     *, device=None, autocast_dtype=None, progress=None) -> list[list[str]]:
    """generate_tokens, decoded: settings.num_samples answer texts per record."""
    settings = settings or GenerationSettings()
    tokenizer = getattr(processor, "tokenizer", processor)
    answers, k = [], settings.num_samples
    for batch in generate_tokens(model, processor, records, settings, device=device, autocast_dtype=autocast_dtype,
                                 progress=progress):
        decoded = tokenizer.batch_decode(batch.new_tokens, skip_special_tokens=True)
        answers.extend([text.strip() for text in decoded[i * k:(i + 1) * k]] for i in range(len(batch.records)))
    return answers
