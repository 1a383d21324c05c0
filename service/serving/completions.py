"""Completions (`/v1/completions`): a text prompt as it is (no chat template, no images) -> the engine ->
OpenAI's legacy completion or its SSE stream. Admission, adapters, accounting and streaming are the chat
service's (`generation.py`), so one backpressure bound covers every endpoint."""

from __future__ import annotations

import uuid

from service.auth import OPEN, Tenant
from service.engine.base import Delta, GenerationRequest, TokenLogprob
from service.protocol.completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from service.serving.generation import Generation, sse_error
from service.serving.render import ChatRenderer
from service.serving.sampling import sampling_for
from service.serving.sse import DONE, sse_event
from service.serving.totals import Prepared, Totals


def legacy_logprobs(tokens: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for t in tokens:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        top: dict[str, float] = {}
        for tok, lp, _ in t.top:  # two tokens may decode to the same text (partial UTF-8): keep the better one
            top[tok] = max(lp, top.get(tok, lp))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


class CompletionService:
    def __init__(self, generation: Generation, renderer: ChatRenderer):
        self.gen = generation
        self.renderer = renderer

    async def handle(self, req: CompletionRequest, tenant: Tenant = OPEN):
        stream = ((lambda prep: CompletionStream(prep, req.include_usage, req.prompt if req.echo else "", req.n))
                  if req.stream else None)
        return await self.gen.serve(req.model, lambda: self.prepare(req, tenant), stream,
                                    lambda prep, totals: self.completion(req, prep, totals), tenant)

    @staticmethod
    def completion(req: CompletionRequest, prep: Prepared, totals: Totals) -> Completion:
        echoed = req.prompt if req.echo else ""
        choices = [CompletionChoice(index=i, text=echoed + "".join(totals.text.get(i, [])),
                                    finish_reason=totals.finish.get(i),
                                    logprobs=legacy_logprobs(totals.logprobs.get(i, []))
                                    if req.logprobs is not None else None)
                   for i in range(req.n)]
        return Completion(id=prep.request.request_id, created=prep.created, model=prep.model, choices=choices,
                          usage=totals.usage())

    async def prepare(self, req: CompletionRequest, tenant: Tenant) -> Prepared:
        revision = await self.gen.resolve(req.model, tenant)
        try:
            ids = self.renderer.tokenize(req.prompt)
            prompt_tokens = self.renderer.text_tokens(ids)
            room = self.gen.room_for(prompt_tokens, req.max_tokens, "prompt")
            sampling = sampling_for(req, req.max_tokens or room, self.renderer.vocab_size)
            gen = GenerationRequest(request_id=f"cmpl-{uuid.uuid4().hex}", prompt=req.prompt, prompt_token_ids=ids,
                                    sampling=sampling,
                                    adapter=revision.key if revision is not None else None)
            return Prepared(request=gen, model=req.model, revision=revision, kind="completion", prompt_tokens=prompt_tokens,
                            adapter_label=self.gen.adapter_label(revision))
        except BaseException:
            self.gen.registry.release(revision)
            raise


class CompletionStream:
    """Completion chunks (`object: text_completion`): text and logprob deltas, usage last, then [DONE]."""

    def __init__(self, prep: Prepared, include_usage: bool, echo: str = "", n: int = 1):
        self.prep, self.include_usage, self.echo, self.n = prep, include_usage, echo, n
        self.offsets: dict[int, int] = {}

    def _chunk(self, choices: list[CompletionChoice], usage=None) -> str:
        p = self.prep
        return sse_event(Completion(id=p.request.request_id, created=p.created, model=p.model, choices=choices,
                                    usage=usage))

    def start(self) -> list[str]:
        if not self.echo:  # echo: each choice starts with the prompt, before its first token
            return []
        return [self._chunk([CompletionChoice(index=i, text=self.echo)]) for i in range(self.n)]

    def delta(self, delta: Delta) -> list[str]:
        if not (delta.text or delta.finish_reason or delta.logprobs):
            return []
        logprobs = None
        if delta.logprobs is not None:
            offset = self.offsets.get(delta.index, 0)
            logprobs = legacy_logprobs(delta.logprobs, offset)
            self.offsets[delta.index] = offset + sum(len(t.token) for t in delta.logprobs)
        return [self._chunk([CompletionChoice(index=delta.index, text=delta.text, finish_reason=delta.finish_reason,
                                              logprobs=logprobs)])]

    def end(self, totals: Totals) -> list[str]:
        return ([self._chunk([], usage=totals.usage())] if self.include_usage else []) + [DONE]

    def error(self, body: dict) -> list[str]:
        return sse_error(body)
