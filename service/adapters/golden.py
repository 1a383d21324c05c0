"""Golden-sample checks: replay the samples an adapter's manifest.json carries and compare the outputs.

The trainer stores a few validation samples (image files with their sha256, the prompt, the adapter's
greedy output) in `manifest.json`. Served greedily through this engine, each must give the same text;
readiness waits for (and reports) the result.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from pathlib import Path

from service.engine.base import Engine, GenerationRequest, Sampling
from service.protocol.chat import ChatMessage
from service.serving.render import ChatRenderer

logger = logging.getLogger("vlora.golden")


def _messages(sample: dict) -> list[ChatMessage]:
    out = []
    for m in sample["messages"]:
        parts = [{"type": "text", "text": p["text"]} if p["type"] == "text"
                 else {"type": "image_url", "image_url": {"url": "golden"}} for p in m["content"]]
        out.append(ChatMessage.model_validate({"role": m["role"], "content": parts}))
    return out


def _images(adapter_dir: Path, sample: dict) -> list:
    from PIL import Image

    images = []
    for ref in sample.get("images", []):
        data = (adapter_dir / ref["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != ref["sha256"]:
            raise ValueError(f"golden image {ref['file']} does not match its sha256")
        with Image.open(adapter_dir / ref["file"]) as im:
            images.append(im.convert("RGB"))
    return images


async def check_adapter(engine: Engine, renderer: ChatRenderer, name: str, adapter_dir: str | Path) -> list[str]:
    """Problems found replaying `name`'s golden samples (empty: passed, or nothing to check)."""
    adapter_dir = Path(adapter_dir)
    manifest_file = adapter_dir / "manifest.json"
    if not manifest_file.is_file():
        return []
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"manifest.json is unreadable: {exc}"]
    max_tokens = int(manifest.get("training", {}).get("eval_max_new_tokens", 32))
    problems = []
    for i, sample in enumerate(manifest.get("golden_samples", [])):
        try:
            images = await asyncio.to_thread(_images, adapter_dir, sample)
            prompt = renderer.render(_messages(sample))
            request = GenerationRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}", prompt=prompt, images=images,
                                        sampling=Sampling(max_tokens=max_tokens, temperature=0.0), adapter=name)
            text = "".join([delta.text async for delta in engine.generate(request)])
        except Exception as exc:
            problems.append(f"golden sample {i}: {exc}")
            continue
        if text.strip() != sample["expected"].strip():
            problems.append(f"golden sample {i}: expected {sample['expected']!r}, got {text!r}")
    if problems:
        logger.error("golden samples failed", extra={"adapter": name, "problems": problems})
    return problems
