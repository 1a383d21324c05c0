"""Datasets of image+text chats: loading, validation with record numbers, conversion, collation, masking.

Format (JSON array or JSONL; image paths relative to the dataset file, or http(s) URLs):

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/1.png"},
                                               {"type": "text", "text": "What is shown?"}]},
                  {"role": "assistant", "content": "A red circle."}]}

`vlora-train convert` turns the simple `{"image_path", "question", "answer"}` format into this one.
Labels are -100 everywhere except the assistant turns' tokens and their end-of-turn token.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

ROLES = {"system", "user", "assistant"}
IGNORE_INDEX = -100


class DataError(ValueError):
    """Invalid dataset; `problems` lists every problem found, each naming its record."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{path}: {len(problems)} problem(s):\n{shown}{more}")


def read_records(path: str | Path) -> list[dict]:
    """Records from a JSON array or JSONL file (each JSONL line is one record)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, [f"dataset file '{path}' does not exist"])
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(path, [f"not valid JSON: {exc}"]) from None
        return records
    records, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            problems.append(f"line {n}: not valid JSON ({exc.msg})")
    if problems:
        raise DataError(path, problems)
    return records


def _image_ref(part: dict) -> str | None:
    ref = part.get("image") or part.get("image_url") or part.get("path")
    if isinstance(ref, dict):
        ref = ref.get("url")
    return ref


def resolve_image(ref: str, base_dir: Path) -> str:
    if ref.startswith(("http://", "https://", "data:")):
        return ref
    path = Path(ref)
    return str(path if path.is_absolute() else base_dir / path)


def open_image(ref: str) -> Image.Image:
    if ref.startswith(("http://", "https://")):
        import io

        import httpx

        return Image.open(io.BytesIO(httpx.get(ref, timeout=30, follow_redirects=True).content)).convert("RGB")
    with Image.open(ref) as im:
        return im.convert("RGB")


def validate_records(records: list, base_dir: Path, max_pixels: int | None = None, check_images: bool = True) -> list[str]:
    """Every problem of every record, each as 'record N: ...' (N counts from 1)."""
    problems: list[str] = []
    if not isinstance(records, list):
        return ["the dataset must be a JSON array or JSONL of records"]
    if not records:
        return ["the dataset has no records"]
    for n, record in enumerate(records, 1):
        where = f"record {n}"
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            problems.append(f"{where}: needs a non-empty 'messages' list")
            continue
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            problems.append(f"{where}: has no assistant turn (nothing to learn)")
        for i, message in enumerate(messages, 1):
            at = f"{where}, message {i}"
            if not isinstance(message, dict):
                problems.append(f"{at}: must be an object")
                continue
            role = message.get("role")
            if role not in ROLES:
                problems.append(f"{at}: unknown role {role!r} (use system, user or assistant)")
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list) or not parts:
                problems.append(f"{at}: content must be a string or a non-empty list of parts")
                continue
            for part in parts:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str) or not part["text"].strip():
                        problems.append(f"{at}: empty text")
                elif kind in ("image", "image_url"):
                    if role != "user":
                        problems.append(f"{at}: images are only allowed in user turns")
                    ref = _image_ref(part)
                    if not isinstance(ref, str) or not ref:
                        problems.append(f"{at}: image part without a path or URL")
                    elif check_images and not ref.startswith(("http://", "https://")):
                        problems.extend(f"{at}: {p}" for p in _check_image(resolve_image(ref, base_dir), max_pixels))
                else:
                    problems.append(f"{at}: unknown content part type {kind!r}")
    return problems


def _check_image(path: str, max_pixels: int | None) -> list[str]:
    try:
        with Image.open(path) as im:
            w, h = im.size
            im.verify()
    except FileNotFoundError:
        return [f"image '{path}' is missing"]
    except Exception as exc:
        return [f"image '{path}' is unreadable ({type(exc).__name__})"]
    if max_pixels and w * h > max_pixels * 64:
        # The processor resizes down to max_pixels; far larger files only waste I/O and memory.
        return [f"image '{path}' is {w}x{h}, over the pixel limit ({max_pixels * 64} = 64 x max_pixels)"]
    return []


def load_dataset_file(path: str | Path, max_pixels: int | None = None) -> list[dict]:
    """Read, validate (refusing with every problem listed) and normalise a dataset file."""
    path = Path(path)
    records = read_records(path)
    problems = validate_records(records, path.parent, max_pixels)
    if problems:
        raise DataError(path, problems)
    return [normalise(r, path.parent) for r in records]


def normalise(record: dict, base_dir: Path) -> dict:
    """Messages with list content everywhere and image parts as {"type": "image", "image": resolved}."""
    messages = []
    for message in record["messages"]:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        out = []
        for part in parts:
            if part["type"] == "text":
                out.append({"type": "text", "text": part["text"]})
            else:
                out.append({"type": "image", "image": resolve_image(_image_ref(part), base_dir)})
        messages.append({"role": message["role"], "content": out})
    return {"messages": messages}


def convert_simple(records: list[dict]) -> list[dict]:
    """`{"image_path", "question", "answer"}` -> the chat format."""
    out, problems = [], []
    for n, r in enumerate(records, 1):
        missing = [k for k in ("image_path", "question", "answer") if not r.get(k)]
        if missing:
            problems.append(f"record {n}: missing {', '.join(missing)}")
            continue
        out.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": r["image_path"]},
                                         {"type": "text", "text": r["question"]}]},
            {"role": "assistant", "content": r["answer"]},
        ]})
    if problems:
        raise DataError("input", problems)
    return out


def split(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, int(len(shuffled) * fraction)) if fraction > 0 else 0
    return shuffled[n_val:], shuffled[:n_val]


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
                 padding_side: str = "right", pad_to_multiple_of: int | None = None):
        self.processor = processor
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

        texts, images = [], []
        for record in records:
            texts.append(self.processor.apply_chat_template(record["messages"], tokenize=False,
                                                            add_generation_prompt=False))
            images.extend(self.augment(open_image(ref)) for ref in record_images(record))
        self.tokenizer.padding_side = self.padding_side
        batch = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True,
                               pad_to_multiple_of=self.pad_to_multiple_of)
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
