"""Completions (`/v1/completions`): a text prompt as it is (no chat template, no images) -> the engine ->
OpenAI's legacy completion or its SSE stream. Admission, adapters, accounting and streaming are the chat
service's (`generation.py`), so one backpressure bound covers every endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field, replace

from service.auth import OPEN, Tenant
from service.engine.base import Delta, GenerationRequest, TokenLogprob
from service.errors import APIError, BadRequest
from service.protocol.completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from service.protocol.sampling import PromptTokensDetails, Usage
from service.serving.generation import Generation, sse_error
from service.serving.jsontext import JsonStringEscaper, valid_json_text
from service.serving.render import ChatRenderer
from service.serving.sampling import refuse_prompt_logprobs, sampling_for, token_text, wire_prompt_logprobs
from service.serving.sse import DONE, sse_event, sse_json
from service.serving.totals import Prepared, Totals


def legacy_logprobs(tokens: list[TokenLogprob], offset: int = 0, out: CompletionLogprobs | None = None,
                    as_ids: bool = False, wanted: int | None = None) -> CompletionLogprobs:
    """OpenAI's legacy logprobs of `tokens` from text offset `offset` (on `out`); `as_ids`: tokens named
    "token_id:N" (their offsets stay those of their text); `wanted`: at most this many alternatives each."""
    out = out if out is not None else CompletionLogprobs()
    for t in tokens:
        out.tokens.append(token_text(t.token, t.id, as_ids))
        out.token_logprobs.append(t.logprob)
        top: dict[str, float] = {}
        for alt in t.top[:wanted]:  # two tokens may decode to the same text (partial UTF-8): keep the better one
            name = token_text(alt.token, alt.id, as_ids)
            top[name] = max(alt.logprob, top.get(name, alt.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(t.token)
    out.text_end = offset
    return out


def prompt_logprobs(tokens: list[TokenLogprob | None] | None, first: tuple[str, int], as_ids: bool = False,
                    wanted: int | None = None) -> CompletionLogprobs:
    """The prompt's part of echo's logprobs: its tokens from offset 0, the first (`first`: its text and id)
    without a logprob or alternatives (OpenAI's null)."""
    out = CompletionLogprobs()
    if not tokens:
        return out
    text, token_id = first
    out.tokens.append(token_text(text, token_id, as_ids))
    out.token_logprobs.append(None)
    out.top_logprobs.append(None)
    out.text_offset.append(0)
    return legacy_logprobs([t for t in tokens[1:] if t is not None], len(text), out, as_ids, wanted)


@dataclass
class Batch:
    """What the streams of one batch of prompts share: one completion id and time, their usage, the first
    error event of one of them (the merged stream ends with it)."""

    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))

    def add(self, usage: Usage) -> Batch:
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cached_tokens += usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        return self


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The exception to answer a failed batch with: an API error (a 4xx/5xx of one prompt) before others."""
    flat = []
    stack = [group]
    while stack:
        for exc in stack.pop().exceptions:
            (stack if isinstance(exc, BaseExceptionGroup) else flat).append(exc)
    return next((e for e in flat if isinstance(e, APIError)), flat[0])


class CompletionService:
    def __init__(self, generation: Generation, renderer: ChatRenderer):
        self.gen = generation
        self.renderer = renderer

    async def handle(self, req: CompletionRequest, tenant: Tenant = OPEN):
        if len(req.prompt) == 1:
            return await self._serve(req, req.prompt[0], 0, tenant)
        if not req.stream:
            parts = await self._all(req, tenant, None)
            total = Batch()
            for part in parts:
                total.add(part.usage)
            return Completion(id=parts[0].id, created=parts[0].created, model=parts[0].model,
                              choices=[c for part in parts for c in part.choices], usage=total.usage())
        batch = Batch()
        return self._merged(await self._all(req, tenant, batch), batch, req)

    async def _all(self, req: CompletionRequest, tenant: Tenant, batch: Batch | None) -> list:
        """Every prompt of a batch served at once; the first failure cancels the others and is the answer."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._serve(req, prompt, k * req.n, tenant, batch))
                         for k, prompt in enumerate(req.prompt)]
        except BaseExceptionGroup as failed:
            for task in tasks:  # streams that had opened: run each to its first event and close it (its slot)
                if task.done() and not task.cancelled() and task.exception() is None:
                    body = task.result()
                    with contextlib.suppress(StopAsyncIteration):
                        await anext(body)
                    await body.aclose()
            raise _first_error(failed) from None
        return [task.result() for task in tasks]

    async def _merged(self, bodies: list, batch: Batch, req: CompletionRequest):
        """The prompts' streams as one: their chunks as they come (choice indices already offset), then the
        usage of all of them and one [DONE]; an error event of one ends it."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(body) -> None:
            try:
                async for event in body:
                    await queue.put(event)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(body)) for body in bodies]
        try:
            open_ = len(tasks)
            while open_:
                event = await queue.get()
                if event is None:
                    open_ -= 1
                    continue
                yield event
                if event is batch.error:
                    break
            if batch.error is None and req.include_usage:
                yield sse_event(Completion(id=batch.id, created=batch.created, model=req.model, choices=[],
                                           usage=batch.usage()))
            yield DONE
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, req: CompletionRequest, prompt: str | list[int], offset: int, tenant: Tenant,
                     batch: Batch | None = None):
        """One prompt as one request: its choices numbered from `offset`."""
        stream = ((lambda prep: CompletionStream(prep, req.include_usage, prep.request.prompt if req.echo else "",
                                                 req.n, self._first_token(prep) if self._echo_logprobs(req) else None,
                                                 offset=offset, batch=batch))
                  if req.stream else None)
        return await self.gen.serve(req.model, lambda: self.prepare(req, prompt, tenant), stream,
                                    lambda prep, totals: self.completion(req, prep, totals, offset), tenant)

    @staticmethod
    def _echo_logprobs(req: CompletionRequest) -> bool:
        return req.echo and req.logprobs is not None

    def _first_token(self, prep: Prepared) -> tuple[str, int]:
        """The prompt's first token: its text and id."""
        ids = prep.request.prompt_token_ids or []
        return (self.renderer.tokenizer.decode(ids[:1]), ids[0]) if ids else ("", -1)

    def completion(self, req: CompletionRequest, prep: Prepared, totals: Totals, offset: int = 0) -> Completion:
        echoed = prep.request.prompt if req.echo else ""

        def logprobs(i: int) -> CompletionLogprobs | None:
            if req.logprobs is None:
                return None
            as_ids = prep.tokens_as_ids
            if not req.echo:
                return legacy_logprobs(totals.logprobs.get(i, []), as_ids=as_ids)
            # the engine's prompt alternatives are as many as the larger of logprobs and prompt_logprobs ask
            head = prompt_logprobs(totals.prompt_logprobs, self._first_token(prep), as_ids, req.logprobs)
            return legacy_logprobs(totals.logprobs.get(i, []), head.text_end, head, as_ids)

        def text(i: int) -> str:
            out = "".join(totals.text.get(i, []))
            return valid_json_text(out) if prep.json_output else out

        ids = req.return_token_ids
        prompt_wire = (wire_prompt_logprobs(totals.prompt_logprobs, req.prompt_logprobs)
                       if req.prompt_logprobs is not None else None)
        choices = [CompletionChoice(index=offset + i, text=echoed + text(i),
                                    finish_reason=totals.finish.get(i), logprobs=logprobs(i),
                                    prompt_token_ids=totals.prompt_token_ids if ids else None,
                                    token_ids=totals.token_ids.get(i, []) if ids else None,
                                    prompt_logprobs=prompt_wire)
                   for i in range(req.n)]
        return Completion(id=prep.request.request_id, created=prep.created, model=prep.model, choices=choices,
                          usage=totals.usage())

    def _ids(self, req: CompletionRequest, prompt: str | list[int]) -> tuple[str, list[int]]:
        """(text, token ids) of one prompt, given as text or as token ids, as `truncate_prompt_tokens` keeps it
        (the text then the kept tokens' text: what echo returns)."""
        if isinstance(prompt, str):
            ids = self.renderer.tokenize(prompt)
        else:
            beyond = sorted({t for t in prompt if t >= self.renderer.vocab_size})
            if beyond:
                raise BadRequest(f"the prompt holds token id(s) {beyond[:5]} outside the vocabulary (size "
                                 f"{self.renderer.vocab_size})", param="prompt")
            ids = list(prompt)
        kept = req.truncated(ids, self.gen.engine.max_model_len)
        if isinstance(prompt, str) and kept is ids:
            return prompt, ids
        return self.renderer.tokenizer.decode(kept), kept

    async def prepare(self, req: CompletionRequest, prompt: str | list[int], tenant: Tenant) -> Prepared:
        revision = await self.gen.resolve(req.model, tenant)
        try:
            text, ids = self._ids(req, prompt)
            prompt_tokens = self.renderer.text_tokens(ids)
            room = self.gen.room_for(prompt_tokens, req.max_tokens, "prompt")
            sampling = sampling_for(req, req.max_tokens or room, self.renderer.vocab_size)
            if self._echo_logprobs(req):
                if req.logprob_token_ids:
                    raise BadRequest("logprob_token_ids does not name the prompt's alternatives: send it without "
                                     "echo (as vLLM's server requires)", param="logprob_token_ids")
                refuse_prompt_logprobs(revision, req.model, "echo")
                sampling = replace(sampling, prompt_logprobs=max(req.logprobs, req.prompt_logprobs or 0))
            elif req.prompt_logprobs is not None:
                refuse_prompt_logprobs(revision, req.model, "prompt_logprobs")
            gen = GenerationRequest(request_id=f"cmpl-{uuid.uuid4().hex}", prompt=text, prompt_token_ids=ids,
                                    sampling=sampling, cache_salt=req.cache_salt,
                                    adapter=revision.key if revision is not None else None)
            return Prepared(request=gen, model=req.model, revision=revision, kind="completion", prompt_tokens=prompt_tokens,
                            adapter_label=self.gen.adapter_label(revision), return_token_ids=req.return_token_ids,
                            tokens_as_ids=req.return_tokens_as_token_ids)
        except BaseException:
            self.gen.registry.release(revision)
            raise


