"""The Responses API (`/v1/responses`): the request becomes the equivalent chat completion (instructions as
the system turn, input items as turns, `text.format` as `response_format`), served by the chat path, and its
output is written as a Response object or the Responses stream of typed events (created, in_progress, then
per output item: output_item.added, content_part.added, output_text.delta... (reasoning_text.delta... for a
thinking model's reasoning item, function_call_arguments.delta... for a tool call), the matching .done
events; then completed or incomplete). Tool calls are parsed as the chat path parses them (the engine's tool
parser; required and named choices constrained) and written as `function_call` items. A finished response is
kept in the response store (service.serving.response_store) unless `store: false`; `previous_response_id`
puts the stored conversation before this request's input.

A background response generates in a task of its own; one created with `stream: true` writes its events to an
event log (`EventLog`) that the creating call streams, and that `GET /v1/responses/{id}?stream=true
&starting_after=N` streams again from any sequence number, live while it generates: a client that lost its
connection resumes where it was. The log is dropped `RESUME_KEEP_S` after the response ends, or with the
response. vLLM's server keeps such logs for ever, and a resumed stream that ends in anything but
`response.completed` (incomplete, failed) never ends there; here every ending ends it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable

from pydantic import ValidationError

from service.auth import OPEN, Tenant
from service.engine.base import Delta, TokenLogprob
from service.errors import APIError, BadRequest, NotFound, error_body
from service.lifecycle import Drain
from service.protocol.chat import ChatCompletionRequest
from service.protocol.responses import (
    InputItemList,
    OutputFunctionCall,
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningText,
    Response,
    ResponsesRequest,
    ResponseUsage,
)
from service.serving.chat import ChatService, join_text
from service.serving.generation import CLIENT_GONE
from service.serving.jsontext import JsonStringEscaper
from service.serving.response_store import ResponseStore, Stored
from service.serving.sampling import wire_logprobs
from service.serving.tools import StreamedCalls
from service.serving.totals import Prepared, Totals

logger = logging.getLogger("vlora.responses")
RESUME_KEEP_S = 600  # how long a finished background stream's events stay available to GET ...?stream=true


class EventLog:
    """The events of one streamed background response, in order (an event's index is its sequence number):
    one writer (the response's task), any number of readers, each from its own position."""

    def __init__(self):
        self.events: list[str] = []
        self.nbytes = 0
        self.done = False
        self._changed = asyncio.Event()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def append(self, event: str) -> None:
        self.events.append(event)
        self.nbytes += len(event)
        self._wake()

    def close(self) -> None:
        self.done = True
        self._wake()

    async def read(self, after: int = -1):
        """The events after sequence number `after`, then each new one as it comes, until the response ends."""
        position = after + 1
        while True:
            changed = self._changed
            while position < len(self.events):
                yield self.events[position]
                position += 1
            if self.done:
                return
            await changed.wait()


def _status(totals: Totals) -> str:
    return "incomplete" if totals.finish.get(0) == "length" else "completed"


def _stores(req: ResponsesRequest, store: ResponseStore | None) -> bool:
    return store is not None and store.enabled and req.store is not False


def _response(req: ResponsesRequest, prep: Prepared, status: str, output: list | None = None,
              totals: Totals | None = None, reasoning_tokens: int | None = None, stored: bool = False) -> Response:
    usage = None
    if totals is not None and status != "in_progress":
        usage = ResponseUsage(input_tokens=totals.prompt_tokens, output_tokens=totals.completion_tokens,
                              total_tokens=totals.prompt_tokens + totals.completion_tokens,
                              input_tokens_details={"cached_tokens": totals.cached_tokens},
                              output_tokens_details={"reasoning_tokens": reasoning_tokens or 0})
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True)
    choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else (req.tool_choice or "auto")
    return Response(id=prep.request.request_id, created_at=prep.created, status=status, model=prep.model,
                    output=output or [], usage=usage, incomplete_details=incomplete, instructions=req.instructions,
                    max_output_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
                    text={"format": fmt}, metadata=req.metadata or {}, parallel_tool_calls=req.parallel_tool_calls,
                    tool_choice=choice, tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
                    store=stored, background=req.background, previous_response_id=req.previous_response_id,
                    reasoning=req.reasoning.model_dump(exclude_none=True) if req.reasoning is not None else None,
                    top_logprobs=req.top_logprobs)


def _text_logprobs(tokens: list[TokenLogprob] | None) -> list[dict]:
    """Tokens' logprobs as an output text carries them (the chat path's shape: token, logprob, bytes and
    top_logprobs)."""
    wired = wire_logprobs(tokens) if tokens else None
    return [t.model_dump() for t in wired.content] if wired is not None else []


def _items(status: str, reasoning: str | None, text: str | None, reasoning_id: str, message_id: str,
           calls: list | None = None, logprobs: list[dict] | None = None) -> list:
    """The output items: the reasoning (when there is any), the message (when it has text, or nothing was
    called), then the function calls."""
    items: list = [OutputReasoning(id=reasoning_id, status=status, content=[ReasoningText(text=reasoning)])] \
        if reasoning is not None else []
    if text or not calls:
        items.append(OutputMessage(id=message_id, status=status,
                                   content=[OutputText(text=text or "", logprobs=logprobs or [])]))
    return items + [OutputFunctionCall(id=f"fc_{uuid.uuid4().hex}", call_id=c.id, name=c.function.name,
                                       arguments=c.function.arguments) for c in calls or []]


def _stored_items(req: ResponsesRequest) -> list[dict]:
    """This request's input items as the store keeps them and input_items lists them: each with an id, a
    message's text as an input_text part."""
    items = []
    for item in req.items():
        data = item.model_dump(exclude_none=True)
        if data["type"] == "message" and isinstance(data["content"], str):
            data["content"] = [{"type": "input_text", "text": data["content"]}]
        prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}[data["type"]]
        data.setdefault("id", f"{prefix}_{uuid.uuid4().hex}")
        items.append(data)
    return items


