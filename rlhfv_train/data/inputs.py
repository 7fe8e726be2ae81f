"""Row operations on a processor's output, for every family's layout: taking some sequences of a batch (the warm-up's
chosen half, a micro-batch of rollouts), repeating each k times (GRPO's group), and joining batches.

Most tensors a processor returns have one row per sequence (input_ids, attention_mask, token_type_ids,
mm_token_type_ids, batch_num_images, aspect_ratio_ids / mask, cross_attention_mask, pixel_attention_mask, and
pixel_values of Idefics3, Mllama, ...). Some have a row per image (LLaVA's pixel_values, LLaVA-NeXT's image_sizes; a
record may hold several images): a sequence's rows are its image count. Others are flat: InternVL's pixel_values hold
every image's tiles [sum of tiles, C, H, W] (its dynamic tiling: several tiles and a thumbnail per image), Qwen-VL's
every image's patches [sum of patches, D] with image_grid_thw [images, 3]. Each row of such a tensor stands for the
same number of the image's placeholder tokens in input_ids (a tile for image_seq_length, a patch for 1 /
merge_size**2), so a sequence's rows are its share of those tokens. with_row_counts records the rows per sequence, at
encoding, as a per-sequence tensor beside each such tensor (ROW_COUNTS), which every row operation then carries like
any per-sequence tensor; model_kwargs drops them before the model's call. Anything else is refused with the tensor's
name, at the first batch of a run, never silently mis-sliced.

Text-only records may share a batch with image records: a row per image and a row per sequence then look alike when
a batch holds as many images as sequences, so the image counts decide first, and only the layouts that pad images
per sequence (BATCH_MAJOR: Idefics3, SmolVLM, Mllama) keep a row per sequence. A selection of sequences that show no
image goes to the model without image tensors, as a text-only batch does.
"""
from __future__ import annotations

import torch

# flat tensor -> the per-image grid that says how many of its rows each image owns
PACKED = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}
# flat tensor -> the processor attribute naming the placeholder token its rows stand for
PLACEHOLDER = {"pixel_values": "image_token_id", "pixel_values_videos": "video_token_id"}
# Layouts with one row per sequence however many images it holds (padded over images and crops): Idefics3 / SmolVLM
# (marked by pixel_attention_mask), Mllama (by aspect_ratio_ids); pixel_values first, then the markers.
BATCH_MAJOR = ("pixel_values", "pixel_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask")
# a row per sequence that shows images, none for one that does not (LLaVA-OneVision's image count per sequence)
PER_SEQUENCE_WITH_IMAGES = ("batch_num_images",)
# a row per video besides the tensors named for videos (Qwen2.5-VL's seconds per temporal patch)
PER_VIDEO = ("second_per_grid_ts",)
# the per-sequence row counts of a flat tensor travel under this name (not a keyword any model takes)
ROW_COUNTS = "{}:rows per sequence"
# every sequence's image (video) count: a selection that shows neither goes to the model without image tensors
IMAGES = ROW_COUNTS.format("images")
VIDEOS = ROW_COUNTS.format("videos")


def batch_rows(inputs: dict) -> int:
    """The number of sequences of a processor output."""
    return int(inputs["input_ids"].shape[0])