class CompletionStream:
    """Completion chunks (`object: text_completion`): text and logprob deltas, usage last, then [DONE]."""

    def __init__(self, prep: Prepared, include_usage: bool, echo: str = "", n: int = 1,
                 echo_first_token: tuple[str, int] | None = None, offset: int = 0, batch: Batch | None = None):
        """`echo_first_token` (the prompt's first token's text and id): echo with logprobs, whose echo chunks carry
        the prompt's logprobs and so wait for the first delta (which brings them). `offset`: the index of the
        prompt's first choice in a batch; `batch`: the batch whose merged stream this one feeds (its chunks take
        the batch's id, its usage and ending are the merged stream's)."""
        self.prep, self.include_usage, self.echo, self.n = prep, include_usage, echo, n
        self.offset, self.batch = offset, batch
        self.first_token = echo_first_token
        self.offsets: dict[int, int] = {}
        self.prompt: CompletionLogprobs | None = None
        self.echoed: set[int] = set()
        self.json = {i: JsonStringEscaper() for i in range(n)} if prep.json_output else {}
        self.prompt_ids: list[int] | None = None  # with return_token_ids: sent on each choice's first chunk
        self.ids_sent: set[int] = set()

    def _chunk(self, choices: list[CompletionChoice], usage=None) -> str:
        p, b = self.prep, self.batch
        for choice in choices:
            choice.index += self.offset
        return sse_event(Completion(id=b.id if b else p.request.request_id, created=b.created if b else p.created,
                                    model=p.model, choices=choices, usage=usage))

    def start(self) -> list[str]:
        if not self.echo or self.first_token is not None:  # echo: each choice starts with the prompt
            return []
        return [self._chunk([CompletionChoice(index=i, text=self.echo)]) for i in range(self.n)]

    def delta(self, delta: Delta) -> list[str]:
        head = []
        if self.first_token is not None:
            if delta.prompt_logprobs is not None:
                self.prompt = prompt_logprobs(delta.prompt_logprobs, self.first_token, self.prep.tokens_as_ids)
            if delta.index not in self.echoed:  # the choice's first delta: its echo first, with the prompt's logprobs
                self.echoed.add(delta.index)
                prompt = self.prompt or CompletionLogprobs()
                self.offsets[delta.index] = prompt.text_end
                head = [self._chunk([CompletionChoice(index=delta.index, text=self.echo, logprobs=prompt)])]
        ids = self.prep.return_token_ids
        if ids and delta.prompt_token_ids is not None:
            self.prompt_ids = list(delta.prompt_token_ids)
        if not (delta.text or delta.finish_reason or delta.logprobs or ids and delta.token_ids):
            return head
        logprobs = None
        if delta.logprobs is not None:
            offset = self.offsets.get(delta.index, 0)
            logprobs = legacy_logprobs(delta.logprobs, offset, as_ids=self.prep.tokens_as_ids)
            self.offsets[delta.index] = offset + sum(len(t.token) for t in delta.logprobs)
        text = delta.text
        if text and (escaper := self.json.get(delta.index)) is not None:
            text = escaper.feed(text)
        prompt_ids = None
        if ids and delta.index not in self.ids_sent:
            self.ids_sent.add(delta.index)
            prompt_ids = self.prompt_ids
        return head + [self._chunk([CompletionChoice(index=delta.index, text=text, finish_reason=delta.finish_reason,
                                                     logprobs=logprobs, prompt_token_ids=prompt_ids,
                                                     token_ids=list(delta.token_ids) if ids else None)])]

    def end(self, totals: Totals) -> list[str]:
        if self.batch is not None:
            self.batch.add(totals.usage())
            return []
        return ([self._chunk([], usage=totals.usage())] if self.include_usage else []) + [DONE]

    def error(self, body: dict) -> list[str]:
        if self.batch is not None:
            event = sse_json(body)
            if self.batch.error is None:
                self.batch.error = event
            return [event]
        return sse_error(body)
