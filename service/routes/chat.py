"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.errors import APIError
from service.protocol.chat import ChatCompletion, ChatCompletionRequest

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_none=True)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    chat = request.app.state.chat
    try:
        prepared = await chat.prepare(body)
    except APIError as exc:
        chat.metrics.count_refusal(chat.registry.label_for_model(body.model), str(exc.status))
        raise
    if body.stream:
        stream = await chat.open_stream(prepared, body.include_usage)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await chat.complete(prepared)
