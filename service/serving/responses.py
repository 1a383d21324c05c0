"""The Responses API (`/v1/responses`): the request becomes the equivalent chat completion (instructions as
the system turn, input items as turns, `text.format` as `response_format`), served by the chat path, and its
output is written as a Response object or the Responses stream of typed events (created, in_progress, then
per output item: output_item.added, content_part.added, output_text.delta... (reasoning_text.delta... for a
thinking model's reasoning item), the matching .done events; then completed or incomplete). Nothing is
stored."""

from __future__ import annotations

import json
import uuid

from pydantic import ValidationError

from service.auth import OPEN, Tenant
from service.engine.base import Delta
from service.errors import BadRequest
from service.protocol.chat import ChatCompletionRequest
from service.protocol.responses import (
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningText,
    Response,
    ResponsesRequest,
    ResponseUsage,
)
from service.serving.chat import ChatService, join_text
from service.serving.totals import Prepared, Totals


def _status(totals: Totals) -> str:
    return "incomplete" if totals.finish.get(0) == "length" else "completed"


def _response(req: ResponsesRequest, prep: Prepared, status: str, output: list | None = None,
              totals: Totals | None = None, reasoning_tokens: int | None = None) -> Response:
    usage = None
    if totals is not None and status != "in_progress":
        usage = ResponseUsage(input_tokens=totals.prompt_tokens, output_tokens=totals.completion_tokens,
                              total_tokens=totals.prompt_tokens + totals.completion_tokens,
                              output_tokens_details={"reasoning_tokens": reasoning_tokens or 0})
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True)
    return Response(id=prep.request.request_id, created_at=prep.created, status=status, model=prep.model,
                    output=output or [], usage=usage, incomplete_details=incomplete, instructions=req.instructions,
                    max_output_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
                    text={"format": fmt}, metadata=req.metadata or {})


def _items(status: str, reasoning: str | None, text: str, reasoning_id: str, message_id: str) -> list:
    """The output items: the reasoning (when there is any), then the message."""
    items: list = [OutputReasoning(id=reasoning_id, status=status, content=[ReasoningText(text=reasoning)])] \
        if reasoning is not None else []
    return items + [OutputMessage(id=message_id, status=status, content=[OutputText(text=text)])]


class ResponsesService:
    def __init__(self, chat: ChatService):
        self.chat = chat

    def _chat_request(self, req: ResponsesRequest) -> ChatCompletionRequest:
        try:
            return ChatCompletionRequest.model_validate(req.chat_body())
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            raise BadRequest(f"input: {where}: {err.get('msg', 'invalid')}", param="input") from None

    async def handle(self, req: ResponsesRequest, tenant: Tenant = OPEN):
        async def prepare() -> Prepared:
            return await self.chat.prepare(self._chat_request(req), tenant, request_id=f"resp_{uuid.uuid4().hex}",
                                           kind="response")

        def complete(prep: Prepared, totals: Totals) -> Response:
            status = _status(totals)
            reasoning, content, tokens = self.chat.split(prep, totals, 0)
            output = _items(status, reasoning, content or "", f"rs_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}")
            return _response(req, prep, status, output, totals, tokens)

        stream = (lambda prep: ResponsesStream(req, prep, self.chat)) if req.stream else None
        return await self.chat.serve(req.model, prepare, stream, complete, tenant)


