"""`manifest.json`, written by the trainer beside `adapter_config.json` and read by the service.

It records the base model and a fingerprint of its config and weights, rank/alpha, the adapted modules
split into language / vision / merger (and whether vLLM would ignore some), processor pixel limits, the
chat-template hash, the training config, eval metrics, and golden samples (image file + hash, prompt,
expected greedy output) that the service replays at load time. `Manifest` is the one typed reading of it:
the trainer builds one and writes it, the service reads it once per adapter load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST = "manifest.json"
PROVENANCE = "provenance.json"  # beside a derived model's weights: what it was made from (trainer.quantize, merge)
FORMAT = 1
SAMPLE_BYTES = 1 << 20
DEFAULT_GOLDEN_MAX_TOKENS = 32


class ManifestError(ValueError):
    """A manifest.json that exists but cannot be read or does not have the manifest's shape."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")  # written by newer or older trainers: keep what we do not know


class BaseFingerprint(_Part):
    model: str | None = None
    config_sha256: str | None = None
    weights_sha256: str | None = None
    # A derived model (its provenance.json): what it was made from, and how ("quantize", "merge").
    derived_from: BaseFingerprint | None = None
    transform: str | None = None
    scheme: str | None = None

    def _differs(self, other: BaseFingerprint) -> str | None:
        for key in ("config_sha256", "weights_sha256"):
            theirs, ours = getattr(self, key), getattr(other, key)
            if theirs and ours and theirs != ours:
                return key
        return None

    def lineage(self) -> list[BaseFingerprint]:
        """This model and the models it is a quantization of, nearest first (a merge starts a new model:
        an adapter of B is not an adapter of B merged with another one)."""
        chain, node = [self], self
        while node.transform == "quantize" and node.derived_from is not None and len(chain) < 16:
            node = node.derived_from
            chain.append(node)
        return chain

    def describe(self) -> str:
        """'M (weights ab12..), a w8a8 quantization of B (weights cd34..)' along the chain."""
        chain = self.lineage()
        words = [f"{chain[0].model or 'a model'} (weights {str(chain[0].weights_sha256)[:12]})"]
        for made, source in zip(chain[:-1], chain[1:], strict=True):
            words.append(f"a {made.scheme or 'quantized'} quantization of {source.model or 'a model'} "
                         f"(weights {str(source.weights_sha256)[:12]})")
        return ", ".join(words)

    def mismatch(self, served: BaseFingerprint | None) -> str | None:
        """Why an adapter trained on this base must not be served on `served` (None: compatible or unknown).

        Compatible: `served` is this base, or a quantization of it (following its provenance chain)."""
        if served is None:
            return None
        chain = served.lineage()
        if any(self._differs(node) is None for node in chain):
            return None
        key = self._differs(served)
        if len(chain) == 1:
            return (f"it was trained on another base model ({key.split('_')[0]} fingerprint "
                    f"{getattr(self, key)[:12]} != served {getattr(served, key)[:12]})")
        return (f"it was trained on {self.model or 'another base model'} (weights {str(self.weights_sha256)[:12]}), "
                f"and the served model is {served.describe()}: not a quantization of the adapter's base")


class LoraSettings(_Part):
    r: int | None = None
    alpha: int | float | None = None
    rslora: bool = False
    dropout: float = 0.0
    quantization: str | None = None


class Serving(_Part):
    vllm_applies_all: bool = True
    notes: list[str] = Field(default_factory=list)


class GoldenImage(_Part):
    file: str
    sha256: str


class GoldenSample(_Part):
    messages: list[dict[str, Any]]  # chat messages; image parts are {"type": "image"}, in `images` order
    images: list[GoldenImage] = Field(default_factory=list)
    expected: str


class Manifest(_Part):
    format: int = FORMAT
    base: BaseFingerprint = Field(default_factory=BaseFingerprint)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    targets: dict[str, list[str]] = Field(default_factory=dict)
    serving: Serving = Field(default_factory=Serving)
    processor: dict[str, Any] = Field(default_factory=dict)
    chat_template_sha256: str | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)
    # What it was trained on: source (files or hub id), split, format detected, record counts, content
    # fingerprint (sha256 over the stored records), records dropped as overlong.
    dataset: dict[str, Any] = Field(default_factory=dict)
    golden_samples: list[GoldenSample] = Field(default_factory=list)

    @property
    def golden_max_tokens(self) -> int:
        """Tokens generated per golden sample: what the trainer's eval generated."""
        return int(self.training.get("eval_max_new_tokens") or DEFAULT_GOLDEN_MAX_TOKENS)

    @classmethod
    def read(cls, adapter_dir: str | Path) -> Manifest | None:
        """The manifest of an adapter folder; None when it has none, ManifestError when it is unreadable."""
        path = Path(adapter_dir) / MANIFEST
        if not path.is_file():
            return None
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:  # json and pydantic errors are ValueErrors
            detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            raise ManifestError(f"{MANIFEST} is unreadable: {detail}") from None

    def write(self, adapter_dir: str | Path) -> Path:
        path = Path(adapter_dir) / MANIFEST
        path.write_text(self.model_dump_json(indent=2))
        return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def base_fingerprint(model: str) -> BaseFingerprint:
    """sha256 of config.json, and of each safetensors file's header plus its first and last MiB.

    Reading whole multi-GB checkpoints would take minutes; headers name every tensor with its dtype,
    shape and offsets, and the sampled bytes tell retrained weights of the same shape apart. A model that
    is not a local folder (a hub id) has no fingerprint. A derived model (quantized, merged) carries what it was
    made from, read from its provenance.json."""
    root = Path(model)
    if not root.is_dir():
        return BaseFingerprint(model=model)
    weights = hashlib.sha256()
    for shard in sorted(root.glob("*.safetensors")):
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            weights.update(shard.name.encode() + size.to_bytes(8, "little") + f.read(header_len))
            weights.update(f.read(SAMPLE_BYTES))
            f.seek(max(0, size - SAMPLE_BYTES))
            weights.update(f.read(SAMPLE_BYTES))
    config = root / "config.json"
    fingerprint = BaseFingerprint(model=model, config_sha256=_sha256(config.read_bytes()) if config.is_file() else None,
                                  weights_sha256=weights.hexdigest())
    provenance = root / PROVENANCE
    if provenance.is_file():
        try:
            made = json.loads(provenance.read_text())
            fingerprint.derived_from = BaseFingerprint.model_validate(made["derived_from"])
            fingerprint.transform, fingerprint.scheme = made.get("transform"), made.get("scheme")
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{provenance} is unreadable: {exc}") from None
    return fingerprint


def file_sha256(path: str | Path) -> str:
    return _sha256(Path(path).read_bytes())


def chat_template_hash(processor) -> str:
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", "") or ""
    return _sha256(template.encode())