def with_row_counts(inputs: dict, placeholders, images_per_sequence: list[int] | None = None,
                    videos_per_sequence: list[int] | None = None) -> dict:
    """inputs plus the per-sequence row counts (ROW_COUNTS) of each tensor whose rows are not one per sequence (the
    module's docstring): a tensor with a row per image (LLaVA's pixel_values, image_sizes) takes images_per_sequence
    when given (a record may hold several images, or none), one with a row per video (LLaVA-OneVision's
    pixel_values_videos) videos_per_sequence; LLaVA-OneVision's batch_num_images, a row per sequence
    that shows images, one or none; a flat tensor (tiles, patches) takes its sequence's share of the placeholder
    tokens, and its grid the images whose rows make that share up. Token-aligned tensors and the batch-major layouts
    (BATCH_MAJOR) keep one row per sequence. placeholders: what names the placeholder tokens (image_token_id,
    video_token_id): the processor, or the model's config. A tensor that fits no rule is left for check_row_layout /
    select_rows to refuse by name. Raises ValueError naming a flat tensor whose rows do not divide by its placeholder
    tokens."""
    out = dict(inputs)
    if images_per_sequence is not None:
        out[IMAGES] = torch.tensor(images_per_sequence, dtype=torch.long)
    if videos_per_sequence is not None:
        out[VIDEOS] = torch.tensor(videos_per_sequence, dtype=torch.long)
    sequences = batch_rows(inputs)
    # text-only beside image sequences from another collator (TRL's), the image counts unknown: a row per image and a
    # row per sequence look alike, and only the placeholder tokens can tell them apart
    mixed_without_counts = images_per_sequence is None and _some_without_images(inputs, placeholders)
    aligned = set(token_aligned(inputs))
    batch_major = set(BATCH_MAJOR) if any(marker in inputs for marker in BATCH_MAJOR[1:]) else set()
    shows = None  # which sequences show an image or a video, when the counts are known
    if images_per_sequence is not None or videos_per_sequence is not None:
        shows = [int(bool(i) or bool(v)) for i, v in zip(images_per_sequence or [0] * sequences,
                                                          videos_per_sequence or [0] * sequences)]
    for name, value in inputs.items():
        if name in batch_major and value.dim() and value.shape[0] != sequences and shows is not None \
                and value.shape[0] == sum(shows):  # SmolVLM with videos: rows only for the sequences that show any
            out[ROW_COUNTS.format(name)] = torch.tensor(shows, dtype=torch.long)
            continue
        if name in aligned or name in batch_major or name in PACKED.values() or _is_row_counts(name) or not value.dim():
            continue
        rows, grid_name = value.shape[0], PACKED.get(name)
        has_grid = grid_name in inputs
        if ("video" in name or name in PER_VIDEO) and videos_per_sequence is not None and not has_grid:
            if rows == sum(videos_per_sequence) and rows != sequences:  # else one row per sequence, as it is
                out[ROW_COUNTS.format(name)] = torch.tensor(videos_per_sequence, dtype=torch.long)
            continue
        if images_per_sequence is not None and not has_grid:
            if name in PER_SEQUENCE_WITH_IMAGES and rows == sum(n > 0 for n in images_per_sequence):
                out[ROW_COUNTS.format(name)] = torch.tensor([int(n > 0) for n in images_per_sequence])
                continue
            if rows == sum(images_per_sequence):  # before the next test: with imageless sequences both may hold
                out[ROW_COUNTS.format(name)] = torch.tensor(images_per_sequence, dtype=torch.long)
                continue
        token_id = getattr(placeholders, PLACEHOLDER.get(name, ""), None)
        if rows == sequences and not has_grid:
            if not mixed_without_counts:
                continue
            if token_id is None:
                raise ValueError(f"the processor's {name} has a row per sequence or per image, which a batch of "
                                 "text-only and image sequences cannot tell apart without its image counts "
                                 "(rlhfv_train.data.inputs.with_row_counts' images_per_sequence)")
        if token_id is None:
            continue
        counts = _share_of_placeholders(inputs["input_ids"], token_id, rows, name)
        out[ROW_COUNTS.format(name)] = counts
        if has_grid:
            out[ROW_COUNTS.format(grid_name)] = _images_making_up(inputs[grid_name], counts.tolist(), name)
    return out


def _some_without_images(inputs: dict, placeholders) -> bool:
    """Whether some sequences hold image placeholder tokens and others none."""
    token_id = getattr(placeholders, "image_token_id", None)
    if token_id is None:
        return False
    shown = (inputs["input_ids"] == token_id).any(-1)
    return bool(shown.any()) and not bool(shown.all())


