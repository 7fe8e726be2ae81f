"""Video records through the families' own video processors (transformers' video processors need torchvision: this
file runs in the environment scripts/video_env.sh builds, driven by tests/video/test_video_env.py; it skips where
torchvision does not import). Clips are synthetic scenes written as MPEG-4 files and decoded with PyAV
(records.open_video). Each sequence keeps its own video rows beside image, video-and-image and text-only records
(a selection's logits are the full batch's rows; packed logits are the padded ones), and both trainers give the same
losses and gradient norms on the logits route, --fused-linear and --packing."""
import dataclasses
import json
import random

import pytest
import torch

from rlhfv_train.data import PairCollator, PreferenceRecord, load_records, open_video, synthetic
from rlhfv_train.data.inputs import ROW_COUNTS, model_kwargs
from rlhfv_train.models.support_table import selection_error, video_support_markdown
from rlhfv_train.models.tiny_families import FAMILIES, build_family
from rlhfv_train.models.packed_model import check_packing, known_unsupported
from routes import assert_routes_agree

pytest.importorskip("torchvision")
pytest.importorskip("av")

VIDEO_FAMILIES = [name for name, family in FAMILIES.items() if family.video]
# per record: (frames in the clip or None, images); 11 frames sampled to 8 and 3 frames repeated up to 8
LAYOUT = [(11, 0), (None, 1), (3, 1), (None, 0), (11, 2)]


def clip(folder, name, frames, seed):
    example = synthetic.make_example(random.Random(seed))
    return synthetic.write_video(str(folder / name), example["objects"], frames, seed=seed), example


def write_records(folder, layout):
    """A JSONL file in our layout with one record per (frames, images) entry of `layout`."""
    rows = []
    for i, (frames, images) in enumerate(layout):
        rng = random.Random(i)
        example = synthetic.make_example(rng)
        row = dict(question=example["question"], chosen=example["chosen"], rejected=example["rejected"],
                   objects=example["objects"])
        if frames is not None:
            row["video"] = clip(folder, f"clip{i}.mp4", frames, i)[0]
        names = []
        for j in range(images):
            names.append(f"{i}-{j}.png")
            synthetic.draw(example["objects"], rng=rng).resize(((32, 32), (64, 32))[j]).save(folder / names[-1])
        if names:
            row["image"] = names
        rows.append(row)
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_video_table_is_the_generated_one():
    """docs/models.md's video table is what this environment's families do (the ✓ there ran here)."""
    import os
    docs = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "models.md")
    with open(docs) as f:
        assert video_support_markdown() in f.read(), \
            ("docs/models.md's video table is stale: paste `python -m rlhfv_train.models.support_table --video` "
             "(.venv/video)")


def test_frames_are_sampled_uniformly_over_the_clip(tmp_path):
    """8 frames of an 11-frame clip at indices round(linspace(0, 10, 8)); a 3-frame clip repeats its frames."""
    import av
    records, _ = load_records(write_records(tmp_path, [(11, 0), (3, 0)]))
    with av.open(records[0].video) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(every) == 11
    got = open_video(records[0])
    assert list(got.metadata.frames_indices) == [0, 1, 3, 4, 6, 7, 9, 10] and got.metadata.fps == 4
    for k, index in enumerate(got.metadata.frames_indices):
        assert (got.frames[k] == every[index]).all()
    short = open_video(records[1]).frames
    assert short.shape[0] == 8 and (short[0] == short[1]).all() and not (short[0] == short[-1]).all()


@pytest.mark.parametrize("name", VIDEO_FAMILIES)
def test_each_sequence_keeps_its_own_video_rows(name, tmp_path):
    """Video, image, video-and-image and text-only records in one batch: cutting the batch (to imageless and
    video-only sequences too) keeps each sequence's logits; packing gives the padded logits."""
    processor, model = build_family(name)
    assert processor.video_processor is not None
    records, _ = load_records(write_records(tmp_path, LAYOUT))
    if name == "smolvlm":  # its processor drops the images of a batch with a video (collate.VIDEO_WITH_IMAGES_FAILS)
        with pytest.raises(ValueError, match="a batch with videos and images, for SmolVLMProcessor, which drops"):
            PairCollator(processor, gamma=5.0)(list(enumerate(records)))
        records = [dataclasses.replace(r, images=()) for r in records]  # videos beside text-only records
    batch = PairCollator(processor, gamma=5.0)(list(enumerate(records)))
    inputs = batch.model_inputs()
    assert any("video" in k for k in inputs) or name == "internvl"  # InternVL joins the frames to pixel_values
    for rows in ([0, 7], [3], [8, 2], [5, 4, 1], [9, 0, 6]):
        assert selection_error(model, inputs, rows) < 1e-4, rows
    if known_unsupported(model.config.model_type) is None:
        assert check_packing(model, inputs) < 1e-3
    if name == "internvl":  # frames are one tile each: 8 of the 16-pixel tiles per clip, beside the images' tiles
        counts = inputs[ROW_COUNTS.format("pixel_values")].tolist()
        alone = PairCollator(processor, gamma=5.0)([(0, records[0])]).inputs
        assert alone["pixel_values"].shape[0] == 16 and counts[0] == 8


def test_a_video_changes_the_scores(tmp_path):
    """The frames reach the model: the same texts with clips of two different scenes score differently (a dropped
    video would not)."""
    processor, model = build_family("qwen2-vl")
    texts = dict(question="what do you see ?", chosen="a red circle", rejected="a blue circle")
    rows = [dict(texts, video=clip(tmp_path, f"scene{seed}.mp4", 8, seed)[0]) for seed in (0, 1)]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = load_records(str(tmp_path / "two.jsonl"))
    inputs = PairCollator(processor, gamma=5.0)(list(enumerate(records))).model_inputs()
    with torch.no_grad():
        logits = model(**model_kwargs(inputs)).logits
    assert torch.equal(inputs["input_ids"][0], inputs["input_ids"][1])
    assert (logits[0] - logits[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["internvl", "qwen2-vl"])
def test_ddpo_and_grpo_train_on_video_records(name, tmp_path):
    """DDPO and GRPO on video, image, video-and-image and text-only records: the logits route, --fused-linear and
    --packing give the same losses and gradient norms (tests/routes.py)."""
    data = write_records(tmp_path, LAYOUT * 2)
    processor, model = build_family(name, seed=1)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    assert_routes_agree(data, str(tmp_path / "model"), tmp_path, eval_fraction=0.2, max_tokens_per_row=256)
