"""What every generating request shares on the wire (pure pydantic): the model, streaming, sampling, the
output constraint (OpenAI's `response_format` or vLLM's `structured_outputs`, one of them), logit_bias, and
vLLM's extra sampling parameters (those it serves passed on as vLLM's server passes them, the others refused by
name)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def refuse_if_set(value: Any, field: str, why: str | None = None) -> Any:
    """For fields accepted only to be refused by name (a clear 400 rather than silently ignored)."""
    if value not in (None, False, []):
        raise ValueError(f"'{field}': {why}" if why else f"'{field}' is not supported by this server")
    return value


MAX_TOP_LOGPROBS = 20  # alternatives per position (OpenAI's top_logprobs bound)
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's bound on logprob_token_ids


class StreamOptions(_Lenient):
    include_usage: bool = False


class JsonSchemaFormat(_Lenient):
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a 'json_schema' response_format needs its json_schema")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's structured-output constraints (`extra_body={"structured_outputs": {...}}`), one at a time."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)
    json_object: Literal[True] | None = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self

    def constraint(self) -> tuple[str, Any]:
        for kind in ("json_", "regex", "choice", "grammar", "json_object"):
            value = getattr(self, kind)
            if value is not None:
                return kind.rstrip("_"), (None if kind == "json_object" else value)
        raise AssertionError("validated to hold one constraint")


# vLLM's extra request parameters that this server does not serve, each with why or what to send instead;
# refused by name when set to anything but their inert default (vLLM's server honours them, so ignoring one
# would answer something else than was asked).
VLLM_REFUSED: dict[str, tuple[tuple, str]] = {
    "use_beam_search": ((False,), "beam search is not served; sample n answers instead"),
    "length_penalty": ((1, 1.0), "it applies to beam search, which is not served"),
    "chat_template": ((), "every request is rendered by the model's own chat template (a template per request "
                          "would run the client's code on the server)"),
    "media_io_kwargs": ((), "images and videos are fetched and decoded by the server's loaders, under its limits "
                            "(a video's frames: --video-fps, --video-max-frames)"),
    "priority": ((0,), "a request's priority is its tenant's class in the keys file"),
    "request_id": ((), "send it as the X-Request-ID header, which every answer and log line carries"),
    "vllm_xargs": ((), "not served"),
    "kv_transfer_params": ((), "not served"),
    "thinking_token_budget": ((), "not served"),
    **{name: ((), "vLLM's structured_outputs replaced the guided_* parameters: send "
                  f"structured_outputs: {{\"{kind}\": ...}}")
       for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar"))},
    "guided_decoding_backend": ((), "the structured-output backend is the server's (--structured-outputs-backend)"),
    "guided_whitespace_pattern": ((), "compact JSON unless the server runs with --structured-outputs-any-whitespace"),
}


class ImageSizing(BaseModel):
    """vLLM's `mm_processor_kwargs` as Qwen-VL's image processor takes them per request: the pixel budget an
    image is resized into (`min_pixels` .. `max_pixels`, each image keeping its aspect ratio), and so its token
    count. Flat, as vLLM's server takes them, or under `images_kwargs`; other settings are refused by name."""

    model_config = ConfigDict(extra="forbid")
    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)

    @classmethod
    def from_kwargs(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v  # None, or the type error pydantic names
        scoped = v.get("images_kwargs")
        flat = {k: value for k, value in v.items() if k != "images_kwargs"}
        if isinstance(scoped, dict) and flat:
            raise ValueError("send the pixel budget flat or under images_kwargs, not both")
        given = scoped if isinstance(scoped, dict) else flat
        other = sorted(set(given) - {"min_pixels", "max_pixels"})
        if other:
            raise ValueError(f"{', '.join(other)}: only an image's min_pixels and max_pixels are served per request "
                             "(the processor's other settings are the server's)")
        if not given:
            return None
        for key, value in given.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} is a whole number of pixels (at least 1), not {value!r}")
        sizing = cls(**given)
        if sizing.min_pixels and sizing.max_pixels and sizing.min_pixels > sizing.max_pixels:
            raise ValueError(f"min_pixels {sizing.min_pixels} is above max_pixels {sizing.max_pixels}")
        return sizing


# A request's `mm_processor_kwargs` as the chat path and /tokenize take it
ImageSizingKwargs = Annotated[ImageSizing | None, BeforeValidator(ImageSizing.from_kwargs)]


