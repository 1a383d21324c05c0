"""The Responses API (`/v1/responses`): the request becomes the equivalent chat completion (instructions as
the system turn, input items as turns, `text.format` as `response_format`), served by the chat path, and its
output is written as a Response object or the Responses stream of typed events (created, in_progress,
output_item.added, content_part.added, output_text.delta..., the matching .done events, then completed or
incomplete). Nothing is stored."""

from __future__ import annotations

import json
import uuid

from pydantic import ValidationError

from service.auth import OPEN, Tenant
from service.engine.base import Delta
from service.errors import BadRequest
from service.protocol.chat import ChatCompletionRequest
from service.protocol.responses import OutputMessage, OutputText, Response, ResponsesRequest, ResponseUsage
from service.serving.chat import ChatService
from service.serving.totals import Prepared, Totals


def _response(req: ResponsesRequest, prep: Prepared, status: str, text: str | None = None,
              totals: Totals | None = None, message_id: str = "") -> Response:
    output = []
    if text is not None:
        output = [OutputMessage(id=message_id, status="completed" if status == "completed" else status,
                                content=[OutputText(text=text)])]
    usage = None
    if totals is not None and status != "in_progress":
        usage = ResponseUsage(input_tokens=totals.prompt_tokens, output_tokens=totals.completion_tokens,
                              total_tokens=totals.prompt_tokens + totals.completion_tokens)
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True)
    return Response(id=prep.request.request_id, created_at=prep.created, status=status, model=prep.model,
                    output=output, usage=usage, incomplete_details=incomplete, instructions=req.instructions,
                    max_output_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
                    text={"format": fmt}, metadata=req.metadata or {})


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
            status = "incomplete" if totals.finish.get(0) == "length" else "completed"
            return _response(req, prep, status, "".join(totals.text.get(0, [])), totals, f"msg_{uuid.uuid4().hex}")

        stream = (lambda prep: ResponsesStream(req, prep)) if req.stream else None
        return await self.chat.serve(req.model, prepare, stream, complete)


class ResponsesStream:
    """The Responses API's typed events (each `event: TYPE` + `data: {...}` with a sequence number)."""

    def __init__(self, req: ResponsesRequest, prep: Prepared):
        self.req, self.prep = req, prep
        self.item = f"msg_{uuid.uuid4().hex}"
        self.seq = 0
        self.text: list[str] = []

    def _event(self, type_: str, **fields) -> str:
        payload = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {type_}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def _where(self) -> dict:
        return {"item_id": self.item, "output_index": 0, "content_index": 0}

    def start(self) -> list[str]:
        shell = _response(self.req, self.prep, "in_progress").model_dump()
        item = OutputMessage(id=self.item, status="in_progress").model_dump()
        return [self._event("response.created", response=shell), self._event("response.in_progress", response=shell),
                self._event("response.output_item.added", output_index=0, item=item),
                self._event("response.content_part.added", **self._where(), part=OutputText(text="").model_dump())]

    def delta(self, delta: Delta) -> list[str]:
        if not delta.text:
            return []
        self.text.append(delta.text)
        return [self._event("response.output_text.delta", **self._where(), delta=delta.text, logprobs=[])]

    def end(self, totals: Totals) -> list[str]:
        text = "".join(self.text)
        status = "incomplete" if totals.finish.get(0) == "length" else "completed"
        part = OutputText(text=text).model_dump()
        done = _response(self.req, self.prep, status, text, totals, self.item).model_dump()
        return [self._event("response.output_text.done", **self._where(), text=text, logprobs=[]),
                self._event("response.content_part.done", **self._where(), part=part),
                self._event("response.output_item.done", output_index=0, item=done["output"][0]),
                self._event(f"response.{status}", response=done)]

    def error(self, body: dict) -> list[str]:
        err = body["error"]
        return [self._event("error", code=err.get("code"), message=err["message"], param=err.get("param"))]
