"""OpenAI chat-completions wire models (pure pydantic: no torch, no vLLM).

Requests accept what the official `openai` client sends; fields that only change vLLM sampling
(`top_k`, `min_p`, `min_tokens`, `ignore_eos`, `repetition_penalty`, `structured_outputs`) arrive through
`extra_body`. Structured outputs: OpenAI's `response_format` (`json_object`, `json_schema`) or vLLM's
`structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`; one of them), never both.
Unknown fields are ignored, as OpenAI-compatible servers do; features we do not implement (the
deprecated `functions`, audio) are refused with a 400 naming the field. Tools follow OpenAI: `tools`,
`tool_choice` (none, auto, required, a named function), `parallel_tool_calls`, assistant `tool_calls` and
`role: "tool"` results in the history.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from service.protocol.sampling import PromptLogprobs, SamplingRequest, Usage, _Lenient, refuse_if_set


class ImageURL(_Lenient):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


def _url_object(v: Any) -> Any:
    """Some clients send the URL as a bare string."""
    return {"url": v} if isinstance(v, str) else v


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL

    _url = field_validator("image_url", mode="before")(_url_object)


class VideoURL(_Lenient):
    url: str = Field(min_length=1)


class VideoPart(_Lenient):
    type: Literal["video_url"]
    video_url: VideoURL

    _url = field_validator("video_url", mode="before")(_url_object)


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends and expects it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool result: the call it answers

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.content is None and not self.tool_calls:
            raise ValueError(f"a {self.role} message needs content")
        if self.role in ("system", "developer", "assistant", "tool") and isinstance(self.content, list):
            if any(isinstance(p, ImagePart | VideoPart) for p in self.content):
                raise ValueError(f"images and videos are only accepted in user messages, not in a {self.role} "
                                 "message")
        return self

    def images(self) -> list[ImagePart]:
        return [p for p in self.content if isinstance(p, ImagePart)] if isinstance(self.content, list) else []

    def videos(self) -> list[VideoPart]:
        return [p for p in self.content if isinstance(p, VideoPart)] if isinstance(self.content, list) else []

    def text(self) -> str:
        """The message's text (its text parts one per line, as vLLM's chat echo joins them)."""
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content if isinstance(p, TextPart))
        return self.content or ""


class FunctionDefinition(_Lenient):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


_UNSUPPORTED = ("functions", "audio", "web_search_options")
# Template variables vlora sets itself (or the processor's own arguments): not settable by a client.
TEMPLATE_RESERVED = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
                     "return_dict", "chat_template", "tokenizer", "processor"}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True  # vLLM's: open a new assistant turn after the messages
    continue_final_message: bool = False  # vLLM's prefill: continue the last (assistant) message instead
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: extra variables for the chat template
    tools: list[ToolDefinition] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    include_reasoning: bool = True  # vLLM's: false leaves a thinking model's reasoning out of the answer
    # OpenAI's; as vLLM takes it: a chat template variable, and "none" turns Qwen3's thinking off
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # Accepted so we can name them in a clear refusal instead of silently ignoring them.
    functions: Any = None
    audio: Any = None
    web_search_options: Any = None
    # vLLM's: when the last message is the assistant's (a prefill), its text leads each choice's content
    echo: bool = False
    # vLLM's: documents for a chat template that renders them (retrieval-augmented generation), e.g. {"title",
    # "text"} each; a template that does not is a 400 (vLLM's server would leave them out silently)
    documents: list[dict[str, str]] | None = Field(default=None, max_length=256)
    modalities: list[str] | None = None  # OpenAI's output modalities: text is the only one served

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _no_truncation(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("a chat prompt over the context is refused, never cut (its images, tools and chat "
                             "template would lose tokens); /v1/completions takes it for text prompts")
        return v

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: list[str] | None) -> list[str] | None:
        other = sorted(set(v or ()) - {"text"})
        if other:
            raise ValueError(f"this server answers text only, not {', '.join(map(repr, other))}")
        return v

    # Field validators (not the model validator) so that each refusal names its parameter.
    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        return refuse_if_set(v, info.field_name)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @property
    def template_variables(self) -> dict[str, Any]:
        """The chat template's variables: the client's `chat_template_kwargs`, then `reasoning_effort` as vLLM
        passes it (the variable itself, and `enable_thinking` false for "none", true otherwise, unless the client
        set `enable_thinking`)."""
        variables = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            variables["reasoning_effort"] = self.reasoning_effort
            variables.setdefault("enable_thinking", self.reasoning_effort != "none")
        return variables

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        reserved = sorted(set(v or {}) & TEMPLATE_RESERVED)
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be set through chat_template_kwargs (they have their own "
                             "request fields or are the server's)")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v, info: ValidationInfo):
        tools = info.data.get("tools") or []
        if v in ("required", None, "none", "auto"):
            if v == "required" and not tools:
                raise ValueError("tool_choice 'required' needs tools")
            return v
        if v.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names '{v.function.name}', which is not among the tools")
        return v

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.forced_tools and (self.response_format and self.response_format.type != "text"
                                  or self.structured_outputs is not None):
            raise ValueError("a required or named tool_choice constrains the output itself; drop response_format "
                             "or structured_outputs")
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise ValueError("continue_final_message needs add_generation_prompt: false (as vLLM takes them)")
            if self.messages[-1].role != "assistant":
                raise ValueError("continue_final_message continues the last message, which must be an assistant one")
            if self.forced_tools:
                raise ValueError("a required or named tool_choice cannot continue a final message")
        elif self.messages[-1].role == "assistant" and self.add_generation_prompt:
            raise ValueError("the last message must not be an assistant message (to continue it, send "
                             "continue_final_message: true and add_generation_prompt: false)")
        if self.echo and self.forced_tools:
            raise ValueError("echo leads the content with the last message, and a required or named tool_choice "
                             "answers with a call and no content")
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def image_count(self) -> int:
        return sum(len(m.images()) for m in self.messages)

    def video_count(self) -> int:
        return sum(len(m.videos()) for m in self.messages)

    @property
    def tool_mode(self) -> str:
        """none (no tools in play), auto (the model may call; its output is parsed), required, or named."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice in (None, "auto"):
            return "auto"
        return "required" if self.tool_choice == "required" else "named"

    @property
    def forced_tools(self) -> bool:
        return self.tool_mode in ("required", "named")

    @property
    def echoed(self) -> str:
        """What `echo` puts before each choice's content: the last message's text when it is the assistant's."""
        last = self.messages[-1]
        return last.text() if self.echo and last.role == "assistant" else ""

    @property
    def top_logprobs_wanted(self) -> int | None:
        """Alternatives per token to return (0: only the sampled token's logprob), None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # A thinking model's reasoning (with --reasoning-parser), under both names clients read: reasoning_content
    # (DeepSeek's, and vLLM's until 0.10) and reasoning (vLLM's since). OpenAI's Chat Completions has neither.
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = None  # vLLM's, with return_token_ids


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's, with return_token_ids
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, with prompt_logprobs


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None  # see ResponseMessage
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = None  # vLLM's, with return_token_ids: this chunk's tokens


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's, with return_token_ids: on the first chunk that has them
