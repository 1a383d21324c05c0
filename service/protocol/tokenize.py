"""vLLM's `/tokenize` and `/detokenize` wire models (pure pydantic), as vLLM's server takes and answers them.

`/tokenize` takes a text `prompt` or chat `messages` (images and videos too, with `tools`,
`add_generation_prompt`, `continue_final_message` and `chat_template_kwargs` as a chat completion takes them)
and answers the prompt's token ids as the engine will see them (each image and video expanded), their
`count`, the model's `max_model_len` and, on request, the token strings. An image's pixel budget
(`mm_processor_kwargs`) is taken as the chat path takes it; vLLM's `chat_template` and `media_io_kwargs` are
refused by name, as on the chat path.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Discriminator, Field, Tag, ValidationInfo, field_validator

from service.protocol.chat import ChatMessage, ToolDefinition
from service.protocol.sampling import ImageSizingKwargs, _Lenient, refuse_vllm_extra


class TokenizePromptRequest(_Lenient):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the chat template adds what the model needs
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDefinition] | None = Field(default=None, max_length=128)
    documents: list[dict[str, str]] | None = Field(default=None, max_length=256)
    return_token_strs: bool = False
    chat_template: Any = None
    mm_processor_kwargs: ImageSizingKwargs = None  # an image's pixel budget, as the chat path takes it
    media_io_kwargs: Any = None

    @field_validator("chat_template", "media_io_kwargs")
    @classmethod
    def _refused(cls, v: Any, info: ValidationInfo) -> Any:
        return refuse_vllm_extra(v, info.field_name)


def _kind(body: Any) -> str:
    """Which body it is (a tag in angle brackets: error messages leave it out of the parameter's path)."""
    return "<chat>" if isinstance(body, dict) and "messages" in body else "<prompt>"


TokenizeRequest = Annotated[Annotated[TokenizeChatRequest, Tag("<chat>")]
                            | Annotated[TokenizePromptRequest, Tag("<prompt>")], Discriminator(_kind)]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    prompt: str
