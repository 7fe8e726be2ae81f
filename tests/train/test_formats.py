"""Data as users have it (rlhfv_train/data/formats.py): a folder saved with `datasets` (Dataset and DatasetDict, image
columns as datasets' Image feature), a Parquet shard in the RLHF-V layout, TRL's preference layout with plain and
conversational texts and an images list column; then the trainer runs on it. Bad layouts name the row."""
import io
import json

import pytest

from rlhfv_train.data import DataError, load_records, open_image

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
        assert isinstance(records[0].image, bytes)  # kept encoded, not decoded and re-encoded
        assert open_image(records[1]).getpixel((0, 0)) == (0, 0, 255)
        assert records[2].source == f"{tmp_path / folder}: row 2"


def test_rlhfv_parquet_shard(tmp_path):
    rows = [{"image": {"bytes": png((255, 0, 0)), "path": "x.png"}, "idx": i,
             "text": json.dumps({"question": f"q{i}", "chosen": "a red cube", "rejected": "a blue cube"})}
            for i in range(4)]
    datasets.Dataset.from_list(rows, features=datasets.Features({
        "image": datasets.Image(), "idx": datasets.Value("int64"), "text": datasets.Value("string")})).to_parquet(
        str(tmp_path / "rlhf-v-00000-of-00001.parquet"))
    records, _ = load_records(str(tmp_path / "rlhf-v-00000-of-00001.parquet"))
    assert [r.question for r in records] == ["q0", "q1", "q2", "q3"] and open_image(records[3]).size == (8, 8)


@pytest.mark.parametrize("row,message", [
    ({"prompt": "q", "chosen": "a", "rejected": "b", "images": [png((1, 2, 3)), png((1, 2, 3))]},
     "2 images in one record; one image per record"),
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
