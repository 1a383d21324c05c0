"""A scripted stand-in for the engine protocol (`service.engine.base.Engine`), for unit tests of what sits
above it: the registry's lifecycle logic, and failure paths a real engine cannot be made to take on demand.
It implements the protocol and nothing else (tests/unit/test_app.py checks that); behaviour against the real
vLLM engine is tested end to end in tests/e2e/."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from service.engine.base import (
    AdapterInfo,
    Delta,
    EngineEvents,
    GenerationRequest,
    NoEvents,
    ParsedToolCall,
    ToolCallDelta,
    VideoClip,
)
from service.errors import ModelNotFound, NotReady


class _NoToolCalls:
    """A tool-call parser that finds none (the fake model never calls tools)."""

    call_prefix = ""

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        return text, []

    def feed(self, delta_text: str) -> tuple[str | None, list[ToolCallDelta]]:
        return delta_text or None, []

    def rest(self) -> list[ToolCallDelta]:
        return []


class FakeEngine:
    model_id: str
    max_model_len: int
    max_lora_rank: int

    def __init__(self, *, events: EngineEvents | None = None, load_delay_s: float = 0.05,
                 reply: Callable[[GenerationRequest], list[str]] | None = None, fail_after: int | None = None):
        """`reply(request)` gives the text pieces streamed (default: "ok"); with `fail_after=k` the stream
        raises RuntimeError after k pieces; adapter loads take `load_delay_s` (room for concurrent callers)."""
        self.model_id, self.max_model_len, self.max_lora_rank = "base", 4096, 16
        self._events = events or NoEvents()
        self._load_delay_s = load_delay_s
        self._reply = reply or (lambda request: ["ok"])
        self._fail_after = fail_after
        self._started = False
        self._next_id = 1
        self._running: set[str] = set()
        self.loaded: dict[str, AdapterInfo] = {}
        self.log: list[tuple[str, str]] = []  # ("load" | "unload" | "abort", name or request id)

    async def start(self) -> None:
        self._started = True

    async def shutdown(self) -> None:
        self._started = False

    async def check_health(self) -> None:
        if not self._started:
            raise NotReady("engine not started")

    def unfinished_requests(self) -> int:
        return len(self._running)

    def engine_metrics(self) -> bytes:
        return b""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if request.adapter is not None and request.adapter not in self.loaded:
            raise ModelNotFound(f"adapter '{request.adapter}' is not loaded")
        pieces = self._reply(request)
        self._running.add(request.request_id)
        try:
            for i, text in enumerate(pieces):
                if self._fail_after is not None and i >= self._fail_after:
                    raise RuntimeError("the fake engine failed mid-stream")
                last = i == len(pieces) - 1
                yield Delta(index=0, text=text, new_tokens=1, finish_reason="stop" if last else None,
                            prompt_tokens=3)
                await asyncio.sleep(0)
        finally:
            self._running.discard(request.request_id)

    async def abort(self, request_id: str) -> None:
        self.log.append(("abort", request_id))

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        await asyncio.sleep(self._load_delay_s)
        self.log.append(("load", name))
        self.loaded[name] = AdapterInfo(name=name, path=path, rank=8, engine_id=self._next_id)
        self._next_id += 1
        self._events.adapter_event("load", name, self._load_delay_s)
        return self.loaded[name]

    async def unload_adapter(self, name: str) -> None:
        if name not in self.loaded:
            raise ModelNotFound(f"adapter '{name}' is not loaded")
        self.log.append(("unload", name))
        del self.loaded[name]
        self._events.adapter_event("unload", name, None)

    def adapters(self) -> list[AdapterInfo]:
        return list(self.loaded.values())

    async def resident_ids(self) -> set[int]:
        return {info.engine_id for info in self.loaded.values()}

    def tool_call_parser(self) -> _NoToolCalls:
        return _NoToolCalls()

    def reasoning_parser(self, template_kwargs: dict) -> None:
        return None  # the fake model does not think

    def load_video(self, data: bytes, processor: str, fps: float, max_frames: int) -> VideoClip:
        import numpy as np

        return VideoClip(frames=np.zeros((2, 32, 32, 3), np.uint8), metadata={"fps": fps, "total_num_frames": 2})
