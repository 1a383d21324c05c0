"""Builds the adapter's `manifest.json` (the format is `artifacts.manifest.Manifest`, read by the service)."""

from __future__ import annotations

import shutil
from pathlib import Path

from artifacts.manifest import (
    GoldenImage,
    GoldenSample,
    LoraSettings,
    Manifest,
    Serving,
    base_fingerprint,
    chat_template_hash,
    file_sha256,
)
from artifacts.modules import serving_notes


def golden_samples(out: Path, records: list[dict], expected: list[str]) -> list[GoldenSample]:
    """Validation records with the adapter's greedy answers, their images copied under `out/golden/`."""
    from trainer.data import open_image, prompt_and_answer

    golden = []
    for i, (record, answer) in enumerate(zip(records, expected, strict=False)):
        messages, _ = prompt_and_answer(record)
        images = []
        for m in messages:
            for part in m["content"]:
                if part["type"] != "image":
                    continue
                (out / "golden").mkdir(exist_ok=True)
                ref = part["image"]
                if isinstance(ref, str) and Path(ref).is_file():
                    dest = out / "golden" / f"{i}-{len(images)}{Path(ref).suffix or '.png'}"
                    shutil.copyfile(ref, dest)
                else:  # bytes, a data URI, a URL or a PIL image: stored as the PNG the model saw
                    dest = out / "golden" / f"{i}-{len(images)}.png"
                    open_image(ref).save(dest, format="PNG")
                images.append(GoldenImage(file=str(dest.relative_to(out)), sha256=file_sha256(dest)))
        text_messages = [{"role": m["role"], "content": [p if p["type"] == "text" else {"type": "image"}
                                                         for p in m["content"]]} for m in messages]
        golden.append(GoldenSample(messages=text_messages, images=images, expected=answer))
    return golden


def write_manifest(out: Path, config, groups: dict[str, list[str]], processor, eval_result: dict,
                   dataset: dict | None = None) -> Manifest:
    n = min(config.golden_samples, len(eval_result.get("samples", [])), len(eval_result.get("records", [])))
    size = getattr(getattr(processor, "image_processor", None), "size", {}) or {}
    notes = serving_notes(groups)
    manifest = Manifest(
        base=base_fingerprint(config.base_model),
        lora=LoraSettings(r=config.lora_r, alpha=config.lora_alpha, rslora=config.use_rslora,
                          dropout=config.lora_dropout, quantization=config.quantization),
        targets={k: sorted(v) for k, v in groups.items()},
        serving=Serving(vllm_applies_all=not notes, notes=notes),
        processor={"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge")},
        chat_template_sha256=chat_template_hash(processor),
        training=config.to_dict(),
        eval={k: eval_result[k] for k in ("adapter", "base", "train_seconds", "backend", "bleu_note")
              if k in eval_result},
        dataset=dataset or {},
        golden_samples=golden_samples(out, eval_result.get("records", [])[:n],
                                      [s["adapter"] for s in eval_result.get("samples", [])[:n]]),
    )
    manifest.write(out)
    return manifest

