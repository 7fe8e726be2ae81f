"""Preference records into model inputs: [2B, T] sequences (B chosen, then B rejected) with every tensor the
processor returns (pixel_values, image_grid_thw, image_sizes, token_type_ids, ...), labels that ignore the prompt and
image tokens, and DDPO token weights from the correction (weights.correction_weights)."""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass

import torch

from .inputs import check_row_layout, select_rows, with_row_counts
from .prompts import PromptFormat
from .records import PreferenceRecord, open_images, open_video
from .token_weights import correction_weights

IGNORE_INDEX = -100


@dataclass
class PairBatch:
    inputs: dict                   # the processor's output for the 2B sequences: input_ids, attention_mask, ...
    labels: torch.Tensor           # [2B, T], aligned with input_ids; IGNORE_INDEX on prompt, image and padding
    token_weights: torch.Tensor    # [2B, T], gamma on corrected answer tokens, 1 on other answer tokens, 0 elsewhere
    reward_margin: torch.Tensor | None  # [B] when every record has one
    indices: torch.Tensor          # [B] record indices, to look up cached reference scores

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.inputs["attention_mask"]

    def to(self, device) -> "PairBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairBatch({k: v.to(device) for k, v in self.inputs.items()}, move(self.labels),
                         move(self.token_weights), move(self.reward_margin), move(self.indices))

    def chosen(self) -> "PairBatch":
        """The B chosen sequences alone (the SFT warm-up's batch); reward_margin and indices stay per pair."""
        pairs = self.indices.shape[0]
        return PairBatch(select_rows(self.inputs, slice(0, pairs)), self.labels[:pairs], self.token_weights[:pairs],
                         self.reward_margin, self.indices)

    def next_token_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, token_weights) shifted so that position t holds the target of the logits at t; the last position
        is ignored. Scoring the full logits against these avoids slicing the logits (logits[:, :-1]), whose autograd
        backward would allocate a second N x V gradient and undo the in-place backward's saving."""
        labels = torch.full_like(self.labels, IGNORE_INDEX)
        labels[:, :-1] = self.labels[:, 1:]
        weights = torch.zeros_like(self.token_weights)
        weights[:, :-1] = self.token_weights[:, 1:]
        return labels, weights

    def model_inputs(self, dtype=None) -> dict:
        """The keyword arguments of the model's forward (floating-point image tensors cast to `dtype` if given)."""
        if dtype is None:
            return dict(self.inputs)
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.inputs.items()}


def takes_suffix(processor) -> bool:
    """A prefix-LM processor (PaliGemma): the answer goes in as suffix=, after the separator the processor adds,
    with its end-of-sequence token, marked by token_type_ids 1. Without it such a model sees every token
    bidirectionally (token_type_ids 0: all prefix), its own future included."""
    if not hasattr(processor, "image_processor"):
        return False
    if "suffix" in inspect.signature(type(processor).__call__).parameters:  # transformers 5.24: a named argument
        return True
    # earlier releases (5.17) take it in **kwargs: the processor's kwargs TypedDict lists it among its text kwargs
    kwargs_class = getattr(type(processor), "valid_processor_kwargs", None)
    text_kwargs = typing.get_type_hints(kwargs_class).get("text_kwargs") if kwargs_class is not None else None
    return text_kwargs is not None and "suffix" in typing.get_type_hints(text_kwargs)


# processors that mishandle a batch showing both videos and images (seen with transformers 5.25): refused by name
VIDEO_WITH_IMAGES_FAILS = {"SmolVLMProcessor": "drops every image's pixel rows from a batch that shows a video (the "
                                               "images' tokens stay: the model then fails on the count)"}


def encode(processor, texts: list[str], images, *, padding_side: str, suffix: list[str] | None = None,
           videos: list | None = None) -> dict:
    """The processor's (or, without images, the tokenizer's) output for `texts`, padded on `padding_side` by the call
    itself; images: one list per sequence (in the prompt's order, empty for a text-only one); videos: one per
    sequence (its records.VideoClip, or None); suffix: the answers of a prefix-LM processor
    (takes_suffix). Labels the processor may build are dropped: given labels, a model computes its own N x V
    cross-entropy. Image and video tensors whose rows are not one per sequence (a row per image, InternVL's tiles,
    Qwen-VL's patches) come with their rows per sequence (inputs.with_row_counts); pass the batch to a model through
    inputs.model_kwargs."""
    tokenizer = getattr(processor, "tokenizer", processor)
    side = tokenizer.padding_side
    shown_videos = [v for v in videos if v is not None] if videos is not None else []
    if shown_videos and getattr(processor, "video_processor", None) is None:
        raise ValueError(f"a video record, for a processor without a video processor ({type(processor).__name__}): "
                         "the model family takes no video, or transformers could not build its video processor "
                         "(they need torchvision, which must import beside this torch)")
    limit = next((why for cls, why in VIDEO_WITH_IMAGES_FAILS.items()
                  if any(c.__name__ == cls for c in type(processor).__mro__)), None)
    if limit and shown_videos and images is not None and any(images):
        raise ValueError(f"a batch with videos and images, for {type(processor).__name__}, which {limit}; train this "
                         "family on video records and image records in separate runs")
    tokenizer.padding_side = padding_side  # processors that ignore the call's padding_side still follow the tokenizer
    try:
        if images is not None or shown_videos:
            extra = {} if suffix is None else {"suffix": suffix}
            if shown_videos:  # already sampled (records.open_video): a processor that samples by fps would again
                extra.update(videos=[clip.frames for clip in shown_videos], do_sample_frames=False,
                             video_metadata=[clip.metadata for clip in shown_videos])
            given = images if images is not None and any(images) else None
            out = processor(images=given, text=texts, return_tensors="pt", padding=True, padding_side=padding_side,
                            **extra)
        else:
            out = tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side)
    finally:
        tokenizer.padding_side = side
    out = {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and k != "labels"}
    if images is None and not shown_videos:
        return out
    return with_row_counts(out, processor, [len(i) for i in images] if images is not None else [0] * len(texts),
                           [int(v is not None) for v in videos] if videos is not None else None)


