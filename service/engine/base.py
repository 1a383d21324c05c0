"""The engine protocol: what the serving layer needs from an inference backend, and nothing more.

A backend (`vllm_engine.VLLMEngine`) implements `Engine`; whatever it observes about its own work (adapter
loads, scheduler load, queue waits) it reports to the `EngineEvents` sink it is given at construction (the
service's metrics). Nothing above this module knows which backend runs.

Adapters are named by the caller; the registry gives every revision its own engine name `NAME@REV`
(`engine_adapter_name`), and events carry that engine name (`adapter_of` recovers the adapter's name).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol


@dataclass(frozen=True)
class Constraint:
    """What the output must match: a JSON schema (`json`), any JSON object, a regex, one of `choice`, or a
    grammar (the backend's EBNF/Lark). `param` names the request field it came from, for errors."""

    kind: Literal["json", "json_object", "regex", "choice", "grammar"]
    spec: Any = None
    param: str = "response_format"


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
    logprobs: int | None = None  # alternatives per token to report (0: the sampled token only); None: none
    prompt_logprobs: int | None = None  # the same for the prompt's own tokens (completions' echo); None: none
    logit_bias: dict[int, float] | None = None
    constraint: Constraint | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's: each token's alternatives are these tokens (in this order) rather than the most likely ones; then
    # `logprobs` is their count
    logprob_token_ids: list[int] | None = None


@dataclass
class VideoClip:
    """A decoded video: the frames the model's processor will see (sampled), and their metadata."""

    frames: Any  # (frames, height, width, 3) uint8 array
    metadata: dict[str, Any]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[2]), int(self.frames.shape[1])


@dataclass
class GenerationRequest:
    request_id: str
    prompt: str
    prompt_token_ids: list[int] | None = None  # the prompt already tokenized (one image/video pad per item)
    images: list[Any] = field(default_factory=list)  # PIL images, in prompt order
    videos: list[VideoClip] = field(default_factory=list)  # in prompt order
    sampling: Sampling = field(default_factory=lambda: Sampling(max_tokens=16))
    adapter: str | None = None  # an engine adapter name (NAME@REV); None: the base model
    # The chat template variables of a request whose output is split into reasoning and answer (the engine's
    # reasoning parser reads them, e.g. enable_thinking, and constrained output starts after the reasoning);
    # None: no split, a constraint holds from the first token.
    reasoning: dict[str, Any] | None = None
    priority: int = 0  # the engine's scheduling priority when it schedules by priority (lower: sooner)
    # Salts the engine's prefix cache: a request reuses cached prefixes only of requests with the same salt
    # (vLLM's cache_salt; None: shared with every unsalted request).
    cache_salt: str | None = None
    # The request's pixel budget for its images ({"min_pixels", "max_pixels"}, vLLM's mm_processor_kwargs for the
    # image processor); None: the processor's own
    image_sizing: dict[str, int] | None = None


class Alternative(NamedTuple):
    """One of a position's most likely tokens (their rank is their place in the list, from 1)."""

    token: str
    logprob: float
    bytes: list[int]
    id: int


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[Alternative] = field(default_factory=list)  # best first
    id: int = -1  # the token's id
    rank: int | None = None  # its rank among the vocabulary at its position (1: the most likely)


@dataclass
class Delta:
    """New output of one choice since the previous delta."""

    index: int
    text: str
    new_tokens: int
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for them
    token_ids: Sequence[int] = ()  # the new tokens
    # The prompt's tokens with their logprobs (None for the first, which nothing precedes), once per request on
    # the first delta after the prompt was read, when the request asked for them.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cached_tokens: int | None = None  # the prompt's tokens found in the prefix cache (when the engine says)
    prompt_token_ids: Sequence[int] | None = None  # the prompt as the engine saw it, on the first delta only


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # JSON text


@dataclass
class ToolCallDelta:
    index: int  # which call of the completion
    name: str | None = None  # set once, on the call's first delta
    arguments: str | None = None  # the next piece of the arguments' JSON text


