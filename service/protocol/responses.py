"""OpenAI Responses API wire models (pure pydantic): `POST /v1/responses`, text and images in, text out.

Supported: `input` as a string or items (messages with `input_text`, `input_image` parts and `output_text` in
earlier assistant turns; `function_call` and `function_call_output` items of earlier tool calls), `instructions`,
`max_output_tokens`, `temperature`, `top_p` (and vLLM's `top_k`, `min_p`, `seed`, `repetition_penalty`,
`min_tokens`), `text.format` (text, json_object, json_schema; or vLLM's
`structured_outputs` as on the chat path), `include: ["message.output_text.logprobs"]` with `top_logprobs`
(the output text's logprobs, whole and in each text delta), function `tools`
with `tool_choice` (none, auto, required, a named function) and `parallel_tool_calls`, `stream` (the typed
events), `metadata`; a thinking model's reasoning (with --reasoning-parser) comes as a `reasoning` output item
before the message, tool calls as `function_call` items. `reasoning.effort` reaches the chat
template as the chat path's `reasoning_effort` does. Responses are stored unless `store: false` (see
service.serving.response_store), `previous_response_id` continues a stored one, and `background: true` answers
at once (queued) and generates while the client polls (or cancels); `conversation`, reasoning summaries and tools other than functions (web search, file search, ...) are refused with a 400 naming the field.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, TypeAdapter, ValidationInfo, field_validator

from service.protocol.chat import FunctionDefinition
from service.protocol.sampling import _Lenient, refuse_if_set


class InputText(_Lenient):
    type: Literal["input_text", "output_text"]
    text: str


class InputImage(_Lenient):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("file_id")
    @classmethod
    def _no_files(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("file ids are not supported: send the image as image_url (a URL or data URI)")
        return v


class InputMessage(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText | InputImage]


class FunctionCallItem(_Lenient):
    """A tool call of an earlier turn, as a Response output it (sent back as input)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutput(_Lenient):
    """The result of an earlier tool call."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str


def _item_type(v: Any) -> str:
    """An input item's kind: its `type`, "message" when it has none (a bare {role, content} message)."""
    return (v.get("type") if isinstance(v, dict) else getattr(v, "type", None)) or "message"


InputItem = Annotated[Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutput, Tag("function_call_output")], Discriminator(_item_type)]
INPUT_ITEMS = TypeAdapter(list[InputItem])  # stored items read back (service.serving.response_store)


class FunctionTool(FunctionDefinition):
    """A Responses function tool: the chat path's function definition, flat, with its `type`."""

    type: Literal["function"]


class NamedFunctionChoice(_Lenient):
    type: Literal["function"]
    name: str


class TextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Lenient):
    format: TextFormat = Field(default_factory=TextFormat)


_REFUSED = ("conversation", "prompt")
OUTPUT_LOGPROBS = "message.output_text.logprobs"
# OpenAI's `include` values. Only the output text's logprobs add anything here; the others name items this
# server never outputs (its tools are functions) or content it does not keep (encrypted reasoning), so they
# add nothing, as they add nothing to a response without such items on OpenAI's API.
INCLUDABLE = Literal["file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
                     "message.input_image.image_url", "computer_call_output.output.image_url",
                     "code_interpreter_call.outputs", "reasoning.encrypted_content", "message.output_text.logprobs"]
SAMPLING_EXTRAS = ("top_k", "min_p", "seed", "repetition_penalty", "min_tokens")


