"""Merge an adapter into its base (`merge_and_unload`) and prove parity before declaring success.

    vlora-train merge --adapter out/colors --out models/tiny-colors-merged [--data val.jsonl] [-k 4]

The merged model must give the same greedy outputs as base+adapter on K validation samples; the largest
logit difference is reported. A failed check fails the command and leaves no output directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from artifacts.atomic import atomic_dir
from artifacts.manifest import PROVENANCE, base_fingerprint, file_sha256


def _is_quantized(model_dir: str) -> bool:
    config = Path(model_dir) / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def merge(adapter_dir: str, out: str, base_model: str | None = None, data: str | None = None, k: int = 4,
          dtype: str = "auto", max_new_tokens: int = 16, atol: float = 1e-3) -> dict:
    import torch
    from peft import PeftModel

    from trainer.config import TrainConfig
    from trainer.data import load_dataset_file, message_images, open_image, prompt_and_answer
    from trainer.evaluate import generate
    from trainer.model import load_base, load_processor

    adapter, out_path = Path(adapter_dir), Path(out)
    if out_path.exists():
        raise FileExistsError(f"output directory '{out_path}' already exists")
    saved = TrainConfig.saved_with(adapter)
    base = base_model or saved.get("base_model") or json.loads((adapter / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    if _is_quantized(base):
        raise ValueError(f"'{base}' is a quantized checkpoint; merge onto the 16-bit base model instead "
                         "(a 4-bit merge would bake quantisation error into the weights)")
    config = TrainConfig(**{**saved, "base_model": base, "quantization": "none", "dtype": dtype, "resume": False})
    processor = load_processor(config)
    model = PeftModel.from_pretrained(load_base(config), adapter)
    data = data or saved.get("eval_data")
    if not data:
        raise ValueError("parity needs samples: pass --data with a validation file")
    records = load_dataset_file(data)[:k]

    def logits(m) -> list:
        outs = []
        for record in records:
            messages, _ = prompt_and_answer(record)
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            images = [open_image(ref) for ref in message_images(messages)]
            inputs = processor(text=[text], images=images or None, return_tensors="pt").to(m.device)
            with torch.no_grad():
                outs.append(m(**inputs).logits.float().cpu())
        return outs

    adapter_answers = generate(model, processor, records, max_new_tokens)
    adapter_logits = logits(model)
    merged = model.merge_and_unload()
    merged_answers = generate(merged, processor, records, max_new_tokens)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(adapter_logits, logits(merged), strict=True))
    report = {"samples": len(records), "outputs_equal": adapter_answers == merged_answers,
              "max_logit_diff": max_diff, "adapter_answers": adapter_answers, "merged_answers": merged_answers}
    if not report["outputs_equal"]:
        raise ValueError(f"parity check failed: merged outputs differ from the adapter's "
                         f"(max logit diff {max_diff:.3g}): {json.dumps(report)[:600]}")
    with atomic_dir(out_path) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2))
        # A merge makes a new model (adapters of the base are not adapters of it); quantize follows this chain.
        (tmp / PROVENANCE).write_text(json.dumps({
            "format": 1, "derived_from": base_fingerprint(base).model_dump(exclude_none=True), "transform": "merge",
            "adapter": str(adapter), "adapter_config_sha256": file_sha256(adapter / "adapter_config.json")}, indent=2))
    return report
