"""Preference data loading: JSONL with image files, Parquet, the RLHF-V layout, and every kind of bad record."""
import base64
import io
import json

import pytest

from rlhfv_train.data import DataError, load_records, open_images

PIL = pytest.importorskip("PIL.Image")


def png_bytes(color=(255, 0, 0)):
    buf = io.BytesIO()
    PIL.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def good(i=0, **extra):
    return {"image": "img.png", "question": f"q{i}", "chosen": "a red cube", "rejected": "a blue cube", **extra}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img.png").write_bytes(png_bytes())
    return tmp_path


def test_jsonl_with_image_files_and_margin(folder):
    path = write_jsonl(folder / "d.jsonl", [good(0), "", good(1, reward_margin=0.5)])
    records, report = load_records(path)
    assert report.loaded == 2 and not report.skipped
    assert records[0].images == (str(folder / "img.png"),) and records[1].reward_margin == 0.5
    assert records[1].source.endswith("d.jsonl:3")  # blank line 2 is skipped, line numbers stay true
    assert open_images(records[0])[0].size == (8, 8)


def test_rlhfv_layout_with_inline_base64_image(tmp_path):
    row = {"image": {"bytes": base64.b64encode(png_bytes()).decode(), "path": None},
           "text": json.dumps({"question": "what?", "chosen": "c", "rejected": "r"})}
    records, _ = load_records(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert isinstance(records[0].images[0], bytes) and records[0].chosen == "c"
    assert open_images(records[0])[0].mode == "RGB"


def test_text_only_records(tmp_path):
    records, _ = load_records(write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "chosen": "c",
                                                                   "rejected": "r"}]))
    assert records[0].images == () and open_images(records[0]) == []


@pytest.mark.parametrize("bad,message", [
    ("{not json", r"d.jsonl:2: invalid JSON \(Expecting property name enclosed in double quotes: column 2\)$"),
    ('{"question": "unterminated',  # json's message ends in "at" (it used to read "at at column")
     r"d.jsonl:2: invalid JSON \(Invalid control character at: column 27\)$"),
    (json.dumps({"image": "img.png", "question": "q", "rejected": "r"}), r"d.jsonl:2: missing field 'chosen'"),
    (json.dumps({"image": "img.png", "question": "q", "chosen": 3, "rejected": "r"}),
     r"d.jsonl:2: field 'chosen' must be a string"),
    (json.dumps({"image": "img.png", "question": " ", "chosen": "c", "rejected": "r"}),
     r"d.jsonl:2: field 'question' is empty"),
    (json.dumps({"image": "missing.png", "question": "q", "chosen": "c", "rejected": "r"}),
     r"d.jsonl:2: image file not found: .*missing.png"),
    (json.dumps(good(reward_margin=-1)), r"d.jsonl:2: reward_margin must be a number >= 0"),
    (json.dumps([1, 2]), r"d.jsonl:2: expected an object"),
    (json.dumps({"image": {"bytes": "%%%"}, "question": "q", "chosen": "c", "rejected": "r"}),
     r"d.jsonl:2: field 'image.bytes' is not valid base64"),
])
def test_bad_records_name_file_and_line(folder, bad, message):
    path = write_jsonl(folder / "d.jsonl", [good(0), bad, good(2)])
    with pytest.raises(DataError, match=message):
        load_records(path)
    records, report = load_records(path, skip_bad=True)
    assert report.loaded == 2 and len(report.skipped) == 1 and "skipped 1" in report.summary()
    assert [r.question for r in records] == ["q0", "q2"]


@pytest.mark.parametrize("broken", [b"not a png", png_bytes()[:40], png_bytes()[:-20]])
def test_an_undecodable_image_is_found_on_load_and_skipped_with_skip_bad(folder, broken):
    (folder / "broken.png").write_bytes(broken)
    path = write_jsonl(folder / "d.jsonl", [good(0), good(1, image="broken.png"), good(2)])
    with pytest.raises(DataError, match=r"d.jsonl:2: cannot decode the image"):
        load_records(path)
    records, report = load_records(path, skip_bad=True)
    assert [r.question for r in records] == ["q0", "q2"] and report.kinds == {"undecodable image": 1}


