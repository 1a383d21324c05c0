"""Chat rendering: OpenAI messages -> the model's own chat template, with one vision placeholder per image.

The template comes from the served model's processor (Qwen3-VL's, or the tiny kit's), so the prompt is
exactly what the model was trained on; vLLM expands each `<|image_pad|>` to the image's token count.
The prompt length, image tokens included, is computed here so that an over-long request is refused
with a clear 400 before it reaches the engine.
"""

from __future__ import annotations

import json
from typing import Any

from service.errors import BadRequest
from service.protocol.chat import ChatMessage, ImagePart, TextPart, ToolDefinition, VideoPart


def to_template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the HF chat-template structure (`developer` is treated as `system`)."""
    out = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):  # None: an assistant turn of calls only
            content: str | list[dict[str, Any]] | None = message.content
        else:
            content = []
            for part in message.content:
                if isinstance(part, TextPart):
                    content.append({"type": "text", "text": part.text})
                elif isinstance(part, ImagePart):
                    content.append({"type": "image"})
                elif isinstance(part, VideoPart):
                    content.append({"type": "video"})
            if role != "user" and all(p["type"] == "text" for p in content):
                content = "".join(p["text"] for p in content)
        entry: dict[str, Any] = {"role": role, "content": content}
        if message.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                   for c in message.tool_calls]
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


def _arguments(text: str) -> Any:
    """A call's arguments as the template expects them (an object; Qwen's template also takes the text)."""
    try:
        return json.loads(text)
    except ValueError:
        raise BadRequest(f"tool call arguments are not JSON: {text[:80]!r}", param="messages") from None


class ChatRenderer:
    """Renders prompts and counts their tokens with the served model's processor."""

    def __init__(self, processor: Any, processor_kwargs: dict[str, Any] | None = None):
        """`processor_kwargs`: the engine's own `mm_processor_kwargs` (--engine-arg), whose image pixel budget the
        engine resizes every image into, and so the counts here too."""
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_processor = getattr(processor, "image_processor", None)
        kwargs = processor_kwargs if isinstance(processor_kwargs, dict) else {}
        self.image_budget = self._server_budget(kwargs) if self.image_processor is not None else {}
        self._merge = getattr(self.image_processor, "merge_size", 1) or 1
        self._image_pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>") if self.image_processor else None
        self.vocab_size = len(self.tokenizer)
        self.video_processor = getattr(processor, "video_processor", None)
        # The engine's video budget, where its mm_processor_kwargs change the processor's (None: the processor's)
        video_budget = self._server_budget(kwargs, videos=True) if self.video_processor is not None else None
        self._video_size = (None if video_budget is None or video_budget == self._server_budget({}, videos=True)
                            else {"shortest_edge": video_budget["min_pixels"],
                                  "longest_edge": video_budget["max_pixels"]})
        self._video_pad = self.tokenizer.convert_tokens_to_ids("<|video_pad|>") if self.video_processor else None

    @classmethod
    def from_pretrained(cls, model: str, processor_kwargs: dict[str, Any] | None = None) -> ChatRenderer:
        from transformers import AutoProcessor

        return cls(AutoProcessor.from_pretrained(model), processor_kwargs)

    def _server_budget(self, kwargs: dict[str, Any], videos: bool = False) -> dict[str, int]:
        """The pixel budget the engine applies to every image (or video): the processor's (`size`), with the
        engine's `mm_processor_kwargs` over it as vLLM merges them (flat, or under `images_kwargs` /
        `videos_kwargs`, which wins)."""
        size = (self.video_processor if videos else self.image_processor).size
        budget = {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
        for scope in (kwargs, kwargs.get("videos_kwargs" if videos else "images_kwargs") or {}):
            given = scope.get("size") or {}
            for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
                value = scope.get(key, given.get(edge))
                if value is not None:
                    budget[key] = int(value)
        return budget

    @property
    def supports_tools(self) -> bool:
        """Whether the model's chat template renders tool definitions."""
        return "tools" in self._template

    @property
    def supports_documents(self) -> bool:
        """Whether the model's chat template renders documents (vLLM's `documents`, for retrieval)."""
        return "documents" in self._template

    @property
    def _template(self) -> str:
        return getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", "") or ""

    def render(self, messages: list[ChatMessage], tools: list[ToolDefinition] | None = None,
               prefill: str = "", add_generation_prompt: bool = True, continue_final_message: bool = False,
               template_kwargs: dict[str, Any] | None = None, documents: list[dict[str, str]] | None = None) -> str:
        """The prompt for `messages` (and `tools`, if any), ending with the assistant's turn and `prefill`, or
        with the last (assistant) message left open to be continued."""
        kwargs = dict(template_kwargs or {})  # e.g. Qwen3's enable_thinking
        if tools:
            if not self.supports_tools:
                raise BadRequest("this model's chat template does not render tools", param="tools")
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in tools]
        if documents:
            if not self.supports_documents:
                raise BadRequest("this model's chat template does not render documents", param="documents")
            kwargs["documents"] = documents
        try:
            prompt = self.processor.apply_chat_template(
                to_template_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **kwargs
            )
        except BadRequest:
            raise
        except Exception as exc:  # a template may reject e.g. a role order it does not support
            raise BadRequest(f"messages could not be rendered with the model's chat template: {exc}") from None
        return prompt + prefill

    def image_sizing(self, min_pixels: int | None, max_pixels: int | None) -> dict[str, int]:
        """A request's pixel budget for its images (vLLM's `mm_processor_kwargs`), resolved against the
        processor's: at most the server's `max_pixels` (the engine sizes its encoder budget for it), the server's
        `min_pixels` unless that is above the request's maximum."""
        if self.image_processor is None:
            raise BadRequest("this model does not accept images", param="mm_processor_kwargs")
        server_min, server_max = self.image_budget["min_pixels"], self.image_budget["max_pixels"]
        top = max_pixels if max_pixels is not None else server_max
        if top > server_max:
            raise BadRequest(f"mm_processor_kwargs: max_pixels {top} is above this server's {server_max} (the "
                             "engine's budget for one image); ask for fewer pixels", param="mm_processor_kwargs")
        bottom = min_pixels if min_pixels is not None else min(server_min, top)
        if bottom > top:
            raise BadRequest(f"mm_processor_kwargs: min_pixels {bottom} is above max_pixels {top}",
                             param="mm_processor_kwargs")
        return {"min_pixels": bottom, "max_pixels": top}

    def image_tokens(self, width: int, height: int, sizing: dict[str, int] | None = None) -> int:
        """The tokens an image becomes (with a request's pixel budget, `image_sizing()`, if it has one)."""
        if self.image_processor is None:
            raise BadRequest("this model does not accept images")
        try:
            return (self.image_processor.get_number_of_image_patches(height, width, sizing or self.image_budget)
                    // (self._merge**2))
        except ValueError as exc:  # e.g. Qwen's resize: an aspect ratio over 200
            raise BadRequest(f"an image of {width}x{height} pixels cannot be processed: {exc}",
                             param="image_url") from None

    def tokenize(self, prompt: str) -> list[int]:
        """The prompt's token ids, as the engine would tokenize the text (handed to it, so it is done once)."""
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def text_tokens(self, ids: list[int]) -> int:
        """Tokens of a raw text prompt (completions), which must not hold vision placeholders."""
        if self._image_pad is not None and self._image_pad in ids:
            raise BadRequest("the prompt holds image placeholders; send images through /v1/chat/completions",
                             param="prompt")
        return len(ids)

    @property
    def video_processor_name(self) -> str:
        if self.video_processor is None:
            raise BadRequest("this model does not accept videos", param="messages")
        return type(self.video_processor).__name__

    def video_ids(self, clip) -> list[int]:
        """The tokens one decoded video becomes in the prompt (its frames' tokens and the processor's
        timestamps), as the engine will expand it: from the frames' count and size by the processor's own
        arithmetic (Qwen3-VL's `get_num_of_video_patches` and `replace_video_token`), so that the frames are
        processed once, by the engine; other processors run whole."""
        try:
            return self._video_ids(clip)
        except ValueError as exc:  # e.g. Qwen's resize: an aspect ratio over 200
            height, width = (int(n) for n in clip.frames.shape[1:3])
            raise BadRequest(f"a video of {width}x{height} pixels cannot be processed: {exc}",
                             param="video_url") from None

    def _video_ids(self, clip) -> list[int]:
        processor, videos = self.processor, self.video_processor
        if not (hasattr(processor, "replace_video_token") and hasattr(videos, "get_num_of_video_patches")):
            return self._video_ids_processed(clip)
        import torch
        from transformers.video_utils import VideoMetadata

        frames, height, width = (int(n) for n in clip.frames.shape[:3])
        patches = videos.get_num_of_video_patches(frames, height, width,
                                                  {"size": self._video_size} if self._video_size else None)
        groups = -(-frames // videos.temporal_patch_size)
        fields = VideoMetadata.__dataclass_fields__
        metadata = VideoMetadata(**{k: v for k, v in clip.metadata.items() if k in fields})
        grid = torch.tensor([[groups, patches // groups, 1]])  # frames' patches per group: all replace_ reads
        placeholder = processor.replace_video_token({"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
        return self.tokenizer(placeholder, add_special_tokens=False)["input_ids"]

    def _video_ids_processed(self, clip) -> list[int]:
        """The ids from the whole processor (frames resized and patched)."""
        metadata = {k: v for k, v in clip.metadata.items() if k != "do_sample_frames"}
        snippet = "<|vision_start|><|video_pad|><|vision_end|>"
        sized = {"size": self._video_size} if self._video_size else {}
        out = self.processor(text=[snippet], videos=[clip.frames], video_metadata=[metadata], do_sample_frames=False,
                             **sized)
        return list(out["input_ids"][0][1:-1])  # the placeholder's expansion, without the start and end around it

    def expand(self, ids: list[int], image_tokens: list[int], video_ids: list[list[int]]) -> list[int]:
        """The prompt's ids as the engine sees them: each image placeholder repeated for the image's tokens,
        each video placeholder replaced by the video's ids (what vLLM's /tokenize answers)."""
        images, videos = iter(image_tokens), iter(video_ids)
        out: list[int] = []
        for i in ids:
            if i == self._image_pad and self._image_pad is not None:
                out += [i] * next(images)
            elif i == self._video_pad and self._video_pad is not None:
                out += next(videos)
            else:
                out.append(i)
        return out

    def prompt_tokens(self, ids: list[int], image_tokens: list[int], video_tokens: list[int] = ()) -> int:
        """The prompt's length once the engine expands each image and video placeholder (`image_tokens`: each
        image's, from `image_tokens()`)."""
        placeholders = sum(1 for i in ids if i == self._image_pad) if self._image_pad is not None else 0
        if placeholders != len(image_tokens):
            raise BadRequest(f"the chat template produced {placeholders} image placeholders for "
                             f"{len(image_tokens)} images")
        video_pads = sum(1 for i in ids if i == self._video_pad) if self._video_pad is not None else 0
        if video_pads != len(video_tokens):
            raise BadRequest(f"the chat template produced {video_pads} video placeholders for "
                             f"{len(video_tokens)} videos")
        return len(ids) - placeholders - video_pads + sum(image_tokens) + sum(video_tokens)
