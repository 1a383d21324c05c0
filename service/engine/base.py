"""The engine protocol: what the serving layer needs from an inference backend, and nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    request_id: str
    prompt: str
    images: list[Any] = field(default_factory=list)  # PIL images, in prompt order
    sampling: Sampling = field(default_factory=lambda: Sampling(max_tokens=16))
    adapter: str | None = None  # None: the base model


@dataclass
class Delta:
    """New output of one choice since the previous delta."""

    index: int
    text: str
    new_tokens: int
    finish_reason: str | None = None
    prompt_tokens: int | None = None


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank: int
    engine_id: int


class Engine(Protocol):
    model_id: str
    max_model_len: int

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]: ...

    async def abort(self, request_id: str) -> None: ...

    async def load_adapter(self, name: str, path: str) -> AdapterInfo: ...

    async def unload_adapter(self, name: str) -> None: ...

    def adapters(self) -> list[AdapterInfo]: ...

    async def check_health(self) -> None: ...

    def unfinished_requests(self) -> int: ...
