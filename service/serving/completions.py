"""Completions (`/v1/completions`): a text prompt as it is (no chat template, no images) -> the engine ->
OpenAI's legacy completion or its SSE stream. Admission, adapters, accounting and streaming are the chat
service's (`generation.py`), so one backpressure bound covers every endpoint."""

from __future__ import annotations

import uuid
from dataclasses import replace

from service.auth import OPEN, Tenant
from service.engine.base import Delta, GenerationRequest, TokenLogprob
from service.errors import BadRequest
from service.protocol.completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from service.serving.generation import Generation, sse_error
from service.serving.render import ChatRenderer
from service.serving.sampling import sampling_for
from service.serving.sse import DONE, sse_event
from service.serving.totals import Prepared, Totals


def legacy_logprobs(tokens: list[TokenLogprob], offset: int = 0,
                    out: CompletionLogprobs | None = None) -> CompletionLogprobs:
    out = out if out is not None else CompletionLogprobs()
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


def prompt_logprobs(tokens: list[TokenLogprob | None] | None, first: str) -> CompletionLogprobs:
    """The prompt's part of echo's logprobs: its tokens from offset 0, the first (`first`, its text) without a
    logprob or alternatives (OpenAI's null)."""
    out = CompletionLogprobs()
    if not tokens:
        return out
    out.tokens.append(first)
    out.token_logprobs.append(None)
    out.top_logprobs.append(None)
    out.text_offset.append(0)
    return legacy_logprobs([t for t in tokens[1:] if t is not None], len(first), out)


def _text_end(logprobs: CompletionLogprobs) -> int:
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1]) if logprobs.tokens else 0


class CompletionService:
    def __init__(self, generation: Generation, renderer: ChatRenderer):
        self.gen = generation
        self.renderer = renderer

    async def handle(self, req: CompletionRequest, tenant: Tenant = OPEN):
        stream = ((lambda prep: CompletionStream(prep, req.include_usage, req.prompt if req.echo else "", req.n,
                                                 self._first_token(prep) if self._echo_logprobs(req) else None))
                  if req.stream else None)
        return await self.gen.serve(req.model, lambda: self.prepare(req, tenant), stream,
                                    lambda prep, totals: self.completion(req, prep, totals), tenant)

    @staticmethod
    def _echo_logprobs(req: CompletionRequest) -> bool:
        return req.echo and req.logprobs is not None

    def _first_token(self, prep: Prepared) -> str:
        ids = prep.request.prompt_token_ids or []
        return self.renderer.tokenizer.decode(ids[:1]) if ids else ""

    def completion(self, req: CompletionRequest, prep: Prepared, totals: Totals) -> Completion:
        echoed = req.prompt if req.echo else ""

        def logprobs(i: int) -> CompletionLogprobs | None:
            if req.logprobs is None:
                return None
            if not req.echo:
                return legacy_logprobs(totals.logprobs.get(i, []))
            head = prompt_logprobs(totals.prompt_logprobs, self._first_token(prep))
            return legacy_logprobs(totals.logprobs.get(i, []), _text_end(head), head)

        choices = [CompletionChoice(index=i, text=echoed + "".join(totals.text.get(i, [])),
                                    finish_reason=totals.finish.get(i), logprobs=logprobs(i))
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
            if self._echo_logprobs(req):
                if revision is not None:  # see service/engine/vllm_fixes.py, lora-prompt-logprobs
                    raise BadRequest(f"echo with logprobs (the prompt's own logprobs) is served for the base model "
                                     f"only, not for adapter '{req.model}': the engine does not score a prompt "
                                     "through an adapter correctly", param="echo")
                sampling = replace(sampling, prompt_logprobs=req.logprobs)
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

    def __init__(self, prep: Prepared, include_usage: bool, echo: str = "", n: int = 1,
                 echo_first_token: str | None = None):
        """`echo_first_token` (the prompt's first token's text): echo with logprobs, whose echo chunks carry
        the prompt's logprobs and so wait for the first delta (which brings them)."""
        self.prep, self.include_usage, self.echo, self.n = prep, include_usage, echo, n
        self.first_token = echo_first_token
        self.offsets: dict[int, int] = {}
        self.prompt: CompletionLogprobs | None = None
        self.echoed: set[int] = set()

    def _chunk(self, choices: list[CompletionChoice], usage=None) -> str:
        p = self.prep
        return sse_event(Completion(id=p.request.request_id, created=p.created, model=p.model, choices=choices,
                                    usage=usage))

    def start(self) -> list[str]:
        if not self.echo or self.first_token is not None:  # echo: each choice starts with the prompt
            return []
        return [self._chunk([CompletionChoice(index=i, text=self.echo)]) for i in range(self.n)]

    def delta(self, delta: Delta) -> list[str]:
        head = []
        if self.first_token is not None:
            if delta.prompt_logprobs is not None:
                self.prompt = prompt_logprobs(delta.prompt_logprobs, self.first_token)
            if delta.index not in self.echoed:  # the choice's first delta: its echo first, with the prompt's logprobs
                self.echoed.add(delta.index)
                prompt = self.prompt or CompletionLogprobs()
                self.offsets[delta.index] = _text_end(prompt)
                head = [self._chunk([CompletionChoice(index=delta.index, text=self.echo, logprobs=prompt)])]
        if not (delta.text or delta.finish_reason or delta.logprobs):
            return head
        logprobs = None
        if delta.logprobs is not None:
            offset = self.offsets.get(delta.index, 0)
            logprobs = legacy_logprobs(delta.logprobs, offset)
            self.offsets[delta.index] = offset + sum(len(t.token) for t in delta.logprobs)
        return head + [self._chunk([CompletionChoice(index=delta.index, text=delta.text,
                                                     finish_reason=delta.finish_reason, logprobs=logprobs)])]

    def end(self, totals: Totals) -> list[str]:
        return ([self._chunk([], usage=totals.usage())] if self.include_usage else []) + [DONE]

    def error(self, body: dict) -> list[str]:
        return sse_error(body)
