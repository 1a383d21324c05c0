"""Chat completions: request -> engine request -> OpenAI response or SSE stream.

Everything that can be refused is refused before the engine sees the request (model, images, prompt
length); the first engine output is awaited before a stream's headers are sent, so engine-side
validation errors still get a proper HTTP status. A stream that fails later ends with an OpenAI-shaped
error event and `data: [DONE]` (counted by the error's status; an unexpected exception is a 5xx). A stream
whose client goes away aborts its engine request (`finally:` in the engine backend and `generation.py`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from service.adapters.registry import AdapterRegistry, Revision
from service.auth import OPEN, Tenant
from service.engine.base import Delta, Engine, GenerationRequest
from service.errors import BadRequest
from service.limits import FairShare, Quotas
from service.media import MediaLimits, load_image, load_video_bytes
from service.metrics import Metrics
from service.protocol.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ResponseMessage,
    Usage,
)
from service.serving.generation import Generation, sse_error
from service.serving.jsontext import JsonStringEscaper, valid_json_text
from service.serving.render import ChatRenderer
from service.serving.sampling import refuse_prompt_logprobs, sampling_for, wire_logprobs, wire_prompt_logprobs
from service.serving.sse import DONE, sse_event
from service.serving.tools import StreamedCalls, cut_short_call, forced_call, forced_call_schema, wire_calls
from service.serving.totals import Prepared, Totals

# Prompts up to this many characters are tokenized on the event loop (for counting); longer ones in a thread.
INLINE_TOKENIZE_CHARS = 16_384


@dataclass(frozen=True)
class Rendered:
    prompt: str
    ids: list[int]  # the prompt's token ids, one placeholder per image and video
    images: list
    image_tokens: list[int]  # each image's tokens
    videos: list
    video_ids: list[list[int]]  # each video's tokens
    prompt_tokens: int  # the prompt's length once each image and video is expanded
    image_sizing: dict[str, int] | None = None  # the request's pixel budget for its images (resolved), if any


@dataclass(frozen=True)
class VideoSampling:
    max_videos: int = 1
    fps: float = 2.0
    max_frames: int = 32


class ChatService(Generation):
    def __init__(self, engine: Engine, registry: AdapterRegistry, renderer: ChatRenderer, limits: MediaLimits,
                 max_images: int, metrics: Metrics, max_pending: int = 64, retry_after_s: int = 5,
                 video: VideoSampling | None = None, quotas: Quotas | None = None, fair: FairShare | None = None,
                 cache_per_tenant: bool = True):
        super().__init__(engine, registry, metrics, max_pending, retry_after_s, quotas, fair, cache_per_tenant)
        self.renderer = renderer
        self.limits = limits
        self.max_images = max_images
        self.video = video or VideoSampling()

    async def handle(self, req: ChatCompletionRequest, tenant: Tenant = OPEN):
        """A whole request: admission, preparation, then a completion or an SSE body iterator."""
        stream = (lambda prep: ChatStream(self, prep, req.include_usage)) if req.stream else None
        return await self.serve(req.model, lambda: self.prepare(req, tenant), stream, self.completion, tenant)

    async def prepare(self, req: ChatCompletionRequest, tenant: Tenant = OPEN, *,
                      request_id: str | None = None, kind: str = "chat completion") -> Prepared:
        """The engine request for `req` (the Responses API prepares its requests here too, as `kind`)."""
        revision = await self.resolve(req.model, tenant)
        try:
            prep = await self._prepare(req, revision, request_id or f"chatcmpl-{uuid.uuid4().hex}")
            prep.kind = kind
            return prep
        except BaseException:
            self.registry.release(revision)
            raise

    async def render(self, req: ChatCompletionRequest) -> Rendered:
        """The request's prompt as the engine will take it: its media fetched and decoded (limits checked), the
        messages rendered through the chat template (a forced tool call's opening prefilled), tokenized, and
        its length with every image and video expanded."""
        n_images, n_videos = req.image_count(), req.video_count()
        if n_images > self.max_images:
            raise BadRequest(f"{n_images} images in one request; the limit is {self.max_images}", param="messages")
        if n_videos > self.video.max_videos:
            raise BadRequest(f"{n_videos} videos in one request; the limit is {self.video.max_videos}",
                             param="messages")
        urls = [part.image_url.url for m in req.messages for part in m.images()]
        started = time.perf_counter()
        sizing = None
        if req.mm_processor_kwargs is not None:
            if n_videos:
                raise BadRequest("mm_processor_kwargs sizes images; a video's frames are sized by the server",
                                 param="mm_processor_kwargs")
            sizing = self.renderer.image_sizing(req.mm_processor_kwargs.min_pixels, req.mm_processor_kwargs.max_pixels)
        images = list(await asyncio.gather(*(load_image(u, self.limits) for u in urls))) if urls else []
        image_tokens = [self.renderer.image_tokens(*im.size, sizing) for im in images]
        if urls:
            self.metrics.image_seconds.observe(time.perf_counter() - started)
        videos, video_ids = await self._videos(req) if n_videos else ([], [])
        # A forced call starts with the call opening the model writes itself (see serving/tools.py).
        prefill = self.engine.tool_call_parser().call_prefix if req.forced_tools else ""
        prompt = self.renderer.render(req.messages, tools=req.tools if req.tool_mode != "none" else None,
                                      prefill=prefill, add_generation_prompt=req.add_generation_prompt,
                                      continue_final_message=req.continue_final_message,
                                      template_kwargs=req.template_variables, documents=req.documents)
        if len(prompt) <= INLINE_TOKENIZE_CHARS:  # under a millisecond: cheaper than a thread hand-off
            ids = self.renderer.tokenize(prompt)
        else:
            ids = await asyncio.to_thread(self.renderer.tokenize, prompt)
        prompt_tokens = self.renderer.prompt_tokens(ids, image_tokens, [len(v) for v in video_ids])
        return Rendered(prompt=prompt, ids=ids, images=images, image_tokens=image_tokens, videos=videos,
                        video_ids=video_ids, prompt_tokens=prompt_tokens, image_sizing=sizing if images else None)

    async def _prepare(self, req: ChatCompletionRequest, revision: Revision | None, request_id: str) -> Prepared:
        adapter = revision.key if revision is not None else None
        if req.prompt_logprobs is not None:
            refuse_prompt_logprobs(revision, req.model, "prompt_logprobs")
        r = await self.render(req)
        wanted = req.output_limit
        room = self.room_for(r.prompt_tokens, wanted, "messages", " (images and videos included)")
        forced = forced_call_schema(req) if req.forced_tools else None
        sampling = sampling_for(req, wanted or room, self.renderer.vocab_size, forced_tool_schema=forced)
        # A thinking model's reasoning is split out (a forced call skips it: the call is the whole output).
        template_kwargs = req.template_variables
        thinking = not req.forced_tools and self.engine.reasoning_parser(template_kwargs) is not None
        gen = GenerationRequest(request_id=request_id, prompt=r.prompt, prompt_token_ids=r.ids, images=r.images,
                                videos=r.videos, sampling=sampling, adapter=adapter, cache_salt=req.cache_salt,
                                image_sizing=r.image_sizing,
                                reasoning=template_kwargs if thinking else None)
        return Prepared(request=gen, model=req.model, revision=revision, image_tokens=sum(r.image_tokens),
                        video_tokens=sum(len(v) for v in r.video_ids), prompt_tokens=r.prompt_tokens,
                        adapter_label=self.adapter_label(revision),
                        tool_mode=req.tool_mode, parallel_tool_calls=req.parallel_tool_calls,
                        include_reasoning=req.include_reasoning, return_token_ids=req.return_token_ids,
                        tokens_as_ids=req.return_tokens_as_token_ids, echo=req.echoed)

    async def _videos(self, req: ChatCompletionRequest) -> tuple[list, list[list[int]]]:
        """Each video fetched (address policy, byte cap), decoded and sampled by the engine's loader, and the
        prompt tokens it becomes found by the model's processor: blocking work, done in threads."""
        processor = self.renderer.video_processor_name
        urls = [part.video_url.url for m in req.messages for part in m.videos()]
        blobs = await asyncio.gather(*(load_video_bytes(u, self.limits) for u in urls))

        def decode(data: bytes):
            clip = self.engine.load_video(data, processor, self.video.fps, self.video.max_frames)
            return clip, self.renderer.video_ids(clip)

        decoded = await asyncio.gather(*(asyncio.to_thread(decode, b) for b in blobs))
        return [clip for clip, _ in decoded], [ids for _, ids in decoded]

    def split(self, prep: Prepared, totals: Totals, index: int) -> tuple[str | None, str | None, int | None]:
        """(reasoning, content, reasoning tokens) of one choice; no reasoning (None) unless the server splits it."""
        text = "".join(totals.text.get(index, []))
        parser = self.engine.reasoning_parser(prep.request.reasoning) if prep.request.reasoning is not None else None
        if parser is None:
            reasoning, content, tokens = None, text, None
        else:
            reasoning, content = parser.split(text, totals.token_ids.get(index, []))
            tokens = parser.reasoning_tokens()
        return reasoning, valid_json_text(content) if prep.json_output else content, tokens

    def completion(self, prep: Prepared, totals: Totals) -> ChatCompletion:
        wants_logprobs = prep.request.sampling.logprobs is not None
        choices, reasoning_tokens = [], None
        for i in range(prep.request.sampling.n):
            reasoning, content, tokens = self.split(prep, totals, i)
            if tokens is not None:
                reasoning_tokens = (reasoning_tokens or 0) + tokens
            message, finish = self.message(prep, content, totals.finish.get(i), reasoning)
            if prep.echo:
                message.content = prep.echo + (message.content or "")
            choices.append(Choice(index=i, message=message, finish_reason=finish,
                                  logprobs=(wire_logprobs(totals.logprobs.get(i, []), prep.tokens_as_ids)
                                            if wants_logprobs else None),
                                  token_ids=totals.token_ids.get(i, []) if prep.return_token_ids else None))
        return ChatCompletion(id=prep.request.request_id, created=prep.created, model=prep.model, choices=choices,
                              usage=totals.usage(reasoning_tokens),
                              prompt_token_ids=totals.prompt_token_ids if prep.return_token_ids else None,
                              prompt_logprobs=wire_prompt_logprobs(totals.prompt_logprobs,
                                                                   prep.request.sampling.prompt_logprobs))

    def message(self, prep: Prepared, text: str | None, finish: str | None,
                reasoning: str | None = None) -> tuple[ResponseMessage, str | None]:
        """The assistant message of one choice: its text, or the content and tool calls found in it."""
        calls = []
        content = text
        if prep.tool_mode == "auto" and text:
            content, calls = self.engine.tool_call_parser().parse(text)
        elif prep.forced_tools:
            call = forced_call(text or "")
            content, calls = (None, [call]) if call is not None else cut_short_call(self.engine.tool_call_parser(),
                                                                                   text or "")
        if not prep.parallel_tool_calls:
            calls = calls[:1]
        if calls and finish == "stop":
            finish = "tool_calls"
        if not prep.include_reasoning:
            reasoning = None
        return ResponseMessage(content=content, tool_calls=wire_calls(calls), reasoning_content=reasoning,
                               reasoning=reasoning), finish


def join_text(a: str | None, b: str | None) -> str | None:
    """Two optional pieces of text as one (None when both are empty)."""
    return (a or "") + (b or "") or None


class ChatStream:
    """Chat-completion chunks: the role first, content, tool-call and logprob deltas, usage last, [DONE]."""

    def __init__(self, service: ChatService, prep: Prepared, include_usage: bool):
        self.prep, self.include_usage = prep, include_usage
        self.n = prep.request.sampling.n
        self.calls = {i: StreamedCalls(service.engine.tool_call_parser(), forced=prep.forced_tools,
                                       parallel=prep.parallel_tool_calls)
                      for i in range(self.n)} if prep.tool_mode != "none" else {}
        self.thinking = {i: service.engine.reasoning_parser(prep.request.reasoning)
                         for i in range(self.n)} if prep.request.reasoning is not None else {}
        self.json = {i: JsonStringEscaper() for i in range(self.n)} if prep.json_output else {}

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None,
               prompt_token_ids: list[int] | None = None) -> str:
        p = self.prep
        return sse_event(ChatCompletionChunk(id=p.request.request_id, created=p.created, model=p.model,
                                             choices=choices, usage=usage, prompt_token_ids=prompt_token_ids))

    def start(self) -> list[str]:
        return [self._chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=self.prep.echo))
                             for i in range(self.n)])]

    def delta(self, delta: Delta) -> list[str]:
        content, reasoning, tool_calls, finish = delta.text or None, None, [], delta.finish_reason
        if (thinker := self.thinking.get(delta.index)) is not None:
            reasoning, content = thinker.feed(delta.text, delta.token_ids)
            if finish:
                held_reasoning, held_content = thinker.end()
                reasoning, content = join_text(reasoning, held_reasoning), join_text(content, held_content)
            if not self.prep.include_reasoning:
                reasoning = None
        if content and (escaper := self.json.get(delta.index)) is not None:
            content = escaper.feed(content)
        if (state := self.calls.get(delta.index)) is not None:
            if content:
                content, tool_calls = state.feed(content)
            if finish:
                tool_calls += state.end()
                finish = "tool_calls" if state.called and finish == "stop" else finish
        ids = self.prep.return_token_ids
        if not (content or reasoning or tool_calls or finish or delta.logprobs or ids and delta.token_ids):
            return []
        message = DeltaMessage(content=content, reasoning_content=reasoning, reasoning=reasoning,
                               tool_calls=tool_calls or None)
        prompt_ids = list(delta.prompt_token_ids) if ids and delta.prompt_token_ids is not None else None
        return [self._chunk([ChunkChoice(index=delta.index, finish_reason=finish, delta=message,
                                         logprobs=wire_logprobs(delta.logprobs, self.prep.tokens_as_ids),
                                         token_ids=list(delta.token_ids) if ids else None)],
                            prompt_token_ids=prompt_ids)]

    def end(self, totals: Totals) -> list[str]:
        if not self.include_usage:
            return [DONE]
        reasoning_tokens = sum(t.reasoning_tokens() for t in self.thinking.values()) if self.thinking else None
        return [self._chunk([], usage=totals.usage(reasoning_tokens)), DONE]

    def error(self, body: dict) -> list[str]:
        return sse_error(body)