def jpeg_bytes(size=64):
    buf = io.BytesIO()
    PIL.effect_noise((size, size), 64).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def header_only_png(width, height):
    """A PNG whose header claims width x height pixels (chunks with valid CRCs; no pixel data worth the name)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("inline", [False, True])
def test_a_truncated_jpeg_is_found_on_load(folder, inline):
    """verify() reads no JPEG data: a JPEG cut short passed the load check and stopped the run at its first batch,
    past --skip-bad (issue 42). Every image is decoded whole at load now, file or inline bytes."""
    whole = jpeg_bytes()
    cut = whole[:len(whole) * 2 // 3]
    (folder / "whole.jpg").write_bytes(whole)
    (folder / "cut.jpg").write_bytes(cut)

    def record(i, data, name):
        if not inline:
            return good(i, image=name)
        return {"image": {"bytes": base64.b64encode(data).decode(), "path": None},
                "text": json.dumps({"question": f"q{i}", "chosen": "c", "rejected": "r"})}

    path = write_jsonl(folder / "d.jsonl", [record(0, whole, "whole.jpg"), record(1, cut, "cut.jpg"),
                                            record(2, whole, "whole.jpg")])
    with pytest.raises(DataError, match=r"d.jsonl:2: cannot decode the image \(image file is truncated"):
        load_records(path)
    records, report = load_records(path, skip_bad=True)
    assert [r.question for r in records] == ["q0", "q2"] and report.kinds == {"undecodable image": 1}
    assert open_images(records[0])[0].size == (64, 64)


def test_an_image_over_the_decompression_bomb_limit_is_a_bad_record(folder):
    """A 200-megapixel PNG: Pillow refuses to open it (DecompressionBombError, not an OSError): a bad record named by
    line, skipped with --skip-bad, never a raw traceback."""
    (folder / "huge.png").write_bytes(header_only_png(20000, 10000))
    path = write_jsonl(folder / "d.jsonl", [good(0), good(1, image="huge.png"), good(2)])
    with pytest.raises(DataError, match=r"d.jsonl:2: the image is too large to decode safely .*MAX_IMAGE_PIXELS"):
        load_records(path)
    records, report = load_records(path, skip_bad=True)
    assert [r.question for r in records] == ["q0", "q2"] and report.kinds == {"oversized image": 1}


def test_invalid_utf8_names_file_and_line(folder):
    path = folder / "d.jsonl"
    path.write_bytes(b"\n".join([json.dumps(good(0)).encode(), b'{"question": "caf\xe9", "chosen": "c"}',
                                 json.dumps(good(2)).encode()]) + b"\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8 \(byte 0xe9 at byte 18 of the line\)"):
        load_records(str(path))
    records, report = load_records(str(path), skip_bad=True)
    assert len(records) == 2 and report.kinds == {"not UTF-8": 1}


def test_a_utf8_byte_order_mark_is_not_an_error(folder):
    path = folder / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good(0)).encode() + b"\n")
    assert load_records(str(path))[0][0].question == "q0"


def test_text_only_records_share_a_file_with_image_records(folder):
    text_only = {"question": "q", "chosen": "c", "rejected": "r"}
    records, report = load_records(write_jsonl(folder / "d.jsonl", [good(0), text_only, good(2)]))
    assert [len(r.images) for r in records] == [1, 0, 1] and report.loaded == 3


def test_the_load_report_counts_each_kind(folder):
    rows = [good(0), "{bad", json.dumps({"image": "gone.png", "question": "q", "chosen": "c", "rejected": "r"}),
            "[1]", "{also bad", good(5)]
    records, report = load_records(write_jsonl(folder / "d.jsonl", rows), skip_bad=True)
    assert len(records) == 2 and report.loaded == 2
    assert report.kinds == {"invalid JSON": 2, "image not found": 1, "bad field": 1}
    assert "skipped 4 bad ones (2 invalid JSON, 1 image not found, 1 bad field; first: " in report.summary()


def test_missing_file_unknown_format_and_nothing_usable(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(DataError, match="unknown data format"):
        load_records(str(tmp_path / "d.csv"))
    with pytest.raises(DataError, match="no usable records"):
        load_records(write_jsonl(tmp_path / "d.jsonl", ["{bad"]), skip_bad=True)


def test_parquet_rows(folder):
    pa = pytest.importorskip("pyarrow")
    pytest.importorskip("datasets", reason="Parquet files are read through the datasets package")
    import pyarrow.parquet as pq
    table = pa.table({
        "image": [{"bytes": png_bytes(), "path": None}, {"bytes": None, "path": "img.png"}, None],
        "question": ["q0", "q1", "q2"],
        "chosen": ["c0", "c1", None],
        "rejected": ["r0", "r1", "r2"],
        "reward_margin": [0.1, None, 0.3],
    })
    path = str(folder / "d.parquet")
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"d.parquet: row 2: missing field 'chosen'"):
        load_records(path)
    records, report = load_records(path, skip_bad=True)
    assert report.loaded == 2
    assert isinstance(records[0].images[0], bytes) and records[1].images == (str(folder / "img.png"),)
    assert records[0].reward_margin == pytest.approx(0.1) and records[1].reward_margin is None


def test_held_out_records_of_another_kind_join_the_run(folder):
    """Text-only held-out records beside image training records (a batch may mix them)."""
    from types import SimpleNamespace
    from rlhfv_train.data import load_run_records
    train = write_jsonl(folder / "train.jsonl", [good(0), good(1)])
    held = write_jsonl(folder / "held.jsonl", [{"question": "q", "chosen": "c", "rejected": "r"}])
    dist = SimpleNamespace(is_main=True, barrier=lambda: None)
    records, train_idx, eval_idx, _ = load_run_records(train, eval_data=held, eval_fraction=0.0, seed=0,
                                                      skip_bad=False, output_dir=str(folder), synthetic_examples=0,
                                                      dist=dist)
    assert [len(records[i].images) for i in train_idx + eval_idx] == [1, 1, 0]


def test_video_records_load_and_bad_ones_are_refused_by_name(folder):
    """MM-RLHF's video subset ({"video": path}, or "videos": [path]): the clip is checked on load (the frames the
    prompt will show decode) and sampled to video_frames; a missing, undecodable or second clip, a video given as
    bytes and a bad frame count are refused by name (a video field read as a text-only record would train without
    it, silently)."""
    pytest.importorskip("av")
    from rlhfv_train.data import open_video, synthetic
    synthetic.write_video(str(folder / "clip.mp4"), [("red", "circle", "left")], 5)
    text = {"question": "q", "chosen": "c", "rejected": "r"}
    path = write_jsonl(folder / "d.jsonl", [{"video": "clip.mp4", **text}, {"videos": ["clip.mp4"], **good(0)}])
    records, _ = load_records(path, video_frames=3)
    assert [r.video for r in records] == [str(folder / "clip.mp4")] * 2 and len(records[1].images) == 1
    clip = open_video(records[0])
    assert clip.frames.shape == (3, 32, 32, 3) and list(clip.metadata.frames_indices) == [0, 2, 4]
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    bad = [({"video": "gone.mp4"}, r"d.jsonl:1: video file not found: .*gone.mp4"),
           ({"video": "broken.mp4"}, r"d.jsonl:1: cannot decode the video .*broken.mp4"),
           ({"videos": ["clip.mp4", "clip.mp4"]}, r"d.jsonl:1: field 'videos' holds 2 videos; a record shows one"),
           ({"video": "clip.mp4", "videos": ["clip.mp4"]}, r"both 'video' and 'videos'"),
           ({"video": {"bytes": "AAAA"}}, r"field 'video' must be the path of a video file, got dict")]
    for fields, message in bad:
        with pytest.raises(DataError, match=message):
            load_records(write_jsonl(folder / "d.jsonl", [{**fields, **text}]))
    with pytest.raises(ValueError, match="video_frames must be an integer >= 1, got 0"):
        load_records(path, video_frames=0)
    records, report = load_records(write_jsonl(folder / "e.jsonl", [good(0), {"video": "broken.mp4", **text}]),
                                   skip_bad=True)
    assert len(records) == 1 and report.kinds == {"undecodable video": 1}


def test_a_video_record_for_a_processor_without_video_is_refused_by_name(folder):
    """A family whose processor has no video processor (here: torchvision does not import, or the family takes no
    video) refuses a video record at its first batch, naming the processor; a text-only model names the record."""
    pytest.importorskip("av")
    from rlhfv_train.data import PairCollator, synthetic
    from rlhfv_train.models.tiny_families import build_family
    synthetic.write_video(str(folder / "clip.mp4"), [("red", "circle", "left")], 5)
    records, _ = load_records(write_jsonl(folder / "d.jsonl", [{"video": "clip.mp4", "question": "what do you see ?",
                                                                "chosen": "a red circle", "rejected": "a circle"}]))
    processor, _ = build_family("paligemma" if _torchvision_imports() else "qwen2-vl")
    with pytest.raises(ValueError, match=f"a video record, for a processor without a video processor "
                                         f"\\({type(processor).__name__}\\)"):
        PairCollator(processor, gamma=5.0)([(0, records[0])])
    tokenizer, _ = build_family("qwen2")
    with pytest.raises(ValueError, match=r"d.jsonl:1: a record with images or a video, for a model without an image"):
        PairCollator(tokenizer, gamma=5.0)([(0, records[0])])


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # PyPI's torchvision beside the CPU wheel raises RuntimeError
        return False
    return True
