"""Padding-free packing for Qwen3-VL: several whole samples per row, each with its own multimodal positions and
attention that never crosses into its neighbours.

Written here because the field's tools do not do it for mRoPE models (TRL's padding-free mode refuses them;
LLaMA-Factory's neat_packing breaks on Qwen3-VL). What it relies on is transformers' own machinery:
- positions: each sample's 3-axis mRoPE positions come from the model's own `get_rope_index` (run on that
  sample alone, with its image grids), concatenated; the text positions (the 4th, leading row of Qwen3-VL's
  `position_ids`) restart at 0 for every sample;
- attention: with no attention mask (and no KV cache: the batch says `use_cache: False`), transformers finds
  the packed samples from those restarting text positions and restricts attention to each (a block-diagonal causal mask for SDPA / eager / flex; variable-
  length kernels for flash-attention);
- loss: unchanged. A row's labels are its samples' labels (assistant tokens only); the label shift across a
  sample boundary lands on the next sample's first token, which is never an assistant token, so the
  per-token mean over the batch is the unpacked one.

Rows are filled up to `packed_length` tokens with whole samples, first-fit decreasing over shuffled windows;
a row's tail is padding, a sample of its own that attends to nothing else and carries no labels, so every row
has one shape (what CUDA graphs need). A stream (`streaming: true`) is packed the same way, one window of its
records at a time as they arrive (`PackedStream`), without knowing the stream's length.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import torch.utils.data

from trainer.data import IGNORE_INDEX, ChatCollator, ChatRecords


class RopeIndex:
    """The model's `get_rope_index` without the model (it reads only the config): picklable, for the
    collator in dataloader workers."""

    def __init__(self, model_class: type, config: Any):
        self.model_class, self.config = model_class, config

    @classmethod
    def of(cls, model) -> RopeIndex:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft -> transformers
        inner = getattr(inner, "model", inner)  # Qwen3VLForConditionalGeneration -> Qwen3VLModel
        return cls(type(inner), inner.config)

    def get_vision_position_ids(self, *args, **kwargs):
        return self.model_class.get_vision_position_ids(self, *args, **kwargs)

    def __call__(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None):
        """(3, 1, L) positions of one sample (input_ids of shape (1, L))."""
        return self.model_class.get_rope_index(self, input_ids, mm_token_type_ids=mm_token_type_ids,
                                               image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw)[0]


MAX_SAMPLES_PER_ROW = 64  # what the varlen attention's fixed-size boundaries hold (trainer/attention.py)


def pack(lengths: dict[int, int], packed_length: int, seed: int, window: int = 1000,
         max_samples: int = MAX_SAMPLES_PER_ROW) -> list[list[int]]:
    """Rows of record indices, each summing to at most `packed_length` tokens and holding at most `max_samples`
    records: the records shuffled (seeded), then first-fit decreasing within each window of `window` records. A
    record longer than a row is refused."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    for start in range(0, len(order), window):
        bins: list[tuple[int, list[int]]] = []  # (room left, indices)
        for index in sorted(order[start:start + window], key=lambda i: -lengths[i]):
            if lengths[index] > packed_length:
                raise ValueError(f"a record of {lengths[index]} tokens does not fit a packed row of {packed_length}")
            for b, (room, members) in enumerate(bins):
                if lengths[index] <= room and len(members) < max_samples:
                    bins[b] = (room - lengths[index], members + [index])
                    break
            else:
                bins.append((packed_length - lengths[index], [index]))
        rows += [members for _, members in bins]
    random.Random(seed + 1).shuffle(rows)  # long rows first in every window otherwise
    return rows


class PackedRecords:
    """A map-style dataset whose items are packed rows (lists of chats)."""

    def __init__(self, records: ChatRecords, rows: list[list[int]]):
        self.records, self.rows = records, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.records[j] for j in self.rows[i]]