class ResponsesStream:
    """The Responses API's typed events (each `event: TYPE` + `data: {...}` with a sequence number). Items open
    as their text arrives: the reasoning item (a thinking model's), then the message (opened at the start when
    the output has no reasoning, and at the end at the latest, so that every response has one)."""

    def __init__(self, req: ResponsesRequest, prep: Prepared, chat: ChatService):
        self.req, self.prep = req, prep
        self.thinker = chat.engine.reasoning_parser(prep.request.reasoning) \
            if prep.request.reasoning is not None else None
        self.reasoning_id, self.message_id = f"rs_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.seq = 0
        self.reasoning: list[str] | None = None  # None until the reasoning item opens
        self.text: list[str] | None = None  # None until the message item opens

    def _event(self, type_: str, **fields) -> str:
        payload = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {type_}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def _where(self, item: str) -> dict:
        if item == "reasoning":
            return {"item_id": self.reasoning_id, "output_index": 0, "content_index": 0}
        return {"item_id": self.message_id, "output_index": 1 if self.reasoning is not None else 0,
                "content_index": 0}

    def start(self) -> list[str]:
        shell = _response(self.req, self.prep, "in_progress").model_dump()
        events = [self._event("response.created", response=shell), self._event("response.in_progress", response=shell)]
        return events + (self._open_message() if self.thinker is None else [])

    def _open_reasoning(self) -> list[str]:
        self.reasoning = []
        item = OutputReasoning(id=self.reasoning_id, status="in_progress").model_dump()
        return [self._event("response.output_item.added", output_index=0, item=item),
                self._event("response.content_part.added", **self._where("reasoning"),
                            part=ReasoningText(text="").model_dump())]

    def _close_reasoning(self, status: str) -> list[str]:
        text = "".join(self.reasoning)
        part = ReasoningText(text=text).model_dump()
        item = OutputReasoning(id=self.reasoning_id, status=status, content=[ReasoningText(text=text)]).model_dump()
        return [self._event("response.reasoning_text.done", **self._where("reasoning"), text=text),
                self._event("response.content_part.done", **self._where("reasoning"), part=part),
                self._event("response.output_item.done", output_index=0, item=item)]

    def _open_message(self, reasoning_status: str = "completed") -> list[str]:
        events = self._close_reasoning(reasoning_status) if self.reasoning is not None else []
        self.text = []
        item = OutputMessage(id=self.message_id, status="in_progress").model_dump()
        where = self._where("message")
        return events + [self._event("response.output_item.added", output_index=where["output_index"], item=item),
                         self._event("response.content_part.added", **where, part=OutputText(text="").model_dump())]

    def delta(self, delta: Delta) -> list[str]:
        reasoning, content = None, delta.text or None
        if self.thinker is not None:
            reasoning, content = self.thinker.feed(delta.text, delta.token_ids)
            if delta.finish_reason:
                held_reasoning, held_content = self.thinker.end()
                reasoning, content = join_text(reasoning, held_reasoning), join_text(content, held_content)
        events = []
        if reasoning and self.text is None:  # reasoning after the message opened is not expected; it is dropped
            if self.reasoning is None:
                events += self._open_reasoning()
            self.reasoning.append(reasoning)
            events.append(self._event("response.reasoning_text.delta", **self._where("reasoning"), delta=reasoning))
        if content:
            if self.text is None:
                events += self._open_message()
            self.text.append(content)
            events.append(self._event("response.output_text.delta", **self._where("message"), delta=content,
                                      logprobs=[]))
        return events

    def end(self, totals: Totals) -> list[str]:
        status = _status(totals)
        events = self._open_message(status) if self.text is None else []
        text = "".join(self.text)
        reasoning = "".join(self.reasoning) if self.reasoning is not None else None
        where = self._where("message")
        tokens = self.thinker.reasoning_tokens() if self.thinker is not None else None
        done = _response(self.req, self.prep, status, _items(status, reasoning, text, self.reasoning_id,
                                                             self.message_id), totals, tokens).model_dump()
        return events + [self._event("response.output_text.done", **where, text=text, logprobs=[]),
                         self._event("response.content_part.done", **where, part=OutputText(text=text).model_dump()),
                         self._event("response.output_item.done", output_index=where["output_index"],
                                     item=done["output"][-1]),
                         self._event(f"response.{status}", response=done)]

    def error(self, body: dict) -> list[str]:
        err = body["error"]
        return [self._event("error", code=err.get("code"), message=err["message"], param=err.get("param"))]
