"""Where records come from and in which layout: files and folders (rows), and each row's fields mapped onto ours
(canonical: question, chosen, rejected, image or images, reward_margin, objects).

Sources: a .jsonl file (our reader: relative image paths, errors by line), a .parquet file (a shard of the published
RLHF-V dataset, or any table) and a folder saved with the `datasets` library (Dataset.save_to_disk; a DatasetDict
gives its "train" split) — both read with `datasets`, images kept encoded (never decoded and re-encoded on load).

Layouts, per row:
  ours       {"image", "question", "chosen", "rejected", "reward_margin"?, "objects"?}
  RLHF-V     {"image": {"bytes", "path"}, "text": "{\"question\": ..., \"chosen\": ..., \"rejected\": ...}"}
  TRL        {"prompt", "chosen", "rejected", "images": [images]} (or "image"), the texts either plain strings
             or conversational message lists ([{"role": "user", "content": [{"type": "image"}, {"type": "text",
             "text": ...}]}] for the prompt, one assistant message for each answer), as TRL's DPOTrainer takes them
A record may hold several images (a list under "image" or "images"); records.py reads them.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os


class LayoutError(ValueError):
    """A row whose layout is not one of the above (raised with the row's location by the caller); `kind` names the
    sort of problem for the load report's counts."""

    def __init__(self, message: str, kind: str = "bad layout"):
        super().__init__(message)
        self.kind = kind


def _message_text(messages, role: str, field: str) -> str:
    """The text of the last `role` message of a conversational field (content a string or a list of parts)."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise LayoutError(f"field {field!r} must be a string or a list of messages")
    turns = [m for m in messages if m.get("role") == role]
    if not turns:
        raise LayoutError(f"field {field!r} has no {role!r} message")
    content = turns[-1].get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if texts:
            return " ".join(t.strip() for t in texts if t.strip())
    raise LayoutError(f"field {field!r}: the {role!r} message has no text")


def _trl_text(value, role: str, field: str):
    if isinstance(value, str) or value is None:
        return value
    return _message_text(value, role, field)


def canonical(obj: dict) -> dict:
    """`obj`'s fields in our layout (other fields pass through); raises LayoutError."""
    if "text" in obj and "chosen" not in obj:  # RLHF-V: question/chosen/rejected inside a JSON string
        try:
            inner = json.loads(obj["text"])
        except (TypeError, json.JSONDecodeError) as exc:
            raise LayoutError(f"field 'text' is not a JSON object ({exc})") from None
        if not isinstance(inner, dict):
            raise LayoutError("field 'text' is not a JSON object")
        return {**obj, **inner}
    if "prompt" in obj and "question" not in obj:  # TRL's preference layout
        fields = dict(obj)
        prompt = _trl_text(obj["prompt"], "user", "prompt")
        if isinstance(prompt, str):
            prompt = prompt.replace("<image>", " ").strip()  # the placeholder; our prompts place the image
        fields["question"] = prompt
        fields["chosen"] = _trl_text(obj.get("chosen"), "assistant", "chosen")
        fields["rejected"] = _trl_text(obj.get("rejected"), "assistant", "rejected")
        images = obj.get("images")
        if images is not None and not isinstance(images, (list, tuple)):
            raise LayoutError("field 'images' must be a list")
        return fields
    return obj


def encoded_image(value):
    """A PIL image (a decoded `datasets` Image) as PNG bytes; anything else unchanged."""
    try:
        from PIL import Image
    except ImportError:
        return value
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    return value


def _undecoded(features):
    """`features` with every Image feature set to decode=False, so rows hold the stored bytes and path."""
    import datasets

    def walk(feature):
        if isinstance(feature, datasets.Image):
            return dataclasses.replace(feature, decode=False)
        if isinstance(feature, dict):
            return {k: walk(v) for k, v in feature.items()}
        if isinstance(feature, (list, tuple)):
            return type(feature)(walk(v) for v in feature)
        if dataclasses.is_dataclass(feature) and hasattr(feature, "feature"):  # List / Sequence / LargeList
            return dataclasses.replace(feature, feature=walk(feature.feature))
        return feature

    return datasets.Features({name: walk(f) for name, f in features.items()})


def _dataset_rows(dataset, name: str):
    dataset = dataset.cast(_undecoded(dataset.features))
    for row, obj in enumerate(dataset):
        yield f"{name}: row {row}", obj


def _load_from_disk(path: str):
    try:
        import datasets
    except ImportError:
        raise LayoutError(f"{path}: reading a saved dataset folder needs the datasets package") from None
    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as exc:
        raise LayoutError(f"{path}: not a dataset folder saved with datasets' save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded and len(loaded) != 1:
            raise LayoutError(f"{path}: a DatasetDict with splits {sorted(loaded)}; give the folder of one split "
                              "(or name one 'train')")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return loaded


def _parquet(path: str):
    try:
        import datasets
    except ImportError:
        raise LayoutError(f"{path}: reading Parquet needs the datasets package") from None
    return datasets.Dataset.from_parquet(path, keep_in_memory=True)


def rows(path: str):
    """(where, row dict) of every record of `path`; a row that cannot be read is yielded as a LayoutError."""
    lower = path.lower()
    if os.path.isdir(path):
        yield from _dataset_rows(_load_from_disk(path), path)
    elif lower.endswith(".parquet"):
        yield from _dataset_rows(_parquet(path), path)
    elif lower.endswith((".jsonl", ".json")):
        yield from _jsonl_rows(path)
    else:
        raise LayoutError(f"{path}: unknown data format; use .jsonl, .parquet or a dataset folder (save_to_disk)")


def _jsonl_rows(path: str):
    with open(path, "rb") as f:  # decoded line by line, so that a bad byte is reported with its line
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield where, LayoutError(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of "
                                         "the line)", kind="not UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:  # exc.msg may end in "at"
                yield where, LayoutError(f"invalid JSON ({exc.msg}: column {exc.colno})", kind="invalid JSON")
