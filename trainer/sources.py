"""Where training records come from: files, globs, folders and hub ids, read by Hugging Face `datasets`, and the
dataset layouts people have, mapped onto the project's chat format on access.

    train_data: data/train.jsonl                 # JSONL / JSON array (the project's format, or any below)
    train_data: "shards/train-*.parquet"         # parquet or arrow shards, images embedded as bytes
    train_data: data/a.parquet,data/b.parquet    # several files
    train_data: exported/                         # a `save_to_disk` folder, or a folder laid out like a hub dataset
    train_data: org/name                          # a hub id (where a hub is reachable), split by train_split

Formats (`format: auto` detects from the columns and says what it found):
- `messages`: `{"messages": [{"role", "content": str | [parts]}]}`; parts `{"type": "text", "text"}`,
  `{"type": "image", "image": REF}` (or `image_url`), `{"type": "video", "video": REF}`; a part without a
  reference takes the next value of an `images` / `videos` column, in order (the hub's VLM SFT layout, as TRL's
  examples use it).
- `llava` / `sharegpt`: `{"conversations": [{"from": "human"|"gpt"|"system", "value"}], "image" | "images"}`,
  `<image>` / `<video>` markers in the turns (images without markers open the first human turn).
- `qa`: `{"image_path" | "image", "question", "answer"}`.

An image REF is a path (relative to the data file), an http(s) URL, a data URI, raw bytes, or a `datasets`
`Image` value; `Image` columns are read undecoded (bytes), so nothing is decoded before a batch needs it.

JSONL is read by `datasets`' text builder and each line parsed here: the project's records mix string and list
contents (which a columnar JSON reader refuses), and a line that is not JSON must be one reported problem among
the others, with its line number, not an error that hides the rest of the file.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("auto", "messages", "llava", "sharegpt", "qa")
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "bot": "assistant", "system": "system"}
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "text"}
_MARKER = re.compile(r"(<image>|<video>)")


class SourceError(ValueError):
    """A dataset that cannot be opened: one line naming what and how to fix it."""


@dataclass
class Part:
    """One file of a source and the rows it holds (`start` .. `start + rows`)."""

    name: str
    start: int
    rows: int | None  # None while streaming (unknown)


@dataclass
class Rows:
    """The rows of one split of a dataset, raw (as stored), with what is needed to map and name them."""

    dataset: Any  # datasets.Dataset or datasets.IterableDataset
    base_dir: Path  # relative image paths are resolved against it
    origin: str  # what the user named
    files: list[Part] = field(default_factory=list)
    json_lines: bool = False  # rows are {"text": line}: each line one JSON record
    streaming: bool = False
    revision: str | None = None  # a hub dataset's commit, where the hub says it

    def where(self, index: int) -> str:
        """The record's place for messages: file and line/row (1-based), or its number."""
        for part in self.files:
            if part.rows is None or part.start <= index < part.start + part.rows:
                unit = "line" if self.json_lines else "record"
                return f"{part.name}, {unit} {index - part.start + 1}" if len(self.files) > 1 or part.name != self.origin \
                    else f"{unit} {index - part.start + 1}"
        return f"record {index + 1}"

    def raw(self, row: dict) -> dict:
        """A stored row as a record (a JSONL line parsed); ValueError for a line that is not a JSON object."""
        if not self.json_lines:
            return row
        text = row["text"]
        if not text.strip():
            return {}
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ValueError("a record must be a JSON object")
        return record

    def __len__(self) -> int:
        return len(self.dataset)


def _quiet_progress() -> None:
    """datasets' progress bars only on a terminal (tqdm writes them line by line into logs otherwise)."""
    import sys

    from datasets.utils.logging import disable_progress_bar, enable_progress_bar

    (enable_progress_bar if sys.stderr.isatty() else disable_progress_bar)()


def _builder(path: Path) -> tuple[str, bool]:
    """(datasets builder, rows are JSON lines) for one file."""
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise SourceError(f"{path}: unknown data file type '{path.suffix}' (use .jsonl, .json, .parquet or .arrow)")
    if builder == "json":  # a JSON array, or JSON lines under a .json name
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        if not head.startswith(b"["):
            return "text", True
    return builder, builder == "text"


def _files(spec: str) -> list[Path]:
    out: list[Path] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if any(c in item for c in "*?["):
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matched:
                raise SourceError(f"no file matches '{item}'")
            out += matched
        else:
            out.append(Path(item))
    return out


def _undecoded(dataset):
    """`Image` columns (and lists of them) read as {"bytes", "path"}: decoding waits for the batch."""
    from datasets import Image, List, Sequence

    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        if isinstance(feature, Image) and feature.decode:
            dataset = dataset.cast_column(name, Image(decode=False))
        elif isinstance(feature, List | Sequence) and isinstance(feature.feature, Image) and feature.feature.decode:
            dataset = dataset.cast_column(name, List(Image(decode=False)))
    return dataset


