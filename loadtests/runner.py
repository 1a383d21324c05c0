"""The load generator: sends a scenario's requests (streaming, through an async HTTP client) and records each.

Open loop: requests start at their planned Poisson arrival times, whatever the server does.
Closed loop: `concurrency` workers each send the next request when their previous one ends.
Either way the run stops after `max_requests` or `duration_s`, and Ctrl-C stops it early: whatever
finished is returned (and reported).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
import sys
import time
from collections.abc import Callable

import httpx

from loadtests.scenario import ImageBucket, PlannedRequest, Scenario
from loadtests.stats import RequestRecord


def make_image(bucket: ImageBucket, seed: int) -> str:
    """A random-coloured shape image of the bucket's size and format, as a data URI."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    size = bucket.size
    image = Image.new("RGB", (size, size), tuple(rng.randrange(200, 256) for _ in range(3)))
    r = size * rng.uniform(0.2, 0.4)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(rng.randrange(0, 200) for _ in range(3)))
    buf = io.BytesIO()
    fmt = bucket.format.upper()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(s: Scenario, p: PlannedRequest) -> dict:
    content = [{"type": "image_url", "image_url": {"url": make_image(b, p.image_seed + i)}}
               for i, b in enumerate(p.images)]
    content.append({"type": "text", "text": p.prompt})
    body = {"model": p.model, "messages": [{"role": "user", "content": content}], "max_tokens": p.max_tokens,
            "temperature": s.temperature, "stream": True, "stream_options": {"include_usage": True}}
    if s.ignore_eos:
        body["ignore_eos"] = True
    if s.response_format is not None:
        body["response_format"] = s.response_format
    if p.extra is not None:
        extra = s.extras[p.extra]["body"]
        body.update(extra)
        if "response_format" in extra or "tool_choice" in extra:  # the constraint decides where it ends
            body.pop("ignore_eos", None)
    return body


async def send_one(client: httpx.AsyncClient, url: str, s: Scenario, p: PlannedRequest, t0: float,
                   headers: dict[str, str]) -> RequestRecord:
    body = await asyncio.to_thread(request_body, s, p)
    rec = RequestRecord(index=p.index, model=p.model, cold=p.cold, start=time.perf_counter() - t0,
                        extra=None if p.extra is None else s.extras[p.extra].get("name", f"extra-{p.extra}"))
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers,
                                 timeout=s.timeout_s) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                payload = await resp.aread()
                try:
                    rec.error = json.loads(payload)["error"].get("code") or json.loads(payload)["error"]["type"]
                except (ValueError, KeyError, TypeError):
                    rec.error = f"http_{resp.status_code}"
                rec.end = time.perf_counter() - t0
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = chunk["error"].get("code") or "stream_error"
                    break
                now = time.perf_counter() - t0
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("content") or delta.get("tool_calls"):
                        if rec.ttft is None:
                            rec.ttft = now - rec.start
                        rec.token_times.append(now)
                usage = chunk.get("usage")
                if usage:
                    rec.output_tokens = usage["completion_tokens"]
                    rec.prompt_tokens = usage["prompt_tokens"]
            if not rec.output_tokens:
                rec.output_tokens = len(rec.token_times)
    except httpx.TimeoutException:
        rec.error = "timeout"
    except httpx.HTTPError as exc:
        rec.error = type(exc).__name__
    rec.end = time.perf_counter() - t0
    return rec


async def run(url: str, s: Scenario, planned: list[PlannedRequest], api_key: str | None = None,
              progress: Callable[[list[RequestRecord], int], None] | None = None
              ) -> tuple[list[RequestRecord], float]:
    """Run the plan; returns the records of every request that finished, and the wall time."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    records: list[RequestRecord] = []
    # An open loop must not be throttled by its own connection pool (that would turn it back into a closed
    # loop and hide the queueing it exists to show): room for every request that can be in flight at once.
    pool = max(s.concurrency, 64) if s.mode == "closed" else min(8192, max(64, math.ceil(s.rate * s.timeout_s)))
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=min(pool, 256))
    t0 = time.perf_counter()
    deadline = t0 + s.duration_s

    def done(rec: RequestRecord) -> None:
        records.append(rec)
        if progress:
            progress(records, len(planned))

    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        tasks: list[asyncio.Task] = []
        try:
            if s.mode == "open":
                for p in planned:
                    delay = t0 + p.at - time.perf_counter()
                    if t0 + p.at > deadline:
                        break
                    if delay > 0:
                        await asyncio.sleep(delay)
                    task = asyncio.create_task(send_one(client, url, s, p, t0, headers))
                    task.add_done_callback(lambda t: t.cancelled() or t.exception() or done(t.result()))
                    tasks.append(task)
                remaining = max(0.0, deadline + s.timeout_s - time.perf_counter())
                if tasks:
                    await asyncio.wait(tasks, timeout=remaining)
            else:
                queue = iter(planned)

                async def worker():
                    for p in queue:
                        if time.perf_counter() > deadline:
                            return
                        done(await send_one(client, url, s, p, t0, headers))

                tasks = [asyncio.create_task(worker()) for _ in range(s.concurrency)]
                await asyncio.wait(tasks, timeout=s.duration_s + s.timeout_s)
        except (asyncio.CancelledError, KeyboardInterrupt):
            print("\ninterrupted: writing the report for what finished", file=sys.stderr)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return sorted(records, key=lambda r: r.index), time.perf_counter() - t0
