"""Data as users have it (rlhfv_train/data/formats.py): a folder saved with `datasets` (Dataset and DatasetDict, image
columns as datasets' Image feature), a Parquet shard in the RLHF-V layout, TRL's preference layout with plain and
conversational texts and an images list column; then the trainer runs on it. Bad layouts name the row."""
import io
import json

import pytest

from rlhfv_train.data import DataError, load_records, open_images

datasets = pytest.importorskip("datasets")
PIL = pytest.importorskip("PIL.Image")


def png(color):
    buf = io.BytesIO()
    PIL.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def user(text, image=True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def assistant(text):
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def trl_rows(conversational):
    rows = []
    for i, color in enumerate(((255, 0, 0), (0, 0, 255), (0, 255, 0))):
        question, chosen, rejected = f"what do you see {i} ?", "a red circle", "a blue circle"
        rows.append({"prompt": user(question) if conversational else f"<image> {question}",
                     "chosen": assistant(chosen) if conversational else chosen,
                     "rejected": assistant(rejected) if conversational else rejected,
                     "images": [PIL.new("RGB", (8, 8), color)]})
    return rows


@pytest.mark.parametrize("conversational", [False, True])
def test_trl_layout_in_a_saved_dataset_folder(tmp_path, conversational):
    features = datasets.Features({"prompt": datasets.Value("string") if not conversational else
                                  datasets.List({"role": datasets.Value("string"), "content": datasets.List(
                                      {"type": datasets.Value("string"), "text": datasets.Value("string")})}),
                                  "chosen": datasets.Value("string") if not conversational else
                                  datasets.List({"role": datasets.Value("string"), "content": datasets.List(
                                      {"type": datasets.Value("string"), "text": datasets.Value("string")})}),
                                  "rejected": datasets.Value("string") if not conversational else
                                  datasets.List({"role": datasets.Value("string"), "content": datasets.List(
                                      {"type": datasets.Value("string"), "text": datasets.Value("string")})}),
                                  "images": datasets.List(datasets.Image())})
    rows = trl_rows(conversational)
    ds = datasets.Dataset.from_list(rows, features=features)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    for folder in ("single", "dict"):
        records, report = load_records(str(tmp_path / folder))
        assert report.loaded == 3
        assert [r.question for r in records] == [f"what do you see {i} ?" for i in range(3)]
        assert records[0].chosen == "a red circle" and records[0].rejected == "a blue circle"
        assert isinstance(records[0].images[0], bytes)  # kept encoded, not decoded and re-encoded
        assert open_images(records[1])[0].getpixel((0, 0)) == (0, 0, 255)
        assert records[2].source == f"{tmp_path / folder}: row 2"


def test_several_images_per_record_in_trls_layout_and_ours(tmp_path):
    """TRL's "images" list and our "image" list keep every image, in order; a null entry and both fields are
    refused by name."""
    colors = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    rows = [{"prompt": "<image> <image> q", "chosen": "a", "rejected": "b", "images": [PIL.new("RGB", (8, 8), c)
                                                                                        for c in colors[:2]]},
            {"prompt": "q", "chosen": "a", "rejected": "b", "images": [PIL.new("RGB", (8, 8), c) for c in colors]}]
    datasets.Dataset.from_list(rows, features=datasets.Features({
        "prompt": datasets.Value("string"), "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
        "images": datasets.List(datasets.Image())})).save_to_disk(str(tmp_path / "trl"))
    records, _ = load_records(str(tmp_path / "trl"))
    assert [len(r.images) for r in records] == [2, 3] and records[0].question == "q"
    assert [image.getpixel((0, 0)) for image in open_images(records[1])] == colors
    for i, c in enumerate(colors):
        PIL.new("RGB", (8, 8), c).save(tmp_path / f"{i}.png")
    ours = {"question": "q", "chosen": "a", "rejected": "b"}
    (tmp_path / "ours.jsonl").write_text(json.dumps({**ours, "image": ["2.png", "0.png"]}) + "\n")
    assert [image.getpixel((0, 0)) for image in open_images(load_records(str(tmp_path / "ours.jsonl"))[0][0])] == \
        [colors[2], colors[0]]
    for bad, message in (({"image": ["0.png", None]}, "a null entry"), ({"image": "0.png", "images": ["1.png"]},
                                                                       "both 'image' and 'images'")):
        (tmp_path / "bad.jsonl").write_text(json.dumps({**ours, **bad}) + "\n")
        with pytest.raises(DataError, match=f"bad.jsonl:1: {message}"):
            load_records(str(tmp_path / "bad.jsonl"))


def test_rlhfv_parquet_shard(tmp_path):
    rows = [{"image": {"bytes": png((255, 0, 0)), "path": "x.png"}, "idx": i,
             "text": json.dumps({"question": f"q{i}", "chosen": "a red cube", "rejected": "a blue cube"})}
            for i in range(4)]
    datasets.Dataset.from_list(rows, features=datasets.Features({
        "image": datasets.Image(), "idx": datasets.Value("int64"), "text": datasets.Value("string")})).to_parquet(
        str(tmp_path / "rlhf-v-00000-of-00001.parquet"))
    records, _ = load_records(str(tmp_path / "rlhf-v-00000-of-00001.parquet"))
    assert [r.question for r in records] == ["q0", "q1", "q2", "q3"] and open_images(records[3])[0].size == (8, 8)


@pytest.mark.parametrize("row,message", [
    ({"prompt": "q", "chosen": "a", "rejected": "b", "images": "x.png"}, "field 'images' must be a list"),
    ({"prompt": [{"role": "system", "content": "x"}], "chosen": "a", "rejected": "b"}, "no 'user' message"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": [{"type": "image"}]}], "rejected": "b"},
     "'chosen': the 'assistant' message has no text"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a string or a list of messages"),
])
def test_bad_trl_rows_name_the_row(tmp_path, row, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({k: (v if not isinstance(v, list) or not v or not isinstance(v[0], bytes) else
                                    [{"bytes": b.decode("latin1")} for b in v]) for k, v in row.items()}) + "\n")
    with pytest.raises(DataError, match=f"d.jsonl:1: .*{message}"):
        load_records(str(path))


def test_not_a_dataset_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a dataset folder saved with datasets' save_to_disk"):
        load_records(str(tmp_path / "empty"))


def test_trainer_runs_on_a_trl_dataset_folder(tmp_path):
    from rlhfv_train.ddpo import TrainConfig, train
    rows = trl_rows(conversational=True) * 4
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    summary = train(TrainConfig(data=str(tmp_path / "ds"), output_dir=str(tmp_path / "out"), max_steps=2,
                                batch_size=2, eval_fraction=0.25, eval_every=2, save_every=2,
                                hallucination_eval=False, progress=False, device="cpu"))
    assert summary["step"] == 2
