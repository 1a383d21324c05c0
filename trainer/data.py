"""Training records: validation with each record's place, lazy datasets for the Trainer, collation, masking.

Records come from `trainer.sources` (files, shards, folders, hub ids, in the project's chat format or the
layouts it maps: see there) as chats:

    {"messages": [{"role": "user", "content": [{"type": "image", "image": REF}, {"type": "text", "text": "?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}]}

REF is a resolved path, an http(s) URL or data URI (fetched and decoded by `artifacts.media`, the service's
implementation: the same address policy and caps), bytes or a PIL image; images are opened by the collator,
per batch (in the dataloader workers), never all at once. Labels are -100 everywhere except the assistant
turns' tokens and their end-of-turn token.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from artifacts.media import MediaError, MediaLimits, decode_data_uri, decode_image, load_bytes_sync
from trainer.sources import Rows, SourceError, detect_format, open_rows, to_chat

ROLES = {"system", "user", "assistant"}
IGNORE_INDEX = -100
# The service's defaults (--max-image-bytes, --max-image-pixels, --image-fetch-timeout-s, redirects).
MEDIA_LIMITS = MediaLimits(max_image_bytes=20 * 1024 * 1024, max_image_pixels=4096 * 4096)


class DataError(ValueError):
    """Invalid dataset; `problems` lists every problem found, each naming its record."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{path}: {len(problems)} problem(s):\n{shown}{more}")


def _encoded(ref: Any, limits: MediaLimits, kind: str = "image") -> bytes | None:
    """The encoded bytes of a REF that is not a local file: raw bytes, a data URI, or an http(s) URL (fetched
    under the address policy); None for a path (or a PIL image)."""
    if isinstance(ref, bytes | bytearray):
        return bytes(ref)
    if not isinstance(ref, str):
        return None
    if ref.startswith("data:"):
        return decode_data_uri(ref, limits, kind)
    if ref.startswith(("http://", "https://")):
        return load_bytes_sync(ref, limits, kind)
    return None


