"""`manifest.json`, written beside `adapter_config.json`: what the adapter is for and how to check it.

It records the base model and a fingerprint of its config and weights, rank/alpha, the adapted modules
split into language / vision / merger (and whether vLLM would ignore some), processor pixel limits, the
chat-template hash, the training config, eval metrics, and golden samples (image file + hash, prompt,
expected greedy output) that the service can replay at load time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

MANIFEST = "manifest.json"
SAMPLE_BYTES = 1 << 20


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def base_fingerprint(model: str) -> dict:
    """sha256 of config.json, and of each safetensors file's header plus its first and last MiB.

    Reading whole multi-GB checkpoints would take minutes; headers name every tensor with its dtype,
    shape and offsets, and the sampled bytes tell retrained weights of the same shape apart."""
    root = Path(model)
    if not root.is_dir():
        return {"model": model, "config_sha256": None, "weights_sha256": None}
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
    return {"model": model, "config_sha256": _sha256(config.read_bytes()) if config.is_file() else None,
            "weights_sha256": weights.hexdigest()}


def chat_template_hash(processor) -> str:
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", "") or ""
    return _sha256(template.encode())


def write_manifest(out: Path, config, groups: dict[str, list[str]], processor, eval_result: dict) -> dict:
    from trainer.data import prompt_and_answer
    from trainer.model import serving_warnings

    golden = []
    samples = eval_result.get("samples", [])
    golden_dir = out / "golden"
    for i, sample in enumerate(samples[: config.golden_samples]):
        record = eval_result["records"][i] if "records" in eval_result else None
        if record is None:
            break
        messages, _ = prompt_and_answer(record)
        images = []
        for m in messages:
            for part in m["content"]:
                if part["type"] == "image" and Path(part["image"]).is_file():
                    golden_dir.mkdir(exist_ok=True)
                    dest = golden_dir / f"{i}-{len(images)}{Path(part['image']).suffix or '.png'}"
                    shutil.copyfile(part["image"], dest)
                    images.append({"file": str(dest.relative_to(out)), "sha256": _sha256(dest.read_bytes())})
        text_messages = [{"role": m["role"], "content": [p if p["type"] == "text" else {"type": "image"}
                                                         for p in m["content"]]} for m in messages]
        golden.append({"messages": text_messages, "images": images, "expected": sample["adapter"]})
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", {}) or {}
    manifest = {
        "format": 1,
        "base": base_fingerprint(config.base_model),
        "lora": {"r": config.lora_r, "alpha": config.lora_alpha, "rslora": config.use_rslora,
                 "dropout": config.lora_dropout, "quantization": config.quantization},
        "targets": {k: sorted(v) for k, v in groups.items()},
        "serving": {"vllm_applies_all": not (groups["vision"] or groups["merger"]), "notes": serving_warnings(groups)},
        "processor": {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge")},
        "chat_template_sha256": chat_template_hash(processor),
        "training": config.to_dict(),
        "eval": {k: eval_result[k] for k in ("adapter", "base", "train_seconds") if k in eval_result},
        "golden_samples": golden,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
