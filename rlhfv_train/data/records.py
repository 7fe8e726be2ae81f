"""Preference records: from JSONL (with image files), Parquet or a `datasets` folder, in our, RLHF-V's or TRL's
layout (formats.py).

A record is its images (one, several or none), a question, the chosen (corrected) answer, the rejected (original)
answer and, optionally, a reward-model margin for MM-DPO scaling. Our layout, per line / row:
  {"image": "imgs/0001.png", "question": ..., "chosen": ..., "rejected": ..., "reward_margin": 0.7}
"image" may be a list of images (or "images", TRL's name), and omitted or null for a text-only record (text-only
and image records may share a file, and a batch, with a vision-language model); the prompt shows
the images in their order, before the question. Relative image paths are resolved against the data file's folder.
"video" (or "videos", a list of one; MM-RLHF's video subset) is the path of a video file: the prompt shows it before
any images, as `video_frames` frames sampled uniformly over the whole clip (decoded with PyAV through transformers'
load_video; a clip with fewer frames repeats some), and the model family's own video processor prepares them.
An optional "objects" list holds what the image really contains (any JSON values; the synthetic data writes
[colour, shape, side] triples): rlhfv_train.eval checks generated answers against it.

Nothing is silently dropped: a malformed record — bad bytes (not UTF-8), bad JSON, a missing or wrong field, an image
that is missing or cannot be decoded (every image and video is checked on load, so a run never fails on one hours
in) — raises DataError naming the file and line (JSONL) or row (Parquet, dataset folder), unless
skip_bad=True, in which case it is skipped and counted by kind in the LoadReport.
"""
from __future__ import annotations

import base64
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from .formats import LayoutError, canonical, encoded_image, rows


# fields that hold a video (ours, TRL's, MM-RLHF's video subset)
VIDEO_FIELDS = ("video", "videos")
# frames sampled from each video unless load_records is told otherwise (InternVL's and LLaVA-Video's usual count)
DEFAULT_VIDEO_FRAMES = 8


class DataError(ValueError):
    """A record that cannot be used, with the file and line or row it came from; `kind` sorts it in the load report."""

    def __init__(self, message: str, kind: str = "bad field"):
        super().__init__(message)
        self.kind = kind


@dataclass
class PreferenceRecord:
    question: str
    chosen: str
    rejected: str
    images: tuple = ()  # each encoded image bytes or an absolute path to an image file, in the prompt's order
    video: str | None = None  # the absolute path of a video file, shown before the images
    video_frames: int = DEFAULT_VIDEO_FRAMES  # frames sampled from it
    reward_margin: float | None = None
    source: str = ""  # "file:line" or "file:row N", for messages
    objects: list | None = None  # ground truth for the hallucination metric (inner lists become tuples)


@dataclass
class LoadReport:
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)  # one reason per skipped record
    kinds: Counter = field(default_factory=Counter)    # skipped records by kind of problem

    def skip(self, error: "DataError") -> None:
        self.skipped.append(str(error))
        self.kinds[error.kind] += 1

    def summary(self) -> str:
        text = f"loaded {self.loaded} records"
        if self.skipped:
            counts = ", ".join(f"{n} {kind}" for kind, n in self.kinds.most_common())
            text += f", skipped {len(self.skipped)} bad ones ({counts}; first: {self.skipped[0]})"
        return text