class ToolCallParser(Protocol):
    """Finds tool calls in the model's own format in a completion (one parser per request)."""

    call_prefix: str  # what opens a call in the model's format, before its JSON (e.g. "<tool_call>\n")

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]: ...

    def feed(self, delta_text: str) -> tuple[str | None, list[ToolCallDelta]]: ...

    def rest(self) -> list[ToolCallDelta]: ...


class ReasoningParser(Protocol):
    """Splits a thinking model's completion into its reasoning and its answer (one parser per request)."""

    def split(self, text: str, token_ids: Sequence[int]) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole completion (its text and tokens)."""
        ...

    def feed(self, delta_text: str, delta_ids: Sequence[int]) -> tuple[str | None, str | None]:
        """(new reasoning, new content) after `delta_text` (tokens `delta_ids`) more of the completion."""
        ...

    def end(self) -> tuple[str | None, str | None]:
        """What the parser still holds back at the end of the completion (e.g. a partial end tag)."""
        ...

    def reasoning_tokens(self) -> int:
        """Tokens of reasoning split or fed so far."""
        ...


@dataclass(frozen=True)
class AdapterInfo:
    name: str  # the engine adapter name (NAME@REV)
    path: str
    rank: int
    engine_id: int


def engine_adapter_name(name: str, rev: str) -> str:
    """The engine's name for one revision of an adapter: every revision is its own engine adapter."""
    return f"{name}@{rev}"


def adapter_of(engine_name: str) -> str:
    """The adapter name of an engine adapter name (`NAME@REV` -> `NAME`): metrics label adapters, not revisions."""
    return engine_name.partition("@")[0]


AdapterEvent = Literal["load", "load_failed", "unload"]


class EngineEvents(Protocol):
    """Where an engine reports what it observes; adapters are engine names (NAME@REV), None is the base."""

    def adapter_event(self, event: AdapterEvent, adapter: str, seconds: float | None) -> None: ...

    def scheduler_state(self, running: int, waiting: int, kv_cache_usage: float,
                        running_by_adapter: dict[str, int]) -> None: ...

    def request_queued(self, adapter: str | None, seconds: float) -> None: ...


class NoEvents:
    """An events sink that drops everything (tools and tests that need no metrics)."""

    def adapter_event(self, event: AdapterEvent, adapter: str, seconds: float | None) -> None:
        pass

    def scheduler_state(self, running: int, waiting: int, kv_cache_usage: float,
                        running_by_adapter: dict[str, int]) -> None:
        pass

    def request_queued(self, adapter: str | None, seconds: float) -> None:
        pass


class Engine(Protocol):
    model_id: str
    max_model_len: int  # known once started
    max_lora_rank: int  # the largest adapter rank `load_adapter` accepts (0: no LoRA support)

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def check_health(self) -> None: ...

    def unfinished_requests(self) -> int: ...

    def engine_metrics(self) -> bytes:
        """The engine's own metrics in Prometheus text format (served on /metrics beside vlora's; adapters
        named as clients name them), or b"" when it has none."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the request's output; closing the iterator early aborts the request in the engine."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def load_adapter(self, name: str, path: str) -> AdapterInfo: ...

    async def unload_adapter(self, name: str) -> None: ...

    def adapters(self) -> list[AdapterInfo]:
        """Every adapter loaded (registered) in the engine."""
        ...

    async def resident_ids(self) -> set[int]:
        """Engine ids of the loaded adapters held in accelerator/host memory now (others reload when used)."""
        ...

    def tool_call_parser(self) -> ToolCallParser:
        """A fresh parser of the served model's tool-call format."""
        ...

    def reasoning_parser(self, template_kwargs: dict[str, Any]) -> ReasoningParser | None:
        """A fresh parser of the served model's reasoning format for a request rendered with these template
        variables; None when the server splits no reasoning out."""
        ...

    def load_video(self, data: bytes, processor: str, fps: float, max_frames: int) -> VideoClip:
        """Decode a video and sample its frames as the model's video processor (by class name) expects, at
        most `fps` frames a second and `max_frames` in all (blocking: run it in a thread)."""
        ...