class PackedStream(torch.utils.data.IterableDataset):
    """Packed rows (lists of chats) from a stream of chats: `window` records at a time, each counted as the
    collator will tokenize it, packed as `pack` packs a window. The rows depend only on the stream's order (a
    seeded shuffle for training streams), so a resumed run that skips the batches it trained on sees the same
    rows after them. A record longer than `longest` (default: a row) is dropped (`drop`, counted in `dropped`)
    or refused."""

    def __init__(self, chats: Iterable[dict], count: Callable[[dict], int], packed_length: int, seed: int,
                 window: int = 1000, drop: bool = True, longest: int | None = None):
        self.chats, self.count, self.packed_length = chats, count, packed_length
        self.seed, self.window, self.drop = seed, window, drop
        self.longest = min(longest or packed_length, packed_length)
        self.dropped = 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer's call each epoch, for the stream's shuffle
        if hasattr(self.chats, "set_epoch"):
            self.chats.set_epoch(epoch)

    def __iter__(self):
        # DataLoader workers each read the stream and keep every n-th row: the same rows in the same order
        # as one process (the loader takes batches from its workers in turn).
        worker = torch.utils.data.get_worker_info()
        workers, me = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        for n, row in enumerate(self._rows()):
            if n % workers == me:
                yield row

    def _rows(self):
        window: list[tuple[dict, int]] = []
        for number, chat in enumerate(self.chats):
            tokens = self.count(chat)
            if tokens > self.longest:
                if not self.drop:
                    raise ValueError(f"streamed record {number} has {tokens} tokens, over the {self.longest} a "
                                     "record may have (packed_length, max_length; truncation: drop leaves such "
                                     "records out)")
                self.dropped += 1
                continue
            window.append((chat, tokens))
            if len(window) == self.window:
                yield from self._packed(window)
                window = []
        if window:
            yield from self._packed(window)

    def _packed(self, window: list[tuple[dict, int]]):
        rows = pack({i: tokens for i, (_, tokens) in enumerate(window)}, self.packed_length, self.seed,
                    window=len(window))
        for row in rows:
            yield [window[i][0] for i in row]


VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def join_row(samples: list[dict], packed_length: int, pad_id: int, rope_index: RopeIndex) -> dict:
    """One packed row from tokenized samples (`input_ids`, `labels`, `mm_token_type_ids` of shape (L,), and
    their vision tensors): the samples' tokens one after the other, each sample's own positions, a tail of
    padding that is a sample of its own with no labels."""
    import torch

    parts: dict[str, list] = {"input_ids": [], "labels": [], "mm_token_type_ids": [], "text": [], "mrope": []}
    vision: dict[str, list] = {}
    for one in samples:
        ids, types = one["input_ids"], one["mm_token_type_ids"]
        parts["input_ids"].append(ids)
        parts["labels"].append(one["labels"])
        parts["mm_token_type_ids"].append(types)
        parts["text"].append(torch.arange(ids.shape[0]))
        parts["mrope"].append(rope_index(ids[None], types[None], one.get("image_grid_thw"),
                                         one.get("video_grid_thw"))[:, 0])
        for key in VISION_KEYS:
            if key in one:
                vision.setdefault(key, []).append(one[key])
    used = sum(len(x) for x in parts["input_ids"])
    if used > packed_length:
        raise ValueError(f"a packed row holds {used} tokens, over packed_length {packed_length}")
    if pad := packed_length - used:
        parts["input_ids"].append(torch.full((pad,), pad_id, dtype=torch.long))
        parts["labels"].append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
        parts["mm_token_type_ids"].append(torch.zeros(pad, dtype=parts["mm_token_type_ids"][0].dtype))
        parts["text"].append(torch.arange(pad))
        parts["mrope"].append(torch.arange(pad).view(1, -1).expand(3, -1))
    row = {k: torch.cat(v, dim=-1) for k, v in parts.items()}
    row.update({k: torch.cat(v, dim=0) for k, v in vision.items()})
    return row


def stack_rows(rows: list[dict]) -> dict:
    """Packed rows as one batch: (B, L) tokens and labels, (4, B, L) positions (text first), vision in order."""
    import torch

    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels", "mm_token_type_ids")}
    text = torch.stack([r["text"] for r in rows])
    mrope = torch.stack([r["mrope"] for r in rows], dim=1)
    batch["position_ids"] = torch.cat([text[None], mrope], dim=0)
    for key in VISION_KEYS:
        if any(key in r for r in rows):
            batch[key] = torch.cat([r[key] for r in rows if key in r], dim=0)
    # transformers looks for packed samples only without a KV cache (a training forward needs none).
    batch["use_cache"] = False
    return batch


class PackingCollator:
    """Packed rows of chats -> one batch (see `stack_rows`); no attention mask (see the module docstring)."""

    def __init__(self, processor: Any, rope_index: RopeIndex, packed_length: int, **collator_kwargs):
        collator_kwargs.pop("pad_to_multiple_of", None)  # rows have one length already
        self.samples = ChatCollator(processor, **collator_kwargs)  # one sample at a time: its tokens and labels
        self.rope_index, self.packed_length = rope_index, packed_length
        self.pad_id = self.samples.pad_id

    def _tokenized(self, chat: dict) -> dict:
        one = self.samples([chat])
        return {k: (v[0] if k in ("input_ids", "labels", "mm_token_type_ids") else v) for k, v in one.items()
                if k in ("input_ids", "labels", "mm_token_type_ids", *VISION_KEYS)}

    def __call__(self, packs: list[list[dict]]) -> dict:
        return stack_rows([join_row([self._tokenized(c) for c in chats], self.packed_length, self.pad_id,
                                    self.rope_index) for chats in packs])