def _text_field(obj: dict, name: str, where: str) -> str:
    if name not in obj or obj[name] is None:
        raise DataError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _image_field(value, where: str, base_dir: str) -> bytes | str | None:
    value = encoded_image(value)
    if value is None:
        return None
    if isinstance(value, dict):  # {"bytes": ..., "path": ...} as written by Hugging Face datasets
        if value.get("bytes") is not None:
            return _image_field(value["bytes"], where, base_dir) if isinstance(value["bytes"], bytes) \
                else _decode_base64(value["bytes"], where)
        if value.get("path"):
            return _image_field(value["path"], where, base_dir)
        raise DataError(f"{where}: field 'image' has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(base_dir, value)
        if not os.path.isfile(path):
            raise DataError(f"{where}: image file not found: {path}", kind="image not found")
        return path
    raise DataError(f"{where}: field 'image' must be a path, bytes or {{'bytes', 'path'}}, got {type(value).__name__}")


def _images_field(fields: dict, where: str, base_dir: str) -> tuple:
    """The record's images from "image" (one, or a list) or "images" (a list); () for none."""
    if fields.get("image") is not None and fields.get("images") is not None:
        raise DataError(f"{where}: both 'image' and 'images' are given; use one")
    value = fields.get("image") if fields.get("image") is not None else fields.get("images")
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        return (_image_field(value, where, base_dir),)
    images = tuple(_image_field(v, where, base_dir) for v in value)
    if any(image is None for image in images):
        raise DataError(f"{where}: a null entry in the record's list of images")
    return images


def _video_field(fields: dict, where: str, base_dir: str) -> str | None:
    """The record's video file from "video" (a path) or "videos" (a list of one path); None for none."""
    given = [name for name in VIDEO_FIELDS if fields.get(name) not in (None, [], "")]
    if len(given) > 1:
        raise DataError(f"{where}: both 'video' and 'videos' are given; use one")
    if not given:
        return None
    name, value = given[0], fields[given[0]]
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise DataError(f"{where}: field {name!r} holds {len(value)} videos; a record shows one video",
                            kind="video record")
        value = value[0]
    if isinstance(value, dict) and value.get("path") and value.get("bytes") is None:
        value = value["path"]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be the path of a video file, got {type(value).__name__} "
                        "(videos are read from files)", kind="video record")
    path = value if os.path.isabs(value) else os.path.join(base_dir, value)
    if not os.path.isfile(path):
        raise DataError(f"{where}: video file not found: {path}", kind="video not found")
    return path


