"""Image layouts whose rows per sequence differ within a batch (rlhfv_train/data/inputs.py): InternVL's dynamic tiling
at several image sizes, Qwen2-VL's patches at two sizes, LLaVA-OneVision's anyres at one and two crops. Each
sequence's image rows go with it through every row operation: checked against the model's own forward (a selection's
logits are the full batch's rows) and against packing (check_packing: packed logits are the padded ones); the row
counts against the image processor's own tile counts; flat tensors that do not split are refused by name."""
import io
import random

import pytest
import torch

from rlhfv_train.data import (PairCollator, PreferenceRecord, concat_rows, open_images, repeat_rows, select_rows,
                              synthetic)
from rlhfv_train.data.inputs import ROW_COUNTS, model_kwargs, with_row_counts
from rlhfv_train.models.support_table import selection_error
from rlhfv_train.models.tiny_families import FAMILIES, build_family
from rlhfv_train.models.packed_model import check_packing, known_unsupported
from routes import assert_routes_agree

pytest.importorskip("PIL")

SIZES = [(32, 32), (64, 32), (16, 16), (48, 48)]  # InternVL at 16-pixel tiles: 5, 9, 1 and 10 tiles


def records_at(sizes):
    """One record per entry of `sizes`: a synthetic scene drawn at 32 pixels, resized to each (width, height) of the
    entry (a list of sizes: several images)."""
    out = []
    for i, entry in enumerate(sizes):
        rng = random.Random(i)
        example = synthetic.make_example(rng)
        images = []
        for size in (entry if isinstance(entry, list) else [entry]):
            buffer = io.BytesIO()
            synthetic.draw(example["objects"], rng=rng).resize(size).save(buffer, format="PNG")
            images.append(buffer.getvalue())
        out.append((i, PreferenceRecord(question=example["question"], chosen=example["chosen"],
                                        rejected=example["rejected"], images=tuple(images), source=f"scene {i}")))
    return out


def qwen2_vl_at_two_sizes():
    """The tiny Qwen2-VL with a pixel budget that keeps two image sizes apart (the family's own fixes one)."""
    import transformers as tf
    processor, model = build_family("qwen2-vl")
    processor.image_processor = tf.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                                            merge_size=2, temporal_patch_size=2)
    return processor, model


def batch_of(name):
    processor, model = qwen2_vl_at_two_sizes() if name == "qwen2-vl" else build_family(name)
    sizes = SIZES if name != "qwen2-vl" else [(128, 64), (32, 32), (32, 32)]
    return processor, model, PairCollator(processor, gamma=5.0)(records_at(sizes)).model_inputs()


def assert_rows_are_the_models(model, inputs, rows):
    """The model's logits of select_rows(inputs, rows) equal the full batch's rows at every real token."""
    assert selection_error(model, inputs, rows) < 1e-4


@pytest.mark.parametrize("name", ["internvl", "qwen2-vl", "llava-onevision"])
def test_each_sequence_keeps_its_own_image_rows(name):
    processor, model, inputs = batch_of(name)
    sequences = inputs["input_ids"].shape[0]
    if name == "internvl":  # chosen then rejected: 5, 9, 1 and 10 tiles (test_row_counts_match_the_tilers_own)
        counts = inputs[ROW_COUNTS.format("pixel_values")].tolist()
        assert counts == [5, 9, 1, 10] * 2 and inputs["pixel_values"].shape[0] == sum(counts)
    if name == "qwen2-vl":
        assert inputs[ROW_COUNTS.format("image_grid_thw")].tolist() == [1] * sequences
        patches = inputs["image_grid_thw"].prod(-1).tolist()
        assert len(set(patches)) == 2 and inputs[ROW_COUNTS.format("pixel_values")].tolist() == patches
    if name == "llava-onevision":  # a row per image (its crops padded), one image per sequence here
        assert inputs[ROW_COUNTS.format("pixel_values")].tolist() == [1] * sequences
    for rows in ([2, 0, 2], [sequences - 1, 1]):
        assert_rows_are_the_models(model, inputs, rows)
    again = repeat_rows(inputs, 2)
    assert torch.equal(select_rows(again, [3])["pixel_values"], select_rows(inputs, [1])["pixel_values"])
    joined = concat_rows([select_rows(inputs, [1]), select_rows(inputs, [0, 3])])
    for key, value in select_rows(inputs, [1, 0, 3]).items():
        assert torch.equal(joined[key], value), key
    assert check_packing(model, inputs) < 1e-3


def test_row_counts_match_the_tilers_own():
    """InternVL: every image's tiles (the image processor's num_patches, which the processor does not return)."""
    processor, _ = build_family("internvl")
    opened = [image for _, r in records_at(SIZES) for image in open_images(r)]
    own = processor.image_processor(images=opened, return_tensors="pt")["num_patches"].tolist()
    inputs = PairCollator(processor, gamma=5.0)(records_at(SIZES)).model_inputs()
    assert inputs[ROW_COUNTS.format("pixel_values")].tolist() == own + own


class Placeholder:
    image_token_id = 7