def _load_files(paths: list[Path], origin: str, streaming: bool) -> Rows:
    from datasets import concatenate_datasets, load_dataset

    kinds = set()
    parts, datasets_, start = [], [], 0
    for path in paths:
        if not path.is_file():
            raise SourceError(f"dataset file '{path}' does not exist")
        builder, json_lines = _builder(path)
        kinds.add(json_lines)
        try:
            ds = load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
        except Exception as exc:  # datasets wraps pyarrow's errors in its own
            cause = exc.__cause__ or exc
            raise SourceError(f"{path}: cannot be read as {builder} ({type(cause).__name__}: "
                              f"{str(cause).splitlines()[0][:200]})") from None
        ds = _undecoded(ds)
        rows = None if streaming else len(ds)
        parts.append(Part(str(path), start, rows))
        datasets_.append(ds)
        start += rows or 0
    if len(kinds) > 1:
        raise SourceError(f"{origin}: mixes JSON lines with columnar files; give them as separate datasets")
    dataset = datasets_[0] if len(datasets_) == 1 else concatenate_datasets(datasets_)
    base = paths[0].parent
    return Rows(dataset, base, origin, parts, json_lines=kinds.pop(), streaming=streaming)


def open_rows(spec: str, split: str = "train", streaming: bool = False) -> Rows:
    """The rows of `spec` (file, files, glob, `save_to_disk` folder, hub-layout folder or hub id), one split."""
    _quiet_progress()
    if not spec:
        raise SourceError("no dataset given")
    path = Path(spec)
    many = "," in spec or any(c in spec for c in "*?[")
    if not many and path.suffix.lower() in BUILDERS and not path.exists():
        raise SourceError(f"dataset file '{spec}' does not exist (resolved: {path.resolve()})")
    if many or path.is_file():
        return _load_files(_files(spec), spec, streaming)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                          or (path / "state.json").is_file()):
        return _from_disk(path, split, streaming)
    if path.is_dir() or re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return _from_layout(spec, split, streaming)
    raise SourceError(f"dataset '{spec}' was found neither as a local file or folder (resolved: {path.resolve()}) "
                      "nor as a hub id (ORG/NAME)")


def _from_disk(path: Path, split: str, streaming: bool) -> Rows:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise SourceError(f"{path}: no split '{split}' (it has {', '.join(ds)})")
        ds = ds[split]
    ds = _undecoded(ds)
    rows = len(ds)
    if streaming:
        ds = ds.to_iterable_dataset()
    return Rows(ds, path, str(path), [Part(str(path), 0, rows)], streaming=streaming)


def _from_layout(spec: str, split: str, streaming: bool) -> Rows:
    """A folder laid out like a hub dataset (data files by split, found as the hub finds them), or a hub id."""
    from datasets import load_dataset_builder

    try:
        builder = load_dataset_builder(spec)
    except Exception as exc:
        local = Path(spec)
        where = f"the folder {local.resolve()}" if local.is_dir() else \
            f"no local file or folder {local.resolve()}, and the hub id"
        raise SourceError(f"dataset '{spec}': {where} could not be opened ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160]}); point train_data at a local file, glob or folder, "
                          "or make the hub reachable") from None
    files = builder.config.data_files or {}
    if split not in files:
        raise SourceError(f"dataset '{spec}': no split '{split}' (it has {', '.join(files) or 'none'})")
    paths = [Path(str(f)) for f in files[split]]
    if not all(p.is_file() for p in paths):  # remote files: let datasets read them as one split
        ds = _undecoded(builder.as_streaming_dataset(split=split) if streaming else _prepared(builder, split))
        pinned = re.search(r"@([0-9a-f]{40})/", str(files[split][0]))  # hf://datasets/ORG/NAME@COMMIT/...
        return Rows(ds, Path("."), spec, [Part(spec, 0, None if streaming else len(ds))], streaming=streaming,
                    revision=pinned.group(1) if pinned else None)
    rows = _load_files(paths, spec, streaming)
    rows.base_dir = Path(spec) if Path(spec).is_dir() else rows.base_dir
    return rows


def _prepared(builder, split: str):
    builder.download_and_prepare()
    return builder.as_dataset(split=split)


# Formats -> the chat format --------------------------------------------------------------------------------------

def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "llava" if "image" in record and "images" not in record else "sharegpt"
    if {"question", "answer"} <= set(record):
        return "qa"
    raise ValueError(f"unknown record shape (columns: {', '.join(sorted(record)) or 'none'}); expected 'messages', "
                     "'conversations' (LLaVA / ShareGPT) or 'question' + 'answer'")


def image_ref(value: Any, base_dir: Path) -> Any:
    """A stored image or video reference as the collator opens it: a resolved path, a URL or data URI, bytes,
    or a PIL image."""
    if isinstance(value, dict):  # a datasets Image value, or {"url": ...}
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path") or value.get("url")
    if isinstance(value, str):
        if value.startswith(("http://", "https://", "data:")):
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base_dir / path)
    return value  # bytes, a PIL image, or None (reported by validation)