def _share_of_placeholders(input_ids: torch.Tensor, token_id: int, rows: int, name: str) -> torch.Tensor:
    """Each sequence's rows of a flat tensor of `rows` rows: its share of the placeholder tokens."""
    tokens = (input_ids == token_id).sum(-1)
    total = int(tokens.sum())
    if total == 0 or bool(((tokens * rows) % total != 0).any()):
        raise ValueError(f"the processor's {name} has {rows} rows for {total} placeholder tokens "
                         f"({tokens.tolist()} per sequence), which do not split evenly by sequence; this model "
                         "family's image layout is not supported yet")
    return (tokens * rows // total).cpu()


def _images_making_up(grid: torch.Tensor, counts: list[int], name: str) -> torch.Tensor:
    """How many consecutive images of `grid` ([images, 3], rows t * h * w each) make up each sequence's `counts` rows
    of the flat tensor `name`."""
    per_image = grid.prod(-1).tolist()
    images, image = [], 0
    for count in counts:
        first, taken = image, 0
        while taken < count and image < len(per_image):
            taken, image = taken + per_image[image], image + 1
        if taken != count:
            raise ValueError(f"{name}: a sequence's {count} rows are not a whole number of its images' grids "
                             f"({per_image})")
        images.append(image - first)
    if image != len(per_image):
        raise ValueError(f"{name}: {len(per_image)} image grids but the sequences' rows account for {image}")
    return torch.tensor(images, dtype=torch.long)


def model_kwargs(inputs: dict) -> dict:
    """The model's keyword arguments of a batch: every tensor but the row counts with_row_counts added."""
    return {name: value for name, value in inputs.items() if not _is_row_counts(name)}


def _is_row_counts(name: str) -> bool:
    return name.endswith(ROW_COUNTS.format(""))


def _row_spans(inputs: dict, name: str, rows: int) -> list[tuple[int, int]] | None:
    """[start, stop) of each sequence's rows in a flat tensor (from its row counts, with_row_counts), or None when
    `name` has one row per sequence; anything else raises ValueError naming the tensor."""
    value, counts = inputs[name], inputs.get(ROW_COUNTS.format(name))
    if counts is None:
        if value.dim() == 0 or value.shape[0] != rows:
            raise ValueError(f"the processor's {name} has shape {tuple(value.shape)}, which is neither one row per "
                             f"sequence ({rows}) nor a flat image tensor with its row counts "
                             "(rlhfv_train.data.inputs.with_row_counts); this model family's layout is not supported "
                             "yet")
        return None
    counts = counts.tolist()
    if len(counts) != rows or sum(counts) != value.shape[0]:
        raise ValueError(f"{name}: {value.shape[0]} rows but its row counts {counts} say otherwise")
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
        _row_spans(inputs, name, rows)


def select_rows(inputs: dict, rows, total: int | None = None) -> dict:
    """The processor output of sequences `rows` (a list of indices, repeats allowed, or a slice), in that order.
    total: the number of sequences, when `inputs` holds no input_ids."""
    total = batch_rows(inputs) if total is None else total
    index = list(range(total))[rows] if isinstance(rows, slice) else [int(r) for r in rows]
    imageless = IMAGES in inputs and int(inputs[IMAGES][index].sum()) == 0 \
        and (VIDEOS not in inputs or int(inputs[VIDEOS][index].sum()) == 0)
    out = {}
    for name, value in inputs.items():
        if imageless and _shows_images(inputs, name):
            continue  # the model takes text alone as it does for a text-only batch (its image tensors would be empty)
        spans = _row_spans(inputs, name, total)
        if spans is None:
            out[name] = value[torch.tensor(index, dtype=torch.long, device=value.device)]
            continue
        parts = [value[spans[i][0]:spans[i][1]] for i in index]
        if _shows_images(inputs, name) and not _is_row_counts(name) and sum(len(p) for p in parts) == 0:
            continue  # the selection shows videos but no image, or images but no video: the model takes no such rows
        out[name] = torch.cat(parts) if parts else value[:0]
    return out


def _shows_images(inputs: dict, name: str) -> bool:
    """Whether tensor `name` carries the images of a batch (not the token-aligned ones, nor the image counts)."""
    if name in (IMAGES, VIDEOS):
        return False
    if _is_row_counts(name) or ROW_COUNTS.format(name) in inputs or name in PACKED.values():
        return True
    return name in PER_SEQUENCE_WITH_IMAGES or (name in BATCH_MAJOR and any(m in inputs for m in BATCH_MAJOR[1:]))


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