def test_flat_tensors_that_do_not_split_are_refused_by_name():
    ids = torch.tensor([[7, 7, 1], [7, 1, 1]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.zeros(4, 3)}
    with pytest.raises(ValueError, match="pixel_values has 4 rows for 3 placeholder tokens"):
        with_row_counts(inputs, Placeholder())
    grid = {**inputs, "pixel_values": torch.zeros(6, 3), "image_grid_thw": torch.tensor([[1, 1, 3], [1, 1, 3]])}
    with pytest.raises(ValueError, match="not a whole number of its images' grids"):
        with_row_counts(grid, Placeholder())  # 4 rows for the first sequence, images of 3
    counted = with_row_counts({**inputs, "pixel_values": torch.zeros(6, 3)}, Placeholder())
    assert counted[ROW_COUNTS.format("pixel_values")].tolist() == [4, 2]
    assert set(model_kwargs(counted)) == {"input_ids", "attention_mask", "pixel_values"}
    broken = {**counted, ROW_COUNTS.format("pixel_values"): torch.tensor([5, 2])}
    with pytest.raises(ValueError, match="pixel_values: 6 rows but its row counts"):
        select_rows(broken, [0])


SEVERAL = [[(32, 32), (64, 32)], [(32, 32)], [(48, 48), (32, 32), (16, 16)]]  # 2, 1 and 3 images per record
IMAGE_FAMILIES = [name for name, family in FAMILIES.items() if family.kind == "image-text"]


@pytest.mark.parametrize("name", IMAGE_FAMILIES)
def test_several_images_per_record(name):
    """1 to 3 images of different sizes per record: the prompt shows each (the model's forward checks placeholders
    against images), every sequence keeps its own images' rows (a selection's logits are the full batch's rows), and
    packing gives the padded logits where the family packs at all."""
    for needed in FAMILIES[name].needs:
        pytest.importorskip(needed)
    processor, model = build_family(name)
    inputs = PairCollator(processor, gamma=5.0)(records_at(SEVERAL)).model_inputs()
    for rows in ([5, 0, 3], [1, 2]):
        assert_rows_are_the_models(model, inputs, rows)
    if known_unsupported(model.config.model_type) is None and name != "mllama":
        assert check_packing(model, inputs) < 1e-3


# image records beside text-only ones, in one batch; the second as many images as sequences (a row per image and a
# row per sequence look alike there)
MIXED = ([[(32, 32)], [], [(48, 48), (64, 32)], []], [[(32, 32), (64, 32)], []])


@pytest.mark.parametrize("name", IMAGE_FAMILIES)
def test_text_only_records_beside_image_records(name):
    """Batches of image records (one and two images) and text-only records: every sequence keeps its own image rows
    (none for a text-only one) when the batch is cut (to text-only sequences alone too) or packed."""
    for needed in FAMILIES[name].needs:
        pytest.importorskip(needed)
    processor, model = build_family(name)
    for layout, cuts in zip(MIXED, (([1, 2, 7], [3, 0], [5], [6, 2]), ([2, 0], [1], [3, 1, 0]))):
        inputs = PairCollator(processor, gamma=5.0)(records_at(layout)).model_inputs()
        for rows in cuts:
            assert_rows_are_the_models(model, inputs, rows)
        if known_unsupported(model.config.model_type) is None and name != "mllama":
            assert check_packing(model, inputs) < 1e-3


@pytest.fixture(scope="module")
def several_images_data(tmp_path_factory):
    """A data file of 12 scenes, each record with 1, 2 or 3 images (the scene at several sizes: 1 to 10 InternVL
    tiles each) in our layout's "image" list, or none (every fourth record: text-only records beside them)."""
    import json
    from PIL import Image
    folder = tmp_path_factory.mktemp("several-images")
    data = synthetic.generate(str(folder), 12, seed=2)
    with open(data) as f:
        rows = [json.loads(line) for line in f]
    for i, row in enumerate(rows):
        scene = Image.open(folder / row["image"])
        row["image"] = []
        for j in range(i % 3 + 1 if i % 4 != 3 else 0):
            name = f"{i}-{j}.png"
            scene.resize(SIZES[(i + j) % len(SIZES)]).save(folder / name)
            row["image"].append(name)
    with open(data, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return data


@pytest.mark.parametrize("name", ["internvl", "llava-onevision"])
def test_ddpo_and_grpo_train_on_several_images_per_record(name, several_images_data, tmp_path):
    """Batches whose records have 1 to 3 images of different sizes (InternVL: 1 to 30 tiles per sequence; LLaVA-
    OneVision: a row per image with its size) or none (text-only records beside them): the logits route,
    --fused-linear and --packing give the same losses and gradient norms; GRPO's groups carry their prompt's images k
    times: the same on both routes and packed (tests/routes.py)."""
    processor, model = build_family(name, seed=1)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    assert_routes_agree(several_images_data, str(tmp_path / "model"), tmp_path, eval_fraction=0.25,
                        max_tokens_per_row=128)


def test_a_mixed_batch_from_another_collator_is_split_by_its_placeholders():
    """Without image counts (TRL's collator), a batch of text-only and image sequences with as many images as
    sequences: pixel_values splits by its placeholder tokens; a tensor without a placeholder rule is refused by name."""
    ids = torch.tensor([[7, 7, 1], [1, 1, 1]])  # two images (one placeholder each), then none
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.zeros(2, 5)}
    counted = with_row_counts(inputs, Placeholder())
    assert counted[ROW_COUNTS.format("pixel_values")].tolist() == [2, 0]
    # the text-only sequence alone: no pixel_values at all (an empty one would reach the vision tower)
    assert select_rows(counted, [1]).keys() == {"input_ids", "attention_mask", ROW_COUNTS.format("pixel_values")}
    assert select_rows(counted, [1, 0])["pixel_values"].shape[0] == 2
    with pytest.raises(ValueError, match="image_sizes has a row per sequence or per image"):
        with_row_counts({**inputs, "image_sizes": torch.zeros(2, 2)}, Placeholder())
    one_each = {**inputs, "input_ids": torch.tensor([[7, 1, 1], [7, 1, 1]])}  # not mixed: a row per sequence
    assert ROW_COUNTS.format("pixel_values") not in with_row_counts(one_each, Placeholder())