def _is_url(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith(("http://", "https://"))


def open_image(ref: Any, limits: MediaLimits = MEDIA_LIMITS) -> Image.Image:
    """An RGB image from any REF (see the module docstring)."""
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if (data := _encoded(ref, limits)) is not None:
        return decode_image(data, limits)
    with Image.open(ref) as im:
        return im.convert("RGB")


def open_video(ref: Any, limits: MediaLimits = MEDIA_LIMITS):
    """(frames, metadata) of a video REF, every frame decoded by transformers' video loader (OpenCV, which
    vLLM's loader uses too); URLs and data URIs are fetched under the address policy first."""
    import tempfile

    from transformers.video_utils import load_video

    if (data := _encoded(ref, limits, "video")) is None:
        return load_video(ref, backend="opencv")
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        return load_video(f.name, backend="opencv")


def _header(ref: Any):
    """The image opened lazily (PIL reads the header only) from a REF that is not a URL."""
    data = _encoded(ref, MEDIA_LIMITS)
    return Image.open(io.BytesIO(data) if data is not None else ref)


def image_size(ref: Any) -> tuple[int, int] | None:
    """(width, height) from the header alone; None for a URL (not fetched to count) or what does not open."""
    if isinstance(ref, Image.Image):
        return ref.size
    if _is_url(ref):
        return None
    try:
        with _header(ref) as im:
            return im.size
    except (OSError, MediaError, ValueError):
        return None


def _check_image(ref: Any, max_pixels: int | None) -> list[str]:
    name = f"image '{ref}'" if isinstance(ref, str) and not ref.startswith("data:") else "image"
    if _is_url(ref):
        return []  # fetched (under the address policy) when its batch is built
    try:
        if isinstance(ref, Image.Image):
            w, h = ref.size
        else:
            with _header(ref) as im:
                w, h = im.size
                im.verify()
    except FileNotFoundError:
        return [f"{name} is missing"]
    except MediaError as exc:
        return [f"{name}: {exc.message}"]
    except Exception as exc:
        return [f"{name} is unreadable ({type(exc).__name__})"]
    if max_pixels and w * h > max_pixels * 64:
        # The processor resizes down to max_pixels; far larger files only waste I/O and memory.
        return [f"{name} is {w}x{h}, over the pixel limit ({max_pixels * 64} = 64 x max_pixels)"]
    return []


def check_chat(chat: dict, max_pixels: int | None = None, check_images: bool = True) -> list[str]:
    """Every problem of one chat record (as `trainer.sources.to_chat` makes them), each 'message N: ...'."""
    problems: list[str] = []
    messages = chat.get("messages") or []
    if not messages:
        return ["needs a non-empty 'messages' list"]
    if not any(m.get("role") == "assistant" for m in messages):
        problems.append("has no assistant turn (nothing to learn)")
    for i, message in enumerate(messages, 1):
        at = f"message {i}"
        role = message.get("role")
        if role not in ROLES:
            problems.append(f"{at}: unknown role {role!r} (use system, user or assistant)")
        if not message["content"]:
            problems.append(f"{at}: content must be a string or a non-empty list of parts")
        for part in message["content"]:
            kind = part["type"]
            if kind == "text":
                if not isinstance(part.get("text"), str) or not part["text"].strip():
                    problems.append(f"{at}: empty text")
                continue
            if role != "user":
                problems.append(f"{at}: {kind}s are only allowed in user turns")
            ref = part.get(kind)
            if ref is None or ref == "":
                problems.append(f"{at}: {kind} part without a path, URL or bytes")
            elif kind == "image" and check_images:
                problems.extend(f"{at}: {p}" for p in _check_image(ref, max_pixels))
            elif kind == "video" and isinstance(ref, str) and not ref.startswith(("http", "data:")) \
                    and not Path(ref).is_file():
                problems.append(f"{at}: video '{ref}' is missing")
    return problems


def validate_records(records: list, base_dir: Path, max_pixels: int | None = None, check_images: bool = True,
                     fmt: str = "auto") -> list[str]:
    """Every problem of every in-memory record, each as 'record N: ...' (N counts from 1)."""
    if not isinstance(records, list) or not records:
        return ["the dataset has no records"]
    problems: list[str] = []
    for n, record in enumerate(records, 1):
        problems += [f"record {n}: {p}" for p in _record_problems(record, fmt, base_dir, max_pixels, check_images)[1]]
    return problems


def _record_problems(record: Any, fmt: str, base_dir: Path, max_pixels: int | None,
                     check_images: bool) -> tuple[dict | None, list[str]]:
    if not isinstance(record, dict):
        return None, ["must be a JSON object"]
    try:
        chat, problems = to_chat(record, fmt, base_dir)
    except ValueError as exc:
        return None, [str(exc)]
    problems += check_chat(chat, max_pixels, check_images) if chat["messages"] or not problems else []
    return chat, problems


@dataclass
class Scan:
    """What a pass over a dataset found: problems with their places, and the figures `validate` prints."""

    origin: str
    format: str = "auto"
    records: int = 0
    problems: list[str] = field(default_factory=list)
    images: Counter = field(default_factory=Counter)  # images per record -> records
    videos: Counter = field(default_factory=Counter)
    indices: list[int] = field(default_factory=list)  # row indices of the records (blank lines left out)
    sizes: dict[int, int] = field(default_factory=dict)  # row index -> its tokens, images counted (with a processor)
    too_long: list[int] = field(default_factory=list)  # row indices over max_length
    duplicates: int = 0
    fingerprint: str = ""  # sha256 over the stored records, in order
    limited: bool = False  # stopped at `limit`

    @property
    def lengths(self) -> list[int]:
        """Tokens per record, in order (with a processor)."""
        return list(self.sizes.values())

    def summary(self, max_length: int | None = None) -> str:
        def dist(counter: Counter) -> str:
            return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())) or "none"

        lines = [f"{self.origin}: {self.records} records{' (a sample: --limit)' if self.limited else ''}, "
                 f"format {self.format}", f"  images per record  {dist(self.images)}",
                 f"  videos per record  {dist(self.videos)}"]
        if self.lengths:
            import statistics

            ordered = sorted(self.lengths)
            pct = {p: ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] for p in (50, 90, 99)}
            lines.append(f"  tokens per record  p50 {pct[50]}  p90 {pct[90]}  p99 {pct[99]}  max {ordered[-1]}  "
                         f"mean {statistics.fmean(ordered):.0f} (images counted)")
            if max_length:
                lines.append(f"  over max_length {max_length}: {len(self.too_long)}")
        lines.append(f"  duplicate records  {self.duplicates}")
        lines.append(f"  problems           {len(self.problems)}")
        return "\n".join(lines)