def _part_ref(part: dict) -> Any:
    for key in ("image", "image_url", "video", "path", "url"):
        value = part.get(key)
        if isinstance(value, dict) and "url" in value and value.get("bytes") is None:
            value = value["url"]
        if value is not None:
            return value
    return None


def _queue(record: dict, *keys: str) -> list:
    for key in keys:
        value = record.get(key)
        if value is None:
            continue
        return list(value) if isinstance(value, list | tuple) else [value]
    return []


def _with_markers(text: str, media: dict[str, list], base_dir: Path, problems: list[str], at: str) -> list[dict]:
    parts = []
    for piece in _MARKER.split(text):
        if piece in ("<image>", "<video>"):
            kind = piece[1:-1]
            if not media[kind]:
                problems.append(f"{at}: more {piece} markers than {kind}s")
                continue
            parts.append({"type": kind, kind: image_ref(media[kind].pop(0), base_dir)})
        elif piece.strip():
            parts.append({"type": "text", "text": piece.strip("\n")})
    return parts


def to_chat(record: dict, fmt: str, base_dir: Path) -> tuple[dict, list[str]]:
    """The record in the chat format (content lists of text / image / video parts, references resolved), and the
    problems found mapping it (each 'message N: ...'; the caller prefixes the record's place)."""
    if fmt == "auto":
        fmt = detect_format(record)
    if fmt == "qa":
        return _from_qa(record, base_dir)
    media = {"image": _queue(record, "images", "image"), "video": _queue(record, "videos", "video")}
    problems: list[str] = []
    key, turn = ("conversations", _conversation_turn) if fmt in ("llava", "sharegpt") else ("messages", _message_turn)
    items = record.get(key)
    if not isinstance(items, list) or not items:
        return {"messages": []}, [f"needs a non-empty '{key}' list"]
    messages = []
    for i, item in enumerate(items, 1):
        at = f"message {i}"
        if not isinstance(item, dict):
            problems.append(f"{at}: must be an object")
        elif (message := turn(item, media, base_dir, problems, at)) is not None:
            messages.append(message)
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if key == "conversations" and first_user is not None:  # media without markers open the first human turn
        first_user["content"][:0] = [{"type": k, k: image_ref(v, base_dir)} for k in ("image", "video")
                                     for v in media[k]]
        media = {"image": [], "video": []}
    return {"messages": messages}, problems + _unplaced(media)


def _from_qa(record: dict, base_dir: Path) -> tuple[dict, list[str]]:
    missing = [k for k in ("question", "answer") if not record.get(k)]
    image = record.get("image_path", record.get("image"))
    if image is None:
        missing.insert(0, "image_path")
    if missing:
        return {"messages": []}, [f"missing {', '.join(missing)}"]
    user = [{"type": "image", "image": image_ref(image, base_dir)}, {"type": "text", "text": str(record["question"])}]
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": [{"type": "text", "text": str(record["answer"])}]}]}, []


def _conversation_turn(turn: dict, media: dict, base_dir: Path, problems: list[str], at: str) -> dict | None:
    """A LLaVA / ShareGPT turn (`from`, `value` with markers)."""
    speaker = turn.get("from", turn.get("role"))
    role = ROLE_ALIASES.get(str(speaker).lower()) if speaker is not None else None
    if role is None:
        problems.append(f"{at}: unknown speaker {speaker!r} (use human, gpt or system)")
        return None
    text = turn.get("value", turn.get("content"))
    if not isinstance(text, str):
        problems.append(f"{at}: 'value' must be a string")
        return None
    return {"role": role, "content": _with_markers(text, media, base_dir, problems, at)}


def _message_turn(message: dict, media: dict, base_dir: Path, problems: list[str], at: str) -> dict | None:
    """A chat message: string content (markers placing an images column), or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        parts = _with_markers(content, media, base_dir, problems, at) if _MARKER.search(content) and \
            (media["image"] or media["video"]) else [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text")})
            elif kind in ("image", "image_url", "video", "video_url"):
                kind = "video" if kind.startswith("video") else "image"
                ref = _part_ref(part)
                if ref is None and media[kind]:  # a placeholder takes the next of the images column
                    ref = media[kind].pop(0)
                parts.append({"type": kind, kind: image_ref(ref, base_dir)})
            else:
                problems.append(f"{at}: unknown content part type {kind!r}")
    else:
        problems.append(f"{at}: content must be a string or a non-empty list of parts")
        return None
    return {"role": message.get("role"), "content": parts}


def _unplaced(media: dict[str, list]) -> list[str]:
    return [f"{len(v)} {k}(s) in the record's {k}s column have no place in its messages" for k, v in media.items() if v]
