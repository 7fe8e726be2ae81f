"""Turning preference records into model inputs: [2B, T] sequences (B chosen, then B rejected), labels that ignore
the prompt and image tokens, and DDPO token weights from the correction (segments.correction_weights); and the seeded
order in which a run visits its records (BatchStream: the DDPO trainer's pairs, GRPO's prompts, the warm-up's)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import PreferenceRecord, open_image
from .segments import correction_weights

IGNORE_INDEX = -100


@dataclass
class PairBatch:
    input_ids: torch.Tensor        # [2B, T]
    attention_mask: torch.Tensor   # [2B, T]
    labels: torch.Tensor           # [2B, T], aligned with input_ids; IGNORE_INDEX on prompt, image and padding
    token_weights: torch.Tensor    # [2B, T], gamma on corrected answer tokens, 1 on other answer tokens, 0 elsewhere
    pixel_values: torch.Tensor | None  # [2B, C, H, W] (each image twice) or None for text-only data
    reward_margin: torch.Tensor | None  # [B] when every record has one
    indices: torch.Tensor          # [B] record indices, to look up cached reference scores

    def to(self, device) -> "PairBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))

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
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixel_values if dtype is None else self.pixel_values.to(dtype)
        return inputs


def build_prompt(question: str, image_token: str | None) -> str:
    """The prompt the trainer puts before an answer (and rlhfv_train.evaluate before a generation)."""
    return f"{image_token} {question}" if image_token else question


class PairCollator:
    """Callable(list of (index, PreferenceRecord)) -> PairBatch, for a LlavaProcessor-like processor or a plain
    tokenizer (text-only data)."""

    def __init__(self, processor, *, gamma: float, min_match: int = 3, max_length: int | None = None):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.has_images = hasattr(processor, "image_processor")
        self.gamma = gamma
        self.min_match = min_match
        self.max_length = max_length
        self.tokenizer.padding_side = "right"
        self.image_token = getattr(processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)

    def _encode(self, texts, images):
        if self.has_images and images is not None:
            return self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        return self.tokenizer(texts, return_tensors="pt", padding=True)

    def __call__(self, items: list[tuple[int, PreferenceRecord]]) -> PairBatch:
        records = [r for _, r in items]
        images = [open_image(r) for r in records] if self.has_images else [None] * len(records)
        with_image = [img is not None for img in images]
        if any(with_image) and not all(with_image):
            raise ValueError("a batch mixes records with and without images; keep one kind per dataset")
        use_images = all(with_image) and self.has_images
        prompts = [build_prompt(r.question, self.image_token if use_images else None) for r in records]
        eos = self.tokenizer.eos_token or ""
        texts = [f"{p} {r.chosen} {eos}".rstrip() for p, r in zip(prompts, records)]
        texts += [f"{p} {r.rejected} {eos}".rstrip() for p, r in zip(prompts, records)]
        image_list = images + images if use_images else None
        full = self._encode(texts, image_list)
        prompt = self._encode(prompts + prompts, image_list)
        input_ids, attention = full["input_ids"], full["attention_mask"]
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
            input_ids=input_ids, attention_mask=attention, labels=labels, token_weights=weights,
            pixel_values=full["pixel_values"] if use_images else None,
            reward_margin=torch.tensor(margins, dtype=torch.float32) if all(m is not None for m in margins) else None,
            indices=torch.tensor([i for i, _ in items], dtype=torch.long))


class BatchStream:
    """Micro-batches of the training indices in a fresh seeded order every epoch; position = micro-steps taken, so
    a resumed run continues with exactly the batches an uninterrupted run would have seen."""

    def __init__(self, indices: list[int], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if len(indices) < world:
            raise ValueError(f"{len(indices)} training records for {world} processes (is eval_fraction too large?)")
        self.indices, self.seed, self.rank, self.world = indices, seed, rank, world
        self.batch_size = min(batch_size, len(indices) // world)  # per process
        self.per_epoch = len(indices) // (self.batch_size * world)

    def batch(self, micro_step: int) -> list[int]:
        """This process's share of global micro-batch `micro_step` (the same global batches for any world size)."""
        epoch, k = divmod(micro_step, self.per_epoch)
        order = torch.randperm(len(self.indices), generator=torch.Generator().manual_seed(self.seed + 1 + epoch))
        size = self.batch_size * self.world
        take = order[k * size:(k + 1) * size].tolist()[self.rank::self.world]
        return [self.indices[i] for i in take]