class TokenCounter:
    """Tokens of a chat as the collator will make them: the rendered text, each image's placeholder expanded."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.image_processor = processor.image_processor
        self.merge = getattr(self.image_processor, "merge_size", 1) or 1

    def __call__(self, chat: dict) -> int:
        text = self.processor.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=False)
        tokens = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        for message in chat["messages"]:
            for part in message["content"]:
                if part["type"] == "image" and (size := image_size(part["image"])) is not None:
                    tokens += self.image_processor.get_number_of_image_patches(size[1], size[0], {}) // self.merge ** 2 - 1
        return tokens


def _digest(value: Any, h) -> None:
    """Feed a stored record into a hash (bytes as they are, the rest as sorted JSON)."""
    if isinstance(value, bytes | bytearray):
        h.update(bytes(value))
    elif isinstance(value, dict):
        for key in sorted(value):
            h.update(key.encode())
            _digest(value[key], h)
    elif isinstance(value, list | tuple):
        for item in value:
            _digest(item, h)
    else:
        h.update(json.dumps(value, default=str).encode())


def scan(rows: Rows, fmt: str = "auto", processor: Any = None, max_length: int | None = None,
         max_pixels: int | None = None, limit: int | None = None, check_images: bool = True,
         progress: bool = False) -> Scan:
    """One pass over the rows: every problem (named by file and record), the figures of `Scan`, and the
    indices of records over `max_length` (counted with the processor, images included)."""
    from tqdm.auto import tqdm

    result = Scan(origin=rows.origin, format=fmt)
    counter = TokenCounter(processor) if processor is not None else None
    seen: set[bytes] = set()
    whole = hashlib.sha256()
    total = None if rows.streaming else len(rows)
    if limit:
        total = min(total, limit) if total is not None else limit
    bar = tqdm(total=total, desc="checking records", unit="rec", disable=not progress or None, leave=False)
    try:
        for index, row in enumerate(rows.dataset):
            if limit and index >= limit:
                result.limited = True
                break
            bar.update()
            result.records += 1
            where = rows.where(index)
            try:
                record = rows.raw(row)
            except ValueError as exc:
                result.problems.append(f"{where}: {exc}")
                continue
            if not record:
                result.records -= 1  # a blank line
                continue
            result.indices.append(index)
            h = hashlib.sha256()
            _digest(record, h)
            digest = h.digest()
            whole.update(digest)
            if digest in seen:
                result.duplicates += 1
            seen.add(digest)
            if result.format == "auto":
                try:
                    result.format = detect_format(record)
                except ValueError as exc:
                    result.problems.append(f"{where}: {exc}")
                    continue
            chat, problems = _record_problems(record, result.format, rows.base_dir, max_pixels, check_images)
            result.problems += [f"{where}: {p}" for p in problems]
            if chat is None or problems:
                continue
            result.images[sum(p["type"] == "image" for m in chat["messages"] for p in m["content"])] += 1
            result.videos[sum(p["type"] == "video" for m in chat["messages"] for p in m["content"])] += 1
            if counter is not None:
                length = result.sizes[index] = counter(chat)
                if max_length and length > max_length:
                    result.too_long.append(index)
    finally:
        bar.close()
    if result.records == 0:
        result.problems.append(f"{rows.origin}: the dataset has no records")
    result.fingerprint = whole.hexdigest()
    return result


class ChatRecords:
    """A map-style dataset of chats over stored rows, mapped when a record is asked for (lazily, in the
    dataloader workers); `indices` picks and orders the rows (a split, overlong records dropped)."""

    def __init__(self, rows: Rows, fmt: str, indices: list[int] | None = None):
        self.rows, self.fmt = rows, fmt
        self.indices = indices if indices is not None else list(range(len(rows)))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return to_chat(self.rows.raw(self.rows.dataset[self.indices[i]]), self.fmt, self.rows.base_dir)[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def streamed_chats(rows: Rows, fmt: str, seed: int, buffer_size: int = 1000, skip: int = 0, take: int | None = None,
                   max_length: int | None = None, processor: Any = None):
    """A `datasets.IterableDataset` of chats for training from a stream: blank lines left out, the first `skip`
    records left out (held out for evaluation), shuffled in a buffer (deterministic from the seed, so that a
    resumed run sees the same order and skips exactly what it has trained on), overlong records dropped."""
    stream = rows.dataset
    if skip:
        stream = stream.skip(skip)
    if take is not None:
        stream = stream.take(take)
    base, raw = rows.base_dir, rows.raw
    columns = list(getattr(stream, "column_names", None) or [])
    stream = stream.map(lambda row: to_chat(raw(row), fmt, base)[0], remove_columns=columns or None)
    stream = stream.filter(lambda chat: bool(chat["messages"]))  # a blank line maps to no messages
    if max_length and processor is not None:
        counter = TokenCounter(processor)
        stream = stream.filter(lambda chat: counter(chat) <= max_length)
    return stream.shuffle(seed=seed, buffer_size=buffer_size) if buffer_size > 1 else stream


def load_dataset_file(spec: str | Path, max_pixels: int | None = None, fmt: str = "auto",
                      split: str = "train") -> list[dict]:
    """All records of a (small) dataset as chats, refusing with every problem listed (eval, merge, tests)."""
    rows = open_source(str(spec), split)
    found = scan(rows, fmt, max_pixels=max_pixels)
    if found.problems:
        raise DataError(spec, found.problems)
    return list(ChatRecords(rows, found.format, found.indices))


def open_source(spec: str, split: str = "train", streaming: bool = False) -> Rows:
    """`trainer.sources.open_rows`, a source that cannot be opened being a DataError like the others."""
    try:
        return open_rows(spec, split, streaming)
    except SourceError as exc:
        raise DataError(spec, [str(exc)]) from None


def message_images(messages: list[dict]) -> list[str]:
    """Image references of normalised messages, in prompt order."""
    return [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]


def record_images(record: dict) -> list[str]:
    return message_images(record["messages"])


def prompt_and_answer(record: dict) -> tuple[list[dict], str]:
    """The conversation up to its last assistant turn, and that turn's text (for evaluation)."""
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    answer = "".join(p["text"] for p in messages[last]["content"] if p["type"] == "text")
    return messages[:last], answer


