"""Tool calls in the model's own format, parsed by vLLM's tool parsers (`hermes` for Qwen3 / Qwen3-VL's
`<tool_call>{"name": ..., "arguments": ...}</tool_call>`; any parser vLLM registers can be named).

A parser is made per request (vLLM's streaming parsers keep state) and fed the completion text; it returns
the content outside the calls and the calls themselves, or, while streaming, content and call deltas.
"""

from __future__ import annotations

from service.engine.base import ParsedToolCall, ToolCallDelta


def registered(manager, get, name: str, what: str):
    """The class `name` of a vLLM parser registry (`get` is its lookup); ValueError naming the known ones."""
    try:
        return get(name)
    except KeyError:
        known = ", ".join(sorted(manager.list_registered()))
        raise ValueError(f"unknown {what} '{name}' (vLLM has: {known})") from None


def parser_class(name: str):
    """vLLM's tool parser of that name."""
    from vllm.tool_parsers import ToolParserManager

    return registered(ToolParserManager, ToolParserManager.get_tool_parser, name, "tool-call parser")


class VLLMToolCallParser:
    def __init__(self, name: str, tokenizer):
        self._parser = parser_class(name)(tokenizer)
        self._text = ""
        start = getattr(self._parser, "tool_call_start_token", None)  # the JSON-in-tags formats (hermes)
        self.call_prefix = f"{start}\n" if start else ""

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content, calls) of a whole completion."""
        info = self._parser.extract_tool_calls(text, None)
        if not info.tools_called:
            return text, []
        return info.content, [ParsedToolCall(name=c.function.name, arguments=c.function.arguments)
                              for c in info.tool_calls]

    def feed(self, delta_text: str) -> tuple[str | None, list[ToolCallDelta]]:
        """(new content, call deltas) after `delta_text` more of the completion."""
        previous, self._text = self._text, self._text + delta_text
        message = self._parser.extract_tool_calls_streaming(previous, self._text, delta_text, [], [], [], None)
        if message is None:
            return None, []
        deltas = [ToolCallDelta(index=d.index, name=d.function.name if d.function else None,
                                arguments=d.function.arguments if d.function else None)
                  for d in (message.tool_calls or [])]
        return message.content or None, deltas

    def rest(self) -> list[ToolCallDelta]:
        """Arguments of the last call parsed but not streamed yet (at the end of the completion)."""
        remaining = self._parser.get_remaining_unstreamed_args()
        if not remaining or not self._parser.prev_tool_call_arr:
            return []
        return [ToolCallDelta(index=len(self._parser.prev_tool_call_arr) - 1, arguments=remaining)]
