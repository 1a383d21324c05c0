"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.protocol.chat import ChatCompletion, ChatCompletionRequest
from service.routes import GENERATION_RESPONSES, answer, requester

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_none=True,
             responses=GENERATION_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return answer(await request.app.state.chat.handle(body, requester(request)), body.stream)