@dataclass
class Augment:
    """Photometric/geometric augmentation; flips stay off (they break text and direction tasks)."""

    enabled: bool = False
    crop_scale: tuple[float, float] = (0.8, 1.0)
    color_jitter: float = 0.1
    flip: bool = False
    seed: int = 0
    _rng: random.Random = field(default=None, repr=False)

    def __call__(self, image: Image.Image) -> Image.Image:
        if not self.enabled:
            return image
        from PIL import ImageEnhance

        self._rng = self._rng or random.Random(self.seed)
        rng = self._rng
        w, h = image.size
        scale = rng.uniform(*self.crop_scale)
        cw, ch = max(1, int(w * scale ** 0.5)), max(1, int(h * scale ** 0.5))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        image = image.crop((x, y, x + cw, y + ch)).resize((w, h))
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhancer(image).enhance(1 + rng.uniform(-self.color_jitter, self.color_jitter))
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return image


def assistant_spans(input_ids: list[int], header: list[int], end_id: int) -> list[tuple[int, int]]:
    """[start, end) spans of assistant content: after each `header` up to and including `end_id`."""
    spans, i, n = [], 0, len(header)
    while i <= len(input_ids) - n:
        if input_ids[i:i + n] == header:
            start = j = i + n
            while j < len(input_ids) and input_ids[j] != end_id:
                j += 1
            spans.append((start, min(j + 1, len(input_ids))))
            i = j + 1
        else:
            i += 1
    return spans


class ChatCollator:
    """Renders chats with the model's template, runs the processor, and masks labels to assistant turns."""

    def __init__(self, processor: Any, max_length: int | None = None, augment: Augment | None = None,
                 padding_side: str = "right", pad_to_multiple_of: int | None = None, video_fps: float = 2.0,
                 video_max_frames: int = 32):
        self.processor = processor
        self.video_fps, self.video_max_frames = video_fps, video_max_frames
        self.pad_to_multiple_of = pad_to_multiple_of
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.augment = augment or Augment()
        self.padding_side = padding_side
        self.header = self.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id

    def __call__(self, records: list[dict]) -> dict:
        import torch

        texts, images, videos = [], [], []
        for record in records:
            texts.append(self.processor.apply_chat_template(record["messages"], tokenize=False,
                                                            add_generation_prompt=False))
            images.extend(self.augment(open_image(ref)) for ref in record_images(record))
            videos.extend(open_video(p["video"]) for m in record["messages"] for p in m["content"]
                          if p["type"] == "video")
        self.tokenizer.padding_side = self.padding_side
        video_kwargs = {}
        if videos:  # the model's video processor samples the frames (at most video_fps a second)
            video_kwargs = {"videos": [v for v, _ in videos], "video_metadata": [m for _, m in videos],
                            "do_sample_frames": True, "fps": self.video_fps, "max_frames": self.video_max_frames}
        batch = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True,
                               pad_to_multiple_of=self.pad_to_multiple_of, **video_kwargs)
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for row, ids in enumerate(batch["input_ids"].tolist()):
            for start, end in assistant_spans(ids, self.header, self.end_id):
                labels[row, start:end] = batch["input_ids"][row, start:end]
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
        if self.max_length and batch["input_ids"].shape[1] > self.max_length:
            raise ValueError(f"a batch is {batch['input_ids'].shape[1]} tokens long, over max_length "
                             f"{self.max_length}; raise max_length or lower max_pixels")
        return dict(batch)
