"""POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.protocol.completions import Completion, CompletionRequest
from service.routes import GENERATION_RESPONSES, answer, requester

router = APIRouter()


@router.post("/v1/completions", response_model=Completion, response_model_exclude_none=True,
             responses=GENERATION_RESPONSES)
async def completions(body: CompletionRequest, request: Request):
    return answer(await request.app.state.completions.handle(body, requester(request)), body.stream)
