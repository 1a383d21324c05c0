"""Golden-sample checks: replay the samples an adapter's manifest carries and compare the outputs.

The trainer stores a few validation samples (image files with their sha256, the prompt, the adapter's
greedy output) in `manifest.json`. Served greedily through this engine, each must give the same text;
readiness waits for (and reports) the result. `GoldenCheck` is built with the engine and the chat renderer
and handed to the adapter registry, which calls it after each load.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from pathlib import Path

from artifacts.manifest import GoldenSample, Manifest
from service.engine.base import Engine, GenerationRequest, Sampling
from service.protocol.chat import ChatMessage
from service.serving.render import ChatRenderer

logger = logging.getLogger("vlora.golden")


def _messages(sample: GoldenSample) -> list[ChatMessage]:
    out = []
    for m in sample.messages:
        parts = [{"type": "text", "text": p["text"]} if p["type"] == "text"
                 else {"type": "image_url", "image_url": {"url": "golden"}} for p in m["content"]]
        out.append(ChatMessage.model_validate({"role": m["role"], "content": parts}))
    return out


def _images(adapter_dir: Path, sample: GoldenSample) -> list:
    from PIL import Image

    images = []
    for ref in sample.images:
        data = (adapter_dir / ref.file).read_bytes()
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ValueError(f"golden image {ref.file} does not match its sha256")
        with Image.open(adapter_dir / ref.file) as im:
            images.append(im.convert("RGB"))
    return images


class GoldenCheck:
    def __init__(self, engine: Engine, renderer: ChatRenderer):
        self.engine = engine
        self.renderer = renderer

    async def __call__(self, adapter: str, adapter_dir: Path, manifest: Manifest) -> list[str]:
        """Problems found replaying the engine adapter `adapter`'s golden samples (empty: all passed)."""
        problems = []
        for i, sample in enumerate(manifest.golden_samples):
            try:
                images = await asyncio.to_thread(_images, adapter_dir, sample)
                prompt = self.renderer.render(_messages(sample))
                request = GenerationRequest(
                    request_id=f"chatcmpl-{uuid.uuid4().hex}", prompt=prompt, images=images, adapter=adapter,
                    sampling=Sampling(max_tokens=manifest.golden_max_tokens, temperature=0.0))
                text = "".join([delta.text async for delta in self.engine.generate(request)])
            except Exception as exc:
                problems.append(f"golden sample {i}: {exc}")
                continue
            if text.strip() != sample.expected.strip():
                problems.append(f"golden sample {i}: expected {sample.expected!r}, got {text!r}")
        if problems:
            logger.error("golden samples failed", extra={"adapter": adapter, "problems": problems})
        return problems
