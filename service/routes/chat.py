"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.auth import tenant_of
from service.protocol.chat import ChatCompletion, ChatCompletionRequest
from service.routes import GENERATION_RESPONSES

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_none=True,
             responses=GENERATION_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    result = await request.app.state.chat.handle(body, tenant_of(request))
    if body.stream:
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return result
