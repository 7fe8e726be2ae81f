"""Row operations on a processor's output, for every family's layout: taking some sequences of a batch (the warm-up's
chosen half, a micro-batch of rollouts), repeating each k times (GRPO's group), and joining batches.

Most tensors a processor returns have one row per sequence (input_ids, attention_mask, token_type_ids,
mm_token_type_ids, image_sizes, aspect_ratio_ids / mask, cross_attention_mask, pixel_attention_mask, and pixel_values
of LLaVA, Idefics3, Mllama, ...). Qwen-VL's pixel_values are packed instead: [sum of patches, D], with image_grid_thw
[images, 3] giving each image's patch grid (one image per sequence here). Anything else is refused with the tensor's
name, at the first batch of a run, never silently mis-sliced.
"""
from __future__ import annotations

import torch

# packed tensor -> the per-image grid that says how many of its rows each image owns
PACKED = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}


def batch_rows(inputs: dict) -> int:
    """The number of sequences of a processor output."""
    return int(inputs["input_ids"].shape[0])


def _packed_spans(inputs: dict, name: str, rows: int) -> list[tuple[int, int]] | None:
    """[start, stop) of each sequence's rows in a packed tensor, or None when `name` has one row per sequence."""
    grid_name = PACKED.get(name)
    if grid_name is None or grid_name not in inputs:
        return None
    value, grid = inputs[name], inputs[grid_name]
    if grid.shape[0] != rows:
        raise ValueError(f"{name}: {grid.shape[0]} images for {rows} sequences; one image per sequence is supported")
    counts = grid.prod(-1).tolist()
    if sum(counts) != value.shape[0]:
        raise ValueError(f"{name}: {value.shape[0]} rows but {grid_name} accounts for {sum(counts)}")
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return list(zip(starts[:-1], starts[1:]))


def check_row_layout(inputs: dict) -> None:
    """Raises ValueError naming the first tensor that select_rows could not split by sequence."""
    rows = batch_rows(inputs)
    for name, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"the processor returned {name} = {type(value).__name__}; only tensors are supported")
        if _packed_spans(inputs, name, rows) is None and (value.dim() == 0 or value.shape[0] != rows):
            raise ValueError(f"the processor's {name} has shape {tuple(value.shape)}, which is neither one row per "
                             f"sequence ({rows}) nor a packed layout this trainer knows; this model family is not "
                             "supported yet")


def select_rows(inputs: dict, rows, total: int | None = None) -> dict:
    """The processor output of sequences `rows` (a list of indices, repeats allowed, or a slice), in that order.
    total: the number of sequences, when `inputs` holds no input_ids."""
    total = batch_rows(inputs) if total is None else total
    index = list(range(total))[rows] if isinstance(rows, slice) else [int(r) for r in rows]
    out = {}
    for name, value in inputs.items():
        spans = _packed_spans(inputs, name, total)
        if spans is None:
            out[name] = value[torch.tensor(index, dtype=torch.long, device=value.device)]
        else:
            parts = [value[spans[i][0]:spans[i][1]] for i in index]
            out[name] = torch.cat(parts) if parts else value[:0]
    return out


def repeat_rows(inputs: dict, k: int, total: int | None = None) -> dict:
    """Each sequence k times in a row (a GRPO group of k answers to one prompt)."""
    total = batch_rows(inputs) if total is None else total
    return select_rows(inputs, [i for i in range(total) for _ in range(k)], total)


def token_aligned(inputs: dict) -> list[str]:
    """Names of the tensors laid out like input_ids ([sequences, T, ...]: attention_mask, token_type_ids, ...)."""
    shape = tuple(inputs["input_ids"].shape)
    return [name for name, value in inputs.items() if value.dim() >= 2 and tuple(value.shape[:2]) == shape]


def concat_rows(parts: list[dict]) -> dict:
    """Sequences of several processor outputs with the same keys, one after the other (padded lengths must agree
    for token-aligned tensors)."""
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
