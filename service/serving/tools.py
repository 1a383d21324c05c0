"""Tool calls: what a request's `tools` / `tool_choice` make of the prompt and the output.

- `auto`: the model's own output decides; the engine's tool-call parser (vLLM's, in the model's format) finds
  the calls in it, whole or while streaming.
- `required` or a named function: the output is constrained so that it always parses and its arguments
  validate against the function's parameters. The prompt ends with the model's own call opening (e.g.
  Qwen's `<tool_call>\\n`) and the output is constrained to the JSON object `{"name", "arguments"}` that the
  model's format puts there, so the model writes the call the way it was trained to. (vLLM's server
  constrains to a bare JSON list instead; on the tiny model its named calls came back with `null` arguments.)
  With `required` that is one call, whatever `parallel_tool_calls` says. Streamed, the call's name comes
  first and its arguments follow in fragments as they are generated, as in `auto`.
- `none` or no tools: the tools are not rendered and nothing is parsed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from service.engine.base import ParsedToolCall, ToolCallDelta, ToolCallParser
from service.protocol.chat import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)

ANY_OBJECT = {"type": "object"}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def forced_call_schema(req: ChatCompletionRequest) -> dict:
    """The JSON schema of the one call a required or named tool_choice allows."""
    def one(tool) -> dict:
        return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": tool.function.name},
                               "arguments": tool.function.parameters or ANY_OBJECT}}

    if req.tool_mode == "named":
        return one(next(t for t in req.tools if t.function.name == req.tool_choice.function.name))
    return {"anyOf": [one(t) for t in req.tools]} if len(req.tools) > 1 else one(req.tools[0])


def forced_call(text: str) -> ParsedToolCall | None:
    """The call a constrained output holds (None when it was cut short, e.g. by max_tokens)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return ParsedToolCall(name=obj["name"], arguments=json.dumps(obj["arguments"], ensure_ascii=False))


def cut_short_call(parser: ToolCallParser, text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """A forced call cut short (by max_tokens) as its stream ends: the call with the arguments written so far
    once its name is complete (as OpenAI answers a call that max_tokens cut), so that a whole answer and a
    streamed one agree."""
    calls = StreamedCalls(parser, forced=True)
    content, deltas = calls.feed(text)
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for d in deltas + calls.end():
        if d.function.name:
            names[d.index] = d.function.name
        arguments.setdefault(d.index, []).append(d.function.arguments or "")
    return content, [ParsedToolCall(name=names[i], arguments="".join(parts)) for i, parts in sorted(arguments.items())
                     if i in names]


def wire_calls(calls: list[ParsedToolCall]) -> list[ToolCall] | None:
    return [ToolCall(id=call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls] or None


@dataclass
class StreamedCalls:
    """One choice's tool calls while streaming: content and call deltas (the name first, then argument
    fragments as they are written) out of text deltas, by the engine's parser of the model's format. A
    constrained (required / named) output is the JSON after the prefilled call opening, so the parser is
    first fed that opening and then reads the output like any call the model writes itself."""

    parser: ToolCallParser
    forced: bool = False
    parallel: bool = True  # False: only the first call is sent (parallel_tool_calls: false)
    called: bool = False
    ids: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.forced:
            self.parser.feed(self.parser.call_prefix)

    def feed(self, delta_text: str) -> tuple[str | None, list[DeltaToolCall]]:
        content, deltas = self.parser.feed(delta_text)
        return content, self._wire(deltas)

    def end(self) -> list[DeltaToolCall]:
        return self._wire(self.parser.rest())

    def _wire(self, deltas: list[ToolCallDelta]) -> list[DeltaToolCall]:
        out = []
        for d in deltas:
            if d.index > 0 and not self.parallel:
                continue
            first = d.index not in self.ids
            if first and not d.name:
                continue  # a call is sent once its name is known (a call cut short before it is none)
            self.called = True
            if first:
                self.ids[d.index] = call_id()
            out.append(DeltaToolCall(index=d.index, id=self.ids[d.index] if first else None,
                                     type="function" if first else None,
                                     function=DeltaFunctionCall(name=d.name, arguments=d.arguments)))
        return out
