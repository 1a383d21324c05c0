"""Chat completions: request -> engine request -> OpenAI response or SSE stream.

Everything that can be refused is refused before the engine sees the request (model, images, prompt
length); the first engine output is awaited before a stream's headers are sent, so engine-side
validation errors still get a proper HTTP status. A stream that fails later ends with an OpenAI-shaped
error event and `data: [DONE]` (counted by the error's status; an unexpected exception is a 5xx). A stream
whose client goes away aborts its engine request (`finally:` in the engine backend and here).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import anyio

from service.adapters.registry import AdapterRegistry, Revision
from service.auth import OPEN, Tenant
from service.engine.base import Delta, Engine, GenerationRequest
from service.errors import (
    APIError,
    BadRequest,
    ContextLengthExceeded,
    ModelNotFound,
    Overloaded,
    error_body,
    internal_error_body,
)
from service.media import MediaLimits, load_image
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
from service.serving.render import ChatRenderer
from service.serving.sampling import sampling_for, wire_logprobs
from service.serving.sse import DONE, sse_event, sse_json
from service.serving.tools import StreamedCalls, forced_call, forced_call_schema, wire_calls
from service.serving.totals import Prepared, Totals

logger = logging.getLogger("vlora.chat")

# Prompts up to this many characters are tokenized on the event loop (for counting); longer ones in a thread.
INLINE_TOKENIZE_CHARS = 16_384


class ChatService:
    def __init__(self, engine: Engine, registry: AdapterRegistry, renderer: ChatRenderer, limits: MediaLimits,
                 max_images: int, metrics: Metrics, max_pending: int = 64, retry_after_s: int = 5):
        self.engine = engine
        self.registry = registry
        self.renderer = renderer
        self.limits = limits
        self.max_images = max_images
        self.metrics = metrics
        self.max_pending = max_pending
        self.retry_after = str(retry_after_s)
        self.active = 0

    # admission ----------------------------------------------------------------------------------

    def admit(self) -> None:
        """Backpressure: refuse (429) rather than queue without bound."""
        if self.active >= self.max_pending:
            self.metrics.rejected.labels("overloaded").inc()
            raise Overloaded(f"the server has {self.active} requests running or waiting (limit "
                             f"{self.max_pending}); retry later", headers={"Retry-After": self.retry_after})
        self.active += 1
        self.metrics.running_requests.inc()

    def release(self) -> None:
        self.active -= 1
        self.metrics.running_requests.dec()

    def _label_for(self, model: str) -> str:
        """Metric label of a requested name that may not exist (bounded: unknown names share one)."""
        if model == self.registry.base_name:
            return "base"
        name = model.partition("@")[0]
        return self.metrics.labels(name) if self.registry.known(model) else "unknown"

    async def handle(self, req: ChatCompletionRequest, tenant: Tenant = OPEN):
        """A whole request: admission, preparation, then a completion or an SSE body iterator."""
        self.admit()
        handed_over = False
        try:
            try:
                prep = await self.prepare(req, tenant)
            except APIError as exc:
                self.metrics.count_refusal(self._label_for(req.model), exc.status)
                raise
            if req.stream:
                body = await self.open_stream(prep, req.include_usage)
                handed_over = True  # the SSE body releases the slot when it ends
                return body
            return await self.complete(prep)
        finally:
            if not handed_over:
                self.release()

    async def prepare(self, req: ChatCompletionRequest, tenant: Tenant = OPEN) -> Prepared:
        base = self.registry.base_name
        if req.model == base and not tenant.base:
            raise ModelNotFound.named(req.model)
        revision = await self.registry.resolve(req.model, tenant.may_use_adapter)
        self.registry.acquire(revision)
        try:
            return await self._prepare(req, revision)
        except BaseException:
            self.registry.release(revision)
            raise

    async def _prepare(self, req: ChatCompletionRequest, revision: Revision | None) -> Prepared:
        adapter = revision.key if revision is not None else None
        n_images = req.image_count()
        if n_images > self.max_images:
            raise BadRequest(f"{n_images} images in one request; the limit is {self.max_images}", param="messages")
        urls = [part.image_url.url for m in req.messages for part in m.images()]
        started = time.perf_counter()
        images = list(await asyncio.gather(*(load_image(u, self.limits) for u in urls))) if urls else []
        image_tokens = sum(self.renderer.image_tokens(*im.size) for im in images)
        if urls:
            self.metrics.image_seconds.observe(time.perf_counter() - started)
        mode = req.tool_mode
        prefill = ""
        if mode in ("required", "named"):
            prefill = self.engine.tool_call_parser().call_prefix  # the call opening the model writes itself
        prompt = self.renderer.render(req.messages, tools=req.tools if mode != "none" else None, prefill=prefill)
        sizes = [im.size for im in images]
        if len(prompt) <= INLINE_TOKENIZE_CHARS:  # under a millisecond: cheaper than a thread hand-off
            prompt_tokens = self.renderer.prompt_tokens(prompt, sizes)
        else:
            prompt_tokens = await asyncio.to_thread(self.renderer.prompt_tokens, prompt, sizes)
        room = self.engine.max_model_len - prompt_tokens
        wanted = req.output_limit
        if room < 1 or (wanted is not None and wanted > room):
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.engine.max_model_len} tokens; the prompt has "
                f"{prompt_tokens} tokens (images included) and {wanted or 1} were requested for the completion",
                param="messages" if room < 1 else "max_tokens",
            )
        forced = forced_call_schema(req) if mode in ("required", "named") else None
        sampling = sampling_for(req, wanted or room, self.renderer.vocab_size, forced_tool_schema=forced)
        gen = GenerationRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}", prompt=prompt, images=images,
                                sampling=sampling, adapter=adapter)
        return Prepared(request=gen, model=req.model, revision=revision, image_tokens=image_tokens,
                        adapter_label=self.metrics.labels(revision.name if revision is not None else None),
                        tool_mode=mode, parallel_tool_calls=req.parallel_tool_calls)

    def _finish(self, prep: Prepared, totals: Totals, status: str) -> None:
        self.registry.release(prep.revision)
        reasons = sorted(set(totals.finish.values())) or ["none"]
        finish_reason = ",".join(reasons)
        ttft = (totals.first_token_at - prep.started) if totals.first_token_at else None
        e2e = time.perf_counter() - prep.started
        self.metrics.observe_request(
            adapter=prep.adapter_label, status=status, finish_reason=finish_reason,
            prompt_tokens=totals.prompt_tokens, image_tokens=prep.image_tokens,
            completion_tokens=totals.completion_tokens, ttft=ttft, e2e=e2e,
        )
        itl = self.metrics.itl.labels(prep.adapter_label)
        for gap, tokens in totals.gaps:
            itl.observe(gap / tokens)
        logger.info("chat completion", extra={
            "completion_id": prep.request.request_id, "model": prep.model, "adapter": prep.adapter_label,
            "status": status, "finish_reason": finish_reason, "prompt_tokens": totals.prompt_tokens,
            "image_tokens": prep.image_tokens, "completion_tokens": totals.completion_tokens,
            "ttft_ms": round(ttft * 1000, 1) if ttft is not None else None, "e2e_ms": round(e2e * 1000, 1)})

    async def complete(self, prep: Prepared) -> ChatCompletion:
        totals = Totals()
        status = "5xx"
        try:
            async for delta in self.engine.generate(prep.request):
                totals.add(delta)
            status = "2xx"
        except APIError as exc:
            status = f"{exc.status // 100}xx"
            raise
        finally:
            self._finish(prep, totals, status)
        wants_logprobs = prep.request.sampling.logprobs is not None
        choices = []
        for i in range(prep.request.sampling.n):
            message, finish = self._message(prep, "".join(totals.text.get(i, [])), totals.finish.get(i))
            choices.append(Choice(index=i, message=message, finish_reason=finish,
                                  logprobs=wire_logprobs(totals.logprobs.get(i, [])) if wants_logprobs else None))
        return ChatCompletion(id=prep.request.request_id, created=prep.created, model=prep.model, choices=choices,
                              usage=totals.usage())

    def _message(self, prep: Prepared, text: str, finish: str | None) -> tuple[ResponseMessage, str | None]:
        """The assistant message of one choice: its text, or the content and tool calls found in it."""
        calls = []
        content: str | None = text
        if prep.tool_mode == "auto":
            content, calls = self.engine.tool_call_parser().parse(text)
        elif prep.tool_mode in ("required", "named") and (call := forced_call(text)) is not None:
            content, calls = None, [call]
        if not prep.parallel_tool_calls:
            calls = calls[:1]
        if calls and finish == "stop":
            finish = "tool_calls"
        return ResponseMessage(content=content, tool_calls=wire_calls(calls)), finish

    async def open_stream(self, prep: Prepared, include_usage: bool) -> AsyncIterator[str]:
        """Start generation and wait for its first output, then return the SSE body iterator.

        Engine errors raised before the first output propagate to the caller (a normal HTTP error)."""
        stream = self.engine.generate(prep.request)
        try:
            first = await anext(stream, None)
        except BaseException as exc:
            self._finish(prep, Totals(), f"{exc.status // 100}xx" if isinstance(exc, APIError) else "5xx")
            await stream.aclose()
            raise
        return self._sse(prep, stream, first, include_usage)

    async def _sse(self, prep: Prepared, stream: AsyncIterator[Delta], first: Delta | None,
                   include_usage: bool) -> AsyncIterator[str]:
        rid, totals, status = prep.request.request_id, Totals(), "aborted"

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            return sse_event(ChatCompletionChunk(id=rid, created=prep.created, model=prep.model, choices=choices,
                                                 usage=usage))

        n, mode = prep.request.sampling.n, prep.tool_mode
        calls = {i: StreamedCalls(mode, self.engine.tool_call_parser() if mode == "auto" else None,
                                  parallel=prep.parallel_tool_calls) for i in range(n)} if mode != "none" else {}
        try:
            yield chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(n)])
            delta = first
            while delta is not None:
                totals.add(delta)
                content, tool_calls, finish = delta.text or None, [], delta.finish_reason
                if (state := calls.get(delta.index)) is not None:
                    content, tool_calls = state.feed(delta.text)
                    if finish:
                        tool_calls += state.end()
                        content = (content or "") + (state.leftover_content() or "") or None
                        finish = "tool_calls" if state.called and finish == "stop" else finish
                if content or tool_calls or finish or delta.logprobs:
                    yield chunk([ChunkChoice(index=delta.index, finish_reason=finish,
                                             delta=DeltaMessage(content=content, tool_calls=tool_calls or None),
                                             logprobs=wire_logprobs(delta.logprobs))])
                delta = await anext(stream, None)
            if include_usage:
                yield chunk([], usage=totals.usage())
            status = "2xx"
            yield DONE
        except APIError as exc:
            status = f"{exc.status // 100}xx"
            logger.warning("stream %s failed: %s", rid, exc.message)
            yield sse_json(error_body(exc.status, exc.message, exc.type, exc.param, exc.code))
            yield DONE
        except Exception:  # a bug or an engine failure mid-stream: the client still gets an error and [DONE]
            status = "5xx"
            logger.exception("stream %s failed", rid)
            yield sse_json(internal_error_body())
            yield DONE
        finally:
            if status == "aborted":
                logger.info("stream %s ended early (client disconnected); aborting", rid)
            self.release()
            self._finish(prep, totals, status)
            # Shielded: a disconnect cancels this task, and anyio re-delivers cancellation at every await.
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # the engine backend aborts an unfinished request on close
