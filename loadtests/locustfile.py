"""Locust users for vlora, for teams that run their load tests on locust.

    pip install locust pillow
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 2 -t 60s

Each user sends streaming image+text chat completions; the adapter of each request is drawn from a Zipf
distribution over the adapter names (skewed, like real adapter traffic). Three request types show in
locust's statistics, each named by adapter:

    POST   locust's own measure of the streamed request (time to the response; failures counted here)
    TTFT   time to the first content token
    TPOT   mean time per output token after the first
    E2E    the whole request, to the last token

Settings by environment variable: VLORA_ADAPTERS (comma-separated; default: every adapter /v1/models
lists), VLORA_ZIPF_S (default 1.1), VLORA_API_KEY, VLORA_IMAGE_SIZE (default 256), VLORA_MAX_TOKENS
(default 64), VLORA_SEED.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import time

from locust import HttpUser, between, task

ZIPF_S = float(os.environ.get("VLORA_ZIPF_S", "1.1"))
IMAGE_SIZE = int(os.environ.get("VLORA_IMAGE_SIZE", "256"))
MAX_TOKENS = int(os.environ.get("VLORA_MAX_TOKENS", "64"))
API_KEY = os.environ.get("VLORA_API_KEY")


def image_uri(rng: random.Random, size: int = IMAGE_SIZE) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), tuple(rng.randrange(200, 256) for _ in range(3)))
    r = size * rng.uniform(0.2, 0.4)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(rng.randrange(0, 200) for _ in range(3)))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def zipf_weights(n: int, s: float = ZIPF_S) -> list[float]:
    raw = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class AdapterChatUser(HttpUser):
    wait_time = between(0.0, 0.2)
    adapters: list[str] = []
    weights: list[float] = []

    def on_start(self) -> None:
        self.headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
        self.rng = random.Random(int(os.environ.get("VLORA_SEED", "0")) + id(self) % 1000)
        cls = type(self)
        if not cls.adapters:
            names = os.environ.get("VLORA_ADAPTERS")
            if names:
                cls.adapters = [n.strip() for n in names.split(",") if n.strip()]
            else:
                models = self.client.get("/v1/models", headers=self.headers, name="models").json()["data"]
                cls.adapters = [m["id"] for m in models if m.get("parent")] or [models[0]["id"]]
            cls.weights = zipf_weights(len(cls.adapters))

    def _report(self, request_type: str, name: str, seconds: float) -> None:
        self.environment.events.request.fire(request_type=request_type, name=name, response_time=seconds * 1000,
                                             response_length=0, exception=None, context={})

    @task
    def chat(self) -> None:
        model = self.rng.choices(self.adapters, weights=self.weights)[0]
        body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_uri(self.rng)}},
                    {"type": "text", "text": "What color is the shape?"}]}]}
        started = time.perf_counter()
        first = None
        tokens = 0
        with self.client.post("/v1/chat/completions", json=body, headers=self.headers, stream=True,
                              catch_response=True, name=model) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    response.failure(chunk["error"].get("message", "stream error"))
                    return
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])) and first is None:
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            if first is None:
                response.failure("no content token")
                return
            response.success()
        total = time.perf_counter() - started
        self._report("TTFT", model, first)
        self._report("E2E", model, total)
        if tokens > 1:
            self._report("TPOT", model, (total - first) / (tokens - 1))