def _decode_base64(text, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: field 'image.bytes' is not valid base64 ({exc})") from None


def parse_record(obj, where: str, base_dir: str) -> PreferenceRecord:
    """One record from a decoded JSON object or Parquet row; raises DataError naming `where`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
    try:
        fields = canonical(obj)  # RLHF-V's and TRL's layouts onto ours (formats.py)
    except LayoutError as exc:
        raise DataError(f"{where}: {exc}") from None
    margin = fields.get("reward_margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
            raise DataError(f"{where}: reward_margin must be a number >= 0, got {margin!r}")
        margin = float(margin)
    objects = fields.get("objects")
    if objects is not None:
        if not isinstance(objects, list):
            raise DataError(f"{where}: objects must be a list, got {type(objects).__name__}")
        objects = [as_hashable(o) for o in objects]
        for o in objects:
            try:
                hash(o)
            except TypeError:
                raise DataError(f"{where}: objects entries must be strings, numbers or lists of them, got "
                                f"{o!r}") from None
    return PreferenceRecord(
        question=_text_field(fields, "question", where),
        chosen=_text_field(fields, "chosen", where),
        rejected=_text_field(fields, "rejected", where),
        images=_images_field(fields, where, base_dir),
        video=_video_field(fields, where, base_dir),
        reward_margin=margin,
        source=where,
        objects=objects,
    )


def as_hashable(value):
    """JSON lists -> tuples (recursively), so that objects can be compared as set members."""
    return tuple(as_hashable(v) for v in value) if isinstance(value, list) else value


def load_records(path: str, *, skip_bad: bool = False, video_frames: int = DEFAULT_VIDEO_FRAMES
                 ) -> tuple[list[PreferenceRecord], LoadReport]:
    """All records of a .jsonl or .parquet file or a dataset folder saved with `datasets` (formats.py: the layouts
    read), and what was loaded or skipped; video_frames: the frames sampled from each video record's clip."""
    if isinstance(video_frames, bool) or not isinstance(video_frames, int) or video_frames < 1:
        raise ValueError(f"video_frames must be an integer >= 1, got {video_frames!r}")
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    base_dir = os.path.abspath(path) if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    records, report = [], LoadReport()
    try:
        for where, obj in rows(path):
            try:
                if isinstance(obj, LayoutError):
                    raise DataError(f"{where}: {obj}", kind=obj.kind)
                record = parse_record(obj, where, base_dir)
                record.video_frames = video_frames
                open_images(record, check_only=True)
                open_video(record, check_only=True)
                records.append(record)
            except DataError as exc:
                if not skip_bad:
                    raise
                report.skip(exc)
    except LayoutError as exc:
        raise DataError(str(exc), kind=exc.kind) from None
    report.loaded = len(records)
    if not records:
        raise DataError(f"{path}: no usable records ({report.summary()})")
    return records, report


def open_images(record: PreferenceRecord, check_only: bool = False) -> list:
    """The record's images as RGB PIL images ([] for a text-only record); check_only: only check that each decodes,
    every pixel (verify() alone reads no JPEG data: a truncated JPEG would pass the load and stop the run at its first
    batch; nothing to check without Pillow). An image over Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS,
    ~179 megapixels for the error) is a bad record too."""
    if not record.images:
        return []
    try:
        from PIL import Image  # noqa: F401
    except ImportError:
        if check_only:
            return []
        raise
    return [_open_image(image, record.source, check_only) for image in record.images]


def _open_image(encoded, source: str, check_only: bool):
    from PIL import Image, UnidentifiedImageError
    try:
        stream = io.BytesIO(encoded) if isinstance(encoded, bytes) else encoded
        with Image.open(stream) as image:
            if not check_only:
                return image.convert("RGB")
            image.verify()  # the container's own checks (PNG chunk checksums), then a new handle to decode it all
        if not isinstance(stream, str):
            stream.seek(0)
        with Image.open(stream) as image:
            image.load()
            return None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{source}: the image is too large to decode safely ({exc}); raise PIL.Image."
                        "MAX_IMAGE_PIXELS if it is meant to be", kind="oversized image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # verify() raises SyntaxError too
        raise DataError(f"{source}: cannot decode the image ({exc})", kind="undecodable image") from None


class VideoClip(NamedTuple):
    """A record's video as the processor takes it."""
    frames: object    # [frames, H, W, 3] uint8 RGB (numpy)
    metadata: object  # transformers' VideoMetadata: the clip's fps and length, the sampled frame indices


def open_video(record: PreferenceRecord, check_only: bool = False) -> VideoClip | None:
    """The record's video as record.video_frames RGB frames sampled uniformly over the clip, with the clip's metadata
    (timestamps: Qwen3-VL writes each frame's time into the prompt), or None for a record without one; check_only:
    only check that those frames decode (PyAV decodes the clip up to the last of them either way). Decoded with PyAV
    (the `av` package) through transformers' load_video."""
    if record.video is None:
        return None
    try:
        import av  # noqa: F401
    except ImportError:
        raise DataError(f"{record.source}: a video record needs PyAV to decode its video (pip install av)",
                        kind="video record") from None
    import numpy as np
    from transformers.video_utils import load_video
    wanted = record.video_frames
    sampled = {}

    def unique_uniform(metadata, **_):  # PyAV's reader keeps each index once: repeats are restored below
        total = int(metadata.total_num_frames)
        if total < 1:
            raise DataError(f"{record.source}: the video {record.video} has no frames", kind="undecodable video")
        sampled["at"] = np.linspace(0, total - 1, wanted).round().astype(int)
        sampled["unique"] = np.unique(sampled["at"])
        return sampled["unique"]

    try:
        frames, metadata = load_video(record.video, backend="pyav", sample_indices_fn=unique_uniform)
    except DataError:
        raise
    except Exception as exc:  # PyAV's own errors (av.error.InvalidDataError, ...), an empty decode
        raise DataError(f"{record.source}: cannot decode the video {record.video} ({type(exc).__name__}: {exc})",
                        kind="undecodable video") from None
    if check_only:
        return None
    unique = sampled["unique"]
    if len(frames) != len(unique):
        raise DataError(f"{record.source}: the video {record.video} gave {len(frames)} of the {len(unique)} frames "
                        "its container announces", kind="undecodable video")
    metadata.frames_indices = sampled["at"]
    return VideoClip(frames[np.searchsorted(unique, sampled["at"])], metadata)
