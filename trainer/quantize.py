"""Quantize a base or merged Qwen3-VL into the compressed-tensors format vLLM loads natively.

    vlora-train quantize --model models/tiny-qwen3-vl --out models/tiny-w8a8 --scheme w8a8 \
        --calibration models/demo-data/colors/train.jsonl --samples 64

The work is llm-compressor's (`oneshot` with its GPTQ or quantization modifiers); this module picks the
recipe for a scheme, feeds it calibration samples built from the user's own data in any of the trainer's
formats (images through the model's own processor), keeps the vision tower and `lm_head` in 16 bits unless
asked, writes the output atomically, and records where it came from:

- `w4a16`: int4 weights in groups of 128 (GPTQ with calibration data, round-to-nearest without), 16-bit
  activations. vLLM kernels: Marlin/Machete on GPU, CPUWNA16 on CPU.
- `w8a8`: int8 weights per output channel (GPTQ, or round-to-nearest), int8 activations quantized per token
  at run time. Kernels: CUTLASS on GPU, oneDNN on CPU.
- `fp8`: fp8 (e4m3) weights per channel, activations per token at run time; needs no calibration (data is
  not read). Kernels: Hopper+ on GPU; a torch fallback on CPU.

`provenance.json` in the output names the source model's fingerprint (and the source's own provenance, so
a chain merge -> quantize -> ... stays readable), the scheme and method, the modules left in 16 bits, and the
calibration data's content fingerprint. The service follows it: an adapter trained on base B loads on a
quantization of B and is refused on anything else (`artifacts.manifest.BaseFingerprint.mismatch`).

llm-compressor pins compressed-tensors 0.19 while vLLM 0.32 pins 0.17, so it lives in its own environment
(`make quantize-env`: `.venv-quantize`, the `quantize` extra); the format it writes is the one vLLM's
compressed-tensors reads (loaded and served by the e2e tests and `bench/quant_bench.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from artifacts.atomic import atomic_dir
from artifacts.manifest import PROVENANCE, base_fingerprint

# scheme -> (llm-compressor preset, whether calibration data improves it)
SCHEMES = {"w4a16": ("W4A16", True), "w8a8": ("W8A8", True), "fp8": ("FP8_DYNAMIC", False)}
TOWER = "re:.*visual.*"  # the vision tower, its merger and deepstack mergers
DEFAULT_SAMPLES = 64


class QuantizeSetupError(ValueError):
    """llm-compressor is not installed here."""


@dataclass
class Calibration:
    samples: list[dict]  # processor outputs, one record each
    source: str
    format: str
    fingerprint: str
    records: int
    skipped_videos: int


def _require_llmcompressor():
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        raise QuantizeSetupError(
            "quantize needs llm-compressor, which pins another compressed-tensors than the serving engine: "
            "run `make quantize-env` and use .venv-quantize/bin/vlora-train quantize ...") from None


def calibration_samples(data: str, processor, samples: int, max_length: int, split: str = "train") -> Calibration:
    """The first `samples` records of `data` (any trainer format) as full chats (prompt and answer) through the
    model's processor, images included; records with videos are left out (counted)."""
    from trainer.data import ChatRecords, DataError, message_images, open_image, open_source, scan

    rows = open_source(data, split)
    found = scan(rows, "auto")
    if found.problems:
        raise DataError(data, found.problems)
    out, skipped = [], 0
    for chat in ChatRecords(rows, found.format, found.indices):
        if len(out) >= samples:
            break
        messages = chat["messages"]
        if any(p["type"] == "video" for m in messages for p in m["content"]):
            skipped += 1
            continue
        text = processor.apply_chat_template(messages, tokenize=False)
        images = [open_image(ref) for ref in message_images(messages)]
        enc = processor(text=[text], images=images or None, return_tensors="pt", truncation=False)
        if enc["input_ids"].shape[1] > max_length:
            continue
        out.append(dict(enc))
    if not out:
        raise ValueError(f"no calibration samples in {data} (all records have videos or exceed {max_length} tokens)")
    return Calibration(out, data, found.format, found.fingerprint, len(out), skipped)


def recipe(scheme: str, calibrated: bool, ignore: list[str]):
    """llm-compressor's modifier for a scheme: GPTQ when calibration data is given, else round-to-nearest."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    preset, wants_data = SCHEMES[scheme]
    if calibrated and wants_data:
        return GPTQModifier(targets="Linear", scheme=preset, ignore=ignore), "gptq"
    return QuantizationModifier(targets="Linear", scheme=preset, ignore=ignore), "rtn"


def quantize(model: str, out: str, scheme: str, calibration: str | None = None, samples: int = DEFAULT_SAMPLES,
             max_length: int = 2048, quantize_vision: bool = False, quantize_lm_head: bool = False,
             split: str = "train", overwrite: bool = False) -> dict:
    """Quantize `model` into `out`; returns the provenance written there."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme '{scheme}'; choose one of {', '.join(SCHEMES)}")
    _require_llmcompressor()
    import compressed_tensors
    import llmcompressor
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from trainer.model import resolve_base_model

    resolve_base_model(model)
    config = json.loads((Path(model) / "config.json").read_text()) if (Path(model) / "config.json").is_file() else {}
    if "quantization_config" in config:
        raise ValueError(f"'{model}' is already quantized ({config['quantization_config'].get('quant_method')}); "
                         "quantize the 16-bit model")
    source = base_fingerprint(model)
    processor = AutoProcessor.from_pretrained(model)
    calib = None
    if calibration and SCHEMES[scheme][1]:
        calib = calibration_samples(calibration, processor, samples, max_length, split)
    ignore = ([] if quantize_lm_head else ["lm_head"]) + ([] if quantize_vision else [TOWER])
    modifier, method = recipe(scheme, calib is not None, ignore)
    net = AutoModelForImageTextToText.from_pretrained(model, dtype="auto")
    kwargs = {}
    if calib is not None:
        loader = torch.utils.data.DataLoader(calib.samples, batch_size=None, collate_fn=lambda sample: sample)
        # One decoder layer at a time (llm-compressor's sequential pipeline), as its VLM examples do.
        layer = type(net.model.language_model.layers[0]).__name__
        kwargs = {"dataset": loader, "num_calibration_samples": len(calib.samples), "sequential_targets": [layer]}
    oneshot(model=net, processor=processor, recipe=modifier, **kwargs)
    provenance = {
        "format": 1,
        "derived_from": source.model_dump(exclude_none=True),
        "transform": "quantize",
        "scheme": scheme,
        "method": method,
        "kept_16bit": ignore,
        "calibration": None if calib is None else {
            "source": calib.source, "format": calib.format, "fingerprint": calib.fingerprint,
            "samples": calib.records, "skipped_video_records": calib.skipped_videos},
        "tools": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__},
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        net.save_pretrained(tmp, save_compressed=True)
        processor.save_pretrained(tmp)
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2))
    return provenance