def refuse_vllm_extra(value: Any, field: str) -> Any:
    inert, why = VLLM_REFUSED[field]
    if value is None or value in inert or value == {} or value == []:
        return value
    raise ValueError(f"'{field}' is not supported by this server: {why}")


class SamplingRequest(_Lenient):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extra sampling parameters, as its server takes them (its SamplingParams)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=64)
    bad_words: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, max_length=64)
    allowed_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's: the answer carries the prompt's token ids (images and videos expanded, as the engine saw them) and
    # each choice's generated ids; streamed, the ids of each chunk's tokens
    return_token_ids: bool = False
    # vLLM's: each token in logprobs (and its alternatives) as "token_id:N", for tokens whose text is no whole
    # character (a byte of a multi-byte one) and so cannot be told apart by their text
    return_tokens_as_token_ids: bool = False
    # vLLM's: the prompt's own tokens with their logprobs and this many alternatives each (whole answers only),
    # as its server shapes them (see PromptLogprob)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM's: with logprobs, each token's alternatives are these tokens, in this order (e.g. a classifier's
    # labels), in place of the most likely ones
    logprob_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1,
                                                                        max_length=MAX_LOGPROB_TOKEN_IDS)
    # vLLM's: requests share cached prompt prefixes only with requests of the same salt (e.g. one per end user);
    # within the tenant's own salt when the cache is per tenant (--prefix-cache-per-tenant)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    use_beam_search: Any = None
    length_penalty: Any = None
    # vLLM's: keep only this many of the prompt's tokens (-1: the context length), cut from the left (the prompt's
    # start, vLLM's default) or the right; served for completions' text prompts (chat refuses it: see there)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    chat_template: Any = None
    # vLLM's: the image processor's settings for this request; an image's pixel budget (see ImageSizing)
    mm_processor_kwargs: ImageSizingKwargs = None
    media_io_kwargs: Any = None
    priority: Any = None
    request_id: Any = None
    vllm_xargs: Any = None
    kv_transfer_params: Any = None
    thinking_token_budget: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None

    @field_validator(*VLLM_REFUSED)
    @classmethod
    def _vllm_refused(cls, v: Any, info: ValidationInfo) -> Any:
        return refuse_vllm_extra(v, info.field_name)

    @field_validator("prompt_logprobs", mode="before")
    @classmethod
    def _prompt_logprobs(cls, v: Any, info: ValidationInfo) -> Any:
        if v == -1:  # vLLM's "the whole vocabulary at every position"
            raise ValueError(f"-1 (the whole vocabulary at every position) is not served: ask for up to "
                             f"{MAX_TOP_LOGPROBS} alternatives")
        if v is not None and info.data.get("stream"):
            raise ValueError("the prompt's logprobs are sent in whole answers only, not when streaming (as vLLM's "
                             "server answers)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (v or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys are token ids, not {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values lie in [-100, 100]; token {token} has {bias}")
        return v

    @field_validator("structured_outputs")
    @classmethod
    def _one_constraint(cls, v: StructuredOutputs | None, info: ValidationInfo) -> StructuredOutputs | None:
        fmt = info.data.get("response_format")
        if v is not None and fmt is not None and fmt.type != "text":
            raise ValueError("send one of response_format and structured_outputs")
        return v

    def constraint(self) -> tuple[str, Any, str] | None:
        """(kind, spec, the request field it came from) of the output constraint, or None."""
        if self.structured_outputs is not None:
            return (*self.structured_outputs.constraint(), "structured_outputs")
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return "json_object", None, "response_format"
        return "json", fmt.json_schema.schema_, "response_format"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def tool_mode(self) -> str:
        return "none"

    @property
    def top_logprobs_wanted(self) -> int | None:
        return None


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # the prompt's tokens served from the prefix cache (OpenAI's field)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None  # with a reasoning parser
    prompt_tokens_details: PromptTokensDetails | None = None


class PromptLogprob(BaseModel):
    """One token at one prompt position, as vLLM's server sends `prompt_logprobs`: a map per position from token
    id to this (the prompt's own token, with its rank in the vocabulary, and the `prompt_logprobs` most likely
    tokens, ranks 1..k); the first position, which nothing precedes, is null."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]