class ResponsesService:
    def __init__(self, chat: ChatService, store: ResponseStore | None = None, drain: Drain | None = None):
        self.chat = chat
        self.store = store
        self.drain = drain or Drain(0)
        self._tasks: dict[str, asyncio.Task] = {}  # background responses under way
        self._logs: dict[str, EventLog] = {}  # streamed background responses' events, by response id
        if store is not None:  # a finished log counts in the store as part of its response, and goes with it
            store.on_drop = self._drop_finished_log

    def history(self, req: ResponsesRequest, tenant: Tenant) -> list[dict]:
        """The stored conversation `previous_response_id` continues (empty without one)."""
        if req.previous_response_id is None:
            return []
        items = self.store.conversation(tenant.name, req.previous_response_id) if self.store is not None else None
        if items is None:
            raise NotFound(f"Previous response with id '{req.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        return items

    def stored(self, response_id: str, tenant: Tenant) -> Stored:
        entry = self.store.get(tenant.name, response_id) if self.store is not None else None
        if entry is None:
            raise NotFound(f"No response found with id '{response_id}'.", param="response_id")
        return entry

    def delete(self, response_id: str, tenant: Tenant) -> None:
        self.stored(response_id, tenant)
        self.store.delete(tenant.name, response_id)
        self._logs.pop(response_id, None)  # finished or not: nobody may resume it

    def events(self, response_id: str, tenant: Tenant, starting_after: int | None):
        """`GET /v1/responses/{id}?stream=true`: a streamed background response's events after
        `starting_after` (from the first without it), live until it ends."""
        self.stored(response_id, tenant)
        log = self._logs.get(response_id)
        if log is None:
            raise BadRequest(f"response '{response_id}' has no event stream to resume: only a background response "
                             f"created with stream: true has one, kept for {RESUME_KEEP_S} s after it ends",
                             param="stream")
        return log.read(-1 if starting_after is None else starting_after)

    def input_items(self, response_id: str, tenant: Tenant, limit: int, order: str, after: str | None) -> InputItemList:
        """One page of a stored response's own input items (`after`: the id the page starts after)."""
        items = self.stored(response_id, tenant).items
        items = items[::-1] if order == "desc" else items
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise BadRequest(f"after: no input item '{after}' in response '{response_id}'", param="after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return InputItemList(data=page, first_id=page[0]["id"] if page else None,
                             last_id=page[-1]["id"] if page else None, has_more=len(items) > limit)

    def keeper(self, req: ResponsesRequest, tenant: Tenant) -> Callable[[Response], Response]:
        """What stores this request's response (finished; or queued, failed, cancelled in the background) unless
        `store: false`, its input items made once so that their ids stay put; the answer says whether it was."""
        items = _stored_items(req)

        def keep(response: Response) -> Response:
            if response.store and not self.store.put(tenant.name, response.model_dump(), items,
                                                      req.previous_response_id):
                response.store = False
            return response
        return keep

    def _chat_request(self, req: ResponsesRequest, history: list[dict]) -> ChatCompletionRequest:
        try:
            return ChatCompletionRequest.model_validate(req.chat_body(history))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = err.get("loc", ())
            where = ".".join(str(p) for p in loc)
            field = loc[0] if loc and loc[0] in ("tools", "tool_choice", "parallel_tool_calls",
                                                 "structured_outputs") else "input"
            raise BadRequest(f"{field}: {where}: {err.get('msg', 'invalid')}", param=field) from None

    def _steps(self, req: ResponsesRequest, tenant: Tenant, stored: bool, keep: Callable[[Response], Response],
               on_prepared: Callable[[Prepared], None] | None = None):
        """The (prepare, complete, stream) steps of ChatService.serve for this request."""
        async def prepare() -> Prepared:
            chat_request = self._chat_request(req, self.history(req, tenant))
            prep = await self.chat.prepare(chat_request, tenant, request_id=f"resp_{uuid.uuid4().hex}",
                                           kind="response")
            if on_prepared is not None:
                on_prepared(prep)
            return prep

        def complete(prep: Prepared, totals: Totals) -> Response:
            status = _status(totals)
            reasoning, content, tokens = self.chat.split(prep, totals, 0)
            message, _ = self.chat.message(prep, content, totals.finish.get(0), reasoning)
            logprobs = _text_logprobs(totals.logprobs.get(0)) if req.output_logprobs else None
            output = _items(status, reasoning, message.content, f"rs_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}",
                            message.tool_calls, logprobs)
            return keep(_response(req, prep, status, output, totals, tokens, stored))

        def stream(prep: Prepared) -> ResponsesStream:
            return ResponsesStream(req, prep, self.chat, stored, keep)

        return prepare, complete, stream

    async def handle(self, req: ResponsesRequest, tenant: Tenant = OPEN):
        stored = _stores(req, self.store)
        keep = self.keeper(req, tenant)
        if req.background:
            return await self._background(req, tenant, stored, keep)
        prepare, complete, stream = self._steps(req, tenant, stored, keep)
        return await self.chat.serve(req.model, prepare, stream if req.stream else None, complete, tenant)

    async def _background(self, req: ResponsesRequest, tenant: Tenant, stored: bool,
                          keep: Callable[[Response], Response]):
        """`background: true`: admitted and prepared as any request (a refusal is this call's answer), then
        answered `queued` while it generates in a task of its own (stored `queued`, `in_progress` once it goes
        to the engine); the stored response becomes the final one (or `failed`, or `cancelled` by POST
        .../cancel). With `stream: true` the answer is its event stream, read from the response's event log (the task writes it whether or not anyone reads; see EventLog).
        Draining waits for it like for a request in flight."""
        if not stored:
            raise BadRequest("background needs the response stored (store not false, --responses-store-bytes > 0)",
                             param="background")
        started = asyncio.get_running_loop().create_future()
        shell: list[Response] = []
        log = EventLog() if req.stream else None
        formats: list[ResponsesStream] = []

        def on_prepared(prep: Prepared) -> None:
            # Scheduled, not run: serve() still reserves the request's tokens right after prepare, without
            # yielding, and a refusal there must be this call's answer; once the task yields (waiting for an
            # engine slot or its first output), the request is under way.
            def go():
                if not started.done():
                    rid = prep.request.request_id
                    shell.append(keep(_response(req, prep, "queued", stored=True)))
                    self._tasks[rid] = task
                    task.add_done_callback(lambda _: self._tasks.pop(rid, None))
                    if log is not None:
                        self._logs[rid] = log
                        task.add_done_callback(lambda _: self._expire_log(rid, log))
                    started.set_result(shell[0])
            asyncio.get_running_loop().call_soon(go)
            prep.on_dispatched = lambda: asyncio.get_running_loop().call_soon(generating)

        def generating() -> None:  # after go (the loop runs callbacks in order): it goes to the engine now
            entry = self.store.get(tenant.name, shell[0].id) if shell else None
            if entry is not None and entry.response["status"] == "queued":
                keep(shell[0].model_copy(update={"status": "in_progress"}))

        prepare, complete, stream = self._steps(req, tenant, stored, keep, on_prepared)

        def stream_format(prep: Prepared) -> ResponsesStream:
            formats.append(stream(prep))
            return formats[0]

        def failed(error: dict) -> None:
            keep(shell[0].model_copy(update={"status": "failed", "error": error}))

        async def work() -> None:
            CLIENT_GONE.set(None)  # the caller does not wait for this request: its disconnect ends nothing
            self.drain.in_flight += 1
            try:
                if log is None:
                    await self.chat.serve(req.model, prepare, None, complete, tenant)
                else:
                    try:
                        body = await self.chat.serve(req.model, prepare, stream_format, complete, tenant)
                    except APIError as exc:  # under way, then refused by the engine before its first output
                        if started.done():
                            for event in formats[0].error(error_body(exc.status, exc.message, exc.type, exc.param,
                                                                     exc.code)):
                                log.append(event)
                        raise
                    async for event in body:
                        log.append(event)
                    if formats[0].failure is not None:  # the stream ended in its error event
                        failed(formats[0].failure)
            except BaseException as exc:
                if not started.done():  # refused before it was under way: the refusal is the call's answer
                    if isinstance(exc, asyncio.CancelledError):
                        started.cancel()
                    else:
                        started.set_exception(exc)
                elif isinstance(exc, asyncio.CancelledError):
                    keep(shell[0].model_copy(update={"status": "cancelled"}))
                else:
                    if not isinstance(exc, APIError):
                        logger.exception("background response %s failed", shell[0].id)
                    failed({"code": getattr(exc, "code", None) or getattr(exc, "type", "server_error"),
                            "message": exc.message if isinstance(exc, APIError) else "internal server error"})
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                self.drain.in_flight -= 1
                if log is not None:
                    log.close()

        task = asyncio.create_task(work())
        queued = await started
        return log.read() if log is not None else queued

    def _drop_finished_log(self, response_id: str) -> None:
        """The store let a response go (evicted): its finished event log goes with it. A log still being
        written stays: its task stores the response again as it ends, and the log is then counted with it."""
        log = self._logs.get(response_id)
        if log is not None and log.done:
            del self._logs[response_id]

    def _expire_log(self, response_id: str, log: EventLog) -> None:
        """A finished stream's events stay RESUME_KEEP_S, counted against --responses-store-bytes as part of
        their response (evicted with it; dropped at once when they do not fit). While it runs, a log is bounded
        by its request's max_output_tokens like any stream in flight."""
        if self._logs.get(response_id) is not log:
            return  # its response was deleted while it ran
        if not self.store.hold(response_id, log.nbytes):
            del self._logs[response_id]
            return

        def drop() -> None:
            if self._logs.get(response_id) is log:
                del self._logs[response_id]
                self.store.release(response_id)
        asyncio.get_running_loop().call_later(RESUME_KEEP_S, drop)

    async def cancel(self, response_id: str, tenant: Tenant) -> Response:
        """Cancel a background response still under way; one already finished is answered as it is."""
        entry = self.stored(response_id, tenant)
        if not entry.response.get("background"):
            raise BadRequest("Cannot cancel a synchronous response.", param="response_id")
        task = self._tasks.get(response_id)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return Response.model_validate(self.stored(response_id, tenant).response)


class ResponsesStream:
    """The Responses API's typed events (each `event: TYPE` + `data: {...}` with a sequence number). Items open
    as their output arrives, each at the next output index: the reasoning item (a thinking model's), the message
    (opened at the start when the output can be neither reasoning nor a tool call, and at the end at the latest
    unless a tool was called), function calls (name first, then their arguments as they are written)."""

    def __init__(self, req: ResponsesRequest, prep: Prepared, chat: ChatService, stored: bool = False,
                 keep: Callable[[Response], Response] = lambda response: response):
        self.req, self.prep = req, prep
        self.stored, self.keep = stored, keep  # whether the answer is to be stored, and what stores it
        self.thinker = chat.engine.reasoning_parser(prep.request.reasoning) \
            if prep.request.reasoning is not None else None
        self.calls = StreamedCalls(chat.engine.tool_call_parser(), forced=prep.forced_tools,
                                   parallel=prep.parallel_tool_calls) if prep.tool_mode != "none" else None
        self.json = JsonStringEscaper() if prep.json_output else None
        # Logprobs asked for (include): each text delta carries those of the tokens since the previous one (a
        # thinking model's reasoning tokens too, as the whole response's text does), the text's done event all.
        self.logprobs: list[TokenLogprob] | None = [] if req.output_logprobs else None
        self.logprobs_sent = 0
        self.reasoning_id, self.message_id = f"rs_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.seq = 0
        self.order: list[str] = []  # item ids, in output order
        self.reasoning: list[str] | None = None  # None until the reasoning item opens
        self.text: list[str] | None = None  # None until the message item opens
        self.functions: dict[int, OutputFunctionCall] = {}  # by the call's index, while streaming
        self.failure: dict | None = None  # the error the stream ended with, if it did

    def _event(self, type_: str, **fields) -> str:
        payload = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {type_}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def _where(self, item_id: str) -> dict:
        return {"item_id": item_id, "output_index": self.order.index(item_id), "content_index": 0}

    def _added(self, item) -> str:
        self.order.append(item.id)
        return self._event("response.output_item.added", output_index=len(self.order) - 1, item=item.model_dump())

    def start(self) -> list[str]:
        shell = _response(self.req, self.prep, "in_progress", stored=self.stored).model_dump()
        events = [self._event("response.created", response=shell), self._event("response.in_progress", response=shell)]
        return events + (self._open_message() if self.thinker is None and self.calls is None else [])

    def _open_reasoning(self) -> list[str]:
        self.reasoning = []
        return [self._added(OutputReasoning(id=self.reasoning_id, status="in_progress")),
                self._event("response.content_part.added", **self._where(self.reasoning_id),
                            part=ReasoningText(text="").model_dump())]

    def _close_reasoning(self, status: str) -> list[str]:
        if self.reasoning is None or self.text is not None or self.functions:
            return []  # not open, or closed already (the message or a call came after it)
        text = "".join(self.reasoning)
        where = self._where(self.reasoning_id)
        item = OutputReasoning(id=self.reasoning_id, status=status, content=[ReasoningText(text=text)]).model_dump()
        return [self._event("response.reasoning_text.done", **where, text=text),
                self._event("response.content_part.done", **where, part=ReasoningText(text=text).model_dump()),
                self._event("response.output_item.done", output_index=where["output_index"], item=item)]

    def _open_message(self, reasoning_status: str = "completed") -> list[str]:
        events = self._close_reasoning(reasoning_status)
        self.text = []
        return events + [self._added(OutputMessage(id=self.message_id, status="in_progress")),
                         self._event("response.content_part.added", **self._where(self.message_id),
                                     part=OutputText(text="").model_dump())]

    def _function_deltas(self, deltas) -> list[str]:
        events = []
        for d in deltas:
            call = self.functions.get(d.index)
            if call is None:
                events += self._close_reasoning("completed")
                call = OutputFunctionCall(id=f"fc_{uuid.uuid4().hex}", call_id=d.id, name=d.function.name or "",
                                          arguments="", status="in_progress")
                self.functions[d.index] = call
                events.append(self._added(call))
            if d.function.arguments:
                call.arguments += d.function.arguments
                events.append(self._event("response.function_call_arguments.delta", item_id=call.id,
                                          output_index=self.order.index(call.id), delta=d.function.arguments))
        return events

    def delta(self, delta: Delta) -> list[str]:
        reasoning, content = None, delta.text or None
        if self.thinker is not None:
            reasoning, content = self.thinker.feed(delta.text, delta.token_ids)
            if delta.finish_reason:
                held_reasoning, held_content = self.thinker.end()
                reasoning, content = join_text(reasoning, held_reasoning), join_text(content, held_content)
        if content and self.json is not None:
            content = self.json.feed(content)
        calls = []
        if self.calls is not None:
            if content:
                content, calls = self.calls.feed(content)
            if delta.finish_reason:
                calls += self.calls.end()
        if self.logprobs is not None and delta.logprobs:
            self.logprobs += delta.logprobs
        events = []
        if reasoning and self.text is None and not self.functions:  # reasoning after other output is dropped
            if self.reasoning is None:
                events += self._open_reasoning()
            self.reasoning.append(reasoning)
            events.append(self._event("response.reasoning_text.delta", **self._where(self.reasoning_id),
                                      delta=reasoning))
        if content and not self.functions:  # text after a call is not expected; it is dropped
            if self.text is None:
                events += self._open_message()
            self.text.append(content)
            events.append(self._event("response.output_text.delta", **self._where(self.message_id), delta=content,
                                      logprobs=self._new_logprobs()))
        return events + self._function_deltas(calls)

    def _new_logprobs(self) -> list[dict]:
        if self.logprobs is None:
            return []
        new, self.logprobs_sent = self.logprobs[self.logprobs_sent:], len(self.logprobs)
        return _text_logprobs(new)

    def end(self, totals: Totals) -> list[str]:
        status = _status(totals)
        events = []
        if self.text is None and not self.functions:
            events += self._open_message(status)
        events += self._close_reasoning(status)
        tokens = self.thinker.reasoning_tokens() if self.thinker is not None else None
        by_id = {c.id: c for c in self.functions.values()}
        output = []
        for item_id in self.order:
            if item_id == self.reasoning_id:
                output.append(OutputReasoning(id=item_id, status=status,
                                              content=[ReasoningText(text="".join(self.reasoning))]))
            elif item_id == self.message_id:
                text, logprobs = "".join(self.text), _text_logprobs(self.logprobs)
                output.append(OutputMessage(id=item_id, status=status,
                                            content=[OutputText(text=text, logprobs=logprobs)]))
                where = self._where(item_id)
                events += [self._event("response.output_text.done", **where, text=text, logprobs=logprobs),
                           self._event("response.content_part.done", **where, part=OutputText(text=text).model_dump()),
                           self._event("response.output_item.done", output_index=where["output_index"],
                                       item=output[-1].model_dump())]
            else:
                call = by_id[item_id].model_copy(update={"status": "completed" if status == "completed" else status})
                output.append(call)
                index = self.order.index(item_id)
                events += [self._event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                                       arguments=call.arguments),
                           self._event("response.output_item.done", output_index=index, item=call.model_dump())]
        done = self.keep(_response(self.req, self.prep, status, output, totals, tokens, self.stored)).model_dump()
        return events + [self._event(f"response.{status}", response=done)]

    def error(self, body: dict) -> list[str]:
        err = body["error"]
        self.failure = {"code": err.get("code") or err.get("type"), "message": err["message"]}
        return [self._event("error", code=err.get("code"), message=err["message"], param=err.get("param"))]
