"""What one chat request carries through its life: the prepared engine request (`Prepared`) and what its
output adds up to (`Totals`: text, logprobs, finish reasons, tokens and the timings metrics need)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from service.adapters.registry import Revision
from service.engine.base import Delta, GenerationRequest, TokenLogprob
from service.protocol.sampling import CompletionTokensDetails, PromptTokensDetails, Usage


@dataclass
class Prepared:
    request: GenerationRequest
    model: str  # the name the client asked for, echoed back
    adapter_label: str
    revision: Revision | None = None  # held (registry.acquire) until the request ends
    image_tokens: int = 0
    video_tokens: int = 0
    prompt_tokens: int = 0  # counted before the engine runs (images and videos included): the token reservation
    kind: str = "chat completion"  # which endpoint: the message of the request's log line
    tool_mode: str = "none"  # see serving/tools.py
    parallel_tool_calls: bool = True
    include_reasoning: bool = True
    return_token_ids: bool = False  # vLLM's: the answer carries prompt and output token ids
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:N"
    echo: str = ""  # vLLM's chat echo: the text each choice's content starts with
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    ticket: Any = None  # service.limits.Ticket: what the request counts against (set by Generation.serve)
    tenant: str = "open"
    dispatched: bool = False  # holds a fair-share engine slot
    used: int = 0  # tokens it used (prompt + completion), settled against its limits at the end
    on_dispatched: Any = None  # called when it goes to the engine (a background response is then in_progress)

    @property
    def forced_tools(self) -> bool:
        """A required or named tool_choice: the output is constrained to one call."""
        return self.tool_mode in ("required", "named")

    @property
    def json_output(self) -> bool:
        """The output is constrained to JSON (a schema, any object, or a forced call): serving/jsontext.py makes
        its strings valid JSON."""
        constraint = self.request.sampling.constraint
        return constraint is not None and constraint.kind in ("json", "json_object")


@dataclass
class Totals:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish: dict[int, str] = field(default_factory=dict)
    text: dict[int, list[str]] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cached_tokens: int = 0  # the prompt's tokens the engine found in its prefix cache
    prompt_token_ids: list[int] | None = None  # the prompt as the engine saw it
    first_token_at: float | None = None
    last_token_at: float | None = None
    gaps: list[tuple[float, int]] = field(default_factory=list)  # (seconds since previous tokens, new tokens)

    def add(self, delta: Delta) -> None:
        if delta.prompt_tokens is not None:
            self.prompt_tokens = delta.prompt_tokens
        if delta.cached_tokens is not None:
            self.cached_tokens = delta.cached_tokens
        if delta.prompt_token_ids is not None:
            self.prompt_token_ids = list(delta.prompt_token_ids)
        self.completion_tokens += delta.new_tokens
        self.text.setdefault(delta.index, []).append(delta.text)
        self.token_ids.setdefault(delta.index, []).extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs.setdefault(delta.index, []).extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finish_reason:
            self.finish[delta.index] = delta.finish_reason
        if delta.new_tokens:
            now = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = now
            elif self.last_token_at is not None:
                self.gaps.append((now - self.last_token_at, delta.new_tokens))
            self.last_token_at = now

    def usage(self, reasoning_tokens: int | None = None) -> Usage:
        """The usage object; `reasoning_tokens` (of all choices) when the output was split into reasoning."""
        details = CompletionTokensDetails(reasoning_tokens=reasoning_tokens) if reasoning_tokens is not None else None
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens, completion_tokens_details=details,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))
