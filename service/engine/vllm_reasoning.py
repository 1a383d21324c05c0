"""A thinking model's reasoning split from its answer by vLLM's reasoning parsers (`qwen3` for Qwen3 /
Qwen3-VL thinking models' `<think>...</think>`; any parser vLLM registers can be named).

One parser per request and choice (vLLM's streaming parsers keep state), made with the request's chat
template variables (Qwen3's `enable_thinking: false` means no reasoning). The same parser, made for the
engine's structured-output manager (`structured_outputs_config.reasoning_parser`), holds a constraint back
until the reasoning has ended, as `vllm serve --reasoning-parser` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.engine.vllm_tools import registered


def reasoning_parser_class(name: str):
    """vLLM's reasoning parser of that name."""
    from vllm.reasoning import ReasoningParserManager

    return registered(ReasoningParserManager, ReasoningParserManager.get_reasoning_parser, name, "reasoning parser")


class VLLMReasoningParser:
    def __init__(self, name: str, tokenizer, template_kwargs: dict[str, Any]):
        self._parser = reasoning_parser_class(name)(tokenizer, chat_template_kwargs=dict(template_kwargs))
        self._text = ""
        self._ids: list[int] = []
        self._count: int | None = None

    def reasoning_ended(self, prompt_token_ids: Sequence[int]) -> bool:
        """Whether the prompt already closed the reasoning (e.g. `enable_thinking: false`)."""
        return bool(self._parser.is_reasoning_end(list(prompt_token_ids)))

    def split(self, text: str, token_ids: Sequence[int]) -> tuple[str | None, str | None]:
        reasoning, content = self._parser.extract_reasoning(text, None)
        self._count = self._parser.count_reasoning_tokens(list(token_ids))
        return reasoning or None, content or None

    def feed(self, delta_text: str, delta_ids: Sequence[int]) -> tuple[str | None, str | None]:
        previous, previous_ids = self._text, list(self._ids)
        self._text += delta_text
        self._ids.extend(delta_ids)
        message = self._parser.extract_reasoning_streaming(previous, self._text, delta_text, previous_ids,
                                                           self._ids, list(delta_ids))
        return (message.reasoning or None, message.content or None) if message is not None else (None, None)

    def end(self) -> tuple[str | None, str | None]:
        message = self._parser.finish_streaming()
        return (message.reasoning or None, message.content or None) if message is not None else (None, None)

    def reasoning_tokens(self) -> int:
        if self._count is not None:
            return self._count
        return self._parser.count_reasoning_tokens(self._ids)
