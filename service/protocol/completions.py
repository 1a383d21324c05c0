"""OpenAI (legacy) completions wire models (pure pydantic): `POST /v1/completions`, text prompts.

`prompt` is a string, a list of token ids, or a batch of either (up to `MAX_PROMPTS`; each prompt is served as
a request of its own, and its `n` choices take the indices `k * n .. k * n + n - 1` for the k-th prompt, as
OpenAI numbers them); `logprobs` is the number of alternatives per token (0..5),
returned in the legacy shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`). `echo` puts the
prompt before each choice's text (streamed: the first chunk of each choice); with `logprobs` the prompt's own
tokens lead each choice's logprobs, as OpenAI returns them (the first token's logprob and alternatives are
null: nothing precedes it). `suffix` and `best_of` > `n` are refused with a 400 naming the field.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from service.protocol.sampling import PromptLogprobs, SamplingRequest, Usage, refuse_if_set

MAX_PROMPTS = 64  # prompts in one request (a batch): each is admitted and generated as a request of its own


class CompletionRequest(SamplingRequest):
    # One prompt (text or token ids) or a batch of them; validated into a list of prompts.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list) -> list[str | list[int]]:
        prompts = [v] if isinstance(v, str) else v
        if prompts and all(isinstance(t, int) for t in prompts):  # one prompt of token ids
            prompts = [prompts]
        if not prompts:
            raise ValueError("the prompt is empty")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"send at most {MAX_PROMPTS} prompts per request, not {len(prompts)}")
        for one in prompts:
            if not one:
                raise ValueError("a prompt is empty")
            if isinstance(one, list) and min(one) < 0:
                raise ValueError("token ids are not negative")
        return prompts

    @field_validator("mm_processor_kwargs")
    @classmethod
    def _no_images(cls, v: Any) -> Any:
        return refuse_if_set(v, "mm_processor_kwargs", "a completions prompt holds no images")

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncation(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("keep at least one token (or -1: as many as the context holds)")
        return v

    def truncated(self, ids: list[int], context: int) -> list[int]:
        """The prompt's ids as `truncate_prompt_tokens` and `truncation_side` keep them (vLLM's rule: -1 keeps
        as many as the context holds; the left side, the start, is cut unless the right is named)."""
        keep = context if self.truncate_prompt_tokens == -1 else self.truncate_prompt_tokens
        if keep is None or len(ids) <= keep:
            return ids
        return ids[:keep] if self.truncation_side == "right" else ids[len(ids) - keep:]

    @field_validator("suffix", "best_of")
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        if info.field_name == "best_of" and v == info.data.get("n", 1):
            return v  # best_of equal to n is what is served anyway
        return refuse_if_set(v, info.field_name)

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: a prompt's first token (echo)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)
    # where the text of the last token ends (not sent: the tokens may be named by id, not by their text)
    text_end: int = Field(default=0, exclude=True)


FinishReason = Literal["stop", "length", "abort"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's, with return_token_ids (streamed: on a choice's first chunk)
    token_ids: list[int] | None = None  # vLLM's, with return_token_ids (streamed: this chunk's tokens)
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, with prompt_logprobs (the choice's prompt's)


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