class ReasoningConfig(_Lenient):
    """OpenAI's `reasoning` option: its effort reaches the chat template as the chat path's reasoning_effort."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Any = None
    generate_summary: Any = None

    @field_validator("summary", "generate_summary")
    @classmethod
    def _no_summaries(cls, v: Any, info: ValidationInfo) -> Any:
        return refuse_if_set(v, info.field_name, "reasoning summaries are not written; a thinking model's reasoning "
                             "comes whole as the reasoning item's reasoning_text")


class ResponsesRequest(_Lenient):
    model: str = Field(min_length=1)
    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    store: bool | None = None
    text: TextConfig = Field(default_factory=TextConfig)
    metadata: dict[str, str] | None = None
    user: str | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's constraint parameter, as on the chat path
    # vLLM's sampling extras, as the chat path takes them
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    min_tokens: int | None = Field(default=None, ge=0)
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    truncation: Literal["disabled"] | None = None
    previous_response_id: str | None = Field(default=None, min_length=1)
    conversation: Any = None
    reasoning: ReasoningConfig | None = None
    background: bool = False
    prompt: Any = None
    include: list[INCLUDABLE] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and OUTPUT_LOGPROBS not in (info.data.get("include") or ()):
            raise ValueError(f"top_logprobs needs include: [{OUTPUT_LOGPROBS!r}]")
        return v

    @property
    def output_logprobs(self) -> bool:
        return OUTPUT_LOGPROBS in (self.include or ())

    @field_validator(*_REFUSED)
    @classmethod
    def _refused(cls, v: Any, info: ValidationInfo) -> Any:
        why = "continue a stored response with previous_response_id, or send the whole conversation as input" \
            if info.field_name == "conversation" else None
        return refuse_if_set(v, info.field_name, why)

    @field_validator("tools", mode="before")
    @classmethod
    def _functions_only(cls, v: Any) -> Any:
        for tool in v if isinstance(v, list) else []:  # anything else: the type check below refuses it
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"only function tools are supported, not {kind!r}")
        return v

    def items(self) -> list[InputMessage | FunctionCallItem | FunctionCallOutput]:
        return [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input

    def chat_body(self, history: list[dict] = ()) -> dict:
        """The same request as a chat completion (what the engine path serves), after the input items of the
        stored conversation it continues (`history`; this request's instructions come first, an earlier
        response's are not carried over, as OpenAI's are not): function calls of earlier turns become the
        assistant turn's tool_calls (after its message, when one precedes them), their outputs tool turns."""
        messages: list[dict] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        for item in [*INPUT_ITEMS.validate_python(list(history)), *self.items()]:
            if isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                continue
            if isinstance(item, FunctionCallOutput):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
                continue
            if isinstance(item.content, str):
                messages.append({"role": item.role, "content": item.content})
                continue
            parts = [{"type": "text", "text": p.text} if isinstance(p, InputText)
                     else {"type": "image_url", "image_url": {"url": p.image_url, "detail": p.detail}}
                     for p in item.content]
            messages.append({"role": item.role, "content": parts})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature,
                                "top_p": self.top_p, "max_tokens": self.max_output_tokens, "user": self.user,
                                "parallel_tool_calls": self.parallel_tool_calls}
        if self.structured_outputs is not None:
            body["structured_outputs"] = self.structured_outputs
        if self.output_logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        body.update({name: value for name in SAMPLING_EXTRAS if (value := getattr(self, name)) is not None})
        if self.reasoning is not None and self.reasoning.effort is not None:
            body["reasoning_effort"] = self.reasoning.effort
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        fmt = self.text.format
        if fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif fmt.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name or "response", "schema": fmt.schema_ or {}, "strict": fmt.strict}}
        return body


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)
    logprobs: list = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class OutputReasoning(BaseModel):
    """A thinking model's reasoning (with --reasoning-parser), before the message, as OpenAI's reasoning item."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    summary: list = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict = Field(default_factory=lambda: {"reasoning_tokens": 0})


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    model: str
    output: list[OutputReasoning | OutputMessage | OutputFunctionCall] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    incomplete_details: dict | None = None
    error: dict | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = True
    tool_choice: str | dict = "auto"
    tools: list = Field(default_factory=list)
    text: dict = Field(default_factory=lambda: {"format": {"type": "text"}})
    metadata: dict = Field(default_factory=dict)
    store: bool = False
    background: bool = False
    previous_response_id: str | None = None
    reasoning: dict | None = None
    truncation: str = "disabled"
    top_logprobs: int | None = None


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class InputItemList(BaseModel):
    """A stored response's input items (`GET /v1/responses/{id}/input_items`), one page."""

    object: Literal["list"] = "list"
    data: list[dict]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