def open_media(records, has_images: bool) -> tuple[list[list], list]:
    """(images, videos) of `records` as encode takes them: each record's images (records.open_images) and video
    (records.open_video, or None); none at all for a model without an image processor."""
    if not has_images:
        return [[] for _ in records], [None] * len(records)
    return [open_images(r) for r in records], [open_video(r) for r in records]


class PairCollator:
    """Callable(list of (index, PreferenceRecord)) -> PairBatch, for a Hugging Face processor (image-text) or a plain
    tokenizer (text-only data). chat_template: build prompts with the processor's chat template when it has one."""

    def __init__(self, processor, *, gamma: float, min_match: int = 3, max_length: int | None = None,
                 chat_template: bool = True):
        self.processor = processor
        self.has_images = hasattr(processor, "image_processor")
        self.format = PromptFormat(processor, chat_template)
        self.suffix = takes_suffix(processor)
        self.gamma = gamma
        self.min_match = min_match
        self.max_length = max_length

    def __call__(self, items: list[tuple[int, PreferenceRecord]]) -> PairBatch:
        records = [r for _, r in items]
        if not self.has_images and any(r.images or r.video for r in records):
            source = next(r.source for r in records if r.images or r.video)
            raise ValueError(f"{source}: a record with images or a video, for a model without an image processor (a "
                             "text-only tokenizer); train a vision-language model on it, or leave them out")
        images, videos = open_media(records, self.has_images)  # a text-only model's records have none (above)
        use_images = any(images)  # text-only records beside image records show none
        shown = [len(i) for i in images]  # images each prompt shows
        video = [v is not None for v in videos]
        prompts = [self.format.prompt(r.question, n, v) for r, n, v in zip(records, shown, video)]
        image_list = images + images if use_images else None
        video_list = videos + videos if any(video) else None
        if self.suffix and (use_images or video_list):
            full = encode(self.processor, prompts + prompts, image_list, padding_side="right", videos=video_list,
                          suffix=[r.chosen for r in records] + [r.rejected for r in records])
        else:
            texts = [self.format.sequence(r.question, r.chosen, n, v) for r, n, v in zip(records, shown, video)]
            texts += [self.format.sequence(r.question, r.rejected, n, v) for r, n, v in zip(records, shown, video)]
            full = encode(self.processor, texts, image_list, padding_side="right", videos=video_list)
        prompt = encode(self.processor, prompts + prompts, image_list, padding_side="right", videos=video_list)
        check_row_layout(full)
        input_ids, attention = full["input_ids"], full["attention_mask"]
        if bool((attention[:, :1] == 0).any()):
            raise ValueError("the processor padded on the left although right padding was asked for")
        prompt_lens = prompt["attention_mask"].sum(-1).tolist()
        lengths = attention.sum(-1).tolist()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        weights = torch.zeros(input_ids.shape, dtype=torch.float32)
        pairs = len(records)
        for i in range(pairs):
            spans = []
            for row in (i, pairs + i):
                start, stop = prompt_lens[row], lengths[row]
                if not torch.equal(input_ids[row, :start], prompt["input_ids"][row, :start]):
                    raise ValueError(f"{records[i].source}: the tokenized prompt is not a prefix of prompt + answer; "
                                     "the tokenizer merges across the boundary")
                if stop <= start:
                    raise ValueError(f"{records[i].source}: the answer is empty after tokenization")
                spans.append((row, start, stop))
            answers = [input_ids[row, start:stop].tolist() for row, start, stop in spans]
            answer_weights = correction_weights(answers[0], answers[1], self.gamma, self.min_match)
            for (row, start, stop), w in zip(spans, answer_weights):
                labels[row, start:stop] = input_ids[row, start:stop]
                weights[row, start:stop] = torch.tensor(w)
        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            raise ValueError(f"a batch is {input_ids.shape[1]} tokens long, above max_length={self.max_length}")
        margins = [r.reward_margin for r in records]
        return PairBatch(
            inputs=full, labels=labels, token_weights=weights,
            reward_margin=torch.tensor(margins, dtype=torch.float32) if all(m is not None for m in margins) else None,
            indices=torch.tensor([i for i, _ in items], dtype=torch.long))
